"""Grouped SwiGLU experts for CPU decode: one C call per MoE layer for the rows of a few-token batch.

Shape legend: N rows sorted by expert, D model dim, F expert hidden, G = 2F, E experts, M rows of one expert.

    for each group (e, start, M):   rows r = start .. start + M of x_ND
        h = x[r] @ w13[e].T   [M, G];   a = silu(h[:, :F]) * h[:, F:]   [M, F];   y[r] = a @ w2[e].T   [M, D]

Why: at batch 8-32 each chosen expert gets ~1-8 rows. oneDNN's small-M matmuls cost a per-call overhead
and stream weights poorly there (fine-64x8 at batch 32: 93 of a 112 ms step in the experts, 64 experts x
4 layers x 2 matmuls per step). The kernel here is a skinny GEMM (see `cpu_experts_src`): blocks of weight rows
read once, prefetched 1-12 blocks ahead, multiplied with all (up to 8) of the expert's rows at once; one row goes
weight row by weight row as in `cpu_gemv`. SwiGLU runs in C between the two matmuls (a vector exp), and the whole
layer is one ctypes call (the GIL is released), so two threads can split the groups (`threads=2`).
Weights: fp32, bf16 (`vdpbf16ps`, fp32 accumulation; the SwiGLU output is rounded to bf16 for the down
projection, as the bf16 reference does), or int8 with per-row fp32 scales (x in fp32, int8 -> fp32 once per
weight vector for all of an expert's rows; W8A8 weights, `act_block` set, go to `cpu_q8.run_experts`). Built by `cpu_gemv.build` (cc -O3 -march=native, AVX-512 BW +
BF16); `available()` is False where it cannot be and callers keep the per-expert path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moesaic.kernels import cpu_pool, cpu_q8
from moesaic.kernels.cpu_experts_src import SOURCE
from moesaic.kernels.cpu_gemv import build

_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = build(SOURCE, "experts")
    if lib is None:
        return None
    # x, ldx, groups, g0, g1, w13, s13 (expert stride), ld13 (row stride), sc13, w2, s2, ld2, sc2, h, ldh, a, lda,
    # y, D, F
    for name in ("moesaic_experts_f32", "moesaic_experts_f32_t1", "moesaic_experts_bf16", "moesaic_experts_i8"):
        fn = getattr(lib, name)
        fn.argtypes = [_P, _I, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _P, _P, _I, _P, _I, _P, _I, _I]
        fn.restype = None
    for name in ("moesaic_linear_f32", "moesaic_linear_bf16"):  # x, ldx, M, w, ldw, O, I, y, ldy
        fn = getattr(lib, name)
        fn.argtypes = [_P, _I, _I, _P, _I, _I, _I, _P, _I]
        fn.restype = None
    lib.moesaic_combine_f32.argtypes = [_P, _P, _I, _I, _P]  # y, wk, K, D, out
    lib.moesaic_combine_f32.restype = None
    lib.moesaic_combine_sorted_f32.argtypes = [_P, _P, _I, _P, _I, _I, _I, _P]  # y, order, K, w, N, T, D, out
    lib.moesaic_combine_sorted_f32.restype = None
    return lib


def available() -> bool:
    """Whether the kernels can run here (builds them on the first call)."""
    return _library() is not None


# Experts with more rows than this (prefill, big batches) keep oneDNN's blocked GEMMs / torch's int8 matmul. With the
# prefetches 3-12 blocks ahead the C kernel beats oneDNN up to 16 rows on both benchmark shapes (coarse-8x2 batch-32
# steps 1.06-1.08x, where with one block of prefetch it lost 0.92x at up to 8 rows); int8 shares its conversion.
MAX_ROWS = 16


def usable(x_ND: torch.Tensor, w13, w2) -> bool:
    """Whether `experts` applies: CPU fp32 / bf16 rows, weights of that dtype (or int8 `.q` / `.scale`, see
    `quant.Int8Weight`) with contiguous rows, no gradient wanted."""
    if x_ND.device.type != "cpu" or x_ND.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x_ND.requires_grad or getattr(w13, "requires_grad", False)
                                    or getattr(w2, "requires_grad", False)):
        return False
    ws = [getattr(w, "q", w) for w in (w13, w2)]
    if not all(isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.dim() == 3 and w.stride(2) == 1
               for w in ws):
        return False
    if ws[0].dtype == torch.int8:
        return ws[1].dtype == torch.int8 and available()
    return ws[0].dtype == ws[1].dtype == x_ND.dtype and available()


def _split(counts: list[int], cost_per_expert: float = 6.0) -> int:
    """The group index (>= 1) that halves the estimated work. Streaming an expert's weights costs about as much as
    computing 6 of its rows (fine-64x8: 6 MB at ~28 GB/s ~ 210 us, a row's 3 MFLOP at ~90 GFLOP/s ~ 35 us; coarse
    the same ratio)."""
    costs = [cost_per_expert + c for c in counts]
    half, acc = sum(costs) / 2, 0.0
    for g, c in enumerate(costs):
        if acc + c / 2 >= half:
            return max(g, 1)
        acc += c
    return len(costs)


def experts(x_ND: torch.Tensor, counts_E: list[int], w13, w2, threads: int = 1,
            max_rows: int | None = None) -> torch.Tensor:
    """Expert outputs y [N, D] (fp32, unweighted) for rows x [N, D] sorted by expert, counts_E[e] rows for expert
    e (sum = N). w13 [E, G, D], w2 [E, D, F]: float tensors of x's dtype or `quant.Int8Weight`s. Only experts
    with at most max_rows rows (None: all) are computed; the other rows of y are left unset, for the caller.
    threads = 2 splits the experts over this thread and one helper thread. Check `usable` first."""
    n = x_ND.shape[0]
    keep = n if max_rows is None else max_rows
    groups = [(e, s, c) for e, s, c in zip(range(len(counts_E)), _starts(counts_E), counts_E, strict=True)
              if 0 < c <= keep]
    return _run(x_ND, groups, n, w13, w2, threads)


def one_token(x_1D: torch.Tensor, ids: list[int], weights: list[float], w13, w2, threads: int = 1) -> torch.Tensor:
    """One token's MoE output [1, D] in x's dtype: sum_k weights[k] * expert ids[k] (x), ids < 0 skipped (fp32
    accumulation). Check `usable` first."""
    picked = [(e, w) for e, w in zip(ids, weights, strict=True) if e >= 0]
    k = len(picked)
    y = _run(x_1D, [(e, s, 1) for s, (e, _) in enumerate(picked)], k, w13, w2, threads, same_row=True)
    out = torch.empty((1, y.shape[1]), dtype=torch.float32)
    # the weighted sum in C (it zeroes out first): a weights tensor and a matmul were 2 more ATen ops (~60 us with
    # cold caches)
    _library().moesaic_combine_f32(y.data_ptr(), (ctypes.c_float * max(k, 1))(*[w for _, w in picked]), k,
                                   y.shape[1], out.data_ptr())
    return out.to(x_1D.dtype)


COMBINE_IN_C = True  # False: torch's y * w and index_add_ (A/B runs)


def combine_sorted(y_ND: torch.Tensor, order_N: torch.Tensor, k: int, weights_TK: torch.Tensor) -> torch.Tensor:
    """out [T, D] fp32 = sum over routed pairs of weight * expert output: out[order_N[i] // k] += weights_TK.flat[
    order_N[i]] * y_ND[i], in i order. y_ND [N, D] fp32 (pairs sorted by expert), order_N [N] int64 their flat
    token * k + slot indices (all in range), weights_TK [T, k] (any float dtype). One thread, in C."""
    t, d = weights_TK.shape[0], y_ND.shape[1]
    y, order = y_ND.contiguous(), order_N.contiguous()
    w = weights_TK.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty((t, d), dtype=torch.float32)
    _library().moesaic_combine_sorted_f32(y.data_ptr(), order.data_ptr(), k, w.data_ptr(), y.shape[0], t, d,
                                          out.data_ptr())
    return out


def _run(x_ND: torch.Tensor, groups: list[tuple[int, int, int]], n: int, w13, w2, threads: int,
         same_row: bool = False) -> torch.Tensor:
    """y [n, D] fp32 for groups (expert, first row, rows) of x's rows (same_row: every group reads x's one row)."""
    d = x_ND.shape[1]
    g_all = w13.shape[1]
    f = g_all // 2
    block = getattr(w13, "act_block", None)
    if block is not None and cpu_q8.available():  # W8A8 (int8 activations too)
        return cpu_q8.run_experts(x_ND, groups, n, w13, w2, threads, same_row, block)
    y = torch.empty((n, d), dtype=torch.float32)
    if not groups:
        return y
    gt = (ctypes.c_int64 * (3 * len(groups)))(*[v for grp in groups for v in grp])  # no tensor: one op fewer
    h = _padded(n, g_all, torch.float32)
    lib = _library()
    q13, q2 = getattr(w13, "q", w13), getattr(w2, "q", w2)
    xdt = torch.float32 if q13.dtype == torch.int8 else x_ND.dtype
    if x_ND.shape[0] == 1 and x_ND.dtype == xdt and x_ND.stride(1) == 1:
        x = x_ND  # one row (decode): read in place (the padding only keeps several rows apart in L1)
    else:
        x = _padded(x_ND.shape[0], d, xdt).copy_(x_ND)
    if q13.dtype == torch.int8:
        sc13, sc2 = _fp32_scales(w13.scale), _fp32_scales(w2.scale)
        fn, a, p13, p2 = lib.moesaic_experts_i8, h, sc13.data_ptr(), sc2.data_ptr()
    else:
        bf16 = x.dtype == torch.bfloat16
        a = _padded(n, f, torch.bfloat16) if bf16 else h
        fn, p13, p2 = (lib.moesaic_experts_bf16 if bf16 else lib.moesaic_experts_f32), None, None
    args = (x.data_ptr(), 0 if same_row else x.stride(0), ctypes.addressof(gt))
    rest = (q13.data_ptr(), q13.stride(0), q13.stride(1), p13, q2.data_ptr(), q2.stride(0), q2.stride(1), p2,
            h.data_ptr(), h.stride(0), a.data_ptr(), a.stride(0), y.data_ptr(), d, f)
    cut = _split([c for _, _, c in groups]) if threads > 1 and len(groups) > 1 else len(groups)
    if 0 < cut < len(groups):
        cpu_pool.run2(fn, (*args, 0, cut, *rest), (*args, cut, len(groups), *rest))
    else:
        fn(*args, 0, len(groups), *rest)
    return y


def _padded(n: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """An [n, cols] buffer whose row stride is 64 bytes more than a row (rows 4 KiB apart alias in L1)."""
    pad = 64 // dtype.itemsize
    return torch.empty((n, cols + pad), dtype=dtype)[:, :cols]


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def _fp32_scales(scale: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous scales [E, O]; a bf16 scale tensor's copy is kept on it (the scales do not change)."""
    if scale.dtype == torch.float32 and scale.is_contiguous():
        return scale
    cached = getattr(scale, "_moesaic_fp32", None)
    if cached is None or cached[0] != scale._version:
        cached = (scale._version, scale.to(torch.float32).contiguous())
        scale._moesaic_fp32 = cached
    return cached[1]


LINEAR_MAX_ROWS = 8


def linear_usable(x_MI: torch.Tensor, w_OI: torch.Tensor) -> bool:
    """Whether `linear` applies: 2..LINEAR_MAX_ROWS CPU fp32 / bf16 rows, a weight of that dtype with contiguous rows,
    no gradient wanted."""
    return (x_MI.dim() == 2 and 2 <= x_MI.shape[0] <= LINEAR_MAX_ROWS and x_MI.dtype in (torch.float32, torch.bfloat16)
            and w_OI.dtype == x_MI.dtype and x_MI.device.type == "cpu" and w_OI.device.type == "cpu"
            and w_OI.dim() == 2 and w_OI.shape[1] == x_MI.shape[1] and w_OI.stride(1) == 1
            and not (torch.is_grad_enabled() and (x_MI.requires_grad or w_OI.requires_grad)) and available())


def linear(x_MI: torch.Tensor, w_OI: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """x [M, I] @ w [O, I].T -> [M, O] in x's dtype (fp32 accumulation) through the skinny kernel. threads = 2 splits
    the outputs."""
    m, i = x_MI.shape
    o = w_OI.shape[0]
    x = _padded(m, i, x_MI.dtype).copy_(x_MI)
    y = torch.empty((m, o), dtype=torch.float32)
    lib = _library()
    fn = lib.moesaic_linear_bf16 if x.dtype == torch.bfloat16 else lib.moesaic_linear_f32
    es = w_OI.element_size()

    def part(a: int, b: int):
        return (x.data_ptr(), x.stride(0), m, w_OI.data_ptr() + a * w_OI.stride(0) * es, w_OI.stride(0), b - a, i,
                y.data_ptr() + a * 4, o)

    cut = (o // 2) & ~7 if threads > 1 and o >= 64 else o
    if 0 < cut < o:
        cpu_pool.run2(fn, part(0, cut), part(cut, o))
    else:
        fn(*part(0, o))
    return y if x_MI.dtype == torch.float32 else y.to(x_MI.dtype)
