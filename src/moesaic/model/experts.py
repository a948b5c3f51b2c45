"""Expert weights: routed experts stacked as 3-D parameters, and the SwiGLU MLP for shared/dense FFNs.

Shape legend: E experts, D model dim, F expert hidden, G = 2F.
w13_EGD holds the F gate rows then the F up rows (the layout of transformers 5 and vLLM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExperts(nn.Module):
    """E SwiGLU experts as two stacked parameters: w13 [E, 2F, D] and w2 [E, D, F]."""

    def __init__(self, num_experts: int, d_model: int, ffn: int, init_std: float = 0.02,
                 out_std: float = 0.02) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, ffn))
        nn.init.normal_(self.w13, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def params_per_expert(self) -> int:
        return self.w13[0].numel() + self.w2[0].numel()


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: w2(silu(gate) * up) with [gate; up] = w13(x) ([2F, D] weight, gate rows first)."""

    def __init__(self, d_model: int, ffn: int, init_std: float = 0.02, out_std: float = 0.02) -> None:
        super().__init__()
        self.ffn = ffn
        self.w13 = nn.Linear(d_model, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, d_model, bias=False)
        nn.init.normal_(self.w13.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class SharedExperts(nn.Module):
    """Shared experts: one SwiGLU of size shared_ffn seen by every token, optionally scaled by
    sigmoid(gate(x)) (Qwen2-MoE)."""

    def __init__(self, d_model: int, ffn: int, gated: bool, out_std: float = 0.02) -> None:
        super().__init__()
        self.mlp = SwiGLU(d_model, ffn, out_std=out_std)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y
