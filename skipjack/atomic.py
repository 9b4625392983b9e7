"""Writing so that nothing a user keeps is ever half-written: into a temporary name next to the
target, then renamed over it (a rename within a directory is atomic)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _temporary(path: Path) -> Path:
    # the target's suffix last: writers that pick a format by suffix (matplotlib) keep working
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name; once the block is done, it replaces `path`."""
    path = Path(path)
    tmp = _temporary(path)
    yield tmp
    os.replace(tmp, path)


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; once the block is done, it replaces `path`."""
    path = Path(path)
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
