"""A pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

from __future__ import annotations

import math

import torch
from torch import nn

from moesaic.config import ModelConfig
from moesaic.model.attention import build_attention
from moesaic.model.experts import SwiGLU
from moesaic.model.moe import MoELayer
from moesaic.model.norm import RMSNorm
from moesaic.model.router import RouterOutput


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = (MoELayer(cfg) if self.is_moe
                    else SwiGLU(cfg.d_model, cfg.ffn, out_std=0.02 / math.sqrt(2 * cfg.n_layers)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache=None, token_mask=None,
                top_k: int | None = None, rope=None) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.attn(self.attn_norm(x), positions, cache, rope=rope)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, r = self.ffn(h, token_mask, top_k)
            return x + y, r
        return x + self.ffn(h), None
