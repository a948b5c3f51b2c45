"""W8A8 for CPU inference: int8 weights (per output channel scales) x int8 activations quantized on the fly per
block of inputs, multiplied with AVX-512 VNNI (`vpdpbusd`), as llama.cpp's q8_0 does.

Shape legend: M rows, I (or K) input features, O output features, B = ceil(I / block) activation blocks;
N rows sorted by expert, D model dim, F expert hidden, G = 2F.

    s_x[m, b] = max|x[m, block b]| / 127,   q_x[m, i] = round(x[m, i] * 127 / max|x[m, block b]|)   (int8)
    y[m, o] = scale_w[o] * sum_b s_x[m, b] * sum_{i in b} q_x[m, i] * q_w[o, i]    (exact int32 per block)

Why: the weight-only int8 kernels (`cpu_gemv.gemv_int8`, `cpu_experts` int8) convert every weight byte to fp32
and do fp32 FMAs: 3 instructions per 16 weights, compute-bound at 17-20 GB/s of int8 where the memory gives ~30.
Here one `vpdpbusd` takes 64 weights; the kernel streams at memory speed. The numerics change: the activations
are rounded to 8 bits too (relative error ~ 1/254 of each block's max, per element); `docs/inference.md` gives the
measured logit error against fp32 and the weight-only path. Block `ACT_BLOCK` = 32 inputs (llama.cpp's q8_0).

The C code (`cpu_q8_src`) is built with `cpu_experts`' source into its own library, only where the CPU has
avx512_vnni; `available()` is False elsewhere and the int8 layers keep the weight-only kernels (their numerics).
`quantize_activations` / `matmul_reference` are the plain PyTorch spec the tests hold the kernels to.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from moesaic.kernels import cpu_experts, cpu_pool
from moesaic.kernels.cpu_experts_src import SOURCE
from moesaic.kernels.cpu_gemv import _cpu_flags, build
from moesaic.kernels.cpu_q8_src import Q8_SOURCE

ACT_BLOCK = 32  # activation block (inputs per scale); see docs/inference.md for the accuracy of 32 / 64 / 128 / 256
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    if "avx512_vnni" not in _cpu_flags():
        return None
    lib = build(SOURCE + Q8_SOURCE, "experts_q8")
    if lib is None:
        return None
    # x, xbf16, ldx, groups, g0, g1, w13, s13, ld13, sc13, w2, s2, ld2, sc2, h, ldh, xq, ldq, xs, xc, lds, y, D, F, QB
    lib.moesaic_experts_q8.argtypes = [_P, _I, _I, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _P, _P, _I, _P, _I, _P,
                                       _P, _I, _P, _I, _I, _I]
    # x, xbf16, ldx, M, w, ldw, O, I, scale, y, ldy, xq, ldq, xs, xc, lds, QB
    lib.moesaic_linear_q8.argtypes = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I, _I]
    # x, xbf16, ldx, M, K, QB, q, ldq, sv, nc, lds
    lib.moesaic_q8_rows.argtypes = [_P, _I, _I, _I, _I, _I, _P, _I, _P, _P, _I]
    for fn in (lib.moesaic_experts_q8, lib.moesaic_linear_q8, lib.moesaic_q8_rows):
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the W8A8 kernels can run here: x86-64 Linux with AVX-512 BW + BF16 + VNNI and a C compiler."""
    return _library() is not None


def check_block(block: int) -> int:
    if not isinstance(block, int) or block < 4 or block % 4:
        raise ValueError(f"activation block must be a positive multiple of 4, got {block!r}")
    return block


# ------------------------------------------------------------------ the plain PyTorch spec
def quantize_activations(x_MI: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, I] float -> (q [M, I] int8, s [M, B] fp32): per block of `block` inputs (the last one may be short),
    s = max|x| / 127 and q = round(x * (127 / max|x|)) (half to even; 0 where the block is all zero)."""
    check_block(block)
    x = x_MI.float()
    m, i = x.shape
    nb = -(-i // block)
    xp = torch.zeros(m, nb * block, dtype=torch.float32)
    xp[:, :i] = x
    amax = xp.view(m, nb, block).abs().amax(-1)
    # a tensor-by-tensor division: `127.0 / amax` would be 127 * reciprocal(amax), rounded differently from C
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    q = torch.round(xp.view(m, nb, block) * inv[..., None]).view(m, nb * block)[:, :i].to(torch.int8)
    return q, amax / 127.0


def matmul_reference(x_MI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor,
                     block: int = ACT_BLOCK) -> torch.Tensor:
    """The W8A8 product y [M, O] (fp32) the kernels compute, in float64 (per-block int dots are exact there)."""
    qx, sx = quantize_activations(x_MI, block)
    m, i = qx.shape
    nb = sx.shape[1]
    pad = nb * block - i
    qx = torch.nn.functional.pad(qx.double(), (0, pad)).view(m, nb, block)
    qw = torch.nn.functional.pad(q_OI.double(), (0, pad)).view(-1, nb, block)
    dots = torch.einsum("mbk,obk->mob", qx, qw)  # [M, O, B]
    y = (dots * sx.double()[:, None, :]).sum(-1) * scale_O.double()[None, :]
    return y.float()


# ------------------------------------------------------------------ the kernels
_local = threading.local()


def _scratch(rows: int, k: int, slot: int = 0) -> tuple[torch.Tensor, int, int]:
    """(buffer, ldq, lds) for `rows` quantized rows of up to k inputs: q int8 [rows, ldq] then sv fp32 and nc int32
    [rows, lds] each; one buffer per calling thread and slot (slot 1: the half a call hands to the second thread),
    grown when needed (the calls of one step reuse it), up to _KEEP bytes (a long prefill's scratch is not kept)."""
    ldq = (k + 63) // 64 * 64 + 64  # + 64: rows 4 KiB apart alias in L1
    lds = ldq // 4
    need = rows * (ldq + 8 * lds)
    if need > _KEEP:
        return torch.empty(need, dtype=torch.uint8), ldq, lds
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = [None, None]
    buf = bufs[slot]
    if buf is None or buf.numel() < need:
        buf = bufs[slot] = torch.empty(max(need, 1 << 16), dtype=torch.uint8)
    return buf, ldq, lds


_KEEP = 8 << 20


def _pointers(buf: torch.Tensor, rows: int, ldq: int, lds: int) -> tuple[int, int, int]:
    p = buf.data_ptr()
    return p, p + rows * ldq, p + rows * ldq + rows * lds * 4


def _row_input(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: fp32 or bf16 with contiguous rows (other dtypes converted to fp32)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_rows(x_MI: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The C quantizer (for the tests): (q [M, I] int8, per-lane scales [M, ceil(I / 4)] fp32)."""
    x = _row_input(x_MI)
    m, i = x.shape
    ldq = (i + 63) // 64 * 64
    q = torch.empty((m, max(ldq, 64)), dtype=torch.int8)
    sv = torch.empty((m, max(ldq, 64) // 4), dtype=torch.float32)
    nc = torch.empty((m, max(ldq, 64) // 4), dtype=torch.int32)
    _library().moesaic_q8_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), m, i, check_block(block),
                               q.data_ptr(), q.stride(0), sv.data_ptr(), nc.data_ptr(), sv.stride(0))
    return q[:, :i], sv[:, :(i + 3) // 4]


def linear(x_MI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor, block: int = ACT_BLOCK,
           threads: int = 1) -> torch.Tensor:
    """x [M, I] @ (q [O, I] int8 * scale [O]).T -> [M, O] in x's dtype, W8A8 (`matmul_reference`). q's rows
    contiguous; threads = 2 splits the outputs over this thread and `cpu_experts`' helper thread."""
    plan = getattr(q_OI, "_moesaic_q8", None)
    if plan is None or not plan.fits(q_OI, scale_O, block):
        plan = _LinearPlan(q_OI, scale_O, block)
        try:  # kept on the weight (an Int8Linear's parameter lives as long as the layer): one plan per weight
            q_OI._moesaic_q8 = plan
        except (AttributeError, RuntimeError):
            pass
    return plan(x_MI, threads)


class _LinearPlan:
    """The fixed arguments of one weight's `moesaic_linear_q8` calls, checked against the weight on each use
    (a decode step makes ~17 of these calls: each Python-side microsecond counts)."""

    def __init__(self, q_OI: torch.Tensor, scale_O: torch.Tensor, block: int) -> None:
        self.q, self.scale, self.version = q_OI, scale_O, scale_O._version
        self.ptr, self.block = q_OI.data_ptr(), check_block(block)
        self.s = cpu_experts._fp32_scales(scale_O)
        self.o, self.i = q_OI.shape
        self.fn = _library().moesaic_linear_q8

    def fits(self, q_OI: torch.Tensor, scale_O: torch.Tensor, block: int) -> bool:
        return (q_OI.data_ptr() == self.ptr and q_OI.shape == self.q.shape and q_OI.stride() == self.q.stride()
                and scale_O is self.scale and scale_O._version == self.version and block == self.block)

    def __call__(self, x_MI: torch.Tensor, threads: int) -> torch.Tensor:
        x = x_MI if x_MI.dtype in _KERNEL_DTYPES and x_MI.stride(-1) == 1 else _row_input(x_MI)
        m, o, q = x.shape[0], self.o, self.q
        y = torch.empty((m, o), dtype=torch.float32)
        if m == 0:
            return y.to(x_MI.dtype)
        xbf = int(x.dtype == torch.bfloat16)
        cut = (o // 2) & ~7 if threads > 1 and o >= 64 else o

        keep = []  # the scratch buffers stay alive until the calls return

        def part(a: int, b: int, slot: int) -> tuple:
            buf, ldq, lds = _scratch(m, self.i, slot)
            keep.append(buf)
            pq, ps, pc = _pointers(buf, m, ldq, lds)
            return (x.data_ptr(), xbf, x.stride(0), m, self.ptr + a * q.stride(0), q.stride(0), b - a, self.i,
                    self.s.data_ptr() + a * 4, y.data_ptr() + a * 4, o, pq, ldq, ps, pc, lds, self.block)

        if 0 < cut < o:
            cpu_pool.run2(self.fn, part(0, cut, 0), part(cut, o, 1))
        else:
            self.fn(*part(0, o, 0))
        return y if x_MI.dtype == torch.float32 else y.to(x_MI.dtype)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def run_experts(x_ND: torch.Tensor, groups: list[tuple[int, int, int]], n: int, w13, w2, threads: int,
                same_row: bool, block: int = ACT_BLOCK) -> torch.Tensor:
    """`cpu_experts._run` in W8A8: y [n, D] fp32 for groups (expert, first row, rows) of x's rows."""
    d = x_ND.shape[1]
    f = w13.shape[1] // 2
    y = torch.empty((n, d), dtype=torch.float32)
    if not groups:
        return y
    check_block(block)
    x = _row_input(x_ND)
    gt = (ctypes.c_int64 * (3 * len(groups)))(*[v for grp in groups for v in grp])
    h = cpu_experts._padded(n, 2 * f, torch.float32)
    q13, q2 = w13.q, w2.q
    sc13, sc2 = cpu_experts._fp32_scales(w13.scale), cpu_experts._fp32_scales(w2.scale)
    fn = _library().moesaic_experts_q8

    # one scratch for both halves: the groups' rows are disjoint (one token: a row per slot)
    buf, ldq, lds = _scratch(n, max(d, f))
    pq, ps, pc = _pointers(buf, n, ldq, lds)

    def run(g0: int, g1: int) -> tuple:
        return (x.data_ptr(), int(x.dtype == torch.bfloat16), 0 if same_row else x.stride(0), ctypes.addressof(gt),
                g0, g1, q13.data_ptr(), q13.stride(0), q13.stride(1), sc13.data_ptr(), q2.data_ptr(), q2.stride(0),
                q2.stride(1), sc2.data_ptr(), h.data_ptr(), h.stride(0), pq, ldq, ps, pc, lds, y.data_ptr(), d, f,
                block)

    cut = cpu_experts._split([c for _, _, c in groups]) if threads > 1 and len(groups) > 1 else len(groups)
    if 0 < cut < len(groups):
        cpu_pool.run2(fn, run(0, cut), run(cut, len(groups)))
    else:
        fn(*run(0, len(groups)))
    return y
