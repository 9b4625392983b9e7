"""The trainer: wires config, parallel layout, data, model, optimizer and metrics; the step loop.

Batch sizes are in sequences: `global_batch_size` per optimizer step, `micro_batch_size` per
forward; the accumulation steps follow from them and the dp degree, so changing the layout never
changes the math. Every micro-batch loss is a sum over its target tokens divided by the global
count of target tokens of the step, so gradients summed over micro-batches and replicas are the
gradient of the global mean loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from skipjack.atomic import write_text
from skipjack.batch import MicroBatch
from skipjack.checkpoint.convert import init_model_config
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.sharded import load_model
from skipjack.config import (
    ConfigError,
    ModelConfig,
    TrainJobConfig,
    resolve_dp,
    validate,
)
from skipjack.data.loader import ShardedLoader
from skipjack.data.source import build_datasets
from skipjack.models.llama import flops_per_token, num_parameters
from skipjack.optim.builder import (
    build_lr_schedule,
    build_optimizer,
    planned_state_bytes,
    state_bytes,
)
from skipjack.parallel.data_parallel import GradientSync
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.runtime import PipelineRuntime
from skipjack.parallel.shard_spec import clip_grad_norm, sync_partial_grads
from skipjack.trainer.metrics import Metrics
from skipjack.trainer.pipeline import build_pipeline


def count_targets(
    micro: list[MicroBatch], group: dist.ProcessGroup, device: torch.device
) -> torch.Tensor:
    """Target tokens of the whole global batch (all micro-batches, all replicas), counted on
    `device`: NCCL reduces CUDA tensors only."""
    n = torch.tensor(float(sum(batch.targets for batch in micro)), device=device)
    dist.all_reduce(n, group=group)
    return n


@dataclass
class Training:
    """What a rank trains with: its pipeline runtime (model chunks), optimizer, LR schedule and
    gradient synchronisation across replicas."""

    runtime: PipelineRuntime
    model: torch.nn.ModuleList  # the chunks, and the vocabulary shards if any
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    grad_sync: GradientSync
    model_config: ModelConfig


def build_training(
    job: TrainJobConfig, dims: ParallelDims, accumulation: int, device: torch.device
) -> Training:
    tp = dims.tensor_parallel(job.parallel.sequence_parallel)
    runtime = build_pipeline(job, dims, tp, accumulation, device)
    vocab = [runtime.vocab.shards] if runtime.vocab is not None else []
    model = torch.nn.ModuleList(runtime.chunks + vocab)
    optimizer = build_optimizer(model, job.optim, device, job.model, dims.groups)
    schedule = build_lr_schedule(optimizer, job.optim, job.train.steps)
    grad_sync = GradientSync(model.parameters(), dims.group("dp"), job.parallel.bucket_mb)
    return Training(runtime, model, optimizer, schedule, grad_sync, job.model)


def _sum_over_stages_and_replicas(
    loss_sum: torch.Tensor, groups: dict[str, dist.ProcessGroup]
) -> float:
    dist.all_reduce(loss_sum, group=groups["pp"])  # only last stages computed a loss
    dist.all_reduce(loss_sum, group=groups["dp"])
    return float(loss_sum)


def forward_backward(
    runtime: PipelineRuntime,
    micro: list[MicroBatch],
    grad_sync: GradientSync,
    groups: dict[str, dist.ProcessGroup],
    device: torch.device,
) -> float:
    """Accumulate the gradient of the global mean loss over micro-batches, pipeline stages and
    replicas; returns that loss."""
    n_targets = count_targets(micro, groups["dp"], device)
    loss_sum = runtime.run(micro, n_targets)
    sync_partial_grads([p for c in runtime.chunks for p in c.parameters()], groups)
    grad_sync.all_reduce()
    return _sum_over_stages_and_replicas(loss_sum, groups)


def evaluate(
    runtime: PipelineRuntime,
    batches: list[list[MicroBatch]],
    groups: dict[str, dist.ProcessGroup],
    device: torch.device,
) -> float:
    """Mean loss per target token over validation global batches (each this rank's micro-batches
    of one batch), all replicas."""
    for chunk in runtime.chunks:
        chunk.eval()
    n_targets = count_targets([mb for micro in batches for mb in micro], groups["dp"], device)
    loss_sum = sum(runtime.run(micro, n_targets, forward_only=True) for micro in batches)
    for chunk in runtime.chunks:
        chunk.train()
    return _sum_over_stages_and_replicas(loss_sum, groups)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    groups: dict[str, dist.ProcessGroup],
) -> float:
    """Clip to the global norm (every element counted once, by shard spec), step, zero."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm(model.parameters(), max_norm, groups)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_step(
    training: Training,
    loader: ShardedLoader,
    step: int,
    grad_clip: float,
    dims: ParallelDims,
    device: torch.device,
    checkpoints: CheckpointManager | None = None,
) -> tuple[float, float, float]:
    """One optimizer step on the loader's next global batch, then a checkpoint if one is due;
    returns (loss, lr, grad norm). Parameters change only after the save in flight has its copy."""
    micro = loader.next()
    loss = forward_backward(training.runtime, micro, training.grad_sync, dims.groups, device)
    lr = training.optimizer.param_groups[0]["lr"]
    if checkpoints is not None:
        checkpoints.before_update()
    grad_norm = optimizer_step(
        training.model, training.optimizer, training.schedule, grad_clip, dims.groups
    )
    if checkpoints is not None and checkpoints.due(step):
        tokens = loader.consumed_samples * int(micro[0].tokens.shape[1])
        trainer_state = {"step": step, "tokens": tokens}
        checkpoints.save(step, training, trainer_state, loader.state_dict())
    return loss, lr, grad_norm


def agree_run_dir(cfg: DictConfig) -> Path:
    """Make rank 0's run directory (absolute) `train.output_dir` on every rank, before anything
    derived from it (checkpoint.dir, logs, metrics, plots) is resolved: a launcher's other ranks
    may have composed their own (torchrun's or srun's ranks > 0 run with `hydra.run.dir=.`), and
    a path that differs between ranks splits one checkpoint over two directories."""
    chosen = [str(Path(cfg.train.output_dir).resolve()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    cfg.train.output_dir = chosen[0]
    run_dir = Path(chosen[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _wandb_run(cfg: TrainJobConfig, run_dir: Path, resolved: dict):
    if not cfg.logging.wandb or cfg.logging.wandb_mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.logging.wandb_project,
        mode=cfg.logging.wandb_mode,
        dir=str(run_dir),
        config=resolved,
        name=run_dir.name,
        settings=wandb.Settings(silent=True),
    )


def checked_job(cfg: DictConfig, world: int) -> tuple[TrainJobConfig, str | None]:
    """The typed job of `cfg` for a world of `world` ranks, checked (raises ConfigError), and
    the notice of `validate` if any."""
    job: TrainJobConfig = OmegaConf.to_object(cfg)
    if job.model.init_from:
        job.model = init_model_config(job.model)
    return job, validate(job, world)


def train(cfg: DictConfig, device: torch.device) -> dict:
    """Run a training job as this rank of the default process group (the launcher started it,
    launch/local.py) on `device`; returns a summary (run dir, first/last validation loss,
    outputs)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = agree_run_dir(cfg)
    job, notice = checked_job(cfg, world)  # every path now from rank 0's run directory
    t = job.train
    dims = ParallelDims(
        dp=resolve_dp(job.parallel, world), pp=job.parallel.pp, tp=job.parallel.tp, rank=rank
    ).build_groups(device.type)
    groups = dims.groups
    lead = rank == 0
    if lead:
        _write_config(cfg, run_dir)
        if notice:
            print(notice)

    total_val = t.val_batches * t.global_batch_size
    train_set, val_set, tokenizer = build_datasets(
        job.data, t.seq_len, t.seed, (t.steps * t.global_batch_size, total_val)
    )
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{job.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size}; raise it or shrink the tokenizer",
        )
    loader = ShardedLoader(
        train_set, t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp
    )
    val_loader = ShardedLoader(
        val_set, t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp
    )
    val_batches = [val_loader.batch_at(b * t.global_batch_size) for b in range(t.val_batches)]

    torch.manual_seed(t.seed)
    training = build_training(job, dims, loader.accumulation_steps, device)
    runtime = training.runtime

    wandb_run = (
        _wandb_run(job, run_dir, OmegaConf.to_container(cfg, resolve=True)) if lead else None
    )
    metrics = Metrics(
        run_dir,
        t.steps,
        flops_per_token(job.model, t.seq_len),
        device,
        enabled=lead,
        progress=job.logging.progress,
        wandb_run=wandb_run,
    )
    if lead:
        sp = " (sp)" if job.parallel.sequence_parallel else ""
        print(
            f"skipjack: {job.model.name} ({num_parameters(job.model) / 1e6:.1f}M parameters) "
            f"dp={dims.dp} pp={dims.pp} tp={dims.tp}{sp} on {device}, "
            f"{t.steps} steps x {t.global_batch_size} sequences x {t.seq_len} tokens, "
            f"accumulation {loader.accumulation_steps}; run dir {run_dir}"
        )
        print(
            f"skipjack: optimizer {job.optim.name}: "
            f"{planned_state_bytes(training.optimizer) / 2**20:.2f} MiB of state on rank 0"
        )

    checkpoints = CheckpointManager(job.checkpoint, job.model, dims, lead)
    restored = checkpoints.restore(training, loader)
    start = 0
    if restored is not None:
        start = restored["step"]
        metrics.resume(restored["tokens"])
        if lead:
            print(f"skipjack: resumed from {checkpoints.restored_from} (step {start})")
    elif job.model.init_from:
        load_model(training, dims, job.model.init_from, dims.group("checkpoint"))
        if lead:
            print(f"skipjack: weights from {job.model.init_from}")
    val_losses = []
    if val_batches and restored is None:
        val_losses.append(evaluate(runtime, val_batches, groups, device))
        metrics.step(0, 0, 0.0, val_loss=val_losses[-1])
    step_tokens = t.global_batch_size * t.seq_len
    for step in range(start + 1, t.steps + 1):
        started = time.perf_counter()
        loss, lr, grad_norm = train_step(
            training, loader, step, job.optim.grad_clip, dims, device, checkpoints
        )
        seconds = time.perf_counter() - started
        val_loss = None
        if val_batches and (step % t.val_interval == 0 or step == t.steps):
            val_loss = evaluate(runtime, val_batches, groups, device)
            val_losses.append(val_loss)
        metrics.step(
            step,
            step_tokens,
            seconds,
            loss,
            lr,
            grad_norm,
            val_loss,
            log=step % job.logging.interval == 0 or step == t.steps,
            optimizer_state_bytes=state_bytes(training.optimizer),
        )
    checkpoints.close()
    metrics.close()

    summary = {
        "run_dir": str(run_dir),
        "val_losses": val_losses,
        "config": str(run_dir / "config.yaml"),
        "metrics": str(run_dir / "metrics.jsonl"),
    }
    if lead and job.logging.plot and metrics.history:
        summary["plot"] = str(metrics.plot(run_dir / "loss.png", f"skipjack {job.model.name}"))
    if lead:
        print(
            f"skipjack: done. val_loss {val_losses[0]:.4f} -> {val_losses[-1]:.4f}"
            if val_losses
            else "skipjack: done."
        )
        for name in ("config", "metrics", "plot"):
            if name in summary:
                print(f"  {name:8s} {summary[name]}")
        if wandb_run is not None:
            print(f"  wandb    {run_dir / 'wandb'} (sync with `wandb sync`)")
    dist.destroy_process_group()
    return summary
