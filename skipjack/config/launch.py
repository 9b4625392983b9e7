"""`launch`: how the job is started (docs/launch.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.errors import ConfigError, positive

LAUNCHERS = ("local", "torchrun", "slurm", "ray")


@dataclass
class LaunchConfig:
    """How the job is started (docs/launch.md). `local`: in this process, or as one rank of a
    launcher that set the ranks (torchrun, srun, Ray). `torchrun`: start torchrun for the user.
    `slurm`: write (and submit) a batch script running srun + torchrun, one task per node.
    `ray`: run the trainer as a Ray Train TorchTrainer job."""

    name: str = "local"
    nproc_per_node: int = 1
    nodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (multi-node torchrun)
    max_restarts: int = 0
    # slurm: the batch script's resources; `submit=false` only writes the script
    partition: str = ""
    account: str = ""
    time: str = ""
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    extra_sbatch: list[str] = field(default_factory=list)
    submit: bool = True
    # ray: a Ray Train job on the cluster at `address` (empty: start a local one)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str = ""
    max_failures: int = 0


def validate_launch(la: LaunchConfig) -> None:
    if la.name not in LAUNCHERS:
        raise ConfigError("launch.name", f"unknown launcher {la.name!r}; use one of {LAUNCHERS}")
    positive("launch.nproc_per_node", la.nproc_per_node)
    positive("launch.nodes", la.nodes)
    positive("launch.num_workers", la.num_workers)
    for name in ("max_restarts", "max_failures"):
        if getattr(la, name) < 0:
            raise ConfigError(f"launch.{name}", f"must be >= 0, got {getattr(la, name)}")
    if la.name == "torchrun" and la.nodes > 1 and ":" not in la.rdzv_endpoint:
        raise ConfigError(
            "launch.rdzv_endpoint",
            "multi-node torchrun needs the rendezvous host:port (the same on every node)",
        )
