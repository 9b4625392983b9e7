"""`logging`: console progress, metrics.jsonl, wandb and plots."""

from __future__ import annotations

from dataclasses import dataclass

from skipjack.config.errors import ConfigError, positive

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggingConfig:
    interval: int = 1
    progress: bool = True
    plot: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "skipjack"


def validate_logging(lg: LoggingConfig) -> None:
    positive("logging.interval", lg.interval)
    if lg.wandb_mode not in WANDB_MODES:
        raise ConfigError(
            "logging.wandb_mode", f"unknown mode {lg.wandb_mode!r}; use one of {WANDB_MODES}"
        )
