"""Row-wise helper kernels of the grouped path: weight gradients, sorted gathers, the top-k combine.

Shape legend: as in grouped_gemm.py (T tokens, D, F, E, K, N = T*K pairs, P padded sorted rows).

  wgrad        dW[e] = sum over e's rows of L[row].T R[row]  (the weight gradients; sorted zero-padded operands)
  gather_rows  dst[row] = src[token] (* top-k weight): sorted, zero-padded copies for wgrad
  combine      y[t] = sum_k w[t,k] * o[t*K+k]  over the pairs that are not dropped
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesaic.kernels.triton.tiles import _block_rows


@triton.jit
def wgrad_kernel(l_ptr, r_ptr, dw_ptr, off_ptr, NI, NJ, stride_l, stride_r, stride_we, stride_wi, stride_wj,
                 BI: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr, DOT_F32: tl.constexpr):
    # dw_ptr [E, NI, NJ]: dW[e] = sum over e's padded sorted rows of L[row, :NI]^T R[row, :NJ].
    # l_ptr [P, NI], r_ptr [P, NJ] in sorted order with zeros in padding rows (so no row masks);
    # BR divides the row block, so [off[e], off[e+1]) is a whole number of BR-row steps.
    pid = tl.program_id(0)
    n_i = tl.cdiv(NI, BI)
    n_j = tl.cdiv(NJ, BJ)
    e = (pid // (n_i * n_j)).to(tl.int64)
    pid_i = (pid % (n_i * n_j)) // n_j
    pid_j = pid % n_j
    i = pid_i * BI + tl.arange(0, BI)
    j = pid_j * BJ + tl.arange(0, BJ)
    i_ld = (i % NI).to(tl.int64)
    j_ld = (j % NJ).to(tl.int64)
    start = tl.load(off_ptr + e)
    end = tl.load(off_ptr + e + 1)
    rr_ = tl.arange(0, BR).to(tl.int64)
    l_ptrs = l_ptr + (start + rr_)[None, :] * stride_l + i_ld[:, None]
    r_ptrs = r_ptr + (start + rr_)[:, None] * stride_r + j_ld[None, :]
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for _ in range(start, end, BR):
        lt = tl.load(l_ptrs)
        rr = tl.load(r_ptrs)
        if DOT_F32:
            lt, rr = lt.to(tl.float32), rr.to(tl.float32)
        acc = tl.dot(lt, rr, acc)
        l_ptrs += BR * stride_l
        r_ptrs += BR * stride_r
    ptrs = dw_ptr + e * stride_we + i[:, None].to(tl.int64) * stride_wi + j[None, :] * stride_wj
    tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(i[:, None] < NI) & (j[None, :] < NJ))


@triton.jit
def gather_rows_kernel(src_ptr, dst_ptr, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, w_ptr,
                       E, NC, TOPK, stride_src, stride_dst,
                       BM: tl.constexpr, BC: tl.constexpr, SCALE_W: tl.constexpr):
    # dst_ptr [P, NC] sorted rows: src[token of the row's pair] (* w[pair] if SCALE_W); padding rows 0.
    pid_m = tl.program_id(0)
    live, e, rows, row_ok, pair, tok = _block_rows(pid_m, sorted_ptr, block_expert_ptr, off_ptr,
                                                   counts_ptr, E, TOPK, BM)
    if live:
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        c_ok = cols < NC
        v = tl.load(src_ptr + tok[:, None] * stride_src + cols[None, :], mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0)
        if SCALE_W:
            v = (v.to(tl.float32) * tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None])
        tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], v.to(dst_ptr.dtype.element_ty),
                 mask=c_ok[None, :])


@triton.jit
def combine_kernel(o_ptr, ids_ptr, w_ptr, y_ptr, D, E, TOPK, stride_o, stride_y,
                   USE_W: tl.constexpr, BD: tl.constexpr):
    # o_ptr [N, D] per-pair outputs (rows of dropped pairs are never read); y_ptr [T, D].
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    c_ok = cols < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for k in range(0, TOPK):
        n = t * TOPK + k
        e = tl.load(ids_ptr + n) + tl.zeros((BD,), dtype=tl.int32)  # broadcast: a vector mask
        valid = (e >= 0) & (e < E)
        o = tl.load(o_ptr + n * stride_o + cols, mask=c_ok & valid, other=0.0).to(tl.float32)
        if USE_W:
            o = o * tl.load(w_ptr + n).to(tl.float32)
        acc += o
    tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=c_ok)
