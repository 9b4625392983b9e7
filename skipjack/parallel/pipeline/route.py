"""SkipPipe's path scheduler: which nodes every microbatch of an iteration visits, and in what
order each node works (Blagoev et al. 2025, arXiv 2502.19913).

The rules a path set obeys and the cost model are in `paths.py`.

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

import numpy as np

from skipjack.parallel.pipeline.paths import (
    Cluster,
    Path,
    Plan,
    Rules,
    Task,
    check_rules,
    simulate_paths,
    task_tuples,
)


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
            find = {"random": self._draw, "pipelines": self._pipeline}.get(self.mode, self._search)
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

    def _pipeline(self, d: int, t0: float, forbidden: set[int]) -> Path | None:
        """Data node number i's own whole pipeline: node i mod size of every stage."""
        i = self.c.stages[0].index(d)
        path = (d, *(nodes[i % len(nodes)] for nodes in self.c.stages[1:]))
        return None if forbidden & set(path) else path

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
    simulated = simulate_paths(cluster, paths, orders)
    return Plan(paths, orders, simulated.makespan, simulated.starts)


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


def fixed_pipelines(cluster: Cluster, rules: Rules) -> Plan:
    """The full-pipeline baseline of DT-FM: every microbatch of data node number i through node
    i mod size of every stage, in order (`rules.length` must be every stage)."""
    check_rules(cluster, rules)
    if rules.length != len(cluster.stages) or rules.max_swaps:
        raise ValueError("fixed pipelines visit every stage in order")
    return _plan(cluster, rules, "pipelines", 0, shuffle=False)


def random_paths(cluster: Cluster, rules: Rules, seed: int = 0) -> Plan:
    """Rule-abiding paths drawn at random, each node working in booking order (the baseline)."""
    check_rules(cluster, rules)
    return _plan(cluster, rules, "random", seed, shuffle=True)
