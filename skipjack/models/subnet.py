"""Subnetworks of a block: which of its attention heads and MLP neurons a step runs.

A training regime (EST, SAT) picks, per step and block, a `Subnet` of this rank's shards; the
block then runs smaller dense matmuls on the active slices of its weights (rows of the query,
key, value, gate and up projections, columns of the output and down projections), never a mask
over the full matmuls. What is left out gets no gradient from the step. A skipped block is the
identity on the residual stream and costs nothing forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skipjack.config.model import ModelConfig


@dataclass(frozen=True)
class Subnet:
    """Local indices, into this rank's shard of the block (sorted, unique); None: all of them."""

    heads: torch.Tensor | None = None  # active query heads; the kv heads they use run with them
    neurons: torch.Tensor | None = None  # active MLP neurons: gate and up rows, down columns
    skip: bool = False  # the block is the identity
    head_scale: float = 1.0  # on the attention output (EST's 1 / p_H for sampled heads)
    neuron_scale: float = 1.0  # on the MLP output (EST's 1 / p_M)


def kv_heads_used(heads: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The local kv heads (sorted) that the local query heads `heads` attend with, among
    `n_kv_heads` shared by `n_heads` query heads in equal groups."""
    return torch.unique(heads // (n_heads // n_kv_heads))


def complement(active: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in range(n) that `active` leaves out."""
    keep = torch.ones(n, dtype=torch.bool, device=active.device)
    keep[active] = False
    return keep.nonzero().flatten()


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (or columns) of a head-major weight that heads `heads` own."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def shard_subnet(
    heads: torch.Tensor | None,
    neurons: torch.Tensor | None,
    model: ModelConfig,
    tp_rank: int,
    tp: int,
    head_scale: float = 1.0,
    neuron_scale: float = 1.0,
) -> Subnet:
    """This tensor-parallel shard's part of a block's global selection (sorted global head and
    neuron indices; None: all): the local indices of the selected heads and neurons it holds,
    which may be none (its matmuls then have no rows; the collectives still run)."""
    return Subnet(
        heads=None if heads is None else _local(heads, model.n_heads // tp, tp_rank),
        neurons=None if neurons is None else _local(neurons, model.ffn_dim // tp, tp_rank),
        head_scale=head_scale,
        neuron_scale=neuron_scale,
    )


def _local(selected: torch.Tensor, per_shard: int, shard: int) -> torch.Tensor:
    first = shard * per_shard
    mine = (selected >= first) & (selected < first + per_shard)
    return selected[mine] - first
