"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): trained locally or loaded from a file.

Training is deterministic for a fixed input order and cached by a digest of the text
and the vocabulary size, so every rank and every later run gets the same tokenizer. Byte-level
pre-tokenization means any text encodes: bytes that no merge covers fall back to byte tokens.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from skipjack.atomic import replacing

EOD = "<|endoftext|>"
PAD = "<|pad|>"


class Tokenizer:
    """The tokenizer a dataset was made with. Exposes `eod` and `pad` as megatron-core expects."""

    def __init__(self, hf: HFTokenizer, path: str | None = None):
        self.hf = hf
        self.path = path
        eod, pad = hf.token_to_id(EOD), hf.token_to_id(PAD)
        if eod is None:
            raise ValueError(f"tokenizer {path or ''} has no {EOD} token; skipjack needs it")
        self.eod = eod
        self.pad = pad if pad is not None else eod
        # megatron-core keys its index caches on this description of the tokenizer
        digest = hashlib.sha256(hf.to_str().encode()).hexdigest()[:16]
        self.unique_identifiers = {"class": "skipjack.Tokenizer", "sha256": digest}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.path.expanduser(str(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(HFTokenizer.from_file(path), path)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.hf.decode([int(i) for i in ids])

    def save(self, path: str | os.PathLike) -> None:
        with replacing(path) as tmp:
            self.hf.save(str(tmp))


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts` (deterministic for the same texts and size)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return Tokenizer(hf)


def cached_bpe(texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike) -> Tokenizer:
    """Train once, then load: the cache key is a digest of the texts and the vocabulary size."""
    digest = hashlib.sha256(str(vocab_size).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    path = (
        Path(os.path.expanduser(str(cache_dir)))
        / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    )
    if path.exists():
        return Tokenizer.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(texts, vocab_size)
    tokenizer.save(path)
    tokenizer.path = str(path)
    return tokenizer
