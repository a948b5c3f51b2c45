"""Sort-by-expert grouped path (CPU and GPU).

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k, N = T*K rows.

Plan:
 1. flatten the T x K (token, expert) pairs and sort them by expert once (stable);
 2. gather the rows into one contiguous buffer x_ND ordered by expert;
 3. one matmul per non-empty expert slice (torch._grouped_mm on CUDA bf16 where it exists);
 4. scale rows by their combine weight and scatter-add them back to their tokens.
"""

from __future__ import annotations

import torch

from moesaic.kernels.reference import swiglu


def sort_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Order of the flattened pairs by expert, per-expert counts, and how many pairs are dropped (id < 0).

    Returns (order_N, counts_E, n_dropped): pairs order_N[n_dropped:] are the routed ones, by expert.
    """
    flat_N = expert_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    valid = flat_N >= 0
    counts_E = torch.bincount(flat_N[valid], minlength=num_experts)
    n_dropped = int(flat_N.numel() - int(valid.sum()))
    return order_N, counts_E, n_dropped


def _grouped_swiglu_mlp(x_ND: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor,
                        counts_E: torch.Tensor) -> torch.Tensor:
    """Rows x_ND sorted by expert, counts_E rows per expert -> expert outputs [N, D]."""
    grouped = getattr(torch, "_grouped_mm", None)
    if (grouped is not None and x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and x_ND.shape[0] > 0):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h = grouped(x_ND, w13_EGD.transpose(1, 2), offs=offs)
        return grouped(swiglu(h), w2_EDF.transpose(1, 2), offs=offs)
    outs = []
    start = 0
    # unbind once: the backward of E separate `w[e]` selects would zero-fill a full [E, ...] gradient
    # per expert (E^2 work); unbind's backward stacks the E expert gradients once. Without autograd,
    # plain indexing touches only the experts that have tokens (decode: a few of many).
    if torch.is_grad_enabled() and (getattr(w13_EGD, "requires_grad", False) or getattr(w2_EDF, "requires_grad", False)):
        w13_E, w2_E = w13_EGD.unbind(0), w2_EDF.unbind(0)
    else:
        w13_E, w2_E = w13_EGD, w2_EDF
    for e, c in enumerate(counts_E.tolist()):
        if c == 0:
            continue
        x = x_ND[start:start + c]
        outs.append(swiglu(x @ w13_E[e].t()) @ w2_E[e].t())
        start += c
    if not outs:
        return x_ND.new_zeros((0, w2_EDF.shape[1]))
    return torch.cat(outs, 0)


def moe_experts_sorted(hidden_TD: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor,
                       expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.moe_experts_reference`; one sort, one gather, one scatter-add."""
    k = expert_ids_TK.shape[1]
    order_N, counts_E, n_dropped = sort_by_expert(expert_ids_TK, w13_EGD.shape[0])
    order_N = order_N[n_dropped:]
    token_N = order_N // k
    x_ND = hidden_TD[token_N]
    y_ND = _grouped_swiglu_mlp(x_ND, w13_EGD, w2_EDF, counts_E)
    w_N = weights_TK.reshape(-1)[order_N]
    acc = torch.promote_types(hidden_TD.dtype, torch.float32)
    out_TD = torch.zeros(hidden_TD.shape, dtype=acc, device=hidden_TD.device)
    out_TD = out_TD.index_add(0, token_N, y_ND.to(acc) * w_N[:, None].to(acc))
    return out_TD.to(hidden_TD.dtype)
