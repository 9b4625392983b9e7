"""Pipeline schedules as data: for every pipeline rank, the ordered list of its actions.

An `Action` is the forward or backward of one microbatch on one model chunk of a node. A
`Schedule` holds the per-node lists, the number of model chunks per node (vpp) and the routes:
for each microbatch, the ordered places it visits (a full pipeline visits every stage in order).
Stage s lives on pipeline rank s % pp as its chunk s // pp (Megatron's interleaved assignment;
with vpp=1 stage s is rank s). A schedule of one replica has one node per pipeline rank and its
places are its stages; a schedule over `replicas` data-parallel replicas (routes that cross them)
has node replica x pp + rank and place replica x stages + stage. Schedules can be checked and
simulated without processes (`simulate.py`); the runtime executes them.

With `head` (SkipPipe, `skippipe.py`) the output layer and the loss are a place of their own,
stage pp after the last layers' stage pp - 1, held by pipeline rank 0 as its second model chunk:
the data node that embedded a microbatch also takes its loss, as in the SkipPipe paper, so a
route may skip any stage but the first.

Under vocabulary parallelism (`vocab.py`) every rank also runs five passes per microbatch: E
(input embedding of its vocabulary shard), S (its logits and softmax statistics), R (the combined
statistics: loss and input gradient), T (its output weight gradient) and G (its embedding weight
gradient). All but T start collectives over the pipeline ranks, so every rank runs them in one
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# directions of point-to-point messages: activations, gradients, and the micro-batch itself
# (sent along with the activation to a node of another replica, which has not loaded it)
FORWARD, BACKWARD, BATCH = 0, 1, 2
DIRECTIONS = 3
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


class Message(NamedTuple):
    """An activation (FORWARD) or a gradient (BACKWARD) of `microbatch` for `place`."""

    microbatch: int
    place: int
    direction: int


@dataclass
class Schedule:
    name: str
    pp: int
    microbatches: int
    actions: list[list[Action]]  # per node
    vpp: int = 1
    routes: list[list[int]] = field(default_factory=list)  # per microbatch, the places in order
    vocab_passes: bool = False  # the vocabulary passes of every microbatch on every rank
    replicas: int = 1
    head: bool = False  # the output layer and loss a place of their own on rank 0 (vpp=1)

    def __post_init__(self) -> None:
        if self.head and self.vpp != 1:
            raise ValueError("a head place on the data node needs vpp=1")
        if not self.routes:
            self.routes = [list(range(self.num_stages))] * self.microbatches

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp + self.head

    def chunks(self, rank: int) -> int:
        """How many model chunks pipeline rank `rank` holds."""
        return self.vpp + (self.head and rank == 0)

    @property
    def nodes(self) -> int:
        return self.replicas * self.pp

    def owner(self, place: int) -> tuple[int, int]:
        """(node, chunk) holding `place`."""
        replica, stage = divmod(place, self.num_stages)
        return replica * self.pp + stage % self.pp, stage // self.pp

    def place(self, node: int, chunk: int) -> int:
        """The place `node` holds as its model chunk `chunk` (with one replica: the stage)."""
        replica, rank = divmod(node, self.pp)
        return replica * self.num_stages + chunk * self.pp + rank

    def messages(self) -> list[list[tuple[int, Message, bool]]]:
        """What each node sends and receives, in the order its actions do: (peer node,
        message, True for a send). Forward and backward hand their tensors on where the route
        goes on; a handoff between two chunks of one node is no message."""
        owners = [[self.owner(place)[0] for place in route] for route in self.routes]
        hops = [{place: hop for hop, place in enumerate(route)} for route in self.routes]
        every = []
        for node, actions in enumerate(self.actions):
            out = []
            for action in actions:
                forward = action.kind == "F"
                if not forward and action.kind != "B":
                    continue
                mb = action.microbatch
                route, where = self.routes[mb], owners[mb]
                hop = hops[mb][self.place(node, action.chunk)]
                source, target = (hop - 1, hop + 1) if forward else (hop + 1, hop - 1)
                direction = FORWARD if forward else BACKWARD
                if 0 <= source < len(route) and where[source] != node:
                    out.append((where[source], Message(mb, route[hop], direction), False))
                if 0 <= target < len(route) and where[target] != node:
                    out.append((where[target], Message(mb, route[target], direction), True))
            every.append(out)
        return every

    def check(self) -> None:
        """Every microbatch's forward and backward at every place of its route, once, on the
        node that owns the place; the collective vocabulary passes in one order on every rank;
        and on every (sender, receiver) pair the messages received in the order they are sent,
        since NCCL matches point-to-point messages by order, not by tag. Raises ValueError
        naming the first problem."""
        expected = set()  # (rank, kind, microbatch, chunk): tuples hash faster than actions
        for mb, route in enumerate(self.routes):
            for place in route:
                node, chunk = self.owner(place)
                expected |= {(node, "F", mb, chunk), (node, "B", mb, chunk)}
            if self.vocab_passes:
                expected |= {(r, k, mb, 0) for r in range(self.nodes) for k in VOCAB_PASSES}
        seen = set()
        for rank, actions in enumerate(self.actions):
            for action in actions:
                key = (rank, action.kind, action.microbatch, action.chunk)
                if key in seen:
                    raise ValueError(f"{self.name}: rank {rank} runs {action} twice")
                if key not in expected:
                    raise ValueError(f"{self.name}: rank {rank} runs {action}, not on any route")
                seen.add(key)
        missing = expected - seen
        if missing:
            rank, kind, mb, chunk = min(missing, key=lambda k: (k[0], k[2], k[1], k[3]))
            raise ValueError(f"{self.name}: rank {rank} never runs {Action(kind, mb, chunk)}")
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
        sent: dict[tuple[int, int], list[Message]] = {}
        received: dict[tuple[int, int], list[Message]] = {}
        for node, messages in enumerate(self.messages()):
            for peer, message, send in messages:
                pair = (node, peer) if send else (peer, node)
                (sent if send else received).setdefault(pair, []).append(message)
        for pair in sorted(sent.keys() | received.keys()):
            out, into = sent.get(pair, []), received.get(pair, [])
            if out != into:
                first = next(
                    (i for i, (a, b) in enumerate(zip(out, into, strict=False)) if a != b),
                    min(len(out), len(into)),
                )
                raise ValueError(
                    f"{self.name}: node {pair[0]} sends node {pair[1]} "
                    f"{out[first] if first < len(out) else 'nothing more'} where it receives "
                    f"{into[first] if first < len(into) else 'nothing more'}: messages between "
                    "two nodes must be received in the order they are sent"
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


def schedule_from_routes(
    pp: int,
    routes: list[list[int]],
    vpp: int = 1,
    replicas: int = 1,
    in_flight: int | None = None,
    head: bool = False,
    priority: list[list[tuple[float, float]]] | None = None,
) -> Schedule:
    """A schedule for any routes (partial: stages skipped; reordered: stages out of order;
    across replicas: hops on other replicas' nodes; every microbatch its own), as places (see
    the module docstring). Every route starts at stage 0 of a replica and ends at the last stage
    of one (embedding and loss).

    Built by running the routes: in rounds, every node takes one action whose input has arrived,
    a backward before a forward, the oldest microbatch first (or, with `priority`, per
    microbatch and hop the times a planner meant its forward and backward to start: the
    earliest first), and no forward of another
    microbatch while it holds `in_flight` microbatches awaiting a backward (a microbatch held by
    two chunks of a node, as with the head place, counts once). A node takes a message's
    consumer only when that message is the oldest one unconsumed from its sender, so every pair
    of nodes receives in the order it sends (NCCL needs that), and the order the run found is
    one the ranks can follow: deadlock-free by construction, checked, and simulated in the
    tests. Without `in_flight` the limit starts at the number of stages and doubles until the
    routes fit; with one that the routes cannot meet, ValueError names the node. `head`: see
    the module docstring."""
    stages = pp * vpp + head
    for mb, route in enumerate(routes):
        if (
            not route
            or route[0] % stages != 0
            or route[-1] % stages != stages - 1
            or len(set(route)) != len(route)
            or not all(0 <= place < replicas * stages for place in route)
        ):
            raise ValueError(
                f"microbatch {mb} visits {route}: a route starts at stage 0, ends at stage "
                f"{stages - 1} and visits no place twice (places: replica x {stages} + stage, "
                f"{replicas} replica(s))"
            )
    shape = Schedule(
        "routes", pp, len(routes), [], vpp=vpp, routes=routes, replicas=replicas, head=head
    )
    limit = in_flight or stages
    while True:
        actions, stuck = _run_routes(shape, limit, priority)
        if actions is not None:
            break
        if in_flight is not None or limit >= len(routes):
            raise ValueError(
                f"the routes need more than {limit} microbatches in flight at node {stuck}; "
                "raise the in-flight limit or change the routes"
            )
        limit *= 2
    schedule = Schedule(
        "routes", pp, len(routes), actions, vpp=vpp, routes=routes, replicas=replicas, head=head
    )
    schedule.check()
    return schedule


def _run_routes(
    shape: Schedule, limit: int, priority: list[list[tuple[float, float]]] | None = None
) -> tuple[list[list[Action]] | None, int]:
    """The action lists of `schedule_from_routes` under an in-flight limit, or (None, a node
    that cannot go on)."""
    routes, nodes = shape.routes, shape.nodes
    owner = [[shape.owner(place) for place in route] for route in routes]
    actions: list[list[Action]] = [[] for _ in range(nodes)]
    ready: list[set[tuple[int, int, int]]] = [set() for _ in range(nodes)]  # (B first, mb, hop)
    queues: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # pair -> consumers, in order
    heads: dict[tuple[int, int], int] = {}
    held: list[dict[int, int]] = [{} for _ in range(nodes)]  # mb -> its chunks' forwards
    remaining = 2 * sum(len(route) for route in routes)
    for mb in range(len(routes)):
        ready[owner[mb][0][0]].add((1, mb, 0))

    def order(key: tuple[int, int, int]) -> tuple:
        """Backward (0) before forward (1), oldest first; or the planner's time first."""
        if priority is None:
            return key
        return (priority[key[1]][key[2]][1 - key[0]], *key)

    keys = {  # every action's key -> its node, ordered as the priority says
        (order(k), k): owner[k[1]][k[2]][0]
        for mb, route in enumerate(routes)
        for hop in range(len(route))
        for k in ((0, mb, hop), (1, mb, hop))
    }

    def source(key: tuple[int, int, int]) -> int | None:
        """The node that sends `key`'s input, if another node does."""
        backward, mb, hop = key[0] == 0, key[1], key[2]
        previous = hop + 1 if backward else hop - 1
        if not 0 <= previous < len(routes[mb]) or (backward and hop == len(routes[mb]) - 1):
            return None
        node = owner[mb][hop][0]
        return owner[mb][previous][0] if owner[mb][previous][0] != node else None

    # with a priority, each node keeps to its planned order; in a round where no node can (pair
    # order or the in-flight limit stand in the way) the earliest planned ready action runs alone
    planned = [sorted(k for k, n in keys.items() if n == node) for node in range(nodes)]
    position = [0] * nodes
    taken: set[tuple[int, int, int]] = set()

    def choose(node: int, strict: bool) -> tuple[int, int, int] | None:
        if strict:
            while position[node] < len(planned[node]) and planned[node][position[node]][1] in taken:
                position[node] += 1
            if position[node] == len(planned[node]):
                return None
            candidates = [planned[node][position[node]][1]]
            candidates = [k for k in candidates if k in ready[node]]
        else:
            candidates = sorted(ready[node], key=order)
        for key in candidates:
            if key[0] == 1 and key[1] not in held[node] and len(held[node]) >= limit:
                continue
            src = source(key)
            if src is not None and queues[(src, node)][heads[(src, node)]] != key:
                continue
            return key
        return None

    while remaining:
        for strict in (True, False) if priority is not None else (False,):
            choices = [(node, choose(node, strict)) for node in range(nodes)]
            choices = [(node, key) for node, key in choices if key is not None]
            if choices:
                break
        if priority is not None and not strict:  # off the plan: the earliest planned one alone
            choices = [min(choices, key=lambda choice: order(choice[1]))] if choices else []
        if not choices:
            full = [n for n in range(nodes) if len(held[n]) >= limit]
            return None, full[0] if full else 0
        arrivals = []
        for node, choice in choices:
            ready[node].remove(choice)
            taken.add(choice)
            src = source(choice)
            if src is not None:
                heads[(src, node)] += 1
            backward, mb, hop = choice[0] == 0, choice[1], choice[2]
            actions[node].append(Action("B" if backward else "F", mb, owner[mb][hop][1]))
            count = held[node].get(mb, 0) + (-1 if backward else 1)
            if count:
                held[node][mb] = count
            else:
                del held[node][mb]
            remaining -= 1
            last = len(routes[mb]) - 1
            if backward:
                follow = (0, mb, hop - 1) if hop > 0 else None
                dst = owner[mb][hop - 1][0] if hop > 0 else node
            elif hop < last:
                follow, dst = (1, mb, hop + 1), owner[mb][hop + 1][0]
            else:
                follow, dst = (0, mb, hop), node
            if follow is not None:
                arrivals.append((node, dst, follow))
        for src, dst, key in arrivals:  # visible from the next round on
            ready[dst].add(key)
            if src != dst:
                queues.setdefault((src, dst), []).append(key)
                heads.setdefault((src, dst), 0)
    return actions, -1


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
