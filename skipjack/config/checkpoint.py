"""`checkpoint`: when to save, where, how many to keep, what to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skipjack.config.errors import ConfigError, positive


@dataclass
class CheckpointConfig:
    """Sharded persistent checkpoints (docs/checkpoints.md). `interval`: steps between saves,
    0 for none. `resume`: auto (the newest complete checkpoint in `dir`, if any), none, or the
    path of a run directory or of one step-* directory."""

    interval: int = 0
    dir: str = "${train.output_dir}/checkpoints"
    keep_last: int = 3
    resume: str = "auto"


def validate_checkpoint(c: CheckpointConfig) -> None:
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: no saves), got {c.interval}")
    positive("checkpoint.keep_last", c.keep_last)
    if c.resume not in ("auto", "none") and not Path(c.resume).expanduser().exists():
        raise ConfigError(
            "checkpoint.resume",
            f"{c.resume} does not exist; give a run directory, a step-* directory, auto or none",
        )
