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
    *("train.steps=5", "train.val_interval=5", "train.val_batches=1"),
    "checkpoint.memory.interval=1",
]


RESTART = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # restarted ranks rejoin on torch 2.13


def train(tmp_path, job: list[str], nproc: int, name: str, **env: str) -> tuple[dict, str]:
    """The job under `torchrun --max-restarts=1` in run directory `name`: its losses by step
    and its output."""
    env = {"SKIPJACK_JOB_ID": f"{name}-{os.getpid()}", **env}
    result = run_under_torchrun(
        "train", *job, f"hydra.run.dir={name}", nproc=nproc, cwd=tmp_path,
        torchrun_args=("--max-restarts=1",), env=env,
    )  # fmt: skip
    rows = read_metrics(tmp_path / name)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, result.stdout


def test_a_killed_rank_restarts_from_the_memory_tier_bitwise(tmp_path, monkeypatch):
    straight, _ = train(tmp_path, JOB, 2, "straight")
    recovered, out = train(tmp_path, JOB, 2, "killed", SKIPJACK_KILL="1@3", **RESTART)
    assert "(step 2) of the memory tier" in out
    assert recovered == straight and sorted(straight) == [1, 2, 3, 4, 5]
    for name in ("straight", "killed"):  # the agents removed the snapshots at the end
        monkeypatch.setenv("SKIPJACK_JOB_ID", f"{name}-{os.getpid()}")
        assert not node_directory(CheckpointConfig(), 0).parent.exists()


NODES = [
    *("experiment=smoke", "logging.plot=false", "logging.progress=false", "parallel.dp=3"),
    *("train.steps=5", "train.val_interval=5", "train.val_batches=1"),
    "train.global_batch_size=6",
    *("checkpoint=sharded", "checkpoint.interval=2", "checkpoint.memory.interval=1"),
    *("checkpoint.memory.ranks_per_node=1", "checkpoint.memory.group_size=3"),
]


def test_a_lost_node_is_rebuilt_from_parity_and_two_fall_back_to_the_persistent_tier(tmp_path):
    """Three one-rank nodes in one parity group (k=2, m=1): node 1 lost (rank, agent and
    snapshots) is rebuilt from the other two; nodes 0 and 1 lost is beyond the parity, so the
    job resumes from the persistent tier and says so. Losses bitwise the uninterrupted run's."""
    straight, _ = train(tmp_path, NODES, 3, "straight")
    one, out = train(tmp_path, NODES, 3, "one", SKIPJACK_KILL="1@4:node", **RESTART)
    assert "of the memory tier" in out and "rebuilt the snapshots of node(s) [1]" in out
    assert one == straight
    two, out = train(tmp_path, NODES, 3, "two", SKIPJACK_KILL="0@4:node,1@4:node", **RESTART)
    assert "(step 2) of the persistent tier" in out and two == straight
