"""`skipjack preprocess`: text or jsonl files -> a Megatron indexed dataset, or (`kind=sft`)
instruction records -> tokenized examples with loss masks; with progress."""

from __future__ import annotations

import os
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from skipjack.config import ConfigError, PreprocessConfig
from skipjack.data.indexed import read_documents, tokenize_documents, write_indexed
from skipjack.data.sft import chat_format
from skipjack.data.sft_store import SUFFIX, fingerprint, tokenize_with_progress, write_examples
from skipjack.data.tokenizer import Tokenizer, cached_bpe


def run_preprocess(cfg: PreprocessConfig) -> tuple[str, str]:
    """Tokenize `cfg.inputs` into `cfg.output_prefix`.bin/.idx; returns (prefix, tokenizer path).

    Without `cfg.tokenizer` a byte-level BPE is trained on the inputs and saved as
    `<output_prefix>.tokenizer.json`: pass that file as `data.tokenizer` when training.
    """
    if not cfg.inputs:
        raise ConfigError("inputs", "no input files; pass inputs='[a.txt,b.jsonl]'")
    inputs = [os.path.expanduser(p) for p in cfg.inputs]
    for path in inputs:
        if not os.path.isfile(path):
            raise ConfigError("inputs", f"{path} is not a file")
    prefix = os.path.expanduser(cfg.output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "sft":
        return preprocess_sft(cfg, inputs, prefix)
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        texts = [t for p in inputs for t in read_documents(p, cfg.json_key)]
        tokenizer = cached_bpe(texts, cfg.tokenizer_vocab_size, Path(cfg.cache_dir) / "tokenizers")
        tokenizer.save(f"{prefix}.tokenizer.json")
        tokenizer.path = f"{prefix}.tokenizer.json"

    total = sum(os.path.getsize(p) for p in inputs)
    columns = (
        TextColumn("[bold]preprocess"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} bytes  {task.fields[tokens]:,} tokens"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("preprocess", total=total, tokens=0)
        counts = {"tokens": 0}

        def documents():
            for path in inputs:
                for text in read_documents(path, cfg.json_key):
                    yield text
                    progress.advance(task, len(text.encode("utf-8", "replace")))

        def counted(docs):
            for ids in docs:
                counts["tokens"] += len(ids)
                progress.update(task, tokens=counts["tokens"])
                yield ids

        write_indexed(
            counted(tokenize_documents(documents(), tokenizer)), prefix, tokenizer.vocab_size
        )
        progress.update(task, completed=total)
    print(f"wrote {prefix}.bin/.idx ({counts['tokens']:,} tokens), tokenizer {tokenizer.path}")
    return prefix, tokenizer.path


def preprocess_sft(cfg: PreprocessConfig, inputs: list[str], prefix: str) -> tuple[str, str]:
    """Instruction records -> `<prefix>.sft.npz` (data/sft_store.py), for `data.paths`."""
    chat = chat_format(cfg, None)
    examples, report = tokenize_with_progress(inputs, chat, cfg.on_bad_record, shown=True)
    out = f"{prefix}{SUFFIX}"
    write_examples(out, examples, report, fingerprint(chat))
    tokens = sum(len(ids) for ids, _ in examples)
    trained = sum(sum(mask) for _, mask in examples)
    source = cfg.tokenizer or "the built-in corpus' tokenizer and the default template"
    print(f"wrote {out}: {report.describe()}; {tokens:,} tokens, {trained:,} with loss; "
          f"tokenized with {source}")  # fmt: skip
    return out, cfg.tokenizer or ""
