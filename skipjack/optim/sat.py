"""SAT: sparsity-accelerated training (Ma et al., Findings of ACL 2024, arXiv 2406.01392).

For continual pre-training and SFT of a pretrained model: each step leaves out a fraction of
every layer's attention heads and MLP neurons, chosen by importance, and runs smaller dense
matmuls on the rest. The fraction follows a ladder: dense while importance is first measured,
then a fixed omission rate, then stepwise lower rates, ending in dense training.

Choices the paper leaves open (docs/regimes.md):
- **Importance** of a unit is the magnitude of what it adds to the residual stream: a neuron's
  mean |activation| over the step's tokens times the norm of its column of the down projection;
  a head's mean output norm times the norm of its columns of the output projection
  (activation-weighted, as Wanda weighs weights by input norms). It is measured in the training
  forward of the units that ran (the model's observers), summed over micro-batches, replicas,
  tensor-parallel shards and pipeline stages by one all-reduce per step, and kept as a moving
  average (`decay`); a unit left out keeps its last value.
- **Selection**: the kept units are drawn without replacement with probability proportional to
  importance (Gumbel top-k, seeded by the run's seed and the step: the same on every rank), not
  the plain top-k, under which a unit once left out would never be measured again. Units never
  measured count as the layer's mean. One global selection per layer, each tensor-parallel
  shard running its part (the same selection at any tp; a shard may run more units than another).
- **No output rescaling**: the units left out are the least important; scaling the rest up by
  n / k would overstate their sum.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from skipjack.config.model import ModelConfig
from skipjack.config.regime import SatConfig
from skipjack.models.subnet import Subnet, shard_subnet


class SAT:
    def __init__(
        self,
        cfg: SatConfig,
        model: ModelConfig,
        steps: int,
        seed: int,
        tp_rank: int,
        tp: int,
        blocks: dict[int, nn.Module],
        group: dist.ProcessGroup | None,
    ):
        self.cfg, self.model, self.seed, self.group = cfg, model, seed, group
        self.tp_rank, self.tp = tp_rank, tp
        self.ladder = [(round(until * steps), float(omission)) for until, omission in cfg.ladder]
        n_layers = model.n_layers
        self.importance = {
            "heads": torch.zeros(n_layers, model.n_heads),
            "neurons": torch.zeros(n_layers, model.ffn_dim),
        }
        self.seen = {kind: torch.zeros_like(table) for kind, table in self.importance.items()}
        self._sums = {kind: torch.zeros_like(table) for kind, table in self.importance.items()}
        self._counts = {kind: torch.zeros_like(table) for kind, table in self.importance.items()}
        for layer, block in blocks.items():
            block.attention.observer = partial(self._observe_heads, layer)
            block.feed_forward.observer = partial(self._observe_neurons, layer)

    # -- the schedule ---------------------------------------------------------------------------

    def omission(self, step: int) -> float:
        for end, omission in self.ladder:
            if step <= end:
                return omission
        return 0.0

    def counts(self, step: int) -> tuple[int, int]:
        """Heads and neurons per layer that step `step` runs."""
        r, m = self.omission(step), self.model
        return max(1, m.n_heads - round(r * m.n_heads)), max(1, m.ffn_dim - round(r * m.ffn_dim))

    def rates(self, step: int) -> dict[str, float]:
        heads, neurons = self.counts(step)
        return {"heads": heads / self.model.n_heads, "neurons": neurons / self.model.ffn_dim}

    def describe(self) -> str:
        rungs = ", ".join(f"to step {end}: omit {omission:.0%}" for end, omission in self.ladder)
        return f"SAT ladder {rungs}"

    def subnets(self, step: int) -> dict[int, Subnet]:
        if self.omission(step) == 0.0:
            return {}
        m = self.model
        n_heads, n_neurons = self.counts(step)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = {}
        for layer in range(m.n_layers):
            heads = self._draw("heads", layer, n_heads, g)
            neurons = self._draw("neurons", layer, n_neurons, g)
            out[layer] = shard_subnet(
                None if n_heads == m.n_heads else heads,
                None if n_neurons == m.ffn_dim else neurons,
                m,
                self.tp_rank,
                self.tp,
            )
        return out

    def _draw(self, kind: str, layer: int, k: int, g: torch.Generator) -> torch.Tensor:
        """k units of `layer` drawn without replacement, each with probability proportional to
        its importance (Gumbel top-k), sorted."""
        weights, seen = self.importance[kind][layer], self.seen[kind][layer] > 0
        mean = weights[seen].mean() if seen.any() else torch.tensor(1.0)
        weights = torch.where(seen, weights, mean).clamp_min(1e-12)
        uniform = torch.rand(weights.shape, generator=g).clamp(1e-12, 1 - 1e-12)
        keys = weights.log() - (-uniform.log()).log()
        return keys.topk(k).indices.sort().values

    # -- importance -----------------------------------------------------------------------------

    def _observe_heads(self, layer: int, out, wo, heads) -> None:
        b, s, n, hd = out.shape
        activation = out.float().norm(dim=-1).mean(dim=(0, 1))
        weight = wo.float().reshape(wo.shape[0], n, hd).norm(dim=(0, 2))
        self._add("heads", layer, activation * weight, heads, self.model.n_heads // self.tp)

    def _observe_neurons(self, layer: int, hidden, w2, neurons) -> None:
        activation = hidden.float().abs().mean(dim=(0, 1))
        weight = w2.float().norm(dim=0)
        self._add("neurons", layer, activation * weight, neurons, self.model.ffn_dim // self.tp)

    def _add(self, kind: str, layer: int, scores, local, per_shard: int) -> None:
        if local is None:
            local = torch.arange(per_shard)
        index = local.cpu() + self.tp_rank * per_shard
        self._sums[kind][layer].index_add_(0, index, scores.detach().cpu())
        self._counts[kind][layer].index_add_(0, index, torch.ones(len(index)))

    def after_step(self) -> None:
        """Fold the step's measurements into the importance (collective: every rank)."""
        kinds = list(self.importance)
        flat = torch.cat([t.flatten() for k in kinds for t in (self._sums[k], self._counts[k])])
        if self.group is not None:
            dist.all_reduce(flat, group=self.group)
        offset = 0
        for kind in kinds:
            table = self.importance[kind]
            sums = flat[offset : offset + table.numel()].view_as(table)
            counts = flat[offset + table.numel() : offset + 2 * table.numel()].view_as(table)
            offset += 2 * table.numel()
            measured = counts > 0
            mean = sums / counts.clamp_min(1)
            first = measured & (self.seen[kind] == 0)
            decay = self.cfg.decay
            table.copy_(torch.where(first, mean, table))
            table.copy_(torch.where(measured & ~first, decay * table + (1 - decay) * mean, table))
            self.seen[kind].masked_fill_(measured, 1.0)
            self._sums[kind].zero_()
            self._counts[kind].zero_()

    def state_dict(self) -> dict:
        return {
            "heads": self.importance["heads"],
            "neurons": self.importance["neurons"],
            "seen_heads": self.seen["heads"],
            "seen_neurons": self.seen["neurons"],
        }

    def load_state_dict(self, state: dict) -> None:
        for kind in self.importance:
            self.importance[kind].copy_(state[kind])
            self.seen[kind].copy_(state[f"seen_{kind}"])
