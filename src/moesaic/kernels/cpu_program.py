"""A straight-line program of C kernel calls, run by one C call: a batch-1 CPU decode step without Python between
its kernels.

Why: a batch-1 decode step of the fine-grained benchmark model is ~20 C kernel calls a layer (norms, the q/k/v/o
GEMVs, the decode attention, the router, the experts, residual adds), each reached through Python modules and
ctypes: ~1.2 ms of Python a step against ~3-7 ms of kernels (a py-spy profile, session 5). The arguments of these
calls do not change between steps (weights, buffers, sizes); what does (the token, the position, the experts the
router chose) lives in buffers that the kernels read. So the caller records the calls once (`Program`) and
`run` executes them back to back in C.

A program is int64 words, op after op: [fn, flags, n, arg_0 .. arg_{n-1}]: fn a C function taking n int64 /
pointer arguments (at most `MAX_ARGS`; the x86-64 calling convention passes both alike); flags & 1: fn returns an
int, and a nonzero return stops the run (the caller handles that op, e.g. the router giving up at a near-tie, then
resumes after it). Kernels with float parameters (a norm's eps, the attention scale, the router's bounds) are
reached through the small wrappers below, which take the float's bits as an int64. Built with `cpu_gemv.build`
(same compiler, flags and machine requirements); `available()` is False where it cannot be.

Ops recorded with the helpers here (`Program.<op>`) call the very kernels the module-by-module path calls, with
the same arguments, so a program computes the same bits (tested against that path in tests/test_fast_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import struct

import torch

from moesaic.kernels import cpu_attention, cpu_experts, cpu_gemv, cpu_norm, cpu_pool, cpu_q8, cpu_router
from moesaic.kernels.cpu_program_src import MAX_ARGS, source


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_gemv.build(source(), "program")
    if lib is None:
        return None
    lib.moesaic_program_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.moesaic_program_run.restype = ctypes.c_int64
    return lib


def available() -> bool:
    """Whether programs can run here (builds the library on the first call)."""
    return _library() is not None


def address(fn) -> int:
    """The address of a ctypes function."""
    return ctypes.cast(fn, ctypes.c_void_p).value


def f32_bits(x: float) -> int:
    """x rounded to fp32, as the int64 the wrappers take."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Program:
    """Records C calls (`add_call` and the op helpers) and runs them (`run`). The tensors whose memory the calls use
    must stay alive as long as the program: the recorder keeps a reference to every tensor passed to a helper."""

    def __init__(self) -> None:
        self._lib = _library()
        if self._lib is None:
            raise RuntimeError("cpu_program: the C library cannot be built here (see cpu_gemv.build)")
        self.words: list[int] = []
        self.keep: list[object] = []  # tensors / ctypes arrays the recorded pointers point into
        self._prog = None
        self._rc = ctypes.c_int64(0)

    # ---------------------------------------------------------------- recording
    def add_call(self, fn, args: list[int], returns_int: bool = False) -> int:
        """Append a call of ctypes function `fn` (or its address) with int64 / pointer `args`; returns the op's
        offset (what `run` reports when a returns_int op returned nonzero)."""
        if len(args) > MAX_ARGS:
            raise ValueError(f"cpu_program: at most {MAX_ARGS} arguments, got {len(args)}")
        off = len(self.words)
        self.words += [fn if isinstance(fn, int) else address(fn), int(returns_int), len(args)]
        self.words += [int(a) for a in args]
        self._prog = None
        return off

    def _hold(self, *ts) -> None:
        self.keep.extend(t for t in ts if t is not None)

    def op(self, name: str, args: list[int], returns_int: bool = False) -> int:
        """A call of one of this library's own ops (moesaic_op_<name>)."""
        return self.add_call(getattr(self._lib, f"moesaic_op_{name}"), args, returns_int)

    def norm(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, rows: int, eps: float) -> None:
        """y = cpu_norm.rms_norm(x, w, eps) over `rows` rows of w.shape[0] (x, y contiguous, fp32 or bf16)."""
        self._hold(x, w, y)
        fn = getattr(cpu_norm._library(), cpu_norm._KERNELS[x.dtype])
        self.op("norm", [address(fn), ptr(x), ptr(w), ptr(y), rows, w.shape[0], f32_bits(eps)])

    def gemv(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, split: bool) -> None:
        """y [1, O] = cpu_gemv.gemv(x [1, I], w [O, I]) (fp32 / bf16), the rows halved over the C worker when split
        (as cpu_gemv._rows_split cuts them)."""
        self._hold(x, w, y)
        lib = cpu_gemv._library()
        # fp32: the T1-prefetch twin (with no ATen ops between the kernels, NTA's cache-sparing no longer pays)
        fn = lib.moesaic_gemv_f32_t1 if x.dtype == torch.float32 else getattr(lib, cpu_gemv._KERNELS[x.dtype])
        o, i = w.shape
        ld, es = w.stride(0), w.element_size()
        cut = (o // 2) & ~15
        if not split or cut == 0:
            self.add_call(fn, [ptr(x), ptr(w), ptr(y), o, i, ld])
            return
        self.run2(fn, [ptr(x), ptr(w), ptr(y), cut, i, ld],
                  [ptr(x), ptr(w) + cut * ld * es, ptr(y) + cut * y.element_size(), o - cut, i, ld])

    def gemv_int8(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, split: bool) -> None:
        """y [1, O] fp32 = cpu_gemv.gemv_int8(x [1, I] fp32, q [O, I] int8, scale [O]) (weight-only), the rows halved
        over the C worker when split (as cpu_gemv._rows_split cuts them)."""
        s = scale.to(torch.float32).contiguous()
        self._hold(x, q, s, y)
        fn = cpu_gemv._library().moesaic_gemv_i8
        o, i = q.shape
        ld, cut = q.stride(0), (o // 2) & ~15
        if not split or cut == 0:
            self.add_call(fn, [ptr(x), ptr(q), ptr(s), ptr(y), o, i, ld])
            return
        self.run2(fn, [ptr(x), ptr(q), ptr(s), ptr(y), cut, i, ld],
                  [ptr(x), ptr(q) + cut * ld, ptr(s) + cut * 4, ptr(y) + cut * 4, o - cut, i, ld])

    def run2(self, fn, args_main: list[int], args_worker: list[int]) -> None:
        """fn(*args_worker) on the C worker thread while fn(*args_main) runs on the caller's (`cpu_pool.run2`)."""
        lib = cpu_pool._library()
        if lib is None or not cpu_pool.ENABLED:
            self.add_call(fn, args_worker)
            self.add_call(fn, args_main)
            return
        n = len(args_main)
        a = (ctypes.c_int64 * max(n, 1))(*args_main)
        b = (ctypes.c_int64 * max(n, 1))(*args_worker)
        self._hold(a, b)
        self.add_call(lib.moesaic_pool_run2, [fn if isinstance(fn, int) else address(fn), n, ctypes.addressof(a),
                                              ctypes.addressof(b)])

    def linear_q8(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, block: int,
                  split: bool) -> None:
        """y [1, O] fp32 = cpu_q8.linear(x [1, I] fp32 / bf16, q [O, I] int8, scale [O]) (W8A8), the outputs halved
        over the C worker when split (as cpu_q8's _LinearPlan cuts them)."""
        s = cpu_experts._fp32_scales(scale)
        o, i = q.shape
        ldq = (i + 63) // 64 * 64 + 64  # cpu_q8._scratch's layout for one row
        lds = ldq // 4
        scratch = [torch.empty(ldq + 8 * lds, dtype=torch.uint8) for _ in range(2)]
        self._hold(x, q, s, y, *scratch)
        fn = cpu_q8._library().moesaic_linear_q8
        xbf = int(x.dtype == torch.bfloat16)

        def part(a: int, b: int, buf: torch.Tensor) -> list[int]:
            pq = buf.data_ptr()
            return [ptr(x), xbf, x.stride(0), 1, ptr(q) + a * q.stride(0), q.stride(0), b - a, i, ptr(s) + a * 4,
                    ptr(y) + a * 4, o, pq, ldq, pq + ldq, pq + ldq + lds * 4, lds, block]

        cut = (o // 2) & ~7 if split and o >= 64 else o
        if 0 < cut < o:
            self.run2(fn, part(0, cut, scratch[0]), part(cut, o, scratch[1]))
        else:
            self.add_call(fn, part(0, o, scratch[0]))

    def attention(self, q, k, v, cos, sin_rot, k_cache, v_cache, slot, pos, n_heads: int, out) -> int:
        """out [1, H*D] = cpu_attention.decode_attention_unchecked(...) for one row (slot / pos: int64 pointers
        read when the op runs). Returns the op's offset (a nonzero result: no scratch memory)."""
        self._hold(q, k, v, cos, sin_rot, k_cache, v_cache, out)
        lib = cpu_attention._library()
        fn = lib.moesaic_decode_attn_f32 if k_cache.dtype == torch.float32 else lib.moesaic_decode_attn_bf16
        _, m, hkv, d = k_cache.shape
        return self.op("attn", [address(fn), ptr(q), q.stride(0), ptr(k), k.stride(0), ptr(v), v.stride(0), ptr(cos),
                                ptr(sin_rot), cos.stride(0), ptr(k_cache), ptr(v_cache), slot, pos, 1, n_heads, hkv, d,
                                m, f32_bits(d ** -0.5), ptr(out)], returns_int=True)

    def route(self, x, w, k: int, kind: int, bias, normalize: bool, scale: float, logits, ids, weights) -> int:
        """cpu_router.route_unchecked for x [1, D] into logits [1, E] fp32, ids [1, k] int64 and weights [1, k] (x's
        dtype). Returns the op's offset: a nonzero result means torch must route this row (1) or no memory (2)."""
        self._hold(x, w, bias, logits, ids, weights)
        d = x.shape[1]
        g_set, g_ord = cpu_router.bounds(d)
        return self.op("route", [address(cpu_router._library().moesaic_route), ptr(x), int(x.dtype == torch.bfloat16),
                                 ptr(w), int(w.dtype == torch.bfloat16), 1, d, w.shape[0], k, kind, int(normalize),
                                 ptr(bias), f32_bits(scale), f32_bits(cpu_router.TOL[kind]), f32_bits(g_set),
                                 f32_bits(g_ord), ptr(logits), ptr(ids), ptr(weights),
                                 int(x.dtype == torch.bfloat16)], returns_int=True)

    def experts_one_token(self, x, ids, weights, w13, w2, split: bool, out) -> None:
        """out [1, D] fp32 = the fp32 sum that cpu_experts.one_token computes (before its cast) for x [1, D] and the
        router's ids [1, K] int64 / weights [1, K] (fp32 or bf16, read when the ops run; ids >= 0). w13 / w2: float
        tensors of x's dtype, or `quant.Int8Weight`s (W8A8 when act_block is set and `cpu_q8` is available, else
        weight-only). Splits the experts over the C worker when split, at the point cpu_experts._split picks."""
        k, d = ids.shape[1], x.shape[1]
        f = w13.shape[1] // 2
        groups = torch.empty(3 * k, dtype=torch.int64)
        wk = torch.empty(k, dtype=torch.float32)
        y = torch.empty((k, d), dtype=torch.float32)
        h = cpu_experts._padded(k, 2 * f, torch.float32)
        self._hold(x, ids, weights, groups, wk, y, h, out)
        self.op("groups", [ptr(ids), k, ptr(groups), ptr(weights), int(weights.dtype == torch.bfloat16), ptr(wk)])
        block = getattr(w13, "act_block", None)
        if block is not None and cpu_q8.available():  # W8A8: cpu_q8.run_experts
            q13, q2 = w13.q, w2.q
            sc13, sc2 = cpu_experts._fp32_scales(w13.scale), cpu_experts._fp32_scales(w2.scale)
            k_in = max(d, f)
            ldq = (k_in + 63) // 64 * 64 + 64
            lds = ldq // 4
            buf = torch.empty(k * (ldq + 8 * lds), dtype=torch.uint8)
            self._hold(q13, q2, sc13, sc2, buf)
            pq = buf.data_ptr()
            fn = cpu_q8._library().moesaic_experts_q8

            def args(g0: int, g1: int) -> list[int]:
                return [ptr(x), int(x.dtype == torch.bfloat16), 0, ptr(groups), g0, g1, ptr(q13), q13.stride(0),
                        q13.stride(1), ptr(sc13), ptr(q2), q2.stride(0), q2.stride(1), ptr(sc2), ptr(h), h.stride(0),
                        pq, ldq, pq + k * ldq, pq + k * ldq + k * lds * 4, lds, ptr(y), d, f, block]
        else:  # float or weight-only int8: cpu_experts._run
            lib = cpu_experts._library()
            q13, q2 = getattr(w13, "q", w13), getattr(w2, "q", w2)
            p13 = p2 = 0
            if q13.dtype == torch.int8:  # fp32 rows (a bf16 row widened first), fp32 scales
                if x.dtype != torch.float32:
                    xf = torch.empty((1, d), dtype=torch.float32)
                    self.op("bf16_to_f32", [ptr(x), ptr(xf), d])
                    x = xf
                sc13, sc2 = cpu_experts._fp32_scales(w13.scale), cpu_experts._fp32_scales(w2.scale)
                self._hold(x, sc13, sc2)
                fn, a, p13, p2 = lib.moesaic_experts_i8, h, ptr(sc13), ptr(sc2)
            else:
                bf16 = x.dtype == torch.bfloat16
                a = cpu_experts._padded(k, f, torch.bfloat16) if bf16 else h
                fn = lib.moesaic_experts_bf16 if bf16 else lib.moesaic_experts_f32_t1  # T1 prefetch: see cpu_gemv
            self._hold(q13, q2, a)

            def args(g0: int, g1: int) -> list[int]:
                return [ptr(x), 0, ptr(groups), g0, g1, ptr(q13), q13.stride(0), q13.stride(1), p13, ptr(q2),
                        q2.stride(0), q2.stride(1), p2, ptr(h), h.stride(0), ptr(a), a.stride(0), ptr(y), d, f]
        cut = cpu_experts._split([1] * k) if split and k > 1 else k
        if 0 < cut < k:
            self.run2(fn, args(0, cut), args(cut, k))
        else:
            self.add_call(fn, args(0, k))
        self.add_call(cpu_experts._library().moesaic_combine_f32, [ptr(y), ptr(wk), k, d, ptr(out)])

    # ------------------------------------------------------------------ running
    def run(self, start: int = 0) -> tuple[int, int]:
        """Run the ops from offset `start` to the end: (-1, 0) when all ran, else (offset, result) of the op whose
        int result was nonzero (the caller does its work and resumes with `run(next_op(offset))`)."""
        if self._prog is None:
            self._prog = (ctypes.c_int64 * max(len(self.words), 1))(*self.words)
            self._end = len(self.words)
        at = self._lib.moesaic_program_run(self._prog, start, self._end, ctypes.byref(self._rc))
        return at, self._rc.value

    def next_op(self, offset: int) -> int:
        """The offset of the op after the one at `offset`."""
        return offset + 3 + self.words[offset + 2]
