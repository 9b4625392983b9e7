"""ParallelDims: the dp/pp/tp degrees of a job, this rank's coordinates, and every process group.

Rank order is pp-major, tp-minor (Megatron's): rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so
tensor-parallel neighbours are adjacent ranks. This is the only module that creates process
groups; everything else asks it for one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the default process group from the launcher's environment; (rank, world size).

    A process started without a launcher is a world of one (a local gloo group on a free port),
    so the rest of skipjack has a single code path.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def device_for_rank(kind: str = "auto") -> torch.device:
    """The device this rank computes on: its local GPU when CUDA is there (or asked), else CPU."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1
    rank: int = 0
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of every kind, as rank lists (the same on every rank)."""
        r = range
        return {
            "tp": [
                [self.rank_of(p, d, t) for t in r(self.tp)] for p in r(self.pp) for d in r(self.dp)
            ],
            "dp": [
                [self.rank_of(p, d, t) for d in r(self.dp)] for p in r(self.pp) for t in r(self.tp)
            ],
            "pp": [
                [self.rank_of(p, d, t) for p in r(self.pp)] for d in r(self.dp) for t in r(self.tp)
            ],
            "vocab": [
                [self.rank_of(p, d, t) for p in r(self.pp) for t in r(self.tp)] for d in r(self.dp)
            ],
        }

    def build_groups(self) -> ParallelDims:
        """Create the process groups (collective: every rank calls it, in the same order)."""
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} = {self.world_size} "
                f"but {dist.get_world_size()} processes were launched"
            )
        for kind, rank_lists in self.group_ranks().items():
            for ranks in rank_lists:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[kind] = group
        return self

    def group(self, kind: str) -> dist.ProcessGroup:
        return self.groups[kind]
