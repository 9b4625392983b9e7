"""ONE executor that runs any schedule over any routes.

Each pipeline rank holds one model chunk per stage it owns and walks its action list. A forward
takes its input from the microbatch's tokens (first stage of the route), from the previous stage
on this rank, or from the pipeline rank that owns the previous stage of the route; the last stage
of a route computes the loss. A backward retraces the route: it takes the output gradient from
the next stage of the route and hands its input gradient to the previous one. Activations are
freed as soon as their backward ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from skipjack.parallel.pipeline.comm import BACKWARD, FORWARD, P2P, message_tag
from skipjack.parallel.pipeline.schedule import Action, Schedule

# loss of one microbatch from the last stage's output and its labels (a differentiable scalar)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PipelineRuntime:
    def __init__(
        self,
        schedule: Schedule,
        chunks: list[torch.nn.Module],
        pp_rank: int,
        p2p: P2P,
        activation_shape: tuple[int, ...],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if len(chunks) != schedule.vpp:
            raise ValueError(f"{len(chunks)} model chunks for a schedule with vpp={schedule.vpp}")
        self.schedule = schedule
        self.chunks = chunks
        self.rank = pp_rank
        self.p2p = p2p
        self.activation_shape = activation_shape  # hidden states between stages, fp32
        self.device = device
        self.autocast = autocast  # entered around every forward (bf16 on CUDA)

    def run(
        self,
        micro: list[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: LossFn,
        forward_only: bool = False,
    ) -> torch.Tensor:
        """Forward and backward of every microbatch; returns the sum of the losses computed on
        this rank (last stages), detached. Gradients accumulate in the chunks' parameters.
        `forward_only` runs the schedule's forwards alone, without autograd (evaluation)."""
        s = self.schedule
        if len(micro) != s.microbatches:
            raise ValueError(f"{len(micro)} microbatches for a schedule of {s.microbatches}")
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        local: dict[tuple[int, int, int], torch.Tensor] = {}  # same-rank handoffs
        loss_sum = torch.zeros((), device=self.device)
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            for action in s.actions[self.rank]:
                if action.kind == "F":
                    loss_sum += self._forward(action, micro, loss_fn, saved, local)
                elif not forward_only:
                    self._backward(action, saved, local)
        self.p2p.wait_all()
        return loss_sum

    def _route(self, action: Action) -> tuple[list[int], int, int]:
        stage = self.schedule.stage(self.rank, action.chunk)
        route = self.schedule.routes[action.microbatch]
        return route, route.index(stage), stage

    def _receive(
        self, mb: int, from_stage: int, to_stage: int, direction: int, local: dict
    ) -> torch.Tensor:
        key = (mb, to_stage, direction)
        if key in local:
            return local.pop(key)
        src = self.schedule.owner(from_stage)[0]
        tag = message_tag(mb, to_stage, direction, self.schedule.num_stages)
        return self.p2p.recv(self.activation_shape, torch.float32, self.device, src, tag)

    def _deliver(
        self, tensor: torch.Tensor, mb: int, to_stage: int, direction: int, local: dict
    ) -> None:
        dst = self.schedule.owner(to_stage)[0]
        if dst == self.rank:
            local[(mb, to_stage, direction)] = tensor
        else:
            tag = message_tag(mb, to_stage, direction, self.schedule.num_stages)
            self.p2p.send(tensor, dst, tag)

    def _forward(self, action, micro, loss_fn, saved, local) -> torch.Tensor:
        route, hop, stage = self._route(action)
        last = hop == len(route) - 1
        tokens, labels = micro[action.microbatch]
        if hop == 0:
            inputs = tokens.to(self.device)
        else:
            inputs = self._receive(action.microbatch, route[hop - 1], stage, FORWARD, local)
            inputs.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            output = self.chunks[action.chunk](inputs)
            if last:
                output = loss_fn(output, labels.to(self.device))
        if not last:
            self._deliver(
                output.detach().float(), action.microbatch, route[hop + 1], FORWARD, local
            )
        if torch.is_grad_enabled():
            saved[(action.microbatch, stage)] = (inputs if hop else None, output)
        return output.detach() if last else torch.zeros((), device=self.device)

    def _backward(self, action, saved, local) -> None:
        route, hop, stage = self._route(action)
        inputs, output = saved.pop((action.microbatch, stage))
        if hop == len(route) - 1:
            output.backward()
        else:
            grad = self._receive(action.microbatch, route[hop + 1], stage, BACKWARD, local)
            torch.autograd.backward(output, grad)
        if hop:
            self._deliver(inputs.grad, action.microbatch, route[hop - 1], BACKWARD, local)
