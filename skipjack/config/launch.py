"""`launch`: how the job is started (docs/launch.md), one schema per launcher.

The job's `launch` field is typed `LaunchConfig`, the schema of `launch=local`; each other option
of the `launch` group has a subclass with its own fields (registered in job.py as the option's
schema), and composing it turns the field into that subclass, so a field of another launcher is
refused (`launch=local launch.partition=gpu`). The launcher is the schema's type; the config
carries no name for it that could disagree."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.errors import ConfigError, positive


@dataclass
class LaunchConfig:
    """`launch=local`: run in this process, or as one rank of a launcher that set the ranks
    (torchrun, srun, Ray). Nothing to set."""


@dataclass
class NodesLaunch(LaunchConfig):
    """What torchrun and SLURM share: torchrun on each of `nodes` nodes starts `nproc_per_node`
    processes and restarts them all up to `max_restarts` times after a failure."""

    nproc_per_node: int = 1
    nodes: int = 1
    max_restarts: int = 0


@dataclass
class TorchrunLaunch(NodesLaunch):
    """`launch=torchrun`: start torchrun for the user."""

    nproc_per_node: int = 2
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (multi-node)


@dataclass
class SlurmLaunch(NodesLaunch):
    """`launch=slurm`: write (and submit) a batch script running srun + torchrun, one task per
    node, with these resources; `submit=false` only writes the script."""

    partition: str = ""
    account: str = ""
    time: str = ""
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    extra_sbatch: list[str] = field(default_factory=list)
    submit: bool = True


@dataclass
class RayLaunch(LaunchConfig):
    """`launch=ray`: a Ray Train job on the cluster at `address` (empty: start a local one)."""

    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str = ""
    max_failures: int = 0


# the schema of every option of the `launch` group
LAUNCHERS = {
    "local": LaunchConfig,
    "torchrun": TorchrunLaunch,
    "slurm": SlurmLaunch,
    "ray": RayLaunch,
}


def validate_launch(la: LaunchConfig) -> None:
    if isinstance(la, NodesLaunch):
        positive("launch.nproc_per_node", la.nproc_per_node)
        positive("launch.nodes", la.nodes)
        if la.max_restarts < 0:
            raise ConfigError("launch.max_restarts", f"must be >= 0, got {la.max_restarts}")
    if isinstance(la, TorchrunLaunch) and la.nodes > 1 and ":" not in la.rdzv_endpoint:
        raise ConfigError(
            "launch.rdzv_endpoint",
            "multi-node torchrun needs the rendezvous host:port (the same on every node)",
        )
    if isinstance(la, RayLaunch):
        positive("launch.num_workers", la.num_workers)
        if la.max_failures < 0:
            raise ConfigError("launch.max_failures", f"must be >= 0, got {la.max_failures}")
