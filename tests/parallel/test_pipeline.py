import functools

import pytest

from skipjack.testing import run_ranks
from skipjack.testing.reference import assert_same_history, tiny_config, train_reference

STEPS = 3
CFG = tiny_config(n_layers=8)


@functools.cache
def single():
    (history,) = run_ranks(train_reference, 1, CFG, STEPS, 8, 2)
    return history


@pytest.mark.parametrize(
    "world,tp,pp,schedule,vpp",
    [
        (2, 1, 2, "gpipe", 1),
        (2, 1, 2, "1f1b", 1),
        (2, 1, 2, "interleaved_1f1b", 2),
        (4, 1, 4, "gpipe", 1),
        (4, 1, 4, "1f1b", 1),
        (4, 1, 4, "interleaved_1f1b", 2),
        (4, 2, 2, "1f1b", 1),
        (4, 1, 2, "1f1b", 1),
    ],
    ids=[
        "pp2-gpipe",
        "pp2-1f1b",
        "pp2-interleaved",
        "pp4-gpipe",
        "pp4-1f1b",
        "pp4-interleaved",
        "pp2xtp2",
        "pp2xdp2",
    ],
)
def test_pipeline_matches_single_process(world, tp, pp, schedule, vpp):
    dp = world // (tp * pp)
    micro = 2 if dp == 1 else 1
    histories = run_ranks(
        train_reference, world, CFG, STEPS, 8, micro, 32, 0, tp, False, pp, schedule, vpp
    )
    for history in histories:
        assert_same_history(single(), history)
