"""Tensor parallelism (Megatron-style): the explicit collectives of the TP regions, the
vocabulary-parallel embedding and the vocabulary-parallel cross-entropy.

The model stays plain: a column-parallel linear is an `nn.Linear` holding rows of the global
weight, a row-parallel one holds columns. What makes them parallel is where a block enters and
leaves the tensor-parallel region:

- `enter_tp(x)` before column-parallel layers: identity forward / all-reduce backward
  (megatron-core's `copy_to_tensor_model_parallel_region`), or with sequence parallelism an
  all-gather of the sequence shards (backward: reduce-scatter);
- `leave_tp(y)` after row-parallel layers: all-reduce (megatron-core's
  `reduce_from_tensor_model_parallel_region`), or with sequence parallelism a reduce-scatter to
  sequence shards (backward: all-gather).

Activations are (batch, sequence, hidden); sequence shards split dim 1. megatron-core's own
sequence-parallel mappings split dim 0 and allocate on `torch.cuda.current_device()`, so they
cannot run on CPU; the sequence-dim all-gather and reduce-scatter below are device-agnostic
equivalents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skipjack.batch import IGNORE_INDEX
from skipjack.megatron_core import megatron_module
from skipjack.parallel.shard_spec import ShardSpec, set_spec

SEQ_DIM = 1


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (`group=None`: no tensor parallelism)."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    def shard_spec(
        self,
        global_shape: tuple[int, ...],
        dim: int,
        heads=None,
        num_shards: int | None = None,
        true_shape: tuple[int, ...] | None = None,
    ) -> ShardSpec:
        """`global_shape` (padded; `true_shape` without the padding) split along `dim` into
        `num_shards` (default: tp) shards; with fewer shards than ranks, neighbouring ranks hold
        the same shard (ShardSpec.replicas)."""
        shards = num_shards or self.size
        replicas = self.size // shards
        return ShardSpec(
            tuple(global_shape), dim, "tp", shards, self.rank // replicas, heads,
            replicas=replicas, true_shape=true_shape,
        )  # fmt: skip


def _all_gather_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    parts = [c.contiguous() for c in x.chunk(tp.size, dim=SEQ_DIM)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=tp.group)
    return out


class _SequenceCollective(torch.autograd.Function):
    """`forward_op` on the activation, `backward_op` (its adjoint) on the gradient."""

    @staticmethod
    def forward(ctx, x, tp, forward_op, backward_op):
        ctx.tp, ctx.backward_op = tp, backward_op
        return forward_op(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.tp), None, None, None


def _mappings():
    return megatron_module("tensor_parallel.mappings")  # imported at the first TP region


def enter_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if tp.size == 1:
        return x
    if tp.sequence_parallel:
        return _SequenceCollective.apply(x, tp, _all_gather_seq, _reduce_scatter_seq)
    return _mappings().copy_to_tensor_model_parallel_region(x, group=tp.group)


def leave_tp(y: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if tp.size == 1:
        return y
    if tp.sequence_parallel:
        return _SequenceCollective.apply(y, tp, _reduce_scatter_seq, _all_gather_seq)
    return _mappings().reduce_from_tensor_model_parallel_region(y, group=tp.group)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of tp (Megatron's make_vocab_size_divisible_by=1)."""
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp: each rank looks up the tokens of its vocabulary range."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        padded = padded_vocab_size(vocab_size, tp.size)
        self.local_vocab = padded // tp.size
        self.start = tp.rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, dim))
        set_spec(self.weight, tp.shard_spec((padded, dim), 0, true_shape=(vocab_size, dim)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return leave_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over logits split along the vocabulary, never gathering them.

    Three all-reduces of per-token scalars: the max (for stability), the sum of exponentials and
    the target logit (held by exactly one rank). Columns past `vocab_size` (padding) are masked.
    """

    @staticmethod
    def forward(ctx, logits, target, tp, vocab_size):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        start = tp.rank * local_vocab
        valid_cols = vocab_size - start
        if valid_cols < local_vocab:
            logits = logits.clone()
            logits[..., max(valid_cols, 0) :] = float("-inf")
        group = tp.group if tp.size > 1 else None
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - logits_max.unsqueeze(-1)).exp()
        sum_exp = exp.sum(dim=-1)
        ignored = target == IGNORE_INDEX
        local_target = target - start
        mine = (local_target >= 0) & (local_target < local_vocab) & ~ignored
        idx = local_target.clamp(0, local_vocab - 1).unsqueeze(-1)
        target_logit = torch.where(
            mine, logits.gather(-1, idx).squeeze(-1) - logits_max, torch.zeros_like(logits_max)
        )
        if group is not None:
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target_logit, group=group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, idx, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, idx, mine, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, idx, -mine.unsqueeze(-1).to(grad.dtype))
        grad = grad * grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tp: TensorParallel, vocab_size: int
) -> torch.Tensor:
    """Per-token cross-entropy (0 where target is IGNORE_INDEX) from this rank's vocabulary
    shard of the logits; the loss is whole on every rank."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp, vocab_size)
