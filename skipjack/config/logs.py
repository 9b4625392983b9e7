"""`logging`: console progress, metrics.jsonl, wandb and plots."""

from __future__ import annotations

from dataclasses import dataclass

from skipjack.config.choice import Choice
from skipjack.config.errors import positive

WandbMode = Choice("WandbMode", "offline online disabled")


@dataclass
class LoggingConfig:
    interval: int = 1
    progress: bool = True
    plot: bool = True
    wandb: bool = True
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "skipjack"


def validate_logging(lg: LoggingConfig) -> None:
    positive("logging.interval", lg.interval)
