"""One-row matrix-vector products for CPU decode (fp32, bf16): small AVX-512 C kernels, built on first use.

Shape legend: I input features, O output features (rows of the weight), ld the weight's row stride.

    y[0, o] = sum_i x[0, i] * w[o, i]        (x [1, I], w [O, I] rows contiguous; fp32, or bf16 with
                                              fp32 accumulation through avx512_bf16 pair dot products)

Why: a batch-1 decode step is one GEMV per weight matrix, bound by how fast one core streams the
weight. On the 2-core Zen 4 VM, with weights in huge pages, oneDNN / MKL read 20-23 GB/s where a plain
sum reads ~32 GB/s; this kernel (one row at a time, four accumulators, software prefetch 4 KiB ahead into L2)
reads 28-32 GB/s on the benchmark shapes; in bf16 it reads 26-32 GB/s where oneDNN (over its
blocked copy) reads 13-18. The prefetches go to L2 (T1): into L1 (T0) they were 5-30% slower, on huge
pages and on 4 KiB pages alike; except the fp32 one-row kernel's, which are non-temporal (NTA), as are
`cpu_experts`' fp32 one-row ones: a batch-1 fp32 decode step's streamed weights then evict less of the caches
that the step's ~150 small ATen ops run from, which cut the step's time outside the kernels from 3.7-4.9 to
2.6-3.4 ms and the whole step 0.93-0.96x (the kernels themselves 2-3% slower; same-process A/B, 1 thread, both
benchmark shapes); in bf16 NTA made the kernels 15% slower and the step 1.08x, so bf16 keeps T1. It is compiled with the system C compiler (`cc`, -O3
-march=native) into a cache folder the first time `available()` is asked, and loaded with ctypes
(the call releases the GIL). Where there is no compiler, no AVX-512 (+ BF16) or no Linux, `available()` is
False and callers keep oneDNN. One-row calls on weights of 8 MiB or more (an LM head) split their rows over two threads
(`cpu_pool`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from moesaic.kernels import cpu_pool

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* y[o] = sum_i w[o * ld + i] * x[i] for o in [0, O); fp32; any I >= 0. Prefetch hint NTA (the module-by-module
   step: the streamed weights evict less of what its small ATen ops use) or T1 (`cpu_program`'s batch-1 step, no
   ATen ops between the kernels: fp32 steps 1.07-1.19x fine-64x8, 1.02-1.09x coarse-8x2, same-process A/B,
   benchmarks/ab_fast_step_hint.py). */
#define GEMV_F32(NAME, HINT) \
void NAME(const float* x, const float* w, float* y, int64_t O, int64_t I, int64_t ld) {                             \
  const int64_t i64 = I & ~(int64_t)63, i16 = I & ~(int64_t)15;                                                     \
  const __mmask16 tail = (__mmask16)((1u << (I - i16)) - 1u);                                                       \
  for (int64_t o = 0; o < O; o++) {                                                                                 \
    const float* r = w + o * ld;                                                                                    \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();  \
    int64_t i = 0;                                                                                                  \
    for (; i < i64; i += 64) {                                                                                      \
      /* prefetch never faults: running past the matrix's end is harmless */                                        \
      _mm_prefetch((const char*)(r + i + 1024), HINT);                                                              \
      _mm_prefetch((const char*)(r + i + 1040), HINT);                                                              \
      _mm_prefetch((const char*)(r + i + 1056), HINT);                                                              \
      _mm_prefetch((const char*)(r + i + 1072), HINT);                                                              \
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), a0);                                     \
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 16), _mm512_loadu_ps(x + i + 16), a1);                           \
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 32), _mm512_loadu_ps(x + i + 32), a2);                           \
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 48), _mm512_loadu_ps(x + i + 48), a3);                           \
    }                                                                                                               \
    for (; i < i16; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), a0);              \
    if (i < I) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + i), _mm512_maskz_loadu_ps(tail, x + i), a1);    \
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));                       \
  }                                                                                                                 \
}
GEMV_F32(moesaic_gemv_f32, _MM_HINT_NTA)
GEMV_F32(moesaic_gemv_f32_t1, _MM_HINT_T1)

/* Two rows: y[m * O + o] = sum_i w[o * ld + i] * x[m * ldx + i], m in {0, 1}: each weight row read once for both
   (oneDNN's blocked kernels do badly at two rows: 11-14 GB/s here, this 17-26). */
void moesaic_gemv2_f32(const float* x, int64_t ldx, const float* w, float* y, int64_t O, int64_t I, int64_t ld) {
  const int64_t i32 = I & ~(int64_t)31, i16 = I & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (I - i16)) - 1u);
  const float* x1 = x + ldx;
  for (int64_t o = 0; o < O; o++) {
    const float* r = w + o * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < i32; i += 32) {
      _mm_prefetch((const char*)(r + i + 1024), _MM_HINT_T1);
      _mm_prefetch((const char*)(r + i + 1040), _MM_HINT_T1);
      __m512 w0 = _mm512_loadu_ps(r + i), w1 = _mm512_loadu_ps(r + i + 16);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), a1);
      b0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x1 + i), b0);
      b1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x1 + i + 16), b1);
    }
    for (; i < i16; i += 16) {
      __m512 w0 = _mm512_loadu_ps(r + i);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), a0);
      b0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x1 + i), b0);
    }
    if (i < I) {
      __m512 w0 = _mm512_maskz_loadu_ps(tail, r + i);
      a1 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tail, x + i), a1);
      b1 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tail, x1 + i), b1);
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    y[O + o] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  }
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's float -> bfloat16 (finite f) */
  union { float f; uint32_t u; } v = { f };
  return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* bf16 x [I], bf16 w rows, bf16 y [O] (fp32 accumulation, bf16 pair dot products: avx512_bf16). */
void moesaic_gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t O, int64_t I, int64_t ld) {
  const int64_t i128 = I & ~(int64_t)127, i32 = I & ~(int64_t)31;
  const __mmask32 tail = (__mmask32)((1ull << (I - i32)) - 1ull);
  for (int64_t o = 0; o < O; o++) {
    const uint16_t* r = w + o * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < i128; i += 128) {
      _mm_prefetch((const char*)(r + i + 2048), _MM_HINT_T1);
      _mm_prefetch((const char*)(r + i + 2080), _MM_HINT_T1);
      _mm_prefetch((const char*)(r + i + 2112), _MM_HINT_T1);
      _mm_prefetch((const char*)(r + i + 2144), _MM_HINT_T1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + i), (__m512bh)_mm512_loadu_si512(x + i));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + i + 64), (__m512bh)_mm512_loadu_si512(x + i + 64));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + i + 96), (__m512bh)_mm512_loadu_si512(x + i + 96));
    }
    for (; i < i32; i += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + i), (__m512bh)_mm512_loadu_si512(x + i));
    if (i < I)
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + i),
                            (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i));
    y[o] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
  }
}

/* int8 weight-only: y[o] = scale[o] * sum_i q[o * ld + i] * x[i]; q int8, x / scale / y fp32 (exact int8 -> fp32). */
void moesaic_gemv_i8(const float* x, const int8_t* q, const float* scale, float* y, int64_t O, int64_t I,
                     int64_t ld) {
  const int64_t i64 = I & ~(int64_t)63, i16 = I & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (I - i16)) - 1u);
  for (int64_t o = 0; o < O; o++) {
    const int8_t* r = q + o * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < i64; i += 64) {
      _mm_prefetch((const char*)(r + i + 4096), _MM_HINT_T1);
      __m512i v = _mm512_loadu_si512(r + i);
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v))), _mm512_loadu_ps(x + i), a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))),
                           _mm512_loadu_ps(x + i + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))),
                           _mm512_loadu_ps(x + i + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))),
                           _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i < i16; i += 16)
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + i)))),
                           _mm512_loadu_ps(x + i), a0);
    if (i < I)
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, r + i))),
                           _mm512_maskz_loadu_ps(tail, x + i), a1);
    y[o] = scale[o] * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}
"""
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]

# C shared by the kernel sources that write bf16 (prepended to their source before `build`)
BF16_C = r"""
#include <stdint.h>
#include <string.h>

/* fp32 -> bf16, rounded to nearest even like torch's .to(bfloat16); NaN stays NaN */
static inline uint16_t fp32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
"""


def _cache_dir() -> Path:
    root = os.environ.get("MOESAIC_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "moesaic")
    return Path(root).expanduser() / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def build(source: str, stem: str) -> ctypes.CDLL | None:
    """Compile C `source` (once per source, flags and machine) into the cache folder and load it; None where it
    cannot be (no compiler, not Linux x86-64, no AVX-512 BW + BF16, or the build failed). Shared with
    `cpu_experts`."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    needed = {"avx512f", "avx512bw", "avx512_bf16"}  # the bf16 kernels' instructions are compiled in too
    if cc is None or platform.system() != "Linux" or platform.machine() != "x86_64" or not needed <= _cpu_flags():
        return None
    # -march=native: the binary is for this CPU; a cache folder shared by other machines gets one file per CPU
    key = hashlib.sha256("\0".join([source, *_FLAGS, cc, *sorted(_cpu_flags())]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"{stem}_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src = Path(tmp) / f"{stem}.c"
                src.write_text(source)
                out = Path(tmp) / path.name
                subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, path)  # atomic: a concurrent build or reader never sees half a file
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The GEMV kernels, built and loaded (None when they cannot be)."""
    lib = build(_SOURCE, "gemv")
    if lib is None:
        return None
    for fn in (lib.moesaic_gemv_f32, lib.moesaic_gemv_f32_t1, lib.moesaic_gemv_bf16):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        fn.restype = None
    lib.moesaic_gemv2_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int64] * 3
    lib.moesaic_gemv2_f32.restype = None
    lib.moesaic_gemv_i8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.moesaic_gemv_i8.restype = None
    return lib


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _library() is not None


def rows_ok(rows: int, dtype: torch.dtype) -> bool:
    """Which inputs the kernels take: one row at any torch thread count (one core's C kernel streams a weight
    faster than oneDNN on two threads here: batch-1 decode steps 1.11-2.17x, batch 8 1.00-1.23x, in a
    same-process A/B at 2 threads over both benchmark shapes, fp32 and bf16); two fp32 rows only on one torch
    thread (with more threads oneDNN's two-row matmul splits the work)."""
    return rows == 1 or (rows == 2 and dtype == torch.float32 and torch.get_num_threads() == 1)


def usable(x_MI: torch.Tensor, w_OI: torch.Tensor) -> bool:
    """Whether `gemv(x, w)` applies: one fp32 or bf16 CPU row (or two fp32 rows, see `rows_ok`), a CPU weight of
    the same dtype whose rows are contiguous, no gradient wanted."""
    return (x_MI.dim() == 2 and x_MI.dtype in _KERNELS and w_OI.dtype == x_MI.dtype
            and rows_ok(x_MI.shape[0], x_MI.dtype)
            and x_MI.device.type == "cpu" and w_OI.device.type == "cpu" and w_OI.dim() == 2
            and w_OI.shape[1] == x_MI.shape[1] and w_OI.stride(1) == 1
            and not (torch.is_grad_enabled() and (x_MI.requires_grad or w_OI.requires_grad)) and available())


_KERNELS = {torch.float32: "moesaic_gemv_f32", torch.bfloat16: "moesaic_gemv_bf16"}


def gemv(x_MI: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x [M, I] @ w [O, I].T -> [M, O] in x's dtype, M = 1 (fp32, or bf16 with fp32 accumulation) or 2 (fp32);
    check `usable` first."""
    x = x_MI.contiguous()
    o, i = w_OI.shape
    y = torch.empty((x.shape[0], o), dtype=x.dtype)
    if x.shape[0] == 2:
        _library().moesaic_gemv2_f32(x.data_ptr(), i, w_OI.data_ptr(), y.data_ptr(), o, i, w_OI.stride(0))
    else:
        _rows_split(getattr(_library(), _KERNELS[x.dtype]), x, w_OI, y, (o, i, w_OI.stride(0)))
    return y


def _rows_split(fn, x: torch.Tensor, w_OI: torch.Tensor, y: torch.Tensor, tail: tuple, scale=None) -> None:
    """fn(x, w, [scale,] y, O, I, ld) over the weight's rows, halved over two threads for weights of at least
    `cpu_pool.SPLIT_MIN_BYTES` (an LM head) when `cpu_pool.split_one_row`."""
    o, ld = tail[0], tail[2]
    head = (x.data_ptr(), w_OI.data_ptr()) + (() if scale is None else (scale.data_ptr(),))
    if o * ld * w_OI.element_size() < cpu_pool.SPLIT_MIN_BYTES or not cpu_pool.split_one_row():
        fn(*head, y.data_ptr(), *tail)
        return
    cut, es = (o // 2) & ~15, w_OI.element_size()
    rest = (x.data_ptr(), w_OI.data_ptr() + cut * ld * es) + (() if scale is None else (scale.data_ptr() + cut * 4,))
    cpu_pool.run2(fn, (*head, y.data_ptr(), cut, *tail[1:]), (*rest, y.data_ptr() + cut * y.element_size(),
                                                                o - cut, *tail[1:]))


def gemv_int8(x_1I: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x [1, I] @ (q [O, I] int8 * scale [O, 1]).T -> [1, O] in x's dtype, computed in fp32 (q's rows contiguous,
    x on CPU; one thread). ~1.3x torch's int8-weight matmul at one row here, and exact in x (no bf16 cast)."""
    x = x_1I.to(torch.float32).contiguous()
    s = scale_O.to(torch.float32).contiguous()
    y = torch.empty((1, q_OI.shape[0]), dtype=torch.float32)
    _rows_split(_library().moesaic_gemv_i8, x, q_OI, y, (q_OI.shape[0], q_OI.shape[1], q_OI.stride(0)), s)
    return y.to(x_1I.dtype)
