"""Point-to-point transfer of activations and gradients between pipeline ranks.

Sends are asynchronous (a rank never blocks on a send, so any schedule that the simulator finds
deadlock-free runs); receives block. Every message carries a tag unique to (microbatch, stage,
direction), so messages between two ranks can arrive in any order a schedule and its routes
produce, including activations and gradients travelling the same way (interleaved schedules).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FORWARD, BACKWARD = 0, 1


def message_tag(microbatch: int, stage: int, direction: int, num_stages: int) -> int:
    return (microbatch * num_stages + stage) * 2 + direction


class P2P:
    def __init__(self, group: dist.ProcessGroup, num_stages: int):
        self.group = group
        self.num_stages = num_stages
        self.pending: list[dist.Work] = []

    def send(self, tensor: torch.Tensor, dst_rank: int, tag: int) -> None:
        """Start sending `tensor` to pipeline rank `dst_rank` (group-local rank)."""
        dst = dist.get_global_rank(self.group, dst_rank)
        self.pending.append(dist.isend(tensor.contiguous(), dst, group=self.group, tag=tag))

    def recv(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        src_rank: int,
        tag: int,
    ) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        src = dist.get_global_rank(self.group, src_rank)
        dist.irecv(buffer, src, group=self.group, tag=tag).wait()
        return buffer

    def wait_all(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()
