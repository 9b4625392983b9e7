"""What a checkpoint holds, tier-neutral: a `dict[str, Stateful]` of named parts.

The trainer hands every tier the same parts: `model`, `optim` and `lr_schedule` from the engine
(`Engine.state()`), `loader`, `trainer` (step, tokens) and `rng`, later a regime's. Each part has
`state_dict()` and `load_state_dict()` (torch's `Stateful`). A tier stores `state_dict()` and, on
restore, fills the tensors of a fresh `state_dict()` in place and hands the result to
`load_state_dict()`: so the model's and the optimizer's tensors are views of this rank's live
shards, each with its global shape (DTensors over its shard spec's mesh: checkpoint.sharded), and
restoring into another layout reads exactly the rows this rank holds.

`model` maps every parameter's global name (`layers.3.attention.wq.weight`, the same in every
layout) to its tensor; `optim` maps `<name>/<key>` to that parameter's optimizer state. No part
imports the model: shapes come from the parameters' shard specs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from skipjack.checkpoint.sharded import as_global
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.shard_spec import ShardSpec, spec_of, sum_over_replicas

State = dict[str, Stateful]


def parameters(modules: Iterable[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of every module this rank trains (stage chunks, vocab shards)."""
    return [(name, p) for module in modules for name, p in module.named_parameters()]


def expected_shapes(modules: Iterable[torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """The global shape a checkpoint holds of every parameter this rank trains."""
    return {name: spec_of(p).unpadded_shape for name, p in parameters(modules)}


class ModelState:
    """This rank's parameters as global tensors (views, no copy)."""

    def __init__(self, modules: Iterable[torch.nn.Module], dims: ParallelDims):
        self.modules, self.dims = list(modules), dims

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: as_global(p.detach(), spec_of(p), self.dims) for name, p in self.params}

    def load_state_dict(self, state: dict) -> None:
        """The tensors were filled in place; replicas of a shard each read only their part."""
        join_replicas(self.modules, self.dims)

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return parameters(self.modules)


class OptimizerState:
    """This rank's optimizer state per parameter, sharded like it where it runs along the
    parameter's split dimension (the optimizer's `state_shard_dim` says where, for GaLore)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        modules: Iterable[torch.nn.Module],
        dims: ParallelDims,
    ):
        self.optimizer, self.modules, self.dims = optimizer, list(modules), dims

    def state_dict(self) -> dict[str, torch.Tensor]:
        materialise(self.optimizer, [p for _, p in parameters(self.modules)])
        state = {}
        for name, p in parameters(self.modules):
            for key, value in self.optimizer.state.get(p, {}).items():
                dim = self._shard_dim(p, key, value) if torch.is_tensor(value) else None
                if dim is not None:
                    value = as_global(value, _state_spec(spec_of(p), value, dim), self.dims)
                state[f"{name}/{key}"] = value
        for i, group in enumerate(self.optimizer.param_groups):
            if "step" in group:  # counted per group, not per parameter (apex's FusedAdam)
                state[f"param_groups/{i}/step"] = torch.tensor(float(group["step"]))
        return state

    def load_state_dict(self, state: dict) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if f"param_groups/{i}/step" in state:
                step = state[f"param_groups/{i}/step"]
                if torch.is_tensor(group["step"]):
                    group["step"].fill_(float(step))
                else:
                    group["step"] = int(step)
        join_replicas(self.modules, self.dims, self.optimizer)

    def _shard_dim(self, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> int | None:
        """The dimension of `value` split like `p` over its shard group (None: the same on every
        rank of it): the optimizer's word (GaLore's bases and moments), else a tensor shaped like
        the parameter is split like it."""
        if hasattr(self.optimizer, "state_shard_dim"):
            return self.optimizer.state_shard_dim(p, key)
        spec = spec_of(p)
        return spec.dim if spec.sharded and value.shape == p.shape else None


def _state_spec(spec: ShardSpec, value: torch.Tensor, dim: int) -> ShardSpec:
    """The spec of optimizer state `value` whose dimension `dim` runs along the parameter's
    split dimension: its global size there is the parameter's true one (padding dropped)."""
    padded, shape = list(value.shape), list(value.shape)
    padded[dim] *= spec.num_shards
    # along the parameter's own rows: their true number; else (GaLore+'s per-head moments) no
    # padding
    like_param = value.shape[dim] == spec.local_shape[spec.dim]
    shape[dim] = spec.unpadded_shape[spec.dim] if like_param else padded[dim]
    return ShardSpec(
        tuple(padded), dim, spec.group, spec.num_shards, spec.index,
        replicas=spec.replicas, true_shape=tuple(shape),
    )  # fmt: skip


def materialise(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Give every parameter its optimizer state (a step with zero gradients and zero learning
    rate, which changes no weight), so that a restore has tensors to fill in place."""
    if all(p in optimizer.state for p in params):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def join_replicas(
    modules: Iterable[torch.nn.Module],
    dims: ParallelDims,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """After a restore, give every replica of a shard the whole shard: each read only its part
    (see `sharded.as_global`) of the parameter and, with `optimizer`, of its state shaped like
    it."""
    for _, p in parameters(modules):
        spec = spec_of(p)
        if not (spec.sharded and spec.replicas > 1):
            continue
        if optimizer is None:
            tensors = [p.data]
        else:
            state = optimizer.state.get(p, {})
            tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]
        group = dims.group(spec.group)
        start, size = spec.replica_part(dist.get_rank(group))
        for tensor in tensors:
            mine = tensor.narrow(spec.dim, start, size).clone()
            tensor.zero_()
            tensor.narrow(spec.dim, start, size).copy_(mine)
            sum_over_replicas(tensor, spec, group)


class ScheduleState:
    """The LR schedule; a restore also sets the optimizer's current learning rates, which the
    schedule's state alone would reach only at its next step."""

    def __init__(self, schedule, optimizer: torch.optim.Optimizer):
        self.schedule, self.optimizer = schedule, optimizer

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
        groups = self.optimizer.param_groups
        for group, lr in zip(groups, self.schedule.get_last_lr(), strict=True):
            group["lr"] = lr


class Progress:
    """The trainer's counters: optimizer steps done, tokens trained on, training FLOPs run, and
    what those steps would have run with every block whole (a regime's savings)."""

    def __init__(
        self, step: int = 0, tokens: int = 0, flops: float = 0.0, dense_flops: float = 0.0
    ):
        self.step, self.tokens, self.flops, self.dense_flops = step, tokens, flops, dense_flops

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                "dense_flops": self.dense_flops}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.flops, self.dense_flops = float(state["flops"]), float(state["dense_flops"])


class RNGState:
    """This process's CPU random generator (dropout-free models draw nothing else)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
