"""Rank discovery from each launcher's environment."""

import pytest

from skipjack.launch.env import RankInfo, backend, discover, expand_hostlist


@pytest.mark.parametrize(
    "hostlist,hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[9-11],login1", ["a9", "a10", "a11", "login1"]),
        ("n[1,3],m[002-003]", ["n1", "n3", "m002", "m003"]),
    ],
)
def test_slurm_host_lists_expand(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_torchrun_and_ray_variables_are_taken_as_they_are():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "1234",
    }
    assert discover(env) == RankInfo("env", 3, 1, 4, "h0", 1234)


def test_srun_tasks_agree_on_the_master_without_talking():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[03-06]",
        "SLURM_JOB_NODELIST": "gpu[01-06]",
        "SLURM_JOB_ID": "123456",
    }
    info = discover(env)
    assert info == RankInfo("slurm", 5, 1, 8, "gpu03", 20000 + 123456 % 20000)
    assert info.env() == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_a_single_task_or_no_launcher_is_a_world_of_one():
    assert discover({}) == RankInfo("single")
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    # torchrun inside an sbatch allocation: torchrun's variables win over SLURM's
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"}
    assert discover(env).launcher == "env"


def test_backend_follows_the_device():
    assert backend("cuda") == "nccl" and backend("cpu") == "gloo"
