"""Recovery as a user meets it: plain torchrun with --max-restarts, ranks or whole nodes
SIGKILLed, the job restarted and restored from the memory tier (or the persistent one), every
loss bitwise the uninterrupted run's."""

import os
import subprocess
from pathlib import Path

import pytest

from skipjack.checkpoint.memory import node_directory
from skipjack.checkpoint.snapshot import job_directory
from skipjack.config import CheckpointConfig
from skipjack.launch.torchrun import run_id
from skipjack.testing.cli import run_skipjack, run_under_torchrun
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

# three one-rank nodes in one parity group (k=2, m=1), a snapshot every step, a persistent
# checkpoint every 2
JOB = [
    *("experiment=smoke", "logging.plot=false", "logging.progress=false", "parallel.dp=3"),
    *("train.steps=5", "train.val_interval=5", "train.val_batches=1"),
    "train.global_batch_size=6",
    *("checkpoint=sharded", "checkpoint.interval=2", "checkpoint.memory.interval=1"),
    *("checkpoint.memory.ranks_per_node=1", "checkpoint.memory.group_size=3"),
]
RESTART = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # restarted ranks rejoin on torch 2.13


def test_killed_ranks_and_lost_nodes_restore_bitwise(tmp_path, monkeypatch):
    """A killed rank restores from its own node's snapshot; a lost node (rank, agent and
    snapshots) is rebuilt from the other two; two lost nodes are beyond the parity, so the job
    resumes from the persistent tier and says so; a job that comes back without a lost node
    restores from the others' snapshots in its new layout. The agents leave nothing behind."""

    def train(name: str, *more: str, nproc: int = 3, restarts: int = 1, **env: str):
        env = {"SKIPJACK_JOB_ID": f"{name}-{os.getpid()}", **env}
        result = run_under_torchrun(
            "train", *JOB, f"hydra.run.dir={name}", *more, nproc=nproc, cwd=tmp_path,
            torchrun_args=(f"--max-restarts={restarts}",), env=env, check=restarts > 0,
        )  # fmt: skip
        rows = read_metrics(tmp_path / name)
        return {r["step"]: r["loss"] for r in rows if "loss" in r}, result.stdout

    straight, _ = train("straight")
    assert sorted(straight) == [1, 2, 3, 4, 5]
    # skipjack's launcher, keeping the agents itself (it sets the variable torch 2.13 needs)
    launched = run_skipjack(
        "train", *JOB, "hydra.run.dir=rank", "checkpoint.memory.agent=launcher",
        *("launch=torchrun", "launch.nproc_per_node=3", "launch.max_restarts=1"),
        cwd=tmp_path, env={"SKIPJACK_KILL": "1@3"},
    )  # fmt: skip
    rows = read_metrics(tmp_path / "rank")
    assert {r["step"]: r["loss"] for r in rows if "loss" in r} == straight
    out = launched.stdout + launched.stderr
    assert "(step 2) of the memory tier" in out and "rebuilt" not in out
    kept = job_directory(Path("/dev/shm"), run_id(tmp_path / "rank"))
    assert not kept.exists()
    assert subprocess.run(["pgrep", "-f", "skipjack.checkpoint.(keeper|snapshot)"]).returncode
    one, out = train("one", SKIPJACK_KILL="1@4:node", **RESTART)
    assert "of the memory tier" in out and "rebuilt the snapshots of node(s) [1]" in out
    assert one == straight
    two, out = train("two", SKIPJACK_KILL="0@4:node,1@4:node", **RESTART)
    assert "(step 2) of the persistent tier" in out and "1 step lost" in out and two == straight
    # node 1 gone for good: the job comes back on the other two as dp=2, from their snapshots
    train("shrink", restarts=0, SKIPJACK_KILL="1@4:node")
    dp2 = ("parallel.dp=2", "checkpoint.memory.group_size=2")
    shrunk, out = train("shrink", *dp2, nproc=2, restarts=0)
    assert "(step 3) of the memory tier" in out and "0 steps lost" in out
    assert "the layout changed from dp=3 x pp=1 x tp=1 to dp=2 x pp=1 x tp=1" in out
    assert shrunk == pytest.approx(straight, rel=1e-5)  # another dp: another summation order
    for name in ("straight", "one", "two", "shrink"):
        monkeypatch.setenv("SKIPJACK_JOB_ID", f"{name}-{os.getpid()}")
        assert not node_directory(CheckpointConfig(), 0).parent.exists()
