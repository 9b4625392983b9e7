"""The datasets and tokenizer a DataConfig names: the built-in corpus or an indexed blend."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from skipjack.config import ConfigError, DataConfig, parse_blend
from skipjack.data.builtin import prepare_builtin
from skipjack.data.indexed import build_gpt_datasets
from skipjack.data.sft import sft_datasets
from skipjack.data.tokenizer import Tokenizer


def resolve_source(cfg: DataConfig) -> tuple[list[str], list[float] | None, Tokenizer]:
    """(prefixes, weights, tokenizer). Builds the built-in corpus' cache on first use."""
    if cfg.kind == "builtin":
        prefix, tokenizer = prepare_builtin(cfg.cache_dir, cfg.tokenizer_vocab_size, cfg.tokenizer)
        return [prefix], None, tokenizer
    prefixes, weights = parse_blend([os.path.expanduser(p) for p in cfg.paths])
    tokenizer_path = cfg.tokenizer or f"{prefixes[0]}.tokenizer.json"
    if not os.path.exists(os.path.expanduser(tokenizer_path)):
        raise ConfigError(
            "data.tokenizer",
            f"{tokenizer_path} does not exist; pass the "
            "tokenizer.json that `skipjack preprocess` used",
        )
    return prefixes, weights, Tokenizer.load(tokenizer_path)


def build_datasets(
    cfg: DataConfig, seq_len: int, seed: int, sizes: tuple[int, int], model_dir: str | None = None
):
    """(train, validation, tokenizer); with a process group, rank 0 fills the caches first.
    `model_dir`: where instruction data (`data=sft`) finds its tokenizer and chat template when
    `data.tokenizer` does not say."""
    if cfg.kind == "sft":
        return sft_datasets(cfg, seq_len, model_dir)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            resolve_source(cfg)
        dist.barrier()
    prefixes, weights, tokenizer = resolve_source(cfg)
    cache = str(Path(os.path.expanduser(cfg.cache_dir)) / "indices")
    train, valid = build_gpt_datasets(
        prefixes, weights, cfg.split, seq_len, seed, sizes, tokenizer, cache
    )
    return train, valid, tokenizer
