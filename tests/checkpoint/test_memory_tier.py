"""The memory tier across a restart of every rank: the snapshots outlive the trainers (held by
the node's agent in its own session), the newest common step restores bitwise, and the agent
cleans up when the job ends, or when no trainer comes back."""

import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from skipjack.checkpoint.memory import MemoryTier, node_directory
from skipjack.checkpoint.snapshot import agent_pid
from skipjack.checkpoint.state import Progress
from skipjack.config import CheckpointConfig
from skipjack.config.checkpoint import MemoryConfig
from skipjack.parallel.dims import ParallelDims
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


def tier_of(tmp: str, linger: float = 60.0, pp: int = 1) -> MemoryTier:
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(dp=world // pp, pp=pp, rank=rank).build_groups()
    return MemoryTier(config(tmp, linger), dims)


def first_run(tmp: str, steps: int) -> str:
    tier = tier_of(tmp)
    for step in range(1, steps + 1):
        state = {"model": Weights(10 * dist.get_rank() + step), "trainer": Progress(step)}
        tier.save(step, state)
    tier.wait()
    return str(tier.directory)  # exits without close(): a crash, as the agent sees it


def second_run(tmp: str, end: bool) -> tuple:
    tier = tier_of(tmp)
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
    tier = tier_of(tmp, linger=0.5)
    tier.save(1, {"model": Weights(1.0)})
    tier.wait()
    return str(tier.directory)


def test_an_agent_whose_trainers_never_come_back_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_JOB_ID", f"memory-linger-{os.getpid()}")
    (directory,) = run_ranks(crashed, 1, str(tmp_path))
    for _ in range(100):
        if not os.path.exists(directory):
            break
        time.sleep(0.1)
    assert not os.path.exists(directory)


def staged(tmp: str, steps: int) -> None:
    """dp=2 x pp=2, one rank per node: every snapshot holds its stage's number."""
    tier = tier_of(tmp, pp=2)
    for step in range(1, steps + 1):
        stage = tier.place["pp_rank"]
        tier.save(step, {"model": Weights(100 * stage + step), "trainer": Progress(step)})
    tier.wait()
    dist.barrier()


def shrunk(tmp: str) -> tuple:
    """dp=1 x pp=2 after a node was lost for good."""
    tier = tier_of(tmp, pp=2)
    state = {"model": Weights(0.0), "trainer": Progress()}
    step = tier.newest()
    tier.load(state)
    tier.close()
    return step, tier.place["pp_rank"], float(state["model"].w[0, 0]), tier.notes


def test_a_shrunk_world_restores_each_stage_from_a_surviving_replica(tmp_path, monkeypatch):
    """Four one-rank nodes (dp=2 x pp=2); the node of rank 1 is gone for good and the job comes
    back as dp=1 x pp=2: each rank reads its stage's snapshot from the surviving replica."""
    monkeypatch.setenv("SKIPJACK_JOB_ID", f"memory-shrink-{os.getpid()}")
    run_ranks(staged, 4, str(tmp_path), 3)
    root = node_directory(config(str(tmp_path)), 0).parent
    lost = root / "node1"
    os.kill(agent_pid(lost), 9)
    shutil.rmtree(lost)
    results = run_ranks(shrunk, 2, str(tmp_path))
    assert [r[:3] for r in results] == [(3, 0, 3.0), (3, 1, 103.0)]
    assert "the layout changed from dp=2 x pp=2 x tp=1 to dp=1 x pp=2 x tp=1" in results[0][3][0]
    for _ in range(100):  # the old nodes' agents leave once the job's directory is gone
        if not root.exists():
            break
        time.sleep(0.05)
    assert not root.exists()


def on_its_own_machine(tmp: str, steps: int) -> tuple:
    """Three one-rank nodes in one parity group, each on a machine of its own as far as the
    memory tier can tell (its own host name and /dev/shm): the agents reach each other only over
    TCP. Saves `steps` snapshots and crashes; or, with no steps, restores and ends the job."""
    rank = dist.get_rank()
    socket.gethostname = lambda: f"machine{rank}"
    root = Path(tmp) / f"machine{rank}"
    root.mkdir(exist_ok=True)
    memory = MemoryConfig(interval=1, ranks_per_node=1, group_size=3, root=str(root))
    tier = MemoryTier(CheckpointConfig(dir=f"{tmp}/ckpt", memory=memory), tier_dims(3))
    if steps:
        for step in range(1, steps + 1):
            tier.save(step, {"model": Weights(10 * rank + step), "trainer": Progress(step)})
        tier.settle()  # the group's parity of the newest snapshot is made
        return (str(tier.directory),)
    state = {"model": Weights(0.0), "trainer": Progress()}
    step = tier.newest()
    tier.load(state)
    tier.close()
    return step, float(state["model"].w[0, 0]), tier.notes


def tier_dims(dp: int) -> ParallelDims:
    return ParallelDims(dp=dp, rank=dist.get_rank()).build_groups()


def test_a_node_lost_with_its_machine_is_rebuilt_from_parity_held_on_other_machines(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SKIPJACK_JOB_ID", f"memory-machines-{os.getpid()}")
    directories = [Path(d) for (d,) in run_ranks(on_its_own_machine, 3, str(tmp_path), 3)]
    assert len({d.parent.parent for d in directories}) == 3  # nothing shared between machines
    os.kill(agent_pid(directories[1]), 9)  # machine 1 is gone: its agent and its memory
    shutil.rmtree(tmp_path / "machine1")
    results = run_ranks(on_its_own_machine, 3, str(tmp_path), 0)
    assert [r[:2] for r in results] == [(3, 3.0), (3, 13.0), (3, 23.0)]
    assert results[0][2] == ["rebuilt the snapshots of node(s) [1] from parity"]
    for _ in range(100):  # every machine's agent removed its job directory
        if not any(d.parent.exists() for d in directories):
            break
        time.sleep(0.05)
    assert not any(d.parent.exists() for d in directories)
