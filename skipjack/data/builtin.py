"""The embedded default corpus: the Python standard library's own source files.

About 12 MB of real text on every machine that runs Python, found at run time from `sysconfig`
(test folders and installed packages skipped). Files are ordered by a hash of their relative
path, a fixed shuffle, so the validation documents that megatron-core's split takes from the end
are a spread of modules rather than the alphabet's tail. First use trains the tokenizer and writes
an indexed dataset into the cache; later runs reuse both.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

from skipjack.data.indexed import tokenize_documents, write_indexed
from skipjack.data.tokenizer import Tokenizer, cached_bpe

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def corpus_files(root: str | None = None) -> list[Path]:
    """The corpus' .py files in their fixed order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for directory, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no Python source under {base}; use data=indexed instead")
    return sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(base)).encode()).digest())


def corpus_texts(root: str | None = None) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(root)]


def prepare_builtin(
    cache_dir: str, vocab_size: int, tokenizer_path: str | None = None
) -> tuple[str, Tokenizer]:
    """(indexed dataset prefix, tokenizer) of the built-in corpus, made once into `cache_dir`."""
    cache = Path(os.path.expanduser(cache_dir))
    texts = corpus_texts()
    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tokenizer = cached_bpe(texts, vocab_size, cache / "tokenizers")
    key = hashlib.sha256(tokenizer.hf.to_str().encode())
    for text in texts:
        key.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    prefix = str(cache / "builtin" / f"stdlib-{key.hexdigest()[:16]}")
    if not os.path.exists(prefix + ".idx"):
        write_indexed(tokenize_documents(texts, tokenizer), prefix, tokenizer.vocab_size)
    return prefix, tokenizer
