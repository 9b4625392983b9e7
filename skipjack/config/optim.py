"""`optim`: the optimizer (AdamW, GaLore, GaLore+) and its LR schedule, and their checks."""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

from dataclasses import dataclass, field
from typing import Optional

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

Optimizer = Choice("Optimizer", "adamw galore galore_plus")
ProjType = Choice("ProjType", "std reverse_std left right")
Moments = Choice("Moments", "keep reset rotate")  # on a basis change
SvdMethod = Choice("SvdMethod", "exact rsi")  # rsi: randomized subspace iteration
CrossHead = Choice("CrossHead", "head model")  # GaLore+: the side of the shared attention basis
# the low-rank options' values, which GaLore also checks its parameter groups against
GALORE_CHOICES = {"proj_type": tuple(ProjType), "moments": tuple(Moments), "svd": tuple(SvdMethod)}


@dataclass
class GaLoreConfig:
    """Low-rank optimizer states for the attention and MLP matrices (docs/optimizers.md); read
    when optim.name is galore or galore_plus. `rank`: None takes the GaLore paper's rank for the
    model preset (a quarter of dim for other models)."""

    rank: Optional[int] = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: ProjType = ProjType.std
    moments: Moments = Moments.keep
    svd: SvdMethod = SvdMethod.exact
    oversample: int = 8
    power_iters: int = 1
    # GaLore+ only: heads drawn for a shared attention basis (0: off) and its side; sparse
    # residuals on the `density` fraction of entries, chosen over `residual_warmup` steps (and
    # chosen again over the `residual_warmup` steps after each refresh with `residual_rebuild`)
    heads: int = 0
    cross_head: CrossHead = CrossHead.model
    density: float = 0.0
    residual_warmup: int = 0
    residual_rebuild: bool = False


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)


def validate_optim(o: OptimConfig) -> None:
    if o.name != "adamw":
        _validate_galore(o.galore, plus=o.name == "galore_plus")
    positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")


def _validate_galore(g: GaLoreConfig, plus: bool) -> None:
    if g.rank is not None and g.rank < 0:
        raise ConfigError("optim.galore.rank", f"must be >= 0 (or null: by preset), got {g.rank}")
    if g.rank == 0 and not (plus and g.density > 0):
        raise ConfigError(
            "optim.galore.rank",
            "0 leaves the attention and MLP matrices without updates; use rank >= 1 (rank 0 "
            "only makes sense with optim=galore_plus and optim.galore.density > 0)",
        )
    positive("optim.galore.update_proj_gap", g.update_proj_gap)
    for name in ("oversample", "power_iters", "heads", "residual_warmup"):
        if getattr(g, name) < 0:
            raise ConfigError(f"optim.galore.{name}", f"must be >= 0, got {getattr(g, name)}")
    if not 0.0 <= g.density <= 1.0:
        raise ConfigError("optim.galore.density", f"must be in [0, 1], got {g.density}")
    plus_only = [name for name in ("heads", "density", "residual_rebuild") if getattr(g, name)]
    if not plus and plus_only:
        raise ConfigError(
            f"optim.galore.{plus_only[0]}",
            "cross-head projection and sparse residuals are GaLore+; use optim=galore_plus",
        )
    if g.residual_rebuild and g.residual_warmup >= g.update_proj_gap:
        raise ConfigError(
            "optim.galore.residual_rebuild",
            f"re-choosing the residual entries takes residual_warmup={g.residual_warmup} steps "
            f"after each refresh, which must end before the next one (update_proj_gap="
            f"{g.update_proj_gap}); lower residual_warmup or turn residual_rebuild off",
        )
