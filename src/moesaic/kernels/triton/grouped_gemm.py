"""Grouped GEMMs over expert-sorted rows (Triton).

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k, N = T*K pairs,
P padded sorted rows (see align.py), BM/BN/BK block sizes.

Every kernel walks blocks of BM sorted rows; all rows of a block belong to one expert
(block_expert[b]); rows past the expert's count are padding: computed on harmless data and never
stored. Sorted row r holds pair sorted_ids[r]; the pair's token is pair // K.

  w13_swiglu   act_PF = silu(x[tok] @ w13[e, :F].T) * (x[tok] @ w13[e, F:].T)   (+ h_PG = both, for backward)
  grouped_mm   C = A[rows] @ B[e]  with B[e] any [Kd, Ncols] strided view of an expert's weight;
               A rows gathered by token or taken in sorted order; output to the pair's row or the
               sorted row; optional per-row top-k weight; optional SwiGLU-backward epilogue.
  wgrad        dW[e] = sum over e's rows of L[row].T R[row]  (the weight gradients; sorted zero-padded operands)
  gather_rows  dst[row] = src[token] (* top-k weight): sorted, zero-padded copies for wgrad
  combine      y[t] = sum_k w[t,k] * o[t*K+k]  over the pairs that are not dropped
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # groups of GROUP_M row blocks sweep all column blocks together so B tiles are reused in L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _block_rows(pid_m, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, E, TOPK, BM: tl.constexpr):
    """-> (live, e, rows, row_ok, pair, tok) for row block pid_m."""
    total = tl.load(off_ptr + E)
    live = pid_m * BM < total
    e = tl.load(block_expert_ptr + pid_m, mask=live, other=0).to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = (rows - tl.load(off_ptr + e)) < tl.load(counts_ptr + e)
    pair = tl.load(sorted_ptr + rows, mask=row_ok, other=0)
    tok = (pair // TOPK).to(tl.int64)
    return live, e, rows.to(tl.int64), row_ok, pair.to(tl.int64), tok


@triton.jit
def w13_swiglu_kernel(x_ptr, w_ptr, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, act_ptr, h_ptr,
                      num_blocks, E, D, F, TOPK, stride_xt, stride_we, stride_wg, stride_act, stride_h,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      SAVE_H: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr):
    # x_ptr [T, D] row-major activations; w_ptr [E, 2F, D] (gate rows then up rows, D contiguous);
    # act_ptr [P, F] output silu(gate)*up in sorted rows; h_ptr [P, 2F] pre-activations (if SAVE_H).
    pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, tl.cdiv(F, BN), GROUP_M)
    live, e, rows, row_ok, pair, tok = _block_rows(pid_m, sorted_ptr, block_expert_ptr, off_ptr,
                                                   counts_ptr, E, TOPK, BM)
    if live:
        cols = pid_n * BN + tl.arange(0, BN)
        cols_ld = cols % F  # wrap instead of masking: out-of-range columns are never stored
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :]
        g_ptrs = w_ptr + e * stride_we + cols_ld[None, :].to(tl.int64) * stride_wg + ks[:, None]
        u_ptrs = g_ptrs + F * stride_wg
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            if EVEN_K:
                a = tl.load(a_ptrs)
                bg = tl.load(g_ptrs)
                bu = tl.load(u_ptrs)
            else:
                k_ok = ks + k0 < D
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                bg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                bu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_F32:  # the CPU interpreter cannot multiply bf16 natively
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
            a_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        ok = row_ok[:, None] & (cols[None, :] < F)
        if SAVE_H:  # training: padding rows hold zeros, so the weight-gradient GEMMs need no row masks
            act = tl.where(row_ok[:, None], act, 0.0)
            ok = (rows[:, None] >= 0) & (cols[None, :] < F)
        tl.store(act_ptr + rows[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=ok)
        if SAVE_H:
            h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
            tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=ok)
            tl.store(h_ptrs + F, acc_u.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, c_ptr, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, w_ptr, h_ptr,
                      num_blocks, E, NC, KD, TOPK, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                      stride_h,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      A_GATHER: tl.constexpr, OUT_PAIR: tl.constexpr, SCALE_W: tl.constexpr,
                      SWIGLU_BWD: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr):
    # a_ptr [rows, KD] (k contiguous): row = token (A_GATHER) or sorted row.
    # b_ptr expert e's [KD, NC] view: b_ptr + e*stride_be + k*stride_bk + n*stride_bn.
    # c_ptr [rows, NC] (+NC more columns when SWIGLU_BWD): row = pair (OUT_PAIR) or sorted row.
    # w_ptr [N] fp top-k weights by pair (SCALE_W); h_ptr [P, 2F] saved pre-activations (SWIGLU_BWD).
    pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, tl.cdiv(NC, BN), GROUP_M)
    live, e, rows, row_ok, pair, tok = _block_rows(pid_m, sorted_ptr, block_expert_ptr, off_ptr,
                                                   counts_ptr, E, TOPK, BM)
    if live:
        cols = pid_n * BN + tl.arange(0, BN)
        cols_ld = (cols % NC).to(tl.int64)
        ks = tl.arange(0, BK)
        a_row = tok if A_GATHER else rows
        a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :]
        b_ptrs = b_ptr + e * stride_be + ks[:, None] * stride_bk + cols_ld[None, :] * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, KD, BK):
            if EVEN_K:  # padding rows compute on whatever they hold; they are never stored
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = ks + k0 < KD
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_F32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        if SCALE_W:
            acc = acc * tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        ok = row_ok[:, None] & (cols[None, :] < NC)
        c_row = pair if OUT_PAIR else rows
        c_ptrs = c_ptr + c_row[:, None] * stride_cm + cols[None, :]
        if SWIGLU_BWD:  # acc = d(act); act = silu(g) * u  ->  dg, du
            h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
            g = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(h_ptrs + NC, mask=ok, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dg = tl.where(row_ok[:, None], acc * u * sg * (1.0 + g * (1.0 - sg)), 0.0)
            du = tl.where(row_ok[:, None], acc * g * sg, 0.0)
            ok_all = (rows[:, None] >= 0) & (cols[None, :] < NC)  # padding rows get zeros (see wgrad)
            tl.store(c_ptrs, dg.to(c_ptr.dtype.element_ty), mask=ok_all)
            tl.store(c_ptrs + NC, du.to(c_ptr.dtype.element_ty), mask=ok_all)
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)


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
