"""Sort the (token, expert) pairs by expert and pad each expert's run to a multiple of BM rows.

Shape legend: T tokens, K top-k, N = T*K pairs, E experts, BM rows per GEMM block, P = padded rows.

Pair n is token n // K, slot n % K. After alignment:
  sorted_ids_P[r]   the pair in sorted row r (rows past an expert's count are padding: never read)
  off_E1[e]         first padded row of expert e; off_E1[E] = total padded rows actually used
  counts_E[e]       pairs routed to e (ids < 0 or >= E are dropped and appear nowhere)
  block_expert_B[b] the expert of block b (rows b*BM .. b*BM+BM-1), for b < off_E1[E] / BM
P is an upper bound known without reading the ids (so no device->host sync and the launch is
CUDA-graph safe): every expert pads at most BM-1 rows and at most min(E, N) experts are non-empty.

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

    @property
    def max_blocks(self) -> int:
        return self.block_expert_B.shape[0]


def max_blocks(n_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of BM-row blocks after per-expert padding."""
    return triton.cdiv(n_pairs, block_m) + min(num_experts, n_pairs)


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, off_ptr, counts_ptr, block_expert_ptr, N, E,
                        BM: tl.constexpr, NP: tl.constexpr, EP: tl.constexpr):
    # ids_ptr: [N] int32 expert per pair (< 0 dropped). One program does everything.
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
    my_start = tl.sum(tl.where(ids[:, None] == e[None, :], start[None, :], 0), axis=1)
    valid = (n < N) & (ids >= 0)
    pos = my_start + rank
    tl.store(sorted_ptr + pos, n, mask=valid)
    tl.store(block_expert_ptr + pos // BM, ids, mask=valid & (rank % BM == 0))


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, N, E, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1)
    valid = (n < N) & (ids >= 0) & (ids < E)
    rank = tl.atomic_add(counts_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(rank_ptr + n, rank, mask=valid)


@triton.jit
def _offsets_kernel(counts_ptr, off_ptr, E, BM: tl.constexpr, EP: tl.constexpr):
    e = tl.arange(0, EP)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (counts + BM - 1) // BM * BM
    incl = tl.cumsum(padded, axis=0)
    tl.store(off_ptr + e, incl - padded, mask=e < E)
    tl.store(off_ptr + E, tl.sum(padded, axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, rank_ptr, off_ptr, sorted_ptr, block_expert_ptr, N, E,
                    BM: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + n, mask=n < N, other=-1)
    valid = (n < N) & (ids >= 0) & (ids < E)
    rank = tl.load(rank_ptr + n, mask=valid, other=0)
    start = tl.load(off_ptr + ids, mask=valid, other=0)
    pos = start + rank
    tl.store(sorted_ptr + pos, n, mask=valid)
    tl.store(block_expert_ptr + pos // BM, ids, mask=valid & (rank % BM == 0))


def align(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort pairs by expert, padded per expert to `block_m` rows. See the module docstring."""
    dev = expert_ids_TK.device
    ids_N = expert_ids_TK.reshape(-1).to(torch.int32)
    n = ids_N.numel()
    nb = max_blocks(n, num_experts, block_m)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    off = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    ep = triton.next_power_of_2(num_experts)
    if n <= SMALL_N:
        counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
        launcher(_align_small_kernel)((1,), ids_N, sorted_ids, off, counts, block_expert, n, num_experts,
                                  BM=block_m, NP=triton.next_power_of_2(max(n, 1)), EP=ep, num_warps=8)
    else:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
        rank = torch.empty(n, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(n, 1024),)
        launcher(_count_kernel)(grid, ids_N, counts, rank, n, num_experts, BLOCK=1024)
        launcher(_offsets_kernel)((1,), counts, off, num_experts, BM=block_m, EP=ep)
        launcher(_scatter_kernel)(grid, ids_N, rank, off, sorted_ids, block_expert, n, num_experts, BM=block_m,
                                  BLOCK=1024)
    return Alignment(sorted_ids, off, counts, block_expert, block_m)
