"""Node-to-stage allocation for SkipPipe: which nodes hold which stage.

The objective is the one of SkipPipe's reference allocator (taken there from DT-FM, Yuan et al.
2022): the data-parallel cost, the slowest link between two nodes of one stage (the stage's
replicas synchronise over it), plus twice the pipeline cost, the cheapest closed tour through the
stages (from stage 0 and back, as a microbatch goes) where going from one stage to another costs
the bottleneck of the best matching between their nodes (the slowest link a set of disjoint
node-to-node hops must use). The tour also gives the stages their order.

The reference searches with a genetic algorithm and local search; here a steepest-descent local
search over node swaps between stages, from several random starts (and the order the nodes were
given), with the objective recomputed only for the two stages a swap touches. On the paper's
20-node geo setting it takes under a second.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np


@dataclass
class Allocation:
    stages: list[list[int]]  # nodes of every stage, in pipeline order; stage 0 first
    data_parallel: float  # slowest link inside a stage
    pipeline: float  # cost of the tour through the stages

    @property
    def objective(self) -> float:
        return self.data_parallel + 2 * self.pipeline


def bottleneck(cost: np.ndarray, a: list[int], b: list[int]) -> float:
    """The smallest t such that every node of the smaller group has its own partner in the
    other group over a link of cost at most t."""
    if len(a) > len(b):
        a, b = b, a
    sub = cost[np.ix_(a, b)]
    floor = sub.min(1).max()  # every node of the smaller group needs some partner
    rows = sub.tolist()
    for t in np.unique(sub[sub >= floor]).tolist():
        if _matches([[j for j, x in enumerate(row) if x <= t] for row in rows], len(b)):
            return t
    raise AssertionError("a complete bipartite graph always matches")


def _matches(allowed: list[list[int]], columns: int) -> bool:
    """Whether every row gets its own column among the allowed (Kuhn's augmenting paths)."""
    owner = [-1] * columns

    def augment(row: int, seen: set[int]) -> bool:
        for col in allowed[row]:
            if col not in seen:
                seen.add(col)
                if owner[col] < 0 or augment(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return all(augment(row, set()) for row in range(len(allowed)))


def tour(between: np.ndarray) -> tuple[float, list[int]]:
    """The cheapest closed tour through every stage from stage 0 (Held-Karp), and its order."""
    n = len(between)
    if n == 1:
        return 0.0, [0]
    best: dict[tuple[int, int], tuple[float, int]] = {
        (1 | 1 << j, j): (between[0, j], 0) for j in range(1, n)
    }
    for size in range(3, n + 1):
        for subset in itertools.combinations(range(1, n), size - 1):
            mask = 1 | sum(1 << j for j in subset)
            for j in subset:
                prev = mask ^ (1 << j)
                best[(mask, j)] = min(
                    (best[(prev, i)][0] + between[i, j], i) for i in subset if i != j
                )
    full = (1 << n) - 1
    cost, last = min((best[(full, j)][0] + between[j, 0], j) for j in range(1, n))
    order, mask = [], full
    while last != 0:
        order.append(last)
        mask, last = mask ^ (1 << last), best[(mask, last)][1]
    return float(cost), [0, *reversed(order)]


def allocate(cost: np.ndarray, sizes: list[int], restarts: int = 8, seed: int = 0) -> Allocation:
    """Stages of `sizes` nodes (stage 0 first: the data nodes) minimising the objective over
    `cost`, seconds per message between every two nodes (`route.Cluster.links`)."""
    nodes = len(cost)
    if sum(sizes) != nodes or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} must be positive and sum to the {nodes} nodes")
    rng = random.Random(seed)
    best = None
    for start in range(max(restarts, 1)):
        order = list(range(nodes))
        if start:
            rng.shuffle(order)
        groups, i = [], 0
        for size in sizes:
            groups.append(order[i : i + size])
            i += size
        found = _descend(cost, groups)
        if best is None or found.objective < best.objective:
            best = found
    return best


def _descend(cost: np.ndarray, groups: list[list[int]]) -> Allocation:
    """Swap nodes between stages while a swap lowers the objective (the first found)."""
    k = len(groups)
    inner = [_inner(cost, g) for g in groups]
    between = np.zeros((k, k))
    for a, b in itertools.combinations(range(k), 2):
        between[a, b] = between[b, a] = bottleneck(cost, groups[a], groups[b])
    current = max(inner) + 2 * tour(between)[0]
    while True:
        improved = False
        for a, b in itertools.combinations(range(k), 2):
            for i, j in itertools.product(range(len(groups[a])), range(len(groups[b]))):
                ga, gb = list(groups[a]), list(groups[b])
                ga[i], gb[j] = gb[j], ga[i]
                trial_inner = list(inner)
                trial_inner[a], trial_inner[b] = _inner(cost, ga), _inner(cost, gb)
                trial = between.copy()
                trial_groups = list(groups)
                trial_groups[a], trial_groups[b] = ga, gb
                for x in (a, b):
                    for y in range(k):
                        if y != x:
                            trial[x, y] = trial[y, x] = bottleneck(
                                cost, trial_groups[x], trial_groups[y]
                            )
                value = max(trial_inner) + 2 * tour(trial)[0]
                if value < current - 1e-12:
                    improved = True
                    current, groups, inner, between = value, trial_groups, trial_inner, trial
        if not improved:
            break
    pipeline, order = tour(between)
    return Allocation([sorted(groups[s]) for s in order], max(inner), pipeline)


def _inner(cost: np.ndarray, group: list[int]) -> float:
    return float(cost[np.ix_(group, group)].max()) if len(group) > 1 else 0.0
