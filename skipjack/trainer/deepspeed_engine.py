"""The DeepSpeed engine (`train.engine=deepspeed`): data-parallel training through DeepSpeed's
ZeRO stages 1-3 on the engine seam (trainer/engine.py), with the same model, data, loss,
metrics and run directory as the native engine.

- The DeepSpeed config is generated from skipjack's (`deepspeed_config`): micro-batch size and
  accumulation from `train`, gradient clipping from `optim.grad_clip`, `train.deepspeed.
  zero_stage`, optimizer states offloaded to the CPU with `offload_optimizer`; a JSON file in
  `train.deepspeed.config` is merged over it (its keys win). fp32 weights; on CUDA the forward
  runs under bf16 autocast as the native engine's does.
- The optimizer is skipjack's AdamW (torch's, or apex's FusedAdam: `train.kernels`), handed to
  DeepSpeed, which partitions its state; the LR schedule is skipjack's, stepped after each
  update.
- Every micro-batch loss is its summed token loss over the step's global count of target
  tokens, times dp (DeepSpeed averages gradients over replicas), without DeepSpeed's division
  by the accumulation steps: the gradient of the global mean loss, as the native engine's.
- Checkpoints: the optimizer's partitions in DeepSpeed's own format (`save_checkpoint` into the
  step directory's `deepspeed/`), the weights also as skipjack's sharded `model` part under
  ZeRO-1/2 (so `skipjack convert export` and `model.init_from` read them), the LR schedule and
  the trainer's parts as with the native engine. A DeepSpeed checkpoint resumes at the same dp.

What the engine cannot do (tensor, pipeline or vocabulary parallelism, SkipPipe, GaLore on
ZeRO's flattened partitions, subnet regimes, memory snapshots) is refused at start-up by the
config check (config/job.py), naming the native engine.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from skipjack.batch import MicroBatch
from skipjack.checkpoint.sharded import CheckpointError, load_model
from skipjack.checkpoint.state import ModelState, ScheduleState, State
from skipjack.config import ConfigError, TrainJobConfig
from skipjack.models.llama import Llama, use_norm_kernel
from skipjack.optim.builder import build_lr_schedule, build_optimizer
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.trainer.engine import StepResult, global_targets, job_kernels
from skipjack.trainer.pipeline import autocast_for, cross_entropy, plan_flops

TAG = "zero"  # the checkpoint's sub-directory under deepspeed/


def deepspeed_config(job: TrainJobConfig, dp: int, accumulation: int) -> dict:
    """The DeepSpeed config of `job` at `dp` replicas, with `train.deepspeed.config` merged
    over it."""
    t, ds = job.train, job.train.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * dp,
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # skipjack's AdamW, also with offload
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        path = Path(ds.config).expanduser()
        try:
            override = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError("train.deepspeed.config", f"{path}: {e}") from None
        derived = sorted(DERIVED & override.keys())
        if derived:
            raise ConfigError(
                "train.deepspeed.config",
                f"{path} sets {', '.join(derived)}, which skipjack derives from train.* and "
                "optim.grad_clip (its steps and schedule follow them); set those instead",
            )
        config = _merged(config, override)
    return config


# what the trainer's steps, LR schedule, loss scaling and precision rely on
DERIVED = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
    "gradient_clipping", "fp16", "bf16",
}  # fmt: skip


def _merged(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


class DeepSpeedEngine:
    """The whole model on every rank, trained data-parallel by a DeepSpeed ZeRO engine."""

    def __init__(
        self, job: TrainJobConfig, dims: ParallelDims, accumulation: int, device: torch.device
    ):
        # the accelerator DeepSpeed would otherwise guess (and warn about) on a CPU machine
        os.environ.setdefault("DS_ACCELERATOR", device.type)
        import deepspeed

        self.dims, self.device, self.accumulation = dims, device, accumulation
        self.model_config, self.seq_len = job.model, job.train.seq_len
        self.dtype = job.train.dtype
        self.config = deepspeed_config(job, dims.dp, accumulation)
        self.stage = self.config["zero_optimization"].get("stage", 0)
        self.kernels = job_kernels(job, device)
        if "offload_optimizer" in self.config["zero_optimization"]:
            if job.train.kernels == "apex":
                raise ConfigError(
                    "train.kernels",
                    "apex's FusedAdam cannot step optimizer states offloaded to the CPU; use "
                    "train.kernels=auto or torch, or no train.deepspeed.offload_optimizer",
                )
            self.kernels = replace(self.kernels, adam="torch")
        self.module = Llama(job.model).init_weights(job.train.seed, device)
        self.loss = cross_entropy(self.module.tp, job.model.vocab_size)
        use_norm_kernel(self.module, self.kernels.norm)
        self.optimizer = build_optimizer(
            self.module, job.optim, device, job.model, dims.groups, self.kernels
        )
        self.schedule = build_lr_schedule(self.optimizer, job.optim, job.train.steps)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.module,
            optimizer=self.optimizer,
            config=self.config,
            dist_init_required=False,
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def describe(self) -> str:
        offload = self.config["zero_optimization"].get("offload_optimizer")
        where = f", optimizer states on {offload['device']}" if offload else ""
        return f"engine: DeepSpeed ZeRO-{self.stage}{where}"

    # --- plans -----------------------------------------------------------------------------

    def plan(self, step: int) -> StepPlan:
        return self.full_plan()

    def full_plan(self) -> StepPlan:
        return StepPlan.full(self.dims.dp, self.accumulation, 1)

    def blocks(self) -> dict[int, torch.nn.Module]:
        return {int(i): block for i, block in self.module.layers.items()}

    # --- a step ----------------------------------------------------------------------------

    def _targets(self, micro: list[MicroBatch]) -> torch.Tensor:
        return global_targets(micro, self.device, self.dims.group("dp"))

    def _loss(self, batch: MicroBatch) -> torch.Tensor:
        """The summed token loss of one micro-batch (the native engine's loss, one shard)."""
        batch = batch.to(self.device)
        with autocast_for(self.device, self.dtype):
            logits = self.ds(batch.tokens, batch.positions, batch.documents)
        return self.loss(logits, batch)

    def step(
        self,
        micro: list[MicroBatch],
        before_update: Callable[[], None] | None = None,
        plan: StepPlan | None = None,
    ) -> StepResult:
        if plan is not None and plan.subnets:
            raise ValueError("the DeepSpeed engine runs whole blocks only")
        n_targets = self._targets(micro)
        loss_sum = torch.zeros((), device=self.device)
        lr = self.lr
        for i, batch in enumerate(micro):
            loss = self._loss(batch) / n_targets
            loss_sum += loss.detach()
            self.ds.backward(loss * self.dims.dp, scale_wrt_gas=False)
            if i == len(micro) - 1 and before_update is not None:
                before_update()
            self.ds.step()  # updates at the accumulation boundary, the last micro-batch
        self.schedule.step()
        dist.all_reduce(loss_sum, group=self.dims.group("dp"))
        norm = self.ds.get_global_grad_norm()
        flops = plan_flops(
            self.model_config, self.seq_len, [range(self.model_config.n_layers)],
            self.full_plan(), micro[0].tokens.numel(),
        )  # fmt: skip
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepResult(float(loss_sum), lr, grad_norm, flops, flops)

    def evaluate(self, batches: list[list[MicroBatch]], plan: StepPlan | None = None) -> float:
        self.ds.eval()
        n_targets = self._targets([mb for micro in batches for mb in micro])
        with torch.no_grad():
            loss_sum = sum(self._loss(mb) for micro in batches for mb in micro) / n_targets
        self.ds.train()
        dist.all_reduce(loss_sum, group=self.dims.group("dp"))
        return float(loss_sum)

    # --- state -----------------------------------------------------------------------------

    def load_weights(self, source: str) -> None:
        """Start from the weights in `source` (model.init_from): into the module, then into
        ZeRO's fp32 partitions (the optimizer's master copy)."""
        import deepspeed

        weights = {"model": ModelState([self.module], self.dims)}
        gathered = (  # ZeRO-3 holds a partition of each weight: whole while loading
            deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)
            if self.stage == 3
            else contextlib.nullcontext()
        )
        with gathered:
            load_model(weights, self.model_config, source, self.dims.group("checkpoint"))
        self.ds.optimizer.refresh_fp32_params()

    def state(self) -> State:
        state: State = {
            "deepspeed": DeepSpeedFiles(self.ds, self.dims.dp),
            "lr_schedule": ScheduleState(self.schedule, self.optimizer),
        }
        if self.stage < 3:  # whole weights on every rank: skipjack's sharded copy too
            state["model"] = ModelState([self.module], self.dims)
        return state


class DeepSpeedFiles:
    """The DeepSpeed engine's model and optimizer partitions as DeepSpeed saves them: a part
    that writes its own files (`save_files`, `load_files`) instead of tensors for DCP."""

    def __init__(self, ds, dp: int):
        self.ds, self.dp = ds, dp

    def save_files(self, directory: Path) -> None:
        """Every rank (a collective): DeepSpeed writes `directory`/zero/."""
        self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load_files(self, directory: Path) -> None:
        saved = self._saved_dp(directory)
        if saved != self.dp:
            raise CheckpointError(
                f"{directory}: DeepSpeed ZeRO partitions saved at dp={saved}; resume with "
                f"parallel.dp={saved} (this run has dp={self.dp})"
            )
        loaded, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{directory}: DeepSpeed found no checkpoint to load")

    @staticmethod
    def _saved_dp(directory: Path) -> int:
        """The dp of the save, from DeepSpeed's model states (mapped, not read whole)."""
        files = sorted((directory / TAG).glob("*model_states.pt"))
        if not files:
            raise CheckpointError(f"{directory / TAG}: no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
        return int(state["dp_world_size"])
