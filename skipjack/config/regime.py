"""`regime`: an efficient-training regime that trains a subnetwork of the model at each step
(docs/regimes.md): none, EST (evolving subnetworks) or SAT (sparsity-accelerated training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError

RegimeName = Choice("RegimeName", "none est")


@dataclass
class EstConfig:
    """EST (Li et al., ICML 2024). Stage 1 (until `stage1_until` x train.steps) samples layers,
    attention heads and MLP neurons at rates `p_layers`, `p_heads`, `p_neurons`; stage 2 (until
    `stage2_until` x train.steps) keeps every layer and samples heads and neurons; stage 3
    trains the full model. Sampled heads' and neurons' outputs are scaled by the inverse of the
    rate realised."""

    stage1_until: float = 0.3
    stage2_until: float = 0.6
    p_layers: float = 0.5
    p_heads: float = 0.5
    p_neurons: float = 0.5


@dataclass
class RegimeConfig:
    name: RegimeName = RegimeName.none
    est: EstConfig = field(default_factory=EstConfig)


def validate_regime(r: RegimeConfig) -> None:
    if r.name != "est":
        return
    e = r.est
    if not 0.0 <= e.stage1_until <= e.stage2_until <= 1.0:
        raise ConfigError(
            "regime.est.stage2_until",
            f"stages must end in order within the run: 0 <= stage1_until ({e.stage1_until}) "
            f"<= stage2_until ({e.stage2_until}) <= 1",
        )
    for name in ("p_layers", "p_heads", "p_neurons"):
        value = getattr(e, name)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"regime.est.{name}", f"a sampling rate in (0, 1], got {value}")
