"""Shard specs: how each parameter's local tensor lies inside the global one.

Every parameter carries a `ShardSpec`: replicated, or split evenly along `dim` over a named
process group, with the global shape (the padded vocabulary included) and, for attention weights,
the head layout. Checkpoints use it to write global offsets, gradient clipping to count every
element once, GaLore+ to project per head on the rank's own heads.

A shard may be held by several ranks of its group (`replicas` > 1): with more tensor-parallel
ranks than key-value heads, each kv head lives on tp / n_kv_heads neighbouring ranks, as in
Megatron. Rank r of the group then holds shard r // replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads along `dim` of the global weight: `n_heads` blocks of `head_dim` rows."""

    dim: int
    n_heads: int
    head_dim: int


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    dim: int | None = None  # None: replicated
    group: str = "tp"
    num_shards: int = 1
    index: int = 0
    heads: HeadLayout | None = None
    # the gradient of each rank covers only its part of the data (sequence-parallel norms):
    # it is summed over `group` before use
    partial_grad: bool = False
    # ranks of `group` holding the same shard (num_shards x replicas = the group's size); each
    # one's gradient covers only its share of the data flow and they are summed over the replicas
    replicas: int = 1
    # the shape without padding (a vocabulary rounded up to the shard count); None: global_shape
    true_shape: tuple[int, ...] | None = None

    def replica_part(self, group_rank: int) -> tuple[int, int]:
        """(start, size) along `dim` of the equal part of its shard that rank `group_rank` of the
        group writes and reads in a checkpoint when several ranks hold the shard."""
        size = self.local_shape[self.dim] // self.replicas
        return group_rank % self.replicas * size, size

    @property
    def unpadded_shape(self) -> tuple[int, ...]:
        """The global shape of the real values, what a checkpoint holds."""
        return self.true_shape or self.global_shape

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.num_shards > 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        if not self.sharded:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.dim] //= self.num_shards
        return tuple(shape)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Global offset of the local shard along every dimension."""
        offsets = [0] * len(self.global_shape)
        if self.sharded:
            offsets[self.dim] = self.index * self.local_shape[self.dim]
        return tuple(offsets)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the global tensor `full`. `full` may stop short of the global
        shape along dim 0 (a vocabulary before its padding): the missing rows are zeros."""
        short = self.global_shape[0] - full.shape[0]
        if short > 0 and tuple(full.shape[1:]) == self.global_shape[1:]:
            full = torch.nn.functional.pad(full, (0, 0) * (full.dim() - 1) + (0, short))
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"tensor of shape {tuple(full.shape)} is not {self.global_shape}")
        if not self.sharded:
            return full
        size = self.local_shape[self.dim]
        return full.narrow(self.dim, self.index * size, size)


def replicated(shape: tuple[int, ...], partial_grad: bool = False, group: str = "tp") -> ShardSpec:
    return ShardSpec(tuple(shape), None, group, partial_grad=partial_grad)


def spec_of(param: torch.Tensor) -> ShardSpec:
    """The parameter's spec (a parameter without one is replicated)."""
    return getattr(param, "shard_spec", None) or replicated(tuple(param.shape))


def set_spec(param: torch.nn.Parameter, spec: ShardSpec) -> torch.nn.Parameter:
    if tuple(param.shape) != spec.local_shape:
        raise ValueError(f"parameter of shape {tuple(param.shape)} does not match {spec}")
    param.shard_spec = spec
    return param


def gather(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The global tensor from every rank's shard (every rank of the group, in rank order)."""
    return torch.cat(shards[:: spec.replicas], dim=spec.dim) if spec.sharded else shards[0]


def all_gather_full(
    local: torch.Tensor, spec: ShardSpec, groups: dict[str, dist.ProcessGroup]
) -> torch.Tensor:
    """The global tensor, assembled on every rank of the spec's group (collective)."""
    if not spec.sharded:
        return local
    shards = [torch.empty_like(local) for _ in range(spec.num_shards * spec.replicas)]
    dist.all_gather(shards, local.contiguous(), group=groups[spec.group])
    return gather(shards, spec)


def sync_partial_grads(params, groups: dict[str, dist.ProcessGroup]) -> None:
    """Sum the gradients that each rank holds only a part of (see ShardSpec.partial_grad and
    ShardSpec.replicas)."""
    for p in params:
        spec = spec_of(p)
        if spec.partial_grad and p.grad is not None and dist.get_world_size(groups[spec.group]) > 1:
            dist.all_reduce(p.grad, group=groups[spec.group])
        if spec.replicas > 1 and p.grad is not None:
            sum_over_replicas(p.grad, spec, groups[spec.group])


def sum_over_replicas(local: torch.Tensor, spec: ShardSpec, group: dist.ProcessGroup) -> None:
    """Replace `local` on every rank by the sum over the ranks holding the same shard.

    Each rank places its shard in a zero tensor of the global shape and the group all-reduces
    it: no process group per shard is needed, and the buffer is small (replicated shards are kv
    heads, fewer than the tp ranks, so it is no larger than one rank's query weight)."""
    full = local.new_zeros(spec.global_shape)
    offset, size = spec.offsets[spec.dim], spec.local_shape[spec.dim]
    full.narrow(spec.dim, offset, size).copy_(local)
    dist.all_reduce(full, group=group)
    local.copy_(full.narrow(spec.dim, offset, size))


def global_grad_norm(params, groups: dict[str, dist.ProcessGroup]) -> torch.Tensor:
    """L2 norm of the whole model's gradient, every global element counted once.

    Sharded gradients contribute their squares summed over their group; replicated ones are
    identical on every rank of it and contribute once. Pipeline stages hold disjoint parameters
    and are summed, except those sharded over the `vocab` group, which spans the stages already.
    """
    by_group: dict[str, torch.Tensor] = {}
    total = None
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        spec = spec_of(p)
        if spec.sharded:
            by_group[spec.group] = by_group.get(spec.group, 0) + sq / spec.replicas
        else:
            total = sq if total is None else total + sq
    total = torch.zeros(()) if total is None else total
    across_stages = by_group.pop("vocab", None)
    for name, sq in by_group.items():
        dist.all_reduce(sq, group=groups[name])
        total = total.to(sq.device) + sq
    if "pp" in groups and dist.get_world_size(groups["pp"]) > 1:
        dist.all_reduce(total, group=groups["pp"])
    if across_stages is not None:
        dist.all_reduce(across_stages, group=groups["vocab"])
        total = total.to(across_stages.device) + across_stages
    return total.sqrt()


def clip_grad_norm(params, max_norm: float, groups: dict[str, dist.ProcessGroup]) -> float:
    """Scale gradients so the global norm is at most `max_norm`; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    if math.isfinite(max_norm) and params:  # a stage no route visited has none
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in params], scale.to(params[0].grad.device))
    return float(norm)
