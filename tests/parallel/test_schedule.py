import pytest

from skipjack.parallel.pipeline.schedule import Action, Schedule, build_schedule
from skipjack.parallel.pipeline.simulate import CostModel, Deadlock, simulate


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 4), (4, 8), (3, 7), (4, 1)])
def test_bubble_matches_closed_form(name, pp, m):
    result = simulate(build_schedule(name, pp, m), CostModel.uniform(pp, 1.0, 2.0))
    assert result.makespan == pytest.approx((m + pp - 1) * 3.0)
    assert result.bubble_ratio == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16)])
def test_peak_activations_gpipe_m_and_1f1b_p_on_first_rank(pp, m):
    cost = CostModel.uniform(pp)
    assert simulate(build_schedule("gpipe", pp, m), cost).peak_activations == [m] * pp
    peaks = simulate(build_schedule("1f1b", pp, m), cost).peak_activations
    assert peaks == [pp - r for r in range(pp)]


@pytest.mark.parametrize("pp,m,vpp", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (2, 6, 3)])
def test_interleaved_bubble_shrinks_by_vpp(pp, m, vpp):
    schedule = build_schedule("interleaved_1f1b", pp, m, vpp)
    result = simulate(schedule, CostModel.uniform(pp * vpp, 1.0 / vpp, 2.0 / vpp))
    assert result.bubble_ratio == pytest.approx((pp - 1) / (vpp * m + pp - 1))
    plain = simulate(build_schedule("1f1b", pp, m), CostModel.uniform(pp, 1.0, 2.0))
    assert result.makespan < plain.makespan


def test_transfer_time_delays_the_pipeline():
    pp, m = 4, 8
    slow = simulate(build_schedule("1f1b", pp, m), CostModel.uniform(pp, 1.0, 2.0, transfer=0.5))
    # the first forward and the last backward each cross pp - 1 links
    assert slow.makespan >= (m + pp - 1) * 3.0 + 2 * (pp - 1) * 0.5


def test_planted_deadlock_is_found_and_explained():
    # messages in order on both ends, but rank 0 waits for B0 before sending F1
    actions = [
        [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)],
        [Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)],
    ]
    with pytest.raises(Deadlock, match="rank 0 at B0, rank 1 at F1"):
        simulate(Schedule("planted", 2, 2, actions), CostModel.uniform(2))


def test_check_names_missing_and_duplicate_actions():
    schedule = build_schedule("1f1b", 2, 2)
    schedule.actions[1].pop()
    with pytest.raises(ValueError, match="rank 1 never runs B1"):
        schedule.check()
    schedule.actions[1] += [Action("B", 1), Action("B", 1)]
    with pytest.raises(ValueError, match="rank 1 runs B1 twice"):
        schedule.check()
    with pytest.raises(ValueError, match="divisible by pp"):
        build_schedule("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("zero_bubble", 2, 4)
