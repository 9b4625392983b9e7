"""The agent keeper (checkpoint.memory.agent=launcher): agents started on request, owned by the
keeper, and gone with the job's directory once the command ends, however it ends."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

from skipjack.checkpoint.keeper import keeper_pid
from skipjack.checkpoint.snapshot import agent_pid, job_directory, process_alive

# the job's command: node 0's first rank asks for its agent, says its pid, then waits
ASK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from skipjack.checkpoint.keeper import request_agent
    print(request_agent(Path(sys.argv[1]) / "node0", None), flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _keeper(tmp_path, job_id: str, seconds: float) -> tuple[subprocess.Popen, object]:
    job = job_directory(tmp_path, job_id)
    keeper = subprocess.Popen(
        [sys.executable, "-m", "skipjack.checkpoint.keeper", f"--root={tmp_path}", "--",
         sys.executable, "-c", ASK, str(job), str(seconds)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "SKIPJACK_JOB_ID": job_id},
    )  # fmt: skip
    return keeper, job


def test_the_keeper_starts_owns_and_removes_the_agents(tmp_path):
    keeper, job = _keeper(tmp_path, "kept", 0.5)
    agent = int(keeper.stdout.readline())
    assert agent == agent_pid(job / "node0") and keeper_pid(job) == keeper.pid
    assert f"--owner {keeper.pid}" in " ".join(open(f"/proc/{agent}/cmdline").read().split("\0"))
    assert keeper.wait(timeout=60) == 0
    assert not job.exists() and not process_alive(agent)


def test_a_terminated_keeper_ends_the_command_and_cleans_up(tmp_path):
    keeper, job = _keeper(tmp_path, "terminated", 600)
    agent = int(keeper.stdout.readline())
    keeper.send_signal(signal.SIGTERM)  # as scancel does
    assert keeper.wait(timeout=60) == 128 + signal.SIGTERM  # the command's status
    assert not job.exists()
    deadline = time.monotonic() + 10
    while process_alive(agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(agent)


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (an orphan in a container whose init does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_keeper_leaves_its_agents_to_clean_up_after_themselves(tmp_path):
    keeper, job = _keeper(tmp_path, "killed", 600)
    agent = int(keeper.stdout.readline())
    command = open(f"/proc/{keeper.pid}/task/{keeper.pid}/children").read().split()
    keeper.kill()
    keeper.wait()
    try:
        deadline = time.monotonic() + 10
        while not (_exited(agent) and not job.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not job.exists() and _exited(agent)
    finally:
        for pid in command:  # the orphaned command (the agent too, if it were still there)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
