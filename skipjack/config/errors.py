"""The one error a config check raises, and the small checks every section shares."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work. The message names the field and says what to do."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name


def positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value}")
