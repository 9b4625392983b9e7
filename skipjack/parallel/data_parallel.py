"""Gradient synchronisation across data-parallel replicas: bucketed all-reduce.

Gradients are summed, not averaged: the trainer normalises every micro-batch loss by the global
count of target tokens, so the sum over replicas is already the gradient of the global mean loss.
Buckets follow reverse parameter order (the order backward produces them) and are all-reduced
asynchronously, all in flight at once, then copied back.

A parameter no replica computed a gradient for (a stage no route visited, a block a plan skipped)
keeps `grad = None`, so the optimizer leaves it and its state alone, exactly as with dp=1; one
where some replicas did counts as zeros on the others. Which is which is agreed by one small
all-reduce of per-parameter flags, so no rank has to know the other replicas' routes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


class GradientSync:
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        group: dist.ProcessGroup,
        bucket_mb: float = 25.0,
    ):
        self.group = group
        self.enabled = dist.get_world_size(group) > 1
        limit = int(bucket_mb * 2**20)
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = limit
        for p in reversed([p for p in params if p.requires_grad]):
            nbytes = p.numel() * p.element_size()
            if size + nbytes > limit and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sum every gradient over the group; parameters without a gradient on every replica
        keep none."""
        if not self.enabled:
            return
        params = [p for bucket in self.buckets for p in bucket]
        device = params[0].device if params else torch.device("cpu")
        computed = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.int32, device=device
        )
        dist.all_reduce(computed, group=self.group)  # how many replicas computed each
        anywhere = dict(zip(map(id, params), computed.tolist(), strict=True))
        pending = []
        for bucket in self.buckets:
            bucket = [p for p in bucket if anywhere[id(p)]]
            if not bucket:
                continue
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            pending.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).clone()
                offset += n
