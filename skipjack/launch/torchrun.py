"""`launch=torchrun`: start torchrun for the user, from the same command line.

    skipjack train launch=torchrun launch.nproc_per_node=4 parallel.tp=2 ...
    skipjack train launch=torchrun launch.nodes=2 launch.rdzv_endpoint=node0:29400  # every node

The processes run `skipjack.cli train` with the same overrides, `launch=local` and this run's
directory, so they find their ranks in torchrun's variables and write into one run directory.
Rank 0's output reaches the console; every rank's output is also in `<run dir>/logs`.
`launch.max_restarts` restarts all processes after a failure (elastic), and with
`checkpoint.resume=auto` (the default) the restarted run continues from its newest checkpoint.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from skipjack.config import TorchrunLaunch


def child_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The launcher's overrides for its processes: run locally, in this run directory."""
    keep = [o for o in overrides if not o.startswith(("launch=", "launch.", "hydra.run.dir="))]
    return [*keep, "launch=local", f"hydra.run.dir={run_dir}"]


def command(launch: TorchrunLaunch, run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={launch.nproc_per_node}",
        f"--nnodes={launch.nodes}",
        f"--max-restarts={launch.max_restarts}",
        f"--log-dir={run_dir / 'logs'}",
        "--tee=3",
        "--local-ranks-filter=0",
    ]
    if launch.nodes > 1:
        run_id = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
        cmd += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={run_id}",
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "skipjack.cli", "train", *child_overrides(overrides, run_dir)]


def run(launch: TorchrunLaunch, run_dir: Path, overrides: list[str]) -> int:
    cmd = command(launch, run_dir, overrides)
    nodes, procs = launch.nodes, launch.nproc_per_node
    print(
        f"skipjack: torchrun, {nodes} x {procs} processes, logs in {run_dir / 'logs'}", flush=True
    )
    return subprocess.run(cmd).returncode
