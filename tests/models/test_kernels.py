"""`train.kernels`: which kernels run RMSNorm and AdamW, chosen without apex on this machine and
with a stand-in apex (its functions computed by torch) to check the wiring."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from skipjack.checkpoint.state import OptimizerState
from skipjack.config import OptimConfig
from skipjack.models.kernels import TORCH, Kernels, apex_modules, select_kernels
from skipjack.models.llama import Llama, use_norm_kernel
from skipjack.optim.builder import build_optimizer
from skipjack.parallel.dims import ParallelDims
from skipjack.testing.reference import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def fake_apex(monkeypatch):
    """An importable `apex` whose fused RMSNorm and FusedAdam are torch's, counting calls."""
    calls = {"norm": 0}

    def fused_rms_norm_affine(x, weight, shape, eps):
        calls["norm"] += 1
        normed = torch.nn.functional.rms_norm(x.float(), shape, eps=eps)
        return normed.type_as(x) * weight

    class FusedAdam(torch.optim.AdamW):
        """Counts its steps per parameter group, as apex's does."""

        def __init__(self, params, adam_w_mode=True, **kwargs):
            assert adam_w_mode
            super().__init__(params, **kwargs)

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                group["step"] = group.get("step", 0) + 1

    modules = {
        "apex": types.ModuleType("apex"),
        "apex.normalization": types.ModuleType("apex.normalization"),
        "apex.normalization.fused_layer_norm": types.ModuleType("fused_layer_norm"),
        "apex.optimizers": types.ModuleType("apex.optimizers"),
    }
    modules["apex.normalization.fused_layer_norm"].fused_rms_norm_affine = fused_rms_norm_affine
    modules["apex.optimizers"].FusedAdam = FusedAdam
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    apex_modules.cache_clear()
    yield calls, FusedAdam
    apex_modules.cache_clear()


def test_without_apex_everything_is_torch():
    assert "apex" not in sys.modules
    assert select_kernels("auto", CPU) == TORCH and select_kernels("auto", CUDA) == TORCH
    assert select_kernels("torch", CUDA) == TORCH
    with pytest.raises(ValueError, match="not importable.*train.kernels=auto or torch"):
        select_kernels("apex", CUDA)
    assert TORCH.describe(CPU) == "kernels: torch rms_norm, torch AdamW (foreach)"
    assert TORCH.describe(CUDA) == "kernels: torch rms_norm, torch AdamW (fused)"
    assert TORCH.describe(CPU, "galore") == "kernels: torch rms_norm, galore's own step"


def test_auto_takes_apex_on_cuda_only(fake_apex):
    apex = Kernels("apex", "apex")
    assert select_kernels("auto", CUDA) == apex and select_kernels("apex", CUDA) == apex
    assert select_kernels("auto", CPU) == TORCH and select_kernels("torch", CUDA) == TORCH
    with pytest.raises(ValueError, match="the device is cpu"):
        select_kernels("apex", CPU)
    assert apex.describe(CUDA) == "kernels: apex FusedRMSNorm, apex FusedAdam"


def test_apex_kernels_are_the_ones_that_run(fake_apex):
    """The model's norms call apex's function and give torch's values; the optimizer is apex's
    FusedAdam with the same groups as torch's AdamW."""
    calls, fused_adam = fake_apex
    cfg = tiny_config()
    model = Llama(cfg).init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = model(tokens)
    use_norm_kernel(model, "apex")
    got = model(tokens)
    assert calls["norm"] == 2 * cfg.n_layers + 1 and torch.equal(got, want)
    apex = build_optimizer(model, OptimConfig(), CPU, cfg, kernels=Kernels("apex", "apex"))
    plain = build_optimizer(model, OptimConfig(), CPU, cfg)
    assert type(apex) is fused_adam and type(plain) is torch.optim.AdamW
    assert [g["weight_decay"] for g in apex.param_groups] == [
        g["weight_decay"] for g in plain.param_groups
    ]


def test_a_step_counted_per_group_goes_through_a_checkpoint(fake_apex):
    """apex's FusedAdam keeps its step (bias correction) in the parameter group: the optimizer
    part of a checkpoint holds it and a restore sets it."""
    cfg = tiny_config()
    model = Llama(cfg).init_weights(0)
    kernels = Kernels("apex", "apex")
    dims = ParallelDims(dp=1, pp=1, tp=1, rank=0)
    trained = build_optimizer(model, OptimConfig(), CPU, cfg, kernels=kernels)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        trained.step()
    saved = OptimizerState(trained, [model], dims).state_dict()
    assert float(saved["param_groups/0/step"]) == 3
    fresh = build_optimizer(model, OptimConfig(), CPU, cfg, kernels=kernels)
    restored = OptimizerState(fresh, [model], dims)
    into = restored.state_dict()  # materialised: one step of its own
    for key, value in saved.items():
        into[key].copy_(value)
    restored.load_state_dict(into)
    assert [g["step"] for g in fresh.param_groups] == [3, 3]
