"""Training regimes: which subnetwork of the model each step trains (docs/regimes.md).

A regime gives, for optimizer step `step`, the `Subnet` of every block it does not run whole
(`subnets(step)`, by global layer index); the trainer puts them into the step's plan, the blocks
run only those heads and neurons, and what they leave out keeps its values and optimizer state
(optim/inactive.py). A regime selects over the whole model (global heads and neurons), the same
on every rank, and hands each tensor-parallel shard its part (`models.subnet.shard_subnet`):
the same global selection at any tp. Its state is a part of every checkpoint (`state_dict`).
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from skipjack.config import TrainJobConfig
from skipjack.models.subnet import Subnet
from skipjack.optim.est import EST
from skipjack.optim.sat import SAT
from skipjack.parallel.dims import ParallelDims


class Regime(Protocol):
    def subnets(self, step: int) -> dict[int, Subnet]:
        """The subnet of every block step `step` does not run whole, by global layer index."""
        ...

    def after_step(self) -> None:
        """The step's forward and backward are done (collective: every rank calls it, before
        the step's checkpoints are saved)."""
        ...

    def rates(self, step: int) -> dict[str, float]:
        """What the regime keeps at step `step` (for the log): fractions of layers, heads,
        neurons."""
        ...

    def describe(self) -> str:
        """One line for the log: the regime and its schedule."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_regime(
    job: TrainJobConfig, dims: ParallelDims, blocks: dict[int, nn.Module]
) -> Regime | None:
    """The job's regime for this rank's tensor-parallel shard; `blocks`: this rank's blocks by
    global layer index (SAT measures their importance). None for `regime=none`."""
    r, t = job.regime, job.train
    if r.name == "est":
        return EST(r.est, job.model, t.steps, t.seed, dims.tp_rank, dims.tp)
    if r.name == "sat":
        group = dims.group("checkpoint")  # every rank, gloo: the importance tables are on CPU
        return SAT(r.sat, job.model, t.steps, t.seed, dims.tp_rank, dims.tp, blocks, group)
    return None
