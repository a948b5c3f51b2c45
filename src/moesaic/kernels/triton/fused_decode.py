"""Small-T "fused" path: every chosen expert's weights read once, in ONE launch, combine included.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N = T*K pairs,
S = cdiv(F, BF) slices of the hidden dim, TB = T rounded up to a power of two.

Why: at T = 1 a fine-grained layer (Qwen3: 8 experts, 75 MB) is read in ~18 us at full bandwidth.
The two-launch decode path (decode.py) pays a launch gap and two bandwidth ramps and tails in that
time. Here program (n, j) does the whole expert computation for one slice of F, so w13 and w2 are
streamed back to back by the same program and there is no dependency between programs:
 1. act_BF = silu(w13[e, slice] @ x[t]) * (w13[e, F + slice] @ x[t]) * w[t, k]      (fp32)
 2. ws[t] += w2[e][:, slice] @ act_BF           a D-vector, fp32 `atomic_add` (relaxed) into ws [TB, D]
 3. one acq_rel increment of cnt[t]; the program that brings it to K*S (the last of token t) reads
    ws[t], writes y[t] in x's dtype, and zeroes ws[t] and cnt[t] for the next call.
So the workspace cleans itself: no memset launch, and a CUDA graph can replay the one kernel. It is
cached per (device, TB, D) and never freed (a captured graph keeps its address); calls using one
workspace must be ordered (one stream at a time), which is how a forward and its graphs run.

Not deterministic: the float atomics add the S*K partial sums of a row in whatever order programs
finish (fp32, so run-to-run differences are ~1 ulp before the cast to x's dtype). `ops.forward`
therefore never takes this path when `moesaic.kernels.deterministic_requested()`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moesaic.kernels.triton.decode import gate_up_sums
from moesaic.kernels.triton.fastlaunch import launcher


@triton.jit
def fused_decode_kernel(x_ptr, w13_ptr, w2_ptr, ids_ptr, wts_ptr, ws_ptr, cnt_ptr, y_ptr, D, F, E, TOPK,
                        stride_xt, stride_13e, stride_13g, stride_2e, stride_2d, stride_yt,
                        BF: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, EVEN_K: tl.constexpr,
                        EVEN_D: tl.constexpr):
    # x_ptr [T, D]; w13_ptr [E, 2F, D] (D contiguous); w2_ptr [E, D, F] (F contiguous); ids_ptr, wts_ptr
    # [N] (pair n = t*K + k); ws_ptr [TB, D] fp32 and cnt_ptr [TB] int32, zero on entry and on exit;
    # y_ptr [T, D]. Grid (N, S): pairs vary fastest, so pairs sharing an expert read a slice together (L2).
    n = tl.program_id(0)
    t = n // TOPK
    ws_row = ws_ptr + t.to(tl.int64) * D
    e = tl.load(ids_ptr + n).to(tl.int64)
    if (e >= 0) & (e < E):  # a dropped pair (id < 0 or >= E) reads nothing and adds nothing
        fs = tl.program_id(1) * BF + tl.arange(0, BF)
        fs_ld = (fs % F).to(tl.int64)  # in-bounds rows past F; their act is zeroed below
        ks = tl.arange(0, BK)
        rows = tl.arange(0, BD)
        g_ptrs = w13_ptr + e * stride_13e + fs_ld[:, None] * stride_13g + ks[None, :]
        u_ptrs = g_ptrs + F * stride_13g
        x_ptrs = x_ptr + t.to(tl.int64) * stride_xt + ks
        w_ptrs = w2_ptr + e * stride_2e + rows[:, None] * stride_2d + fs_ld[None, :]
        # Triton does not software-pipeline these loops (no tl.dot; seen in the sm_90 PTX), so both load their
        # next tile one iteration ahead by hand (its DRAM round trip overlaps the math on the current one), and the
        # first w2 tile is requested before the w13 loop. Tiles stay in the input dtype until used.
        if EVEN_D:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(rows < D)[:, None], other=0.0)
        hg, hu = gate_up_sums(x_ptrs, g_ptrs, u_ptrs, D, ks, BF, BK, EVEN_K)
        wk = tl.load(wts_ptr + n).to(tl.float32)
        act = tl.where(fs < F, hg * tl.sigmoid(hg) * hu * wk, 0.0)
        for d0 in range(BD, D, BD):  # load tile d0, add tile d0 - BD (always whole)
            w_ptrs += BD * stride_2d
            if EVEN_D:
                w_nx = tl.load(w_ptrs)
            else:
                w_nx = tl.load(w_ptrs, mask=(rows + d0 < D)[:, None], other=0.0)
            tl.atomic_add(ws_row + (d0 - BD) + rows, tl.sum(w.to(tl.float32) * act[None, :], axis=1), sem="relaxed")
            w = w_nx
        d_last = ((D - 1) // BD) * BD
        tl.atomic_add(ws_row + d_last + rows, tl.sum(w.to(tl.float32) * act[None, :], axis=1), mask=rows + d_last < D,
                      sem="relaxed")
    # every thread's adds are ordered before the counter's release (the scalar atomic runs on one thread)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
    if done == TOPK * tl.num_programs(1) - 1:  # the last program of token t: finish its row
        tl.debug_barrier()
        rows_f = tl.arange(0, BD)
        y_row = y_ptr + t.to(tl.int64) * stride_yt
        for d0 in range(0, D, BD):
            d_ok = rows_f + d0 < D
            v = tl.load(ws_row + d0 + rows_f, mask=d_ok, other=0.0, cache_modifier=".cg")  # L2: the atomics' home
            tl.store(y_row + d0 + rows_f, v.to(y_ptr.dtype.element_ty), mask=d_ok)
            tl.store(ws_row + d0 + rows_f, tl.zeros((BD,), dtype=tl.float32), mask=d_ok)
        tl.atomic_xchg(cnt_ptr + t, 0, sem="relaxed")


_WS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ws [TB, D] fp32, cnt [TB] int32), zero between calls. Cached per (device, TB, D) and never freed.
    One made while a CUDA graph is being captured is not cached: its zero fill exists only as a node of
    that graph (it runs at each replay, before the kernel), so an eager call must not inherit it."""
    tb = 1 << max(0, (max(t, 1) - 1).bit_length())
    key = (device.type, device.index, tb, d)
    got = _WS.get(key)
    if got is not None:
        return got
    got = (torch.zeros((tb, d), dtype=torch.float32, device=device),
           torch.zeros((tb,), dtype=torch.int32, device=device))
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _WS[key] = got
    return got


def forward_fused(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg) -> torch.Tensor:
    """y_TD (x's dtype) on the fused path. cfg (a launch.MoEConfig with path "fused"): gemm1.bn = BF (the F
    slice of one program), gemm1.bk = BK (w13 load width along D), gemm2.bn = BD (w2 rows per load);
    num_warps / num_stages from gemm1. Inputs contiguous, ids/weights [T, K]."""
    t, d = x_TD.shape
    e, gg, _ = w13_EGD.shape
    f, k = gg // 2, ids_TK.shape[1]
    y = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    if t == 0:
        return y
    ws, cnt = workspace(x_TD.device, t, d)
    g1, bd = cfg.gemm1, cfg.gemm2.bn
    launcher(fused_decode_kernel)((t * k, triton.cdiv(f, g1.bn)),
        x_TD, w13_EGD, w2_EDF, ids_TK.reshape(-1), w_TK.reshape(-1), ws, cnt, y, d, f, e, k, x_TD.stride(0),
        w13_EGD.stride(0), w13_EGD.stride(1), w2_EDF.stride(0), w2_EDF.stride(1), y.stride(0),
        BF=g1.bn, BK=g1.bk, BD=bd, EVEN_K=d % g1.bk == 0, EVEN_D=d % bd == 0,
        num_warps=g1.num_warps, num_stages=g1.num_stages)
    return y
