"""`skipjack <command> [hydra overrides]`: train, eval, preprocess, generate; `skipjack convert`.

Each command is a Hydra app over the config tree in skipjack/configs, so overrides, `--cfg job`,
`--help` and `-m` sweeps work as Hydra users expect. Started under a launcher (torchrun, srun,
Ray; see launch/env.py), only rank 0 lets Hydra write its run directory; the trainer hands rank 0's
directory to every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from skipjack.config import ConfigError, LaunchConfig, register_configs
from skipjack.launch.env import discover

COMMANDS = ("train", "eval", "preprocess", "generate", "convert")
USAGE = f"usage: skipjack {{{','.join(COMMANDS)}}} [hydra overrides] (skipjack COMMAND --help)"


def _fail(error: ConfigError) -> None:
    print(f"skipjack: config error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def train_app(cfg: DictConfig) -> None:
    try:
        if OmegaConf.get_type(cfg.launch) is LaunchConfig or discover().launcher != "single":
            from skipjack.launch.local import run_here

            run_here(cfg)
        else:
            sys.exit(_launch(cfg))
    except ConfigError as e:
        _fail(e)


def _launch(cfg: DictConfig) -> int:
    """Start the job through the launcher chosen (`launch=...`), after checking the config for
    the world it gets."""
    from hydra.core.hydra_config import HydraConfig

    from skipjack.config import RayLaunch, SlurmLaunch, TorchrunLaunch, prepare
    from skipjack.launch import slurm, torchrun

    job = OmegaConf.to_object(cfg)
    la = job.launch
    world = la.num_workers if isinstance(la, RayLaunch) else la.nodes * la.nproc_per_node
    prepare(job, world)
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if isinstance(la, RayLaunch):
        from skipjack.launch import ray

        return ray.run(la, run_dir, cfg)
    launcher = {TorchrunLaunch: torchrun, SlurmLaunch: slurm}[type(la)]
    return launcher.run(la, run_dir, list(hydra.overrides.task), job.checkpoint.memory)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def eval_app(cfg: DictConfig) -> None:
    """`skipjack eval checkpoint.resume=<run dir> [eval.stages=[0,2]]`, as one process or as a
    rank of torchrun / srun (trainer/evaluate.py)."""
    from skipjack.launch.local import run_here

    try:
        run_here(cfg, evaluate=True)
    except ConfigError as e:
        _fail(e)


@hydra.main(version_base="1.3", config_path="configs", config_name="preprocess")
def preprocess_app(cfg: DictConfig) -> None:
    from skipjack.data.preprocess import run_preprocess

    try:
        run_preprocess(OmegaConf.to_object(cfg))
    except ConfigError as e:
        _fail(e)


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def generate_app(cfg: DictConfig) -> None:
    """`skipjack generate model.init_from=<dir> prompt="..."` (trainer/generate.py)."""
    from skipjack.trainer.generate import run_generate

    try:
        run_generate(OmegaConf.to_object(cfg))
    except ConfigError as e:
        _fail(e)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, overrides = argv[0], argv[1:]
    if command == "convert":  # plain arguments, not a Hydra app
        from skipjack.checkpoint.convert import main as convert

        convert(overrides)
        return
    if command in ("train", "eval") and discover().rank != 0:
        # rank 0 owns the run directory; the others write nothing of Hydra's anywhere
        overrides += [
            *("hydra.output_subdir=null", "hydra.run.dir=."),
            "hydra.job_logging.root.handlers=[console]",
        ]
    register_configs()
    sys.argv = [f"skipjack {command}", *overrides]
    apps = {"train": train_app, "eval": eval_app, "preprocess": preprocess_app}
    {**apps, "generate": generate_app}[command]()


if __name__ == "__main__":
    main()
