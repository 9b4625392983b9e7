"""Weights between Hugging Face and skipjack, and the `skipjack convert` command.

    skipjack convert import <hf dir> <step dir>   # a weights-only skipjack checkpoint
    skipjack convert export <step dir> <hf dir> [--dtype bf16|fp16|fp32]   # for transformers

Import keeps the weights' dtype and refuses a model skipjack cannot represent exactly (one line
naming the config field). Export writes the dtype of the Hugging Face weights the model came from
(also after training from them in fp32), else the checkpoint's, unless `--dtype` says.

A skipjack checkpoint is independent of the layout that wrote it, so one import serves every
layout: `model.init_from=<step dir>` (or directly `model.init_from=<hf dir>`) starts a run with
those weights in whatever dp/pp/tp the run uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from skipjack.atomic import replacing_dir
from skipjack.checkpoint import hf
from skipjack.checkpoint.marker import marked_model, verify, write_marker
from skipjack.checkpoint.sharded import CheckpointError, check_hf, read_model, write_model
from skipjack.config import ConfigError, ModelConfig, parameter_shape, validate_model

_TRAINING_FIELDS = ("name", "init_std", "activation_checkpointing", "init_from")


def init_model_config(base: ModelConfig) -> ModelConfig:
    """The run's model config with the architecture of `base.init_from` (a Hugging Face or a
    skipjack checkpoint directory)."""
    source = Path(base.init_from).expanduser()
    if hf.is_hf_dir(source):
        return hf.model_config(source, base)
    try:
        verify(source)
    except CheckpointError as e:
        raise ConfigError(
            "model.init_from", f"{e}; give a Hugging Face or a step-* directory"
        ) from e
    saved = marked_model(source)
    keep = {f: getattr(base, f) for f in _TRAINING_FIELDS}
    return dataclasses.replace(saved, **keep)


def import_hf(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    checkpoint = hf.HFCheckpoint(source)
    cfg = checkpoint.config
    validate_model(cfg)
    names = hf.parameter_names(cfg)
    check_hf(checkpoint, {name: parameter_shape(cfg, name) for name in names})
    tensors = {name: checkpoint.read(name) for name in names}
    with replacing_dir(target) as tmp:
        write_model(tensors, str(tmp))
        write_marker(tmp, 0, {"dp": 1, "pp": 1, "tp": 1}, cfg)
    return Path(target)


def export_hf(
    source: str | os.PathLike, target: str | os.PathLike, dtype: str | None = None
) -> Path:
    """`source` as a Hugging Face directory, in `dtype` (None: that of the Hugging Face weights
    the model came from, else the checkpoint's)."""
    source = Path(source)
    verify(source)
    cfg = marked_model(source)
    hf.write(cfg, read_model(str(source)), target, dtype)
    return Path(target)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="skipjack convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=("import", "export"))
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--dtype", choices=tuple(hf.DTYPES), help="export: the weights' dtype")
    args = parser.parse_args(argv)
    try:
        if args.direction == "import":
            out = import_hf(args.source, args.target)
        else:
            out = export_hf(args.source, args.target, args.dtype)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"skipjack convert: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"skipjack convert: wrote {out}")
