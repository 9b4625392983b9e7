"""Leaving alone what a step did not train: the slices of a weight a subnet left out.

A block running a subnet computes only its active heads and neurons, so the rows and columns of
its weights that belong to the others get zero gradients, and an optimizer would still move them
(weight decay, and Adam's update from its decaying moments). Around the optimizer's step,
`slices_left_alone` puts those slices back as they were, in the weights and in every optimizer
state that runs along the sliced dimension: no update, no weight decay, no moment decay. A state
shaped like the weight does (Adam's moments); an optimizer with `state_dim(p, key, dim)` says
which dimension of its state `key` runs along dimension `dim` of `p`, or None (GaLore: its
low-rank moments keep the dimension it does not project and mix the other). (Parameters without
any gradient are left alone by the optimizers themselves.) Per-parameter step counters still
advance, and state that mixes the sliced dimension (GaLore's moments of a weight sliced along
its projected side, and its basis) moves with the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

Slice = tuple[torch.nn.Parameter, int, torch.Tensor]  # (parameter, dim, indices along it)


@contextlib.contextmanager
def slices_left_alone(optimizer: torch.optim.Optimizer, slices: list[Slice]) -> Iterator[None]:
    saved = []
    for p, dim, index in slices:
        along = {}
        for key, value in optimizer.state.get(p, {}).items():
            d = _state_dim(optimizer, p, key, value, dim)
            if d is not None:
                along[key] = value.index_select(d, index)
        saved.append((p, dim, index, p.detach().index_select(dim, index), along))
    yield
    with torch.no_grad():
        for p, dim, index, values, along in saved:
            p.index_copy_(dim, index, values)
            for key, value in optimizer.state.get(p, {}).items():
                d = _state_dim(optimizer, p, key, value, dim)
                if d is None:
                    continue
                if key in along:
                    value.index_copy_(d, index, along[key])
                else:  # created by this step: as before any step, zeros
                    value.index_fill_(d, index, 0)


def _state_dim(optimizer, p: torch.Tensor, key: str, value, dim: int) -> int | None:
    """The dimension of state `value` that runs along dimension `dim` of `p`, if one does."""
    if not torch.is_tensor(value) or value.dim() != p.dim():
        return None
    if hasattr(optimizer, "state_dim"):
        return optimizer.state_dim(p, key, dim)
    return dim if value.shape == p.shape else None
