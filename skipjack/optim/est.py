"""EST: evolving subnetwork training (Li et al., ICML 2024, arXiv 2406.06962).

Training runs in three stages. Stage 1 trains, each step, a random subnetwork: a sample of the
layers (the others are skipped: the identity on the residual stream) and, in every kept layer, a
sample of its attention heads and MLP neurons. Stage 2 keeps every layer and samples heads and
neurons. Stage 3 trains the full model. The outputs of a sampled attention or MLP are scaled by
the inverse of the fraction that ran (n / k for k of n heads or neurons), so that their expected
value is the full model's; a skipped layer is not compensated (the residual stream carries the
input through, as in stochastic depth's training pass).

The sample of a step is a function of the run's seed and the step alone: identical on every
rank and the same after a resume. The checkpointed state is the seed and the stage ends in
steps: a run resumed with another train.steps or seed keeps the schedule it started with.
"""

from __future__ import annotations

import torch

from skipjack.config.model import ModelConfig
from skipjack.config.regime import EstConfig
from skipjack.models.subnet import Subnet, shard_subnet


class EST:
    def __init__(
        self, cfg: EstConfig, model: ModelConfig, steps: int, seed: int, tp_rank: int, tp: int
    ):
        self.cfg, self.model, self.seed = cfg, model, seed
        self.tp_rank, self.tp = tp_rank, tp
        self.stage1_end = round(cfg.stage1_until * steps)
        self.stage2_end = round(cfg.stage2_until * steps)

    def stage(self, step: int) -> int:
        if step <= self.stage1_end:
            return 1
        return 2 if step <= self.stage2_end else 3

    def counts(self, step: int) -> tuple[int, int, int]:
        """Layers, heads per layer and neurons per layer that step `step` runs."""
        m, c, stage = self.model, self.cfg, self.stage(step)
        if stage == 3:
            return m.n_layers, m.n_heads, m.ffn_dim
        layers = _count(c.p_layers, m.n_layers) if stage == 1 else m.n_layers
        return layers, _count(c.p_heads, m.n_heads), _count(c.p_neurons, m.ffn_dim)

    def rates(self, step: int) -> dict[str, float]:
        layers, heads, neurons = self.counts(step)
        m = self.model
        return {
            "stage": self.stage(step),
            "layers": layers / m.n_layers,
            "heads": heads / m.n_heads,
            "neurons": neurons / m.ffn_dim,
        }

    def subnets(self, step: int) -> dict[int, Subnet]:
        if self.stage(step) == 3:
            return {}
        m = self.model
        n_layers, n_heads, n_neurons = self.counts(step)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        kept = set(torch.randperm(m.n_layers, generator=g)[:n_layers].tolist())
        out = {}
        for layer in range(m.n_layers):
            heads = torch.randperm(m.n_heads, generator=g)[:n_heads].sort().values
            neurons = torch.randperm(m.ffn_dim, generator=g)[:n_neurons].sort().values
            if layer not in kept:
                out[layer] = Subnet(skip=True)
                continue
            out[layer] = shard_subnet(
                None if n_heads == m.n_heads else heads,
                None if n_neurons == m.ffn_dim else neurons,
                m,
                self.tp_rank,
                self.tp,
                head_scale=m.n_heads / n_heads,
                neuron_scale=m.ffn_dim / n_neurons,
            )
        return out

    def after_step(self) -> None:
        pass  # the samples depend on nothing the step measured

    def describe(self) -> str:
        c = self.cfg
        return (
            f"EST: steps 1-{self.stage1_end} sample layers {c.p_layers}, heads {c.p_heads}, "
            f"neurons {c.p_neurons}; to step {self.stage2_end} every layer, heads and neurons "
            "sampled; then the full model"
        )

    def state_dict(self) -> dict:
        return {"name": "est", "seed": self.seed, "stage1_end": self.stage1_end,
                "stage2_end": self.stage2_end}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.stage1_end, self.stage2_end = (
            state["seed"],
            state["stage1_end"],
            state["stage2_end"],
        )


def _count(rate: float, n: int) -> int:
    return max(1, round(rate * n))
