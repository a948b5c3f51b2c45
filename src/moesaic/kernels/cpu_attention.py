"""Decode attention of a few fp32 / bf16 CPU rows in one C call: rotary, KV-cache write and attention together.

Shape legend: B rows (one new token each), H query heads, Hkv kv heads (G = H / Hkv queries share one),
D head dim, N cache slots, M positions per slot.

For each row b (cache slot s_b, new position p_b) and layer:

    k', q' = rope(k, cos_b, sin_b), rope(q, cos_b, sin_b)          (full rotary, halves layout)
    K[s_b, p_b], V[s_b, p_b] = k', v                                 (the cache write)
    o[b, h] = softmax(scale * q'[h] . K[s_b, 0..p_b, h // G]) @ V[s_b, 0..p_b, h // G]

Why: on CPU, a batch-1 decode step's attention in torch is ~10 ATen ops a layer (rotary: flip, 2 muls, add;
the cache's `index_copy_`; views; SDPA with its parallel region), each 5-30 us inside a step whose weight
streaming has just evicted the caches, and SDPA's 2-thread region stalls whenever another process holds a
core. One single-threaded C call does the same arithmetic in a few microseconds at short contexts.
Built with `cpu_gemv.build` (same compiler, flags and machine requirements); where it cannot be built,
`available()` is False and callers keep torch. Softmax in fp32 with the running maximum subtracted, like SDPA.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct

import torch

from moesaic.kernels import cpu_gemv, cpu_pool

_SOURCE = cpu_gemv.BF16_C + r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Element access per storage type: 16 lanes widened to fp32 (plain / masked), one value to and from fp32.
   bf16 rounds to nearest even, NaN kept NaN. */
static inline __m512 ld_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 mld_f32(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
static inline float cv_f32(float x) { return x; }
static inline float st_f32(float f) { return f; }
static inline __m512 ld_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 mld_bf16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline float cv_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t st_bf16(float f) { return fp32_to_bf16(f); }

/* y = x * cos + swap_halves(x) * sin_rot (sin_rot: sin with its first half negated), D even; all fp32. */
static inline void rope(float* y, const float* x, const float* c, const float* sr, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i++) y[i] = x[i] * c[i] + x[i + h] * sr[i];
  for (int64_t i = h; i < D; i++) y[i] = x[i] * c[i] + x[i - h] * sr[i];
}

/* One kernel per storage type T (suffix S): the arithmetic in fp32 on widened values; the rotated key, the
   value and the output stored in T once (for bf16: rounded once, where torch rounds after each op).
   q [B, H*D] (row stride qs), k and v [B, Hkv*D] (row strides ks, vs), cos / sin_rot [B, D] (row stride rs);
   kbuf, vbuf: one layer's [N, M, Hkv, D] contiguous; slots, pos [B]; out [B, H*D] contiguous.
   Returns 0, or -1 when the scratch could not be allocated (nothing written then). */
#define DECODE_ATTN(S, T)                                                                                     \
static inline float dot_##S(const float* a, const T* b, int64_t n) {                                          \
  __m512 acc = _mm512_setzero_ps();                                                                           \
  int64_t i = 0;                                                                                              \
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), ld_##S(b + i), acc);             \
  if (i < n) {                                                                                                \
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);                                                    \
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), mld_##S(m, b + i), acc);                           \
  }                                                                                                           \
  return _mm512_reduce_add_ps(acc);                                                                           \
}                                                                                                             \
static inline void axpy_##S(float* y, float a, const T* x, int64_t n) {  /* y += a * x */                     \
  const __m512 va = _mm512_set1_ps(a);                                                                        \
  int64_t i = 0;                                                                                              \
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, ld_##S(x + i), _mm512_loadu_ps(y + i))); \
  for (; i < n; i++) y[i] += a * cv_##S(x[i]);                                                                \
}                                                                                                             \
int moesaic_decode_attn_##S(const T* q, int64_t qs, const T* k, int64_t ks, const T* v, int64_t vs,          \
                            const T* cos, const T* sinr, int64_t rs, T* kbuf, T* vbuf, const int64_t* slots,  \
                            const int64_t* pos, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t M,      \
                            float scale, T* out) {                                                            \
  int64_t pmax = 0;                                                                                           \
  for (int64_t b = 0; b < B; b++) if (pos[b] > pmax) pmax = pos[b];                                           \
  float* sc = (float*)malloc(sizeof(float) * (size_t)(pmax + 1 + 5 * D));  /* scores [p + 1], 5 rows [D] */   \
  if (!sc) return -1;                                                                                         \
  float *x = sc + pmax + 1, *r = x + D, *c = r + D, *sr = c + D, *o = sr + D;                                 \
  const int64_t G = H / Hkv, row = Hkv * D;                                                                   \
  for (int64_t b = 0; b < B; b++) {                                                                           \
    const int64_t p = pos[b];                                                                                 \
    T* K = kbuf + slots[b] * M * row;                                                                         \
    T* V = vbuf + slots[b] * M * row;                                                                         \
    for (int64_t i = 0; i < D; i++) { c[i] = cv_##S(cos[b * rs + i]); sr[i] = cv_##S(sinr[b * rs + i]); }     \
    for (int64_t g = 0; g < Hkv; g++) {                                                                       \
      for (int64_t i = 0; i < D; i++) x[i] = cv_##S(k[b * ks + g * D + i]);                                   \
      rope(r, x, c, sr, D);                                                                                   \
      for (int64_t i = 0; i < D; i++) K[p * row + g * D + i] = st_##S(r[i]);                                  \
      memcpy(V + p * row + g * D, v + b * vs + g * D, sizeof(T) * (size_t)D);                                 \
    }                                                                                                         \
    for (int64_t h = 0; h < H; h++) {                                                                         \
      const int64_t g = h / G;                                                                                \
      for (int64_t i = 0; i < D; i++) x[i] = cv_##S(q[b * qs + h * D + i]);                                   \
      rope(r, x, c, sr, D);                                                                                   \
      float mx = -INFINITY;                                                                                   \
      for (int64_t j = 0; j <= p; j++) {                                                                      \
        const float s = dot_##S(r, K + j * row + g * D, D) * scale;                                           \
        sc[j] = s;                                                                                            \
        if (s > mx) mx = s;                                                                                   \
      }                                                                                                       \
      float sum = 0.0f;                                                                                       \
      for (int64_t j = 0; j <= p; j++) { const float e = expf(sc[j] - mx); sc[j] = e; sum += e; }             \
      memset(o, 0, sizeof(float) * (size_t)D);                                                                \
      const float inv = 1.0f / sum;                                                                           \
      for (int64_t j = 0; j <= p; j++) axpy_##S(o, sc[j] * inv, V + j * row + g * D, D);                      \
      for (int64_t i = 0; i < D; i++) out[b * H * D + h * D + i] = st_##S(o[i]);                              \
    }                                                                                                         \
  }                                                                                                           \
  free(sc);                                                                                                   \
  return 0;                                                                                                   \
}

DECODE_ATTN(f32, float)
DECODE_ATTN(bf16, uint16_t)

/* The same with int64 arguments only (for the C worker's run2): *rc = the kernel's result; scale as fp32 bits. */
#define DECODE_ATTN_RC(S, T)                                                                                  \
void moesaic_decode_attn_##S##_rc(int64_t* rc, const T* q, int64_t qs, const T* k, int64_t ks, const T* v,    \
                                  int64_t vs, const T* cos, const T* sinr, int64_t rs, T* kbuf, T* vbuf,      \
                                  const int64_t* slots, const int64_t* pos, int64_t B, int64_t H, int64_t Hkv, \
                                  int64_t D, int64_t M, int64_t scale_bits, T* out) {                         \
  uint32_t u = (uint32_t)scale_bits;                                                                          \
  float scale;                                                                                                \
  memcpy(&scale, &u, 4);                                                                                      \
  *rc = moesaic_decode_attn_##S(q, qs, k, ks, v, vs, cos, sinr, rs, kbuf, vbuf, slots, pos, B, H, Hkv, D, M,  \
                                scale, out);                                                                  \
}

DECODE_ATTN_RC(f32, float)
DECODE_ATTN_RC(bf16, uint16_t)
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_gemv.build(_SOURCE, "decode_attn")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for f in (lib.moesaic_decode_attn_f32, lib.moesaic_decode_attn_bf16):
        f.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                      ctypes.c_float, ptr]
        f.restype = ctypes.c_int
    for f in (lib.moesaic_decode_attn_f32_rc, lib.moesaic_decode_attn_bf16_rc):
        f.argtypes = [ptr] + [i64] * 20
        f.restype = None
    return lib


DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _library() is not None


def _rows(x: torch.Tensor, width: int, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """x [B, width] on CPU in `dtype` with unit inner stride (rows may be strided): (x, row stride)."""
    if x.dtype != dtype or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != width or x.stride(1) != 1:
        raise ValueError(f"decode_attention: {name} must be a {dtype} CPU [B, {width}] tensor with unit inner "
                         f"stride, got {x.dtype} {x.device.type} {tuple(x.shape)} strides {x.stride()}")
    return x, x.stride(0)


def decode_attention(q_BHD: torch.Tensor, k_BGD: torch.Tensor, v_BGD: torch.Tensor, cos_BD: torch.Tensor,
                     sin_rot_BD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots_B: torch.Tensor,
                     pos_B: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One new token per row: rotate q [B, H*D] and k [B, Hkv*D] by cos / sin_rot [B, D], write k and v
    [B, Hkv*D] into k_cache / v_cache [N, M, Hkv, D] (one layer's, contiguous) at (slots_B[b], pos_B[b]), and
    attend over positions 0..pos_B[b] of that slot. Returns o [B, H*D]. All tensors fp32, or all bf16 (computed
    in fp32; the rotated key, the value and the output rounded to bf16 once). scale: 1/sqrt(D) by default."""
    n, m, hkv, d = k_cache.shape
    dt = k_cache.dtype
    if v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or \
            dt not in DTYPES or v_cache.dtype != dt:
        raise ValueError("decode_attention: k_cache and v_cache must be contiguous fp32 or bf16 [N, M, Hkv, D] "
                         "tensors of one shape and dtype")
    b = q_BHD.shape[0]
    h = q_BHD.shape[1] // d if q_BHD.dim() == 2 else 0
    if d % 2 or h < 1 or h % hkv or q_BHD.shape[1] != h * d:
        raise ValueError(f"decode_attention: q {tuple(q_BHD.shape)} is not [B, H*{d}] with H a multiple of {hkv} "
                         f"(head dim must be even)")
    q, _ = _rows(q_BHD, h * d, "q", dt)
    k, _ = _rows(k_BGD, hkv * d, "k", dt)
    v, _ = _rows(v_BGD, hkv * d, "v", dt)
    cos, _ = _rows(cos_BD.contiguous(), d, "cos", dt)
    sinr = sin_rot_BD.contiguous()
    if sinr.shape != cos.shape or sinr.dtype != dt:
        raise ValueError("decode_attention: sin_rot must match cos")
    slots = slots_B.to(torch.int64).contiguous()
    pos = pos_B.to(torch.int64).contiguous()
    if k.shape[0] != b or v.shape[0] != b or cos.shape[0] != b or slots.shape != (b,) or pos.shape != (b,):
        raise ValueError(f"decode_attention: rows differ: q {b}, k {k.shape[0]}, v {v.shape[0]}, cos {cos.shape[0]}, "
                         f"slots {tuple(slots.shape)}, pos {tuple(pos.shape)}")
    if b and (int(slots.min()) < 0 or int(slots.max()) >= n or int(pos.min()) < 0 or int(pos.max()) >= m):
        raise ValueError(f"decode_attention: slot or position out of range (cache holds {n} slots x {m} positions)")
    return decode_attention_unchecked(q, k, v, cos, sinr, k_cache, v_cache, slots, pos, h, scale)


def decode_attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               sin_rot: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slots: torch.Tensor, pos: torch.Tensor, n_heads: int,
                               scale: float | None = None) -> torch.Tensor:
    """`decode_attention` without its argument checks (a decode step's hot path, whose caller has checked
    shapes, dtypes, strides and the slot / position ranges once): no ATen op besides the output's allocation."""
    b = q.shape[0]
    _, m, hkv, d = k_cache.shape
    out = torch.empty(b, n_heads * d, dtype=k_cache.dtype)
    if b == 0:
        return out
    lib = _library()
    scale = float(d ** -0.5 if scale is None else scale)
    if b >= SPLIT_MIN_ROWS and SPLIT and torch.get_num_threads() > 1:
        _split_rows(lib, q, k, v, cos, sin_rot, k_cache, v_cache, slots, pos, n_heads, scale, out)
        return out
    fn = lib.moesaic_decode_attn_f32 if k_cache.dtype == torch.float32 else lib.moesaic_decode_attn_bf16
    rc = fn(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(),
        sin_rot.data_ptr(), cos.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), pos.data_ptr(),
        b, n_heads, hkv, d, m, scale, out.data_ptr())
    if rc != 0:
        raise MemoryError("decode_attention: could not allocate the score scratch")
    return out


# Rows split over this thread and the C worker (cpu_pool) from this many rows, when torch has 2 threads: each row's
# work is independent (its own slot), so both halves compute the very bits of one call. Batched decode steps spend
# ~5 % in here (py-spy, coarse-8x2 batch 32); in-engine A/B, quiet VM, ~200-position contexts: coarse batch 8
# 1.03x, fine batch 32 1.02x, coarse batch 32 1.00x. MOESAIC_CPU_ATTN_SPLIT=0: one thread (A/B runs).
SPLIT_MIN_ROWS = 4
SPLIT = os.environ.get("MOESAIC_CPU_ATTN_SPLIT", "1") != "0"


def _split_rows(lib, q, k, v, cos, sin_rot, k_cache, v_cache, slots, pos, n_heads, scale, out) -> None:
    b = q.shape[0]
    _, m, hkv, d = k_cache.shape
    es = k_cache.element_size()
    fn = lib.moesaic_decode_attn_f32_rc if k_cache.dtype == torch.float32 else lib.moesaic_decode_attn_bf16_rc
    rc = (ctypes.c_int64 * 2)()
    bits = struct.unpack("<I", struct.pack("<f", scale))[0]

    def half(i: int, lo: int, hi: int) -> tuple:
        return (ctypes.addressof(rc) + 8 * i, q.data_ptr() + lo * q.stride(0) * es, q.stride(0),
                k.data_ptr() + lo * k.stride(0) * es, k.stride(0), v.data_ptr() + lo * v.stride(0) * es, v.stride(0),
                cos.data_ptr() + lo * cos.stride(0) * es, sin_rot.data_ptr() + lo * cos.stride(0) * es, cos.stride(0),
                k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr() + 8 * lo, pos.data_ptr() + 8 * lo, hi - lo,
                n_heads, hkv, d, m, bits, out.data_ptr() + lo * n_heads * d * es)

    cut = b // 2
    cpu_pool.run2(fn, half(0, 0, cut), half(1, cut, b))
    if rc[0] or rc[1]:
        raise MemoryError("decode_attention: could not allocate the score scratch")
