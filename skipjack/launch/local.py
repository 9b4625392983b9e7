"""`launch=local`, and every process another launcher started: this process is one rank of the
job (the only one without a launcher). The launcher side hands the trainer its rank, world and
device; the trainer never looks at how it was started."""

from __future__ import annotations

from omegaconf import DictConfig

from skipjack.launch.env import device_for_rank, discover, init_distributed


def run_here(cfg: DictConfig, evaluate: bool = False) -> dict:
    """Check the job for the world this process belongs to, join the default process group on
    this rank's device, and train (or evaluate: `skipjack eval`); returns the summary."""
    from skipjack.trainer.trainer import checked_job, train

    checked_job(cfg, discover().world_size)  # a bad config fails before any rendezvous
    device = device_for_rank(cfg.train.device)
    init_distributed(device)
    if evaluate:
        from skipjack.trainer.evaluate import evaluate as run_eval

        return run_eval(cfg, device)
    return train(cfg, device)
