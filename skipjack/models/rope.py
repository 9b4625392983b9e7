"""Rotary position embeddings: RoPE's frequencies (plain, or scaled per `model.rope_scaling`:
Llama-3, linear, YaRN), the cos/sin table and the rotation of each head's interleaved pairs.

The frequencies are computed in fp32 with the same operations as transformers'
`modeling_rope_utils`, so that models imported from Hugging Face give its logits.
"""

from __future__ import annotations

import math

import torch

from skipjack.config import ModelConfig, RopeScalingConfig, head_dim


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, scaled per `cfg.rope_scaling`. Computed in fp32 with the
    operations of transformers' `modeling_rope_utils`, so imported models give its logits."""
    hd = head_dim(cfg)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    if s.rope_type == "yarn":
        return _yarn_frequencies(cfg.rope_theta, hd, s)
    return _llama3_frequencies(inv_freq, s)


def _llama3_frequencies(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(theta: float, hd: int, s: RopeScalingConfig) -> torch.Tensor:
    """YaRN's NTK-by-parts: dimensions that turn more than `beta_fast` times over the original
    context keep their frequency, those under `beta_slow` times are divided by `factor`, with a
    linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return (hd * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001  # as transformers does, against a zero-width ramp
    ramp = torch.clamp((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, hd, 2).float() / hd)
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin: YaRN's attention temperature (1 for the other kinds)."""
    s = cfg.rope_scaling
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)


def rope_cos_sin(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(max_seq_len, head_dim/2, 2) table of cos and sin per position and frequency."""
    inv_freq = rope_frequencies(cfg).to(device)
    angles = torch.outer(
        torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq
    )
    return torch.stack((angles.cos(), angles.sin()), dim=-1) * rope_attention_factor(cfg)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (batch, seq, heads, head_dim) by position angles:
    `table` is the (max_seq_len, head_dim/2, 2) table (positions 0, 1, ... along every row) or
    its rows at each token's position, (batch, seq, head_dim/2, 2)."""
    if table.dim() == 3:
        seq = x.shape[1]
        cos, sin = table[:seq, None, :, 0], table[:seq, None, :, 1]
    else:
        cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
