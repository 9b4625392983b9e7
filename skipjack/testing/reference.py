"""Tiny models, synthetic batches and the step loop that equivalence tests compare layouts with."""

from __future__ import annotations

import torch
import torch.distributed as dist

from skipjack.checkpoint.manager import CheckpointManager
from skipjack.config import (
    CheckpointConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RegimeConfig,
    TrainConfig,
    TrainJobConfig,
)
from skipjack.data.loader import ShardedLoader
from skipjack.optim.regime import build_regime
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.shard_spec import all_gather_full, spec_of
from skipjack.trainer.engine import NativeEngine
from skipjack.trainer.trainer import step_plan, train_step, training_state

CPU = torch.device("cpu")


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA model small enough for multi-rank tests on 2 cores."""
    fields = dict(
        name="test",
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        vocab_size=256,
        max_seq_len=64,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


class SyntheticSamples:
    """Deterministic random token samples with the dataset interface the loader reads."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.text = torch.randint(0, vocab_size, (n, seq_len + 1), generator=gen)
        # mask a few targets, as padding would, so normalisation by target count is exercised
        self.mask = (torch.rand(n, seq_len, generator=gen) > 0.1).float()

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.text[i, :-1], "labels": self.text[i, 1:], "loss_mask": self.mask[i]}


def build_run(job: TrainJobConfig, data_seed: int, device: torch.device = CPU):
    """This rank's layout (dp = world / (pp x tp)), a loader over synthetic samples, and the
    engine that trains on `device`, for `job`."""
    p, t = job.parallel, job.train
    dp = dist.get_world_size() // (p.tp * p.pp)
    dims = ParallelDims(dp=dp, pp=p.pp, tp=p.tp, rank=dist.get_rank()).build_groups(device.type)
    data = SyntheticSamples(
        t.steps * t.global_batch_size, t.seq_len, job.model.vocab_size, data_seed
    )
    loader = ShardedLoader(data, t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp)
    return dims, loader, NativeEngine(job, dims, loader.accumulation_steps, device)


def train_reference(
    model_cfg: ModelConfig,
    steps: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_len: int = 32,
    seed: int = 0,
    tp: int = 1,
    sequence_parallel: bool = False,
    pp: int = 1,
    schedule: str = "1f1b",
    vpp: int = 1,
    vocab_parallel: str = "none",
    optim: OptimConfig | None = None,
    regime: RegimeConfig | None = None,
) -> list[dict]:
    """Run `steps` training steps in the current process group (dp = world / (pp x tp)), each
    along the plan of `regime` (default: none, the full model).

    Returns per step the global loss and every gradient, assembled whole from its shards by
    shard spec and from every pipeline stage (before the optimizer step), so any layout
    compares with the single process.
    """
    job = TrainJobConfig(
        model=model_cfg,
        parallel=ParallelConfig(
            tp=tp,
            pp=pp,
            vpp=vpp,
            schedule=schedule,
            vocab_parallel=vocab_parallel,
            sequence_parallel=sequence_parallel,
            bucket_mb=0.05,
        ),
        # a small lr: Adam's first updates are sign(g), so rounding noise in a near-zero
        # gradient element would otherwise move that weight by a full lr in one layout only
        optim=optim or OptimConfig(lr=1e-4, warmup_steps=2),
        train=TrainConfig(
            steps=steps,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            seed=seed,
            dtype="fp32",
        ),
        regime=regime or RegimeConfig(),
    )
    dims, loader, engine = build_run(job, seed)
    regime_of_rank = build_regime(job, dims, engine.blocks())
    history = []
    for step in range(1, steps + 1):
        plan = step_plan(engine, regime_of_rank, step)
        loss = engine.forward_backward(loader.next(), plan)
        grads = {
            n: all_gather_full(_grad(p), spec_of(p), dims.groups)[: spec_of(p).unpadded_shape[0]]
            for module in engine.model  # stage chunks and vocabulary shards
            for n, p in module.named_parameters()
        }
        stage_grads = [None] * pp
        dist.all_gather_object(stage_grads, grads, group=dims.group("pp"))
        engine.optimizer_step(plan)
        if regime_of_rank is not None:
            regime_of_rank.after_step()
        history.append({"loss": loss, "grads": {k: v for g in stage_grads for k, v in g.items()}})
    return history


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    """p's gradient; zeros where the step did not reach it (a block the plan skipped)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def assert_same_history(reference: list[dict], other: list[dict], rtol: float = 1e-5) -> None:
    """Losses and every gradient of each step agree within `rtol` (relative, gradient norm)."""
    for step, (ref, got) in enumerate(zip(reference, other, strict=True)):
        assert abs(got["loss"] - ref["loss"]) <= rtol * abs(ref["loss"]), (step, ref, got)
        for name, g in ref["grads"].items():
            diff = float((got["grads"][name] - g).norm())  # 0 for a block both skipped
            err = diff / float(g.norm()) if diff else 0.0
            assert err <= rtol, f"step {step} {name}: relative error {err:.2e}"


def checkpointed_run(
    model_cfg: ModelConfig,
    steps: int,
    checkpoint_dir: str,
    interval: int = 0,
    resume: str = "none",
    tp: int = 1,
    pp: int = 1,
    vocab_parallel: str = "none",
    global_batch_size: int = 8,
    micro_batch_size: int = 2,
    seq_len: int = 32,
    until: int | None = None,
    optim: OptimConfig | None = None,
    device: torch.device = CPU,
    dtype: str = "fp32",
    regime: RegimeConfig | None = None,
) -> dict[int, float]:
    """Train a run of `steps` steps (the LR schedule's length) up to step `until` (default: the
    end) with the trainer's step function in the current process group (dp = world / (pp x tp))
    on `device` in `dtype`, resuming first per `resume`, saving every `interval` steps; returns
    the loss of every step run."""
    job = TrainJobConfig(
        model=model_cfg,
        parallel=ParallelConfig(tp=tp, pp=pp, vocab_parallel=vocab_parallel, bucket_mb=0.05),
        optim=optim or OptimConfig(lr=1e-3, warmup_steps=2),
        train=TrainConfig(
            steps=steps,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            dtype=dtype,
        ),
        checkpoint=CheckpointConfig(
            interval=interval, dir=checkpoint_dir, keep_last=10, resume=resume
        ),
        regime=regime or RegimeConfig(),
    )
    dims, loader, engine = build_run(job, 0, device)
    checkpoints = CheckpointManager.for_job(job.checkpoint, job.model, dims, dist.get_rank() == 0)
    regime_of_rank = build_regime(job, dims, engine.blocks())
    state = training_state(engine, loader, regime_of_rank)
    start = checkpoints.restore(state) or 0
    losses = {}
    for step in range(start + 1, (until or steps) + 1):
        plan = step_plan(engine, regime_of_rank, step)
        result = train_step(engine, loader, step, checkpoints, state, plan, regime_of_rank)
        losses[step] = result.loss
    checkpoints.close()
    return losses
