"""`skipjack` run as a user runs it, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # this environment's scripts: skipjack, torchrun


def run_skipjack(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`skipjack <args>` in `cwd`; asserts it exits 0, showing the end of its output if not."""
    result = subprocess.run(
        [BIN / "skipjack", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
