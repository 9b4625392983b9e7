"""launch=ray: a Ray Train job on a local Ray cluster with 2 CPU workers, end to end; a worker
killed mid-run makes Ray restart the group, which resumes from its snapshots in memory (the
persistent checkpoint is there too)."""

import os
import signal
import subprocess
import time

import pytest

from skipjack.checkpoint.marker import complete_checkpoints
from skipjack.testing.cli import BIN
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow


def ray_workers() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::RayTrainWorker" in line]


def test_ray_job_survives_a_killed_worker_by_resuming(tmp_path):
    proc = subprocess.Popen(
        [
            BIN / "skipjack",
            "train",
            "launch=ray",
            "launch.num_workers=2",
            "launch.max_failures=1",
            "parallel.dp=2",
            "experiment=smoke",
            "train.steps=40",
            "train.seq_len=64",
            "train.micro_batch_size=4",
            "train.val_interval=40",
            "checkpoint=sharded",
            "checkpoint.interval=5",
            "checkpoint.memory.interval=1",
            "logging.plot=false",
            "logging.progress=false",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "run"
    try:
        deadline = time.time() + 300
        while not complete_checkpoints(run_dir / "checkpoints"):
            assert time.time() < deadline and proc.poll() is None, "no checkpoint was written"
            time.sleep(0.2)
        killed = ray_workers()[-1]
        os.kill(killed, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "of the memory tier" in output, output[-3000:]
    steps = sorted({r["step"] for r in read_metrics(run_dir) if "loss" in r})
    assert steps[-1] == 40 and "skipjack: done." in output
