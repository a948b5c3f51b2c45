"""Small-T decode path: no sorting, one program per (pair, column block), weights read once per pair.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N = T*K pairs.

At decode a step has a handful of tokens, so each chosen expert is read for one or two rows: the
work is a matrix-vector product bound by reading weights. Two launches and no alignment:
  decode_w13   act_NF[n] = silu(w13[e, :F] @ x[t]) * (w13[e, F:] @ x[t])   (fp32), e = ids[n], t = n // K
  decode_w2    y_TD[t] = sum_k w[t,k] * w2[ids[t,k]] @ act[t*K+k]          (combine fused)
The column blocks are small (8-64 rows of a weight) so that even one token's experts are spread
over enough programs to keep every multiprocessor streaming. When two tokens share an expert its
weights are read twice; the autotuner weighs that against the grouped path's extra launches.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_w13_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, D, F, E, TOPK, stride_xt, stride_we, stride_wg,
                      BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    # x_ptr [T, D]; w_ptr [E, 2F, D] (D contiguous); ids_ptr [N]; act_ptr [N, F] fp32 (rows of
    # dropped pairs are left unwritten and never read).
    n = tl.program_id(0)
    e = tl.load(ids_ptr + n).to(tl.int64)
    if (e >= 0) & (e < E):
        t = (n // TOPK).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        cols_ld = (cols % F).to(tl.int64)
        ks = tl.arange(0, BK)
        g_ptrs = w_ptr + e * stride_we + cols_ld[:, None] * stride_wg + ks[None, :]
        u_ptrs = g_ptrs + F * stride_wg
        x_ptrs = x_ptr + t * stride_xt + ks
        acc_g = tl.zeros((BN, BK), dtype=tl.float32)
        acc_u = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, D, BK):
            if EVEN_K:
                x = tl.load(x_ptrs).to(tl.float32)
                g = tl.load(g_ptrs).to(tl.float32)
                u = tl.load(u_ptrs).to(tl.float32)
            else:
                k_ok = ks + k0 < D
                x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
                u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
            acc_g += g * x[None, :]
            acc_u += u * x[None, :]
            x_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        hg = tl.sum(acc_g, axis=1)
        hu = tl.sum(acc_u, axis=1)
        act = hg * tl.sigmoid(hg) * hu
        tl.store(act_ptr + n.to(tl.int64) * F + cols, act, mask=cols < F)


@triton.jit
def decode_w2_kernel(act_ptr, w_ptr, ids_ptr, wts_ptr, y_ptr, D, F, E, stride_we, stride_wd, stride_yt,
                     TOPK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    # act_ptr [N, F] fp32; w_ptr [E, D, F] (F contiguous); wts_ptr [N] combine weights; y_ptr [T, D].
    # The K slots are unrolled so the loads of a token's experts are issued back to back.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cols_ld = (cols % D).to(tl.int64)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for kk in tl.static_range(TOPK):
        n = t * TOPK + kk
        e = tl.load(ids_ptr + n).to(tl.int64)
        wk = tl.load(wts_ptr + n).to(tl.float32)
        ev = e + tl.zeros((BK,), dtype=tl.int64)
        valid = (ev >= 0) & (ev < E)  # a dropped pair's loads are masked off: no bytes read for it
        w_ptrs = w_ptr + e * stride_we + cols_ld[:, None] * stride_wd + ks[None, :]
        a_ptrs = act_ptr + n * F + ks
        for f0 in range(0, F, BK):
            f_ok = valid if EVEN_K else valid & (ks + f0 < F)
            w = tl.load(w_ptrs, mask=f_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptrs, mask=f_ok, other=0.0)
            acc += w * (a * wk)[None, :]
            w_ptrs += BK
            a_ptrs += BK
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + t * stride_yt + cols, y.to(y_ptr.dtype.element_ty), mask=cols < D)
