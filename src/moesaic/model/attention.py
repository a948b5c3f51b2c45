"""Grouped-query attention through `scaled_dot_product_attention`, with optional qk-norm, qkv bias, clip.

Shape legend: B batch, T new positions, S key positions, H query heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.config import ModelConfig, rotary_dim
from moesaic.model.norm import RMSNorm
from moesaic.model.rope import RotaryEmbedding, apply_rope


def rope_tables(rope_module, positions_BT: torch.Tensor, dtype: torch.dtype,
                given: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables the model shared for this forward, in `dtype`; computed here if none."""
    if given is None:
        return rope_module(positions_BT, dtype)
    cos, sin = given
    return (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None = None) -> torch.Tensor:
    """Attention over [B, H, T, Dh] q and [B, Hkv, S, Dh] k/v; causal when mask is None.

    Grouped kv heads go to SDPA as they are (`enable_gqa`): repeating them first copied the whole
    key/value history every layer and step (~3% of a batch-32 decode step on CPU)."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """GQA: H query heads share Hkv key/value heads."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, d, bias=False)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.norm_eps)
        self.rope = RotaryEmbedding(rotary_dim(self.hd, cfg.rope_scaling), cfg.rope_theta, cfg.rope_scaling)

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, cache=None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """rope: (cos, sin) [B, T, R <= Dh] computed once per forward by the model (else computed here)."""
        b, t, _ = x_BTD.shape
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "full":  # OLMoE: normalise over all heads, then clip (transformers' order)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(b, t, self.n_heads, self.hd)
        k = k.view(b, t, self.n_kv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = rope_tables(self.rope, positions_BT, q.dtype, rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
        o = sdpa(q, k, v, mask)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module the config asks for."""
    if cfg.attention == "mla":
        from moesaic.model.mla import MLAttention

        return MLAttention(cfg, layer)
    return Attention(cfg, layer)
