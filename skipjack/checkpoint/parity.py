"""Parity of node snapshots across a group of nodes, made by the nodes' agents, so that a lost
node's snapshot can be rebuilt from the others (erasure.py has the code itself).

A node's snapshot of a step is its ranks' slots of that step packed into one blob (a JSON header
naming each rank's manifest entry and size, then their bytes). For every step the node's ranks
all hold, its agent (1) sends the blob's length to every member of the group, (2) once it knows
every member's length, sends each row's stripe to the row's parity holders, (3) as a holder,
encodes a row once its k stripes are in. A node's own files are `NodeFiles`; another node's are
reached through its agent over TCP (transport.py), on this machine or another, by the same
methods. Parity of the two newest steps is kept.

`rebuild` writes a lost node's snapshot of a step back into its (new) directory from the
survivors' snapshots and parity.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np

from skipjack.atomic import write_bytes, write_text
from skipjack.checkpoint.erasure import Group
from skipjack.checkpoint.slots import Slots
from skipjack.checkpoint.transport import Remote

KEEP = 2  # steps of parity kept


def _length(step: int, index: int) -> str:
    return f"parity/l{step}.n{index}"


def _stripe(step: int, row: int, index: int) -> str:
    return f"incoming/s{step}.r{row}.n{index}"


def _parity(step: int, row: int) -> str:
    return f"parity/s{step}.r{row}"


class NodeFiles:
    """A node's directory as its peers see it: the files they send it (lengths, stripes), its
    parity and its snapshot blob; its agent serves these methods to the group (transport.py)."""

    def __init__(self, directory: Path, ranks: list[int]):
        self.directory, self.ranks = directory, ranks

    def _path(self, path: str, writable: tuple[str, ...] = ("parity",)) -> Path:
        parts = PurePosixPath(path).parts
        if len(parts) != 2 or parts[0] not in writable or parts[1] in ("", ".", ".."):
            raise ValueError(f"{path!r} is not a parity or stripe file of a node")
        return self.directory.joinpath(*parts)

    def put(self, path: str, data) -> bool:
        target = self._path(path, ("parity", "incoming"))
        if not self.directory.is_dir():  # the node's directory is gone: its job ended
            return False
        target.parent.mkdir(exist_ok=True)
        write_bytes(target, data)
        return True

    def get(self, path: str) -> np.ndarray | None:
        try:
            return np.fromfile(self._path(path), dtype=np.uint8)
        except FileNotFoundError:
            return None

    def has(self, paths: list[str]) -> list[bool]:
        return [self._path(p).exists() for p in paths]

    def blob(self, step: int) -> np.ndarray | None:
        """The node's snapshot of `step` as one array, None unless every rank holds it."""
        header, parts = [], []
        for rank in self.ranks:
            slots = Slots(self.directory, rank)
            slot = slots.steps().get(step)
            if slot is None:
                return None
            meta = slots.read_manifest()["slots"][slot]
            data = np.fromfile(slots.slot_file(slot), dtype=np.uint8)
            if slots.steps().get(step) != slot:  # the trainer began rewriting it meanwhile
                return None
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
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in header["ranks"]:
            slots = Slots(self.directory, entry["rank"])
            data = blob[offset : offset + entry["size"]]
            offset += entry["size"]
            write_bytes(slots.slot_file(0), data)
            write_text(slots.manifest, json.dumps({"slots": [entry["meta"], None], "current": 0}))
        return header["step"]


class NodeGroup:
    """Node `node` of `nodes` (each `per_node` consecutive ranks), in groups of `size`; its
    directory is `<root>/node<node>`. Other nodes are reached once `connect` has their agents'
    addresses."""

    def __init__(self, root: Path, node: int, nodes: int, per_node: int, size: int, parity: int):
        self.root, self.node, self.nodes, self.per_node, self.size = (
            root,
            node,
            nodes,
            per_node,
            size,
        )
        first = node // size * size
        self.members = list(range(first, min(first + size, nodes)))
        self.index = self.members.index(node)
        self.group = Group(len(self.members), parity)
        self.files = NodeFiles(root / f"node{node}", self.ranks(node))
        self.peers: dict = {"token": None, "nodes": [None] * nodes}

    def connect(self, peers: dict) -> None:
        """`peers`: the job's token and every node's agent address (host, port)."""
        self.peers = peers

    def view(self, node: int) -> NodeGroup:
        """The group as node `node` sees it, connected to the same peers."""
        view = NodeGroup(self.root, node, self.nodes, self.per_node, self.size, self.group.parity)
        view.connect(self.peers)
        return view

    def ranks(self, node: int) -> list[int]:
        return list(range(node * self.per_node, (node + 1) * self.per_node))

    def peer(self, index: int) -> NodeFiles | Remote | None:
        """Member `index`'s files: this node's own, or another's through its agent (None when its
        address is not known)."""
        if index == self.index:
            return self.files
        address = self.peers["nodes"][self.members[index]]
        return None if address is None else Remote(address, self.peers["token"])

    def steps_held(self) -> set[int]:
        """Steps every rank of this node holds a whole snapshot of, taken in this group's shape."""
        world = self.nodes * self.per_node
        held = [
            {
                step
                for step, (_, layout) in Slots(self.files.directory, r).snapshots().items()
                if layout is None
                or (layout["world"], layout["ranks_per_node"]) == (world, self.per_node)
            }
            for r in self.files.ranks
        ]
        return set.intersection(*held) if held else set()

    # -- the agent's part -------------------------------------------------------------------

    def lengths(self, step: int, index: int | None = None) -> dict[int, int] | None:
        """Every member's blob length of `step`, as member `index` (default: this node) knows
        them; None unless all are known."""
        peer = self.peer(self.index if index is None else index)
        found = {}
        for i in range(len(self.members)):
            data = None if peer is None else peer.get(_length(step, i))
            if data is None:
                return None
            found[i] = int(data.tobytes())
        return found

    def advance(self, state: dict) -> None:
        """One look at the work of this node's agent; `state` is its memory between looks: send
        the length of every step the node's ranks all hold to every member, its stripes to their
        holders once the group's lengths are known (what a peer did not take is sent again at the
        next look, until the step is too old), encode the rows this node holds once their
        stripes are in."""
        pending = state.setdefault("pending", {})  # step -> the stripes, once made; the outbox
        for step in sorted(self.steps_held()):
            if step > state.get("published", -1):
                blob = self.files.blob(step)
                if blob is None:
                    continue
                length = str(len(blob)).encode()
                outbox = {(i, _length(step, self.index)): length for i in range(len(self.members))}
                pending[step], state["published"] = (blob, outbox), step
        unreachable: set[int] = set()
        for step, (blob, outbox) in sorted(pending.items()):
            if step < state["published"] - KEEP:
                del pending[step]
                if outbox:
                    missed = sorted({self.members[i] for i, _ in outbox})
                    print(f"step {step}: nodes {missed} never took their part", flush=True)
                continue
            if blob is not None and (lengths := self.lengths(step)) is not None:
                longest = max(lengths.values())
                for row, stripe in self.group.stripes(self.index, blob, longest).items():
                    for holder in self.group.holders(row):
                        outbox[(holder, _stripe(step, row, self.index))] = stripe
                pending[step] = blob, outbox = None, outbox
            for (index, path), data in list(outbox.items()):
                peer = None if index in unreachable else self.peer(index)
                if peer is not None and peer.put(path, data):
                    del outbox[(index, path)]
                else:
                    unreachable.add(index)  # not again in this look
            if blob is None and not outbox:
                del pending[step]
        self._encode()

    def _encode(self) -> None:
        incoming = self.files.directory / "incoming"
        rows = {tuple(int(x[1:]) for x in p.name.split(".")[:2]) for p in incoming.glob("s*.r*.n*")}
        for step, row in sorted(rows):
            data = self.group.data_nodes(row)
            files = [self.files.directory / _stripe(step, row, i) for i in data]
            if not all(f.exists() for f in files):
                continue
            stripes = {i: np.fromfile(f, dtype=np.uint8) for i, f in zip(data, files, strict=True)}
            block = self.group.encode(row, stripes)[self.index]
            out = self.files.directory / _parity(step, row)
            out.parent.mkdir(exist_ok=True)
            write_bytes(out, block)
            for f in files:
                f.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        parity = self.files.directory / "parity"
        steps = sorted({int(p.name.split(".")[0][1:]) for p in parity.glob("[sl]*.[rn]*")})
        for old in steps[:-KEEP]:
            for p in [*parity.glob(f"s{old}.r*"), *parity.glob(f"l{old}.n*")]:
                p.unlink(missing_ok=True)

    # -- rebuilding ---------------------------------------------------------------------------

    def _holds_parity(self, holder: int, step: int, rows: list[int]) -> bool:
        peer = self.peer(holder)
        return peer is not None and all(peer.has([_parity(step, row) for row in rows]))

    def encoded(self, step: int) -> bool:
        """Whether every member holds its parity of `step`."""
        return all(
            self._holds_parity(
                h, step, [r for r in range(len(self.members)) if h in self.group.holders(r)]
            )
            for h in range(len(self.members))
        )

    def rebuildable(self, step: int, lost: set[int]) -> bool:
        """Whether the survivors of this group (every member not in `lost`, which hold their
        snapshots of `step`) hold what rebuilding `lost` (group indices) needs: every surviving
        holder's parity of the lost rows and every length."""
        survivors = [i for i in range(len(self.members)) if i not in lost]
        if len(lost) > self.group.parity or not survivors:
            return False
        if self.lengths(step, survivors[0]) is None:
            return False
        for row in range(len(self.members)):
            if not set(self.group.data_nodes(row)) & lost:
                continue
            holders = [h for h in self.group.holders(row) if h not in lost]
            if not all(self._holds_parity(h, step, [row]) for h in holders):
                return False
        return True

    def rebuild(self, step: int, lost: set[int]) -> None:
        """This node's snapshot of `step` from the survivors (this node is among `lost`)."""
        survivors = [i for i in range(len(self.members)) if i not in lost]
        lengths = self.lengths(step, survivors[0])
        blobs = {i: self.peer(i).blob(step) for i in survivors}
        parities = {
            (row, h): self.peer(h).get(_parity(step, row))
            for row in range(len(self.members))
            for h in self.group.holders(row)
            if h not in lost
        }
        missing = [i for i, b in blobs.items() if b is None] + [
            k for k, p in parities.items() if p is None
        ]
        if lengths is None or missing:
            raise RuntimeError(
                f"node {self.node}: the group's survivors stopped answering ({missing})"
            )
        blob = self.group.rebuild(lost, blobs, parities, lengths)[self.index]
        self.files.unpack(blob)
