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
import shutil
from pathlib import Path

import torch.distributed as dist

from skipjack.checkpoint.parity import NodeGroup
from skipjack.checkpoint.slots import Slots, environment_job_id, flat_state, load_flat
from skipjack.checkpoint.snapshot import ensure_agent, register_trainer, stop_agent
from skipjack.checkpoint.state import State
from skipjack.config import CheckpointConfig, ConfigError


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
        m, nodes = cfg.memory, dist.get_world_size() // per_node
        self.parity = None
        if m.group_size > 1:
            if nodes % m.group_size:
                raise ConfigError(
                    "checkpoint.memory.group_size",
                    f"{nodes} nodes of {per_node} ranks do not split into groups of {m.group_size}",
                )
            shape = [nodes, per_node, m.group_size, m.parity]
            self.parity = NodeGroup(self.directory.parent, self.node, *shape)
        if first == 0:
            ensure_agent(self.directory, m.linger, shape if self.parity else None)
        dist.barrier(group=group)
        register_trainer(self.directory, rank)
        self.slots = Slots(self.directory, rank)
        self.local_first = first == 0
        self._step: int | None = None
        self.rebuilt: list[int] = []  # nodes whose snapshots the last restore rebuilt
        self.held = False  # whether any rank held a snapshot when `newest` looked

    def due(self, step: int) -> bool:
        return self.cfg.memory.interval > 0 and step % self.cfg.memory.interval == 0

    def save(self, step: int, state: State) -> None:
        """Copy this rank's state into its free slot (the step waits for this copy only)."""
        self.slots.write(step, flat_state(state))

    def newest(self) -> int | None:
        """The newest step every rank holds a whole snapshot of, after rebuilding the snapshots
        of lost nodes where their groups' parity allows (collective)."""
        steps: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(steps, sorted(self.slots.steps()), group=self.group)
        common = set(steps[0]).intersection(*map(set, steps[1:]))
        self.held = any(steps)  # some rank had a snapshot
        if self.parity is not None:
            decision: list = [rebuild_plan(self.parity, steps) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(decision, src=0)
            step, lost = decision[0]
            if step is not None and (not common or step > max(common)):
                if self.node in lost and self.local_first:
                    members = self.parity.members
                    self.parity.rebuild(step, {members.index(n) for n in lost if n in members})
                dist.barrier(group=self.group)
                self.rebuilt = sorted(lost)
                common = {step}
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
        snapshots; then rank 0 removes what the group shared."""
        dist.barrier(group=self.group)
        if self.local_first:
            stop_agent(self.directory)
        dist.barrier(group=self.group)  # every agent is gone: nothing writes any more
        if dist.get_rank() == 0:
            shutil.rmtree(self.directory.parent, ignore_errors=True)


def rebuild_plan(parity: NodeGroup, steps: list[list[int]]) -> tuple[int | None, list[int]]:
    """On rank 0: the newest step every node holds or its group can rebuild, and the nodes to
    rebuild (`steps[rank]`: the steps that rank holds)."""
    per_node, size, m = parity.per_node, parity.size, parity.group.parity
    nodes = len(steps) // per_node
    held = [
        set.intersection(*(set(steps[r]) for r in range(n * per_node, (n + 1) * per_node)))
        for n in range(nodes)
    ]
    for step in sorted(set().union(*held), reverse=True):
        lost = [n for n in range(nodes) if step not in held[n]]
        groups: dict[int, tuple[NodeGroup, set[int]]] = {}
        for n in lost:
            view = NodeGroup(parity.root, n, nodes, per_node, size, m)
            groups.setdefault(view.members[0], (view, set()))[1].add(view.index)
        if all(view.rebuildable(step, indices) for view, indices in groups.values()):
            return step, lost
    return None, []
