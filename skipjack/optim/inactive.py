"""Leaving alone what a step did not train: the slices of a weight a subnet left out.

A block running a subnet computes only its active heads and neurons, so the rows and columns of
its weights that belong to the others get zero gradients, and an optimizer would still move them
(weight decay, and Adam's update from its decaying moments). Around the optimizer's step,
`slices_left_alone` puts those slices back as they were, in the weights and in every optimizer
state shaped like the weight (Adam's moments): no update, no weight decay, no moment decay.
(Parameters without any gradient are left alone by the optimizers themselves.) Per-parameter
step counters still advance; low-rank states (GaLore's projected moments) mix rows and are not
restored.
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
        state = optimizer.state.get(p, {})
        shaped = {k: v.index_select(dim, index) for k, v in state.items() if _like(v, p)}
        saved.append((p, dim, index, p.detach().index_select(dim, index), shaped))
    yield
    with torch.no_grad():
        for p, dim, index, values, shaped in saved:
            p.index_copy_(dim, index, values)
            for key, value in optimizer.state.get(p, {}).items():
                if key in shaped:
                    value.index_copy_(dim, index, shaped[key])
                elif _like(value, p):  # created by this step: as before any step, zeros
                    value.index_fill_(dim, index, 0)


def _like(value, p: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == p.shape
