"""GaLore+ (Liao et al., "GaLore+: Boosting Low-Rank Adaptation for LLMs with Cross-Head
Projection", arXiv 2412.19820): GaLore with a cheaper refresh and a smaller approximation error.
The paper's method section is not available; what skipjack chose, and the measurements behind
each choice, are in docs/optimizers.md.

- Randomized subspace iteration instead of an exact SVD (`svd: rsi`, in galore.py).
- Cross-head projection (`heads` > 0) for the attention weights, two readings (`cross_head`):
  - `model` (the default): one basis on the model side, the side not split into heads, shared
    by the whole matrix (GaLore's projection), estimated from drawn heads (re-drawn at every
    refresh, seeded by name and step): `heads` of them, raised until the sample has rank +
    oversample rows so that the estimate truncates. A weight's gradient is a sum of outer
    products with the layer's input (wq, wk, wv) or output (wo), which every head shares, so one
    head's model-side subspace is nearly every head's (bench/cross_head.py measures it).
  - `head`: one basis on the head side (head_dim x rank/n_heads) from one drawn head, applied
    to every head's block; the moments have GaLore's size at the same rank (n_heads dividing
    it; a rank below n_heads still gives each head one coordinate) and a shard's are its heads'
    rows (no communication under tensor parallelism). It misses far more of real
    gradients than `model`: heads' head-side subspaces are not shared.
- Sparsely coded residuals (`density` > 0): a fixed set of k = density x size entries of each
  low-rank matrix, where the projection misses most, gets Adam's own moments of the whole
  gradient, and their direction, scaled like the low-rank update, replaces the low-rank update
  there. The set is the k entries with the largest residual magnitude |G - back(project(G))|
  summed over steps 0..`residual_warmup` (a bounded candidate list of 4k entries carries the
  sum), fixed after. When it is fixed, the entries' moments start from what the low-rank
  moments held there (the first projected back, the second through the basis's squared
  weights: the same history in numerator and denominator), then follow the gradient entry by
  entry: the low-rank moments' part and the residual's are one moment, counted once. Under
  tensor parallelism the entries are global: each rank fills its own and one all-reduce of k
  values per step gives every rank the same k moments. With `residual_rebuild` the set is
  chosen again over the `residual_warmup` steps after each refresh (the old set in use
  meanwhile); an entry that stays keeps its moments and step count (so counts are per entry),
  a new one is seeded as above. It holds more of the residual but measured no better loss
  (docs/optimizers.md), so it is off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from skipjack.config import GaLoreConfig
from skipjack.config.optim import CrossHead
from skipjack.optim.galore import (
    LOW_RANK_DEFAULTS,
    GaLoreAdamW,
    Projection,
    adam_direction,
    group_subspace,
)
from skipjack.parallel.shard_spec import ShardSpec

_SCHEMA = GaLoreConfig()
GALORE_PLUS_DEFAULTS = {
    **LOW_RANK_DEFAULTS,
    **{
        key: getattr(_SCHEMA, key)
        for key in ("heads", "cross_head", "density", "residual_warmup", "residual_rebuild")
    },
}
CANDIDATES = 4  # residual candidates carried through the warm-up, per entry kept


def sampled_heads(n_heads: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of `count` heads drawn without replacement."""
    return torch.randperm(n_heads, generator=gen)[: min(n_heads, count)].sort().values


@dataclass(frozen=True)
class HeadProjection(Projection):
    """Cross-head projection on the head side: the basis (head_dim x head_rank) acts on the
    head_dim axis of every head's block. `side` is left for heads along the rows (query, key,
    value), right for heads along the columns (output); `rank` = n_heads x head_rank, the
    moments' size along the heads."""

    head_rank: int = 1

    @property
    def sharded_basis(self) -> bool:
        return False  # one small basis for every head, on every rank

    def basis_shape(self) -> tuple[int, int]:
        return self.spec.heads.head_dim, self.head_rank

    def moments_shape(self, local):
        m, n = local
        heads = (m if self.side == "left" else n) // self.spec.heads.head_dim  # this shard's
        size = heads * self.head_rank
        return (size, n) if self.side == "left" else (m, size)

    def _blocks(self, a: torch.Tensor, size: int) -> torch.Tensor:
        """`a` with its heads axis split into (heads, size): (h, size, n) or (m, h, size)."""
        if self.side == "left":
            return a.view(-1, size, a.shape[1])
        return a.view(a.shape[0], -1, size)

    def project(self, grad, basis):
        if self.side == "left":
            return (basis.T @ self._blocks(grad, basis.shape[0])).flatten(0, 1)
        return (self._blocks(grad, basis.shape[0]) @ basis).flatten(1, 2)

    def back(self, low, basis):
        if self.side == "left":
            return (basis @ self._blocks(low, self.head_rank)).flatten(0, 1)
        return (self._blocks(low, self.head_rank) @ basis.T).flatten(1, 2)

    def back_at(self, low, basis, rows, cols):
        hd, blocks = basis.shape[0], self._blocks(low, self.head_rank)
        if self.side == "left":
            return (basis[rows % hd] * blocks[rows // hd, :, cols]).sum(1)
        return (blocks[rows, cols // hd] * basis[cols % hd]).sum(1)

    def rotate(self, moment, mix):
        if self.side == "left":
            return (mix @ self._blocks(moment, self.head_rank)).flatten(0, 1)
        return (self._blocks(moment, self.head_rank) @ mix.T).flatten(1, 2)


class GaLorePlusAdamW(GaLoreAdamW):
    """GaLore AdamW plus cross-head projection (`heads` > 0) and sparse residuals
    (`density` > 0) in the low-rank groups; options and defaults in GALORE_PLUS_DEFAULTS."""

    low_rank_defaults = GALORE_PLUS_DEFAULTS

    def _check(self, group: dict) -> None:
        super()._check(group)
        group["cross_head"] = str(group["cross_head"])
        if group["cross_head"] not in tuple(CrossHead):
            raise ValueError(f"GaLore+ cross_head={group['cross_head']!r}: use head or model")
        if group["heads"] < 0 or not 0.0 <= group["density"] <= 1.0 or group["residual_warmup"] < 0:
            raise ValueError("GaLore+ needs heads >= 0, 0 <= density <= 1, residual_warmup >= 0")

    def _projection(self, p: torch.Tensor, group: dict) -> Projection:
        proj = super()._projection(p, group)
        heads = proj.spec.heads
        if group["heads"] == 0 or heads is None or proj.rank == 0:
            return proj
        if group["cross_head"] == "model":  # the side that is not split into heads
            return Projection("right" if heads.dim == 0 else "left", proj.rank, proj.spec)
        head_rank = min(heads.head_dim, max(1, proj.rank // heads.n_heads))
        side = "left" if heads.dim == 0 else "right"
        return HeadProjection(side, head_rank * heads.n_heads, proj.spec, head_rank)

    def _estimate(self, full, group: dict, proj: Projection, gen) -> torch.Tensor:
        heads = proj.spec.heads
        if group["heads"] == 0 or heads is None:
            return super()._estimate(full, group, proj, gen)
        count = group["heads"]
        if not isinstance(proj, HeadProjection):  # rank + oversample rows: a true truncation
            count = max(count, math.ceil((proj.rank + group["oversample"]) / heads.head_dim))
        chosen = sampled_heads(heads.n_heads, count, gen).to(full.device)
        blocks = full.unflatten(heads.dim, (heads.n_heads, heads.head_dim))
        sample = blocks.index_select(heads.dim, chosen)
        if isinstance(proj, HeadProjection):  # head_dim x (every drawn head's other side)
            sample = sample.movedim(heads.dim + 1, 0).flatten(1)
            rank, side = proj.head_rank, "left"
        else:
            sample = sample.flatten(heads.dim, heads.dim + 1)
            rank, side = proj.rank, proj.side
        return group_subspace(sample, rank, side, group, gen)

    # --- sparse residuals -------------------------------------------------------------------

    def _residual_count(self, p: torch.Tensor, group: dict) -> int:
        if p not in self._projections or group["density"] <= 0:
            return 0
        return math.ceil(group["density"] * math.prod(self._projections[p].spec.global_shape))

    def _shapes(self, p, group):
        shapes = super()._shapes(p, group)
        k = self._residual_count(p, group)
        if k:
            c = min(CANDIDATES * k, math.prod(self._projections[p].spec.global_shape))
            shapes.update(
                residual_index=((k,), torch.int64),
                residual_avg=((k,), torch.float32),
                residual_avg_sq=((k,), torch.float32),
                residual_step=((k,), torch.float32),
                candidate_index=((c,), torch.int64),
                candidate_mass=((c,), torch.float32),
            )
        return shapes

    def _add_residual(self, p, grad, low, group, state, update) -> torch.Tensor:
        if "residual_index" not in state:
            return update
        step, warmup = int(state["step"]), group["residual_warmup"]
        proj, basis, index = self._projections[p], state["projector"], state["residual_index"]
        start = step - step % group["update_proj_gap"] if group["residual_rebuild"] else 0
        if step <= start + warmup:  # choosing (again): the old set stays in use meanwhile
            residual = grad - proj.back(low, basis)
            self._gather_candidates(proj, residual, state, first=step == start)
            if step == start + warmup:
                self._fix_entries(proj, low, group, state, first=start == 0)
            elif start == 0:
                return update
        mine, rows, cols = _local_entries(index, proj.spec)
        values = torch.zeros(index.numel(), device=grad.device)
        values[mine] = grad[rows, cols]
        self._sum_over_shards(values, proj)
        age = state["residual_step"].add_(1)
        avg, avg_sq = state["residual_avg"], state["residual_avg_sq"]
        direction = adam_direction(values, avg, avg_sq, age, group["betas"], group["eps"])
        update.index_put_((rows, cols), direction[mine].mul_(group["scale"]))
        return update

    def _fix_entries(self, proj: Projection, low, group: dict, state: dict, first: bool) -> None:
        """Make the k candidates of largest mass the set. An entry new to it starts its moments
        from what the low-rank moments held there before this step; one it keeps goes on with
        its own."""
        index, basis = state["residual_index"], state["projector"]
        chosen = state["candidate_index"][state["candidate_mass"].topk(index.numel()).indices]
        chosen = chosen.sort().values
        keeps = torch.isin(index, chosen) if not first else torch.zeros_like(index, dtype=bool)
        kept = torch.isin(chosen, index[keeps])
        (beta1, beta2), done = group["betas"], int(state["moment_step"]) - 1
        seeds = torch.zeros(3, index.numel(), device=index.device)
        seeds[2] = done
        mine, rows, cols = _local_entries(chosen, proj.spec)
        if done:  # undo this step's fold (a beta of 0 keeps no history: nothing to seed)
            if beta1 > 0:
                before = (state["exp_avg"] - (1 - beta1) * low) / beta1
                seeds[0, mine] = proj.back_at(before, basis, rows, cols)
            if beta2 > 0:
                before_sq = (state["exp_avg_sq"] - (1 - beta2) * low * low) / beta2
                squared = basis * basis
                seeds[1, mine] = proj.back_at(before_sq.clamp_(min=0), squared, rows, cols)
            self._sum_over_shards(seeds[:2], proj)
        moments = ("residual_avg", "residual_avg_sq", "residual_step")
        for row, key in enumerate(moments):  # kept entries, in order, take their own values
            seeds[row, kept] = state[key][keeps]
            state[key].copy_(seeds[row])
        index.copy_(chosen)

    def _gather_candidates(self, proj: Projection, residual, state: dict, first: bool) -> None:
        """Add this step's residual magnitude to the candidates' and let the step's largest
        misses in (with this step's magnitude), keeping the largest total masses."""
        index, mass = state["candidate_index"], state["candidate_mass"]
        size = index.numel()
        magnitude = residual.abs()
        top = magnitude.flatten().topk(min(size, magnitude.numel()))
        new, new_mass = _global_index(top.indices, proj.spec, magnitude.shape), top.values
        gain = torch.zeros(size, device=mass.device)
        if not first:
            mine, rows, cols = _local_entries(index, proj.spec)
            gain[mine] = magnitude[rows, cols]
        if proj.spec.sharded:
            group = self._groups[proj.spec.group]
            dist.all_reduce(gain, group=group)
            new, new_mass = _all_gather(new, group), _all_gather(new_mass, group)
        if first:
            pool, pool_mass = new, new_mass
        else:
            fresh = ~torch.isin(new, index)
            pool = torch.cat([index, new[fresh]])
            pool_mass = torch.cat([mass + gain, new_mass[fresh]])
        kept = pool_mass.topk(size).indices
        index.copy_(pool[kept])
        mass.copy_(pool_mass[kept])

    def _sum_over_shards(self, values: torch.Tensor, proj: Projection) -> None:
        """Values per global entry, each filled by the shard that holds it (zeros elsewhere): the
        sum over the shard group gives every rank all of them."""
        if proj.spec.sharded:
            dist.all_reduce(values, group=self._groups[proj.spec.group])


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


def _global_index(flat: torch.Tensor, spec: ShardSpec, local: tuple[int, int]) -> torch.Tensor:
    """Flat indices into this rank's shard (of shape `local`) as flat indices into the whole."""
    row, col = flat // local[1], flat % local[1]
    if spec.sharded:
        if spec.dim == 0:
            row = row + spec.index * local[0]
        else:
            col = col + spec.index * local[1]
    return row * spec.global_shape[1] + col


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts)
