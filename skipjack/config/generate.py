"""`skipjack generate`: sampling text from a trained model, and its checks."""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

from dataclasses import dataclass, field
from typing import Optional

from skipjack.config.choice import Choice
from skipjack.config.data import DataConfig
from skipjack.config.errors import ConfigError, positive
from skipjack.config.model import ModelConfig

Chat = Choice("Chat", "auto yes no")


@dataclass
class GenerateConfig:
    """`model.init_from`: the model (a Hugging Face directory or a skipjack step-* directory);
    `prompt` or `prompt_file`; `temperature` 0 is greedy; `top_p` keeps the smallest set of
    most likely tokens reaching that probability; `chat`: wrap the prompt as a user message in
    the model's chat template (auto: when it has one); `data`: where the tokenizer comes from
    when the model directory has none (a skipjack run's own data config is used first)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: str = ""
    prompt_file: Optional[str] = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: Chat = Chat.auto
    device: str = "auto"


def validate_generate(g: GenerateConfig) -> None:
    if not g.model.init_from:
        raise ConfigError(
            "model.init_from", "give the model to sample from: a Hugging Face or step-* directory"
        )
    if bool(g.prompt) == bool(g.prompt_file):
        raise ConfigError("prompt", "give the prompt as prompt=... or prompt_file=<path> (one)")
    positive("max_new_tokens", g.max_new_tokens)
    if g.temperature < 0:
        raise ConfigError("temperature", f"must be >= 0 (0: greedy), got {g.temperature}")
    if not 0.0 < g.top_p <= 1.0:
        raise ConfigError("top_p", f"must be in (0, 1], got {g.top_p}")
