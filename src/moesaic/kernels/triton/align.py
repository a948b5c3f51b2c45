"""Sort the (token, expert) pairs by expert and pad each expert's run to a multiple of BM rows.

Shape legend: T tokens, K top-k, N = T*K pairs, E experts, BM rows per GEMM block, P = padded rows,
S = tiles of the tail-tile layout.

Pair n is token n // K, slot n % K. After alignment:
  sorted_ids_P[r]   the pair in sorted row r (rows past an expert's count are padding: never read)
  off_E1[e]         first padded row of expert e; off_E1[E] = total padded rows actually used
  counts_E[e]       pairs routed to e (ids < 0 or >= E are dropped and appear nowhere)
  block_expert_B[b] the expert of block b (rows b*BM .. b*BM+BM-1), for b < off_E1[E] / BM
P is an upper bound known without reading the ids (so no device->host sync and the launch is
CUDA-graph safe): every expert pads at most BM-1 rows and at most min(E, N) experts are non-empty.

Tail tiles (`align(..., main_m=MB)`, MB a multiple of BM): each expert is padded to a multiple of the
small block BM = RB only, and the GEMMs run over a tile list instead of uniform blocks: the expert's
first floor(padded / MB) * MB rows in MB-row "main" tiles, the rest (< MB rows) in RB-row "tail" tiles.
Padding is then bounded by RB - 1 rows per expert while most rows still run in big tiles. Tiles are
listed expert by expert (main tiles, then the expert's tails), so the tiles sharing an expert's weights
run close together and find them in L2. Every tile starts at a real pair (its first row is < the count).
  tile_row_S[s]     first sorted row of tile s          (s < n_tiles[0]; entries past it are stale)
  tile_kind_S[s]    4 * expert + kind: 0 a main tile, 1 a tail tile, 2 a merged tile
Merged tiles (`merge=True`): an expert whose rows end in exactly one tail tile after at least one main
tile runs that tail in the same program as its last main tile (MB + RB rows, kind 2): the program loads
each weight tile once for both, where a separate tail tile would stream the expert's weights again (from
L2 at best) for at most RB rows.
  n_tiles[0]        live tiles; S = max_tiles(...) bounds it without reading the ids
block_expert_B (per RB block) still describes the layout, so row-wise helpers (gather_rows) and the
weight-gradient kernel work on it unchanged.

Two implementations, same outputs:
  small N  one program: counts by one-hot sums, ranks by an N x N "same expert, earlier" count;
  large N  three launches: atomic counts (the atomic's old value is the pair's rank), an exclusive
           scan of the padded counts, then each pair writes itself to off[e] + rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moesaic.kernels.triton.fastlaunch import launcher

SMALL_N = 64  # up to this many pairs the one-program version is used (its N x E and N x N tiles)


@dataclass
class Alignment:
    sorted_ids_P: torch.Tensor
    off_E1: torch.Tensor
    counts_E: torch.Tensor
    block_expert_B: torch.Tensor
    block_m: int
    main_m: int = 0  # tail-tile layout: rows of a main tile (block_m is then the tail tile's); 0 = uniform blocks
    tile_row_S: torch.Tensor | None = None
    tile_kind_S: torch.Tensor | None = None
    n_tiles: torch.Tensor | None = None
    merge: bool = False  # merged tiles (kind 2) may appear in the tile list

    @property
    def max_blocks(self) -> int:
        return self.block_expert_B.shape[0]

    @property
    def max_tiles(self) -> int:
        """Grid bound in row tiles: the tile list's length (tail tiles) or the block count (uniform)."""
        return self.max_blocks if self.tile_row_S is None else self.tile_row_S.shape[0]

    def tile_args(self) -> tuple:
        """(tile_row, tile_kind, n_tiles, BM, TAIL_BM, MERGE) arguments of the GEMM kernels (dummies when
        uniform)."""
        if self.main_m:
            return self.tile_row_S, self.tile_kind_S, self.n_tiles, self.main_m, self.block_m, self.merge
        return self.off_E1, self.off_E1, self.off_E1, self.block_m, 0, False


def max_blocks(n_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of BM-row blocks after per-expert padding."""
    return triton.cdiv(n_pairs, block_m) + min(num_experts, n_pairs)


def max_tiles(n_pairs: int, num_experts: int, main_m: int, tail_m: int) -> int:
    """Upper bound on the tiles of the tail-tile layout. An expert with c rows padded to p = q*MB + j*RB
    (j < MB/RB) has q + j tiles and c > p - RB, so its tiles exceed c/MB by less than
    j (1 - RB/MB) + RB/MB <= ((MB - RB)^2 + RB^2) / (MB RB); summed over the min(E, N) non-empty experts.
    (RB = MB gives the uniform bound N/BM + min(E, N).) Nor can there be more tiles than RB blocks."""
    busy = min(num_experts, n_pairs)
    by_tiles = (n_pairs * tail_m + busy * ((main_m - tail_m) ** 2 + tail_m ** 2)) // (main_m * tail_m)
    return min(by_tiles, (n_pairs + (tail_m - 1) * busy) // tail_m)


@triton.jit
def _tiles_of(counts, RB: tl.constexpr, MB: tl.constexpr, MERGE: tl.constexpr):
    """-> (main tiles, all tiles, merged?) of experts with these counts (RB-padded, MB-row main tiles; MERGE: a
    lone tail after a main tile joins it)."""
    padded = (counts + RB - 1) // RB * RB
    n_main = padded // MB
    n_tail = (padded - n_main * MB) // RB
    if MERGE:
        merged = (n_tail == 1) & (n_main >= 1)
    else:
        merged = n_tail < 0  # never
    return n_main, n_main + n_tail - merged.to(tl.int32), merged


@triton.jit
def _store_tiles(tile_row_ptr, tile_kind_ptr, ids, rank, pos, count, tile0, valid,
                 RB: tl.constexpr, MB: tl.constexpr, MERGE: tl.constexpr):
    # the pair with this rank in its expert starts a tile: a main tile every MB ranks below the main
    # rows, a tail tile every RB ranks after them (none when merged: the last main tile takes it);
    # tile0 = the expert's first tile in the list
    n_main, _, merged = _tiles_of(count, RB, MB, MERGE)
    main_rows = n_main * MB
    is_main = rank < main_rows
    starts = valid & tl.where(is_main, rank % MB == 0, (rank % RB == 0) & ~merged)
    s = tile0 + tl.where(is_main, rank // MB, n_main + (rank - main_rows) // RB)
    kind = tl.where(is_main, tl.where(merged & (rank // MB == n_main - 1), 2, 0), 1)
    tl.store(tile_row_ptr + s, pos, mask=starts)
    tl.store(tile_kind_ptr + s, 4 * ids + kind, mask=starts)


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, off_ptr, counts_ptr, block_expert_ptr, tile_row_ptr, tile_kind_ptr,
                        n_tiles_ptr, N, E, BM: tl.constexpr, NP: tl.constexpr, EP: tl.constexpr,
                        MB: tl.constexpr, MERGE: tl.constexpr):
    # ids_ptr: [N] int32 expert per pair (< 0 dropped). One program does everything. MB > 0: tail tiles.
    n = tl.arange(0, NP)
    e = tl.arange(0, EP)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1)
    ids = tl.where(ids < E, ids, -1)  # ids >= E are treated as dropped, like the reference does
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)                      # [NP, EP]
    counts = tl.sum(onehot, axis=0)                                          # [EP]
    padded = (counts + BM - 1) // BM * BM
    incl = tl.cumsum(padded, axis=0)
    start = incl - padded
    tl.store(counts_ptr + e, counts, mask=e < E)
    tl.store(off_ptr + e, start, mask=e < E)
    tl.store(off_ptr + E, tl.sum(padded, axis=0))
    # rank of pair n among the pairs of its expert = earlier pairs with the same id
    m = tl.arange(0, NP)
    same_earlier = (ids[:, None] == ids[None, :]) & (m[None, :] < n[:, None])
    rank = tl.sum(same_earlier.to(tl.int32), axis=1)
    mine = ids[:, None] == e[None, :]
    my_start = tl.sum(tl.where(mine, start[None, :], 0), axis=1)
    valid = (n < N) & (ids >= 0)
    pos = my_start + rank
    tl.store(sorted_ptr + pos, n, mask=valid)
    tl.store(block_expert_ptr + pos // BM, ids, mask=valid & (rank % BM == 0))
    if MB > 0:
        _, n_all, _ = _tiles_of(counts, BM, MB, MERGE)
        tile_incl = tl.cumsum(n_all, axis=0)
        tile0 = tl.sum(tl.where(mine, (tile_incl - n_all)[None, :], 0), axis=1)
        my_count = tl.sum(tl.where(mine, counts[None, :], 0), axis=1)
        _store_tiles(tile_row_ptr, tile_kind_ptr, ids, rank, pos, my_count, tile0, valid, BM, MB, MERGE)
        tl.store(n_tiles_ptr, tl.sum(n_all, axis=0))


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, N, E, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1)
    valid = (n < N) & (ids >= 0) & (ids < E)
    rank = tl.atomic_add(counts_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(rank_ptr + n, rank, mask=valid)


@triton.jit
def _offsets_kernel(counts_ptr, off_ptr, tile0_ptr, n_tiles_ptr, E, BM: tl.constexpr, EP: tl.constexpr,
                    MB: tl.constexpr, MERGE: tl.constexpr):
    e = tl.arange(0, EP)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (counts + BM - 1) // BM * BM
    incl = tl.cumsum(padded, axis=0)
    tl.store(off_ptr + e, incl - padded, mask=e < E)
    tl.store(off_ptr + E, tl.sum(padded, axis=0))
    if MB > 0:  # each expert's first tile in the tile list
        _, n_all, _ = _tiles_of(counts, BM, MB, MERGE)
        tl.store(tile0_ptr + e, tl.cumsum(n_all, axis=0) - n_all, mask=e < E)
        tl.store(n_tiles_ptr, tl.sum(n_all, axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, rank_ptr, off_ptr, sorted_ptr, block_expert_ptr, counts_ptr, tile0_ptr, tile_row_ptr,
                    tile_kind_ptr, N, E, BM: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr,
                   MERGE: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1)
    valid = (n < N) & (ids >= 0) & (ids < E)
    rank = tl.load(rank_ptr + n, mask=valid, other=0)
    start = tl.load(off_ptr + ids, mask=valid, other=0)
    pos = start + rank
    tl.store(sorted_ptr + pos, n, mask=valid)
    tl.store(block_expert_ptr + pos // BM, ids, mask=valid & (rank % BM == 0))
    if MB > 0:
        count = tl.load(counts_ptr + ids, mask=valid, other=0)
        tile0 = tl.load(tile0_ptr + ids, mask=valid, other=0)
        _store_tiles(tile_row_ptr, tile_kind_ptr, ids, rank, pos, count, tile0, valid, BM, MB, MERGE)


def align(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, main_m: int = 0,
          merge: bool = False) -> Alignment:
    """Sort pairs by expert, padded per expert to `block_m` rows. See the module docstring.
    main_m > 0 (a multiple of block_m, larger): also list the tail-tile layout's tiles (main tiles of
    main_m rows, tail tiles of block_m rows); merge: with merged tiles."""
    if main_m and (main_m <= block_m or main_m % block_m):
        raise ValueError(f"align: main_m must be a multiple of block_m larger than it, got {main_m}, {block_m}")
    if merge and not main_m:
        raise ValueError("align: merge needs the tail-tile layout (main_m > 0)")
    dev = expert_ids_TK.device
    ids_N = expert_ids_TK.reshape(-1).to(torch.int32)
    n = ids_N.numel()
    nb = max_blocks(n, num_experts, block_m)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    off = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    if main_m:
        ns = max(1, max_tiles(n, num_experts, main_m, block_m))
        tile_row, tile_kind, n_tiles, tile0 = (torch.empty(m, dtype=torch.int32, device=dev)
                                               for m in (ns, ns, 1, num_experts))
    else:  # never touched (MB = 0): no extra allocations on the uniform path
        tile_row = tile_kind = n_tiles = tile0 = off
    ep = triton.next_power_of_2(num_experts)
    if n <= SMALL_N:
        counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
        launcher(_align_small_kernel)((1,), ids_N, sorted_ids, off, counts, block_expert, tile_row, tile_kind, n_tiles,
                                      n, num_experts, BM=block_m, NP=triton.next_power_of_2(max(n, 1)), EP=ep,
                                      MB=main_m, MERGE=merge, num_warps=8)
    else:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
        rank = torch.empty(n, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(n, 1024),)
        launcher(_count_kernel)(grid, ids_N, counts, rank, n, num_experts, BLOCK=1024)
        launcher(_offsets_kernel)((1,), counts, off, tile0, n_tiles, num_experts, BM=block_m, EP=ep, MB=main_m,
                                  MERGE=merge)
        launcher(_scatter_kernel)(grid, ids_N, rank, off, sorted_ids, block_expert, counts, tile0, tile_row, tile_kind,
                                  n, num_experts, BM=block_m, BLOCK=1024, MB=main_m, MERGE=merge)
    if not main_m:
        return Alignment(sorted_ids, off, counts, block_expert, block_m)
    return Alignment(sorted_ids, off, counts, block_expert, block_m, main_m, tile_row, tile_kind, n_tiles, merge)
