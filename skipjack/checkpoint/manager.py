"""Checkpoint policy over an ordered list of tiers: when each saves, and which one a run resumes
from.

A tier keeps training states (checkpoint/state.py) somewhere: `save(step, state)` starts a save,
`newest()` says (collectively: every rank gets the same answer) which step it can restore,
`load(state)` fills the state from it, `before_update()` blocks until a save in flight holds its
own copy, `wait()` until it is complete. The persistent tier (checkpoint/persistent.py, sharded
DCP checkpoints on a shared file system) is the last resort; faster tiers (memory snapshots) come
before it. Resuming takes the first tier that holds a complete state and restores it on every
rank; a tier whose restore fails on any rank is skipped with a warning naming it, and the next
one is tried.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch.distributed as dist

from skipjack.checkpoint.memory import MemoryTier
from skipjack.checkpoint.persistent import PersistentTier
from skipjack.checkpoint.sharded import CheckpointError
from skipjack.checkpoint.state import State
from skipjack.config import CheckpointConfig, ModelConfig
from skipjack.parallel.dims import ParallelDims


class Tier(Protocol):
    name: str
    notes: list[str]  # what its last restore did besides reading (for the log)

    def due(self, step: int) -> bool: ...
    def save(self, step: int, state: State) -> None: ...
    def newest(self) -> int | None: ...
    def where(self) -> str: ...
    def load(self, state: State) -> None: ...
    def before_update(self) -> None: ...
    def wait(self) -> None: ...
    def close(self) -> None: ...


class CheckpointManager:
    def __init__(self, tiers: list[Tier], group: dist.ProcessGroup, lead: bool):
        self.tiers, self.group, self.lead = tiers, group, lead
        self.restored_from: str | None = None  # where the restored state was (the tier says)
        self.restored_tier: str | None = None

    @classmethod
    def for_job(
        cls, cfg: CheckpointConfig, model: ModelConfig, dims: ParallelDims, lead: bool
    ) -> CheckpointManager:
        """The tiers `cfg` configures: memory snapshots first where on, then the persistent
        tier."""
        memory = [MemoryTier(cfg, dims)] if cfg.memory.interval > 0 else []
        tiers = [*memory, PersistentTier(cfg, model, dims, lead)]
        return cls(tiers, dims.group("checkpoint"), lead)

    def tier(self, name: str | None) -> Tier | None:
        return next((tier for tier in self.tiers if tier.name == name), None)

    def due(self, step: int) -> bool:
        return any(tier.due(step) for tier in self.tiers)

    def save(self, step: int, state: State) -> None:
        """Start the saves of `step` that are due (collective); call `before_update` before
        changing any parameter or optimizer state."""
        for tier in self.tiers:
            if tier.due(step):
                tier.save(step, state)

    def restore(self, state: State) -> int | None:
        """Fill `state` from the first tier holding a complete one; returns its step, or None
        (a fresh start) when no tier holds one. Raises CheckpointError when tiers held one but
        none could restore it (the state may be half filled)."""
        failed = []
        for tier in self.tiers:
            step = tier.newest()
            if step is None:
                continue
            problem = self._everywhere(tier, state)
            if problem is None:
                self.restored_from, self.restored_tier = tier.where(), tier.name
                return step
            failed.append(f"step {step} from the {tier.name} tier ({problem})")
            if self.lead:
                warnings.warn(f"skipjack: cannot restore {failed[-1]}", stacklevel=2)
        if failed:
            raise CheckpointError(f"no tier could restore its state: {'; '.join(failed)}")
        return None

    def _everywhere(self, tier: Tier, state: State) -> str | None:
        """Restore from `tier` on every rank; the first problem any rank had, or None."""
        try:
            tier.load(state)
            problem = None
        except (CheckpointError, RuntimeError, KeyError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        problems: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems, problem, group=self.group)
        return next((p for p in problems if p is not None), None)

    def before_update(self) -> None:
        for tier in self.tiers:
            tier.before_update()

    def wait(self) -> None:
        for tier in self.tiers:
            tier.wait()

    def settle(self) -> None:
        """Wait until every save in flight is complete, the memory tier's parity included (for
        fault injection: what a kill leaves behind does not depend on timing)."""
        self.wait()
        memory = self.tier("memory")
        if memory is not None:
            memory.settle()

    def close(self) -> None:
        """Finish every save in flight before any tier closes: their background threads use
        the same process group."""
        self.wait()
        for tier in self.tiers:
            tier.close()
