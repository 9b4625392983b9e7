"""Run a schedule on a cost model, without processes: makespan, bubble, peak activations, and
deadlocks.

Each rank (node, when routes cross replicas) executes its actions in order; an action starts
when its rank is free and its inputs have arrived: a forward needs the forward of the previous
place on its microbatch's route, a backward the backward of the next place (and its own
forward). Transfers between ranks take the link's time; costs are per stage (a place's stage).
Vocabulary passes (`vocab.py`) start collectives without waiting for the other
ranks; what needs a collective's result waits until every rank has run the pass: the first
stage's forward waits for E, R for S, and the last stage's backward for R; S waits for the last
stage's forward (whose output it receives) and G for the first stage's backward. If no rank can
start its next action and some are left, the schedule deadlocks and the simulator says who waits
for what. Whether a schedule deadlocks depends on the order of its actions only, not the costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from skipjack.parallel.pipeline.schedule import VOCAB_PASSES, Action, Schedule


class Deadlock(RuntimeError):
    pass


@dataclass(frozen=True)
class CostModel:
    """Seconds per forward and backward of each stage, per transfer between two ranks, and per
    vocabulary pass ("E", "S", "T", "G") on every rank."""

    forward: list[float]
    backward: list[float]
    transfer: Callable[[int, int], float] = lambda src, dst: 0.0
    vocab: dict[str, float] = field(default_factory=dict)

    def seconds(self, action: Action, stage: int) -> float:
        if action.kind == "F":
            return self.forward[stage]
        if action.kind == "B":
            return self.backward[stage]
        return self.vocab.get(action.kind, 0.0)

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
    starts: list[list[float]]  # per rank, when each of its actions started, in list order

    @property
    def bubble_ratio(self) -> float:
        """Idle share of all ranks' time: 1 - sum(busy) / (ranks x makespan)."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: Schedule, cost: CostModel, partial: bool = False) -> SimulationResult:
    """`partial`: the schedule is being built (vocab.insert_vocab_passes): skip the completeness
    check, and vocabulary passes not placed yet are not waited for."""
    if not partial:
        schedule.check()
    placed = {(a.kind, a.microbatch) for actions in schedule.actions for a in actions}
    pp = schedule.nodes
    position = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    in_flight = [0] * pp
    peak = [0] * pp
    finish: dict[tuple[int, str, int], float] = {}  # vocabulary passes finish at stage -1
    starts: list[list[float]] = [[] for _ in range(pp)]
    ran: dict[tuple[int, str], list[float]] = {}  # (microbatch, vocabulary pass) -> ends so far

    def after(*keys: tuple[int, str, int]) -> float | None:
        times = [finish.get(key) for key in keys]
        return None if None in times else max(times, default=0.0)

    def everywhere(kind: str, mb: int) -> list[tuple[int, str, int]]:
        """Wait for every rank's `kind` pass of `mb`, if the schedule has one."""
        return [(mb, kind, -1)] if (kind, mb) in placed else []

    def ready_time(rank: int, action: Action) -> float | None:
        """When the inputs of `action` are on `rank`, or None if they are not produced yet."""
        mb, route = action.microbatch, schedule.routes[action.microbatch]
        if action.kind in VOCAB_PASSES:
            needs = {
                "S": [(mb, "F", route[-1])],
                "R": everywhere("S", mb),
                "G": [(mb, "B", route[0])],
            }.get(action.kind, [])
            return after(*needs)
        stage = schedule.place(rank, action.chunk)
        hop = route.index(stage)
        if action.kind == "F":
            if hop == 0:
                return after(*everywhere("E", mb))
            source = route[hop - 1]
            needed = (mb, "F", source)
        else:
            if hop == len(route) - 1:
                return after((mb, "F", stage), *everywhere("R", mb))
            if (mb, "F", stage) not in finish:
                return None
            source = route[hop + 1]
            needed = (mb, "B", source)
        done = finish.get(needed)
        if done is None:
            return None
        src_rank = schedule.owner(source)[0]
        return done + (cost.transfer(src_rank, rank) if src_rank != rank else 0.0)

    def current(rank: int) -> Action | None:
        actions = schedule.actions[rank]
        return actions[position[rank]] if position[rank] < len(actions) else None

    remaining = sum(len(a) for a in schedule.actions)
    known: list[float | None] = [None] * pp  # ready time of each rank's next action, once known
    while remaining:
        candidates = []
        for rank in range(pp):
            action = current(rank)
            if known[rank] is None and action is not None:
                known[rank] = ready_time(rank, action)
            if known[rank] is not None:
                candidates.append((max(known[rank], clock[rank]), rank, action))
        if not candidates:
            waiting = ", ".join(f"rank {r} at {current(r)}" for r in range(pp) if current(r))
            raise Deadlock(f"{schedule.name}: deadlock, every rank waits: {waiting}")
        start, rank, action = min(candidates, key=lambda c: (c[0], c[1]))
        vocab = action.kind in VOCAB_PASSES
        stage = -1 if vocab else schedule.place(rank, action.chunk)
        seconds = cost.seconds(action, stage % schedule.num_stages)
        starts[rank].append(start)
        clock[rank] = start + seconds
        busy[rank] += seconds
        position[rank] += 1
        known[rank] = None
        remaining -= 1
        if vocab:  # done once every rank has run it
            ends = ran.setdefault((action.microbatch, action.kind), [])
            ends.append(clock[rank])
            if len(ends) == pp:
                finish[(action.microbatch, action.kind, -1)] = max(ends)
        else:
            finish[(action.microbatch, action.kind, stage)] = clock[rank]
            in_flight[rank] += 1 if action.kind == "F" else -1
            peak[rank] = max(peak[rank], in_flight[rank])
    return SimulationResult(max(clock), busy, peak, finish, starts)
