"""A Hugging Face Llama `config.json` <-> skipjack's ModelConfig, field by field.

Every field is either represented exactly or refused with a ConfigError naming the field, its
value and what skipjack supports: a model skipjack cannot hold must not import as a different
model (a gelu MLP run as SwiGLU, biases dropped, YaRN's frequencies run as plain RoPE). Fields
that do not change the function the weights compute (generation defaults, `use_cache`, the
initialiser's range, ...) are ignored; the tokenizer's special ids are kept for the export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from skipjack.config import ConfigError, ModelConfig, RopeScalingConfig, RopeType, head_dim

# keys of a Llama config that change nothing skipjack computes (transformers' own bookkeeping,
# training-time defaults of its own trainer, generation defaults of older configs)
_IGNORED = frozenset(
    """_name_or_path transformers_version architectures model_type dtype torch_dtype use_cache
    initializer_range output_attentions output_hidden_states return_dict torchscript
    use_bfloat16 tf_legacy_loss pruned_heads chunk_size_feed_forward id2label label2id
    problem_type finetuning_task tokenizer_class prefix task_specific_params max_length
    min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens sep_token_id
    decoder_start_token_id is_decoder tie_encoder_decoder cross_attention_hidden_size
    _attn_implementation_autoset""".split()
)
# key: (the value skipjack computes with, what to tell the user)
_FIXED = {
    "hidden_act": (("silu", "swish"), "silu (SwiGLU)"),
    "attention_bias": ((False,), "attention_bias=false (no biases)"),
    "mlp_bias": ((False,), "mlp_bias=false (no biases)"),
    "attention_dropout": ((0, 0.0), "attention_dropout=0.0"),
    "pretraining_tp": ((1, None), "pretraining_tp=1"),
    "is_encoder_decoder": ((False,), "decoder-only models"),
    "add_cross_attention": ((False,), "no cross-attention"),
    "quantization_config": ((None,), "unquantised weights"),
}
_MAPPED = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "ffn_dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
}
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}
_SUPPORTED_ROPE = "default, " + ", ".join(RopeType)
# skipjack's dtype names -> those of Hugging Face configs (and of torch)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_KNOWN = (
    _IGNORED
    | _FIXED.keys()
    | _MAPPED.keys()
    | {"num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters"}
    | {"tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    | {"partial_rotary_factor", "_attn_implementation"}
)


def _refuse(field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(field, f"{value!r} cannot be represented; skipjack supports {supported}")


def model_config(hf: dict, name: str, base: ModelConfig | None = None) -> ModelConfig:
    """The architecture of Hugging Face config `hf` (other fields from `base`). Raises
    ConfigError naming the first field skipjack cannot represent exactly."""
    if hf.get("model_type") != "llama":
        raise _refuse("model_type", hf.get("model_type"), "llama")
    for key in hf:
        if key not in _KNOWN:
            raise _refuse(key, hf[key], "the fields of transformers' LlamaConfig")
    for key, (allowed, supported) in _FIXED.items():
        if key in hf and hf[key] not in allowed:
            raise _refuse(key, hf[key], supported)
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise _refuse("architectures", architectures, '["LlamaForCausalLM"]')
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse("partial_rotary_factor", hf["partial_rotary_factor"], "1.0 (RoPE on all)")
    fields = {ours: hf[key] for key, ours in _MAPPED.items() if key in hf}
    fields["n_kv_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    fields["head_dim"] = hf.get("head_dim")
    if fields["head_dim"] == hf["hidden_size"] // hf["num_attention_heads"]:
        fields["head_dim"] = None  # Llama's own rule: nothing to record
    theta, rope_scaling = _rope(hf)
    fields.update(rope_theta=float(theta), rope_scaling=rope_scaling)
    fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    eos = hf.get("eos_token_id")
    ours = {theirs: name for name, theirs in DTYPE_NAMES.items()}
    fields["hf_dtype"] = ours.get(hf.get("dtype") or hf.get("torch_dtype"))
    fields.update(
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
        pad_token_id=hf.get("pad_token_id"),
    )
    if base is None:
        return ModelConfig(name=name, **fields)
    return dataclasses.replace(base, **fields)


def _rope(hf: dict) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, rope_scaling) from `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5), with transformers' defaults for the keys a config leaves out."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta", "factor")):
        raise _refuse(field, params, "one RoPE for all layers")  # nested per layer type
    theta = hf.get("rope_theta") or params.pop("rope_theta", None) or 10000.0
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in _ROPE_KEYS:
        raise _refuse(f"{field}.rope_type", kind, _SUPPORTED_ROPE)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"{field}.partial_rotary_factor", hf[field], "1.0 (RoPE on all)")
    known = {k for keys in _ROPE_KEYS.values() for k in keys}
    for key in params:
        if key not in known:
            raise _refuse(
                f"{field}.{key}", params[key], f"the keys of rope types {_SUPPORTED_ROPE}"
            )
    if kind == "default":
        return theta, None
    # keys of other types are ignored by transformers for this one, so by skipjack too
    values = {k: params[k] for k in _ROPE_KEYS[kind] if params.get(k) is not None}
    values.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if kind == "yarn":
        if values.get("factor") is None:
            values["factor"] = (
                hf["max_position_embeddings"] / values["original_max_position_embeddings"]
            )
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            values[key] = params.get(key) or default  # transformers: `or`, so 0 means default
    if "factor" not in values:
        raise ConfigError(f"{field}.factor", f"missing; rope type {kind!r} needs it")
    return theta, RopeScalingConfig(rope_type=kind, **values)


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """The config.json of `cfg` for transformers' LlamaForCausalLM, weights in `dtype`."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim(cfg),
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,  # the key before transformers 4.56, which later ones still read
    }
    s = cfg.rope_scaling
    if s is not None:
        values = dataclasses.asdict(s)
        config["rope_scaling"] = {"rope_type": s.rope_type} | {
            k: values[k] for k in _ROPE_KEYS[s.rope_type] if values[k] is not None
        }
    if cfg.bos_token_id is not None:
        config["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id:
        eos = list(cfg.eos_token_id)
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if cfg.pad_token_id is not None:
        config["pad_token_id"] = cfg.pad_token_id
    return config
