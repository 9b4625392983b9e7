"""`regime`: an efficient-training regime that trains a subnetwork of the model at each step
(docs/regimes.md): none, EST (evolving subnetworks) or SAT (sparsity-accelerated training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError

RegimeName = Choice("RegimeName", "none est sat")


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
class SatConfig:
    """SAT (Ma et al., Findings of ACL 2024), for continual pre-training and SFT from a
    checkpoint. `ladder`: rungs [until, omission], `until` a fraction of train.steps, `omission`
    the fraction of attention heads and MLP neurons every layer leaves out until then (the last
    rung 0: dense training at the end). Heads and neurons are drawn without replacement with
    probability proportional to their importance (the output magnitude they contribute,
    averaged over the tokens of the steps that ran them, `decay`: its moving average's decay)."""

    ladder: list = field(
        default_factory=lambda: [[0.05, 0.0], [0.5, 0.5], [0.7, 0.3], [0.85, 0.15], [1.0, 0.0]]
    )
    decay: float = 0.9


@dataclass
class RegimeConfig:
    name: RegimeName = RegimeName.none
    est: EstConfig = field(default_factory=EstConfig)
    sat: SatConfig = field(default_factory=SatConfig)


def validate_regime(r: RegimeConfig) -> None:
    if r.name == "sat":
        _validate_sat(r.sat)
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


def _validate_sat(s: SatConfig) -> None:
    ends = []
    for i, rung in enumerate(s.ladder):
        if len(rung) != 2 or not 0.0 <= rung[1] < 1.0:
            raise ConfigError(
                f"regime.sat.ladder[{i}]", f"a rung is [until, omission in [0, 1)], got {rung}"
            )
        ends.append(rung[0])
    if not ends or ends != sorted(ends) or ends[-1] != 1.0 or ends[0] <= 0.0:
        raise ConfigError(
            "regime.sat.ladder", f"rungs must end in increasing order and the last at 1.0: {ends}"
        )
    if not 0.0 <= s.decay < 1.0:
        raise ConfigError("regime.sat.decay", f"must be in [0, 1), got {s.decay}")
