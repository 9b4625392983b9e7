"""`train`: steps, batch sizes, sequence length, device, dtype, seed, the run directory."""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

from dataclasses import dataclass, field
from typing import Optional, Union

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

Device = Choice("Device", "auto cpu cuda")
Dtype = Choice("Dtype", "fp32 bf16")
KernelChoice = Choice("KernelChoice", "auto torch apex")  # models/kernels.py
EngineChoice = Choice("EngineChoice", "native deepspeed")  # trainer/engine.py, deepspeed_engine.py


@dataclass
class DeepSpeedConfig:
    """`train.engine=deepspeed`: the ZeRO stage, optimizer states offloaded to the CPU, and a
    DeepSpeed JSON config merged over the one skipjack generates (its keys win)."""

    zero_stage: int = 1
    offload_optimizer: bool = False
    config: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    micro_batch_size: Union[int, str] = "auto"  # sequences per forward; auto: derived
    seq_len: int = 128
    val_interval: int = 50
    val_batches: int = 4
    device: Device = Device.auto
    dtype: Dtype = Dtype.bf16
    seed: int = 1234
    kernels: KernelChoice = KernelChoice.auto  # RMSNorm and AdamW: apex where usable, or torch
    engine: EngineChoice = EngineChoice.native
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "${hydra:runtime.output_dir}"


def validate_train(t: TrainConfig, max_seq_len: int) -> None:
    """`t` (its micro-batch size derived) for a model of `max_seq_len` positions."""
    for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len", "val_interval"):
        positive(f"train.{name}", getattr(t, name))
    if t.val_batches < 0:
        raise ConfigError("train.val_batches", f"must be >= 0, got {t.val_batches}")
    if t.seq_len > max_seq_len:
        raise ConfigError(
            "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={max_seq_len}; shorten it"
        )
