"""Pipeline schedules as data: for every pipeline rank, the ordered list of its actions.

An `Action` is the forward or backward of one microbatch on one model chunk of the rank. A
`Schedule` holds the per-rank lists, the number of model chunks per rank (vpp) and the routes:
for each microbatch, the ordered stages it visits (a full pipeline visits every stage in order).
Stage s lives on rank s % pp as its chunk s // pp (Megatron's interleaved assignment; with vpp=1
stage s is rank s). Schedules can be checked and simulated without processes (`simulate.py`);
the runtime executes them.

Under vocabulary parallelism (`vocab.py`) every rank also runs five passes per microbatch: E
(input embedding of its vocabulary shard), S (its logits and softmax statistics), R (the combined
statistics: loss and input gradient), T (its output weight gradient) and G (its embedding weight
gradient). All but T start collectives over the pipeline ranks, so every rank runs them in one
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VOCAB_PASSES = ("E", "S", "R", "T", "G")
COLLECTIVE_PASSES = ("E", "S", "R", "G")


@dataclass(frozen=True)
class Action:
    kind: str  # "F" forward, "B" backward, or a vocabulary pass (VOCAB_PASSES)
    microbatch: int
    chunk: int = 0

    @property
    def collective(self) -> bool:
        """A vocabulary pass that starts a collective: every rank runs these in one order."""
        return self.kind in COLLECTIVE_PASSES

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass
class Schedule:
    name: str
    pp: int
    microbatches: int
    actions: list[list[Action]]
    vpp: int = 1
    routes: list[list[int]] = field(default_factory=list)
    vocab_passes: bool = False  # the vocabulary passes of every microbatch on every rank

    def __post_init__(self) -> None:
        if not self.routes:
            self.routes = [list(range(self.num_stages))] * self.microbatches

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def owner(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding `stage`."""
        return stage % self.pp, stage // self.pp

    def stage(self, rank: int, chunk: int) -> int:
        return chunk * self.pp + rank

    def check(self) -> None:
        """Every microbatch's forward and backward at every stage of its route, once, on the
        rank that owns the stage. Raises ValueError naming the first problem."""
        expected = set()
        for mb, route in enumerate(self.routes):
            for stage in route:
                rank, chunk = self.owner(stage)
                expected |= {(rank, Action("F", mb, chunk)), (rank, Action("B", mb, chunk))}
            if self.vocab_passes:
                expected |= {(r, Action(k, mb)) for r in range(self.pp) for k in VOCAB_PASSES}
        seen = set()
        for rank, actions in enumerate(self.actions):
            for action in actions:
                key = (rank, action)
                if key in seen:
                    raise ValueError(f"{self.name}: rank {rank} runs {action} twice")
                if key not in expected:
                    raise ValueError(f"{self.name}: rank {rank} runs {action}, not on any route")
                seen.add(key)
        missing = expected - seen
        if missing:
            rank, action = min(missing, key=lambda k: (k[0], str(k[1])))
            raise ValueError(f"{self.name}: rank {rank} never runs {action}")
        orders = [[a for a in actions if a.collective] for actions in self.actions]
        for rank, order in enumerate(orders):
            if order != orders[0]:
                first = next(
                    i for i, (a, b) in enumerate(zip(order, orders[0], strict=False)) if a != b
                )
                raise ValueError(
                    f"{self.name}: collective vocabulary passes out of order: rank {rank} runs "
                    f"{order[first]} where rank 0 runs {orders[0][first]}"
                )


def gpipe(pp: int, microbatches: int) -> Schedule:
    """All forwards, then all backwards (Huang et al. 2019): peak activations m per rank."""
    actions = [
        [Action("F", mb) for mb in range(microbatches)]
        + [Action("B", mb) for mb in range(microbatches)]
        for _ in range(pp)
    ]
    return Schedule("gpipe", pp, microbatches, actions)


def one_f_one_b(pp: int, microbatches: int, extra_warmup: int = 0) -> Schedule:
    """PipeDream-flush 1F1B (Narayanan et al. 2021): rank r warms up with pp - r - 1 forwards,
    then alternates one forward and one backward, then drains: at most pp - r in flight.
    `extra_warmup` more forwards per rank give slack for the vocabulary passes (vocab.py)."""
    actions = []
    for rank in range(pp):
        warmup = min(pp - rank - 1 + extra_warmup, microbatches)
        ops = [Action("F", mb) for mb in range(warmup)]
        for i in range(microbatches - warmup):
            ops += [Action("F", warmup + i), Action("B", i)]
        ops += [Action("B", mb) for mb in range(microbatches - warmup, microbatches)]
        actions.append(ops)
    return Schedule("1f1b", pp, microbatches, actions)


def interleaved_1f1b(pp: int, microbatches: int, vpp: int, extra_warmup: int = 0) -> Schedule:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021, section 2.2): vpp model chunks per
    rank, microbatches taken in groups of pp through chunk 0, then chunk 1, ...; the bubble
    shrinks by vpp. Needs microbatches to be a multiple of pp."""
    if microbatches % pp:
        raise ValueError(
            f"interleaved 1F1B needs microbatches ({microbatches}) divisible by pp ({pp})"
        )
    total = microbatches * vpp

    def virtual(k: int, backward: bool) -> Action:
        group, within = divmod(k, pp * vpp)
        chunk = within // pp
        if backward:
            chunk = vpp - 1 - chunk
        return Action("B" if backward else "F", group * pp + within % pp, chunk)

    actions = []
    for rank in range(pp):
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp + extra_warmup, total)
        ops = [virtual(k, False) for k in range(warmup)]
        for i in range(total - warmup):
            ops += [virtual(warmup + i, False), virtual(i, True)]
        ops += [virtual(k, True) for k in range(total - warmup, total)]
        actions.append(ops)
    return Schedule("interleaved_1f1b", pp, microbatches, actions, vpp=vpp)


def schedule_from_routes(pp: int, routes: list[list[int]], vpp: int = 1) -> Schedule:
    """A schedule for any routes within one replica (partial: some stages skipped; reordered:
    stages out of order; every microbatch its own): each rank runs the forwards of the hops it
    owns in (microbatch, hop) order, then their backwards in (microbatch, reversed hop) order,
    GPipe-style. A rank then sends to and receives from each neighbour in the same order on
    both ends, and no rank waits on one that waits on it (checked by the simulator in the
    tests). Routes must start at stage 0 and end at the last stage (embedding and loss)."""
    last = pp * vpp - 1
    for mb, route in enumerate(routes):
        if not route or route[0] != 0 or route[-1] != last or len(set(route)) != len(route):
            raise ValueError(
                f"microbatch {mb} visits {route}: a route starts at stage 0, ends at stage "
                f"{last} and visits no stage twice"
            )
    actions: list[list[Action]] = [[] for _ in range(pp)]
    for kind in "FB":
        for mb, route in enumerate(routes):
            for stage in route if kind == "F" else route[::-1]:
                actions[stage % pp].append(Action(kind, mb, stage // pp))
    schedule = Schedule("routes", pp, len(routes), actions, vpp=vpp, routes=routes)
    schedule.check()
    return schedule


def build_schedule(
    name: str, pp: int, microbatches: int, vpp: int = 1, extra_warmup: int = 0
) -> Schedule:
    if name == "gpipe":
        schedule = gpipe(pp, microbatches)
    elif name == "1f1b":
        schedule = one_f_one_b(pp, microbatches, extra_warmup)
    elif name == "interleaved_1f1b":
        schedule = interleaved_1f1b(pp, microbatches, vpp, extra_warmup)
    else:
        raise ValueError(f"unknown schedule {name!r}; use gpipe, 1f1b or interleaved_1f1b")
    if vpp != schedule.vpp:
        raise ValueError(f"schedule {name!r} runs one model chunk per rank; set vpp=1")
    schedule.check()
    return schedule
