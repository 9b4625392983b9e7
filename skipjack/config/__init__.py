"""Structured config schema: every knob of a skipjack job, with its default and its check, one
module per section (model, data, parallel, optim, train, checkpoint, logs, launch) and the whole
job in `job.py`.

The dataclasses are registered in Hydra's ConfigStore; the YAML tree in `skipjack/configs/` fills
them. `prepare()` runs before any work starts: it derives what the job leaves to skipjack
(`derive_micro_batches`), then `validate()` checks everything and raises `ConfigError` naming the
field and the fix, so a bad value costs seconds, not a queued job. Choices are strings checked
against the allowed values (OmegaConf's structured configs take Enum, not Literal, and several
of skipjack's values, like `1f1b`, are not Python names).
"""

from skipjack.config.checkpoint import CheckpointConfig
from skipjack.config.data import DataConfig, PreprocessConfig, parse_blend, validate_data
from skipjack.config.errors import ConfigError
from skipjack.config.job import (
    TrainJobConfig,
    derive_micro_batches,
    prepare,
    register_configs,
    validate,
)
from skipjack.config.launch import LaunchConfig
from skipjack.config.logs import LoggingConfig
from skipjack.config.model import (
    ROPE_TYPES,
    ModelConfig,
    RopeScalingConfig,
    head_dim,
    parameter_shape,
    validate_model,
    validate_tensor_parallel,
)
from skipjack.config.optim import GALORE_CHOICES, OPTIMIZERS, GaLoreConfig, OptimConfig
from skipjack.config.parallel import ParallelConfig, resolve_dp
from skipjack.config.train import TrainConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GALORE_CHOICES",
    "GaLoreConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "OPTIMIZERS",
    "OptimConfig",
    "ParallelConfig",
    "PreprocessConfig",
    "ROPE_TYPES",
    "RopeScalingConfig",
    "TrainConfig",
    "TrainJobConfig",
    "derive_micro_batches",
    "head_dim",
    "parameter_shape",
    "parse_blend",
    "prepare",
    "register_configs",
    "resolve_dp",
    "validate",
    "validate_data",
    "validate_model",
    "validate_tensor_parallel",
]
