import math

import pytest
import torch
import torch.nn.functional as F

from skipjack.config import ConfigError, RopeScalingConfig
from skipjack.models.llama import (
    PRESETS,
    Llama,
    Stage,
    num_parameters,
    preset,
)
from skipjack.models.rope import apply_rope, rope_cos_sin, rope_frequencies
from skipjack.testing.reference import tiny_config


def build(seed=0, **overrides):
    return Llama(tiny_config(**overrides)).init_weights(seed)


def test_logits_shape_and_dtype():
    model = build()
    logits = model(torch.randint(0, 256, (3, 17)))
    assert logits.shape == (3, 17, 256) and logits.dtype == torch.float32


def test_causal_future_tokens_never_change_earlier_logits():
    model = build()
    tokens = torch.randint(0, 256, (2, 24))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 12))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_matches_complex_rotation_and_is_relative():
    cfg = tiny_config()
    table = rope_cos_sin(cfg)
    x = torch.randn(1, 10, 2, 16)
    ref = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        * torch.polar(torch.ones(10, 8), torch.outer(torch.arange(10.0), rope_frequencies(cfg)))[
            :, None
        ]
    ).flatten(-2)
    torch.testing.assert_close(apply_rope(x, table), ref)
    # the score of a rotated query and key depends on their distance only
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qs = apply_rope(q.expand(1, 32, 1, 16).contiguous(), table)[0, i, 0]
        ks = apply_rope(k.expand(1, 32, 1, 16).contiguous(), table)[0, j, 0]
        return float(qs @ ks)

    assert math.isclose(score(7, 3), score(20, 16), rel_tol=1e-4)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    base = tiny_config(max_seq_len=64, rope_theta=500000.0)
    scaled = tiny_config(
        max_seq_len=64,
        rope_theta=500000.0,
        rope_scaling=RopeScalingConfig(factor=8.0, original_max_position_embeddings=64),
    )
    f0, f1 = rope_frequencies(base), rope_frequencies(scaled)
    wavelen = 2 * math.pi / f0
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert high.any() and low.any()
    torch.testing.assert_close(f1[high], f0[high])
    torch.testing.assert_close(f1[low], f0[low] / 8.0)
    mid = ~(high | low)
    assert torch.all(f1[mid] <= f0[mid]) and torch.all(f1[mid] >= f0[mid] / 8.0)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = build(n_heads=4, n_kv_heads=2)
    mha = Llama(tiny_config(n_heads=4, n_kv_heads=4)).init_weights(0)
    with torch.no_grad():
        for (name, p_mha), p_gqa in zip(mha.named_parameters(), gqa.parameters(), strict=True):
            if name.endswith(("wk.weight", "wv.weight")):
                # kv head h serves query heads 2h and 2h+1
                p_mha.copy_(p_gqa.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64))
            else:
                p_mha.copy_(p_gqa)
    tokens = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_one_tensor_and_its_gradient():
    model = build(tie_embeddings=True)
    assert model.output is None
    assert model.output_weight() is model.tok_embeddings.weight
    tokens = torch.randint(0, 256, (2, 8))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    grad_tied = model.tok_embeddings.weight.grad
    untied = build(tie_embeddings=False)
    assert num_parameters(untied.cfg) - num_parameters(model.cfg) == 256 * 64
    assert grad_tied is not None and grad_tied.abs().sum() > 0


def test_per_stage_build_holds_the_same_weights_and_computes_the_same():
    cfg = tiny_config(n_layers=4)
    whole = Llama(cfg).init_weights(7)
    stages = [
        Llama(cfg, Stage(range(0, 1), True, False)).init_weights(7),
        Llama(cfg, Stage(range(1, 3), False, False)).init_weights(7),
        Llama(cfg, Stage(range(3, 4), False, True)).init_weights(7),
    ]
    reference = dict(whole.named_parameters())
    names = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p, reference[name], rtol=0, atol=0)
            names.add(name)
    assert names == set(reference)
    assert stages[1].tok_embeddings is None and stages[1].output is None
    assert list(stages[1].layers) == ["1", "2"]
    tokens = torch.randint(0, 256, (2, 16))
    h = tokens
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, whole(tokens), rtol=0, atol=0)


def test_init_is_deterministic_and_seed_dependent():
    a, b, c = build(1), build(1), build(2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        if "norm" not in n:
            assert not torch.equal(pa, pc)


def test_activation_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(0, 256, (2, 16))
    grads = []
    for ac in (False, True):
        model = build(activation_checkpointing=ac)
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


@pytest.mark.parametrize(
    "name,millions",
    [
        ("llama_60m", 58),
        ("llama_130m", 134),
        ("llama_350m", 368),
        ("llama_1b", 1339),
        ("tinyllama_1_1b", 1100),
        ("llama3_8b", 8030),
    ],
)
def test_presets_have_their_published_sizes_and_build_on_meta(name, millions):
    cfg = preset(name)
    assert abs(num_parameters(cfg) / 1e6 - millions) / millions < 0.03
    model = Llama(cfg)  # parameters stay on the meta device until init_weights
    assert all(p.is_meta for p in model.parameters())


def test_every_preset_loads_and_unknown_preset_names_the_choices():
    for name in PRESETS:
        assert preset(name).name == name
    with pytest.raises(ConfigError, match="unknown preset 'llama_7m'.*tiny"):
        preset("llama_7m")


def test_packed_documents_see_only_themselves_and_restart_positions():
    """Two documents packed into one row, with their positions and document ids, give the
    logits each gives alone."""
    model = Llama(tiny_config()).init_weights(0).eval()
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, 256, (1, n), generator=gen) for n in (10, 6))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(6)])[None]
    documents = torch.tensor([[3] * 10 + [7] * 6])
    with torch.no_grad():
        out = model(packed, positions, documents)
        torch.testing.assert_close(out[:, :10], model(first), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 10:], model(second), atol=1e-5, rtol=0)
        assert (model(packed)[:, 10:] - model(second)).abs().max() > 1e-3  # without: they mix
