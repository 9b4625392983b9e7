"""Subnetworks: a block running some heads and neurons equals the full block with the others
masked (outputs and gradients), while running smaller matmuls; a skipped block is the identity."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from skipjack.models.llama import Llama, block_flops, flops_per_token
from skipjack.models.rope import apply_rope
from skipjack.models.subnet import Subnet
from skipjack.testing.reference import tiny_config

CFG = tiny_config()  # 4 query heads in 2 kv groups of 2, 128 MLP neurons


def masked_block(block, x, rope, head_mask, neuron_mask, head_scale, neuron_scale):
    """The full block, with the outputs of masked heads and neurons zeroed before the output
    and down projections."""
    a, ff = block.attention, block.feed_forward
    b, s, _ = x.shape
    xn = block.attention_norm(x)
    q = apply_rope(a.wq(xn).view(b, s, a.n_heads, a.head_dim), rope)
    k = apply_rope(a.wk(xn).view(b, s, a.n_kv_heads, a.head_dim), rope)
    v = a.wv(xn).view(b, s, a.n_kv_heads, a.head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    out = out * head_mask[None, :, None, None]
    h = x + a.wo(out.transpose(1, 2).reshape(b, s, -1)) * head_scale
    hn = block.ffn_norm(h)
    hidden = F.silu(ff.w1(hn)) * ff.w3(hn) * neuron_mask
    return h + ff.w2(hidden) * neuron_scale


def _run(fn, model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = fn(x)
    out.pow(2).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize(
    "heads",
    [[0, 1], [0, 3], [2], [0, 1, 2, 3], None],
    ids=["whole-group", "cut-groups", "one", "all", "none"],
)
def test_subnet_block_equals_the_masked_full_block(heads):
    model = Llama(CFG).init_weights(0)
    block = model.layers["0"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, CFG.dim, generator=gen)
    neurons = torch.randperm(CFG.ffn_dim, generator=gen)[:40].sort().values
    active = torch.tensor(heads) if heads is not None else None
    subnet = Subnet(active, neurons, head_scale=1 / 0.5, neuron_scale=1 / 0.3)
    head_mask = torch.zeros(4)
    head_mask[active if active is not None else slice(None)] = 1.0
    neuron_mask = torch.zeros(CFG.ffn_dim)
    neuron_mask[neurons] = 1.0
    got = _run(lambda h: block(h, model.rope, subnet=subnet), model, x)
    ref = _run(
        lambda h: masked_block(block, h, model.rope, head_mask, neuron_mask, 2.0, 1 / 0.3), model, x
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=0)
    for name, g in ref[2].items():
        if g is None or not name.startswith("layers.0."):
            continue
        torch.testing.assert_close(got[2][name], g, atol=1e-6, rtol=0, msg=name)
    # what was left out got an exactly zero gradient: rows of w1/w3, columns of w2
    w1 = got[2]["layers.0.feed_forward.w1.weight"]
    assert not w1[neuron_mask == 0].any() and w1[neuron_mask == 1].abs().sum() > 0


def test_a_skipped_block_is_the_identity_and_gets_no_gradient():
    model = Llama(CFG).init_weights(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, subnets={1: Subnet(skip=True)}).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("layers.1."))
    assert all(g is not None for n, g in grads.items() if n.startswith("layers.0."))
    x = torch.randn(2, 16, CFG.dim)
    assert torch.equal(model.layers["1"](x, model.rope, subnet=Subnet(skip=True)), x)
    with torch.no_grad():  # the same as a model without layer 1
        h = model.layers["0"](model.tok_embeddings(tokens), model.rope)
        expected = F.linear(model.norm(h), model.output_weight())
        torch.testing.assert_close(model(tokens, subnets={1: Subnet(skip=True)}), expected)


@pytest.mark.parametrize(
    "subnet",
    [
        None,
        Subnet(torch.tensor([0, 3]), torch.arange(0, 128, 3)),
        Subnet(torch.tensor([1])),
        Subnet(skip=True),
    ],
    ids=["full", "cut-groups-and-neurons", "one-head", "skipped"],
)
def test_block_flops_count_what_the_block_computes(subnet):
    """block_flops (the one FLOP count: metrics, MFU, pipeline cost model) equals what PyTorch's
    FLOP counter measures on the block's forward, whatever its subnet."""
    model = Llama(CFG).init_weights(0)
    x = torch.randn(2, 16, CFG.dim)
    # the math kernel: the FLOP counter sees its matmuls (not those of the fused CPU kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.layers["0"](x, model.rope, subnet=subnet)
    assert counter.get_total_flops() == block_flops(CFG, 16, subnet) * x.shape[0] * x.shape[1]


def test_block_flops_of_the_tensor_parallel_shards_add_up_to_the_block():
    assert block_flops(CFG, 64, tp=2) * 2 == block_flops(CFG, 64)
    assert flops_per_token(CFG, 64) == 3 * (2 * block_flops(CFG, 64) + 2 * 64 * 256)
