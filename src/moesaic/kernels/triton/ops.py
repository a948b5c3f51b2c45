"""Forward and backward of the Triton MoE experts, and the autograd.Function tying them together.

Shape legend: T tokens, D model dim, F expert hidden, G = 2F, E experts, K top-k, N = T*K pairs,
P padded sorted rows.

Forward (grouped path):
 1. align: sort pairs by expert, pad each expert to BM rows            (align.py, 1-3 launches)
    (tail tiles, cfg.tail_bm > 0: pad to tail_bm rows; the GEMMs take BM-row main tiles and tail_bm-row
    tail tiles from a tile list, cfg.tail_merge: a lone tail in its main tile's program; training keeps
    uniform BM blocks)
 2. act_PF = SwiGLU(x[tok] @ w13[e].T)                                  (w13_swiglu_kernel)
 3. o_ND[pair] = act_PF @ w2[e].T                                       (grouped_mm_kernel)
 4. y_TD = sum_k w[t,k] * o_ND[t*K+k]                                   (combine_kernel)
Forward (decode path): decode_w13 then decode_w2 with the combine fused (decode.py).
Forward (fused path): one kernel, fp32 atomics into a self-cleaning workspace (fused_decode.py); not
deterministic, so a `deterministic_requested()` call runs the untuned heuristic's path instead.
Backward (always grouped; training batches are large):
 dw[t,k] = <dy[t], o[t*K+k]>
 do_PD   = w[pair] * dy[tok] in sorted rows, zero padding                (gather_rows)
 dh_PG   = SwiGLU'(h_PG) * (do_PD @ w2[e])                              (grouped_mm, SWIGLU_BWD)
 dx_TD   = sum_k dh_PG[row(t,k)] @ w13[e]                               (grouped_mm + combine)
 dw13[e] = dh_PG[rows of e].T @ x[tok]    dw2[e] = do_PD[rows of e].T @ act_PF[rows of e]   (wgrad)
 (padding rows of act, dh, do and the gathered x are zeros, so wgrad runs without row masks)
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from moesaic.kernels.determinism import deterministic_requested
from moesaic.kernels.triton import decode as dk
from moesaic.kernels.triton import fused_decode as fd
from moesaic.kernels.triton import grouped_aux as ga
from moesaic.kernels.triton import grouped_gemm as gk
from moesaic.kernels.triton import launch
from moesaic.kernels.triton.align import Alignment, align
from moesaic.kernels.triton.fastlaunch import launcher
from moesaic.kernels.triton.launch import GemmConfig, MoEConfig


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_f32(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 3  # the interpreter: a few programs, so the persistent loop strides
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def _grid_mm(al: Alignment, ncols: int, g: GemmConfig) -> tuple[int]:
    tiles = al.max_tiles * triton.cdiv(ncols, g.bn)
    return (min(tiles, _num_sms(al.off_E1.device)),) if _persistent(g) else (tiles,)


@functools.cache
def tma_available() -> bool:
    """Triton has in-kernel tensor descriptors (3.4+) and the device has TMA (Hopper or newer), or the
    interpreter runs the kernels (tests)."""
    import triton.language as tl

    if os.environ.get("MOESAIC_TRITON_TMA", "1") == "0":  # off: also for shipped configs that ask for it
        return False
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return False
    return _interpreting() or (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


@functools.cache
def _persistent_max() -> int:
    """The highest `GemmConfig.persistent` this process runs: 0 with MOESAIC_TRITON_PERSISTENT=0, 1 on a Triton
    whose `tl.range` has no `flatten` (before 3.3), else 2. A shipped config asking for more runs this instead."""
    if os.environ.get("MOESAIC_TRITON_PERSISTENT", "1") == "0":
        return 0
    import inspect

    import triton.language as tl

    try:
        return 2 if "flatten" in inspect.signature(tl.range).parameters else 1
    except (TypeError, ValueError):
        return 1


def _persistent(g: GemmConfig) -> int:
    return min(int(g.persistent), _persistent_max())


def align_for(ids_TK: torch.Tensor, num_experts: int, cfg: MoEConfig, save: bool = False) -> Alignment:
    """The alignment a grouped config runs on: tail tiles (merged ones too if cfg.tail_merge) if it asks for them
    (inference only, and not under MOESAIC_TRITON_TAIL=0), else uniform cfg.bm blocks."""
    tail = 0 if save or os.environ.get("MOESAIC_TRITON_TAIL", "1") == "0" else cfg.tail_bm
    if not tail:
        return align(ids_TK, num_experts, cfg.bm)
    return align(ids_TK, num_experts, tail, cfg.bm, merge=bool(cfg.tail_merge))


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """In-kernel descriptors live in a global scratch that Triton asks its allocator for at launch."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return
    try:  # keep a user's allocator (Triton's default is a NullAllocator that raises)
        from triton.runtime import _allocation
        keep = type(_allocation._allocator.get()).__name__ != "NullAllocator"
    except Exception:  # private API moved: set ours
        keep = False
    if not keep:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR_SET = True


def _tma_ok(t: torch.Tensor, rows_contiguous: bool = True) -> bool:
    """A 2-D [rows, cols] view of t can back a tensor descriptor: 16-byte aligned base and row stride,
    unit last stride."""
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0
          and (not rows_contiguous or t.is_contiguous()) and tma_available())
    if ok and t.is_cuda:
        _ensure_allocator()
    return ok


def run_w13(x_TD, w13_EGD, al: Alignment, topk: int, g: GemmConfig, save_h: bool):
    """-> (act_PF, h_PG or None)."""
    e, gg, d = w13_EGD.shape
    f = gg // 2
    p = al.sorted_ids_P.shape[0]
    act = torch.empty((p, f), dtype=x_TD.dtype, device=x_TD.device)
    h = torch.empty((p, gg), dtype=x_TD.dtype, device=x_TD.device) if save_h else act
    tma_b = g.tma > 0 and _tma_ok(w13_EGD)
    # tma 2: gather x into sorted rows first (one pass), so the GEMM loads A through a descriptor too
    tma_a = g.tma == 2 and _tma_ok(x_TD, rows_contiguous=False)
    a = _gather_sorted(x_TD, al, topk) if tma_a else x_TD
    tile_row, tile_kind, n_tiles, bm, tail_bm, merge = al.tile_args()
    launcher(gk.w13_swiglu_kernel)(_grid_mm(al, f, g),
        a, w13_EGD, al.sorted_ids_P, al.block_expert_B, al.off_E1, al.counts_E, tile_row, tile_kind, n_tiles, act, h,
        al.max_tiles, a.shape[0], e, d, f, topk, a.stride(0), w13_EGD.stride(0), w13_EGD.stride(1), act.stride(0),
        h.stride(0), BM=bm, BN=g.bn, BK=g.bk, GROUP_M=g.group_m, SAVE_H=save_h,
        DOT_F32=_dot_f32(x_TD.dtype), EVEN_K=d % g.bk == 0, TMA_A=tma_a, TMA_B=tma_b, PERSISTENT=_persistent(g),
        TAIL_BM=tail_bm, MERGE=merge, num_warps=g.num_warps, num_stages=g.num_stages)
    return act, (h if save_h else None)


def run_mm(a, b_ptr_tensor, b_strides, out, al: Alignment, topk: int, ncols: int, kd: int, g: GemmConfig, *,
           a_gather: bool, out_pair: bool, w_N=None, h_PG=None):
    """C = A[rows] @ B[e] for every block; see grouped_mm_kernel for the modes."""
    se, sk, sn = b_strides
    w = w_N if w_N is not None else out
    h = h_PG if h_PG is not None else out
    # TMA for B only when each expert's weight is a K-contiguous [ncols, kd] block of a contiguous tensor
    tma_b = g.tma > 0 and sk == 1 and se == ncols * sn and _tma_ok(b_ptr_tensor)
    tma_a = g.tma > 0 and not a_gather and _tma_ok(a, rows_contiguous=False)
    tile_row, tile_kind, n_tiles, bm, tail_bm, merge = al.tile_args()
    launcher(gk.grouped_mm_kernel)(_grid_mm(al, ncols, g),
        a, b_ptr_tensor, out, al.sorted_ids_P, al.block_expert_B, al.off_E1, al.counts_E, tile_row, tile_kind, n_tiles,
        w, h, al.max_tiles, a.shape[0], b_ptr_tensor.shape[0], ncols, kd, topk, a.stride(0), se, sk, sn,
        out.stride(0), h.stride(0), BM=bm, BN=g.bn, BK=g.bk, GROUP_M=g.group_m, A_GATHER=a_gather,
        OUT_PAIR=out_pair, SCALE_W=w_N is not None, SWIGLU_BWD=h_PG is not None,
        DOT_F32=_dot_f32(a.dtype), EVEN_K=kd % g.bk == 0, TMA_A=tma_a, TMA_B=tma_b, PERSISTENT=_persistent(g),
        TAIL_BM=tail_bm, MERGE=merge, num_warps=g.num_warps, num_stages=g.num_stages)


def run_combine(o_ND, ids_N, w_N, t: int, d: int, topk: int, dtype, num_experts: int) -> torch.Tensor:
    y = torch.empty((t, d), dtype=dtype, device=o_ND.device)
    if t == 0:
        return y
    bd = min(1024, triton.next_power_of_2(d))
    launcher(ga.combine_kernel)((t, triton.cdiv(d, bd)),
        o_ND, ids_N, w_N if w_N is not None else o_ND, y, d, num_experts, topk, o_ND.stride(0), y.stride(0),
        USE_W=w_N is not None, BD=bd, num_warps=4)
    return y


def _dims(x_TD, w13_EGD, ids_TK) -> tuple[int, int, int, int, int]:
    """(T, D, E, F, K) of one call."""
    t, d = x_TD.shape
    e, gg, _ = w13_EGD.shape
    return t, d, e, gg // 2, ids_TK.shape[1]


def forward_grouped(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg: MoEConfig, save: bool):
    """-> (y_TD, saved tuple or None)."""
    t, d, e, f, k = _dims(x_TD, w13_EGD, ids_TK)
    ids_N, w_N = ids_TK.reshape(-1), w_TK.reshape(-1)
    al = align_for(ids_TK, e, cfg, save)
    act, h = run_w13(x_TD, w13_EGD, al, k, cfg.gemm1, save)
    # rows of dropped pairs are never written; zero them only when backward reads o (for dw)
    o = (torch.zeros if save else torch.empty)((t * k, d), dtype=x_TD.dtype, device=x_TD.device)
    run_mm(act, w2_EDF, (w2_EDF.stride(0), w2_EDF.stride(2), w2_EDF.stride(1)), o, al, k, d, f, cfg.gemm2,
           a_gather=False, out_pair=True)
    y = run_combine(o, ids_N, w_N, t, d, k, x_TD.dtype, e)
    return y, ((al, act, h, o) if save else None)


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled Triton on a Hopper-or-newer GPU (MOESAIC_TRITON_PDL=0: off)."""
    return (device.type == "cuda" and not _interpreting() and os.environ.get("MOESAIC_TRITON_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def forward_decode(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg: MoEConfig) -> torch.Tensor:
    t, d, e, f, k = _dims(x_TD, w13_EGD, ids_TK)
    ids_N = ids_TK.reshape(-1)
    act = torch.empty((t * k, f), dtype=torch.float32, device=x_TD.device)
    y = torch.empty((t, d), dtype=x_TD.dtype, device=x_TD.device)
    if t == 0:
        return y
    g1, g2 = cfg.gemm1, cfg.gemm2
    pdl = bool(cfg.pdl) and pdl_available(x_TD.device)
    launcher(dk.decode_w13_kernel)((t * k, triton.cdiv(f, g1.bn)),
        x_TD, w13_EGD, ids_N, act, d, f, e, k, x_TD.stride(0), w13_EGD.stride(0), w13_EGD.stride(1),
        BN=g1.bn, BK=g1.bk, EVEN_K=d % g1.bk == 0, PDL=pdl, num_warps=g1.num_warps, num_stages=g1.num_stages,
        launch_pdl=pdl)
    launcher(dk.decode_w2_kernel)((t, triton.cdiv(d, g2.bn)),
        act, w2_EDF, ids_N, w_TK.reshape(-1), y, d, f, e, w2_EDF.stride(0), w2_EDF.stride(1), y.stride(0),
        TOPK=k, KP=triton.next_power_of_2(k), BN=g2.bn, BK=g2.bk, EVEN_K=f % g2.bk == 0, PDL=pdl,
        num_warps=g2.num_warps, num_stages=g2.num_stages, launch_pdl=pdl)
    return y


def _bwd_gemm(bm: int) -> GemmConfig:
    # backward launches are not tuned yet: one config per row block (training batches use bm >= 64)
    return GemmConfig(64, 128, 4, 4, 4) if bm <= 32 else GemmConfig(128, 64, 8, 8, 3)


def _run_wgrad(lhs, rhs, dw, al: Alignment):
    e, ni, nj = dw.shape
    bi, bj, br = 128, 128, min(64, al.block_m)
    launcher(ga.wgrad_kernel)((e * triton.cdiv(ni, bi) * triton.cdiv(nj, bj),),
        lhs, rhs, dw, al.off_E1, ni, nj, lhs.stride(0), rhs.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        BI=bi, BJ=bj, BR=br, DOT_F32=_dot_f32(lhs.dtype), num_warps=8, num_stages=3)


def _gather_sorted(src_TC, al: Alignment, topk: int, w_N=None):
    """[P, C] sorted copy of token rows (scaled by the pair's weight if given); zeros in padding rows."""
    c = src_TC.shape[1]
    dst = torch.empty((al.sorted_ids_P.shape[0], c), dtype=src_TC.dtype, device=src_TC.device)
    bc = min(256, triton.next_power_of_2(c))
    launcher(ga.gather_rows_kernel)((al.max_blocks, triton.cdiv(c, bc)),
        src_TC, dst, al.sorted_ids_P, al.block_expert_B, al.off_E1, al.counts_E, w_N if w_N is not None else src_TC,
        al.counts_E.shape[0], c, topk, src_TC.stride(0), dst.stride(0), BM=al.block_m, BC=bc,
        SCALE_W=w_N is not None, num_warps=4)
    return dst


def backward_grouped(dy_TD, x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, saved, needs):
    """-> (dx, dw13, dw2, dweights) (None where not needed)."""
    al, act, h, o = saved
    t, d, e, f, k = _dims(x_TD, w13_EGD, ids_TK)
    gg = 2 * f
    ids_N, w_N = ids_TK.reshape(-1), w_TK.reshape(-1)
    dy = dy_TD.contiguous()
    g = _bwd_gemm(al.block_m)
    dx = dw13 = dw2 = dwt = None
    if needs[4]:  # o rows of dropped pairs are zero (forward with save), so they give 0
        dwt = torch.bmm(o.view(t, k, d), dy.view(t, d, 1)).view(t, k).to(w_TK.dtype)
    if not (needs[0] or needs[1] or needs[2]):
        return dx, dw13, dw2, dwt
    do_PD = _gather_sorted(dy, al, k, w_N)  # w[pair] * dy[token], sorted, zero padding rows
    if needs[2]:
        dw2 = torch.empty_like(w2_EDF)
        _run_wgrad(do_PD, act, dw2, al)
    if needs[0] or needs[1]:
        dh = torch.empty_like(h)
        run_mm(do_PD, w2_EDF, (w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2)), dh, al, k, f, d, g,
               a_gather=False, out_pair=False, h_PG=h)
        if needs[0]:
            dxn = torch.empty((t * k, d), dtype=x_TD.dtype, device=x_TD.device)
            run_mm(dh, w13_EGD, (w13_EGD.stride(0), w13_EGD.stride(1), w13_EGD.stride(2)), dxn, al, k, d, gg,
                   g, a_gather=False, out_pair=True)
            dx = run_combine(dxn, ids_N, None, t, d, k, x_TD.dtype, e)
        if needs[1]:
            dw13 = torch.empty_like(w13_EGD)
            _run_wgrad(dh, _gather_sorted(x_TD, al, k), dw13, al)
    return dx, dw13, dw2, dwt


def forward(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg: MoEConfig) -> torch.Tensor:
    """Inference forward (no autograd bookkeeping) on the path the config names."""
    if cfg.path == "fused":
        if not deterministic_requested():
            return fd.forward_fused(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg)
        t, d, e, f, k = _dims(x_TD, w13_EGD, ids_TK)
        cfg = launch.heuristic(t, d, f, e, k)  # decode or grouped: a fixed summation order
    if cfg.path == "decode":
        return forward_decode(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg)
    return forward_grouped(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg, save=False)[0]


class TritonMoEFunction(torch.autograd.Function):
    """moe_experts with a grouped-GEMM backward; inputs are made contiguous by the caller."""

    @staticmethod
    def forward(ctx, x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg: MoEConfig, train_cfg: MoEConfig):
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        if not needs_grad:
            return forward(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, cfg)
        y, saved = forward_grouped(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK, train_cfg, save=True)
        ctx.saved_align = saved
        ctx.save_for_backward(x_TD, w13_EGD, w2_EDF, ids_TK, w_TK)
        return y

    @staticmethod
    def backward(ctx, dy_TD):
        x, w13, w2, ids, w = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], False,
                 ctx.needs_input_grad[4])
        dx, dw13, dw2, dwt = backward_grouped(dy_TD, x, w13, w2, ids, w, ctx.saved_align, needs)
        return dx, dw13, dw2, None, dwt, None, None
