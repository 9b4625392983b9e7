"""The memory tier across a restart of every rank: the snapshots outlive the trainers (held by
the node's agent in its own session), the newest common step restores bitwise, and the agent
cleans up when the job ends, or when no trainer comes back."""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from skipjack.checkpoint.memory import MemoryTier, node_directory
from skipjack.checkpoint.snapshot import agent_pid
from skipjack.checkpoint.state import Progress
from skipjack.config import CheckpointConfig
from skipjack.config.checkpoint import MemoryConfig
from skipjack.testing import run_ranks


class Weights:
    def __init__(self, value: float):
        self.w = torch.full((4, 3), float(value))

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        assert state["w"] is self.w


def config(tmp: str, linger: float = 60.0) -> CheckpointConfig:
    memory = MemoryConfig(interval=1, ranks_per_node=1, linger=linger, root=tmp)
    return CheckpointConfig(dir=f"{tmp}/ckpt", memory=memory)


def first_run(tmp: str, steps: int) -> str:
    tier = MemoryTier(config(tmp), dist.group.WORLD)
    for step in range(1, steps + 1):
        state = {"model": Weights(10 * dist.get_rank() + step), "trainer": Progress(step)}
        tier.save(step, state)
    return str(tier.directory)  # exits without close(): a crash, as the agent sees it


def second_run(tmp: str, end: bool) -> tuple:
    tier = MemoryTier(config(tmp), dist.group.WORLD)
    state = {"model": Weights(0.0), "trainer": Progress()}
    step = tier.newest()
    tier.load(state)
    result = (step, state["trainer"].step, float(state["model"].w[0, 0]))
    if end:
        tier.close()
    return result


def test_snapshots_outlive_every_trainer_and_are_cleaned_up_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_JOB_ID", f"memory-test-{os.getpid()}")
    directories = run_ranks(first_run, 2, str(tmp_path), 3)
    pids = [agent_pid(Path(d)) for d in directories]
    assert all(pids) and len(set(pids)) == 2  # one agent per node, alive after the trainers
    assert run_ranks(second_run, 2, str(tmp_path), False) == [(3, 3, 3.0), (3, 3, 13.0)]
    assert run_ranks(second_run, 2, str(tmp_path), True) == [(3, 3, 3.0), (3, 3, 13.0)]
    root = node_directory(config(str(tmp_path)), 0).parent
    assert not root.exists()  # the agents removed every node's snapshots
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"agent {pid} still runs")


def crashed(tmp: str) -> str:
    tier = MemoryTier(config(tmp, linger=0.5), dist.group.WORLD)
    tier.save(1, {"model": Weights(1.0)})
    return str(tier.directory)


def test_an_agent_whose_trainers_never_come_back_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_JOB_ID", f"memory-linger-{os.getpid()}")
    (directory,) = run_ranks(crashed, 1, str(tmp_path))
    for _ in range(100):
        if not os.path.exists(directory):
            break
        time.sleep(0.1)
    assert not os.path.exists(directory)
