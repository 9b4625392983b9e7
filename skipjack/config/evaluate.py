"""`eval`: what `skipjack eval` runs of a checkpoint (docs/skippipe.md, docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.errors import ConfigError


@dataclass
class EvalConfig:
    """Omit parts of the model: keep only `stages` (indices into the checkpoint's run split into
    `num_stages` even stages; 0: its parallel.pp) or only `layers`; empty: the whole model.
    `batches`: validation global batches (0: train.val_batches)."""

    stages: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    num_stages: int = 0
    batches: int = 0


def validate_eval(e: EvalConfig, n_layers: int) -> None:
    if e.stages and e.layers:
        raise ConfigError("eval.stages", "give eval.stages or eval.layers, not both")
    if e.num_stages < 0 or e.batches < 0:
        raise ConfigError("eval.num_stages", "eval.num_stages and eval.batches must be >= 0")
    bad = [layer for layer in e.layers if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError("eval.layers", f"{bad} are not layers of a {n_layers}-layer model")
    if len(set(e.layers)) != len(e.layers) or len(set(e.stages)) != len(e.stages):
        raise ConfigError("eval.stages", "name each stage or layer once")
