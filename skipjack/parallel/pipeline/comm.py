"""Point-to-point transfer of activations, gradients and micro-batches between pipeline nodes.

Peers are global ranks of `group` (the pipeline ranks of one replica, or the pp x dp ranks of
one tensor-parallel rank when routes cross replicas). Sends are asynchronous (a rank never
blocks on a send, so any schedule that the simulator finds deadlock-free runs); receives block.
Every message carries a tag unique to (microbatch, place, direction), which gloo matches on;
NCCL ignores tags and matches the messages of a pair of ranks in order, so schedules keep the
same order on both ends of every pair (`Schedule.check`).

A link is the stream of messages into one place in one direction. The first message on a link
is preceded by its shape and dtype (a small metadata message with a tag of its own); both ends
cache them, so later messages are bare tensors and the receiver can post its receive before the
sender is there. The runtime queues an action's sends and, when the action is done, posts them
together with the receive of its next action in one `batch_isend_irecv`, so the next input
travels while this rank is still between actions.

Network emulation (`Emulator`): under a link profile (`network.py`) every send leaves after its
link's latency plus its size over the link's bandwidth, a link carrying one message at a time,
so a CPU run shows what a slow or uneven network does to a schedule. A thread of the sending
rank starts each send when it is due; the messages of a link keep their order, and what arrives
is what was sent: emulation changes timing, never results. (The thread issues sends on the
process group while the main thread computes; gloo allows that; under NCCL emulate on the
collectives' stream at your own risk.)
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from skipjack.parallel.pipeline.network import Links
from skipjack.parallel.pipeline.schedule import DIRECTIONS

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)
_META_LEN = 8  # dtype code, ndim, up to 6 sizes


def message_tag(microbatch: int, place: int, direction: int, num_places: int) -> int:
    """Even tags for payloads; odd tags (one per link) for metadata."""
    return ((microbatch * num_places + place) * DIRECTIONS + direction) * 2


def _meta_tag(place: int, direction: int) -> int:
    return (place * DIRECTIONS + direction) * 2 + 1


def _describe(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _META_LEN - 2:
        raise ValueError(f"cannot send a {tensor.dim()}-dimensional tensor between stages")
    meta = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    meta += [0] * (_META_LEN - len(meta))
    return torch.tensor(meta, dtype=torch.int64, device=tensor.device)


class Emulator:
    """Sends from this rank, each started when its link would have delivered it."""

    def __init__(self, links: Links, node_of: Callable[[int], int], rank: int):
        self.links = links
        self.node_of = node_of  # global rank -> node of the profile
        self.node = node_of(rank)
        self.free: dict[int, float] = {}  # destination node -> when its link is free again
        self.due: list[tuple[float, int, dist.P2POp]] = []
        self.works: list[dist.Work] = []
        self.count = itertools.count()
        self.unsent = 0
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    @classmethod
    def over(cls, links: Links, ranks: list[list[int]], rank: int) -> Emulator | None:
        """The emulator of `links` between the pipeline nodes whose global ranks are `ranks`
        [replica][pipeline rank] (node replica x pp + pipeline rank); None for no delay."""
        if links.free():
            return None
        node = {r: i for i, r in enumerate(r for replica in ranks for r in replica)}
        return cls(links, node.__getitem__, rank)

    def send(self, op: dist.P2POp) -> None:
        dst = self.node_of(op.peer)
        nbytes = op.tensor.numel() * op.tensor.element_size()
        now = time.perf_counter()
        start = max(now, self.free.get(dst, now))
        wire = nbytes / self.links.bandwidth[self.node, dst] if dst != self.node else 0.0
        self.free[dst] = start + wire
        due = start + wire + (self.links.latency[self.node, dst] if dst != self.node else 0.0)
        with self.wake:
            heapq.heappush(self.due, (due, next(self.count), op))
            self.unsent += 1
            self.wake.notify()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="skipjack-link", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.due:
                    self.wake.wait()
                due, _, op = self.due[0]
                wait = due - time.perf_counter()
                if wait > 0:
                    self.wake.wait(wait)  # an earlier message may come in meanwhile
                    continue
                heapq.heappop(self.due)
            try:
                work = dist.isend(op.tensor, op.peer, group=op.group, tag=op.tag)
            except BaseException as error:  # surfaced by drain()
                self.failure = error
                work = None
            with self.wake:
                if work is not None:
                    self.works.append(work)
                self.unsent -= 1
                self.wake.notify_all()

    def drain(self) -> None:
        """Wait until every send left and completed."""
        with self.wake:
            while self.unsent:
                self.wake.wait()
            works, self.works = self.works, []
        if self.failure is not None:
            raise RuntimeError("an emulated send failed") from self.failure
        for work in works:
            work.wait()


class P2P:
    def __init__(
        self,
        group: dist.ProcessGroup,
        num_places: int,
        device: torch.device,
        emulator: Emulator | None = None,
    ):
        self.group = group
        self.emulator = emulator
        self.num_places = num_places
        self.device = device
        self.pending: list[dist.Work] = []
        self._queued: list[tuple[torch.Tensor, int, int, int, int]] = []
        self._described: set[tuple[int, int, int]] = set()  # (dst, stage, direction) sent
        self._layouts: dict[tuple[int, int, int], tuple[tuple[int, ...], torch.dtype]] = {}
        self._posted: dict[tuple[int, int, int, int], tuple[torch.Tensor, dist.Work]] = {}

    def send(self, tensor: torch.Tensor, dst: int, mb: int, place: int, direction: int):
        """Queue `tensor` for global rank `dst`; `flush` starts it."""
        self._queued.append((tensor.contiguous(), dst, mb, place, direction))

    def flush(self, expect: tuple[int, int, int, int] | None = None) -> None:
        """Start the queued sends and, if its layout is known, the receive `expect` =
        (src, mb, place, direction) that the next action will wait for: one batch."""
        ops, posted = [], None
        for tensor, dst, mb, place, direction in self._queued:
            if (dst, place, direction) not in self._described:
                self._described.add((dst, place, direction))
                meta = _describe(tensor)
                ops.append(
                    dist.P2POp(dist.isend, meta, dst, self.group, _meta_tag(place, direction))
                )
            tag = message_tag(mb, place, direction, self.num_places)
            ops.append(dist.P2POp(dist.isend, tensor, dst, self.group, tag))
        self._queued.clear()
        if self.emulator is not None:
            for op in ops:
                self.emulator.send(op)
            ops = []
        if expect is not None and expect not in self._posted:
            src, mb, place, direction = expect
            layout = self._layouts.get((src, place, direction))
            if layout is not None:
                posted = torch.empty(layout[0], dtype=layout[1], device=self.device)
                tag = message_tag(mb, place, direction, self.num_places)
                ops.append(dist.P2POp(dist.irecv, posted, src, self.group, tag))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if posted is not None:
            self._posted[expect] = (posted, works.pop())
        self.pending.extend(works)

    def recv(self, src: int, mb: int, place: int, direction: int) -> torch.Tensor:
        """The message for (mb, place, direction) from global rank `src` (blocking)."""
        key = (src, mb, place, direction)
        if key in self._posted:
            buffer, work = self._posted.pop(key)
            work.wait()
            return buffer
        layout = self._layouts.get((src, place, direction))
        if layout is None:
            meta = torch.empty(_META_LEN, dtype=torch.int64, device=self.device)
            dist.irecv(meta, src, group=self.group, tag=_meta_tag(place, direction)).wait()
            code, ndim, *sizes = meta.tolist()
            layout = (tuple(sizes[:ndim]), _DTYPES[code])
            self._layouts[(src, place, direction)] = layout
        buffer = torch.empty(layout[0], dtype=layout[1], device=self.device)
        tag = message_tag(mb, place, direction, self.num_places)
        dist.irecv(buffer, src, group=self.group, tag=tag).wait()
        return buffer

    def wait_all(self) -> None:
        if self.emulator is not None:
            self.emulator.drain()
        for work in self.pending:
            work.wait()
        self.pending.clear()
