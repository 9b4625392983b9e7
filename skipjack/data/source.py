"""The datasets and tokenizer a DataConfig names: the built-in corpus, an indexed blend or
instruction data."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from skipjack.config import ConfigError, DataConfig, parse_blend
from skipjack.data.builtin import prepare_builtin
from skipjack.data.indexed import build_gpt_datasets
from skipjack.data.sft import SftDataset, chat_format
from skipjack.data.sft_store import load_examples
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
        return _rank_zero_first(lambda: sft_datasets(cfg, seq_len, model_dir))
    prefixes, weights, tokenizer = _rank_zero_first(lambda: resolve_source(cfg))
    cache = str(Path(os.path.expanduser(cfg.cache_dir)) / "indices")
    train, valid = build_gpt_datasets(
        prefixes, weights, cfg.split, seq_len, seed, sizes, tokenizer, cache
    )
    return train, valid, tokenizer


def _rank_zero_first(build):
    """`build()` on rank 0 first, then on the other ranks, which read the caches it filled. A
    failure anywhere is raised on every rank (none is left waiting at a later collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    lead = dist.get_rank() == 0
    built, failed = _attempt(build) if lead else (None, None)
    first = [failed]
    dist.broadcast_object_list(first, src=0)
    if first[0] is not None:
        raise first[0]
    if not lead:
        built, failed = _attempt(build)
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failed)
    for failure in failures:
        if failure is not None:
            raise failure
    return built


def _attempt(build):
    try:
        return build(), None
    except Exception as error:  # handed to every rank, raised there
        return None, error


def sft_datasets(cfg, seq_len: int, model_dir: str | None) -> tuple:
    """(train, validation, chat format) of `data=sft` (`chat_format`); the last `split` share
    of the examples validates. Prints what reading found on rank 0."""
    chat = chat_format(cfg, model_dir)
    lead = not dist.is_initialized() or dist.get_rank() == 0
    examples, report = load_examples(cfg.paths, chat, cfg.on_bad_record, cfg.cache_dir, lead)
    weights = [float(w) for w in cfg.split.split(",")]
    n_valid = max(1, round(len(examples) * weights[1] / sum(weights)))
    if len(examples) <= n_valid:
        raise ConfigError(
            "data.paths", f"{len(examples)} usable examples: too few to train and validate on"
        )
    train = SftDataset(examples[:-n_valid], seq_len, chat.pad, cfg.pack, report)
    valid = SftDataset(examples[-n_valid:], seq_len, chat.pad, cfg.pack, report)
    if lead:
        print(f"skipjack: sft data: {report.describe()}; {len(train)} training sequences, "
              f"{100 * train.padding():.1f}% padding")  # fmt: skip
    return train, valid, chat
