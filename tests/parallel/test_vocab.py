"""Vocabulary parallelism: pass placement on the schedules the trainer ships (its extra warm-up
forwards), and equivalence with the single process (the plain last-stage loss and gradients) for
both algorithms."""

import functools

import pytest

from skipjack.parallel.pipeline.schedule import Action, Schedule, build_schedule
from skipjack.parallel.pipeline.simulate import CostModel, Deadlock, simulate
from skipjack.parallel.pipeline.vocab import insert_vocab_passes
from skipjack.testing import run_ranks
from skipjack.testing.reference import assert_same_history, tiny_config, train_reference
from skipjack.trainer.pipeline import EXTRA_WARMUP

VOCAB_COSTS = {"E": 0.02, "S": 0.15, "R": 0.02, "T": 0.1, "G": 0.03}


def with_vocab(name, pp, m, vpp=1, algorithm="alg2"):
    """Schedule `name` as the trainer builds it for `algorithm`, vocabulary passes placed."""
    schedule = build_schedule(name, pp, m, vpp, EXTRA_WARMUP[algorithm])
    base = CostModel.uniform(pp * vpp, 1.0 / vpp, 2.0 / vpp)
    cost = CostModel(base.forward, base.backward, vocab=VOCAB_COSTS)
    return insert_vocab_passes(schedule, cost), cost


@pytest.mark.parametrize("algorithm", ["alg1", "alg2"])
@pytest.mark.parametrize(
    "name,pp,m,vpp",
    [
        ("gpipe", 2, 4, 1),
        ("gpipe", 4, 8, 1),
        ("1f1b", 2, 1, 1),
        ("1f1b", 2, 4, 1),
        ("1f1b", 4, 2, 1),
        ("1f1b", 4, 32, 1),
        ("interleaved_1f1b", 2, 4, 2),
        ("interleaved_1f1b", 4, 8, 2),
    ],
)
def test_passes_are_placed_deadlock_free_and_cost_only_their_compute(name, pp, m, vpp, algorithm):
    schedule, cost = with_vocab(name, pp, m, vpp, algorithm)
    schedule.check()  # every pass once per rank, collectives in one order everywhere
    result = simulate(schedule, cost)
    plain = simulate(
        build_schedule(name, pp, m, vpp), CostModel.uniform(pp * vpp, 1 / vpp, 2 / vpp)
    )
    # the passes add their own compute to every rank, and barely any waiting on top
    ideal = plain.makespan + m * sum(VOCAB_COSTS.values())
    assert result.makespan <= ideal * 1.02
    # the extra warm-up forwards are the only extra microbatches in flight (the cost of the
    # second one against the paper's single warm-up: bench/vocab_parallel.py)
    assert max(result.peak_activations) <= max(plain.peak_activations) + EXTRA_WARMUP[algorithm]


def test_out_of_order_collectives_and_misplaced_passes_are_caught():
    schedule, cost = with_vocab("1f1b", 2, 2)
    ranks = schedule.actions
    i, j = ranks[1].index(Action("E", 0)), ranks[1].index(Action("E", 1))
    ranks[1][i], ranks[1][j] = ranks[1][j], ranks[1][i]
    with pytest.raises(ValueError, match="out of order: rank 1 runs E1 where rank 0 runs E0"):
        schedule.check()
    # E of microbatch 0 after the forward that needs it: the first stage waits forever
    actions = [[Action("F", 0), Action("E", 0)], [Action("E", 0), Action("F", 0)]]
    for rank in actions:
        rank += [Action(k, 0) for k in "SRT"] + [Action("B", 0), Action("G", 0)]
    actions[1][3:6] = [Action("R", 0), Action("B", 0), Action("T", 0)]  # B waits for R: fine
    with pytest.raises(Deadlock, match="rank 0 at F0"):
        simulate(Schedule("planted", 2, 1, actions, vocab_passes=True), cost)


def test_partial_routes_are_refused():
    schedule = build_schedule("1f1b", 2, 2)
    schedule.routes = [[0, 1], [1]]
    with pytest.raises(ValueError, match="microbatch 1 visits \\[1\\]"):
        insert_vocab_passes(schedule, CostModel.uniform(2))


# -- equivalence with the single process ------------------------------------------------------

STEPS = 3
# vocab 250 over 4 shards pads to 252: the last shard holds padding rows
CFG = tiny_config(n_layers=4, vocab_size=250)


@functools.cache
def single(tied=False):
    cfg = tiny_config(n_layers=4, vocab_size=250, tie_embeddings=tied)
    (history,) = run_ranks(train_reference, 1, cfg, STEPS, 8, 2)
    return history


@functools.cache
def vocab_run(world, tp, pp, schedule, vpp, algorithm, sp=False, tied=False):
    cfg = tiny_config(n_layers=4, vocab_size=250, tie_embeddings=tied)
    return run_ranks(
        train_reference, world, cfg, STEPS, 8, 2, 32, 0, tp, sp, pp, schedule, vpp, algorithm
    )


@pytest.mark.parametrize(
    "world,tp,pp,schedule,vpp,algorithm,sp",
    [
        (2, 1, 2, "1f1b", 1, "alg1", False),
        (2, 1, 2, "1f1b", 1, "alg2", False),
        (2, 1, 2, "interleaved_1f1b", 2, "alg2", False),
        (4, 1, 4, "gpipe", 1, "alg1", False),
        (4, 1, 4, "1f1b", 1, "alg2", False),
        (4, 2, 2, "1f1b", 1, "alg2", True),
    ],
    ids=[
        "pp2-alg1",
        "pp2-alg2",
        "pp2-interleaved-alg2",
        "pp4-gpipe-alg1",
        "pp4-alg2",
        "pp2xtp2-sp-alg2",
    ],
)
def test_vocab_parallel_matches_single_process(world, tp, pp, schedule, vpp, algorithm, sp):
    # random targets fall on every shard; SyntheticSamples masks about 10% of them (ignored)
    for history in vocab_run(world, tp, pp, schedule, vpp, algorithm, sp):
        assert_same_history(single(), history)


def test_alg1_equals_alg2():
    for a, b in zip(
        vocab_run(2, 1, 2, "1f1b", 1, "alg1"), vocab_run(2, 1, 2, "1f1b", 1, "alg2"), strict=True
    ):
        assert_same_history(a, b, rtol=1e-6)


def test_tied_embeddings_share_one_shard_across_stages():
    for history in vocab_run(2, 1, 2, "1f1b", 1, "alg2", tied=True):
        assert_same_history(single(tied=True), history)
