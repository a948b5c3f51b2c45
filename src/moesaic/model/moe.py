"""MoELayer = route -> kernels.moe_experts -> (+ shared experts).

Shape legend: T tokens (B*S flattened), D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moesaic import kernels
from moesaic.config import ModelConfig
from moesaic.model.experts import RoutedExperts, SharedExperts
from moesaic.model.router import RouterOutput, build_router


class MoELayer(nn.Module):
    """A sparse FFN: each token goes through its top-k routed experts (+ the shared experts)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        self.router = build_router(cfg)
        self.experts = RoutedExperts(cfg.num_experts, cfg.d_model, cfg.expert_ffn, out_std=out_std)
        self.shared = (SharedExperts(cfg.d_model, cfg.shared_ffn, cfg.shared_expert_gate, out_std=out_std)
                       if cfg.num_shared_experts > 0 else None)
        self.backend = "auto"  # which kernels.moe_experts backend to use; set by the engine or trainer

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, top_k: int | None = None
                ) -> tuple[torch.Tensor, RouterOutput]:
        """x [..., D] -> (y [..., D], RouterOutput over the flattened tokens)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        r = self.router(x_TD, None if token_mask is None else token_mask.reshape(-1), top_k)
        y_TD = kernels.moe_experts(x_TD, self.experts.w13, self.experts.w2, r.expert_ids_TK, r.weights_TK,
                                   backend=self.backend)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(shape), r
