"""ParallelDims: the dp/pp/tp degrees of a job, this rank's coordinates, and every process group.

Rank order is pp-major, tp-minor (Megatron's): rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so
tensor-parallel neighbours are adjacent ranks. This is the only module that creates process
groups; everything else asks it for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from skipjack.parallel.tensor import TensorParallel


@dataclass
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1
    rank: int = 0
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)
    mesh: object = field(default=None, repr=False)

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

    def build_groups(self, device_type: str = "cpu") -> ParallelDims:
        """Build the device mesh (pp, dp, tp) and every process group (collective: every rank
        calls it). `checkpoint` is a gloo group over all ranks for checkpoint traffic."""
        world = dist.get_world_size()
        if world != self.world_size:
            raise RuntimeError(
                f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} = {self.world_size} "
                f"but {world} processes were launched; change parallel.* or the process count"
            )
        self.mesh = init_device_mesh(
            device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
        )
        for kind in ("pp", "dp", "tp"):
            self.groups[kind] = self.mesh.get_group(kind)
        # the pp x tp ranks of each replica, pp-major: rank pp_rank x tp + tp_rank in it
        self.groups["vocab"] = self.mesh["pp", "tp"]._flatten("vocab").get_group()
        # the pp x dp ranks of each tensor-parallel rank: routes that cross replicas
        self.groups["pipe"] = self.mesh["pp", "dp"]._flatten("pipe").get_group()
        self.groups["checkpoint"] = dist.new_group(list(range(world)), backend="gloo")
        return self

    def pipe_ranks(self) -> list[list[int]]:
        """The global rank of every (replica, pipeline rank) at this rank's tensor-parallel
        rank: the nodes of the "pipe" group."""
        return [[self.rank_of(p, r, self.tp_rank) for p in range(self.pp)] for r in range(self.dp)]

    def group(self, kind: str) -> dist.ProcessGroup:
        return self.groups[kind]

    def mesh_of(self, kind: str):
        """The 1-D device mesh of group `kind` ("tp", "dp", "pp" or "vocab") on this rank."""
        return self.mesh[kind]

    def tensor_parallel(self, sequence_parallel: bool = False) -> TensorParallel:
        return TensorParallel(self.groups["tp"], self.tp, self.tp_rank, sequence_parallel)
