"""ONE executor that runs any schedule over any routes.

Each pipeline rank holds one model chunk per stage it owns and walks its node's action list. A
forward takes its input from the microbatch's tokens (first stage of the route), from the
previous stage on this rank, or from the node that owns the previous place of the route, on this
replica or another; the last stage of a route computes the loss with the function it was handed
(`loss(output, micro-batch)`, the micro-batch's summed loss). Every chunk gets the micro-batch's
positions and documents (packed sequences); a node of another replica than the microbatch's gets
the micro-batch itself along with the activation. A backward retraces the route: it takes the
output gradient from the next place of the route and hands its input gradient to the previous
one. Activations are freed as soon as their backward ran.

Under vocabulary parallelism (`vocab`) the first stage's input comes from the E pass, the last
stage's output goes to the S pass, the loss and the output gradient come from the R pass, and the
first stage's input gradient goes to the G pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from skipjack.batch import MicroBatch
from skipjack.parallel.pipeline.comm import P2P
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.schedule import (
    BACKWARD,
    BATCH,
    FORWARD,
    Action,
    Schedule,
    schedule_from_routes,
)
from skipjack.parallel.pipeline.vocab import VocabParallel

# the summed loss of a micro-batch from the last stage's output (this rank's logits shard)
Loss = Callable[[torch.Tensor, MicroBatch], torch.Tensor]


class PipelineRuntime:
    def __init__(
        self,
        schedule: Schedule,
        chunks: list[torch.nn.Module],
        pp_rank: int,
        p2p: P2P,
        device: torch.device,
        loss: Loss | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        vocab: VocabParallel | None = None,
        replica: int = 0,
        ranks: list[list[int]] | None = None,
    ):
        if len(chunks) != schedule.chunks(pp_rank):
            raise ValueError(
                f"{len(chunks)} model chunks on pipeline rank {pp_rank}, where the schedule "
                f"places {schedule.chunks(pp_rank)}"
            )
        self.schedule = schedule  # the full routes' schedule; `current` is the one running
        self.current = schedule
        self.replica = replica
        # the global rank of every (replica, pipeline rank), for routes across replicas
        self.ranks = ranks if ranks is not None else [list(range(schedule.pp))]
        self.node = pp_rank  # in `current`
        self.batches: dict[int, MicroBatch] = {}  # of the step running, by microbatch number
        self._routed: tuple[tuple, Schedule] | None = None
        self.subnets: dict = {}  # of the plan running: global block -> Subnet
        self.chunks = chunks
        self.rank = pp_rank
        self.p2p = p2p
        self.device = device
        if loss is None and vocab is None and self._holds(schedule.num_stages - 1):
            raise ValueError("the last stage needs a loss function (or vocabulary parallelism)")
        self.loss = loss
        self.autocast = autocast  # entered around every forward (bf16 on CUDA)
        self.vocab = vocab
        if (vocab is not None) != schedule.vocab_passes:
            raise ValueError("vocabulary parallelism needs a schedule with vocabulary passes")
        self.holds_last_stage = self._holds(schedule.num_stages - 1)

    def _holds(self, stage: int) -> bool:
        return self.schedule.owner(stage)[0] == self.rank

    def run(
        self,
        micro: list[MicroBatch],
        scale: torch.Tensor | float,
        forward_only: bool = False,
        plan: StepPlan | None = None,
    ) -> torch.Tensor:
        """Forward and backward of every microbatch along its route in `plan` (default: the
        full pipeline), each block running the plan's subnet of it; returns the sum over the
        microbatches whose last stage this rank holds of their summed loss divided by `scale`,
        detached. Gradients (of that loss) accumulate in the parameters; what no route visits
        and what a subnet leaves out gets none. `forward_only` runs the forwards alone, without
        autograd (evaluation)."""
        s = self.current = self._schedule_for(plan)
        self.subnets = plan.subnets if plan is not None else {}
        if len(micro) * s.replicas != s.microbatches:
            raise ValueError(
                f"{len(micro)} microbatches on each of {s.replicas} replica(s) for a schedule "
                f"of {s.microbatches}"
            )
        self.node = self.rank + (self.replica * s.pp if s.replicas > 1 else 0)
        first = self.replica * len(micro) if s.replicas > 1 else 0
        self.batches = {first + i: batch.to(self.device) for i, batch in enumerate(micro)}
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        local: dict[tuple[int, int, int], torch.Tensor] = {}  # same-rank handoffs
        loss_sum = torch.zeros((), device=self.device)
        vocab = self.vocab
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            actions = s.actions[self.node]
            for i, action in enumerate(actions):
                kind, mb = action.kind, action.microbatch
                if kind == "F":
                    loss_sum += self._forward(action, scale, saved, local)
                elif forward_only and kind in ("B", "T", "G"):
                    continue
                elif kind == "B":
                    self._backward(action, saved, local)
                elif kind == "E":
                    with self.autocast():
                        vocab.embed(mb, self.batches[mb].tokens)
                elif kind == "S":
                    with self.autocast():
                        vocab.output(mb, self.batches[mb].labels)
                elif kind == "R":
                    loss = vocab.reduce(mb, scale)
                    if self.holds_last_stage:
                        loss_sum += loss.detach()
                elif kind == "T":
                    vocab.weight_grad(mb)
                elif kind == "G":
                    vocab.embedding_grad(mb)
                following = actions[i + 1] if i + 1 < len(actions) else None
                self.p2p.flush(self._expected(following, forward_only))
        self.p2p.wait_all()
        if vocab is not None:
            vocab.finish()
        return loss_sum

    def _schedule_for(self, plan: StepPlan | None) -> Schedule:
        """The schedule of `plan`'s routes: the configured one when they are the full pipeline
        (and the plan sets no order or in-flight limit of its own), else one built from them
        over every replica's nodes (cached while they repeat)."""
        stages = self.schedule.num_stages
        if plan is None or (plan.is_full(stages) and plan.priority is None and not plan.in_flight):
            return self.schedule
        if self.vocab is not None:
            raise ValueError("vocabulary parallelism runs full routes only; the plan skips stages")
        routes = plan.places(stages)
        priority = tuple(map(tuple, plan.priority)) if plan.priority is not None else None
        key = (tuple(map(tuple, routes)), len(plan.routes), plan.in_flight, priority)
        if self._routed is None or self._routed[0] != key:
            full = self.schedule
            schedule = schedule_from_routes(
                full.pp, routes, full.vpp, len(plan.routes), plan.in_flight, full.head,
                plan.priority,
            )  # fmt: skip
            self._routed = (key, schedule)
        return self._routed[1]

    def _global(self, node: int) -> int:
        """The global rank of `node` of the running schedule."""
        replica, rank = divmod(node, self.current.pp)
        return self.ranks[replica if self.current.replicas > 1 else self.replica][rank]

    def _foreign(self, node: int, mb: int) -> bool:
        """Whether `node` belongs to another replica than the one that loaded `mb`."""
        s = self.current
        return s.replicas > 1 and node // s.pp != s.routes[mb][0] // s.num_stages

    def _route(self, action: Action) -> tuple[list[int], int, int]:
        place = self.current.place(self.node, action.chunk)
        route = self.current.routes[action.microbatch]
        return route, route.index(place), place

    def _expected(self, action: Action | None, forward_only: bool):
        """(src rank, mb, place, direction) of the message `action` will wait for, if remote."""
        if action is None or action.kind not in ("F", "B") or (forward_only and action.kind == "B"):
            return None
        route, hop, place = self._route(action)
        forward = action.kind == "F"
        if (hop == 0) if forward else (hop == len(route) - 1):
            return None
        src = self.current.owner(route[hop - 1] if forward else route[hop + 1])[0]
        if src == self.node:
            return None
        return (self._global(src), action.microbatch, place, FORWARD if forward else BACKWARD)

    def _receive(
        self, mb: int, from_place: int, to_place: int, direction: int, local: dict
    ) -> torch.Tensor:
        key = (mb, to_place, direction)
        if key in local:
            return local.pop(key)
        src = self._global(self.current.owner(from_place)[0])
        tensor = self.p2p.recv(src, mb, to_place, direction)
        if direction == FORWARD and self._foreign(self.node, mb):
            self.batches[mb] = MicroBatch.unpack(self.p2p.recv(src, mb, to_place, BATCH))
        return tensor

    def _deliver(
        self, tensor: torch.Tensor, mb: int, to_place: int, direction: int, local: dict
    ) -> None:
        dst = self.current.owner(to_place)[0]
        if dst == self.node:
            local[(mb, to_place, direction)] = tensor
            return
        self.p2p.send(tensor, self._global(dst), mb, to_place, direction)
        if direction == FORWARD and self._foreign(dst, mb):
            self.p2p.send(self.batches[mb].pack(), self._global(dst), mb, to_place, BATCH)

    def _forward(self, action, scale, saved, local) -> torch.Tensor:
        route, hop, place = self._route(action)
        mb, vocab = action.microbatch, self.vocab
        last = hop == len(route) - 1
        if hop == 0:
            inputs = self.batches[mb].tokens if vocab is None else vocab.embedding(mb)
        else:
            inputs = self._receive(mb, route[hop - 1], place, FORWARD, local)
        batch = self.batches[mb]
        if inputs.is_floating_point():
            inputs.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            chunk = self.chunks[action.chunk]
            output = chunk(inputs, batch.positions, batch.documents, self.subnets)
            if last and vocab is None:
                output = self.loss(output, batch) / scale
        if last and vocab is not None:
            vocab.hidden[mb] = output.detach()
        elif not last:
            self._deliver(output.detach().float(), mb, route[hop + 1], FORWARD, local)
        if torch.is_grad_enabled():
            saved[(mb, place)] = (inputs if inputs.requires_grad else None, output)
        return output.detach() if last and vocab is None else torch.zeros((), device=self.device)

    def _backward(self, action, saved, local) -> None:
        route, hop, place = self._route(action)
        mb, vocab = action.microbatch, self.vocab
        inputs, output = saved.pop((mb, place))
        if hop < len(route) - 1:
            grad = self._receive(mb, route[hop + 1], place, BACKWARD, local)
        elif vocab is not None:
            grad = vocab.output_grad(mb)
        else:
            grad = None  # the loss
        torch.autograd.backward(output, grad)
        if hop:
            self._deliver(inputs.grad, mb, route[hop - 1], BACKWARD, local)
        elif vocab is not None:
            vocab.input_grads[mb] = inputs.grad
