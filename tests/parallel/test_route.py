import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.config import ConfigError
from skipjack.parallel.pipeline.allocate import allocate, bottleneck, tour
from skipjack.parallel.pipeline.network import load_links
from skipjack.parallel.pipeline.paths import (
    Cluster,
    Plan,
    Rules,
    check_paths,
    path_length,
    simulate_paths,
    task_tuples,
)
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.route import fixed_pipelines, random_paths, schedule_paths
from skipjack.parallel.pipeline.schedule import schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.parallel.pipeline.skippipe import job_cluster, priority_of, routes_of


def cluster_of(sizes, seed, forward=1.0):
    rng = np.random.default_rng(seed)
    nodes = sum(sizes)
    links = rng.uniform(0.0, 2.0, (nodes, nodes))
    links = (links + links.T) / 2
    np.fill_diagonal(links, 0.0)
    stages, i = [], 0
    for size in sizes:
        stages.append(tuple(range(i, i + size)))
        i += size
    return Cluster(tuple(stages), rng.uniform(0.5, 1.5, nodes) * forward, links)


@settings(max_examples=40, deadline=None)
@given(
    data=st.integers(1, 4),
    others=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    skip=st.floats(0.0, 0.7),
    swaps=st.integers(0, 2),
    memory=st.integers(1, 3),
    microbatches=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_every_plan_obeys_every_rule_and_beats_the_unaware_baseline(
    data, others, skip, swaps, memory, microbatches, seed
):
    cluster = cluster_of([data, *others], seed)
    rules = Rules(path_length(len(others) + 1, skip), swaps, memory, microbatches)
    unaware = schedule_paths(cluster, rules, collisions=False, seed=seed)
    planned = schedule_paths(cluster, rules, tries=2, seed=seed)
    for plan in (unaware, planned, random_paths(cluster, rules, seed=seed)):
        check_paths(cluster, rules, plan)
    assert planned.makespan <= unaware.makespan
    whole = Rules(len(others) + 1, 0, memory, microbatches)
    fixed = fixed_pipelines(cluster, whole)
    check_paths(cluster, whole, fixed)
    assert all(len({p[1:] for p in paths}) == 1 for paths in fixed.paths)  # one pipeline each


def test_one_microbatch_through_the_whole_pipeline_costs_its_tasks():
    stages = 4
    cluster = Cluster(tuple((s,) for s in range(stages)), np.ones(stages), np.zeros((4, 4)))
    plan = schedule_paths(cluster, Rules(stages, 0, 1, 1))
    assert plan.paths == [[(0, 1, 2, 3)]]
    assert plan.makespan == pytest.approx(stages * 1.0 + 0.25 + stages * 1.5)


def test_collision_awareness_spreads_microbatches_over_replicas():
    # two data nodes, stage 1 on a near node and a far one: alone, each microbatch wants the
    # near one; together one of them waits unless it takes the far one
    links = np.array([[0, 0, 0, 0.5], [0, 0, 0, 0.5], [0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=float)
    cluster = Cluster(((0, 1), (2, 3)), np.array([1.0, 1.0, 4.0, 4.0]), links)
    rules = Rules(2, 0, 1, 1)
    unaware = schedule_paths(cluster, rules, collisions=False)
    aware = schedule_paths(cluster, rules)
    assert [p[0][1] for p in unaware.paths] == [2, 2]
    assert sorted(p[0][1] for p in aware.paths) == [2, 3]
    assert aware.makespan < unaware.makespan


def test_check_paths_names_the_broken_rule():
    cluster = cluster_of([1, 1, 1, 1], 0)
    rules = Rules(4, 1, 2, 2)
    plan = schedule_paths(cluster, rules)

    def broken(paths):  # every node: all forwards, then all losses, then all backwards
        orders = [[] for _ in range(4)]
        for mb, path in enumerate(p for per in paths for p in per):
            for node, task in task_tuples(path, mb):
                orders[node].append(task)
        return Plan(paths, [sorted(o, key=lambda t: ("FLB".index(t[0]), t[1])) for o in orders], 0)

    check_paths(cluster, rules, broken(plan.paths))
    with pytest.raises(ValueError, match="beyond 1 swaps"):
        check_paths(cluster, rules, broken([[(0, 3, 2, 1), (0, 1, 2, 3)]]))
    with pytest.raises(ValueError, match="twice"):
        check_paths(cluster, Rules(3, 1, 2, 2), broken([[(0, 1, 1), (0, 2, 3)]]))
    with pytest.raises(ValueError, match="unequally"):
        check_paths(cluster, Rules(3, 1, 2, 2), broken([[(0, 1, 2), (0, 1, 2)]]))
    with pytest.raises(ValueError, match="over memory 1"):
        check_paths(cluster, Rules(4, 1, 1, 2), broken(plan.paths))
    with pytest.raises(ValueError, match="skip_ratio"):
        path_length(4, 1.0)


def test_simulated_orders_finish_no_later_than_any_other_order_of_the_same_paths():
    cluster = cluster_of([3, 2, 2, 2], 3)
    plan = schedule_paths(cluster, Rules(3, 1, 3, 3))
    assert simulate_paths(cluster, plan.paths, plan.orders).makespan == plan.makespan
    reversed_orders = [list(reversed(order)) for order in plan.orders]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate_paths(cluster, plan.paths, reversed_orders)


@settings(max_examples=30, deadline=None)
@given(a=st.integers(1, 4), b=st.integers(1, 4), seed=st.integers(0, 1000))
def test_bottleneck_matching_equals_brute_force(a, b, seed):
    cost = np.random.default_rng(seed).uniform(0, 1, (a + b, a + b))
    small, large = (list(range(a)), list(range(a, a + b)))
    if a > b:
        small, large = large, small
    brute = min(
        max(cost[x, y] for x, y in zip(small, chosen, strict=True))
        for chosen in itertools.permutations(large, len(small))
    )
    assert bottleneck(cost, list(range(a)), list(range(a, a + b))) == pytest.approx(brute)


def test_tour_equals_brute_force():
    between = np.random.default_rng(0).uniform(0, 1, (6, 6))
    between = between + between.T
    cost, order = tour(between)
    brute = min(
        sum(between[x, y] for x, y in zip((0, *rest), (*rest, 0), strict=True))
        for rest in itertools.permutations(range(1, 6))
    )
    assert cost == pytest.approx(brute) and order[0] == 0 and sorted(order) == list(range(6))


def test_allocation_reaches_the_optimum_of_a_small_problem_and_beats_random_ones():
    nodes, sizes = 7, [3, 2, 2]
    cost = np.random.default_rng(0).uniform(0, 1, (nodes, nodes))
    cost = (cost + cost.T) / 2
    np.fill_diagonal(cost, 0)

    def objective(groups):
        return max(cost[np.ix_(g, g)].max() for g in groups) + 2 * _pipeline(cost, groups)

    found = allocate(cost, sizes)
    assert sorted(len(stage) for stage in found.stages[1:]) == [2, 2]
    assert found.objective == pytest.approx(objective(found.stages))
    best = min(
        objective([list(order[:3]), list(order[3:5]), list(order[5:])])
        for order in itertools.permutations(range(nodes))
    )
    assert found.objective == pytest.approx(best)
    assert allocate(cost, sizes, restarts=1).objective <= objective([[0, 1, 2], [3, 4], [5, 6]])


def _pipeline(cost, groups):
    k = len(groups)
    between = np.zeros((k, k))
    for a, b in itertools.combinations(range(k), 2):
        between[a, b] = between[b, a] = bottleneck(cost, groups[a], groups[b])
    return tour(between)[0]


def test_profiles():
    geo = load_links("geo", 20)
    assert geo.regions[:13] == (
        "Australia", "Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "NL", "Oregon",
        "Singapore", "Taiwan", "London", "Australia",
    )  # fmt: skip
    assert np.allclose(geo.latency, geo.latency.T) and geo.latency[0, 12] == pytest.approx(1e-3)
    assert geo.seconds(0, 1, 2**30) == pytest.approx(0.129 + 1 / 0.00982666015625)
    assert load_links("none", 3).free() and not load_links("cluster", 3).free()
    multi = load_links("multi_cluster", 8)
    assert multi.latency[0, 4] < multi.latency[0, 1]
    with pytest.raises(ValueError, match="not one of none, cluster"):
        load_links("moon", 4)


def test_profile_file_errors_name_the_line(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("region_a,region_b,latency_ms,bandwidth_gib_per_s\na,b,3,fast\n")
    with pytest.raises(ValueError, match="links.csv:2: latency and bandwidth must be numbers"):
        load_links(str(path), 2)
    path.write_text("region_a,region_b,latency_ms,bandwidth_gib_per_s\na,b,3,1\nb,c,3,1\n")
    with pytest.raises(ValueError, match="no link between regions 'a' and 'c'"):
        load_links(str(path), 3)
    path.write_text("region_a,region_b,latency_ms,bandwidth_gib_per_s\na,b,3,1\n")
    links = load_links(str(path), 3)
    assert links.regions == ("a", "b", "a") and links.latency[0, 1] == pytest.approx(3e-3)


@pytest.mark.parametrize("dp,pp,length", [(2, 4, 3), (2, 3, 2), (3, 4, 2)])
def test_the_runtime_schedule_follows_the_planned_orders(dp, pp, length):
    """The paths' routes and start times in a step plan: `schedule_from_routes` gives every
    node the planner's order (the loss as the head place's forward and backward), so the
    schedule simulator, on the same costs, finishes when the path simulator does. (Where the
    planned order would have a node take two messages of one sender in another order than they
    were sent, the schedule keeps the pair's order and deviates as little as it can.)"""
    links = load_links("geo", dp * pp)
    forward, loss, message = [0.01] * pp, 0.005, 2**16
    cluster = job_cluster(dp, pp, links, forward, loss, message)
    plan = schedule_paths(cluster, Rules(length, 1, 3, 4))
    places = StepPlan(routes_of(plan, pp)).places(pp + 1)
    schedule = schedule_from_routes(
        pp, places, replicas=dp, in_flight=3, head=True, priority=priority_of(plan)
    )
    same = total = 0
    for node in range(dp * pp):
        want = []
        for kind, mb, _ in plan.orders[node]:
            want += [("F", mb, 1), ("B", mb, 1)] if kind == "L" else [(kind, mb, 0)]
        got = [(a.kind, a.microbatch, a.chunk) for a in schedule.actions[node]]
        same += sum(a == b for a, b in zip(got, want, strict=True))
        total += len(want)
    assert same >= 0.9 * total
    cost = CostModel(
        [*forward, loss / 2.5], [f * 1.5 for f in forward] + [loss * 1.5 / 2.5],
        lambda a, b: links.seconds(a, b, message),
    )  # fmt: skip
    assert simulate(schedule, cost).makespan == pytest.approx(plan.makespan, rel=1e-9)


def test_skippipe_paths_round_trip_through_a_checkpoint_only_for_the_same_settings():
    from skipjack.config.parallel import SkipPipeConfig
    from skipjack.parallel.pipeline.skippipe import SkipPipe

    def planned(**fields):
        config = SkipPipeConfig(enabled=True, skip_ratio=0.34, max_swaps=1, **fields)
        links = load_links("geo", 6)
        return SkipPipe.plan_paths(config, 2, 3, 4, links, [0.01] * 3, 0.004, 2**16)

    saved = planned().state_dict()
    other = planned()
    other.routes = []
    other.load_state_dict(saved)
    assert other.routes == planned().routes and other.plan(1).priority is not None
    changed = planned(memory=2)
    before = changed.routes
    with pytest.warns(UserWarning, match="planned for other settings"):
        changed.load_state_dict(saved)
    assert changed.routes == before
    with pytest.raises(ConfigError, match="at least one layer"):
        SkipPipe.plan_paths(SkipPipeConfig(enabled=True), 2, 3, 4, load_links("none", 6),
                            [0.0, 0.01, 0.01], 0.004, 2**16)  # fmt: skip
