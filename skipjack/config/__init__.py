"""Structured config schema: every knob of a skipjack job, with its default and its check, one
module per section (model, data, parallel, optim, regime, train, checkpoint, logs, launch) and
the whole job in `job.py`.

The dataclasses are registered in Hydra's ConfigStore; the YAML tree in `skipjack/configs/` fills
them. A field that takes one of a few fixed strings is typed by a `Choice` (a str Enum; OmegaConf's
structured configs take Enum, not Literal), so OmegaConf refuses any other value when the job is
composed, naming the key and the choices; `launch` has one schema per launcher. `prepare()` runs
before any work starts: it derives what the job leaves to skipjack (`derive_micro_batches`), then
`validate()` checks everything else and raises `ConfigError` naming the field and the fix, so a
bad value costs seconds, not a queued job.
"""

from skipjack.config.checkpoint import CheckpointConfig, MemoryConfig
from skipjack.config.data import DataConfig, DataKind, PreprocessConfig, parse_blend, validate_data
from skipjack.config.errors import ConfigError
from skipjack.config.job import (
    TrainJobConfig,
    derive_micro_batches,
    prepare,
    register_configs,
    validate,
)
from skipjack.config.launch import LaunchConfig, RayLaunch, SlurmLaunch, TorchrunLaunch
from skipjack.config.logs import LoggingConfig, WandbMode
from skipjack.config.model import (
    HfDtype,
    ModelConfig,
    RopeScalingConfig,
    RopeType,
    head_dim,
    parameter_shape,
    validate_model,
    validate_tensor_parallel,
)
from skipjack.config.optim import (
    GALORE_CHOICES,
    GaLoreConfig,
    Moments,
    OptimConfig,
    Optimizer,
    ProjType,
    SvdMethod,
)
from skipjack.config.parallel import ParallelConfig, Partition, Schedule, VocabParallel, resolve_dp
from skipjack.config.regime import EstConfig, RegimeConfig
from skipjack.config.train import Device, Dtype, TrainConfig

__all__ = [
    "CheckpointConfig",
    "MemoryConfig",
    "ConfigError",
    "DataConfig",
    "DataKind",
    "Device",
    "Dtype",
    "EstConfig",
    "GALORE_CHOICES",
    "GaLoreConfig",
    "HfDtype",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "Moments",
    "OptimConfig",
    "Optimizer",
    "ParallelConfig",
    "Partition",
    "PreprocessConfig",
    "ProjType",
    "RayLaunch",
    "RegimeConfig",
    "RopeScalingConfig",
    "RopeType",
    "Schedule",
    "SlurmLaunch",
    "SvdMethod",
    "TorchrunLaunch",
    "TrainConfig",
    "TrainJobConfig",
    "VocabParallel",
    "WandbMode",
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
