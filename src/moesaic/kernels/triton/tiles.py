"""Which sorted rows each GEMM program works on: uniform BM-row blocks, or the tail-tile list (align.py).

Shape legend: as in grouped_gemm.py (E experts, K top-k, P padded sorted rows, S listed tiles).

  _swizzle      program id -> (row tile, column block), grouped so weight tiles are reused in L2
  _rows_at      the BM rows of expert e from row0: row mask (rows past the count are padding), pair, token
  _block_rows   the same for uniform row block pid_m (its expert from block_expert)
  _listed_tile  (first row, expert, kind) of tile s of the tail-tile list (kind 0 main, 1 tail, 2 merged)
  _live_tiles   how many row tiles hold work (read on the device: the grid is an upper bound)
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
def _rows_at(row0, e, sorted_ptr, off_ptr, counts_ptr, TOPK, BM: tl.constexpr):
    """-> (rows, row_ok, pair, tok) of the BM sorted rows from row0, all of expert e."""
    rows = row0 + tl.arange(0, BM)
    row_ok = (rows - tl.load(off_ptr + e)) < tl.load(counts_ptr + e)
    pair = tl.load(sorted_ptr + rows, mask=row_ok, other=0)
    tok = (pair // TOPK).to(tl.int64)
    return rows.to(tl.int64), row_ok, pair.to(tl.int64), tok


@triton.jit
def _block_rows(pid_m, sorted_ptr, block_expert_ptr, off_ptr, counts_ptr, E, TOPK, BM: tl.constexpr):
    """-> (live, e, rows, row_ok, pair, tok) for row block pid_m."""
    total = tl.load(off_ptr + E)
    live = pid_m * BM < total
    e = tl.load(block_expert_ptr + pid_m, mask=live, other=0).to(tl.int64)
    rows, row_ok, pair, tok = _rows_at(pid_m * BM, e, sorted_ptr, off_ptr, counts_ptr, TOPK, BM)
    return live, e, rows, row_ok, pair, tok


@triton.jit
def _listed_tile(s, tile_row_ptr, tile_kind_ptr):
    """-> (first sorted row, expert, kind) of tile s of the tail-tile list (align.py): kind 0 a main tile, 1 a
    tail tile, 2 a merged tile (a main tile and the expert's one tail tile in one program)."""
    kind = tl.load(tile_kind_ptr + s)
    return tl.load(tile_row_ptr + s), (kind // 4).to(tl.int64), kind % 4


@triton.jit
def _live_tiles(off_ptr, n_tiles_ptr, E, BM: tl.constexpr, TAIL_BM: tl.constexpr):
    """Row tiles holding work: the tile list's length (tail tiles) or the used rows / BM (uniform blocks)."""
    if TAIL_BM > 0:
        n = tl.load(n_tiles_ptr)
    else:
        n = tl.load(off_ptr + E) // BM
    return n
