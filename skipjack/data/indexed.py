"""Megatron indexed datasets through megatron-core: writing (preprocess) and reading (GPTDataset).

A dataset is a prefix with `<prefix>.bin` (token ids) and `<prefix>.idx` (sequence index); each
document ends with the tokenizer's end-of-document token. Writers build under a temporary name and
rename the .bin then the .idx, so a prefix whose .idx exists is complete. megatron-core's modules
are imported at first use (skipjack/megatron_core.py).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from skipjack.batch import IGNORE_INDEX, MicroBatch
from skipjack.data.tokenizer import Tokenizer
from skipjack.megatron_core import megatron_module

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset


def token_dtype(vocab_size: int) -> type[np.number]:
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed(documents: Iterable[Sequence[int]], prefix: str, vocab_size: int) -> str:
    """Write token-id documents (eod already appended) as `<prefix>.bin/.idx`, atomically."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = megatron_module("datasets.indexed_dataset").IndexedDatasetBuilder(
        f"{tmp}.bin", dtype=token_dtype(vocab_size)
    )
    for ids in documents:
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return prefix


def read_documents(path: str, json_key: str) -> Iterator[str]:
    """Documents of one file: a .jsonl holds one per line (under `json_key`), else the file."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    yield record[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{line_no}: expected a JSON object with key {json_key!r} ({e})"
                    ) from e
    else:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def tokenize_documents(
    texts: Iterable[str], tokenizer: Tokenizer, batch: int = 64
) -> Iterator[list[int]]:
    """Token ids of each text with end-of-document appended, encoded in parallel batches."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from (ids + [tokenizer.eod] for ids in tokenizer.encode_batch(pending))
            pending = []
    if pending:
        yield from (ids + [tokenizer.eod] for ids in tokenizer.encode_batch(pending))


def open_indexed(prefix: str) -> IndexedDataset:
    indexed = megatron_module("datasets.indexed_dataset")
    return indexed.IndexedDataset(prefix, multimodal=False, mmap=True)


def build_gpt_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    seq_len: int,
    seed: int,
    sizes: tuple[int, int],
    tokenizer: Tokenizer,
    cache_dir: str,
) -> tuple[GPTDataset, GPTDataset]:
    """Train and validation datasets of `seq_len`-token samples over a (weighted) blend.

    Documents are split between train/valid/test by `split` (disjoint document ranges of every
    dataset); samples concatenate documents across boundaries, shuffled by `seed`. Index files are
    cached under `cache_dir`. Needs a process group (megatron-core asks for the rank) and must be
    called on every rank of it (rank 0 builds first).
    """
    gpt = megatron_module("datasets.gpt_dataset")
    config = gpt.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blended = megatron_module("datasets.blended_megatron_dataset_builder")
        train, valid, _ = blended.BlendedMegatronDatasetBuilder(
            gpt.GPTDataset, [sizes[0], sizes[1], 0], lambda: True, config
        ).build()
    return train, valid


def sample_batch(dataset, indices: Sequence[int]) -> MicroBatch:
    """The micro-batch of dataset samples `indices`; labels IGNORE_INDEX where the loss is
    masked."""
    samples = [dataset[int(i)] for i in indices]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    mask = torch.stack([s["loss_mask"] for s in samples])
    packed = {k: torch.stack([s[k] for s in samples]) for k in ("positions", "documents")
              if k in samples[0]}  # fmt: skip
    return MicroBatch(tokens, labels.masked_fill(mask == 0, IGNORE_INDEX), **packed)
