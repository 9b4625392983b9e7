"""SkipPipe's paths as a model: the cluster's costs, the rules a path set obeys, and a
simulator of the nodes' orders (Blagoev et al. 2025, arXiv 2502.19913).

Nodes are allocated to stages (`allocate.py`); the nodes of a stage are data-parallel replicas
of its layers. Stage-0 nodes are data nodes: each injects its microbatches, runs the first
layers, and gets each microbatch back for the loss. A microbatch's path is its data node, then
`length - 1` of the other stages, each at one of its nodes: in stage order, except for at most
`max_swaps` swaps of two stages adjacent on the path (the later one goes first, the earlier one
moves back by one), and no stage twice; the backward retraces the path. Over an iteration every
non-first stage is visited equally often (within one), and no node holds more than `memory`
microbatches (from its forward to its backward) at once. `route.py` plans such paths.
"""

from __future__ import annotations

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
    starts: dict[Task, float] = field(default_factory=dict)  # of every task, on the simulator

    def flat(self) -> list[Path]:
        return [path for paths in self.paths for path in paths]


def task_tuples(path: Path, mb: int) -> list[tuple[int, Task]]:
    """(node, task) of a microbatch's path in dependency order."""
    out = [(node, ("F", mb, hop)) for hop, node in enumerate(path)]
    out.append((path[0], ("L", mb, len(path))))
    out += [(path[hop], ("B", mb, hop)) for hop in range(len(path) - 1, -1, -1)]
    return out


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
    starts: dict[Task, float]  # start time of every task
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
        for (_, task), (prev_node, prev_task) in zip(chain[1:], chain, strict=False):
            previous[task] = (prev_node, prev_task)
    nodes = len(cluster.forward)
    position, clock, held, peak = [0] * nodes, [0.0] * nodes, [0] * nodes, [0] * nodes
    finish: dict[Task, float] = {}
    starts: dict[Task, float] = {}
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
        starts[task] = start
        clock[node] = finish[task] = start + cluster.seconds(task, node)
        position[node] += 1
        remaining -= 1
        kind, _, hop = task
        if kind == "F":
            held[node] += 1
            peak[node] = max(peak[node], held[node])
        elif kind == "B":
            held[node] -= 1
    return Simulated(max(clock), starts, peak)


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
