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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


class P2P:
    def __init__(self, group: dist.ProcessGroup, num_places: int, device: torch.device):
        self.group = group
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
        for work in self.pending:
            work.wait()
        self.pending.clear()
