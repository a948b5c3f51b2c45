"""Small-T decode path: no sorting, one program per (pair, column block), weights read once per pair.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, KP = K rounded up to a power
of two, N = T*K pairs.

At decode a step has a handful of tokens, so each chosen expert is read for one or two rows: the
work is a matrix-vector product bound by reading weights. Two launches and no alignment:
  decode_w13   act_NF[n] = silu(w13[e, :F] @ x[t]) * (w13[e, F:] @ x[t])   (fp32), e = ids[n], t = n // K
  decode_w2    y_TD[t] = sum_k w[t,k] * w2[ids[t,k]] @ act[t*K+k]          (combine fused)
The column blocks are small (1-16 rows of a weight) so that even one token's experts are spread
over enough programs to keep every multiprocessor streaming. When two tokens share an expert its
weights are read twice; the autotuner weighs that against the grouped path's extra launches.

Bytes in flight: Triton does not software-pipeline loops without tl.dot, so both kernels load their
next tile one iteration ahead by hand, and decode_w2 loads the tiles of all K experts of its rows at
once (one [KP, BN, BK] load), not one expert after the other. Both reduce each tile as it arrives
(per-row fp32 sums, not [BN, BK] accumulators): fewer registers a program, more programs resident
(H200, 10-call graphs: Qwen3 T = 1 23.3 -> 22.7 us, DeepSeek-V3 171.6 -> 168.6 us).

PDL (programmatic dependent launch, Hopper; `pdl` in the config): decode_w13 waits for the kernel
before it (the router) with `gdc_wait` before it reads anything, then lets its dependent start;
decode_w2 (launched as that dependent) reads the ids and its first w2 tiles, which do not depend on
decode_w13, while decode_w13 is still running, and waits only before it reads the activations. So
the w2 stream overlaps the end of the w13 stream instead of following a launch gap and a ramp.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gdc_wait(PDL: tl.constexpr):
    # griddepcontrol (sm_90+), as inline PTX so it does not depend on the Triton version's tl.extra
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gdc_launch_dependents(PDL: tl.constexpr):
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def load_gux(x_ptrs, g_ptrs, u_ptrs, k0, D, ks, EVEN_K: tl.constexpr):
    """Tile k0 of x [BK] and of the gate / up weight rows [BN, BK] at these pointers (zeros past D unless EVEN_K)."""
    if EVEN_K:
        return tl.load(x_ptrs), tl.load(g_ptrs), tl.load(u_ptrs)
    k_ok = ks + k0 < D
    return (tl.load(x_ptrs, mask=k_ok, other=0.0), tl.load(g_ptrs, mask=k_ok[None, :], other=0.0),
            tl.load(u_ptrs, mask=k_ok[None, :], other=0.0))


@triton.jit
def gate_up_sums(x_ptrs, g_ptrs, u_ptrs, D, ks, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """(hg, hu) [BN] fp32: the gate / up rows at g_ptrs / u_ptrs [BN, BK] dotted with x over all of D, the next tile
    loaded one iteration ahead, each tile reduced as it arrives."""
    x, g, u = load_gux(x_ptrs, g_ptrs, u_ptrs, 0, D, ks, EVEN_K)
    acc_g = tl.zeros((BN,), dtype=tl.float32)
    acc_u = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(BK, D, BK):  # load tile k0, use tile k0 - BK
        x_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
        x_nx, g_nx, u_nx = load_gux(x_ptrs, g_ptrs, u_ptrs, k0, D, ks, EVEN_K)
        xf = x.to(tl.float32)[None, :]
        acc_g += tl.sum(g.to(tl.float32) * xf, axis=1)
        acc_u += tl.sum(u.to(tl.float32) * xf, axis=1)
        x, g, u = x_nx, g_nx, u_nx
    xf = x.to(tl.float32)[None, :]
    return acc_g + tl.sum(g.to(tl.float32) * xf, axis=1), acc_u + tl.sum(u.to(tl.float32) * xf, axis=1)


@triton.jit
def decode_w13_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, D, F, E, TOPK, stride_xt, stride_we, stride_wg,
                      BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    # x_ptr [T, D]; w_ptr [E, 2F, D] (D contiguous); ids_ptr [N]; act_ptr [N, F] fp32 (rows of
    # dropped pairs are left unwritten and never read).
    _gdc_wait(PDL)
    _gdc_launch_dependents(PDL)
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
        hg, hu = gate_up_sums(x_ptrs, g_ptrs, u_ptrs, D, ks, BN, BK, EVEN_K)
        act = hg * tl.sigmoid(hg) * hu
        tl.store(act_ptr + n.to(tl.int64) * F + cols, act, mask=cols < F)


@triton.jit
def decode_w2_kernel(act_ptr, w_ptr, ids_ptr, wts_ptr, y_ptr, D, F, E, stride_we, stride_wd, stride_yt,
                     TOPK: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     EVEN_K: tl.constexpr, PDL: tl.constexpr):
    # act_ptr [N, F] fp32; w_ptr [E, D, F] (F contiguous); wts_ptr [N] combine weights; y_ptr [T, D].
    # Program (t, j): rows j*BN.. of y[t]; its K experts' [BN, BK] tiles are loaded as one [KP, BN, BK] tile.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cols_ld = (cols % D).to(tl.int64)
    ks = tl.arange(0, BK)
    slots = tl.arange(0, KP)
    n = t * TOPK + slots
    e = tl.load(ids_ptr + n, mask=slots < TOPK, other=-1).to(tl.int64)
    valid = (slots < TOPK) & (e >= 0) & (e < E)  # a dropped pair's loads are masked off: no bytes read
    e = tl.where(valid, e, 0)
    w_ptrs = w_ptr + e[:, None, None] * stride_we + cols_ld[None, :, None] * stride_wd + ks[None, None, :]
    a_ptrs = act_ptr + n[:, None] * F + ks[None, :]
    if EVEN_K:
        w = tl.load(w_ptrs, mask=valid[:, None, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=valid[:, None, None] & (ks < F)[None, None, :], other=0.0)
    wk = tl.load(wts_ptr + n, mask=valid, other=0.0).to(tl.float32)
    _gdc_wait(PDL)  # the activations come from decode_w13
    acc = tl.zeros((KP, BN), dtype=tl.float32)
    for f0 in range(BK, F, BK):  # load tile f0, use tile f0 - BK
        w_ptrs += BK
        f_ok = valid[:, None] & (ks + f0 - BK < F)[None, :]
        a = tl.load(a_ptrs, mask=f_ok, other=0.0)
        a_ptrs += BK
        if EVEN_K:
            w_nx = tl.load(w_ptrs, mask=valid[:, None, None], other=0.0)
        else:
            w_nx = tl.load(w_ptrs, mask=valid[:, None, None] & (ks + f0 < F)[None, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        w = w_nx
    f_last = ((F - 1) // BK) * BK
    a = tl.load(a_ptrs, mask=valid[:, None] & (ks + f_last < F)[None, :], other=0.0)
    acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
    y = tl.sum(acc * wk[:, None], axis=0)
    tl.store(y_ptr + t * stride_yt + cols, y.to(y_ptr.dtype.element_ty), mask=cols < D)
