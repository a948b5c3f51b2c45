"""Grouped GEMMs over expert-sorted rows (Triton).

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k, N = T*K pairs,
P padded sorted rows (see align.py), BM/BN/BK block sizes.

Every tile is BM sorted rows x BN columns; all rows of a row tile belong to one expert (uniform
blocks: block_expert[b]; tail tiles: the tile list; tiles.py maps programs to rows); rows past the
expert's count are padding: computed on harmless data and never stored. Sorted row r holds pair
sorted_ids[r]; the pair's token is pair // K.

  w13_swiglu   act_PF = silu(x[tok] @ w13[e, :F].T) * (x[tok] @ w13[e, F:].T)   (+ h_PG = both, for backward)
  grouped_mm   C = A[rows] @ B[e]  with B[e] any [Kd, Ncols] strided view of an expert's weight;
               A rows gathered by token or taken in sorted order; output to the pair's row or the
               sorted row; optional per-row top-k weight; optional SwiGLU-backward epilogue.

Variants (constexpr flags, chosen per shape by the autotuner; see launch.GemmConfig):
  TMA_A / TMA_B  operand tiles through Hopper tensor descriptors (tl.make_tensor_descriptor; the
                 descriptor lives in a global scratch that triton.set_allocator provides) instead of
                 pointer loads: the weights (K-contiguous) and sorted A rows (for w13: x gathered into
                 sorted order beforehand by gather_rows, one extra pass). Tiles past the tensor's end are
                 zero-filled by the hardware.
  PERSISTENT     1: a grid of about one program per multiprocessor striding over the live tiles only
                 (off[E] / BM row blocks x column blocks) instead of one program per possible tile;
                 2: the same with tl.range(flatten=True), so the compiler may flatten the tile and K
                 loops into one pipelined loop (the next tile's loads overlap this tile's epilogue).
  TAIL_BM        > 0: the tail-tile layout (align.py): row tiles come from a list, BM-row main tiles and
                 TAIL_BM-row tail tiles in one launch; each program branches on its tile's kind into the
                 same tile body specialized for either row count. 0: uniform BM-row blocks.
  MERGE          with TAIL_BM: merged tiles (kind 2) too, BM + TAIL_BM rows in one program with two
                 accumulators (XM = TAIL_BM extra rows) fed by the same weight tiles: an expert with a few
                 rows past a multiple of BM (DeepSeek-V3 at T = 4096: 128 +- 11 rows) streams its weights once
                 instead of again for a separate tail tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moesaic.kernels.triton.tiles import _listed_tile, _live_tiles, _rows_at, _swizzle


@triton.jit
def _w13_store(rows, row_ok, cols, acc_g, acc_u, act_ptr, h_ptr, F, stride_act, stride_h, SAVE_H: tl.constexpr):
    """The SwiGLU epilogue of some rows of a w13 tile: act (and h) to their sorted rows."""
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
def _w13_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
              x_ptr, x_desc, x_xdesc, w_ptr, w_desc, act_ptr, h_ptr, D, F, stride_xt,
              stride_we, stride_wg, stride_act, stride_h, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              XM: tl.constexpr, SAVE_H: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
              TMA_A: tl.constexpr, TMA_B: tl.constexpr):
    """One live tile of act (and h): BM sorted rows of expert e from row0 x BN columns; the K loop and the SwiGLU
    epilogue. XM > 0 (a merged tile): also the XM rows after them, multiplied by the same weight tiles (x_xdesc:
    the XM-row descriptor)."""
    rows, row_ok, pair, tok = _rows_at(row0, e, sorted_ptr, off_ptr, counts_ptr, TOPK, BM)
    if XM > 0:
        rows2, row_ok2, pair2, tok2 = _rows_at(row0 + BM, e, sorted_ptr, off_ptr, counts_ptr, TOPK, XM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    if TMA_A:  # x_ptr holds the rows already gathered into sorted order
        a_row0 = row0.to(tl.int32)
    else:
        a_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :]
        if XM > 0:
            a2_ptrs = x_ptr + tok2[:, None] * stride_xt + ks[None, :]
    if TMA_B:  # rows past F read the up half or (last expert) zeros; such columns are never stored
        g_row = (e * 2 * F + pid_n * BN).to(tl.int32)
    else:
        cols_ld = cols % F  # wrap instead of masking: out-of-range columns are never stored
        g_ptrs = w_ptr + e * stride_we + cols_ld[None, :].to(tl.int64) * stride_wg + ks[:, None]
        u_ptrs = g_ptrs + F * stride_wg
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if XM > 0:
        acc_g2 = tl.zeros((XM, BN), dtype=tl.float32)
        acc_u2 = tl.zeros((XM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        if TMA_A:
            a = x_desc.load([a_row0, k0])
            if XM > 0:
                a2 = x_xdesc.load([a_row0 + BM, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs)
            if XM > 0:
                a2 = tl.load(a2_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(ks + k0 < D)[None, :], other=0.0)
            if XM > 0:
                a2 = tl.load(a2_ptrs, mask=(ks + k0 < D)[None, :], other=0.0)
        if TMA_B:  # descriptor loads zero-fill past D
            bg = w_desc.load([g_row, k0]).T
            bu = w_desc.load([g_row + F, k0]).T
        elif EVEN_K:
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            k_ok = ks + k0 < D
            bg = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter cannot multiply bf16 natively
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        if XM > 0:
            if DOT_F32:
                a2 = a2.to(tl.float32)
            acc_g2 = tl.dot(a2, bg, acc_g2)
            acc_u2 = tl.dot(a2, bu, acc_u2)
        if not TMA_A:
            a_ptrs += BK
            if XM > 0:
                a2_ptrs += BK
        if not TMA_B:
            g_ptrs += BK
            u_ptrs += BK
    _w13_store(rows, row_ok, cols, acc_g, acc_u, act_ptr, h_ptr, F, stride_act, stride_h, SAVE_H)
    if XM > 0:
        _w13_store(rows2, row_ok2, cols, acc_g2, acc_u2, act_ptr, h_ptr, F, stride_act, stride_h, SAVE_H)


@triton.jit
def _w13_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr, x_ptr,
            x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F, TOPK, stride_xt, stride_we, stride_wg, stride_act,
            stride_h, BM: tl.constexpr, TAIL_BM: tl.constexpr, MERGE: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, SAVE_H: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
            TMA_A: tl.constexpr, TMA_B: tl.constexpr):
    """Live row tile pid_m (a BM block, or entry pid_m of the tile list when TAIL_BM > 0) x column block pid_n."""
    if TAIL_BM > 0:
        row0, e, kind = _listed_tile(pid_m, tile_row_ptr, tile_kind_ptr)
        if kind == 1:
            _w13_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                      x_ptr, x_tail, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F,
                      stride_xt, stride_we, stride_wg, stride_act, stride_h, TAIL_BM, BN, BK, 0, SAVE_H, DOT_F32,
                      EVEN_K, TMA_A, TMA_B)
        elif MERGE and kind == 2:  # a merged tile: the main rows and the expert's one tail
            _w13_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                      x_ptr, x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F,
                      stride_xt, stride_we, stride_wg, stride_act, stride_h, BM, BN, BK, TAIL_BM, SAVE_H,
                      DOT_F32, EVEN_K, TMA_A, TMA_B)
        else:
            _w13_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                      x_ptr, x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F,
                      stride_xt, stride_we, stride_wg, stride_act, stride_h, BM, BN, BK, 0, SAVE_H, DOT_F32, EVEN_K,
                      TMA_A, TMA_B)
    else:
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        _w13_tile(pid_m * BM, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                  x_ptr, x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F,
                  stride_xt, stride_we, stride_wg, stride_act, stride_h, BM, BN, BK, 0, SAVE_H, DOT_F32, EVEN_K,
                  TMA_A, TMA_B)


@triton.jit
def w13_swiglu_kernel(x_ptr, w_ptr, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr,
                      n_tiles_ptr, act_ptr, h_ptr, num_blocks, x_rows, E, D, F, TOPK, stride_xt, stride_we, stride_wg,
                      stride_act, stride_h,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      SAVE_H: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
                      TMA_A: tl.constexpr, TMA_B: tl.constexpr, PERSISTENT: tl.constexpr, TAIL_BM: tl.constexpr,
                      MERGE: tl.constexpr):
    # x_ptr [x_rows, D] row-major activations: token rows, or (TMA_A) rows already in sorted order; w_ptr [E, 2F, D] (gate rows then up rows, D contiguous);
    # act_ptr [P, F] output silu(gate)*up in sorted rows; h_ptr [P, 2F] pre-activations (if SAVE_H).
    # tile_row_ptr / tile_kind_ptr [S], n_tiles_ptr [1]: the tail-tile list (TAIL_BM > 0; align.py).
    # num_blocks: the row tiles the grid covers (max blocks, or S).
    # TMA_B needs stride_we == 2F * stride_wg (checked by the caller): one descriptor over [E*2F, D].
    if TMA_A:
        x_src = tl.make_tensor_descriptor(x_ptr, shape=[x_rows, D], strides=[stride_xt, 1], block_shape=[BM, BK])
        if TAIL_BM > 0:
            x_tail = tl.make_tensor_descriptor(x_ptr, shape=[x_rows, D], strides=[stride_xt, 1],
                                               block_shape=[TAIL_BM, BK])
        else:
            x_tail = x_src
    else:
        x_src = x_ptr
        x_tail = x_ptr
    if TMA_B:
        w_src = tl.make_tensor_descriptor(w_ptr, shape=[E * 2 * F, D], strides=[stride_wg, 1],
                                          block_shape=[BN, BK])
    else:
        w_src = w_ptr
    num_n = tl.cdiv(F, BN)
    num_live = _live_tiles(off_ptr, n_tiles_ptr, E, BM, TAIL_BM)
    if PERSISTENT > 0:  # every tile of the loop is live: no branch around the K loop (2: flattened loops)
        for tile in tl.range(tl.program_id(0), num_live * num_n, tl.num_programs(0), flatten=PERSISTENT == 2):
            pid_m, pid_n = _swizzle(tile, num_live, num_n, GROUP_M)
            _w13_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr,
                    x_ptr, x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F, TOPK, stride_xt, stride_we, stride_wg,
                    stride_act, stride_h, BM, TAIL_BM, MERGE, BN, BK, SAVE_H, DOT_F32, EVEN_K, TMA_A, TMA_B)
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, num_n, GROUP_M)
        if pid_m < num_live:
            _w13_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr,
                    x_ptr, x_src, x_tail, w_ptr, w_src, act_ptr, h_ptr, D, F, TOPK, stride_xt, stride_we, stride_wg,
                    stride_act, stride_h, BM, TAIL_BM, MERGE, BN, BK, SAVE_H, DOT_F32, EVEN_K, TMA_A, TMA_B)


@triton.jit
def _mm_store(acc, rows, row_ok, pair, cols, c_ptr, w_ptr, h_ptr, NC, stride_cm, stride_h,
              OUT_PAIR: tl.constexpr, SCALE_W: tl.constexpr, SWIGLU_BWD: tl.constexpr):
    """The epilogue of some rows of a C tile: top-k weight, SwiGLU backward, store to the pair's or sorted row."""
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
def _mm_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
             a_ptr, a_desc, a_xdesc, b_ptr, b_desc, c_ptr, w_ptr, h_ptr, NC, KD,
             stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_h,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, XM: tl.constexpr,
             A_GATHER: tl.constexpr, OUT_PAIR: tl.constexpr, SCALE_W: tl.constexpr, SWIGLU_BWD: tl.constexpr,
             DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr):
    """One live tile of C: BM sorted rows of expert e from row0 x BN columns; the K loop and the epilogue.
    XM > 0 (a merged tile): also the XM rows after them, multiplied by the same B tiles (a_xdesc: the XM-row
    descriptor)."""
    rows, row_ok, pair, tok = _rows_at(row0, e, sorted_ptr, off_ptr, counts_ptr, TOPK, BM)
    if XM > 0:
        rows2, row_ok2, pair2, tok2 = _rows_at(row0 + BM, e, sorted_ptr, off_ptr, counts_ptr, TOPK, XM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    if TMA_A:
        a_row0 = row0.to(tl.int32)
    else:
        a_row = tok if A_GATHER else rows
        a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :]
        if XM > 0:
            a_row2 = tok2 if A_GATHER else rows2
            a2_ptrs = a_ptr + a_row2[:, None] * stride_am + ks[None, :]
    if TMA_B:
        b_row0 = (e * NC + pid_n * BN).to(tl.int32)
    else:
        cols_ld = (cols % NC).to(tl.int64)
        b_ptrs = b_ptr + e * stride_be + ks[:, None] * stride_bk + cols_ld[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if XM > 0:
        acc2 = tl.zeros((XM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        if TMA_A:  # descriptor loads zero-fill past KD and past the last row
            a = a_desc.load([a_row0, k0])
            if XM > 0:
                a2 = a_xdesc.load([a_row0 + BM, k0])
        elif EVEN_K:  # padding rows compute on whatever they hold; they are never stored
            a = tl.load(a_ptrs)
            if XM > 0:
                a2 = tl.load(a2_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(ks + k0 < KD)[None, :], other=0.0)
            if XM > 0:
                a2 = tl.load(a2_ptrs, mask=(ks + k0 < KD)[None, :], other=0.0)
        if TMA_B:
            b = b_desc.load([b_row0, k0]).T
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=(ks + k0 < KD)[:, None], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        if XM > 0:
            if DOT_F32:
                a2 = a2.to(tl.float32)
            acc2 = tl.dot(a2, b, acc2)
        if not TMA_A:
            a_ptrs += BK
            if XM > 0:
                a2_ptrs += BK
        if not TMA_B:
            b_ptrs += BK * stride_bk
    _mm_store(acc, rows, row_ok, pair, cols, c_ptr, w_ptr, h_ptr, NC, stride_cm, stride_h, OUT_PAIR, SCALE_W,
              SWIGLU_BWD)
    if XM > 0:
        _mm_store(acc2, rows2, row_ok2, pair2, cols, c_ptr, w_ptr, h_ptr, NC, stride_cm, stride_h, OUT_PAIR, SCALE_W,
                  SWIGLU_BWD)


@triton.jit
def _mm_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr, a_ptr,
           a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC, KD, TOPK, stride_am, stride_be, stride_bk, stride_bn,
           stride_cm, stride_h, BM: tl.constexpr, TAIL_BM: tl.constexpr, MERGE: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, A_GATHER: tl.constexpr, OUT_PAIR: tl.constexpr, SCALE_W: tl.constexpr,
           SWIGLU_BWD: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, TMA_A: tl.constexpr,
           TMA_B: tl.constexpr):
    """Live row tile pid_m (a BM block, or entry pid_m of the tile list when TAIL_BM > 0) x column block pid_n."""
    if TAIL_BM > 0:
        row0, e, kind = _listed_tile(pid_m, tile_row_ptr, tile_kind_ptr)
        if kind == 1:
            _mm_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                     a_ptr, a_tail, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC,
                     KD, stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_h, TAIL_BM, BN, BK, 0,
                     A_GATHER, OUT_PAIR, SCALE_W, SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)
        elif MERGE and kind == 2:  # a merged tile: the main rows and the expert's one tail
            _mm_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                     a_ptr, a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC,
                     KD, stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_h, BM, BN, BK, TAIL_BM,
                     A_GATHER, OUT_PAIR, SCALE_W, SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)
        else:
            _mm_tile(row0, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                     a_ptr, a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC,
                     KD, stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_h, BM, BN, BK, 0,
                     A_GATHER, OUT_PAIR, SCALE_W, SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)
    else:
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        _mm_tile(pid_m * BM, pid_n, e, sorted_ptr, off_ptr, counts_ptr, TOPK,
                 a_ptr, a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC,
                 KD, stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_h, BM, BN, BK, 0,
                 A_GATHER, OUT_PAIR, SCALE_W, SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, c_ptr, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr,
                      tile_kind_ptr, n_tiles_ptr, w_ptr, h_ptr, num_blocks, a_rows, E, NC, KD, TOPK, stride_am,
                      stride_be, stride_bk, stride_bn, stride_cm, stride_h,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      A_GATHER: tl.constexpr, OUT_PAIR: tl.constexpr, SCALE_W: tl.constexpr,
                      SWIGLU_BWD: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
                      TMA_A: tl.constexpr, TMA_B: tl.constexpr, PERSISTENT: tl.constexpr, TAIL_BM: tl.constexpr,
                      MERGE: tl.constexpr):
    # a_ptr [a_rows, KD] (k contiguous): row = token (A_GATHER) or sorted row.
    # b_ptr expert e's [KD, NC] view: b_ptr + e*stride_be + k*stride_bk + n*stride_bn.
    # c_ptr [rows, NC] (+NC more columns when SWIGLU_BWD): row = pair (OUT_PAIR) or sorted row.
    # w_ptr [N] fp top-k weights by pair (SCALE_W); h_ptr [P, 2F] saved pre-activations (SWIGLU_BWD).
    # tile_row_ptr / tile_kind_ptr [S], n_tiles_ptr [1]: the tail-tile list (TAIL_BM > 0; align.py).
    # TMA_A: sorted A only. TMA_B: needs stride_bk == 1 and stride_be == NC * stride_bn (the caller checks):
    # one descriptor over the weights as [E*NC, KD].
    if TMA_A:
        a_src = tl.make_tensor_descriptor(a_ptr, shape=[a_rows, KD], strides=[stride_am, 1], block_shape=[BM, BK])
        if TAIL_BM > 0:
            a_tail = tl.make_tensor_descriptor(a_ptr, shape=[a_rows, KD], strides=[stride_am, 1],
                                               block_shape=[TAIL_BM, BK])
        else:
            a_tail = a_src
    else:
        a_src = a_ptr
        a_tail = a_ptr
    if TMA_B:
        b_src = tl.make_tensor_descriptor(b_ptr, shape=[E * NC, KD], strides=[stride_bn, 1], block_shape=[BN, BK])
    else:
        b_src = b_ptr
    num_n = tl.cdiv(NC, BN)
    num_live = _live_tiles(off_ptr, n_tiles_ptr, E, BM, TAIL_BM)
    if PERSISTENT > 0:  # every tile of the loop is live: no branch around the K loop (2: flattened loops)
        for tile in tl.range(tl.program_id(0), num_live * num_n, tl.num_programs(0), flatten=PERSISTENT == 2):
            pid_m, pid_n = _swizzle(tile, num_live, num_n, GROUP_M)
            _mm_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr, a_ptr,
                   a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC, KD, TOPK, stride_am, stride_be, stride_bk,
                   stride_bn, stride_cm, stride_h, BM, TAIL_BM, MERGE, BN, BK, A_GATHER, OUT_PAIR, SCALE_W,
                   SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), num_blocks, num_n, GROUP_M)
        if pid_m < num_live:
            _mm_at(pid_m, pid_n, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, tile_row_ptr, tile_kind_ptr, a_ptr,
                   a_src, a_tail, b_ptr, b_src, c_ptr, w_ptr, h_ptr, NC, KD, TOPK, stride_am, stride_be, stride_bk,
                   stride_bn, stride_cm, stride_h, BM, TAIL_BM, MERGE, BN, BK, A_GATHER, OUT_PAIR, SCALE_W,
                   SWIGLU_BWD, DOT_F32, EVEN_K, TMA_A, TMA_B)
