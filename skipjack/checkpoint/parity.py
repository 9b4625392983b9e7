"""Parity of node snapshots across a group of nodes, made by the nodes' agents, so that a lost
node's snapshot can be rebuilt from the others (erasure.py has the code itself).

A node's snapshot of a step is its ranks' slots of that step packed into one blob (a JSON header
naming each rank's manifest entry and size, then their bytes). For every step the node's ranks
all hold, its agent (1) publishes the blob's length to the group, (2) once every member's length
is known, hands each row's stripe to the row's parity holders, (3) as a holder, encodes a row
once its k stripes are there. Everything goes through files under the job's directory
(`<root>/skipjack-<job>/`): the transport for nodes that see one tmpfs (several nodes on one
machine); between machines the same messages would travel over sockets (not yet). Parity of the
two newest steps is kept.

`rebuild` writes a lost node's snapshot of a step back into its (new) directory from the
survivors' snapshots and parity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from skipjack.atomic import write_bytes, write_text
from skipjack.checkpoint.erasure import Group
from skipjack.checkpoint.slots import Slots

KEEP = 2  # steps of parity kept


class NodeGroup:
    """Node `node` of `nodes` (each `per_node` consecutive ranks), in groups of `size`."""

    def __init__(self, root: Path, node: int, nodes: int, per_node: int, size: int, parity: int):
        self.root, self.node, self.per_node, self.size = root, node, per_node, size
        first = node // size * size
        self.members = list(range(first, min(first + size, nodes)))
        self.index = self.members.index(node)
        self.group = Group(len(self.members), parity)
        self.nodes = nodes
        # the job's layout names the group's files: a job back in another shape never reads the
        # old shape's lengths
        self.shared = root / f"group{first // size}-{nodes}x{per_node}"

    def directory(self, node: int) -> Path:
        return self.root / f"node{node}"

    def ranks(self, node: int) -> list[int]:
        return list(range(node * self.per_node, (node + 1) * self.per_node))

    def steps_held(self, node: int) -> set[int]:
        """Steps every rank of `node` holds a whole snapshot of, taken in this group's shape."""
        world = self.nodes * self.per_node
        held = [
            {
                step
                for step, (_, layout) in Slots(self.directory(node), r).snapshots().items()
                if layout is None
                or (layout["world"], layout["ranks_per_node"]) == (world, self.per_node)
            }
            for r in self.ranks(node)
        ]
        return set.intersection(*held) if held else set()

    # -- the node's snapshot as one blob ----------------------------------------------------

    def blob(self, node: int, step: int) -> np.ndarray:
        header, parts = [], []
        for rank in self.ranks(node):
            slots = Slots(self.directory(node), rank)
            slot = slots.steps()[step]
            meta = slots.read_manifest()["slots"][slot]
            data = np.fromfile(slots.slot_file(slot), dtype=np.uint8)
            if slots.steps().get(step) != slot:  # the trainer began rewriting it meanwhile
                raise RuntimeError(f"rank {rank}'s snapshot of step {step} was replaced")
            header.append({"rank": rank, "meta": meta, "size": len(data)})
            parts.append(data)
        encoded = json.dumps({"step": step, "ranks": header}).encode()
        length = np.frombuffer(len(encoded).to_bytes(8, "little"), dtype=np.uint8)
        return np.concatenate([length, np.frombuffer(encoded, dtype=np.uint8), *parts])

    def unpack(self, blob: np.ndarray) -> int:
        """Write a node's blob back as its ranks' slot 0; returns its step."""
        size = int.from_bytes(blob[:8].tobytes(), "little")
        header = json.loads(blob[8 : 8 + size].tobytes())
        offset = 8 + size
        directory = self.directory(self.node)
        directory.mkdir(parents=True, exist_ok=True)
        for entry in header["ranks"]:
            slots = Slots(directory, entry["rank"])
            data = blob[offset : offset + entry["size"]]
            offset += entry["size"]
            write_bytes(slots.slot_file(0), data.tobytes())
            write_text(slots.manifest, json.dumps({"slots": [entry["meta"], None], "current": 0}))
        return header["step"]

    # -- the agent's part -------------------------------------------------------------------

    def _length_file(self, step: int, index: int) -> Path:
        return self.shared / f"step{step}" / f"length{index}"

    def _stripe_file(self, holder: int, step: int, row: int, index: int) -> Path:
        return self.directory(self.members[holder]) / "incoming" / f"s{step}.r{row}.n{index}"

    def parity_file(self, node_index: int, step: int, row: int) -> Path:
        return self.directory(self.members[node_index]) / "parity" / f"s{step}.r{row}"

    def lengths(self, step: int) -> dict[int, int] | None:
        found = {}
        for index in range(len(self.members)):
            try:
                found[index] = int(self._length_file(step, index).read_text())
            except (FileNotFoundError, ValueError):
                return None
        return found

    def advance(self, state: dict) -> None:
        """One look at the work of this node's agent; `state` is its memory between looks:
        publish every step the node's ranks all hold, stripe each once the group's lengths are
        known, encode the rows this node holds once their stripes are in."""
        pending = state.setdefault("pending", {})
        for step in sorted(self.steps_held(self.node)):
            if step > state.get("published", -1):
                blob = self.blob(self.node, step)
                path = self._length_file(step, self.index)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(path, str(len(blob)))
                pending[step], state["published"] = blob, step
        for step in sorted(pending):
            if step < state["published"] - KEEP:
                del pending[step]
                continue
            lengths = self.lengths(step)
            if lengths is None:
                continue
            longest = max(lengths.values())
            for row, stripe in self.group.stripes(self.index, pending.pop(step), longest).items():
                for holder in self.group.holders(row):
                    path = self._stripe_file(holder, step, row, self.index)
                    if not path.parent.parent.is_dir():  # that node is gone (or not yet up)
                        continue
                    path.parent.mkdir(exist_ok=True)
                    write_bytes(path, stripe.tobytes())
        self._encode()

    def _encode(self) -> None:
        incoming = self.directory(self.node) / "incoming"
        rows = {tuple(int(x[1:]) for x in p.name.split(".")[:2]) for p in incoming.glob("s*.r*.n*")}
        for step, row in sorted(rows):
            data = self.group.data_nodes(row)
            files = [self._stripe_file(self.index, step, row, i) for i in data]
            if not all(f.exists() for f in files):
                continue
            stripes = {i: np.fromfile(f, dtype=np.uint8) for i, f in zip(data, files, strict=True)}
            block = self.group.encode(row, stripes)[self.index]
            out = self.parity_file(self.index, step, row)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(out, block.tobytes())
            for f in files:
                f.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        parity = self.directory(self.node) / "parity"
        steps = sorted({int(p.name.split(".")[0][1:]) for p in parity.glob("s*.r*")})
        for old in steps[:-KEEP]:
            for p in parity.glob(f"s{old}.r*"):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.shared / f"step{old}", ignore_errors=True)

    # -- rebuilding ---------------------------------------------------------------------------

    def encoded(self, step: int) -> bool:
        """Whether every member holds its parity of `step`."""
        return all(
            self.parity_file(h, step, row).exists()
            for row in range(len(self.members))
            for h in self.group.holders(row)
        )

    def rebuildable(self, step: int, lost: set[int]) -> bool:
        """Whether the survivors of this group hold what rebuilding `lost` (group indices) at
        `step` needs: their snapshots, every surviving holder's parity, every length."""
        if len(lost) > self.group.parity or self.lengths(step) is None:
            return False
        for index, node in enumerate(self.members):
            if index not in lost and step not in self.steps_held(node):
                return False
        for row in range(len(self.members)):
            if not set(self.group.data_nodes(row)) & lost:
                continue
            holders = [h for h in self.group.holders(row) if h not in lost]
            if not all(self.parity_file(h, step, row).exists() for h in holders):
                return False
        return True

    def rebuild(self, step: int, lost: set[int]) -> None:
        """This node's snapshot of `step` from the survivors (this node is among `lost`)."""
        lengths = self.lengths(step)
        survivors = {
            i: self.blob(node, step) for i, node in enumerate(self.members) if i not in lost
        }
        parities = {
            (row, h): np.fromfile(self.parity_file(h, step, row), dtype=np.uint8)
            for row in range(len(self.members))
            for h in self.group.holders(row)
            if h not in lost and self.parity_file(h, step, row).exists()
        }
        blob = self.group.rebuild(lost, survivors, parities, lengths)[self.index]
        self.unpack(blob)
