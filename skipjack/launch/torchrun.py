"""`launch=torchrun`: start torchrun for the user, from the same command line.

    skipjack train launch=torchrun launch.nproc_per_node=4 parallel.tp=2 ...
    skipjack train launch=torchrun launch.nodes=2 launch.rdzv_endpoint=node0:29400  # every node

The processes run `skipjack.cli train` with the same overrides, `launch=local` and this run's
directory, so they find their ranks in torchrun's variables and write into one run directory.
Rank 0's output reaches the console; every rank's output is also in `<run dir>/logs`.
`launch.max_restarts` restarts all processes after a failure (elastic), and with
`checkpoint.resume=auto` (the default) the restarted run continues from its newest checkpoint.
With in-memory snapshots and `checkpoint.memory.agent=launcher`, torchrun runs under the agent
keeper (checkpoint/keeper.py), which keeps the snapshot agents for as long as this launcher runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from skipjack.config import MemoryConfig, TorchrunLaunch

# torch 2.13's elastic agent shares its rendezvous store with the restarted workers, which then
# fail to rejoin; this turns the sharing off (docs/fault-tolerance.md)
REJOIN = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def keeps_agents(memory: MemoryConfig) -> bool:
    """Whether the launcher keeps the job's snapshot agents (runs the job under the keeper)."""
    return memory.interval > 0 and memory.agent == "launcher"


def under_keeper(memory: MemoryConfig, cmd: list[str]) -> list[str]:
    """`cmd`, run under the agent keeper when the launcher keeps the agents."""
    if not keeps_agents(memory):
        return cmd
    return [sys.executable, "-m", "skipjack.checkpoint.keeper", f"--root={memory.root}", "--", *cmd]


def run_id(run_dir: Path) -> str:
    """The job's id: the same on every machine and across restarts (one run directory)."""
    return hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]


def child_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The launcher's overrides for its processes: run locally, in this run directory."""
    keep = [o for o in overrides if not o.startswith(("launch=", "launch.", "hydra.run.dir="))]
    return [*keep, "launch=local", f"hydra.run.dir={run_dir}"]


def command(
    launch: TorchrunLaunch, run_dir: Path, overrides: list[str], memory: MemoryConfig
) -> list[str]:
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
        cmd += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={run_id(run_dir)}",
        ]
    else:
        cmd += ["--standalone"]
    train = [*cmd, "-m", "skipjack.cli", "train", *child_overrides(overrides, run_dir)]
    return under_keeper(memory, train)


def run(launch: TorchrunLaunch, run_dir: Path, overrides: list[str], memory: MemoryConfig) -> int:
    cmd = command(launch, run_dir, overrides, memory)
    nodes, procs = launch.nodes, launch.nproc_per_node
    print(
        f"skipjack: torchrun, {nodes} x {procs} processes, logs in {run_dir / 'logs'}", flush=True
    )
    env = dict(os.environ)
    if launch.max_restarts:
        env.setdefault(*REJOIN)
    if keeps_agents(memory):
        env["SKIPJACK_JOB_ID"] = run_id(run_dir)  # where the keeper and the trainers meet
    return subprocess.run(cmd, env=env).returncode
