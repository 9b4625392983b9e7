"""`launch=ray`: the trainer as a Ray Train job.

    skipjack train launch=ray launch.num_workers=8 launch.gpus_per_worker=1 \
        launch.address=ray://head:10001 launch.max_failures=3 checkpoint=sharded ...

A `TorchTrainer` runs `num_workers` workers (each with `cpus_per_worker` CPUs and
`gpus_per_worker` GPUs) on the cluster at `launch.address`, or on a local cluster started for the
job. Its workers join a process group (NCCL with GPUs, gloo otherwise) before the trainer runs in
each of them with this run's resolved config; skipjack takes the ranks from that group. Rank 0's
output, progress and metrics included, reaches this console through Ray. After a worker fails,
Ray restarts the whole group (up to `launch.max_failures` times), and the restarted trainer
resumes from the run's newest skipjack checkpoint (`checkpoint.resume=auto`). Ray's own records
of the run go to `<run dir>/ray`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from skipjack.config import RayLaunch, TrainJobConfig


def worker_config(cfg: DictConfig) -> dict:
    """What the workers get: the job resolved, as plain data (choices as strings), with
    launch=local: they train; they do not launch again."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["launch"] = {}
    return resolved


def worker_job(config: dict) -> DictConfig:
    """The job again, typed, from `worker_config`'s plain data."""
    return OmegaConf.merge(OmegaConf.structured(TrainJobConfig), config)


def _worker(config: dict) -> None:
    from skipjack.launch.local import run_here

    run_here(worker_job(config["cfg"]))


def run(launch: RayLaunch, run_dir: Path, cfg: DictConfig) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = launch.gpus_per_worker > 0
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": launch.gpus_per_worker} if gpus else {})}
    ray.init(address=launch.address or None, include_dashboard=False, log_to_driver=True)
    print(
        f"skipjack: Ray Train job, {launch.num_workers} workers; Ray's records in {run_dir / 'ray'}"
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": worker_config(cfg)},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=launch.num_workers, use_gpu=gpus, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=launch.max_failures),
        ),
    )
    try:
        trainer.fit()
    finally:
        ray.shutdown()
    return 0
