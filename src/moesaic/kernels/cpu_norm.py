"""RMS norm of a few fp32 / bf16 CPU rows in one small C call (batch-1 decode): an AVX-512 kernel built on first use.

Shape legend: R rows, D features.

    y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w      (fp32; the sum of squares in fp32)

Why: on CPU, torch's fp32 `F.rms_norm` runs as ~8 small ATen ops (pow, sum, div, add, rsqrt, mul, mul, ...):
~10 us per call warm and 30-40 us inside a decode step, whose weight streaming has just evicted the caches; a
batch-1 decode step of the benchmark shapes makes 9-17 such calls (2 per block, + q/k norms, + the final
norm). One ctypes call does the same arithmetic in ~2-3 us. Built with `cpu_gemv.build` (same compiler,
flags and machine requirements); where it cannot be built, `usable` is False and callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moesaic.kernels import cpu_gemv

_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* y[r, :] = x[r, :] * (1 / sqrt(sum(x[r, :]^2) / D + eps)) * w[:] for r in [0, R); rows contiguous. */
void moesaic_rms_norm_f32(const float* x, const float* w, float* y, int64_t R, int64_t D, float eps) {
  const int64_t d16 = D & ~(int64_t)15;
  const __mmask16 tail = (__mmask16)((1u << (D - d16)) - 1u);
  for (int64_t r = 0; r < R; r++) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d16; i += 32) {
      __m512 v0 = _mm512_loadu_ps(xr + i), v1 = _mm512_loadu_ps(xr + i + 16);
      a0 = _mm512_fmadd_ps(v0, v0, a0);
      a1 = _mm512_fmadd_ps(v1, v1, a1);
    }
    for (; i < d16; i += 16) { __m512 v = _mm512_loadu_ps(xr + i); a0 = _mm512_fmadd_ps(v, v, a0); }
    if (i < D) { __m512 v = _mm512_maskz_loadu_ps(tail, xr + i); a1 = _mm512_fmadd_ps(v, v, a1); }
    const float ss = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    const __m512 s = _mm512_set1_ps(1.0f / sqrtf(ss / (float)D + eps));
    for (i = 0; i < d16; i += 16)
      _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), s), _mm512_loadu_ps(w + i)));
    if (i < D)
      _mm512_mask_storeu_ps(yr + i, tail, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, xr + i), s),
                                                       _mm512_maskz_loadu_ps(tail, w + i)));
  }
}

/* bf16 rows (the model's bf16 order, `norm.rms_norm`): t = bf16(x * (1 / sqrt(sum(x^2) / D + eps))) in fp32, then
   y = bf16(t * w): F.rms_norm's rounded output times the bf16 weight, each product rounded once (to nearest even). */
static inline __m512 bf16x16_load(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m512 bf16x16_round(__m512 v) { /* fp32 -> nearest bf16 -> fp32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

void moesaic_rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t R, int64_t D, float eps) {
  for (int64_t r = 0; r < R; r++) {
    const uint16_t* xr = x + r * D;
    uint16_t* yr = y + r * D;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 m = D - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - i)) - 1u);
      __m512 v = bf16x16_load(xr + i, m);
      a0 = _mm512_fmadd_ps(v, v, a0);
    }
    const __m512 s = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(a0) / (float)D + eps));
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 m = D - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - i)) - 1u);
      __m512 t = bf16x16_round(_mm512_mul_ps(bf16x16_load(xr + i, m), s));
      _mm256_mask_storeu_epi16(yr + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(t, bf16x16_load(w + i, m))));
    }
  }
}
"""

MAX_ELEMENTS = 1 << 16  # more: torch's (multi-threaded) norm; this kernel is for the few rows of a decode step


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_gemv.build(_SOURCE, "rmsnorm")
    if lib is None:
        return None
    for fn in (lib.moesaic_rms_norm_f32, lib.moesaic_rms_norm_bf16):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _library() is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm(x, weight, eps)` applies: fp32 (or bf16) CPU x [..., D] with at most MAX_ELEMENTS values
    and a contiguous CPU weight [D] of x's dtype, no gradient wanted."""
    return (x.dtype in _KERNELS and weight.dtype == x.dtype and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.dim() == 1 and x.dim() >= 1
            and weight.shape[0] == x.shape[-1] and weight.is_contiguous() and 0 < x.numel() <= MAX_ELEMENTS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and available())


_KERNELS = {torch.float32: "moesaic_rms_norm_f32", torch.bfloat16: "moesaic_rms_norm_bf16"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] / rms(x) * weight [D] -> a new tensor of x's shape and dtype (fp32, or bf16 rounded as the model's
    bf16 norm rounds: the normalised value, then its product with the weight); check `usable` first."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype)
    d = x.shape[-1]
    getattr(_library(), _KERNELS[x.dtype])(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y
