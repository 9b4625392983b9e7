"""Optimizer and learning-rate schedule from the config and the model's parameters."""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist

from skipjack.config import GaLoreConfig, ModelConfig, OptimConfig
from skipjack.models.kernels import TORCH, Kernels, apex_modules
from skipjack.optim.galore import GaLoreAdamW
from skipjack.optim.galore_plus import GaLorePlusAdamW

# the rank the GaLore paper trains each model of its family with (Zhao et al. 2024, table 2)
PAPER_RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512}
# the matrices that get low-rank optimizer states: attention and MLP weights of every block
LOW_RANK = re.compile(r"\.(attention|feed_forward)\.\w+\.weight$")


def galore_rank(cfg: GaLoreConfig, model: ModelConfig) -> int:
    """The configured rank, or the paper's for the preset (a quarter of dim otherwise)."""
    if cfg.rank is not None:
        return cfg.rank
    return PAPER_RANKS.get(model.name, max(1, model.dim // 4))


def build_optimizer(
    model: torch.nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    model_cfg: ModelConfig,
    groups: dict[str, dist.ProcessGroup] | None = None,
    kernels: Kernels = TORCH,
) -> torch.optim.Optimizer:
    """AdamW (torch's, fused on CUDA, or apex's FusedAdam as `kernels` says), or GaLore /
    GaLore+ for the attention and MLP matrices with AdamW for the rest. Weight decay on matrices
    only (norm weights are not decayed)."""
    modules = model if isinstance(model, torch.nn.ModuleList) else [model]  # stage chunks
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    vectors = {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        matrices = {
            "params": [p for _, p in named if p.ndim >= 2],
            "weight_decay": cfg.weight_decay,
        }
        param_groups = [g for g in (matrices, vectors) if g["params"]]
        if kernels.adam == "apex":
            _, fused_adam = apex_modules()
            return fused_adam(param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adam_w_mode=True)
        return torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=device.type == "cuda"
        )
    kind = _galore_class(cfg)
    options = low_rank_options(cfg, model_cfg)
    low_rank = [p for n, p in named if p.ndim == 2 and LOW_RANK.search(n)]
    chosen = set(low_rank)
    others = [p for _, p in named if p.ndim >= 2 and p not in chosen]
    param_groups = [
        {"params": low_rank, "weight_decay": cfg.weight_decay, **options},
        {"params": others, "weight_decay": cfg.weight_decay},
        vectors,
    ]
    return kind(
        [group for group in param_groups if group["params"]],
        lr=cfg.lr,
        betas=betas,
        eps=cfg.eps,
        names={p: n for n, p in named},
        groups=groups,
    )


def low_rank_options(cfg: OptimConfig, model_cfg: ModelConfig) -> dict:
    """The options of the low-rank parameter group of `cfg` (optim=galore or galore_plus): the
    config's GaLore fields the optimizer takes, and the rank (by preset when unset)."""
    options = {key: getattr(cfg.galore, key) for key in _galore_class(cfg).low_rank_defaults}
    return {**options, "rank": galore_rank(cfg.galore, model_cfg)}


def _galore_class(cfg: OptimConfig) -> type[GaLoreAdamW]:
    return GaLorePlusAdamW if cfg.name == "galore_plus" else GaLoreAdamW


def planned_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes this rank will hold (from shapes, before any step): AdamW keeps two
    moments and a step counter per parameter; GaLore m*r + 2*n*r per low-rank matrix."""
    if isinstance(optimizer, GaLoreAdamW):
        return optimizer.planned_state_bytes()
    return sum(
        2 * p.numel() * p.element_size() + 4 for g in optimizer.param_groups for p in g["params"]
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes this rank holds now (every tensor in the state, measured)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps)
    )
