"""Which kernels run the model's RMSNorm and the AdamW step (`train.kernels`).

- `torch`: PyTorch's own: `torch.nn.functional.rms_norm` (one fused kernel on CUDA) and AdamW
  with `fused=True` on CUDA (the multi-tensor `foreach` path on the CPU).
- `apex`: NVIDIA apex's fused RMSNorm (`apex.normalization.fused_layer_norm.
  fused_rms_norm_affine`) and `apex.optimizers.FusedAdam` in AdamW mode. apex is built from
  source against the installed torch and CUDA; it is not on the package index, so skipjack never
  requires it, and its kernels are CUDA kernels.
- `auto`: apex where it is importable and the device is CUDA, else torch.

The trainer prints the choice (`Kernels.describe`) at start.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernels:
    norm: str  # torch | apex
    adam: str  # torch | apex

    def describe(self, device: torch.device, optimizer: str = "adamw") -> str:
        """What runs, for `optimizer` (optim.name: GaLore and GaLore+ step themselves)."""
        norm = "apex FusedRMSNorm" if self.norm == "apex" else "torch rms_norm"
        if optimizer != "adamw":
            adam = f"{optimizer}'s own step"
        elif self.adam == "apex":
            adam = "apex FusedAdam"
        else:
            adam = "torch AdamW (fused)" if device.type == "cuda" else "torch AdamW (foreach)"
        return f"kernels: {norm}, {adam}"


TORCH = Kernels("torch", "torch")


@functools.cache
def apex_modules():
    """apex's fused RMSNorm function and FusedAdam class, or None where apex is not importable
    (or lacks its CUDA extensions)."""
    try:
        norm = importlib.import_module("apex.normalization.fused_layer_norm")
        optimizers = importlib.import_module("apex.optimizers")
        return norm.fused_rms_norm_affine, optimizers.FusedAdam
    except (ImportError, AttributeError, OSError):
        return None


def select_kernels(choice: str, device: torch.device) -> Kernels:
    """The kernels `train.kernels=choice` runs on `device`; raises ValueError (saying why and
    what to do) where `apex` cannot run."""
    if choice == "torch":
        return TORCH
    usable = device.type == "cuda" and apex_modules() is not None
    if choice == "auto":
        return Kernels("apex", "apex") if usable else TORCH
    if not usable:
        why = (
            f"the device is {device.type} (apex's kernels are CUDA kernels)"
            if device.type != "cuda"
            else "apex is not importable (build it from source: github.com/NVIDIA/apex)"
        )
        raise ValueError(f"apex was asked for, but {why}; use train.kernels=auto or torch")
    return Kernels("apex", "apex")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str) -> torch.Tensor:
    """RMSNorm of `x` over its last dimension: torch's normalises in float32, casts back to x's
    dtype, then multiplies by `weight` (Llama's order, as Hugging Face's `LlamaRMSNorm`); apex's
    fused kernel scales before it casts (a rounding apart under bf16)."""
    if kernel == "apex":
        fused, _ = apex_modules()
        return fused(x, weight, weight.shape, eps)
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return normed.type_as(x) * weight
