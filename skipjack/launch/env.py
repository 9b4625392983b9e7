"""Where this process stands in the job: rank, local rank, world size and the rendezvous address,
read from whichever launcher started it, so `skipjack train` needs no launcher flags.

- torchrun, Ray Train's workers, and anything else that sets `RANK`, `WORLD_SIZE`,
  `MASTER_ADDR`, `MASTER_PORT` ("env"): taken as they are. Ray Train's workers have also joined
  a process group before the trainer runs; `init_distributed` keeps that group.
- SLURM `srun` (one process per task): `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`; the
  master is the first host of `SLURM_STEP_NODELIST` (or the job's node list) and the port is
  derived from the job id, so every task computes the same address without talking.
- otherwise a world of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# a SLURM job's rendezvous port: SLURM_PORT_BASE + job id % SLURM_PORT_BASE, the same in every
# task of the job without talking (srun tasks here, node.sh's torchrun in launch/slurm.py)
SLURM_PORT_BASE = 20000


@dataclass(frozen=True)
class RankInfo:
    launcher: str  # "single", "env" (torchrun, Ray Train, ...) or "slurm"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list: `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for i in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{i:0{len(first)}d}")
    return hosts


def discover(environ: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            "env",
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", "0")),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0"))
        return RankInfo(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", "0")),
            int(env["SLURM_NTASKS"]),
            expand_hostlist(nodes)[0],
            SLURM_PORT_BASE + job % SLURM_PORT_BASE,
        )
    return RankInfo("single")


def backend(device_type: str) -> str:
    """NCCL with CUDA, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the default process group as the launcher that started this process says
    (torchrun, SLURM's srun, Ray Train); (rank, world size).

    A process started without a launcher is a world of one (an in-memory store, no port), so
    the rest of skipjack has a single code path.
    """
    if dist.is_initialized():  # Ray Train's workers join their group before the trainer runs
        return dist.get_rank(), dist.get_world_size()
    info = discover()
    timeout = timedelta(seconds=timeout_s)
    if info.launcher == "single":
        os.environ.setdefault("LOCAL_RANK", "0")  # what libraries read (DeepSpeed asserts it)
        dist.init_process_group(
            backend(device.type), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        os.environ.update(info.env())  # srun sets SLURM_* only; env:// reads these
        dist.init_process_group(backend(device.type), timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def device_for_rank(kind: str = "auto") -> torch.device:
    """The device this rank computes on: its local GPU when CUDA is there (or asked), else CPU."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu")
    local_rank = discover().local_rank
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
