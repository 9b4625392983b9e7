"""Fault injection, to test recovery as a user would meet a crash: `SKIPJACK_KILL=<rank>@<step>`
makes global rank <rank> SIGKILL itself as step <step> starts (once the snapshots and saves of
the steps before it are written, parity included, so that what a restart finds does not depend
on timing), on the job's first attempt only
(torchrun's TORCHELASTIC_RESTART_COUNT unset or 0), so the restarted job runs through; the
rank says so first, with the time (Unix seconds) of the kill;
`<rank>@<step>:node` loses the rank's whole node: its snapshot agent is killed and the node's
snapshots removed first, as if the machine were gone; several, comma-separated
(docs/fault-tolerance.md)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from skipjack.checkpoint.snapshot import agent_pid


def inject_fault(
    rank: int, step: int, node: Path | None = None, settle: Callable[[], None] = lambda: None
) -> None:
    """`node`: the directory of this rank's node's snapshots, if it has any; `settle`:
    collective, returns once every rank's saves in flight are complete (every rank calls this
    at every step and reads the same specs, so all of them settle before any is killed)."""
    specs = os.environ.get("SKIPJACK_KILL", "")
    if not specs or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    kills = {}
    for spec in specs.split(","):
        victim, _, rest = spec.partition("@")
        at, _, what = rest.partition(":")
        if int(at) == step:
            kills[int(victim)] = what
    if not kills:
        return
    settle()
    if rank not in kills:
        return
    if kills[rank] == "node" and node is not None:
        pid = agent_pid(node)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(node, ignore_errors=True)
    lost = "its node" if kills[rank] == "node" else "itself"
    now = time.time()
    print(f"skipjack: SKIPJACK_KILL: rank {rank} kills {lost} at step {step}, time {now:.3f}",
          flush=True)  # fmt: skip
    os.kill(os.getpid(), signal.SIGKILL)
