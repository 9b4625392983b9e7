"""GaLore+ (Liao et al., "GaLore+: Boosting Low-Rank Adaptation for LLMs with Cross-Head
Projection", arXiv 2412.19820): GaLore with a cheaper refresh and a smaller approximation error.

- Randomized subspace iteration instead of an exact SVD (`svd: rsi`, in galore.py).
- Cross-head projection: the heads of an attention weight share one basis on the side that is
  not split into heads (the model dimension). It is estimated from `heads` heads only (sampled
  per refresh, seeded by name and step; at least rank/head_dim of them so the sample has rank r),
  so the SVD is of an (s*head_dim) x dim matrix instead of the whole weight. The head layout comes
  from the parameter's shard spec; heads are also the tensor-parallel split, so every tp rank
  projects its own heads with the shared basis (galore.py explains how the basis is shared).
- Sparsely coded residuals: after `residual_warmup` steps, the `density` fraction of entries
  where the gradient's low-rank approximation misses most (largest |G - back(project(G))|) is
  fixed; Adam moments are kept on those entries of the residual and their step is added to the
  low-rank update. The entries are chosen in the whole matrix (the residual is gathered over
  the shard group once, at the end of the warm-up), and every step the k residual values are
  summed over the group so every rank keeps the same k moments and applies its own entries:
  the same result as one process, and the state reshards like any replicated tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from skipjack.config import GaLoreConfig
from skipjack.optim.galore import LOW_RANK_DEFAULTS, GaLoreAdamW, Projection, adam_direction
from skipjack.parallel.shard_spec import ShardSpec, all_gather_full

_SCHEMA = GaLoreConfig()
GALORE_PLUS_DEFAULTS = {
    **LOW_RANK_DEFAULTS,
    **{key: getattr(_SCHEMA, key) for key in ("heads", "density", "residual_warmup")},
}


def sampled_heads(n_heads: int, wanted: int, head_dim: int, rank: int, gen) -> torch.Tensor:
    """Sorted indices of the heads a cross-head basis is estimated from: `wanted`, raised to
    ceil(rank / head_dim) so that the sample can hold a rank-r basis."""
    count = min(n_heads, max(wanted, math.ceil(rank / head_dim)))
    return torch.randperm(n_heads, generator=gen)[:count].sort().values


def _cross_head(proj: Projection, group: dict) -> bool:
    return group["heads"] > 0 and proj.spec.heads is not None


class GaLorePlusAdamW(GaLoreAdamW):
    """GaLore AdamW plus cross-head projection (`heads` > 0) and sparse residuals
    (`density` > 0) in the low-rank groups; options and defaults in GALORE_PLUS_DEFAULTS."""

    low_rank_defaults = GALORE_PLUS_DEFAULTS

    def _check(self, group: dict) -> None:
        super()._check(group)
        if group["heads"] < 0 or not 0.0 <= group["density"] <= 1.0 or group["residual_warmup"] < 0:
            raise ValueError("GaLore+ needs heads >= 0, 0 <= density <= 1, residual_warmup >= 0")

    def _projection(self, p: torch.Tensor, group: dict) -> Projection:
        proj = super()._projection(p, group)
        if not _cross_head(proj, group):
            return proj
        # the shared basis runs along the side that is not split into heads
        side = "right" if proj.spec.heads.dim == 0 else "left"
        return Projection(side, proj.rank, proj.spec)

    def _estimate(self, full, group: dict, proj: Projection, gen) -> torch.Tensor:
        if not _cross_head(proj, group):
            return super()._estimate(full, group, proj, gen)
        heads = proj.spec.heads
        chosen = sampled_heads(heads.n_heads, group["heads"], heads.head_dim, proj.rank, gen)
        blocks = full.unflatten(heads.dim, (heads.n_heads, heads.head_dim))
        # the heads are drawn on the CPU generator; index_select wants them on the gradient's device
        sample = blocks.index_select(heads.dim, chosen.to(full.device))
        sample = sample.flatten(heads.dim, heads.dim + 1)
        return super()._estimate(sample, group, proj, gen)

    # --- sparse residuals -------------------------------------------------------------------

    def _residual_count(self, p: torch.Tensor, group: dict) -> int:
        if p not in self._projections or group["density"] <= 0:
            return 0
        return math.ceil(group["density"] * math.prod(self._projections[p].spec.global_shape))

    def _shapes(self, p, group):
        shapes = super()._shapes(p, group)
        k = self._residual_count(p, group)
        if k:
            shapes.update(
                residual_index=((k,), torch.int64),
                residual_avg=((k,), torch.float32),
                residual_avg_sq=((k,), torch.float32),
            )
        return shapes

    def _add_residual(self, p, grad, low, group, state, update) -> torch.Tensor:
        step = int(state["step"])
        if "residual_index" not in state or step < group["residual_warmup"]:
            return update
        proj, basis, index = self._projections[p], state["projector"], state["residual_index"]
        pg = self._groups[proj.spec.group] if proj.spec.sharded else None
        if step == group["residual_warmup"]:  # fix the entries the low-rank part misses most
            residual = grad - self._back(low, basis, proj)
            whole = residual if pg is None else all_gather_full(residual, proj.spec, self._groups)
            index.copy_(whole.flatten().abs().topk(index.numel()).indices.sort().values)
        mine, rows, cols = _local_entries(index, proj.spec)
        # the residual at those entries only: k dot products of length r, not a full product
        if proj.side == "left":
            approx = (basis[rows] * low[:, cols].T).sum(1)
        else:
            approx = (low[rows] * basis[cols]).sum(1)
        values = torch.zeros(index.numel(), device=grad.device)
        values[mine] = grad[rows, cols] - approx
        if pg is not None:  # every rank runs the same Adam on all k entries
            dist.all_reduce(values, group=pg)
        direction = adam_direction(
            values, state["residual_avg"], state["residual_avg_sq"],
            step - group["residual_warmup"] + 1, group["betas"], group["eps"],
        )  # fmt: skip
        update.index_put_((rows, cols), direction[mine], accumulate=True)
        return update


def _local_entries(index: torch.Tensor, spec: ShardSpec):
    """Of flat indices into the global matrix: which lie in this rank's shard (a mask), and
    their rows and columns in the shard."""
    row, col = index // spec.global_shape[1], index % spec.global_shape[1]
    if not spec.sharded:
        return torch.ones_like(index, dtype=torch.bool), row, col
    m, n = spec.local_shape
    if spec.dim == 0:
        row = row - spec.index * m
        mine = (row >= 0) & (row < m)
    else:
        col = col - spec.index * n
        mine = (col >= 0) & (col < n)
    return mine, row[mine], col[mine]
