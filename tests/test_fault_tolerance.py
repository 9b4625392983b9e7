"""Recovery as a user meets it: plain torchrun with --max-restarts, one rank SIGKILLed, the job
restarted and restored from the memory tier, every loss bitwise the uninterrupted run's."""

import os

import pytest

from skipjack.checkpoint.memory import node_directory
from skipjack.config import CheckpointConfig
from skipjack.testing.cli import run_under_torchrun
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

JOB = [
    *("experiment=smoke", "logging.plot=false", "logging.progress=false", "parallel.dp=2"),
    *("train.steps=5", "train.val_interval=5", "checkpoint.memory.interval=1"),
]


def test_a_killed_rank_restarts_from_the_memory_tier_bitwise(tmp_path, monkeypatch):
    def train(name: str, **env: str):
        env = {"SKIPJACK_JOB_ID": f"{name}-{os.getpid()}", **env}
        result = run_under_torchrun(
            "train", *JOB, f"hydra.run.dir={name}", nproc=2, cwd=tmp_path,
            torchrun_args=("--max-restarts=1",), env=env,
        )  # fmt: skip
        rows = read_metrics(tmp_path / name)
        return {r["step"]: r["loss"] for r in rows if "loss" in r}, result.stdout

    straight, _ = train("straight")
    recovered, out = train("killed", SKIPJACK_KILL="1@3", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert "(step 2) of the memory tier" in out
    assert recovered == straight and sorted(straight) == [1, 2, 3, 4, 5]
    for name in ("straight", "killed"):  # the agents removed the snapshots at the end
        monkeypatch.setenv("SKIPJACK_JOB_ID", f"{name}-{os.getpid()}")
        assert not node_directory(CheckpointConfig(), 0).parent.exists()
