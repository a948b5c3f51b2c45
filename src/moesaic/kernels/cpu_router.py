"""A MoE router for a few CPU rows in one small C call: gate matmul, top-k, weights, scale, cast.

Shape legend: T rows (tokens), D model dim, E experts, K experts per token.

Given hidden states x [T, D] (fp32 / bf16) and the gate weight [E, D] (fp32 / bf16), one call computes the
logits (fp32) and writes each row's K expert ids (int64, best first) and combine weights (x's dtype) for:

    KIND_SOFTMAX_RENORM  ids = topk(logits); w = softmax(logits[ids])           (Mixtral, Qwen3-MoE at inference)
    KIND_SOFTMAX         ids = topk(logits); w = softmax(logits)[ids]           (Qwen2-MoE: not renormalised)
    KIND_SIGMOID         s = sigmoid(logits); ids = topk(s + bias); w = s[ids]  (DeepSeek-V3, no group limits)
                         w /= sum(w) + 1e-20 when normalising

then w *= scale (routed_scaling_factor) and w is rounded once to x's dtype (round to nearest even).

Torch's choice, or none. The logits are fp32 dot products in 64 lanes (within (D / 64 + 8) u S of the exact
value, S = sum |x_i w_i|, computed alongside, u = 2^-24); torch's fp32 matmul rounds differently (any summation
order: within gamma_D * S, gamma_D = D u / (1 - D u); at torch's default "highest" fp32 matmul precision, not
with `torch.set_float32_matmul_precision` lowered to bf16 passes). So the kernel keeps the best K+1 candidates
and gives up (returns None; the caller runs torch) when two neighbours are closer than those bounds allow to
order for sure: for the pair that decides the set (K-th vs K+1-th) the bound holds for any summation order; for
the order within the top K it assumes a vectorised sum ((D / 16 + 16) u S, 16 fp32 lanes: oneDNN / MKL on
AVX-512). On top, `TOL` (2-32 ulps of the ranked values) covers torch's own softmax / sigmoid roundings (the
sigmoid kind scales the logit bounds by sigmoid's slope); it also gives up on a NaN, and KIND_SOFTMAX needs its
probabilities distinct and normal. So exact ties (a zero row, duplicated gate rows, saturated sigmoids) always
leave the choice to torch.topk's tie-breaking; random inputs come that close rarely (the benchmark models: ~5%
of fine-64x8's calls, 64 experts top-8; ~0.4% of coarse-8x2's).

Why: the router's eval path is ~7 ATen ops per MoE layer (the gate matmul with its 2-thread parallel region,
topk, softmax / sigmoid, gather, divide, scale, cast): ~80-95 us inside a decode step (this call: 35-45 us) whose weight streaming has
just evicted the caches. Built with `cpu_gemv.build` (same compiler, flags and machine requirements); where it
cannot be built, `available()` is False and callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moesaic.kernels import cpu_gemv

KIND_SOFTMAX_RENORM, KIND_SOFTMAX, KIND_SIGMOID = 0, 1, 2
MAX_K = 64  # candidates kept on the stack (K + 1)
MAX_ROWS = 16  # more (prefill, large batches): torch's matmul, which reads the gate weight better for many rows
U = 2.0 ** -24
TOL = {0: 2 * U, 1: 32 * U, 2: 8 * U}  # per kind: this kernel's rounding of the logits (0); + torch's softmax (1)
# or sigmoid + bias (2) roundings, in ulps of the ranked values (torch's vectorised exp / sigmoid: a few ulps)
DTYPES = (torch.float32, torch.bfloat16)

_SOURCE = cpu_gemv.BF16_C + r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_K 64

static inline float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline __m512 load16(const void* p, int bf16, int64_t i, __mmask16 m) {  /* bf16 -> fp32 is exact */
  if (bf16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i)), 16));
  return _mm512_maskz_loadu_ps(m, (const float*)p + i);
}

/* logit[t, e] = x[t] . w[e] and S[t, e] = sum |x[t, i] w[e, i]| (the scale of any fp32 summation's error), fp32,
   in 4 x 16 lanes of D / 64 terms each, then a tree: within (D / 64 + 8) u S of the exact dot. Weight rows are
   read once for all rows. */
static void gate(const void* x, int xbf, const void* w, int wbf, int64_t T, int64_t D, int64_t E, float* logits,
                 float* S) {
  const size_t xs = xbf ? 2 : 4, ws = wbf ? 2 : 4;
  for (int64_t e = 0; e < E; e++) {
    const char* we = (const char*)w + (size_t)e * D * ws;
    for (int64_t t = 0; t < T; t++) {
      const char* xt = (const char*)x + (size_t)t * D * xs;
      __m512 a[4], s[4];
      for (int j = 0; j < 4; j++) a[j] = s[j] = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 64 <= D; i += 64)
        for (int j = 0; j < 4; j++) {
          const __m512 xv = load16(xt, xbf, i + 16 * j, 0xffff), wv = load16(we, wbf, i + 16 * j, 0xffff);
          a[j] = _mm512_fmadd_ps(xv, wv, a[j]);
          s[j] = _mm512_fmadd_ps(_mm512_abs_ps(xv), _mm512_abs_ps(wv), s[j]);
        }
      for (int j = 0; i < D; i += 16, j++) {
        const __mmask16 m = D - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - i)) - 1u);
        const __m512 xv = load16(xt, xbf, i, m), wv = load16(we, wbf, i, m);
        a[j] = _mm512_fmadd_ps(xv, wv, a[j]);
        s[j] = _mm512_fmadd_ps(_mm512_abs_ps(xv), _mm512_abs_ps(wv), s[j]);
      }
      logits[t * E + e] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
      S[t * E + e] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
    }
  }
}

/* Returns 0; 1 when a row has a NaN or two of its best K+1 candidates too close to be sure of torch's order
   (nothing useful written then); 2 when the scratch could not be allocated. */
int moesaic_route(const void* x, int xbf, const void* w, int wbf, int64_t T, int64_t D, int64_t E, int64_t K,
                  int kind, int normalize, const float* bias, float scale, float tol, float g_set, float g_ord,
                  float* logits, int64_t* ids, void* weights, int obf) {
  float* S = (float*)malloc(sizeof(float) * (size_t)(T * E));
  if (!S) return 2;
  gate(x, xbf, w, wbf, T, D, E, logits, S);
  float val[MAX_K + 1], wt[MAX_K], p[MAX_K + 1];
  int64_t idx[MAX_K + 1];
  const int64_t n = K < E ? K + 1 : K;
  int rc = 0;
  for (int64_t t = 0; t < T && !rc; t++) {
    const float* l = logits + t * E;
    const float* st = S + t * E;
    int64_t cnt = 0;
    for (int64_t e = 0; e < E; e++) {
      float v = l[e];
      if (v != v) { rc = 1; break; }
      if (kind == 2) v = sigm(v) + bias[e];
      if (cnt == n && !(v > val[n - 1])) continue;
      int64_t j = cnt < n ? cnt++ : n - 1;
      while (j > 0 && v > val[j - 1]) { val[j] = val[j - 1]; idx[j] = idx[j - 1]; j--; }
      val[j] = v;
      idx[j] = e;
    }
    if (rc) break;
    const float top = fabsf(val[0]);
    for (int64_t i = 0; i + 1 < cnt; i++) {  /* NaN-safe: a gap that is not clearly positive gives up */
      const float g = i + 1 == K ? g_set : g_ord;  /* the pair (K-1, K) decides the set; the others the order */
      float sa = st[idx[i]], sb = st[idx[i + 1]];
      if (kind == 2) {  /* a logit error moves a score by sigmoid' = s (1 - s) times it (+1% for the curve) */
        const float pa = sigm(l[idx[i]]), pb = sigm(l[idx[i + 1]]);
        sa *= 1.01f * pa * (1.0f - pa) + 1e-7f;
        sb *= 1.01f * pb * (1.0f - pb) + 1e-7f;
      }
      const float err = g * (sa + sb) + tol * (1.0f + fabsf(val[i]) + fabsf(val[i + 1]) + top);
      if (!(val[i] - val[i + 1] > err)) { rc = 1; break; }
    }
    if (rc) break;
    float sum = 0.0f;
    if (kind == 0) {
      for (int64_t i = 0; i < K; i++) sum += (wt[i] = expf(val[i] - val[0]));
      for (int64_t i = 0; i < K; i++) wt[i] /= sum;
    } else if (kind == 1) {
      for (int64_t e = 0; e < E; e++) sum += expf(l[e] - val[0]);
      for (int64_t i = 0; i < cnt; i++) p[i] = expf(val[i] - val[0]) / sum;
      for (int64_t i = 0; i + 1 < cnt; i++)  /* torch ranks its probabilities: those must differ clearly too */
        if (!(p[i + 1] >= 1.17549435e-38f && p[i] - p[i + 1] > tol * p[i])) { rc = 1; break; }
      for (int64_t i = 0; i < K; i++) wt[i] = p[i];
    } else {
      for (int64_t i = 0; i < K; i++) sum += (wt[i] = sigm(l[idx[i]]));
      if (normalize) for (int64_t i = 0; i < K; i++) wt[i] /= sum + 1e-20f;
    }
    for (int64_t i = 0; i < K; i++) {
      const float v = scale == 1.0f ? wt[i] : wt[i] * scale;
      ids[t * K + i] = idx[i];
      if (obf) ((uint16_t*)weights)[t * K + i] = fp32_to_bf16(v);
      else ((float*)weights)[t * K + i] = v;
    }
  }
  free(S);
  return rc;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_gemv.build(_SOURCE, "router")
    if lib is None:
        return None
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.moesaic_route.argtypes = [ptr, i32, ptr, i32, i64, i64, i64, i64, i32, i32, ptr, f32, f32, f32, f32,
                                  ptr, ptr, ptr, i32]
    lib.moesaic_route.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _library() is not None


@functools.cache
def bounds(d: int) -> tuple[float, float]:
    """(set bound, order bound): the factors of S = sum |x_i w_i| by which this kernel's logit ((d / 64 + 8) u)
    and torch's fp32 dot of width d (any order: gamma_d; vectorised: (d / 16 + 16) u) may part; 1% for S's own
    rounding."""
    gamma, mine = d * U / (1 - d * U), (d / 64 + 8) * U
    return (gamma + mine) * 1.01, (min(gamma, (d / 16 + 16) * U) + mine) * 1.01


def route(x_TD: torch.Tensor, weight_ED: torch.Tensor, k: int, kind: int, *, bias_E: torch.Tensor | None = None,
          normalize: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's top-k experts: x [T, D] (T <= MAX_ROWS) and weight [E, D], both contiguous fp32 / bf16 CPU,
    1 <= k <= min(E, MAX_K) -> (weights_TK in x's dtype, ids_TK int64, logits_TE fp32), or None at a NaN or a
    (near) tie (then torch must decide). bias_E: the fp32 correction bias, required by (only) KIND_SIGMOID;
    normalize: KIND_SIGMOID only (the softmax kinds say it by their kind)."""
    for name, t in (("x", x_TD), ("weight", weight_ED)):
        if t.dtype not in DTYPES or t.device.type != "cpu" or t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"route: {name} must be a contiguous fp32 / bf16 CPU matrix, got {t.dtype} "
                             f"{t.device.type} {tuple(t.shape)}")
    (t, d), (e, d2) = x_TD.shape, weight_ED.shape
    if d != d2 or not 0 < t <= MAX_ROWS or not 1 <= k <= min(e, MAX_K):
        raise ValueError(f"route: needs x [T, D] with 1 <= T <= {MAX_ROWS}, weight [E, D] and 1 <= k <= min(E, "
                         f"{MAX_K}), got x {tuple(x_TD.shape)}, weight {tuple(weight_ED.shape)}, k={k}")
    if kind not in (KIND_SOFTMAX_RENORM, KIND_SOFTMAX, KIND_SIGMOID):
        raise ValueError(f"route: unknown kind {kind}")
    if (kind == KIND_SIGMOID) != (bias_E is not None) or bias_E is not None and (
            bias_E.dtype != torch.float32 or bias_E.shape != (e,) or not bias_E.is_contiguous()
            or bias_E.device.type != "cpu"):
        raise ValueError(f"route: the sigmoid kind (only) needs a contiguous fp32 CPU bias [{e}]")
    return route_unchecked(x_TD, weight_ED, k, kind, bias_E, normalize, scale)


def route_unchecked(x_TD: torch.Tensor, weight_ED: torch.Tensor, k: int, kind: int, bias_E: torch.Tensor | None,
                    normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`route` without its argument checks (the router's hot path, whose caller has checked them)."""
    t, d = x_TD.shape
    e = weight_ED.shape[0]
    logits = torch.empty(t, e)
    ids = torch.empty(t, k, dtype=torch.int64)
    w = torch.empty(t, k, dtype=x_TD.dtype)
    g_set, g_ord = bounds(d)
    rc = _library().moesaic_route(
        x_TD.data_ptr(), x_TD.dtype == torch.bfloat16, weight_ED.data_ptr(), weight_ED.dtype == torch.bfloat16,
        t, d, e, k, kind, normalize, None if bias_E is None else bias_E.data_ptr(), scale,
        TOL[kind], g_set, g_ord, logits.data_ptr(), ids.data_ptr(),
        w.data_ptr(), x_TD.dtype == torch.bfloat16)
    if rc == 2:
        raise MemoryError("route: could not allocate the scratch")
    return None if rc else (w, ids, logits)
