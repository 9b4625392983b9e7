"""Point-to-point transfer of activations and gradients between pipeline ranks.

Sends are asynchronous (a rank never blocks on a send, so any schedule that the simulator finds
deadlock-free runs); receives block. Every message carries a tag unique to (microbatch, stage,
direction), so messages between two ranks can arrive in any order a schedule and its routes
produce, including activations and gradients travelling the same way (interleaved schedules).

A link is the stream of messages into one stage in one direction. The first message on a link
is preceded by its shape and dtype (a small metadata message with a tag of its own); both ends
cache them, so later messages are bare tensors and the receiver can post its receive before the
sender is there. The runtime queues an action's sends and, when the action is done, posts them
together with the receive of its next action in one `batch_isend_irecv`, so the next input
travels while this rank is still between actions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FORWARD, BACKWARD = 0, 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_META_LEN = 8  # dtype code, ndim, up to 6 sizes


def message_tag(microbatch: int, stage: int, direction: int, num_stages: int) -> int:
    """Even tags for payloads; odd tags (one per link) for metadata."""
    return ((microbatch * num_stages + stage) * 2 + direction) * 2


def _meta_tag(stage: int, direction: int) -> int:
    return (stage * 2 + direction) * 2 + 1


def _describe(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _META_LEN - 2:
        raise ValueError(f"cannot send a {tensor.dim()}-dimensional tensor between stages")
    meta = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    meta += [0] * (_META_LEN - len(meta))
    return torch.tensor(meta, dtype=torch.int64, device=tensor.device)


class P2P:
    def __init__(self, group: dist.ProcessGroup, num_stages: int, device: torch.device):
        self.group = group
        self.num_stages = num_stages
        self.device = device
        self.pending: list[dist.Work] = []
        self._queued: list[tuple[torch.Tensor, int, int, int, int]] = []
        self._described: set[tuple[int, int, int]] = set()  # (dst, stage, direction) sent
        self._layouts: dict[tuple[int, int, int], tuple[tuple[int, ...], torch.dtype]] = {}
        self._posted: dict[tuple[int, int, int, int], tuple[torch.Tensor, dist.Work]] = {}

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def send(self, tensor: torch.Tensor, dst_rank: int, mb: int, stage: int, direction: int):
        """Queue `tensor` for pipeline rank `dst_rank` (group-local); `flush` starts it."""
        self._queued.append((tensor.contiguous(), dst_rank, mb, stage, direction))

    def flush(self, expect: tuple[int, int, int, int] | None = None) -> None:
        """Start the queued sends and, if its layout is known, the receive `expect` =
        (src_rank, mb, stage, direction) that the next action will wait for: one batch."""
        ops, posted = [], None
        for tensor, dst, mb, stage, direction in self._queued:
            peer = self._peer(dst)
            if (dst, stage, direction) not in self._described:
                self._described.add((dst, stage, direction))
                meta = _describe(tensor)
                ops.append(
                    dist.P2POp(dist.isend, meta, peer, self.group, _meta_tag(stage, direction))
                )
            tag = message_tag(mb, stage, direction, self.num_stages)
            ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, tag))
        self._queued.clear()
        if expect is not None and expect not in self._posted:
            src, mb, stage, direction = expect
            layout = self._layouts.get((src, stage, direction))
            if layout is not None:
                posted = torch.empty(layout[0], dtype=layout[1], device=self.device)
                tag = message_tag(mb, stage, direction, self.num_stages)
                ops.append(dist.P2POp(dist.irecv, posted, self._peer(src), self.group, tag))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if posted is not None:
            self._posted[expect] = (posted, works.pop())
        self.pending.extend(works)

    def recv(self, src_rank: int, mb: int, stage: int, direction: int) -> torch.Tensor:
        """The message for (mb, stage, direction) from pipeline rank `src_rank` (blocking)."""
        key = (src_rank, mb, stage, direction)
        if key in self._posted:
            buffer, work = self._posted.pop(key)
            work.wait()
            return buffer
        peer = self._peer(src_rank)
        layout = self._layouts.get((src_rank, stage, direction))
        if layout is None:
            meta = torch.empty(_META_LEN, dtype=torch.int64, device=self.device)
            dist.irecv(meta, peer, group=self.group, tag=_meta_tag(stage, direction)).wait()
            code, ndim, *sizes = meta.tolist()
            layout = (tuple(sizes[:ndim]), _DTYPES[code])
            self._layouts[(src_rank, stage, direction)] = layout
        buffer = torch.empty(layout[0], dtype=layout[1], device=self.device)
        tag = message_tag(mb, stage, direction, self.num_stages)
        dist.irecv(buffer, peer, group=self.group, tag=tag).wait()
        return buffer

    def wait_all(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()
