"""`checkpoint`: when to save, where, how many to keep, what to resume from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

Agent = Choice("Agent", "trainer launcher")  # who starts a node's snapshot agent


@dataclass
class MemoryConfig:
    """In-memory snapshots (docs/fault-tolerance.md). `interval`: steps between snapshots, 0
    for none; `ranks_per_node`: the ranks sharing one snapshot agent (0: LOCAL_WORLD_SIZE, the
    ranks of a machine); `group_size` nodes (1: none) share parity so that any `parity` of them
    can be lost; `linger`: seconds the agent keeps the snapshots once no trainer of its node runs
    (after a crash the job has that long to restart); `root`: where the snapshot files live (a
    tmpfs); `agent`: who starts a node's agent, `trainer` (its first rank; the agent outlives
    the trainers by `linger`) or `launcher` (the keeper skipjack's launcher runs on every
    machine, launch=torchrun or slurm; the agents live as long as the launcher)."""

    interval: int = 0
    ranks_per_node: int = 0
    group_size: int = 1
    parity: int = 1
    linger: float = 300.0
    root: str = "/dev/shm"
    agent: Agent = Agent.trainer


@dataclass
class CheckpointConfig:
    """Sharded persistent checkpoints (docs/checkpoints.md). `interval`: steps between saves,
    0 for none. `resume`: auto (the newest complete checkpoint in `dir`, if any), none, or the
    path of a run directory or of one step-* directory."""

    interval: int = 0
    dir: str = "${train.output_dir}/checkpoints"
    keep_last: int = 3
    resume: str = "auto"
    memory: MemoryConfig = field(default_factory=MemoryConfig)


def validate_checkpoint(c: CheckpointConfig) -> None:
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: no saves), got {c.interval}")
    positive("checkpoint.keep_last", c.keep_last)
    m = c.memory
    if m.interval < 0 or m.ranks_per_node < 0:
        raise ConfigError(
            "checkpoint.memory.interval",
            f"interval and ranks_per_node must be >= 0 (0: off / per machine), got "
            f"{m.interval} and {m.ranks_per_node}",
        )
    positive("checkpoint.memory.linger", m.linger)
    positive("checkpoint.memory.group_size", m.group_size)
    if m.group_size > 1 and not 1 <= m.parity < m.group_size:
        raise ConfigError(
            "checkpoint.memory.parity",
            f"a group of {m.group_size} nodes takes 1 to {m.group_size - 1} parity, not {m.parity}",
        )
    if m.interval and not Path(m.root).is_dir():
        raise ConfigError("checkpoint.memory.root", f"{m.root} is not a directory; give a tmpfs")
    if c.resume not in ("auto", "none") and not Path(c.resume).expanduser().exists():
        raise ConfigError(
            "checkpoint.resume",
            f"{c.resume} does not exist; give a run directory, a step-* directory, auto or none",
        )
