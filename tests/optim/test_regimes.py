"""Training regimes (EST): the schedule's rates at the configured steps; plans that are the same
global selection in every layout; training along them equal to the single process in every
layout; a resume in the middle of the regime continuing bitwise."""

import pytest
import torch

from skipjack.config import ConfigError, EstConfig, RegimeConfig
from skipjack.config.regime import validate_regime
from skipjack.optim.est import EST
from skipjack.testing import run_ranks
from skipjack.testing.reference import (
    CPU,
    assert_same_history,
    checkpointed_run,
    tiny_config,
    train_reference,
)

CFG = tiny_config(n_layers=4)
# steps 1-2 stage 1, 3-4 stage 2, 5-6 the full model
SCHEDULE = EstConfig(
    stage1_until=1 / 3, stage2_until=2 / 3, p_layers=0.5, p_heads=0.5, p_neurons=0.3
)
REGIME = RegimeConfig(name="est", est=SCHEDULE)


def global_selection(step: int, tp: int) -> dict:
    """Every block's subnet at step `step`, its shards' local indices mapped back to global."""
    shards = [EST(SCHEDULE, CFG, 6, 0, r, tp).subnets(step) for r in range(tp)]
    out = {}
    for layer, first in shards[0].items():
        if first.skip:
            assert all(s[layer].skip for s in shards)
            out[layer] = "skip"
            continue
        heads = torch.cat([s[layer].heads + r * CFG.n_heads // tp for r, s in enumerate(shards)])
        per = CFG.ffn_dim // tp
        neurons = torch.cat([s[layer].neurons + r * per for r, s in enumerate(shards)])
        out[layer] = (heads.tolist(), neurons.tolist(), first.head_scale, first.neuron_scale)
    return out


def test_est_stages_run_the_configured_rates_at_the_configured_steps():
    est = EST(SCHEDULE, CFG, 6, 0, 0, 1)
    assert [est.stage(s) for s in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    for step in (1, 2):
        plan = est.subnets(step)
        assert sum(s.skip for s in plan.values()) == 2  # half of the 4 layers
        for subnet in (s for s in plan.values() if not s.skip):
            assert len(subnet.heads) == CFG.n_heads // 2
            assert len(subnet.neurons) == round(0.3 * CFG.ffn_dim)
            assert subnet.head_scale == 2.0
            assert subnet.neuron_scale == CFG.ffn_dim / round(0.3 * CFG.ffn_dim)
    assert est.rates(1) == {
        "stage": 1,
        "layers": 0.5,
        "heads": 0.5,
        "neurons": pytest.approx(0.3, abs=0.01),
    }
    plan = est.subnets(3)
    assert len(plan) == CFG.n_layers and not any(s.skip for s in plan.values())
    assert est.subnets(5) == {} and est.rates(6)["layers"] == 1.0  # the full model: the plain plan
    assert est.subnets(1) != est.subnets(2)  # a new sample every step


def test_est_plans_are_one_global_selection_at_any_tensor_parallel_degree():
    for step in range(1, 5):
        assert global_selection(step, 1) == global_selection(step, 2)
    # the same selection on every replica: a function of seed and step alone
    again = EST(SCHEDULE, CFG, 6, 0, 0, 1).subnets(1)
    assert {k: str(v) for k, v in again.items()} == {
        k: str(v) for k, v in EST(SCHEDULE, CFG, 6, 0, 0, 1).subnets(1).items()
    }


def test_bad_regime_settings_name_the_field():
    with pytest.raises(ConfigError, match="regime.est.p_heads"):
        validate_regime(RegimeConfig(name="est", est=EstConfig(p_heads=0.0)))
    with pytest.raises(ConfigError, match="regime.est.stage2_until"):
        validate_regime(RegimeConfig(name="est", est=EstConfig(stage1_until=0.7, stage2_until=0.5)))


@pytest.fixture(scope="module")
def single():
    (history,) = run_ranks(train_reference, 1, CFG, 6, 8, 2, 32, 0, *NO_LAYOUT, REGIME)
    return history


NO_LAYOUT = (1, False, 1, "1f1b", 1, "none", None)  # tp, sp, pp, schedule, vpp, vocab, optim


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (4, 1, 2)], ids=["tp2", "dp2xpp2"])
def test_est_trains_like_the_single_process_in_every_layout(single, world, tp, pp):
    layout = (tp, False, pp, "1f1b", 1, "none", None)
    history = run_ranks(train_reference, world, CFG, 6, 8, 2, 32, 0, *layout, REGIME)[0]
    assert_same_history(single, history)


def resumable(directory: str, interval: int, resume: str) -> tuple:
    """checkpointed_run's arguments after the model: 6 steps of EST, fp32 on CPU."""
    return (6, directory, interval, resume, 1, 1, "none", 8, 2, 32, None, None, CPU, "fp32", REGIME)


def test_est_resumed_in_its_first_stage_continues_bitwise(tmp_path):
    straight = run_ranks(checkpointed_run, 1, CFG, *resumable(f"{tmp_path}/a", 1, "none"))[0]
    step1 = f"{tmp_path}/a/step-0000001"
    resumed = run_ranks(checkpointed_run, 1, CFG, *resumable(f"{tmp_path}/b", 0, step1))[0]
    assert resumed == {s: straight[s] for s in range(2, 7)}
