"""The snapshot agent: one process per node that owns the node's snapshot directory under
/dev/shm and outlives the trainers.

The node's first rank starts it (`ensure_agent`; `checkpoint.memory.agent=trainer`), or asks
the keeper skipjack's launcher runs on the machine to (`agent=launcher`, keeper.py), in its own
session, so that a launcher killing its workers' process group (torchrun does) leaves it
running; it survives a crash of every trainer of the node and keeps their snapshots (files in
/dev/shm, not `multiprocessing.shared_memory`, whose segments the resource tracker unlinks when
their creator dies) for the restarted ranks. The agent removes the directory and exits when the
job ends (`stop_agent`: a `stop` file), or when its owner is gone: the keeper, or else every
registered trainer for `linger` seconds (a job that crashed for good); so it leaves nothing
behind either way.

    python -m skipjack.checkpoint.snapshot <directory> [--linger SECONDS] [--owner PID]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from skipjack.atomic import replacing, write_text

POLL = 0.05  # seconds between the agent's looks at its directory


def environment_job_id() -> str | None:
    """The launcher's id of this job, the same across restarts of its ranks."""
    for name in ("SKIPJACK_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return None


def job_directory(root: Path, job: str) -> Path:
    """Where the snapshots of job `job` live on a machine: one `node<n>` directory per node."""
    return root / f"skipjack-{hashlib.sha1(job.encode()).hexdigest()[:12]}"


def process_alive(pid: int) -> bool:
    try:  # the agent is the child of the trainer that started it: reap it once it exits
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # another process's child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def agent_pid(directory: Path) -> int | None:
    """The pid of `directory`'s agent if it runs."""
    pid = read_int(directory / "agent.pid")
    return pid if pid is not None and process_alive(pid) else None


def ensure_agent(
    directory: Path, linger: float, group: list[int] | None = None, owner: int | None = None
) -> int:
    """Start `directory`'s agent unless it runs with these settings; returns its pid. `group`:
    (nodes, ranks per node, group size, parity) when the agent makes parity (parity.py);
    `owner`: the pid of the process the agent lives as long as (the keeper, keeper.py), instead
    of the trainers and `linger`. An agent of the job's previous shape hands the directory
    over: it exits and leaves the snapshots (a job come back in another layout restores from
    them), its parity goes."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({"linger": linger, "group": group, "owner": owner})
    pid = agent_pid(directory)
    if pid is not None:
        if _read(directory / "agent.json") == settings:
            return pid
        (directory / "handover").touch()
        _wait_gone(pid, 30.0)
        for name in ("parity", "incoming"):
            shutil.rmtree(directory / name, ignore_errors=True)
    for name in ("stop", "handover", "agent.port"):
        (directory / name).unlink(missing_ok=True)
    write_text(directory / "agent.json", settings)
    log = open(directory / "agent.log", "ab")  # noqa: SIM115 (the agent's own from here on)
    process = subprocess.Popen(
        [sys.executable, "-m", "skipjack.checkpoint.snapshot", str(directory), "--linger",
         str(linger), *(["--group", *map(str, group)] if group else []),
         *(["--owner", str(owner)] if owner else [])],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 30
    while agent_pid(directory) != process.pid:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the snapshot agent of {directory} did not start; see agent.log")
        time.sleep(0.01)
    return process.pid


def register_trainer(directory: Path, rank: int) -> None:
    trainers = directory / "trainers"
    trainers.mkdir(parents=True, exist_ok=True)
    (trainers / f"rank{rank}.pid").write_text(str(os.getpid()))


def stop_agent(directory: Path, timeout: float = 30.0) -> None:
    """Ask `directory`'s agent to clean up and exit; wait until it has."""
    pid = agent_pid(directory)
    if pid is None:
        shutil.rmtree(directory, ignore_errors=True)
        return
    (directory / "stop").touch()
    _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL / 4)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def run_agent(
    directory: Path, linger: float, group: list[int] | None = None, owner: int | None = None
) -> None:
    (directory / "agent.pid").write_text(str(os.getpid()))
    last_seen = time.monotonic()
    parity, state, server = None, {}, None
    if group:
        # imported once the pid is out (numpy and zfec come with it, not torch)
        from skipjack.checkpoint.parity import NodeGroup
        from skipjack.checkpoint.transport import Server

        nodes, per_node, size, m = group
        node = int(directory.name.removeprefix("node"))
        parity = NodeGroup(directory.parent, node, nodes, per_node, size, m)
        server = Server(parity.files, lambda: parity.peers["token"]).start()
        write_text(directory / "agent.port", str(server.port))
    peers = Peers(directory / "peers.json")
    while True:
        if (directory / "handover").exists():
            return  # a new agent takes the directory as it is
        if (directory / "stop").exists() or not directory.is_dir():  # ended, or removed
            break
        if parity is not None and peers.changed():
            parity.connect(peers.value)
        if parity is not None and peers.value is not None:
            try:
                parity.advance(state)
            except Exception as error:  # a peer's files mid-write, a node gone: next look
                print(f"snapshot agent: {type(error).__name__}: {error}", flush=True)
        if owner is not None:
            if not process_alive(owner):
                break
        elif any(process_alive(pid) for pid in _trainers(directory)):
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen > linger:
            break
        time.sleep(POLL)
    if server is not None:
        server.shutdown()
    shutil.rmtree(directory, ignore_errors=True)
    parent = directory.parent  # the job's: gone with its last node of this machine
    if parent.name.startswith("skipjack-") and not any(parent.glob("node*")):
        shutil.rmtree(parent, ignore_errors=True)


def _trainers(directory: Path) -> list[int]:
    pids = (read_int(p) for p in (directory / "trainers").glob("*.pid"))
    return [pid for pid in pids if pid is not None]


class Peers:
    """The group's addresses and token as the node's trainers last wrote them (`write_peers`),
    re-read when the file changes (after every start of the job)."""

    def __init__(self, path: Path):
        self.path, self.value, self._stamp = path, None, None

    def changed(self) -> bool:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if stamp == self._stamp:
            return False
        try:
            self.value, self._stamp = json.loads(self.path.read_text()), stamp
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return True


def write_peers(directory: Path, peers: dict) -> None:
    """Hand the agent of `directory` the group's addresses and the job's token (readable by the
    user only: the token lets its holder read the node's snapshots)."""
    path = directory / "peers.json"
    with replacing(path) as tmp:
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(peers))


def agent_port(directory: Path, timeout: float = 60.0) -> int:
    """The port `directory`'s agent serves its peers on, once it does."""
    deadline = time.monotonic() + timeout
    while (port := read_int(directory / "agent.port")) is None:
        if agent_pid(directory) is None or time.monotonic() > deadline:
            raise RuntimeError(f"the snapshot agent of {directory} serves no port; see agent.log")
        time.sleep(0.01)
    return port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="skipjack's per-node snapshot agent")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--linger", type=float, default=300.0)
    parser.add_argument("--group", type=int, nargs=4, metavar=("NODES", "PER_NODE", "SIZE", "M"))
    parser.add_argument("--owner", type=int, help="live as long as this process (the keeper)")
    args = parser.parse_args(argv)
    run_agent(args.directory, args.linger, args.group, args.owner)


if __name__ == "__main__":
    main()
