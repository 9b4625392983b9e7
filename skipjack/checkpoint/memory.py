"""The memory tier: every rank's training state copied into /dev/shm every
`checkpoint.memory.interval` steps, kept by its node's snapshot agent (snapshot.py) across a
crash of the trainers, and restored from there in seconds (REFT, arXiv 2310.12670).

A rank's snapshot is its own state as the persistent tier would save it (the same parts and
keys, its own shards), in two slots (slots.py): a crash in the middle of a snapshot leaves the
previous one whole. Tensors on a GPU are copied into pinned host buffers on a side stream
(`HostStaging`) and written into the slot by a background thread while the next step's
forward and backward run (they change no parameter); the step waits for it only before its
optimizer update. Tensors on the host are written at once: there the step computes on the
cores a background copy would take. A restore takes the newest step every rank holds. A node
is the ranks of one machine (LOCAL_WORLD_SIZE of them, or `checkpoint.memory.ranks_per_node`),
with one agent and one directory, `/dev/shm/skipjack-<job>/node<n>`; the job is the
launcher's id of it (SLURM's job id, torchrun's run id), the same across restarts, or else the
checkpoint directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from skipjack.checkpoint.keeper import keeper_pid, request_agent
from skipjack.checkpoint.parity import NodeGroup
from skipjack.checkpoint.sharded import flatten
from skipjack.checkpoint.slots import Slots, local_tensor
from skipjack.checkpoint.snapshot import (
    agent_port,
    ensure_agent,
    environment_job_id,
    job_directory,
    register_trainer,
    stop_agent,
    write_peers,
)
from skipjack.checkpoint.state import State
from skipjack.checkpoint.transport import Remote, reachable_host
from skipjack.config import CheckpointConfig, ConfigError
from skipjack.parallel.dims import ParallelDims


def node_directory(cfg: CheckpointConfig, node: int) -> Path:
    job = environment_job_id() or str(Path(cfg.dir).expanduser().resolve())
    return job_directory(Path(cfg.memory.root), job) / f"node{node}"


class MemoryTier:
    name = "memory"

    def __init__(self, cfg: CheckpointConfig, dims: ParallelDims):
        self.cfg = cfg
        self.group = group = dims.group("checkpoint")
        rank = dist.get_rank()
        per_node = cfg.memory.ranks_per_node or int(
            os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())
        )
        self.node, first = divmod(rank, per_node)
        self.directory = node_directory(cfg, self.node)
        m, nodes = cfg.memory, dist.get_world_size() // per_node
        self.parity = None
        if m.group_size > 1 and nodes % m.group_size:
            raise ConfigError(
                "checkpoint.memory.group_size",
                f"{nodes} nodes of {per_node} ranks do not split into groups of {m.group_size}",
            )
        check_machines(group, per_node)
        if m.group_size > 1:
            shape = [nodes, per_node, m.group_size, m.parity]
            self.parity = NodeGroup(self.directory.parent, self.node, *shape)
        agent_group = shape if self.parity else None
        if m.agent == "launcher":
            if keeper_pid(self.directory.parent) is None:  # every rank says so
                raise ConfigError(
                    "checkpoint.memory.agent",
                    f"launcher, but no skipjack launcher keeps the snapshot agents of this job "
                    f"on this machine ({self.directory.parent}); start the job with "
                    "launch=torchrun or launch=slurm, or set checkpoint.memory.agent=trainer",
                )
            if first == 0:
                request_agent(self.directory, agent_group)
        elif first == 0:
            ensure_agent(self.directory, m.linger, agent_group)
        dist.barrier(group=group)
        register_trainer(self.directory, rank)
        if self.parity is not None:
            self.parity.connect(self._peers(first == 0))
        # what a snapshot restores into: this layout, or one with another dp (the same stage
        # and shard of another replica)
        self.layout = {
            "world": dist.get_world_size(), "ranks_per_node": per_node,
            "dp": dims.dp, "pp": dims.pp, "tp": dims.tp,
        }  # fmt: skip
        self.place = {"pp_rank": dims.pp_rank, "tp_rank": dims.tp_rank}
        self.slots = Slots(self.directory, rank, {**self.layout, **self.place})
        self._source = self.slots  # where `load` reads: this rank's slots, or another's
        self.local_first = first == 0
        self._step: int | None = None
        self._staging = HostStaging()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="skipjack-snapshot")
        self._writing: Future | None = None
        self.notes: list[str] = []  # what the last restore did besides reading (for the log)
        self.held = False  # whether any rank held a snapshot when `newest` looked

    def _peers(self, local_first: bool) -> dict:
        """Collective: every node's agent address and a fresh token for this start of the job;
        each node's first rank hands them to its agent."""
        address = (reachable_host(), agent_port(self.directory)) if local_first else None
        everyone: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, address, group=self.group)
        token = [secrets.token_hex(16) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0, group=self.group)
        per_node = self.parity.per_node
        peers = {"token": token[0], "nodes": everyone[::per_node]}
        if local_first:
            write_peers(self.directory, peers)
            if not Remote(address, peers["token"]).answers():
                raise RuntimeError(f"the snapshot agent of {self.directory} did not take up "
                                   "the job's new token; see its agent.log")  # fmt: skip
        dist.barrier(group=self.group)
        return peers

    def due(self, step: int) -> bool:
        return self.cfg.memory.interval > 0 and step % self.cfg.memory.interval == 0

    def save(self, step: int, state: State) -> None:
        """Copy this rank's state into its free slot: GPU tensors in the background (staged
        into host buffers on a side stream, then written while the next step computes; at most
        one copy in flight), host tensors now: the step's compute runs on the same cores, and a
        copy beside it slowed the step more than the copy takes (docs/BENCHMARKS.md)."""
        self.wait()
        flat = self._staging.stage(flat_state(state))
        if self._staging.staged:
            self._writing = self._writer.submit(self._write, step, flat)
        else:
            self.slots.write(step, flat)

    def _write(self, step: int, flat: dict) -> None:
        self._staging.synchronize()
        self.slots.write(step, flat)

    def newest(self) -> int | None:
        """The newest step every rank holds a whole snapshot of, after rebuilding the snapshots
        of lost nodes where their groups' parity allows; else, when the job's layout changed,
        the newest step of which every rank can read a snapshot of its stage and shard taken by
        a replica of the old layout (collective)."""
        self.notes, self._source = [], self.slots
        ours = [s for s, (_, layout) in self.slots.snapshots().items() if self._ours(layout)]
        steps: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(steps, sorted(ours), group=self.group)
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
                self.notes.append(f"rebuilt the snapshots of node(s) {sorted(lost)} from parity")
                common = {step}
        self._step = max(common) if common else self._from_old_layout()
        return self._step

    def _ours(self, layout: dict | None) -> bool:
        return layout is None or {k: layout[k] for k in self.layout} == self.layout

    def _from_old_layout(self) -> int | None:
        """Collective: the newest step of an old layout with this pp and tp of which every rank
        reads, on its own machine, a snapshot of its stage and shard (any replica's: their
        states are the same); None when there is none."""
        mine: dict[tuple, tuple[str, int]] = {}  # (step, old layout) -> (directory, rank)
        for directory in sorted(self.directory.parent.glob("node*")):
            for manifest in sorted(directory.glob("rank*.json")):
                slots = Slots(directory, int(manifest.stem.removeprefix("rank")))
                for step, (_, layout) in slots.snapshots().items():
                    if layout is None or self._ours(layout):
                        continue
                    old = tuple((k, layout[k]) for k in self.layout)
                    same = [layout[k] == self.layout[k] for k in ("pp", "tp")]
                    if all(same) and all(layout[k] == v for k, v in self.place.items()):
                        mine.setdefault((step, old), (str(directory), slots.rank))
        seen: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(seen, sorted(mine), group=self.group)
        self.held = self.held or any(seen)
        common = set(seen[0]).intersection(*map(set, seen[1:]))
        if not common:
            return None
        step, old = max(common)
        directory, rank = mine[(step, old)]
        self._source = Slots(Path(directory), rank)
        self.notes.append(
            f"the layout changed from {_describe(dict(old))} to {_describe(self.layout)}: each "
            "rank restored the snapshot of its stage and shard taken by a replica of the old one"
        )
        return step

    def where(self) -> str:
        return str(self._source.directory)  # another node's, after a change of layout

    def load(self, state: State) -> None:
        flat = flat_state(state)
        self._source.read(self._step, flat)
        load_flat(state, flat)

    def before_update(self) -> None:
        """The parameters are about to change: wait for the copy in flight."""
        self.wait()

    def wait(self) -> None:
        """Wait for the snapshot in flight; its error, if it failed, is raised here."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def settle(self, timeout: float = 120.0) -> None:
        """Wait until the group's parity of this rank's newest snapshot is made (the agents
        make it in the background)."""
        self.wait()
        steps = self.slots.steps()
        if self.parity is None or not steps:
            return
        deadline = time.monotonic() + timeout
        while not self.parity.encoded(max(steps)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the parity of step {max(steps)} was not made in {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        """The job ended: every node's first rank stops its agent, which removes the node's
        snapshots; then rank 0 removes what the group shared."""
        self.wait()
        self._writer.shutdown()
        dist.barrier(group=self.group)
        if self.local_first:
            stop_agent(self.directory)
        dist.barrier(group=self.group)  # every agent is gone: nothing writes any more
        if dist.get_rank() == 0:
            shutil.rmtree(self.directory.parent, ignore_errors=True)


def flat_state(state: dict) -> dict:
    """The flat snapshot of a training state's parts (`<part>/<key>`, as the persistent tier
    names them)."""
    return flatten({part: s.state_dict() for part, s in state.items()})


def load_flat(state: dict, flat: dict) -> None:
    """Hand every part of `state` its entries of `flat`."""
    for part, s in state.items():
        prefix = f"{part}/"
        s.load_state_dict({k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)})


def check_machines(group: dist.ProcessGroup, per_node: int) -> None:
    """A node's ranks share one machine: they write into one /dev/shm that their agent keeps."""
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    for first in range(0, len(hosts), per_node):
        if len(set(hosts[first : first + per_node])) > 1:
            raise ConfigError(
                "checkpoint.memory.ranks_per_node",
                f"ranks {first}-{first + per_node - 1} (node {first // per_node}) run on "
                f"{sorted(set(hosts[first : first + per_node]))}: a node's ranks must share a "
                "machine; set it to the ranks per machine (0: LOCAL_WORLD_SIZE)",
            )


def _describe(layout: dict) -> str:
    return " x ".join(f"{k}={layout[k]}" for k in ("dp", "pp", "tp"))


def rebuild_plan(parity: NodeGroup, steps: list[list[int]]) -> tuple[int | None, list[int]]:
    """On rank 0: the newest step every node holds or its group can rebuild, and the nodes to
    rebuild (`steps[rank]`: the steps that rank holds)."""
    per_node = parity.per_node
    nodes = len(steps) // per_node
    held = [
        set.intersection(*(set(steps[r]) for r in range(n * per_node, (n + 1) * per_node)))
        for n in range(nodes)
    ]
    for step in sorted(set().union(*held), reverse=True):
        lost = [n for n in range(nodes) if step not in held[n]]
        groups: dict[int, tuple[NodeGroup, set[int]]] = {}
        for n in lost:
            view = parity.view(n)
            groups.setdefault(view.members[0], (view, set()))[1].add(view.index)
        if all(view.rebuildable(step, indices) for view, indices in groups.values()):
            return step, lost
    return None, []


class HostStaging:
    """Host copies of a snapshot's GPU tensors: pinned buffers, kept from one snapshot to the
    next, filled on a side stream that first waits for the work that made the tensors; the
    writer thread synchronizes with it before reading them. CPU tensors pass through as they
    are (the slot's copy reads them directly)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.stream = None
        self.done = None
        self.staged = False  # whether the last snapshot had GPU tensors to stage

    def stage(self, flat: dict) -> dict:
        local = {k: local_tensor(v) for k, v in flat.items()}
        gpu = {k: v for k, v in local.items() if v is not None and v.is_cuda}
        self.staged = bool(gpu)
        if not gpu:
            return flat
        staged = dict(flat)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for key, tensor in gpu.items():
                buffer = self.buffers.get(key)
                if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                    buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                    self.buffers[key] = buffer
                buffer.copy_(tensor, non_blocking=True)
                staged[key] = buffer
            self.done = torch.cuda.Event()
            self.done.record(self.stream)
        return staged

    def synchronize(self) -> None:
        if self.done is not None:
            self.done.synchronize()
