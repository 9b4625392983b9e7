"""Hugging Face Llama directories (config.json + safetensors, sharded or not) in and out.

Names map one to one (`model.layers.3.self_attn.q_proj.weight` <-> `layers.3.attention.wq.weight`,
`gate_proj` <-> `w1`, `up_proj` <-> `w3`, `down_proj` <-> `w2`, ...). skipjack applies RoPE to
interleaved pairs of each head (Meta's layout), Hugging Face to its two halves, so the rows of
the query and key projections are permuted within each head on the way in and back on the way
out. The config is mapped (or refused) field by field in `hf_config.py`.

Reading goes through `safe_open(...).get_slice`: a rank reads only the rows (or columns) of each
weight that its shard spec says it holds, in the file's dtype, so no process ever holds the
whole checkpoint in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from skipjack.atomic import replacing_dir
from skipjack.checkpoint import hf_config
from skipjack.checkpoint.sharded import CheckpointError
from skipjack.config import ModelConfig, head_dim
from skipjack.parallel.shard_spec import ShardSpec

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
DTYPES = {name: getattr(torch, theirs) for name, theirs in hf_config.DTYPE_NAMES.items()}


def is_hf_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


def to_skipjack_name(name: str) -> str | None:
    """skipjack's name of a Hugging Face tensor (None for buffers skipjack recomputes)."""
    stem, _, leaf = name.rpartition(".")
    if stem in _TOP_NAMES and leaf == "weight":
        return f"{_TOP_NAMES[stem]}.{leaf}"
    parts = stem.split(".")
    if (
        parts[:2] == ["model", "layers"]
        and ".".join(parts[3:]) in _LAYER_NAMES
        and leaf == "weight"
    ):
        return f"layers.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{leaf}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise CheckpointError(
        f"unexpected tensor {name!r} in a Llama checkpoint (biases? another model?)"
    )


def to_hf_name(name: str) -> str:
    stem, _, leaf = name.rpartition(".")
    for hf, ours in _TOP_NAMES.items():
        if stem == ours:
            return f"{hf}.{leaf}"
    _, index, *rest = stem.split(".")
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    return f"model.layers.{index}.{inverse['.'.join(rest)]}.{leaf}"


def parameter_names(cfg: ModelConfig) -> list[str]:
    """skipjack's names of every weight of `cfg` (the output layer only when untied)."""
    top = ["tok_embeddings.weight", "norm.weight"] + (
        [] if cfg.tie_embeddings else ["output.weight"]
    )
    layers = [
        f"layers.{i}.{ours}.weight" for i in range(cfg.n_layers) for ours in _LAYER_NAMES.values()
    ]
    return top + layers


def _rope_rows(weight: torch.Tensor, head_dim: int, to_interleaved: bool) -> torch.Tensor:
    """Reorder each head's rows between halves (HF) and interleaved pairs (Meta)."""
    rows, cols = weight.shape
    n_heads, half = rows // head_dim, head_dim // 2
    if to_interleaved:
        return weight.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return weight.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint is damaged") from e


def model_config(path: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    """The architecture in `path`/config.json; other fields (name, init, activation
    checkpointing) from `base`. Raises ConfigError naming a field skipjack cannot represent."""
    path = Path(path)
    return hf_config.model_config(_read_json(path / "config.json"), path.name, base)


class HFCheckpoint:
    """A Hugging Face Llama directory opened for reading: its model config and where each
    weight lies (file and name), checked complete before anything is read."""

    def __init__(self, path: str | os.PathLike, base: ModelConfig | None = None):
        self.path = Path(path)
        self.config = model_config(self.path, base)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no weight_map; the checkpoint is damaged")
            located = {name: self.path / file for name, file in weight_map.items()}
        else:
            located = {
                name: file
                for file in sorted(self.path.glob("*.safetensors"))
                for name in _keys(file)
            }
        self._where: dict[str, tuple[Path, str]] = {}
        for name, file in located.items():
            ours = to_skipjack_name(name)
            if ours is not None and not (ours == "output.weight" and self.config.tie_embeddings):
                self._where[ours] = (file, name)  # tied: transformers ignores a saved lm_head
        for name in parameter_names(self.config):
            if name not in self._where:
                raise CheckpointError(
                    f"{self.path}: has no tensor {to_hf_name(name)}; the checkpoint is incomplete"
                )
        for file in sorted({file for file, _ in self._where.values()}):
            if not file.is_file():
                raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, hf_name = self._where[name]
        with _open(file) as f:
            return tuple(f.get_slice(hf_name).get_shape())

    def read(self, name: str, spec: ShardSpec | None = None) -> torch.Tensor:
        """Weight `name` in the file's dtype: whole, or only the part `spec` gives this rank
        (rows beyond the true size, a padded vocabulary, are zeros)."""
        file, hf_name = self._where[name]
        with _open(file) as f:
            view = f.get_slice(hf_name)
            shape = view.get_shape()
            if spec is None or not spec.sharded:
                tensor = view[:]
            else:
                dim, start = spec.dim, spec.offsets[spec.dim]
                size = spec.local_shape[dim]
                stop = min(start + size, shape[dim])
                index = (slice(None),) * dim + (slice(min(start, stop), stop),)
                tensor = view[index]
                if stop - start < size:
                    pad = list(tensor.shape)
                    pad[dim] = size - tensor.shape[dim]
                    tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim)
        if name.endswith(("wq.weight", "wk.weight")):
            tensor = _rope_rows(tensor, head_dim(self.config), to_interleaved=True)
        return tensor


def _keys(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable ({e}); the checkpoint is damaged") from e


def write(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: str | None = None,
) -> None:
    """A Hugging Face Llama directory (`transformers` loads it) from skipjack's tensors, in
    `dtype` (None: that of the Hugging Face weights the model came from, else the tensors'
    own), written next to `path` and renamed into place."""
    dtype = dtype or cfg.hf_dtype
    out = {}
    for name, tensor in tensors.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if dtype is not None:
            tensor = tensor.to(DTYPES[dtype])
        if name.endswith(("wq.weight", "wk.weight")):
            tensor = _rope_rows(tensor, head_dim(cfg), to_interleaved=False)
        out[to_hf_name(name)] = tensor.contiguous()
    widest = max((t.dtype for t in out.values()), key=lambda d: d.itemsize)
    config = hf_config.hf_config(cfg, str(widest).removeprefix("torch."))
    with replacing_dir(path) as tmp:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
