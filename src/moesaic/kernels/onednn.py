"""Float matmuls for CPU inference without autograd: oneDNN, its blocked weight copies, and the C GEMV.

Shape legend: E experts, M rows of a linear, I its input features, O its output features.

On this kind of machine MKL's fp32 GEMV/GEMM (what `F.linear` calls) reads weights at about half the
bandwidth oneDNN reaches, and on one torch thread the C kernels of `cpu_gemv` read faster still at one
or two rows. `cpu_linear` picks among them for a linear; `onednn_expert_linear` / `gemv_expert_linear`
do the same for one expert matrix of a stacked [E, O, I] weight (the `onednn` MoE backend in `quant.py`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moesaic.kernels import cpu_experts, cpu_gemv


def onednn_expert_linear(x_MI: torch.Tensor, w: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's float matmul when the checks were done once for the call (see `quant._expert_matmul`).

    A weight stored transposed ([O, I] view of an [I, O] matrix, see `transpose_for_gemv`) goes
    through MKL's x @ W at one row (the faster GEMV for short rows), oneDNN otherwise."""
    if x_MI.shape[0] > 1 or x_MI.dtype == torch.bfloat16:  # bf16: the blocked copy is faster at one row too
        packed = _packed(w)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x_MI, packed[e], None, "none", [], "")
    w_OI = w[e]
    if x_MI.shape[0] == 1 and not w_OI.is_contiguous():
        return torch.mm(x_MI, w_OI.t())
    return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, None, "none", [], "")


def gemv_expert_linear(x_MI: torch.Tensor, w: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's matmul: the rows `cpu_gemv.rows_ok` takes through `cpu_gemv` (weight rows contiguous; a
    transposed fp32 weight at one row: MKL's x @ W), other row counts through oneDNN."""
    m = x_MI.shape[0]
    if not cpu_gemv.rows_ok(m, x_MI.dtype):
        return onednn_expert_linear(x_MI, w, e)
    w_OI = w[e]
    if w_OI.stride(1) == 1:
        return cpu_gemv.gemv(x_MI, w_OI)
    return torch.mm(x_MI, w_OI.t()) if m == 1 else onednn_expert_linear(x_MI, w, e)


def one_thread_gemv(x_MI: torch.Tensor) -> bool:
    """fp32 / bf16 with the C kernels built: `cpu_gemv` reads weights 1.1-1.7x faster than oneDNN / MKL at one
    row, 1.4-1.9x at two fp32 rows on one thread (`cpu_gemv.rows_ok` says which row counts go there; the caller
    has checked device, weight dtype, autograd)."""
    return x_MI.dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available()


PACKED_ATTR = "_moesaic_onednn_packed"  # oneDNN-blocked copies (per expert, or one per linear) on a weight


def pack_onednn(w: torch.Tensor, rows_hint: int = 32) -> None:
    """Attach oneDNN-blocked copies of each expert matrix of w [E, O, I] (same values; a second copy in memory).

    oneDNN's matmul over a plain [O, I] weight repacks it on every call; for the few rows per expert of
    a batched decode step (M ~ 4-32) that costs as much as the math: the blocked copy is 1.2-2x faster
    there (measured on this CPU). One-row fp32 calls keep the plain weight (faster at M = 1 in fp32); bf16
    uses the blocked copy at every M (oneDNN's bf16 one-row kernel over a plain weight reads ~9.5 GB/s,
    over the blocked copy ~15 GB/s: bf16 batch-1 decode steps 1.4-1.5x faster). The copies are
    a snapshot of the values: call again after changing w in place (`unpack_onednn` drops them); a w
    whose storage, dtype or shape changed (e.g. `model.to(dtype)`) falls back to the plain weight.
    A 2-D linear weight [O, I] gets one blocked copy (`cpu_linear` uses it for multi-row inputs)."""
    if not (isinstance(w, torch.Tensor) and w.dim() in (2, 3) and w.dtype in (torch.float32, torch.bfloat16)
            and w.device.type == "cpu" and onednn_available()):
        raise ValueError(f"pack_onednn needs a CPU float32/bfloat16 [E, O, I] or [O, I] tensor and oneDNN, got "
                         f"{type(w).__name__} {getattr(w, 'dtype', '')} {tuple(getattr(w, 'shape', ()))}")
    if w.dim() == 2:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
    else:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w[e].detach(), rows_hint) for e in range(w.shape[0])]
    setattr(w, PACKED_ATTR, ((w.data_ptr(), w.dtype, w.shape), packed))


def _packed(w: torch.Tensor):
    """The blocked copies attached by `pack_onednn`, or None (none, or w changed since)."""
    packed = getattr(w, PACKED_ATTR, None)
    return packed[1] if packed is not None and packed[0] == (w.data_ptr(), w.dtype, w.shape) else None


def unpack_onednn(w: torch.Tensor) -> None:
    if hasattr(w, PACKED_ATTR):
        delattr(w, PACKED_ATTR)


def transpose_for_gemv(w: torch.Tensor) -> torch.Tensor:
    """Same values and shape [..., O, I], stored as [..., I, O] (so `w[e].t()` is contiguous).

    For one-row decode, MKL's x @ W over the [I, O] layout reads short-row matrices (I <= 1024, e.g.
    fine-grained experts' down projections) ~1.5x faster than oneDNN's GEMV over [O, I] on this CPU."""
    return w.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


SKINNY_LINEARS = True
_ONEDNN_MIN_WEIGHT = 1 << 16  # smaller matrices: oneDNN's per-call cost outweighs its bandwidth gain


@functools.cache
def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "mkldnn")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_supports(x: torch.Tensor, w) -> bool:
    """oneDNN path: CPU float inputs of one dtype and no gradient to compute (the op has no autograd)."""
    if not isinstance(w, torch.Tensor) or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if w.dtype != x.dtype:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


def cpu_linear(x_MI: torch.Tensor, w_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias): oneDNN on CPU for inference, F.linear otherwise (same numbers up to fp32 rounding)."""
    if x_MI.dim() == 2 and x_MI.shape[0] > 0 and w_OI.numel() >= _ONEDNN_MIN_WEIGHT and onednn_available() \
            and onednn_supports(x_MI, w_OI) and (bias_O is None or bias_O.dtype == x_MI.dtype):
        if w_OI.stride(-1) == 1 and cpu_gemv.usable(x_MI, w_OI):
            y = cpu_gemv.gemv(x_MI, w_OI)
            return y if bias_O is None else y.add_(bias_O)
        if SKINNY_LINEARS and cpu_experts.linear_usable(x_MI, w_OI):  # a few rows: the skinny C kernel
            y = cpu_experts.linear(x_MI, w_OI, threads=min(2, torch.get_num_threads()))
            return y if bias_O is None else y.add_(bias_O)
        packed = _packed(w_OI) if x_MI.shape[0] > 1 or x_MI.dtype == torch.bfloat16 else None
        return torch.ops.mkldnn._linear_pointwise(x_MI, w_OI if packed is None else packed, bias_O, "none", [], "")
    return F.linear(x_MI, w_OI, bias_O)
