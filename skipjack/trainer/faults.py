"""Fault injection, to test recovery as a user would meet a crash: `SKIPJACK_KILL=<rank>@<step>`
makes global rank <rank> SIGKILL itself as step <step> starts, on the job's first attempt only
(torchrun's TORCHELASTIC_RESTART_COUNT unset or 0), so the restarted job runs through
(docs/fault-tolerance.md)."""

from __future__ import annotations

import os
import signal


def inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get("SKIPJACK_KILL")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    victim, _, at = spec.partition("@")
    if int(victim) == rank and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
