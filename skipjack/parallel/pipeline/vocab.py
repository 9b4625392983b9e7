"""Vocabulary parallelism (Yeung et al., "Balancing Pipeline Parallelism with Vocabulary
Parallelism", MLSys 2025).

The input embedding and the output layer with its softmax cross-entropy are split along the
vocabulary over the `vocab` group: all pipeline x tensor ranks of a replica, so every pipeline
rank holds an equal share (`models.llama.VocabShards`) and the first and last stages hold
transformer layers only. Five passes per microbatch run on every rank of the group:

- E: look up the tokens of this rank's rows; the partial embeddings are summed over the group
  asynchronously (the first stage waits for the sum when its forward needs it).
- S: receive the last stage's final hidden state X (a broadcast), compute this rank's logits and
  their softmax statistics (max, sum of exponentials, target logit), start gathering those.
- R: combine the statistics online-softmax style (the max of the maxima, the sums rescaled to
  it): the loss, and this rank's piece of the gradient of X, summed asynchronously for the last
  stage, whose backward waits for it.
- T: the output weight gradient of this rank's rows (no communication, off the critical path).
- G: the first stage broadcasts the gradient of its input; each rank accumulates its rows'.

The output layer comes in the paper's two algorithms. `alg1` (two barriers): R combines the
statistics, then computes the softmax, the logit gradient and the input-gradient piece (a matmul
after the barrier) before the pieces are summed. `alg2` (one barrier, the default): S computes the
input-gradient piece from the *local* softmax while the statistics are being gathered, and R only
rescales it per token by the shard's share of the global softmax mass, so no matmul waits for a
collective. Collectives use the dedicated `vocab` group and are asynchronous; only the rank that
needs a result waits for it.

`insert_vocab_passes` places the passes into any schedule (GPipe, 1F1B, interleaved) so that every
rank runs the collectives in one order and no rank waits for another that waits for it; the
simulator checks the result.
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX
from skipjack.parallel.pipeline.schedule import Action, Schedule
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.parallel.tensor import SEQ_DIM, TensorParallel

ALGORITHMS = ("alg1", "alg2")


EMBED_LOOKAHEAD = 2  # E(mb) is issued this many actions before the first stage needs it


def insert_vocab_passes(schedule: Schedule, cost: CostModel) -> Schedule:
    """`schedule` with the vocabulary passes of every microbatch on every rank.

    Build `schedule` with extra warm-up forwards (one per barrier of the algorithm, as in the
    paper): they give the other ranks time to run S and R between the last stage's forward of a
    microbatch and its backward, which needs R from all of them. The collective passes are placed
    greedily on the simulated timeline: each (the one whose inputs are ready first) goes on every
    rank right before the first action that starts after that time, never before a collective
    placed earlier, so every rank runs them in one order. E(mb) is ready EMBED_LOOKAHEAD actions
    before the first stage's forward of mb, S(mb) when the last stage's forward of mb is done,
    R(mb) when every S(mb) is, G(mb) when the first stage's backward of mb is done. Passes ready
    within one forward's time of each other are placed from one simulation. T(mb) then goes after
    the forward or backward that follows R(mb), off the critical path. The simulator checks the
    result for deadlocks.
    """
    first, last = 0, schedule.num_stages - 1
    for mb, route in enumerate(schedule.routes):
        if route[0] != first or route[-1] != last:
            raise ValueError(
                f"vocabulary parallelism needs every route to start at stage 0 and end at the "
                f"last stage; microbatch {mb} visits {route}"
            )
    first_rank, first_chunk = schedule.owner(first)
    last_rank, last_chunk = schedule.owner(last)
    actions = [list(a) for a in schedule.actions]
    placed_until = [0] * schedule.pp  # index after the last collective, per rank
    todo = {(kind, mb) for mb in range(schedule.microbatches) for kind in ("E", "S", "R", "G")}
    window = min(cost.forward)

    def build(vocab_passes: bool) -> Schedule:
        return Schedule(
            schedule.name,
            schedule.pp,
            schedule.microbatches,
            actions,
            schedule.vpp,
            schedule.routes,
            vocab_passes,
        )

    while todo:
        sim = simulate(build(False), cost, partial=True)
        times = {}
        for kind, mb in todo:
            if kind == "E":
                i = actions[first_rank].index(Action("F", mb, first_chunk)) - EMBED_LOOKAHEAD
                times[(kind, mb)] = sim.starts[first_rank][i] if i > 0 else 0.0
            else:
                needs = {"S": (mb, "F", last), "R": (mb, "S", -1), "G": (mb, "B", first)}
                times[(kind, mb)] = sim.finish.get(needs[kind])
        batch = sorted(
            (t for t in todo if times[t] is not None),
            key=lambda t: (times[t], t[1], "ESRG".index(t[0])),
        )
        batch = [t for t in batch if times[t] <= times[batch[0]] + window]
        inserted = [0] * schedule.pp
        for kind, mb in batch:
            todo.remove((kind, mb))
            for rank in range(schedule.pp):
                pos = bisect.bisect_left(sim.starts[rank], times[(kind, mb)]) + inserted[rank]
                pos = max(pos, placed_until[rank])
                if kind == "E" and rank == first_rank:  # before the forward that needs it
                    pos = min(pos, actions[rank].index(Action("F", mb, first_chunk)))
                if kind == "R" and rank == last_rank:  # before the backward that needs it
                    pos = min(pos, actions[rank].index(Action("B", mb, last_chunk)))
                if pos < placed_until[rank]:
                    raise ValueError(
                        f"{schedule.name}: cannot place {kind}{mb} on rank {rank}; "
                        "build the schedule with more warm-up forwards"
                    )
                actions[rank].insert(pos, Action(kind, mb))
                placed_until[rank] = pos + 1
                inserted[rank] += 1
    for rank_actions in actions:
        for mb in range(schedule.microbatches):
            pos = rank_actions.index(Action("R", mb)) + 1
            while pos < len(rank_actions) and rank_actions[pos].kind not in ("F", "B"):
                pos += 1
            rank_actions.insert(min(pos + 1, len(rank_actions)), Action("T", mb))
    result = build(True)
    simulate(result, cost)  # raises Deadlock if the placement is wrong
    return result


class VocabParallel:
    """Runs the vocabulary passes of one rank (see the module docstring).

    `shards` is this rank's `models.llama.VocabShards`; `group` the vocab group (the pp x tp ranks
    of the replica, rank pp_rank x tp + tp_rank in it); `tp` the tensor-parallel layout of the
    stages, whose first and last stage hold hidden states whole or, under sequence parallelism,
    as sequence shards. `hidden_shape` is (micro batch, sequence, dim), whole. `first_rank` and
    `last_rank` are the pipeline ranks holding the first and the last stage.
    """

    def __init__(
        self,
        shards,
        group: dist.ProcessGroup,
        tp: TensorParallel,
        pp_rank: int,
        first_rank: int,
        last_rank: int,
        hidden_shape: tuple[int, int, int],
        algorithm: str = "alg2",
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown vocabulary-parallel algorithm {algorithm!r}")
        self.shards = shards
        self.group = group
        self.size = dist.get_world_size(group)
        self.tp = tp
        self.first_stage, self.last_stage = pp_rank == first_rank, pp_rank == last_rank
        # the stage's tensor-parallel rank 0 sends what the whole stage holds
        self._first_src = dist.get_global_rank(group, first_rank * tp.size)
        self._last_src = dist.get_global_rank(group, last_rank * tp.size)
        self.hidden_shape = hidden_shape
        self.algorithm = algorithm
        self.vocab_size = shards.cfg.vocab_size
        self.hidden: dict[int, torch.Tensor] = {}  # mb -> last stage's output (set by runtime)
        self.input_grads: dict[int, torch.Tensor] = {}  # mb -> first stage's d(embeddings)
        self._embedded: dict[int, tuple[torch.Tensor, dist.Work]] = {}
        self._partials: dict[int, torch.Tensor] = {}
        self._stats: dict[int, tuple] = {}  # S -> R
        self._saved: dict[int, tuple] = {}  # R -> T
        self._output_grads: dict[int, tuple[torch.Tensor, dist.Work]] = {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    @property
    def _sequence_sharded(self) -> bool:
        return self.tp.sequence_parallel and self.tp.size > 1

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole hidden-state tensor, as its stage holds it."""
        if not self._sequence_sharded:
            return full
        return full.chunk(self.tp.size, dim=SEQ_DIM)[self.tp.rank].contiguous()

    def _from_stage(self, piece: torch.Tensor | None, src: int, device) -> torch.Tensor:
        """The whole hidden-state tensor that one stage holds, on every rank of the group: the
        stage's ranks first gather their sequence shards (under sequence parallelism), then its
        tensor-parallel rank 0 broadcasts it. The others wait only for that rank."""
        if piece is None:
            full = torch.empty(self.hidden_shape, device=device)
        elif self._sequence_sharded:
            parts = [torch.empty_like(piece) for _ in range(self.tp.size)]
            dist.all_gather(parts, piece.contiguous(), group=self.tp.group)
            full = torch.cat(parts, dim=SEQ_DIM)
        else:
            full = piece.detach().float().contiguous()
        dist.broadcast(full, src=src, group=self.group)
        return full

    def _target(self, labels: torch.Tensor):
        """(index of the target among this rank's rows, whether this rank holds it, ignored)."""
        ignored = labels == IGNORE_INDEX
        local = labels - self.shards.start
        mine = (local >= 0) & (local < self.shards.rows) & ~ignored
        return local.clamp(0, self.shards.rows - 1), mine, ignored

    # -- E and G: input embedding ---------------------------------------------------------

    def embed(self, mb: int, tokens: torch.Tensor) -> None:
        """E: this rank's partial embeddings of microbatch `mb`, summed over the group
        asynchronously (the first stage waits for the sum when its forward needs it)."""
        weight = self.shards.tok_embeddings.weight
        local = tokens.to(weight.device) - self.shards.start
        outside = (local < 0) | (local >= self.shards.rows)
        partial = F.embedding(local.masked_fill(outside, 0), weight)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        if torch.is_grad_enabled():
            self._partials[mb] = partial
        total = partial.detach().float().clone()
        work = dist.all_reduce(total, group=self.group, async_op=True)
        if self.first_stage:
            self._embedded[mb] = (total, work)
        else:
            self._pending.append((work, total))

    def embedding(self, mb: int) -> torch.Tensor:
        """The first stage's input for microbatch `mb` (after E)."""
        total, work = self._embedded.pop(mb)
        work.wait()
        return self._mine(total)

    def embedding_grad(self, mb: int) -> None:
        """G: accumulate this rank's embedding-row gradients of microbatch `mb`."""
        partial = self._partials.pop(mb)
        grad = self.input_grads.pop(mb) if self.first_stage else None
        partial.backward(self._from_stage(grad, self._first_src, partial.device))

    # -- S, R and T: output layer and cross-entropy ---------------------------------------

    def output(self, mb: int, labels: torch.Tensor) -> None:
        """S: receive the last stage's output, compute this rank's logits and their softmax
        statistics (and for alg2 the input-gradient pieces), start gathering the statistics.
        One logits-sized buffer is kept per microbatch until T, overwritten in place."""
        weight = self.shards.output_weight().detach()
        hidden = self.hidden.pop(mb) if self.last_stage else None
        x = self._from_stage(hidden, self._last_src, weight.device)
        logits = (x @ weight.t().to(x.dtype)).float()
        valid = self.vocab_size - self.shards.start  # columns past the vocabulary are padding
        if valid < self.shards.rows:
            logits[..., max(valid, 0) :] = float("-inf")
        # an all-padding shard has max -inf: clamp so that exp(-inf - max) = 0, not nan
        local_max = logits.max(dim=-1).values.clamp_min(torch.finfo(logits.dtype).min)
        idx, mine, ignored = self._target(labels.to(weight.device))
        target_logit = torch.where(mine, logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
        probs = logits.sub_(local_max.unsqueeze(-1)).exp_()  # exp(logits - local max)
        local_sum = probs.sum(dim=-1)
        stats = torch.stack([local_max, local_sum, target_logit])
        gathered = torch.empty((self.size * 3, *stats.shape[1:]), device=stats.device)
        work = dist.all_gather_single(gathered, stats, group=self.group, async_op=True)
        gathered = gathered.view(self.size, *stats.shape)  # (shard, statistic, batch, sequence)
        pieces = None
        if not torch.is_grad_enabled():
            probs = None
        elif self.algorithm == "alg2":  # before the statistics arrive: the local softmax
            probs.div_(local_sum.clamp_min(1e-30).unsqueeze(-1))
            weight = weight.float()
            pieces = (probs @ weight, F.embedding(idx, weight) * mine.unsqueeze(-1))
        self._stats[mb] = (
            x,
            probs,
            local_max,
            local_sum,
            idx,
            mine,
            ignored,
            gathered,
            work,
            pieces,
        )

    def reduce(self, mb: int, scale) -> torch.Tensor:
        """R: combine the statistics into the microbatch's summed cross-entropy divided by
        `scale` (the same on every rank); with autograd on, also this rank's input-gradient
        piece, summed asynchronously for the last stage, and what T needs."""
        x, probs, local_max, local_sum, idx, mine, ignored, gathered, work, pieces = (
            self._stats.pop(mb)
        )
        work.wait()
        global_max = gathered[:, 0].max(dim=0).values
        total = (gathered[:, 1] * (gathered[:, 0] - global_max).exp()).sum(dim=0)
        loss = (total.log() + global_max - gathered[:, 2].sum(dim=0)).masked_fill(ignored, 0.0)
        loss = loss.sum() / scale
        if probs is None:
            return loss
        token_grad = (~ignored).float() / scale  # d loss / d (token loss)
        # this shard's softmax is exp(logits - local max) x factor
        factor = (local_max - global_max).exp() / total
        if self.algorithm == "alg1":  # logit gradient and input-gradient piece after the barrier
            grad_logits = _logit_grad_(probs.mul_(factor.unsqueeze(-1)), idx, mine, token_grad)
            piece = grad_logits @ self.shards.output_weight().detach().float()
            self._saved[mb] = (x, grad_logits)
        else:  # rescale the pieces computed before it by the shard's share of the softmax mass
            share = factor * local_sum
            softmax_piece, target_piece = pieces
            piece = (share.unsqueeze(-1) * softmax_piece - target_piece) * token_grad.unsqueeze(-1)
            self._saved[mb] = (x, probs, share, idx, mine, token_grad)
        work = dist.all_reduce(piece, group=self.group, async_op=True)
        if self.last_stage:
            self._output_grads[mb] = (piece, work)
        else:
            self._pending.append((work, piece))
        return loss

    def output_grad(self, mb: int) -> torch.Tensor:
        """The gradient of the last stage's output for microbatch `mb` (after R)."""
        piece, work = self._output_grads.pop(mb)
        work.wait()
        return self._mine(piece)

    def weight_grad(self, mb: int) -> None:
        """T: accumulate the output-layer gradient of this rank's rows for microbatch `mb`."""
        x, *rest = self._saved.pop(mb)
        if self.algorithm == "alg1":
            (grad_logits,) = rest
        else:
            local_softmax, share, idx, mine, token_grad = rest
            softmax = local_softmax.mul_(share.unsqueeze(-1))
            grad_logits = _logit_grad_(softmax, idx, mine, token_grad)
        weight = self.shards.output_weight()
        grad = (grad_logits.flatten(0, 1).t() @ x.flatten(0, 1)).to(weight.dtype)
        if weight.grad is None:
            weight.grad = grad
        else:
            weight.grad += grad

    def finish(self) -> None:
        """Wait for the sums this rank started but does not read (end of a run)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


def _logit_grad_(softmax, idx, mine, token_grad) -> torch.Tensor:
    """d loss / d logits of one shard, in place of `softmax`: (softmax - one-hot of the target)
    x d loss / d token."""
    softmax.scatter_add_(-1, idx.unsqueeze(-1), -mine.unsqueeze(-1).to(softmax.dtype))
    return softmax.mul_(token_grad.unsqueeze(-1))
