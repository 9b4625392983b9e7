"""The agent keeper (`checkpoint.memory.agent=launcher`): skipjack's launcher runs the job's
command under it, one keeper per machine, and the keeper starts the snapshot agents of that
machine's nodes when their trainers ask, owns them for the launcher's lifetime, and stops them
and removes the job's snapshot directory when the command ends, however it ends.

Under `agent=trainer` a node's first rank starts its agent, which lives on while any trainer
of the node runs and for `linger` seconds after the last (the job's chance to restart). Under
`agent=launcher` the agents are the keeper's: they live while it does, so a restart may take
as long as it takes, and a job that fails for good leaves nothing behind the moment its
launcher returns. A node's agent is asked for by its first rank (`request_agent`), because
which nodes a machine holds is only known once the launcher's rendezvous has numbered them.

    python -m skipjack.checkpoint.keeper --root /dev/shm -- <command> [args...]

The job's snapshot directory comes from the environment (`environment_job_id`), as the
trainers find it: the launcher sets SKIPJACK_JOB_ID, or SLURM's job id is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from skipjack.atomic import write_text
from skipjack.checkpoint.snapshot import (
    POLL,
    agent_pid,
    ensure_agent,
    environment_job_id,
    job_directory,
    process_alive,
    read_int,
    stop_agent,
)

WANT = "agent.want"  # a node's request for its agent: the agent's group settings, as JSON
REFUSED = "agent.want.error"  # why the keeper could not start it


def keeper_pid(job: Path) -> int | None:
    """The pid of the keeper of the job directory `job` on this machine, if it runs."""
    pid = read_int(job / "keeper.pid")
    return pid if pid is not None and process_alive(pid) else None


def request_agent(directory: Path, group: list[int] | None, timeout: float = 60.0) -> int:
    """Ask this machine's keeper (it runs: `keeper_pid`) for the agent of node directory
    `directory` (with the parity `group`, as `ensure_agent` takes it); returns its pid once it
    runs."""
    job = directory.parent
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REFUSED).unlink(missing_ok=True)
    write_text(directory / WANT, json.dumps(group))
    deadline = time.monotonic() + timeout
    while (directory / WANT).exists() or agent_pid(directory) is None:
        error = directory / REFUSED
        if error.exists():
            raise RuntimeError(f"the keeper could not start the agent of {directory}: "
                               f"{error.read_text()}")  # fmt: skip
        if keeper_pid(job) is None or time.monotonic() > deadline:
            raise RuntimeError(f"the keeper of {job} did not start the agent of {directory}")
        time.sleep(POLL / 5)
    return agent_pid(directory)


def serve(job: Path) -> None:
    """Start the agents asked for under `job` (one look)."""
    for want in job.glob(f"node*/{WANT}"):
        directory = want.parent
        try:
            group = json.loads(want.read_text())
            ensure_agent(directory, linger=0.0, group=group, owner=os.getpid())
        except (OSError, ValueError, RuntimeError) as error:
            write_text(directory / REFUSED, f"{type(error).__name__}: {error}")
        want.unlink(missing_ok=True)


def keep(job: Path, command: list[str]) -> int:
    """Run `command`, serving its agents meanwhile; then stop them and remove `job`. Returns
    the command's exit status (128 + the signal that ended it)."""
    job.mkdir(parents=True, exist_ok=True)
    write_text(job / "keeper.pid", str(os.getpid()))
    child = subprocess.Popen(command)
    # SIGTERM (scancel, kill): hand it to the command (torchrun ends its workers), then clean up
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        while child.poll() is None:
            serve(job)
            time.sleep(POLL)
    except KeyboardInterrupt:  # Ctrl-C reached the command too: let it end, then clean up
        child.wait()
    finally:
        for directory in job.glob("node*"):
            stop_agent(directory)
        shutil.rmtree(job, ignore_errors=True)
    code = child.returncode
    return code if code >= 0 else 128 - code  # a signal's death as a shell reports it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="skipjack's keeper of snapshot agents")
    parser.add_argument("--root", default="/dev/shm", help="checkpoint.memory.root")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- and the job's command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the job's command after --")
    job_id = environment_job_id()
    if job_id is None:
        parser.error("no job id in the environment: set SKIPJACK_JOB_ID (or run under SLURM)")
    job = job_directory(Path(args.root), job_id)
    sys.exit(keep(job, command))


if __name__ == "__main__":
    main()
