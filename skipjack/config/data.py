"""`data` (and `skipjack preprocess`): where tokens come from, and its checks."""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError

DataKind = Choice("DataKind", "builtin indexed sft")
OnBadRecord = Choice("OnBadRecord", "skip fail")
PreprocessKind = Choice("PreprocessKind", "indexed sft")


@dataclass
class DataConfig:
    """Where tokens come from.

    `kind=builtin` trains on the Python standard library's source (on every machine, cached after
    first use). `kind=indexed` reads Megatron indexed datasets made by `skipjack preprocess`:
    `paths` is a blend, either prefixes alone or alternating weight and prefix. `kind=sft` reads
    instruction data (jsonl files in `paths`; docs/post-training.md): `tokenizer` may name a
    model directory (its tokenizer.json and chat template; default: model.init_from), `pack`
    puts several examples into one sequence, `on_bad_record` skips malformed records (reported
    with their lines) or stops at the first.
    """

    kind: DataKind = DataKind.builtin
    paths: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    cache_dir: str = "${oc.env:SKIPJACK_CACHE,'~/.cache/skipjack'}"
    pack: bool = True
    on_bad_record: OnBadRecord = OnBadRecord.skip


@dataclass
class PreprocessConfig:
    """`skipjack preprocess`: text/jsonl files -> Megatron indexed dataset (.bin/.idx); with
    `kind=sft`, jsonl instruction records -> tokenized examples with their loss masks
    (<output_prefix>.sft.npz, for data=sft), rendered with the chat template of `tokenizer` (a
    model directory) where it has one."""

    kind: PreprocessKind = PreprocessKind.indexed
    inputs: list[str] = field(default_factory=list)
    output_prefix: str = MISSING
    json_key: str = "text"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    on_bad_record: OnBadRecord = OnBadRecord.skip  # kind=sft
    cache_dir: str = "${oc.env:SKIPJACK_CACHE,'~/.cache/skipjack'}"


def validate_data(d: DataConfig) -> None:
    if d.kind == "indexed":
        if not d.paths:
            raise ConfigError(
                "data.paths", "data.kind=indexed needs dataset prefixes (from skipjack preprocess)"
            )
        for prefix in parse_blend(d.paths)[0]:
            for suffix in (".bin", ".idx"):
                if not os.path.exists(os.path.expanduser(prefix) + suffix):
                    raise ConfigError(
                        "data.paths",
                        f"{prefix}{suffix} does not exist; run `skipjack preprocess` to make it",
                    )
    if d.kind == "sft":
        if not d.paths:
            raise ConfigError("data.paths", "data=sft needs jsonl files of instruction records")
        for path in d.paths:
            if not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(
                    "data.paths", f"{path} does not exist (a jsonl file, or a .sft.npz file)"
                )
    if d.tokenizer is not None and not os.path.exists(os.path.expanduser(d.tokenizer)):
        raise ConfigError(
            "data.tokenizer", f"{d.tokenizer} does not exist; give a tokenizer.json or null"
        )
    split = [s for s in d.split.split(",") if s.strip()]
    try:
        parts = [float(s) for s in split]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[1] <= 0:
        raise ConfigError(
            "data.split", f"{d.split!r} must be 'train,valid,test' weights with valid > 0"
        )


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """A blend written as `[w1, p1, w2, p2, ...]` or `[p1, p2, ...]` -> (prefixes, weights)."""
    weighted = len(paths) % 2 == 0 and all(_is_number(p) for p in paths[0::2])
    if weighted:
        return list(paths[1::2]), [float(w) for w in paths[0::2]]
    return list(paths), None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
