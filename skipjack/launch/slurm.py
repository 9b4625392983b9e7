"""`launch=slurm`: a batch script in the run directory, submitted with sbatch.

    skipjack train launch=slurm launch.nodes=2 launch.nproc_per_node=8 launch.gpus_per_node=8 \
        launch.partition=gpu launch.time=24:00:00 checkpoint=sharded model=llama_1b ...

The script (`<run dir>/job.sbatch`) runs one task per node with `srun`; each task (`node.sh`)
starts torchrun for `nproc_per_node` processes with a c10d rendezvous on the job's first node,
and the processes run `skipjack.cli train` with the same overrides, `launch=local` and this
run's directory. The script asks SLURM to requeue the job on preemption or node failure; the
requeued job runs the same script in the same run directory, so `checkpoint.resume=auto`
continues from its newest checkpoint. SLURM's log is `<run dir>/slurm-<job id>.out` (local
rank 0 of every node); every rank's own log is under `<run dir>/logs/node-<n>/`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from skipjack.atomic import write_text
from skipjack.config import MemoryConfig, SlurmLaunch
from skipjack.launch.env import SLURM_PORT_BASE
from skipjack.launch.torchrun import REJOIN, child_overrides, under_keeper


def batch_script(launch: SlurmLaunch, run_dir: Path) -> str:
    """The sbatch script: resources, then one task per node running `node.sh`."""
    directives = [
        f"--job-name=skipjack-{run_dir.name}",
        f"--nodes={launch.nodes}",
        "--ntasks-per-node=1",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
    ]
    if launch.cpus_per_task:
        directives.append(f"--cpus-per-task={launch.cpus_per_task}")
    if launch.gpus_per_node:
        directives.append(f"--gpus-per-node={launch.gpus_per_node}")
    for name in ("partition", "account", "time"):
        if getattr(launch, name):
            directives.append(f"--{name}={getattr(launch, name)}")
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), *launch.extra_sbatch]
    return (
        "\n".join(lines)
        + f"""
set -euo pipefail
export SKIPJACK_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "skipjack: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${{SLURM_RESTART_COUNT:-0}}"
srun --kill-on-bad-exit=1 bash {shlex.quote(str(run_dir / "node.sh"))}
"""
    )


def node_script(
    launch: SlurmLaunch, run_dir: Path, overrides: list[str], memory: MemoryConfig
) -> str:
    """What each node's task runs: torchrun with a c10d rendezvous on the first node (under
    the agent keeper when the launcher keeps the snapshot agents)."""
    train = [sys.executable, "-m", "skipjack.cli", "train", *child_overrides(overrides, run_dir)]
    logs = shlex.quote(str(run_dir / "logs"))
    torchrun = shlex.join(under_keeper(memory, [sys.executable, "-m", "torch.distributed.run"]))
    name, value = REJOIN
    rejoin = f'export {name}="${{{name}:-{value}}}"\n' if launch.max_restarts else ""
    return f"""#!/bin/bash
set -euo pipefail
{rejoin}exec {torchrun} \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={launch.nproc_per_node} \\
    --rdzv-backend=c10d \\
    --rdzv-endpoint="$SKIPJACK_HEAD:$(({SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_BASE}))" \\
    --rdzv-id="$SLURM_JOB_ID" --max-restarts={launch.max_restarts} \\
    --log-dir={logs}/node-"$SLURM_NODEID" --tee=3 --local-ranks-filter=0 \\
    {shlex.join(train[1:])}
"""


def run(launch: SlurmLaunch, run_dir: Path, overrides: list[str], memory: MemoryConfig) -> int:
    script = run_dir / "job.sbatch"
    write_text(run_dir / "node.sh", node_script(launch, run_dir, overrides, memory))
    write_text(script, batch_script(launch, run_dir))
    if not launch.submit:
        print(f"skipjack: wrote {script}; submit it with: sbatch {script}")
        return 0
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode:
        print(f"skipjack: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job = result.stdout.strip().split(";")[0]
    print(f"skipjack: submitted job {job}; log {run_dir}/slurm-{job}.out, ranks {run_dir}/logs")
    return 0
