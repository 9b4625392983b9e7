"""The engine: forward-backward, the optimizer step, evaluation and their state, for one layout.

The trainer's loop asks an engine (the `Engine` protocol) for the full plan of a step, to step
along a plan and to evaluate, and hands its `state()` to the checkpoint tiers; it never touches
process groups, devices or the model's parts itself. `NativeEngine` is skipjack's own: the
pipeline runtime over this rank's model chunks (tensor, pipeline and vocabulary parallelism),
gradient synchronisation across data-parallel replicas, the optimizer and its LR schedule.

Every micro-batch loss is a sum over its target tokens divided by the global count of target
tokens of the step, so gradients summed over micro-batches and replicas are the gradient of the
global mean loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.distributed as dist

from skipjack.batch import MicroBatch
from skipjack.checkpoint.sharded import load_model
from skipjack.checkpoint.state import ModelState, OptimizerState, ScheduleState, State
from skipjack.config import ConfigError, TrainJobConfig
from skipjack.models.kernels import Kernels, select_kernels
from skipjack.models.llama import use_norm_kernel
from skipjack.optim.builder import build_lr_schedule, build_optimizer
from skipjack.optim.inactive import Slice, slices_left_alone
from skipjack.parallel.data_parallel import GradientSync
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.skippipe import layout_links
from skipjack.parallel.shard_spec import clip_grad_norm, sync_partial_grads
from skipjack.trainer.pipeline import (
    build_pipeline,
    build_skippipe,
    message_bytes,
    plan_flops,
    plan_layers,
)


@dataclass(frozen=True)
class StepResult:
    loss: float  # global mean loss per target token
    lr: float  # the learning rate the update used
    grad_norm: float  # global gradient norm before clipping
    flops: float  # training FLOPs the plan ran, over every rank
    dense_flops: float  # what its routes cost with every block whole (flops - dense: saved)


def global_targets(
    micro: list[MicroBatch], device: torch.device, dp: dist.ProcessGroup
) -> torch.Tensor:
    """Target tokens of the whole global batch (this rank's micro-batches over the replicas of
    `dp`), counted on the device: NCCL reduces CUDA tensors only."""
    n = torch.tensor(float(sum(batch.targets for batch in micro)), device=device)
    dist.all_reduce(n, group=dp)
    return n


def job_kernels(job: TrainJobConfig, device: torch.device) -> Kernels:
    """The kernels `train.kernels` runs on `device`; a config error where it cannot."""
    try:
        return select_kernels(job.train.kernels, device)
    except ValueError as e:
        raise ConfigError("train.kernels", str(e)) from None


class Engine(Protocol):
    """What the trainer's loop needs of an engine (one per training layout)."""

    optimizer: torch.optim.Optimizer
    kernels: Kernels  # what runs RMSNorm and AdamW

    @property
    def lr(self) -> float: ...

    def plan(self, step: int) -> StepPlan:
        """The plan of optimizer step `step`, the same on every rank."""
        ...

    def full_plan(self) -> StepPlan: ...

    def step(
        self,
        micro: list[MicroBatch],
        before_update: Callable[[], None] | None = None,
        plan: StepPlan | None = None,
    ) -> StepResult: ...

    def evaluate(self, batches: list[list[MicroBatch]], plan: StepPlan | None = None) -> float: ...

    def state(self) -> State: ...

    def blocks(self) -> dict[int, torch.nn.Module]: ...

    def load_weights(self, source: str) -> None:
        """Start from the weights in `source` (`model.init_from`: a Hugging Face directory or a
        skipjack step directory); nothing else of the state."""
        ...

    def describe(self) -> str: ...


class NativeEngine:
    """This rank's part of the model (pipeline chunks, and the vocabulary shards if any), its
    optimizer, LR schedule and gradient synchronisation, on `device`, for `job`'s layout `dims`
    with `accumulation` micro-batches per replica and step."""

    def __init__(
        self, job: TrainJobConfig, dims: ParallelDims, accumulation: int, device: torch.device
    ):
        self.dims, self.device, self.accumulation = dims, device, accumulation
        self.model_config, self.seq_len = job.model, job.train.seq_len
        self.grad_clip = job.optim.grad_clip
        tp = dims.tensor_parallel(job.parallel.sequence_parallel)
        skippipe = job.parallel.skippipe
        links = layout_links(skippipe, dims.dp, dims.pp, message_bytes(job, dims, accumulation))
        self.runtime = build_pipeline(job, dims, tp, accumulation, device, links)
        self.layers = plan_layers(job, self.runtime.schedule)
        self.skippipe = (
            build_skippipe(job, dims, accumulation, self.layers, links, device)
            if skippipe.enabled
            else None
        )
        vocab = [self.runtime.vocab.shards] if self.runtime.vocab is not None else []
        self.model = torch.nn.ModuleList(self.runtime.chunks + vocab)
        self.kernels = job_kernels(job, device)
        use_norm_kernel(self.model, self.kernels.norm)
        self.optimizer = build_optimizer(
            self.model, job.optim, device, job.model, dims.groups, self.kernels
        )
        self.schedule = build_lr_schedule(self.optimizer, job.optim, job.train.steps)
        self.grad_sync = GradientSync(
            self.model.parameters(), dims.group("dp"), job.parallel.bucket_mb
        )

    def state(self) -> State:
        """What a checkpoint holds of the engine: parameters, optimizer state, LR schedule, and
        SkipPipe's paths where it plans them."""
        state = {
            "model": ModelState(self.model, self.dims),
            "optim": OptimizerState(self.optimizer, self.model, self.dims),
            "lr_schedule": ScheduleState(self.schedule, self.optimizer),
        }
        return state | ({"skippipe": self.skippipe} if self.skippipe is not None else {})

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def describe(self) -> str:
        return "engine: native"

    def load_weights(self, source: str) -> None:
        model = {"model": ModelState(self.model, self.dims)}
        load_model(model, self.model_config, source, self.dims.group("checkpoint"))

    def plan(self, step: int) -> StepPlan:
        """The plan of optimizer step `step`: SkipPipe's paths where it is on, else the full
        plan."""
        return self.skippipe.plan(step) if self.skippipe is not None else self.full_plan()

    def full_plan(self) -> StepPlan:
        """Every microbatch of every replica through the whole pipeline, every block whole."""
        stages = self.runtime.schedule.num_stages
        return StepPlan.full(self.dims.dp, self.accumulation, stages)

    def flops(self, plan: StepPlan, micro: list[MicroBatch]) -> float:
        """Training FLOPs of a step along `plan` on micro-batches shaped like `micro`'s."""
        tokens = micro[0].tokens.numel()
        tp = self.dims.tp
        add = self._add_over_tp if tp > 1 and plan.subnets else None
        return plan_flops(self.model_config, self.seq_len, self.layers, plan, tokens, tp, add)

    def _add_over_tp(self, value: float) -> float:
        total = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.dims.group("tp"))
        return float(total)

    def _targets(self, micro: list[MicroBatch]) -> torch.Tensor:
        return global_targets(micro, self.device, self.dims.group("dp"))

    def _global_loss(self, loss_sum: torch.Tensor) -> float:
        dist.all_reduce(loss_sum, group=self.dims.group("pp"))  # only last stages computed one
        dist.all_reduce(loss_sum, group=self.dims.group("dp"))
        return float(loss_sum)

    def forward_backward(self, micro: list[MicroBatch], plan: StepPlan | None = None) -> float:
        """Accumulate the gradient of the global mean loss over this rank's micro-batches, the
        pipeline stages and the replicas, along `plan` (default: the full pipeline, every block
        whole); returns that loss."""
        loss_sum = self.runtime.run(micro, self._targets(micro), plan=plan)
        sync_partial_grads(
            [p for c in self.runtime.chunks for p in c.parameters()], self.dims.groups
        )
        self.grad_sync.all_reduce()
        return self._global_loss(loss_sum)

    def optimizer_step(self, plan: StepPlan | None = None) -> float:
        """Clip to the global norm (every element counted once, by shard spec), step the
        optimizer and the LR schedule, zero the gradients; returns the norm before clipping.
        The slices of weights `plan`'s subnets left out are left alone (optim/inactive.py)."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm, self.dims.groups)
        with slices_left_alone(self.optimizer, self._inactive(plan)):
            self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def step(
        self,
        micro: list[MicroBatch],
        before_update: Callable[[], None] | None = None,
        plan: StepPlan | None = None,
    ) -> StepResult:
        """One optimizer step on this rank's micro-batches of a global batch along `plan`
        (default: the full plan); `before_update` runs between the backward and the first
        change to a parameter (a checkpoint's staging barrier)."""
        plan = plan or self.full_plan()
        loss = self.forward_backward(micro, plan)
        lr = self.lr
        if before_update is not None:
            before_update()
        grad_norm = self.optimizer_step(plan)
        flops = self.flops(plan, micro)
        dense = self.flops(replace(plan, subnets={}), micro) if plan.subnets else flops
        return StepResult(loss, lr, grad_norm, flops, dense)

    def blocks(self) -> dict[int, torch.nn.Module]:
        """This rank's blocks by global layer index."""
        return {int(i): b for chunk in self.runtime.chunks for i, b in chunk.layers.items()}

    def _inactive(self, plan: StepPlan | None) -> list[Slice]:
        if plan is None or not plan.subnets:
            return []
        blocks = self.blocks()
        return [
            piece
            for index, subnet in plan.subnets.items()
            if index in blocks and subnet is not None and not subnet.skip
            for piece in blocks[index].inactive(subnet)
        ]

    def evaluate(self, batches: list[list[MicroBatch]], plan: StepPlan | None = None) -> float:
        """Mean loss per target token over validation global batches (each this rank's
        micro-batches of one batch), all replicas, along `plan` (default: the full plan); no
        gradients."""
        for chunk in self.runtime.chunks:
            chunk.eval()
        n_targets = self._targets([mb for micro in batches for mb in micro])
        loss_sum = sum(
            self.runtime.run(micro, n_targets, forward_only=True, plan=plan) for micro in batches
        )
        for chunk in self.runtime.chunks:
            chunk.train()
        return self._global_loss(loss_sum)
