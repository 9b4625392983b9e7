"""launch=slurm: the batch script, and a real job on a one-node SLURM cluster on localhost.

The cluster fixture installs Debian's slurm-wlm (SLURM 22.05, munge) if it is missing, which needs
root and apt (as on the CI machine), then starts munged, slurmctld and slurmd with the settings in
../shared/notes/local-slurm.md, and stops them afterwards. By hand:

    .venv/bin/python -m pytest tests/launch/test_slurm.py
"""

import getpass
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skipjack.checkpoint.marker import complete_checkpoints, verify
from skipjack.checkpoint.snapshot import job_directory
from skipjack.config import MemoryConfig, SlurmLaunch
from skipjack.launch.slurm import batch_script, node_script
from skipjack.testing.cli import run_skipjack
from skipjack.trainer.metrics import read_metrics


def test_batch_script_asks_for_resources_and_runs_torchrun_once_per_node(tmp_path):
    launch = SlurmLaunch(
        nodes=2,
        nproc_per_node=8,
        gpus_per_node=8,
        cpus_per_task=32,
        partition="gpu",
        account="lab",
        time="24:00:00",
        extra_sbatch=["#SBATCH --exclusive"],
    )
    script = batch_script(launch, tmp_path)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=24:00:00",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
        "#SBATCH --exclusive",
    ):
        assert line in script.splitlines()
    assert f"srun --kill-on-bad-exit=1 bash {tmp_path / 'node.sh'}" in script
    overrides = ["launch=slurm", "launch.nodes=2", "model=llama_1b"]
    node = node_script(launch, tmp_path, overrides, MemoryConfig())
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8' in node
    assert "--rdzv-backend=c10d" in node and '--rdzv-id="$SLURM_JOB_ID"' in node
    assert node.rstrip().endswith(f"train model=llama_1b launch=local hydra.run.dir={tmp_path}")
    subprocess.run(["bash", "-n"], input=script + node, text=True, check=True)  # valid shell
    kept = node_script(launch, tmp_path, overrides, MemoryConfig(interval=1, agent="launcher"))
    assert "-m skipjack.checkpoint.keeper --root=/dev/shm -- " in kept  # the machine's agents
    assert kept.split("-- ", 1)[1].startswith(f"{sys.executable} -m torch.distributed.run")


SLURM_CONF = """\
ClusterName=skipjack
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName={host} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def sh(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def wait_for(job: str, seconds: float) -> None:
    """Until SLURM no longer lists `job` (it ended)."""
    deadline = time.time() + seconds
    while sh("squeue", "-h", "-j", job).stdout.strip():
        assert time.time() < deadline, f"job {job} still queued or running"
        time.sleep(1)


@pytest.fixture(scope="module")
def slurm_cluster():
    if shutil.which("slurmd") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", env=env)
        sh("apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", env=env)
    host = socket.gethostname().split(".")[0]
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
    Path("/run/munge").mkdir(exist_ok=True)
    for path in (Path("/run/munge"), key.parent, key):
        shutil.chown(path, "munge", "munge")
    key.chmod(0o400)
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
    Path("/etc/slurm/slurm.conf").write_text(SLURM_CONF.format(host=host, cpus=os.cpu_count()))
    sh("su", "-s", "/bin/sh", "munge", "-c", "munged")
    sh("slurmctld")
    sh("slurmd")
    try:
        deadline = time.time() + 60
        while "idle" not in sh("sinfo", "-h", "-o", "%t").stdout:
            assert time.time() < deadline, "the SLURM node never became idle"
            time.sleep(1)
        yield
    finally:
        subprocess.run(["scancel", "--user", getpass.getuser()])
        deadline = time.time() + 30
        while sh("squeue", "-h").stdout.strip() and time.time() < deadline:
            time.sleep(1)
        for pidfile in ("/run/slurmd.pid", "/run/slurmctld.pid", "/run/munge/munged.pid"):
            if Path(pidfile).exists():
                subprocess.run(["kill", Path(pidfile).read_text().strip()])


@pytest.mark.slow
def test_launch_slurm_runs_a_job_on_a_real_cluster(slurm_cluster, tmp_path):
    result = run_skipjack(
        "train",
        "launch=slurm",
        "launch.nproc_per_node=2",
        "parallel.dp=2",
        "experiment=smoke",
        "train.steps=6",
        "train.val_interval=3",
        "train.micro_batch_size=4",
        "logging.plot=false",
        "hydra.run.dir=run",
        # snapshots every 2 steps, their agent kept by the keeper node.sh runs torchrun under
        *("checkpoint.memory.interval=2", "checkpoint.memory.agent=launcher"),
        cwd=tmp_path,
        timeout=300,
    )
    job = re.search(r"submitted job (\d+)", result.stdout).group(1)
    wait_for(job, 600)
    run_dir = tmp_path / "run"
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "skipjack: done." in log, log[-3000:]
    assert "dp=2" in log
    assert sum("loss" in r for r in read_metrics(run_dir)) == 6
    ranks = sorted(p.parent.name for p in (run_dir / "logs").rglob("stdout.log"))
    assert ranks == ["0", "1"]
    assert not job_directory(Path("/dev/shm"), job).exists()  # the keeper took it away


@pytest.mark.slow
def test_hydra_sweep_goes_to_slurm_through_submitit(slurm_cluster, tmp_path):
    run_skipjack(
        "train",
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.timeout_min=10",
        "hydra.sweep.dir=sweep",
        "experiment=smoke",
        "train.steps=4",
        "train.val_interval=2",
        "logging.plot=false",
        "logging.progress=false",
        "optim.lr=1e-3,3e-3",
        cwd=tmp_path,
    )
    for job in ("0", "1"):
        assert sum("loss" in r for r in read_metrics(tmp_path / "sweep" / job)) == 4


def srun_job(tmp_path: Path, *overrides: str) -> str:
    """A plain 2-task batch job, `srun python -m skipjack.cli train <overrides>` with no
    launcher; returns its log once it ended."""
    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2\n"
        f"#SBATCH --output={tmp_path}/slurm-%j.out\n#SBATCH --chdir={tmp_path}\n"
        f"srun {sys.executable} -m skipjack.cli train {' '.join(overrides)}\n"
    )
    job = sh("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    wait_for(job, 300)
    return (tmp_path / f"slurm-{job}.out").read_text()


@pytest.mark.slow
def test_srun_tasks_find_their_ranks_save_into_one_run_directory_and_resume(
    slurm_cluster, tmp_path
):
    """The ranks come from SLURM's variables (launch/env.py); both tasks' shards land in rank
    0's run directory, the last step's checkpoint verifies, and a second job resumes bitwise."""
    common = [
        *("parallel.tp=2", "experiment=smoke", "train.steps=4", "train.val_interval=2"),
        *("logging.plot=false", "logging.progress=false", "checkpoint=sharded"),
        "checkpoint.interval=2",
    ]
    log = srun_job(tmp_path, *common, f"hydra.run.dir={tmp_path}/a")
    assert "tp=2" in log and log.count("skipjack: done.") == 1, log[-3000:]
    saved = complete_checkpoints(tmp_path / "a" / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002", "step-0000004"]
    assert verify(saved[1]) == 4 and not (tmp_path / "checkpoints").exists()
    resume = f"checkpoint.resume={saved[0]}"
    log = srun_job(tmp_path, *common, resume, f"hydra.run.dir={tmp_path}/b")
    assert f"resumed from {saved[0]} (step 2)" in log, log[-3000:]
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r}
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in resumed)
