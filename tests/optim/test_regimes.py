"""Training regimes (EST, SAT): the schedules' rates at the configured steps; plans that are the
same global selection in every layout; training along them equal to the single process in every
layout; a resume in the middle of a regime continuing bitwise; SAT's importance as defined, and
its selection favouring important units."""

import functools

import pytest
import torch

from skipjack.config import ConfigError, EstConfig, RegimeConfig
from skipjack.config.regime import SatConfig, validate_regime
from skipjack.models.llama import Block, rope_cos_sin
from skipjack.optim.est import EST
from skipjack.optim.sat import SAT
from skipjack.parallel.tensor import TensorParallel
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
# step 1 dense (importance measured), 2-4 half the heads and neurons left out, 5-6 dense
LADDER = SatConfig(ladder=[[1 / 6, 0.0], [4 / 6, 0.5], [1.0, 0.0]])
SAT_REGIME = RegimeConfig(name="sat", sat=LADDER)
REGIMES = {"est": REGIME, "sat": SAT_REGIME}


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


@functools.cache
def single(regime: str) -> list[dict]:
    (history,) = run_ranks(train_reference, 1, CFG, 6, 8, 2, 32, 0, *NO_LAYOUT, REGIMES[regime])
    return history


NO_LAYOUT = (1, False, 1, "1f1b", 1, "none", None)  # tp, sp, pp, schedule, vpp, vocab, optim


@pytest.mark.parametrize("regime", ["est", "sat"])
@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (4, 1, 2)], ids=["tp2", "dp2xpp2"])
def test_regimes_train_like_the_single_process_in_every_layout(regime, world, tp, pp):
    layout = (tp, False, pp, "1f1b", 1, "none", None)
    history = run_ranks(train_reference, world, CFG, 6, 8, 2, 32, 0, *layout, REGIMES[regime])
    assert_same_history(single(regime), history[0])


def resumable(directory: str, interval: int, resume: str, regime: str) -> tuple:
    """checkpointed_run's arguments after the model: 6 steps, fp32 on CPU."""
    return (6, directory, interval, resume, 1, 1, "none", 8, 2, 32, None, None, CPU, "fp32",
            REGIMES[regime])  # fmt: skip


@pytest.mark.parametrize("regime,at", [("est", 1), ("sat", 3)])
def test_a_regime_resumed_in_its_sparse_phase_continues_bitwise(tmp_path, regime, at):
    a, b = f"{tmp_path}/a", f"{tmp_path}/b"
    straight = run_ranks(checkpointed_run, 1, CFG, *resumable(a, 1, "none", regime))[0]
    step = f"{a}/step-{at:07d}"
    resumed = run_ranks(checkpointed_run, 1, CFG, *resumable(b, 0, step, regime))[0]
    assert resumed == {s: straight[s] for s in range(at + 1, 7)}


def test_sat_ladder_runs_the_configured_rates_at_the_configured_steps():
    sat = SAT(LADDER, CFG, 6, 0, 0, 1, {}, None)
    assert [sat.omission(s) for s in range(1, 7)] == [0.0, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert sat.subnets(1) == {} and sat.subnets(6) == {}
    plan = sat.subnets(2)
    assert len(plan) == CFG.n_layers
    for subnet in plan.values():
        assert len(subnet.heads) == CFG.n_heads // 2 and len(subnet.neurons) == CFG.ffn_dim // 2
        assert subnet.head_scale == subnet.neuron_scale == 1.0
    assert sat.rates(3) == {"heads": 0.5, "neurons": 0.5}


def test_sat_importance_is_the_output_magnitude_each_unit_adds_and_guides_the_draw():
    """One block whose first 8 neurons carry a 50x larger down projection: the measured
    importance is mean |activation| x down-projection column norm; drawing half of the neurons
    keeps the heavy ones far more often than the others."""
    torch.manual_seed(0)
    block = Block(CFG, TensorParallel()).to_empty(device="cpu")
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ff = block.feed_forward
    with torch.no_grad():
        ff.w2.weight[:, :8] *= 50
    sat = SAT(LADDER, CFG, 6, 0, 0, 1, {0: block}, None)
    x = torch.randn(2, 16, CFG.dim)
    block.attention(x, rope_cos_sin(CFG, torch.device("cpu"))[:16])
    ff(x)
    ff(x)  # a second micro-batch (or a recomputed forward): the mean is the same
    sat.after_step()
    hidden = torch.nn.functional.silu(ff.w1(x)) * ff.w3(x)
    expected = hidden.abs().mean(dim=(0, 1)) * ff.w2.weight.norm(dim=0)
    torch.testing.assert_close(sat.importance["neurons"][0], expected.detach())
    assert sat.seen["heads"][0].all() and not sat.seen["heads"][1].any()  # layer 1 never ran
    g = torch.Generator().manual_seed(0)
    kept = torch.zeros(CFG.ffn_dim)
    for _ in range(200):
        kept[sat._draw("neurons", 0, CFG.ffn_dim // 2, g)] += 1
    assert kept[:8].mean() > 0.95 * 200 and kept[8:].mean() < 0.55 * 200


DENSE = {
    "sat": RegimeConfig(name="sat", sat=SatConfig(ladder=[[1.0, 0.0]])),
    "est": RegimeConfig(name="est", est=EstConfig(stage1_until=0.0, stage2_until=0.0)),
    "none": RegimeConfig(),
}


def dense_runs(tmp: str) -> dict:
    """3 steps with each regime of DENSE, one after the other in this process group."""
    args = (3, "", 0, "none", 1, 1, "none", 8, 2, 32, None, None, CPU, "fp32")
    return {
        name: checkpointed_run(CFG, *args[:1], f"{tmp}/{name}", *args[2:], regime)
        for name, regime in DENSE.items()
    }


def test_a_dense_regime_step_is_plain_training_bitwise(tmp_path):
    """SAT on a ladder that never omits (its observers measuring every step) and EST in its
    last stage train exactly as no regime."""
    losses = run_ranks(dense_runs, 1, str(tmp_path))[0]
    assert losses["sat"] == losses["none"] == losses["est"]
