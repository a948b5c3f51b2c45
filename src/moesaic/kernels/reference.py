"""Plain PyTorch MoE experts: a loop over experts. The spec and the test oracle.

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h_NG: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim: [N, 2F] -> [N, F]."""
    gate, up = h_NG.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_reference(hidden_TD: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor,
                          expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k weights[t,k] * expert_{ids[t,k]}(hidden[t]); ids < 0 contribute nothing.

    Accumulates in fp32 and returns hidden's dtype. Differentiable in hidden, weights and w13/w2.
    """
    acc = torch.promote_types(hidden_TD.dtype, torch.float32)
    out_TD = torch.zeros(hidden_TD.shape, dtype=acc, device=hidden_TD.device)
    for e in range(w13_EGD.shape[0]):
        tok, slot = (expert_ids_TK == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        x = hidden_TD[tok]
        y = swiglu(x @ w13_EGD[e].t()) @ w2_EDF[e].t()
        out_TD = out_TD.index_add(0, tok, y.to(acc) * weights_TK[tok, slot, None].to(acc))
    return out_TD.to(hidden_TD.dtype)
