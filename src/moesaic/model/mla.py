"""DeepSeek multi-head latent attention (MLA), as in DeepSeek-V2/V3.

Shape legend: B batch, T new positions, S key positions, H heads, D model dim,
Rq q LoRA rank, Rkv kv LoRA rank (the latent), N no-RoPE head dim, P RoPE head dim, V value head dim.

Plan:
 1. q = wq(x) or wq_b(q_norm(wq_a(x)))            -> [B, H, T, N + P], split into q_nope, q_rope
 2. [c, k_rope] = wkv_a(x); c = kv_norm(c)         -> latent c [B, T, Rkv], one shared k_rope [B, 1, T, P]
 3. [k_nope, v] = wkv_b(c) per head                -> [B, H, T, N], [B, H, T, V]
 4. RoPE on q_rope and k_rope only (decoupled RoPE; DeepSeek's interleaved pair layout when asked)
 5. k = [k_nope, k_rope broadcast over heads]; the cache stores the expanded k/v (H heads, N + P and V dims)
 6. softmax(q k^T * scale) v -> wo; scale = (N + P)^-0.5, times mscale^2 under YaRN with mscale_all_dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moesaic.config import ModelConfig
from moesaic.model.attention import rope_tables, sdpa
from moesaic.model.norm import RMSNorm
from moesaic.model.rope import RotaryEmbedding, apply_rope, apply_rope_interleaved

# DeepSeek's latent norms use RMSNorm's default eps, not the config's rms_norm_eps (reference and transformers).
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """(N + P)^-0.5, times mscale(factor, mscale_all_dim)^2 when a non-default RoPE scaling sets mscale_all_dim."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    m_all = s.get("mscale_all_dim")
    if kind != "default" and m_all:
        factor = float(s["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(m_all) * math.log(factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention; parameters wq | (wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        d, h, qk = cfg.d_model, cfg.n_heads, self.nope + self.rope_dim
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(d, h * qk, bias=False)
        else:
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.scale = mla_softmax_scale(cfg)

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x_BTD)
        return self.wq_b(self.q_norm(self.wq_a(x_BTD)))

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, cache=None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        h = self.n_heads
        q_BHTQ = self._query(x_BTD).view(b, t, h, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BHTQ.split([self.nope, self.rope_dim], dim=-1)
        c_BTR, k_rope = self.wkv_a(x_BTD).split([self.kv_rank, self.rope_dim], dim=-1)
        kv_BHTW = self.wkv_b(self.kv_norm(c_BTR)).view(b, t, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v_BHTV = kv_BHTW.split([self.nope, self.v_dim], dim=-1)
        k_rope_B1TP = k_rope.view(b, 1, t, self.rope_dim)
        cos, sin = rope_tables(self.rope, positions_BT, q_BHTQ.dtype, rope)
        rot = apply_rope_interleaved if self.interleave else apply_rope
        q_rope, k_rope_B1TP = rot(q_rope, cos, sin), rot(k_rope_B1TP, cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope_B1TP.expand(b, h, t, self.rope_dim)], dim=-1)
        v = v_BHTV
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)
        o_BHTV = sdpa(q, k, v, mask, scale=self.scale)
        return self.wo(o_BHTV.transpose(1, 2).reshape(b, t, h * self.v_dim))
