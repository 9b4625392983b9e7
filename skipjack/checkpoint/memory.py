"""The memory tier: every rank's training state copied into /dev/shm every
`checkpoint.memory.interval` steps, kept by its node's snapshot agent (snapshot.py) across a
crash of the trainers, and restored from there in seconds (REFT, arXiv 2310.12670).

A rank's snapshot is its own state as the persistent tier would save it (the same parts and
keys, its own shards), in two slots (slots.py): a crash in the middle of a snapshot leaves the
previous one whole. The step waits only for the copy. A restore takes the newest step every rank
holds. A node is the ranks of one machine (LOCAL_WORLD_SIZE of them, or
`checkpoint.memory.ranks_per_node`), with one agent and one directory,
`/dev/shm/skipjack-<job>/node<n>`; the job is the launcher's id of it (SLURM's job id, torchrun's
run id), the same across restarts, or else the checkpoint directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch.distributed as dist

from skipjack.checkpoint.slots import Slots, environment_job_id, flat_state, load_flat
from skipjack.checkpoint.snapshot import ensure_agent, register_trainer, stop_agent
from skipjack.checkpoint.state import State
from skipjack.config import CheckpointConfig

SHM = Path("/dev/shm")


def node_directory(cfg: CheckpointConfig, node: int) -> Path:
    job = environment_job_id() or str(Path(cfg.dir).expanduser().resolve())
    key = hashlib.sha1(job.encode()).hexdigest()[:12]
    return Path(cfg.memory.root) / f"skipjack-{key}" / f"node{node}"


class MemoryTier:
    name = "memory"

    def __init__(self, cfg: CheckpointConfig, group: dist.ProcessGroup):
        self.cfg, self.group = cfg, group
        rank = dist.get_rank()
        per_node = cfg.memory.ranks_per_node or int(
            os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())
        )
        self.node, first = divmod(rank, per_node)
        self.directory = node_directory(cfg, self.node)
        if first == 0:
            ensure_agent(self.directory, cfg.memory.linger)
        dist.barrier(group=group)
        register_trainer(self.directory, rank)
        self.slots = Slots(self.directory, rank)
        self.local_first = first == 0
        self._step: int | None = None

    def due(self, step: int) -> bool:
        return self.cfg.memory.interval > 0 and step % self.cfg.memory.interval == 0

    def save(self, step: int, state: State) -> None:
        """Copy this rank's state into its free slot (the step waits for this copy only)."""
        self.slots.write(step, flat_state(state))

    def newest(self) -> int | None:
        """The newest step every rank holds a whole snapshot of (collective)."""
        steps: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(steps, sorted(self.slots.steps()), group=self.group)
        common = set(steps[0]).intersection(*map(set, steps[1:]))
        self._step = max(common) if common else None
        return self._step

    def where(self) -> str:
        return str(self.directory)

    def load(self, state: State) -> None:
        flat = flat_state(state)
        self.slots.read(self._step, flat)
        load_flat(state, flat)

    def before_update(self) -> None:
        """Nothing: the copy is done when `save` returns."""

    def wait(self) -> None:
        """Nothing is in flight."""

    def close(self) -> None:
        """The job ended: every node's first rank stops its agent, which removes the node's
        snapshots."""
        dist.barrier(group=self.group)
        if self.local_first:
            stop_agent(self.directory)
