"""Hugging Face round trip: transformers' random Llama (GQA; untied and tied; sharded and single
safetensors) imported into tp=2 and pp=2 layouts (tied: with vocabulary parallelism) gives
transformers' logits; exported back, it loads in transformers with the same logits."""

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from skipjack.checkpoint.convert import export_hf, import_hf, init_model_config
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.sharded import load_model
from skipjack.config import (
    CheckpointConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    TrainJobConfig,
)
from skipjack.parallel.dims import ParallelDims
from skipjack.testing import run_ranks
from skipjack.trainer.trainer import build_training


def make_hf(path, tied, sharded):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "5GB")
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return tokens, model(tokens).logits


def logits_in_layout(source, tokens, tp, pp, vocab="none", save_to=None):
    """Logits of `tokens` with weights from `source` (model.init_from) in a (pp, tp) layout,
    with the vocabulary layers on the stages or (vocab="alg2") split over all ranks."""
    base = ModelConfig(
        name="hf", dim=1, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=1, vocab_size=1,
        init_from=str(source),
    )  # fmt: skip
    model = init_model_config(base)
    job = TrainJobConfig(
        model=model,
        parallel=ParallelConfig(tp=tp, pp=pp, vocab_parallel=vocab),
        train=TrainConfig(steps=1, micro_batch_size=2, seq_len=16, dtype="fp32"),
        checkpoint=CheckpointConfig(dir=str(save_to or "/nonexistent"), resume="none"),
    )
    dims = ParallelDims(dp=1, pp=pp, tp=tp, rank=dist.get_rank()).build_groups()
    training = build_training(job, dims, 1, torch.device("cpu"))
    load_model(training, dims, str(source), dims.group("checkpoint"))
    chunk, passes = training.runtime.chunks[0].eval(), training.runtime.vocab
    with torch.no_grad():
        if passes is not None:  # the E pass gives the first stage its input
            passes.embed(0, tokens)
        if dims.pp_rank == 0:
            out = chunk(tokens if passes is None else passes.embedding(0))
        else:
            hidden = torch.empty(2, 16, model.dim)
            dist.recv(hidden, dims.rank_of(dims.pp_rank - 1, 0, dims.tp_rank))
            out = chunk(hidden)
        if dims.pp_rank < pp - 1:
            dist.send(out.contiguous(), dims.rank_of(dims.pp_rank + 1, 0, dims.tp_rank))
            out = torch.empty(2, 16, model.dim) if passes is not None else None
        group = "tp"
        if passes is not None:  # every rank computes the logits of its vocabulary rows
            dist.broadcast(out, src=dims.rank_of(pp - 1, 0, 0))
            out = out @ passes.shards.output_weight().t()
            passes.finish()
            group = "vocab"
        if out is not None and dist.get_world_size(dims.group(group)) > 1:
            parts = [torch.empty_like(out) for _ in range(dist.get_world_size(dims.group(group)))]
            dist.all_gather(parts, out, group=dims.group(group))
            out = torch.cat(parts, dim=-1)
    if save_to is not None:
        manager = CheckpointManager(job.checkpoint, job.model, dims, dist.get_rank() == 0)
        manager.save(0, training, {"step": 0, "tokens": 0}, {"consumed_samples": 0})
        manager.close()
    return None if out is None else out[..., : model.vocab_size]


@pytest.mark.parametrize("tied,sharded", [(False, True), (True, False)], ids=["untied", "tied"])
def test_import_into_layouts_and_export_back(tmp_path, tied, sharded):
    tokens, expected = make_hf(tmp_path / "hf", tied, sharded)
    # tied embeddings at pp=2 need vocabulary parallelism (both layers on every rank)
    layouts = [(2, 1, "none"), (1, 2, "alg2" if tied else "none")]
    for tp, pp, vocab in layouts:
        results = run_ranks(logits_in_layout, tp * pp, tmp_path / "hf", tokens, tp, pp, vocab)
        got = next(r for r in results[::-1] if r is not None)
        assert (got - expected).abs().max() <= 1e-4, (tp, pp, vocab)
    # import to a skipjack checkpoint, load that in tp=2, save it from there, export that
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    run_ranks(logits_in_layout, 2, imported, tokens, 2, 1, "none", tmp_path / "saved")
    exported = export_hf(tmp_path / "saved" / "step-0000000", tmp_path / "exported")
    reloaded = LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-4
    assert reloaded.config.tie_word_embeddings == tied
