import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX
from skipjack.models.llama import Llama
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.shard_spec import all_gather_full, spec_of
from skipjack.parallel.tensor import TensorParallel, vocab_parallel_cross_entropy
from skipjack.testing import run_ranks
from skipjack.testing.reference import assert_same_history, tiny_config, train_reference

STEPS = 5
# vocab 255 is padded to 256 under tp=2: padded logits must stay out of the loss
# one kv head under tp=2: each rank holds a replica of it (Megatron's way)
CONFIGS = {
    "even": tiny_config(),
    "padded": tiny_config(vocab_size=255),
    "one-kv-head": tiny_config(n_kv_heads=1),
}


@functools.cache
def single(config: str):
    (history,) = run_ranks(train_reference, 1, CONFIGS[config], STEPS, 8, 4)
    return history


@pytest.mark.parametrize(
    "config,world,tp,sp",
    [
        ("even", 2, 2, False),
        ("padded", 2, 2, True),
        ("even", 4, 2, False),
        ("padded", 4, 2, True),
        ("one-kv-head", 2, 2, True),
    ],
    ids=["tp2", "tp2-sp-padded-vocab", "tp2xdp2", "tp2xdp2-sp-padded-vocab", "tp2-replicated-kv"],
)
def test_tensor_parallel_matches_single_process(config, world, tp, sp):
    micro = 4 // (world // tp)
    histories = run_ranks(train_reference, world, CONFIGS[config], STEPS, 8, micro, 32, 0, tp, sp)
    for history in histories:
        assert_same_history(single(config), history)


def _cross_entropy_case(vocab: int):
    tp = TensorParallel(dist.group.WORLD, dist.get_world_size(), dist.get_rank())
    gen = torch.Generator().manual_seed(0)
    padded = -(-vocab // tp.size) * tp.size
    full = torch.randn(3, 5, vocab, generator=gen) * 3
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    target[0, :] = torch.arange(5) % vocab  # targets on every shard
    target[1, 4] = vocab - 1  # the last real column, next to the padding
    target[2, 1:3] = IGNORE_INDEX
    grad_out = torch.rand(3, 5, generator=gen)
    local_width = padded // tp.size
    local = F.pad(full, (0, padded - vocab)).narrow(-1, tp.rank * local_width, local_width)
    local = local.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, tp, vocab)
    (loss * grad_out).sum().backward()
    shards = [torch.empty_like(local.grad) for _ in range(tp.size)]
    dist.all_gather(shards, local.grad)
    return full, target, grad_out, loss.detach(), torch.cat(shards, -1)[..., :vocab]


@pytest.mark.parametrize("vocab", [16, 15])
def test_vocab_parallel_cross_entropy_equals_gathered_cross_entropy(vocab):
    for full, target, grad_out, loss, grad in run_ranks(_cross_entropy_case, 2, vocab):
        ref_logits = full.clone().requires_grad_()
        ref = F.cross_entropy(
            ref_logits.flatten(0, 1), target.flatten(), reduction="none", ignore_index=IGNORE_INDEX
        ).view(3, 5)
        (ref * grad_out).sum().backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-6, atol=1e-7)
        assert torch.all(loss[2, 1:3] == 0)


def _gathered_parameters(cfg, sp):
    dims = ParallelDims(dp=1, tp=dist.get_world_size(), rank=dist.get_rank()).build_groups()
    model = Llama(cfg, tp=dims.tensor_parallel(sp)).init_weights(3)
    out = {}
    for name, p in model.named_parameters():
        spec = spec_of(p)
        full = all_gather_full(p.detach(), spec, dims.groups)
        assert torch.equal(spec.shard(full), p.detach())
        out[name] = (full, spec)
    return out


def test_shard_specs_rebuild_the_single_process_tensors():
    cfg = tiny_config(vocab_size=255)
    reference = dict(Llama(cfg).init_weights(3).named_parameters())
    ranks = run_ranks(_gathered_parameters, 2, cfg, True)
    for rank, gathered in enumerate(ranks):
        assert set(gathered) == set(reference)
        for name, (full, spec) in gathered.items():
            ref = reference[name].detach()
            torch.testing.assert_close(full[: ref.shape[0]], ref, rtol=0, atol=0)
            if name.endswith(("tok_embeddings.weight", "output.weight")):
                assert spec.global_shape == (256, 64) and torch.all(full[255:] == 0)
            if name.endswith("attention.wq.weight"):
                assert spec.dim == 0 and spec.heads.n_heads == 4 and spec.offsets == (32 * rank, 0)
            if name.endswith("attention.wo.weight"):
                assert spec.dim == 1 and spec.heads.dim == 1 and spec.offsets == (0, 32 * rank)
            if name.endswith("norm.weight"):
                assert not spec.sharded and spec.partial_grad
