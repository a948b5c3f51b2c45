"""Rotary position embeddings (half-rotation layout, as Llama/Mixtral/Qwen in transformers).

Shape legend: B batch, T positions, H heads, D head dim, R rotary dim (D, or less: partial rotary).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
from torch import nn


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the attention scale factor applied to cos/sin (1.0 unless yarn)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = 1.0
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq, factor = _yarn(inv_freq, dim, theta, scaling)
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, yarn")
    return inv_freq.float(), factor


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    old_len = float(s.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all:
        attn = get_mscale(factor, float(mscale)) / get_mscale(factor, float(mscale_all))
    else:
        attn = float(s.get("attention_factor") or get_mscale(factor))

    def corr_dim(rot: float) -> float:
        return (dim * math.log(old_len / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, attn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary per-row positions."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """positions [B, T] -> (cos, sin) [B, T, R] (R = rotary dim, frequencies repeated twice),
        computed in fp32 and cast to `dtype`."""
        freqs = positions_BT.float()[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return RopeTables(cos.to(dtype), sin.to(dtype))


class RopeTables(tuple):
    """(cos, sin) [B, T, R], unpacked like a pair, plus `sin_rot` (computed once, on first use)."""

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        return super().__new__(cls, (cos, sin))

    @cached_property
    def sin_rot(self) -> torch.Tensor:
        """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * sin_rot."""
        sin = self[1]
        h = sin.shape[-1] // 2
        return torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)


def apply_rope_bthd(x_BTHD: torch.Tensor, cos_BTR: torch.Tensor, sin_rot_BTR: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Full rotary (R = D) of x [B, T, H, D] in 4 ops (swap the halves, 2 muls, add): the same values
    as `apply_rope` (a negated product equals the product with the negated factor), with the heads of
    q and k rotated together when they sit side by side in one tensor. `out` (may be x itself; no
    autograd): written there instead of a new tensor."""
    b, t, h, d = x_BTHD.shape
    swapped = x_BTHD.view(b, t, h, 2, d // 2).flip(-2).view(b, t, h, d)
    return torch.add(x_BTHD * cos_BTR[:, :, None], swapped * sin_rot_BTR[:, :, None], out=out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the tables [B, T, R]: all of it (R = D), or its first R dims (partial rotary)."""
    cos, sin = cos_BTR[:, None], sin_BTR[:, None]
    r = cos.shape[-1]
    if r < x_BHTD.shape[-1]:
        x, rest = x_BHTD[..., :r], x_BHTD[..., r:]
        return torch.cat([x * cos + rotate_half(x) * sin, rest], dim=-1)
    return x_BHTD * cos + rotate_half(x_BHTD) * sin


def apply_rope_interleaved(x_BHTR: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """DeepSeek layout: pairs are interleaved (x0, x1), (x2, x3)...; de-interleave then rotate."""
    b, h, t, r = x_BHTR.shape
    x = x_BHTR.view(b, h, t, r // 2, 2).transpose(-1, -2).reshape(b, h, t, r)
    return apply_rope(x, cos_BTR, sin_BTR)
