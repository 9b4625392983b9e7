"""Tokenized instruction sets on disk: what `skipjack preprocess kind=sft` writes and what
`data=sft` keeps in its cache, so that rendering and tokenizing happen once.

A file `<name>.sft.npz` holds every example of its records as token ids and loss mask
(concatenated, with offsets), the reading report (malformed records with their lines) and the
fingerprint of the tokenizer and chat template that made it. `data.paths` may list such files
beside jsonl files; a jsonl file is read once per (file size and time, tokenizer, template) and
its examples kept under `<data.cache_dir>/sft/`. A file made with another tokenizer or template
is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from skipjack.atomic import replacing
from skipjack.config import ConfigError
from skipjack.data.sft import ChatFormat, Report, read_examples

SUFFIX = ".sft.npz"
FORMAT = 1  # of the rendering and the file: part of every fingerprint
Examples = list[tuple[list[int], list[bool]]]


def fingerprint(chat: ChatFormat) -> str:
    """What tokenized examples depend on: the tokenizer, the template, the special tokens."""
    text = json.dumps(
        [FORMAT, chat.tokenizer.to_str(), chat.template, chat.specials], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_examples(path: str | Path, examples: Examples, report: Report, made_by: str) -> None:
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    ids = [i for example, _ in examples for i in example]
    mask = [m for _, example in examples for m in example]
    meta = {"fingerprint": made_by, "bad": report.bad, "examples": report.examples}
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=np.array(ids, dtype=np.int32),
            mask=np.array(mask, dtype=bool),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            meta=np.array(json.dumps(meta)),
        )


def read_examples_file(path: str | Path, made_by: str) -> tuple[Examples, Report]:
    """The examples of a tokenized file made with the fingerprint `made_by`."""
    with np.load(Path(path).expanduser()) as data:
        meta = json.loads(str(data["meta"]))
        if meta["fingerprint"] != made_by:
            raise ConfigError(
                "data.paths",
                f"{path} was tokenized with another tokenizer or chat template than this job's; "
                "run `skipjack preprocess kind=sft` again with this job's tokenizer",
            )
        ids, mask, offsets = data["ids"].tolist(), data["mask"].tolist(), data["offsets"]
    examples = [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return examples, Report(meta["examples"], [tuple(bad) for bad in meta["bad"]])


def tokenize_with_progress(
    paths: Sequence[str], chat: ChatFormat, on_bad_record: str, shown: bool
) -> tuple[Examples, Report]:
    """`read_examples` of jsonl files, with a progress bar (bytes, examples, ETA) if `shown`."""
    if not shown:
        return read_examples(paths, chat, on_bad_record)
    total = sum(os.path.getsize(Path(p).expanduser()) for p in paths)
    columns = (
        TextColumn("[bold]tokenize"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} bytes {task.fields[examples]} ex."),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("tokenize", total=total, examples=0)
        counts = {"examples": 0}

        def advance(line_bytes: int) -> None:
            counts["examples"] += 1
            progress.update(task, advance=line_bytes, examples=counts["examples"])

        return read_examples(paths, chat, on_bad_record, advance)


def load_examples(
    paths: Sequence[str],
    chat: ChatFormat,
    on_bad_record: str,
    cache_dir: str,
    shown: bool = False,
) -> tuple[Examples, Report]:
    """The examples of `paths` in order: tokenized files as they are, jsonl files from the
    cache (filled on first use, with a progress bar if `shown`)."""
    made_by = fingerprint(chat)
    examples, report = [], Report()
    for path in paths:
        if path.endswith(SUFFIX):
            got, found = read_examples_file(path, made_by)
            if found.bad and on_bad_record == "fail":
                source, line, why = found.bad[0]
                raise ConfigError(
                    "data.on_bad_record",
                    f"{path} was made skipping malformed records, the first {source}:{line}: "
                    f"{why} (or set it to skip)",
                )
        else:
            cached = _cache_file(path, made_by, on_bad_record, cache_dir)
            if cached.is_file():
                got, found = read_examples_file(cached, made_by)
            else:
                got, found = tokenize_with_progress([path], chat, on_bad_record, shown)
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_examples(cached, got, found, made_by)
        examples += got
        report.bad += found.bad
    report.examples = len(examples)
    return examples, report


def _cache_file(path: str, made_by: str, on_bad_record: str, cache_dir: str) -> Path:
    source = Path(path).expanduser().resolve()
    stat = source.stat()
    key = json.dumps([str(source), stat.st_size, stat.st_mtime_ns, made_by, on_bad_record])
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "sft" / f"{name}{SUFFIX}"
