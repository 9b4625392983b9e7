"""train.engine=deepspeed: ZeRO-1 and ZeRO-2 on 2 CPU ranks against the native engine, a save and
resume through DeepSpeed's own checkpoint format under torchrun, the combinations it refuses."""

import pytest
import torch
import torch.distributed as dist

from skipjack.config import ConfigError, prepare
from skipjack.testing import run_ranks
from skipjack.testing.cli import compose_job, run_skipjack
from skipjack.trainer.metrics import read_metrics
from skipjack.trainer.trainer import build_engine, job_data, job_dims

CPU = torch.device("cpu")
SMALL = (
    "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.device=cpu", "optim.warmup_steps=2",
)  # fmt: skip


def _losses(overrides: tuple[str, ...], steps: int) -> list[float]:
    job = compose_job(*SMALL, *overrides)
    prepare(job, dist.get_world_size())
    dims = job_dims(job, CPU)
    loader, _ = job_data(job, dims, 0)
    torch.manual_seed(job.train.seed)
    engine = build_engine(job, dims, loader.accumulation_steps, CPU)
    return [engine.step(loader.next()).loss for _ in range(steps)]


def _native_and_zero(steps: int) -> dict[str, list[float]]:
    return {
        "native": _losses((), steps),
        **{
            f"zero{stage}": _losses(
                ("train.engine=deepspeed", f"train.deepspeed.zero_stage={stage}"), steps
            )
            for stage in (1, 2)
        },
    }


def test_zero_1_and_2_train_like_the_native_engine():
    """dp=2, two micro-batches per replica, clipping on, the LR warming up: five steps of
    losses within 1e-5 of the native engine's."""
    for losses in run_ranks(_native_and_zero, 2, 5):
        for stage in ("zero1", "zero2"):
            for want, got in zip(losses["native"], losses[stage], strict=True):
                assert abs(got - want) <= 1e-5 * abs(want), (stage, losses)


@pytest.mark.slow
def test_a_deepspeed_run_saves_and_resumes_exactly_under_torchrun(tmp_path):
    common = [
        *SMALL, "train.engine=deepspeed", "train.deepspeed.zero_stage=2", "launch=torchrun",
        "launch.nproc_per_node=2", "train.steps=4", "train.val_interval=2", "checkpoint=sharded",
        "checkpoint.interval=2", "logging.wandb=false", "logging.plot=false",
    ]  # fmt: skip
    result = run_skipjack("train", *common, "hydra.run.dir=a", cwd=tmp_path)
    assert "engine: DeepSpeed ZeRO-2" in result.stdout
    step2 = tmp_path / "a" / "checkpoints" / "step-0000002"
    assert (step2 / "deepspeed" / "zero").is_dir()
    resume = f"checkpoint.resume={step2}"
    again = run_skipjack("train", *common, resume, "hydra.run.dir=b", cwd=tmp_path)
    assert f"resumed from {step2} (step 2)" in again.stdout
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r}
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in resumed)


@pytest.mark.parametrize(
    "override,field",
    [
        ("parallel.tp=2", "parallel.tp"),
        ("parallel.pp=2", "parallel.pp"),
        ("optim=galore", "optim.name"),
        ("regime=est", "regime.name"),
        ("checkpoint.memory.interval=1", "checkpoint.memory.interval"),
        ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage"),
    ],
)
def test_what_deepspeed_cannot_run_is_refused_naming_the_native_engine(override, field):
    job = compose_job(*SMALL, "train.engine=deepspeed", override)
    with pytest.raises(ConfigError, match=field) as refused:
        prepare(job, 4)
    if field != "train.deepspeed.zero_stage":
        assert "train.engine=native runs it" in str(refused.value)
