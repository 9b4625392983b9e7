"""Hugging Face Llama directories (config.json + safetensors, sharded or not) in and out.

Names map one to one (`model.layers.3.self_attn.q_proj.weight` <-> `layers.3.attention.wq.weight`,
`gate_proj` <-> `w1`, `up_proj` <-> `w3`, `down_proj` <-> `w2`, ...). skipjack applies RoPE to
interleaved pairs of each head (Meta's layout), Hugging Face to its two halves, so the rows of
the query and key projections are permuted on the way in and back on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from skipjack.atomic import replacing_dir
from skipjack.config import ConfigError, ModelConfig, RopeScalingConfig

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def is_hf_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def to_skipjack_name(name: str) -> str | None:
    """skipjack's name of a Hugging Face tensor (None for buffers skipjack recomputes)."""
    stem, _, leaf = name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{leaf}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{leaf}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected tensor {name!r} in a Llama checkpoint")


def to_hf_name(name: str) -> str:
    stem, _, leaf = name.rpartition(".")
    for hf, ours in _TOP_NAMES.items():
        if stem == ours:
            return f"{hf}.{leaf}"
    _, index, *rest = stem.split(".")
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    return f"model.layers.{index}.{inverse['.'.join(rest)]}.{leaf}"


def _rope_rows(weight: torch.Tensor, n_heads: int, to_interleaved: bool) -> torch.Tensor:
    """Reorder each head's rows between halves (HF) and interleaved pairs (Meta)."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    if to_interleaved:
        return weight.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return weight.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def model_config(path: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """The architecture in `path`/config.json; other fields (name, init, activation
    checkpointing) from `base`."""
    hf = json.loads((Path(path) / "config.json").read_text())
    if hf.get("model_type") != "llama":
        raise ConfigError("model.init_from", f"{path} holds a {hf.get('model_type')!r} model")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope_scaling = RopeScalingConfig(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    fields = dict(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if base is None:
        return ModelConfig(name=Path(path).name, **fields)
    return dataclasses.replace(base, **fields)


def read(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and every weight of a Hugging Face directory, under skipjack's names."""
    path = Path(path)
    cfg = model_config(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else [p.name for p in sorted(path.glob("*.safetensors"))]
    )
    tensors = {}
    for file in files:
        for name, tensor in load_file(path / file).items():
            ours = to_skipjack_name(name)
            if ours is None:
                continue
            if ours.endswith(("wq.weight", "wk.weight")):
                heads = cfg.n_heads if ours.endswith("wq.weight") else cfg.n_kv_heads
                tensor = _rope_rows(tensor, heads, to_interleaved=True)
            tensors[ours] = tensor.float()
    return cfg, tensors


def write(cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A Hugging Face Llama directory (`transformers` loads it) from skipjack's tensors, written
    next to `path` and renamed into place."""
    out = {}
    for name, tensor in tensors.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name.endswith(("wq.weight", "wk.weight")):
            heads = cfg.n_heads if name.endswith("wq.weight") else cfg.n_kv_heads
            tensor = _rope_rows(tensor, heads, to_interleaved=False)
        out[to_hf_name(name)] = tensor.contiguous()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    with replacing_dir(path) as tmp:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
