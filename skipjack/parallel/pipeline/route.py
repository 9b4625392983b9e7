"""SkipPipe's path scheduler: which nodes every microbatch of an iteration visits, and in what
order each node works (Blagoev et al. 2025, arXiv 2502.19913).

Nodes are allocated to stages (`allocate.py`); the nodes of a stage are data-parallel replicas
of its layers. Stage-0 nodes are data nodes: each injects its microbatches, runs the first
layers, and gets each microbatch back for the loss. A microbatch's path is its data node, then
`length - 1` of the other stages, each at one of its nodes: in stage order, except for at most
`max_swaps` swaps of two stages adjacent on the path (the later one goes first, the earlier one
moves back by one), and no stage twice; the backward retraces the path. Over an iteration every
non-first stage is visited equally often (within one), and no node holds more than `memory`
microbatches (from its forward to its backward) at once.

The scheduler plans microbatches one at a time (prioritised planning): each takes the path that
finishes its backward earliest given what the ones before it booked on every node, found by a
dynamic programme over (stages placed, largest stage, stage owed by a swap, swaps, last stage,
node) whose value is the earliest end of the forward there; a forward or backward goes into the
first gap of its node's timeline where it fits, so waiting behind another microbatch (a
collision) is part of the cost. A path that would break the memory rule forbids the node and the
search runs again, or the injection waits. The visit quota keeps the balance: a stage at its
quota is closed, and a stage that must take every remaining microbatch is forced. Several tries
(planning orders and quota tie-breaks) run, and the best makespan on the simulator wins, the
collision-unaware plan among them, so the result is never worse than that baseline.

Baselines: `collisions=False` chooses each path as if every node were free (the paper's
"SkipPipe without collision avoidance"), `random_paths` draws rule-abiding paths at random.
Every plan's per-node order is its booking order, which `simulate_paths` executes: a plan
finishes no later than it was booked.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import numpy as np

from skipjack.parallel.pipeline.network import Links

Path = tuple[int, ...]  # nodes, the data node first
Task = tuple[str, int, int]  # ("F" | "L" | "B", microbatch, hop)


@dataclass(frozen=True)
class Cluster:
    """The cost model: seconds of one microbatch's forward through each node's stage, backward
    `backward_factor` times that, the loss on the data node `loss_factor` times its forward, and
    seconds of one activation (or gradient) message between every two nodes."""

    stages: tuple[tuple[int, ...], ...]  # the nodes of every stage; stage 0: the data nodes
    forward: np.ndarray  # [nodes] seconds
    links: np.ndarray  # [nodes, nodes] seconds per message
    backward_factor: float = 1.5
    loss_factor: float = 0.25
    stage_of: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        stage_of = np.full(len(self.forward), -1)
        for s, nodes in enumerate(self.stages):
            stage_of[list(nodes)] = s
        if (stage_of < 0).any():
            raise ValueError(f"nodes {np.flatnonzero(stage_of < 0).tolist()} have no stage")
        object.__setattr__(self, "stage_of", stage_of)

    @classmethod
    def build(
        cls,
        stages: list[list[int]],
        links: Links,
        forward: float | list[float],
        message_bytes: float,
        overhead: float = 0.0,
    ) -> Cluster:
        """`forward`: seconds per microbatch forward of a stage (one number, or one per node);
        `overhead`: seconds added to every message (software, serialisation)."""
        nodes = links.nodes
        forward = np.broadcast_to(np.asarray(forward, dtype=float), (nodes,)).copy()
        matrix = links.matrix(message_bytes) + overhead
        np.fill_diagonal(matrix, 0.0)
        return cls(tuple(tuple(s) for s in stages), forward, matrix)

    def seconds(self, task: Task, node: int) -> float:
        factor = {"F": 1.0, "L": self.loss_factor, "B": self.backward_factor}[task[0]]
        return float(self.forward[node]) * factor


@dataclass(frozen=True)
class Rules:
    length: int  # stages a path visits, stage 0 included
    max_swaps: int = 0
    memory: int = 3  # microbatches a node holds at once
    microbatches: int = 1  # per data node


def path_length(stages: int, skip_ratio: float) -> int:
    """Stages a path visits when `skip_ratio` of all stages are skipped (stage 0 never is)."""
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip_ratio must be in [0, 1), not {skip_ratio}")
    return max(1, stages - round(stages * skip_ratio))


@dataclass
class Plan:
    paths: list[list[Path]]  # [data node][microbatch]
    orders: list[list[Task]]  # per node, the tasks in the order it runs them
    makespan: float  # on the simulator

    def flat(self) -> list[Path]:
        return [path for paths in self.paths for path in paths]


def task_tuples(path: Path, mb: int) -> list[tuple[int, Task]]:
    """(node, task) of a microbatch's path in dependency order."""
    out = [(node, ("F", mb, hop)) for hop, node in enumerate(path)]
    out.append((path[0], ("L", mb, len(path))))
    out += [(path[hop], ("B", mb, hop)) for hop in range(len(path) - 1, -1, -1)]
    return out


class _Timelines:
    """Every node's booked tasks, as sorted start and end times, and its held microbatches."""

    def __init__(self, nodes: int):
        self.starts: list[list[float]] = [[] for _ in range(nodes)]
        self.ends: list[list[float]] = [[] for _ in range(nodes)]
        self.tasks: list[list[Task]] = [[] for _ in range(nodes)]
        self.holds: list[list[tuple[float, float]]] = [[] for _ in range(nodes)]

    def gap(self, node: int, ready: float, seconds: float) -> float:
        """The earliest start at or after `ready` where `seconds` fit between booked tasks."""
        starts, ends = self.starts[node], self.ends[node]
        i = bisect.bisect_right(ends, ready)
        t = ready
        while i < len(starts) and starts[i] < t + seconds:
            t = max(t, ends[i])
            i += 1
        return t

    def book(self, node: int, start: float, seconds: float, task: Task) -> None:
        i = bisect.bisect_right(self.starts[node], start)
        self.starts[node].insert(i, start)
        self.ends[node].insert(i, start + seconds)
        self.tasks[node].insert(i, task)

    def crowded(self, node: int, begin: float, end: float, memory: int) -> bool:
        """Whether holding one more microbatch over [begin, end] exceeds `memory` at node."""
        inside = [(a, b) for a, b in self.holds[node] if a < end and b > begin]
        if len(inside) < memory:
            return False
        points = sorted([(max(a, begin), 1) for a, b in inside] + [(b, -1) for a, b in inside])
        held = most = 0
        for _, step in sorted(points, key=lambda p: (p[0], p[1])):
            held += step
            most = max(most, held)
        return most + 1 > memory


class _Planner:
    def __init__(self, cluster: Cluster, rules: Rules, rng: random.Random, mode: str):
        self.c, self.rules, self.rng, self.mode = cluster, rules, rng, mode
        self.aware = mode == "aware"
        self.time = _Timelines(len(cluster.forward))
        stages = len(cluster.stages)
        self.data = cluster.stages[0]
        total = len(self.data) * rules.microbatches * (rules.length - 1)
        quota, extra = divmod(total, max(stages - 1, 1))
        top = rng.sample(range(1, stages), extra) if stages > 1 else []
        self.left = [0] + [quota + (s in top) for s in range(1, stages)]  # visits still open
        self.remaining = len(self.data) * rules.microbatches

    def timeline(self, path: Path, mb: int, t0: float, aware: bool) -> list[tuple]:
        """(node, start, seconds, task) of every task of `mb` on `path` injected at `t0`."""
        c, out, end, prev = self.c, [], t0, path[0]
        for node, task in task_tuples(path, mb):
            seconds = c.seconds(task, node)
            ready = end + c.links[prev, node]
            start = self.time.gap(node, ready, seconds) if aware else ready
            out.append((node, start, seconds, task))
            end, prev = start + seconds, node
        return out

    def plan(self, d: int, mb: int, t0: float) -> tuple[Path, float]:
        forbidden: set[int] = set()
        while True:
            find = self._draw if self.mode == "random" else self._search
            path = find(d, t0, forbidden)
            if path is None:  # every way is crowded: inject when a hold there ends
                if not forbidden:
                    raise RuntimeError(f"no path for microbatch {mb} (a bug: report it)")
                t0, forbidden = self._release(forbidden, t0), set()
                continue
            tasks = self.timeline(path, mb, t0, True)
            begin = {n: s for n, s, _, (kind, _, _) in reversed(tasks) if kind == "F"}
            end = {n: s + x for n, s, x, (kind, _, _) in tasks if kind == "B"}
            crowded = [n for n in path if self.time.crowded(n, begin[n], end[n], self.rules.memory)]
            if not crowded:
                break
            if crowded[0] == d:  # its own data node is full: inject later
                t0, forbidden = self._release({d}, t0), set()
            else:
                forbidden.update(crowded)
        for node, start, seconds, task in tasks:
            self.time.book(node, start, seconds, task)
        for n in path:
            self.time.holds[n].append((begin[n], end[n]))
        for node in path[1:]:
            self.left[self.c.stage_of[node]] -= 1
        self.remaining -= 1
        return path, begin[d]

    def _release(self, nodes: set[int], t0: float) -> float:
        """The first time after `t0` that a microbatch held at `nodes` is let go."""
        return min((b for n in nodes for _, b in self.time.holds[n] if b > t0), default=t0)

    def _draw(self, d: int, t0: float, forbidden: set[int]) -> Path | None:
        """A rule-abiding path drawn at random (the random baseline)."""
        k, stages = self.rules.length - 1, len(self.c.stages)
        open_ = [n > 0 for n in self.left]
        must = [n == self.remaining and n > 0 for n in self.left]
        key, path = (0, 0, 0, 0), [d]
        for placed in range(k):
            key = self.rng.choice(self._moves(key, placed, k, open_, must, stages))
            nodes = [n for n in self.c.stages[key[3]] if n not in forbidden]
            if not nodes:
                return None
            path.append(self.rng.choice(nodes))
        return tuple(path)

    def _search(self, d: int, t0: float, forbidden: set[int]) -> Path | None:
        """The path of the next microbatch of data node `d`: among the few whose forward gets
        back to `d` earliest, the one whose backward ends earliest."""
        c, k, stages = self.c, self.rules.length - 1, len(self.c.stages)
        if k == 0:
            return (d,)
        gap = self.time.gap if self.aware else (lambda node, ready, seconds: ready)
        open_ = [n > 0 for n in self.left]
        must = [n == self.remaining and n > 0 for n in self.left]
        nodes_of = [np.array([d])] + [np.array(s) for s in c.stages[1:]]
        # per stages placed: (largest stage, owed stage or 0, swaps, last stage) ->
        # (forward end at every node of the last stage, (previous key, node index) of each)
        layers = [{(0, 0, 0, 0): (np.array([gap(d, t0, c.forward[d]) + c.forward[d]]), None)}]
        for placed in range(k):
            arrivals: dict = {}
            for key, (times, _) in layers[-1].items():
                for new in self._moves(key, placed, k, open_, must, stages):
                    here = nodes_of[new[3]]
                    arrive = times[:, None] + c.links[np.ix_(nodes_of[key[3]], here)]
                    best = arrive.argmin(0)
                    arrival = arrive[best, np.arange(len(here))]
                    back = [(key, int(b)) for b in best]
                    if new not in arrivals:
                        arrivals[new] = (arrival, back)
                        continue
                    old, old_back = arrivals[new]
                    for i in np.flatnonzero(arrival < old):
                        old[i], old_back[i] = arrival[i], back[i]
            layer = {}
            for key, (arrival, back) in arrivals.items():
                ends = np.full(len(arrival), np.inf)
                for i, node in enumerate(nodes_of[key[3]]):
                    if node not in forbidden and np.isfinite(arrival[i]):
                        seconds = c.forward[node]
                        ends[i] = gap(node, arrival[i], seconds) + seconds
                layer[key] = (ends, back)
            layers.append(layer)
        finals = sorted(
            (times[i] + c.links[nodes_of[key[3]][i], d], key, i)
            for key, (times, _) in layers[-1].items()
            if key[1] == 0 and not any(must[key[0] + 1 :])
            for i in range(len(times))
            if np.isfinite(times[i])
        )
        best, best_end = None, np.inf
        for _, key, i in finals[:8]:
            path = []
            for depth in range(k, 0, -1):
                path.append(int(nodes_of[key[3]][i]))
                key, i = layers[depth][key][1][i]
            path = (d, *reversed(path))
            _, start, seconds, _ = self.timeline(path, -1, t0, self.aware)[-1]
            if start + seconds < best_end:
                best, best_end = path, start + seconds
        return best

    def _moves(self, key, placed: int, k: int, open_: list[bool], must: list[bool], stages: int):
        """The states one more placed stage leads to: the owed stage of a swap; else a later
        open stage q (skipping no forced one), or q then an earlier open stage p (a swap)."""
        top, owed, swaps, _ = key
        if owed:
            return [(top, 0, swaps, owed)]
        out = []
        for q in range(top + 1, stages):
            if open_[q]:
                left, room, forced = k - placed - 1, sum(open_[q + 1 :]), sum(must[q + 1 :])
                if forced <= left <= room:
                    out.append((q, 0, swaps, q))
                if swaps < self.rules.max_swaps and forced <= left - 1 <= room:
                    out += [
                        (q, p, swaps + 1, q)
                        for p in range(top + 1, q)
                        if open_[p] and not any(must[top + 1 : p]) and not any(must[p + 1 : q])
                    ]
            if must[q]:
                break
        return out


def _plan(cluster: Cluster, rules: Rules, mode: str, seed: int, shuffle: bool) -> Plan:
    rng = random.Random(seed)
    planner = _Planner(cluster, rules, rng, mode)
    data = len(cluster.stages[0])
    paths: list[list[Path]] = [[] for _ in range(data)]
    injected = [0.0] * data  # a data node injects its microbatches in order
    for j in range(rules.microbatches):
        order = list(range(data))
        if shuffle:
            rng.shuffle(order)
        for d in order:
            mb = d * rules.microbatches + j
            path, injected[d] = planner.plan(cluster.stages[0][d], mb, injected[d])
            paths[d].append(path)
    orders = [list(tasks) for tasks in planner.time.tasks]
    return Plan(paths, orders, simulate_paths(cluster, paths, orders).makespan)


def schedule_paths(
    cluster: Cluster, rules: Rules, collisions: bool = True, tries: int = 8, seed: int = 0
) -> Plan:
    """The paths of one iteration with the smallest makespan found (see the module docstring);
    `collisions=False`: the collision-unaware baseline alone."""
    check_rules(cluster, rules)
    unaware = _plan(cluster, rules, "unaware", seed, shuffle=False)
    if not collisions:
        return unaware
    plans = [unaware] + [
        _plan(cluster, rules, "aware", seed + i, shuffle=i > 0) for i in range(max(tries, 1))
    ]
    return min(plans, key=lambda plan: plan.makespan)


def random_paths(cluster: Cluster, rules: Rules, seed: int = 0) -> Plan:
    """Rule-abiding paths drawn at random, each node working in booking order (the baseline)."""
    check_rules(cluster, rules)
    return _plan(cluster, rules, "random", seed, shuffle=True)


def check_rules(cluster: Cluster, rules: Rules) -> None:
    stages = len(cluster.stages)
    if not 1 <= rules.length <= stages:
        raise ValueError(f"a path visits 1 to {stages} stages, not {rules.length}")
    if rules.max_swaps < 0 or rules.memory < 1 or rules.microbatches < 1:
        raise ValueError(
            f"max_swaps >= 0, memory >= 1 and microbatches >= 1, not {rules.max_swaps}, "
            f"{rules.memory} and {rules.microbatches}"
        )


@dataclass
class Simulated:
    makespan: float
    finish: dict[Task, float]  # end time of every task
    peak: list[int]  # most microbatches every node held at once


def simulate_paths(
    cluster: Cluster, paths: list[list[Path]], orders: list[list[Task]]
) -> Simulated:
    """Run every node's tasks in its order, each as soon as its node is free and its input has
    arrived over the link (the loss after the last forward, back on the data node; a backward
    after the next hop's). Raises RuntimeError if the orders deadlock."""
    flat = [path for per_node in paths for path in per_node]
    previous: dict[Task, tuple[int, Task]] = {}  # task -> (node, task) it waits for
    for mb, path in enumerate(flat):
        chain = task_tuples(path, mb)
        for (node, task), (prev_node, prev_task) in zip(chain[1:], chain, strict=False):
            previous[task] = (prev_node, prev_task)
    nodes = len(cluster.forward)
    position, clock, held, peak = [0] * nodes, [0.0] * nodes, [0] * nodes, [0] * nodes
    finish: dict[Task, float] = {}
    remaining = sum(len(order) for order in orders)
    while remaining:
        best = None
        for node in range(nodes):
            if position[node] == len(orders[node]):
                continue
            task = orders[node][position[node]]
            ready = 0.0
            if task in previous:
                prev_node, prev_task = previous[task]
                if prev_task not in finish:
                    continue
                ready = finish[prev_task] + cluster.links[prev_node, node]
            start = max(ready, clock[node])
            if best is None or start < best[0]:
                best = (start, node, task)
        if best is None:
            waiting = [
                str(orders[n][position[n]]) for n in range(nodes) if position[n] < len(orders[n])
            ]
            raise RuntimeError(f"the node orders deadlock; next tasks: {', '.join(waiting)}")
        start, node, task = best
        clock[node] = finish[task] = start + cluster.seconds(task, node)
        position[node] += 1
        remaining -= 1
        kind, _, hop = task
        if kind == "F":
            held[node] += 1
            peak[node] = max(peak[node], held[node])
        elif kind == "B":
            held[node] -= 1
    return Simulated(max(clock), finish, peak)


def check_paths(cluster: Cluster, rules: Rules, plan: Plan) -> None:
    """Raises ValueError naming the first rule `plan` breaks (module docstring)."""
    stage_of, visits = cluster.stage_of, [0] * len(cluster.stages)
    for d, paths in enumerate(plan.paths):
        if len(paths) != rules.microbatches:
            raise ValueError(f"data node {d} has {len(paths)} paths, not {rules.microbatches}")
        for j, path in enumerate(paths):
            name = f"path {j} of data node {d} {path}"
            stages = [int(stage_of[n]) for n in path]
            if path[0] != cluster.stages[0][d]:
                raise ValueError(f"{name} does not start at its data node {cluster.stages[0][d]}")
            if len(path) != rules.length:
                raise ValueError(f"{name} visits {len(path)} stages, not {rules.length}")
            if len(set(stages)) != len(stages) or 0 in stages[1:]:
                raise ValueError(f"{name} visits a stage twice (stages {stages})")
            if _swaps(stages[1:]) > rules.max_swaps:
                raise ValueError(f"{name} reorders stages {stages} beyond {rules.max_swaps} swaps")
            for s in stages[1:]:
                visits[s] += 1
    if len(visits) > 1 and max(visits[1:]) - min(visits[1:]) > 1:
        raise ValueError(f"stages are visited unequally: {visits[1:]}")
    tasks = sorted(t for order in plan.orders for t in order)
    want = sorted(t for mb, p in enumerate(plan.flat()) for _, t in task_tuples(p, mb))
    if tasks != want:
        raise ValueError("the node orders do not hold every task of the paths once")
    peak = simulate_paths(cluster, plan.paths, plan.orders).peak
    if max(peak) > rules.memory:
        node = int(np.argmax(peak))
        raise ValueError(f"node {node} holds {peak[node]} microbatches, over memory {rules.memory}")


def _swaps(stages: list[int]) -> float:
    """Adjacent swaps that turn the sorted stages into `stages`; inf if none do."""
    ordered, swaps, i = sorted(stages), 0, 0
    while i < len(stages):
        if stages[i] == ordered[i]:
            i += 1
        elif i + 1 < len(stages) and stages[i : i + 2] == [ordered[i + 1], ordered[i]]:
            swaps, i = swaps + 1, i + 2
        else:
            return float("inf")
    return swaps
