"""Run a schedule on a cost model, without processes: makespan, bubble, peak activations, and
deadlocks.

Each rank executes its actions in order; an action starts when its rank is free and its inputs
have arrived: a forward needs the forward of the previous stage on its microbatch's route, a
backward the backward of the next stage (and its own forward). Transfers between ranks take the
link's time. If no rank can start its next action and some are left, the schedule deadlocks and
the simulator says who waits for what.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from skipjack.parallel.pipeline.schedule import Action, Schedule


class Deadlock(RuntimeError):
    pass


@dataclass(frozen=True)
class CostModel:
    """Seconds per forward and backward of each stage, and per transfer between two ranks."""

    forward: list[float]
    backward: list[float]
    transfer: Callable[[int, int], float] = lambda src, dst: 0.0

    @staticmethod
    def uniform(
        stages: int, forward: float = 1.0, backward: float = 2.0, transfer: float = 0.0
    ) -> CostModel:
        return CostModel([forward] * stages, [backward] * stages, lambda s, d: transfer)


@dataclass
class SimulationResult:
    makespan: float
    busy: list[float]  # seconds each rank computed
    peak_activations: list[int]  # most (microbatch, chunk) forwards held at once, per rank
    finish: dict[tuple[int, str, int], float]  # (microbatch, kind, stage) -> end time

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all ranks' time: 1 - sum(busy) / (ranks x makespan)."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: Schedule, cost: CostModel) -> SimulationResult:
    schedule.check()
    pp = schedule.pp
    position = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    in_flight = [0] * pp
    peak = [0] * pp
    finish: dict[tuple[int, str, int], float] = {}

    def ready_time(rank: int, action: Action) -> float | None:
        """When the inputs of `action` are on `rank`, or None if they are not produced yet."""
        stage = schedule.stage(rank, action.chunk)
        route = schedule.routes[action.microbatch]
        hop = route.index(stage)
        if action.kind == "F":
            if hop == 0:
                return 0.0
            source = route[hop - 1]
            needed = (action.microbatch, "F", source)
        else:
            own = finish.get((action.microbatch, "F", stage))
            if own is None:
                return None
            if hop == len(route) - 1:
                return own
            source = route[hop + 1]
            needed = (action.microbatch, "B", source)
        done = finish.get(needed)
        if done is None:
            return None
        src_rank = schedule.owner(source)[0]
        return done + (cost.transfer(src_rank, rank) if src_rank != rank else 0.0)

    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        candidates = []
        for rank in range(pp):
            if position[rank] < len(schedule.actions[rank]):
                action = schedule.actions[rank][position[rank]]
                ready = ready_time(rank, action)
                if ready is not None:
                    candidates.append((max(ready, clock[rank]), rank, action))
        if not candidates:
            waiting = ", ".join(
                f"rank {r} at {schedule.actions[r][position[r]]}"
                for r in range(pp)
                if position[r] < len(schedule.actions[r])
            )
            raise Deadlock(f"{schedule.name}: deadlock, every rank waits: {waiting}")
        start, rank, action = min(candidates, key=lambda c: (c[0], c[1]))
        stage = schedule.stage(rank, action.chunk)
        seconds = (cost.forward if action.kind == "F" else cost.backward)[stage]
        clock[rank] = start + seconds
        busy[rank] += seconds
        finish[(action.microbatch, action.kind, stage)] = clock[rank]
        in_flight[rank] += 1 if action.kind == "F" else -1
        peak[rank] = max(peak[rank], in_flight[rank])
        position[rank] += 1
        remaining -= 1
    return SimulationResult(max(clock), busy, peak, finish)
