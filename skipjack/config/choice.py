"""`Choice`: the type of a config field that takes one of a few fixed strings."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A field's allowed values, as a str Enum whose members are named by their values:
    `Schedule = Choice("Schedule", "gpipe 1f1b interleaved_1f1b")`. OmegaConf matches a config's
    value against the member names when the job is composed and refuses any other, naming the
    key and the choices; names equal to values keep skipjack's spelling (`1f1b`, which is no
    Python name, hence the functional form) in overrides, `--cfg job` and config.yaml. A member
    is its value as a string: it compares, hashes (as a dict key), formats and dumps (json,
    OmegaConf.to_yaml) as the plain string."""

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
        return name

    def __str__(self) -> str:
        return self.value
