"""`model`: the architecture (Llama family), the shapes it implies, and its checks."""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

RopeType = Choice("RopeType", "llama3 linear yarn")
HfDtype = Choice("HfDtype", "fp32 bf16 fp16")


@dataclass
class RopeScalingConfig:
    """Scaling of RoPE's frequencies for contexts longer than pre-training's, as Hugging Face's
    `rope_scaling` (docs/model.md): `llama3` (wavelength-dependent), `linear` (every frequency
    divided by `factor`) or `yarn` (NTK-by-parts between `beta_fast` and `beta_slow` rotations,
    cos/sin scaled by `attention_factor`, derived from `factor` and `mscale*` when None)."""

    rope_type: RopeType = RopeType.llama3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """A Llama-family architecture. Presets live in configs/model/<name>.yaml."""

    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    # width of one attention head; None: dim / n_heads (Llama's rule, which some models break)
    head_dim: Optional[int] = None
    ffn_dim: int = MISSING
    vocab_size: int = MISSING
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # start from these weights (a Hugging Face directory or a skipjack step-* directory); the
    # architecture fields above are then taken from it
    init_from: Optional[str] = None
    # the tokenizer's special ids, kept from a Hugging Face import so that its export has them
    bos_token_id: Optional[int] = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    # the dtype of the Hugging Face weights the model came from: an export writes it unless told
    # otherwise (None: the checkpoint's own)
    hf_dtype: Optional[HfDtype] = None


def head_dim(m: ModelConfig) -> int:
    """The width of one attention head (model.head_dim, or dim / n_heads when it is unset)."""
    return m.head_dim if m.head_dim is not None else m.dim // m.n_heads


def parameter_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The global shape (vocabulary unpadded) of Llama parameter `name` under config `cfg`: what
    a checkpoint of `cfg` holds, whatever the layout."""
    hd = head_dim(cfg)
    leaf = name.split(".")[-2]
    shapes = {
        "tok_embeddings": (cfg.vocab_size, cfg.dim),
        "output": (cfg.vocab_size, cfg.dim),
        "wq": (cfg.n_heads * hd, cfg.dim),
        "wk": (cfg.n_kv_heads * hd, cfg.dim),
        "wv": (cfg.n_kv_heads * hd, cfg.dim),
        "wo": (cfg.dim, cfg.n_heads * hd),
        "w1": (cfg.ffn_dim, cfg.dim),
        "w3": (cfg.ffn_dim, cfg.dim),
        "w2": (cfg.dim, cfg.ffn_dim),
    }
    if leaf in shapes:
        return shapes[leaf]
    if name.endswith("norm.weight"):
        return (cfg.dim,)
    raise KeyError(f"no parameter named {name!r} in a Llama model")


def validate_model(m: ModelConfig) -> None:
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        positive(f"model.{name}", getattr(m, name))
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(
            "model.n_heads",
            f"dim={m.dim} is not divisible by n_heads={m.n_heads}; pick a divisor or set "
            "model.head_dim",
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            "model.n_kv_heads",
            f"n_heads={m.n_heads} is not divisible by n_kv_heads={m.n_kv_heads}; pick a divisor",
        )
    if head_dim(m) <= 0 or head_dim(m) % 2:
        raise ConfigError(
            "model.head_dim" if m.head_dim is not None else "model.dim",
            f"head dim {head_dim(m)} must be even and positive for RoPE",
        )
    if m.rope_scaling is not None:
        _validate_rope_scaling(m.rope_scaling)


def _validate_rope_scaling(s: RopeScalingConfig) -> None:
    positive("model.rope_scaling.factor", s.factor)
    positive(
        "model.rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings
    )
    if s.rope_type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
        raise ConfigError(
            "model.rope_scaling.high_freq_factor",
            f"{s.high_freq_factor} must exceed low_freq_factor={s.low_freq_factor}",
        )


def validate_tensor_parallel(m: ModelConfig, tp: int) -> None:
    """What tensor parallelism of degree `tp` needs of the architecture. With tp > n_kv_heads
    each kv head is replicated on tp / n_kv_heads ranks (Megatron's way); a checkpoint then takes
    an equal part of the head's rows from each of them, so the head dim must split that way."""
    if m.n_heads % tp:
        raise ConfigError("parallel.tp", f"n_heads={m.n_heads} is not divisible by tp={tp}")
    if m.n_kv_heads % tp and tp % m.n_kv_heads:
        raise ConfigError(
            "parallel.tp",
            f"n_kv_heads={m.n_kv_heads} and tp={tp}: one must divide the other (kv heads are "
            "split over the tp ranks, or each replicated on tp / n_kv_heads of them)",
        )
    if tp > m.n_kv_heads and head_dim(m) % (tp // m.n_kv_heads):
        raise ConfigError(
            "parallel.tp",
            f"head dim {head_dim(m)} is not divisible by tp / n_kv_heads = "
            f"{tp // m.n_kv_heads}, which replicated kv heads need",
        )
    if m.ffn_dim % tp:
        raise ConfigError("parallel.tp", f"model.ffn_dim={m.ffn_dim} is not divisible by tp={tp}")
