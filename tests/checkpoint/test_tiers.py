"""The checkpoint manager as policy over tiers: a run resumes from the first tier holding a
complete state, falls back to the next when that tier has none or cannot restore it on some rank,
and says which tier it restored from. A tier in memory stands in for the snapshot tier."""

import copy

import torch
import torch.distributed as dist

from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.persistent import PersistentTier
from skipjack.checkpoint.sharded import CheckpointError
from skipjack.config import CheckpointConfig, OptimConfig, TrainConfig, TrainJobConfig
from skipjack.testing import run_ranks
from skipjack.testing.reference import build_run, tiny_config
from skipjack.trainer.trainer import train_step, training_state


class MemoryTier:
    """Copies of every part's state dict in this process; `broken` makes its restore fail."""

    name = "memory"

    def __init__(self, broken: bool = False):
        self.saved: tuple[int, dict] | None = None
        self.broken = broken

    def due(self, step: int) -> bool:
        return True

    def save(self, step, state) -> None:
        self.saved = (step, {part: copy.deepcopy(s.state_dict()) for part, s in state.items()})

    def newest(self) -> int | None:
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, None if self.saved is None else self.saved[0])
        return None if None in steps else min(steps)

    def where(self) -> str:
        return "in memory"

    def load(self, state) -> None:
        if self.broken:
            raise CheckpointError("snapshot lost")
        for part, s in state.items():
            fresh, saved = s.state_dict(), self.saved[1][part]
            for key, value in saved.items():
                if torch.is_tensor(value) and torch.is_tensor(fresh.get(key)):
                    fresh[key].copy_(value)
                else:
                    fresh[key] = value
            s.load_state_dict(fresh)

    def before_update(self) -> None: ...
    def wait(self) -> None: ...
    def close(self) -> None: ...


def job(root: str) -> TrainJobConfig:
    return TrainJobConfig(
        model=tiny_config(),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=6, global_batch_size=4, micro_batch_size=2, seq_len=16),
        checkpoint=CheckpointConfig(interval=2, dir=root, resume="auto"),
    )


def resume_from(root: str, memory: MemoryTier) -> tuple:
    """A fresh run with tiers [memory, persistent]: the step it restored, from which tier and
    where, and the loss of its next step."""
    cfg = job(root)
    dims, loader, engine = build_run(cfg, 0)
    state = training_state(engine, loader)
    persistent = PersistentTier(cfg.checkpoint, cfg.model, dims, dist.get_rank() == 0)
    manager = CheckpointManager([memory, persistent], dims.group("checkpoint"), True)
    step = manager.restore(state)
    loss = train_step(engine, loader, (step or 0) + 1).loss
    manager.close()
    return step, manager.restored_tier, manager.restored_from, loss


def tiers(root: str) -> dict:
    """Train 4 steps saving to memory (every step) and to disk (steps 2 and 4), then train
    step 5 straight on; resume with each kind of memory tier."""
    cfg = job(root)
    dims, loader, engine = build_run(cfg, 0)
    state = training_state(engine, loader)
    memory = MemoryTier()
    persistent = PersistentTier(cfg.checkpoint, cfg.model, dims, dist.get_rank() == 0)
    manager = CheckpointManager([memory, persistent], dims.group("checkpoint"), True)
    for step in range(1, 4):
        train_step(engine, loader, step, manager, state)
    manager.wait()
    straight = train_step(engine, loader, 4).loss
    manager.close()
    broken_on_one_rank = MemoryTier(broken=dist.get_rank() == 1)
    broken_on_one_rank.saved = memory.saved
    return {
        "straight": straight,
        "memory": resume_from(root, memory),
        "empty": resume_from(root, MemoryTier()),
        "broken": resume_from(root, broken_on_one_rank),
    }


def test_restore_from_the_first_complete_tier_and_fall_back(tmp_path):
    result = run_ranks(tiers, 2, str(tmp_path / "ckpt"))[0]
    # memory holds step 3 (every step), the persistent tier step 2
    assert result["memory"][:3] == (3, "memory", "in memory")
    assert result["memory"][3] == result["straight"]  # step 4 continues exactly
    for case in ("empty", "broken"):
        step, tier, where, _ = result[case]
        assert (step, tier) == (2, "persistent") and where.endswith("step-0000002")
