"""Hugging Face round trip: transformers' random Llama (GQA; untied and tied; sharded and single
safetensors) imported into tp=2 and pp=2 layouts (tied: with vocabulary parallelism) gives
transformers' logits; exported back, it loads in transformers with the same logits."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from skipjack.checkpoint.convert import export_hf, import_hf, init_model_config
from skipjack.checkpoint.convert import main as convert_main
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.marker import marked_model
from skipjack.checkpoint.sharded import load_model, read_model
from skipjack.checkpoint.state import Progress
from skipjack.config import (
    CheckpointConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    TrainJobConfig,
)
from skipjack.models.llama import Llama
from skipjack.parallel.dims import ParallelDims
from skipjack.testing import run_ranks
from skipjack.trainer.engine import NativeEngine

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def save_hf(path, dtype, sharded, **overrides):
    """transformers' random Llama of BASE + `overrides` saved in `dtype`; its fp32 logits of
    some tokens, computed from the saved (rounded) weights."""
    config = LlamaConfig(**(BASE | overrides))
    config.rope_parameters.setdefault("rope_theta", 10000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(
        path, max_shard_size="100KB" if sharded else "5GB"
    )
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return tokens, reference(tokens).logits


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
        train=TrainConfig(steps=1, micro_batch_size=2, seq_len=tokens.shape[1], dtype="fp32"),
        checkpoint=CheckpointConfig(dir=str(save_to or "/nonexistent"), resume="none", interval=1),
    )
    dims = ParallelDims(dp=1, pp=pp, tp=tp, rank=dist.get_rank()).build_groups()
    training = NativeEngine(job, dims, 1, torch.device("cpu"))
    load_model(training.state(), model, str(source), dims.group("checkpoint"))
    chunk, passes = training.runtime.chunks[0].eval(), training.runtime.vocab
    with torch.no_grad():
        if passes is not None:  # the E pass gives the first stage its input
            passes.embed(0, tokens)
        if dims.pp_rank == 0:
            out = chunk(tokens if passes is None else passes.embedding(0))
        else:
            hidden = torch.empty(*tokens.shape, model.dim)
            dist.recv(hidden, dims.rank_of(dims.pp_rank - 1, 0, dims.tp_rank))
            out = chunk(hidden)
        if dims.pp_rank < pp - 1:
            dist.send(out.contiguous(), dims.rank_of(dims.pp_rank + 1, 0, dims.tp_rank))
            out = torch.empty(*tokens.shape, model.dim) if passes is not None else None
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
        manager = CheckpointManager.for_job(job.checkpoint, job.model, dims, dist.get_rank() == 0)
        manager.save(0, {**training.state(), "trainer": Progress()})
        manager.close()
    return None if out is None else out[..., : model.vocab_size]


@pytest.mark.parametrize("tied,sharded", [(False, True), (True, False)], ids=["untied", "tied"])
def test_import_into_layouts_and_export_back(tmp_path, tied, sharded):
    tokens, expected = save_hf(tmp_path / "hf", torch.float32, sharded, tie_word_embeddings=tied)
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


# -- every supported variant, single process, against transformers ----------------------------

VARIANTS = {
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "factor": 4.0}),
    "llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "yarn-rope": dict(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    ),
    "head-dim": dict(head_dim=32),  # not hidden_size / heads = 16
    "tied-gqa-4to1": dict(num_attention_heads=8, tie_word_embeddings=True),
    "tied-one-kv-head": dict(num_key_value_heads=1, tie_word_embeddings=True),
}


def skipjack_logits(directory, tokens):
    """Logits of a skipjack checkpoint, as one process builds the model from it."""
    cfg = marked_model(directory)
    model = Llama(cfg).init_weights(0)
    with torch.no_grad():
        for name, value in read_model(str(directory)).items():
            model.get_parameter(name).copy_(value)
        return model.eval()(tokens)


def safetensors_dtypes(directory):
    dtypes = set()
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_imports_with_transformers_logits_and_exports_back(tmp_path, variant, dtype):
    """Imported, the model gives transformers' logits (fp32 compute, max abs difference 1e-5);
    exported, transformers loads it in the same dtype with the same config and logits. bf16
    checkpoints are sharded (model.safetensors.index.json), fp32 ones are single files."""
    sharded = dtype == torch.bfloat16
    tokens, expected = save_hf(tmp_path / "hf", dtype, sharded, **VARIANTS[variant])
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert (skipjack_logits(imported, tokens) - expected).abs().max() <= 1e-5
    exported = export_hf(imported, tmp_path / "exported")
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    written = json.loads((exported / "config.json").read_text())
    for key in ("head_dim", "tie_word_embeddings", "num_key_value_heads", "dtype"):
        assert written[key] == source[key], key
    assert safetensors_dtypes(exported) == {"BF16" if sharded else "F32"}
    reloaded = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    # every RoPE parameter of the source, the defaults transformers fills in made explicit
    assert reloaded.config.rope_parameters.items() >= source["rope_parameters"].items()
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-5
    as_fp32 = export_hf(imported, tmp_path / "fp32", dtype="fp32")
    assert safetensors_dtypes(as_fp32) == {"F32"}


def test_transformers_4_config_with_rope_scaling_imports(tmp_path):
    """A Llama-3.1-style config.json as transformers 4 wrote it (rope_scaling, rope_theta at the
    top level) imports as the same model."""
    tokens, expected = save_hf(tmp_path / "hf", torch.float32, False, **VARIANTS["llama3-rope"])
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    scaling = config.pop("rope_parameters")
    config["rope_theta"] = scaling.pop("rope_theta")
    config["rope_scaling"] = scaling
    path.write_text(json.dumps(config))
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert (skipjack_logits(imported, tokens) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "change,field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"model_type": "mistral"}, "model_type"),
        ({"sliding_window": 4096}, "sliding_window"),
    ],
)
def test_unrepresentable_configs_are_refused_in_one_line(tmp_path, capsys, change, field):
    """skipjack convert: one line naming the field, its value and what skipjack supports."""
    hf = tmp_path / "hf"
    save_hf(hf, torch.float32, False)
    config = json.loads((hf / "config.json").read_text())
    config.update(change)
    (hf / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # what transformers printed
    with pytest.raises(SystemExit) as exit_:
        convert_main(["import", str(hf), str(tmp_path / "out")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("skipjack convert: ") and field in line and "supports" in line, line
    assert not (tmp_path / "out").exists()


def _truncate_first_shard(hf):
    shard = sorted(hf.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def _delete_a_shard(hf):
    sorted(hf.glob("*.safetensors"))[-1].unlink()


def _drop_a_tensor(hf):
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))


def _garble_config(hf):
    (hf / "config.json").write_text('{"model_type": "llama", ')


@pytest.mark.parametrize(
    "damage,says",
    [
        (_truncate_first_shard, "unreadable"),
        (_delete_a_shard, "missing"),
        (_drop_a_tensor, "has no tensor model.layers.1.mlp.up_proj.weight"),
        (_garble_config, "config.json: unreadable"),
    ],
)
def test_damaged_checkpoints_give_one_line_errors(tmp_path, capsys, damage, says):
    hf = tmp_path / "hf"
    save_hf(hf, torch.float32, True)
    damage(hf)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert_main(["import", str(hf), str(tmp_path / "out")])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("skipjack convert: ") and says in line, line


def test_one_kv_head_at_tp2_gives_transformers_logits_and_saves_for_tp1(tmp_path):
    """tp=2 with one kv head (each rank holds a replica) from bf16 weights: transformers'
    logits; saved there (fp32 training weights; every replica writes half of the head's rows)
    and loaded at tp=1, the same logits; exported, bf16 again, as the source was."""
    tokens, expected = save_hf(tmp_path / "hf", torch.bfloat16, False, num_key_value_heads=1)
    saved = tmp_path / "saved"
    results = run_ranks(logits_in_layout, 2, tmp_path / "hf", tokens, 2, 1, "none", saved)
    assert all((got - expected).abs().max() <= 1e-5 for got in results)
    (again,) = run_ranks(logits_in_layout, 1, saved / "step-0000000", tokens, 1, 1)
    assert (again - expected).abs().max() <= 1e-5
    exported = export_hf(saved / "step-0000000", tmp_path / "exported")
    assert safetensors_dtypes(exported) == {"BF16"}
