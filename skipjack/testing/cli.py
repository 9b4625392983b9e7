"""`skipjack` as a user runs it, for tests and benchmarks: the job the CLI composes, and the
command itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from skipjack.config import TrainJobConfig, register_configs

BIN = Path(sys.executable).parent  # this environment's scripts: skipjack, torchrun


def compose_config(*overrides: str) -> DictConfig:
    """The config `skipjack train <overrides>` composes from skipjack/configs."""
    register_configs()
    with initialize_config_module("skipjack.configs", version_base="1.3"):
        # outside a Hydra run there is no run dir to interpolate
        return compose("train", overrides=["train.output_dir=unused", *overrides])


def compose_job(*overrides: str) -> TrainJobConfig:
    """The job `skipjack train <overrides>` would run."""
    return OmegaConf.to_object(compose_config(*overrides))


def run_skipjack(
    *args: str,
    cwd: Path,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`skipjack <args>` in `cwd` (with `env` added to the environment); with `check`, asserts
    it exits 0, showing the end of its output if not."""
    return _run([BIN / "skipjack", *args], cwd, timeout, env, check)


def run_under_torchrun(
    *args: str,
    nproc: int,
    cwd: Path,
    timeout: float = 600,
    torchrun_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=<nproc> -m skipjack.cli <args>`: skipjack as any
    launcher that sets the rank variables starts it, with no help from skipjack's launchers.
    `check`: fail unless it exits with 0."""
    torchrun = [BIN / "torchrun", "--standalone", f"--nproc-per-node={nproc}", *torchrun_args]
    return _run([*torchrun, "-m", "skipjack.cli", *args], cwd, timeout, env, check)


def _run(
    cmd: list, cwd: Path, timeout: float, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result
