"""Triton backend for `moesaic.kernels.moe_experts`: fused grouped-GEMM MoE kernels for CUDA bf16/fp16.

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k.

Importing this package does not import Triton; the kernels load on first call. Modules:
  align.py         sort (token, expert) pairs by expert, padded per expert to the row block (or tail tiles)
  tiles.py         which sorted rows each GEMM program works on (uniform blocks or the tail-tile list)
  grouped_gemm.py  w13 GEMM + SwiGLU epilogue, strided grouped GEMM (w2, backward), weight grads, combine
  decode.py        small-T matrix-vector path (no sort; combine fused)
  fused_decode.py  small-T path in one launch (fp32 atomics, self-cleaning workspace; not deterministic)
  launch.py        launch configs + heuristic;  autotune.py  per-shape tuning cached as JSON
  ops.py           forward / backward orchestration and the autograd.Function
On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1) for tests only.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["available", "supports", "moe_experts_triton"]

DTYPES = (torch.bfloat16, torch.float16)


def available() -> bool:
    """CUDA present and Triton importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def supports(hidden: torch.Tensor, w13: torch.Tensor | None) -> bool:
    """CUDA bf16/fp16 activations with weights of the same dtype and device."""
    return (hidden.is_cuda and hidden.dtype in DTYPES and w13 is not None and w13.dtype == hidden.dtype
            and w13.device == hidden.device)


def _check(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if hidden.dtype not in DTYPES:
        raise ValueError(f"triton moe_experts: hidden dtype must be bfloat16 or float16, got {hidden.dtype}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"triton moe_experts: w13/w2 dtype must match hidden ({hidden.dtype}), "
                         f"got {w13.dtype}/{w2.dtype}")
    on_cpu_interp = os.environ.get("TRITON_INTERPRET", "0") == "1" and not hidden.is_cuda
    if not (hidden.is_cuda or on_cpu_interp):
        raise ValueError("triton moe_experts: tensors must be on a CUDA device "
                         "(or on CPU with TRITON_INTERPRET=1, for tests)")
    if w13.device != hidden.device or w2.device != hidden.device:
        raise ValueError(f"triton moe_experts: hidden, w13 and w2 must share a device, got "
                         f"{hidden.device}, {w13.device}, {w2.device}")


@torch.library.custom_op("moesaic::triton_moe_experts", mutates_args=())
def _compiled_op(hidden_TD: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor) -> torch.Tensor:
    """The inference forward as one opaque op for torch.compile (Dynamo cannot trace the launches)."""
    return moe_experts_triton(hidden_TD, w13_EGD, w2_EDF, expert_ids_TK, weights_TK)


@_compiled_op.register_fake
def _(hidden_TD, w13_EGD, w2_EDF, expert_ids_TK, weights_TK):
    return torch.empty_like(hidden_TD)


def moe_experts_triton(hidden_TD: torch.Tensor, w13_EGD: torch.Tensor, w2_EDF: torch.Tensor,
                       expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, *, config=None) -> torch.Tensor:
    """Same contract as `reference.moe_experts_reference`. `config` (a launch.MoEConfig) overrides the
    tuned one; when gradients are needed the grouped path is used whatever the config says. Inside
    torch.compile (inference) it is one opaque custom op, so the code around it compiles as one graph."""
    if config is None and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return _compiled_op(hidden_TD, w13_EGD, w2_EDF, expert_ids_TK, weights_TK)
    from moesaic.kernels.triton import autotune, launch
    from moesaic.kernels.triton.ops import TritonMoEFunction, forward

    _check(hidden_TD, w13_EGD, w2_EDF)
    t, d = hidden_TD.shape
    e, g, _ = w13_EGD.shape
    k = expert_ids_TK.shape[1]
    cfg = config or autotune.get_config(t, d, g // 2, e, k, hidden_TD.dtype, hidden_TD.device)
    train_cfg = cfg if cfg.path == "grouped" else launch.heuristic(max(t, 64), d, g // 2, e, k)
    if t == 0:
        return hidden_TD.new_zeros((0, d))
    if not (torch.is_grad_enabled() and (hidden_TD.requires_grad or w13_EGD.requires_grad
                                         or w2_EDF.requires_grad or weights_TK.requires_grad)):
        # inference: skip the autograd.Function (its bookkeeping is a visible share of a decode step)
        return forward(hidden_TD.contiguous(), w13_EGD.contiguous(), w2_EDF.contiguous(),
                       expert_ids_TK.contiguous(), weights_TK.contiguous(), cfg)
    return TritonMoEFunction.apply(hidden_TD.contiguous(), w13_EGD.contiguous(), w2_EDF.contiguous(),
                                   expert_ids_TK.contiguous(), weights_TK.contiguous(), cfg, train_cfg)
