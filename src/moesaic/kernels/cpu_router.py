"""A MoE router's expert choice for a few CPU rows in one small C call: top-k, weights, scale, cast.

Shape legend: T rows (tokens), E experts, K experts per token.

Given the gate logits [T, E] (fp32, computed by the router's own matmul, so they are torch's to the bit), one
call writes each row's K expert ids (int64, best first) and combine weights (fp32 or bf16) for three kinds:

    KIND_SOFTMAX_RENORM  ids = topk(logits); w = softmax(logits[ids])           (Mixtral, Qwen3-MoE at inference)
    KIND_SOFTMAX         ids = topk(logits); w = softmax(logits)[ids]           (Qwen2-MoE: not renormalised)
    KIND_SIGMOID         s = sigmoid(logits); ids = topk(s + bias); w = s[ids]  (DeepSeek-V3, no group limits)
                         w /= sum(w) + 1e-20 when normalising

then w *= scale (routed_scaling_factor) and w is rounded once to the output dtype (round to nearest even).

Exactly torch's choice, or none: torch.topk breaks ties by its sorting algorithm, and torch's softmax / sigmoid
round their last bits differently from this code. So the kernel keeps the best K+1 candidates and gives up
(returns None; the caller runs torch) when two neighbours among them are tied or too close to be ordered for sure:
equal logits for KIND_SOFTMAX_RENORM (torch ranks the very same logits), within `tol * (1 + |a| + |b| + |max|)`
(tol = 2e-6, ~16 fp32 ulps) for the kinds that rank values torch computes itself (KIND_SOFTMAX: also its
probabilities, which must be normal fp32 numbers); also on a NaN. Random inputs
never come that close; exact ties (e.g. zero rows, saturated sigmoids) do, and then torch decides.

Why: the router's eval path is ~7 ATen ops per MoE layer (matmul, topk, softmax / sigmoid, gather, divide,
scale, cast), each several microseconds inside a decode step whose weight streaming has just evicted the caches.
Built with `cpu_gemv.build` (same compiler, flags and machine requirements); where it cannot be built,
`available()` is False and callers keep torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from moesaic.kernels import cpu_gemv

KIND_SOFTMAX_RENORM, KIND_SOFTMAX, KIND_SIGMOID = 0, 1, 2
MAX_K = 64  # candidates kept on the stack (K + 1)
MAX_ROWS = 64  # more (prefill): torch's batched ops
TOL = 2e-6  # near-tie guard for values torch computes with its own roundings (softmax / sigmoid kinds)
DTYPES = (torch.float32, torch.bfloat16)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_K 64

static inline uint16_t to_bf16(float f) {  /* round to nearest even, like torch's .to(bfloat16) */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Returns 0, or 1 when a row has a NaN or a (near) tie among its best K+1 candidates (nothing useful written). */
int moesaic_route(const float* logits, int64_t T, int64_t E, int64_t K, int kind, int normalize, const float* bias,
                  float scale, float tol, int64_t* ids, void* weights, int bf16) {
  float val[MAX_K + 1], w[MAX_K];
  int64_t idx[MAX_K + 1];
  const int64_t n = K < E ? K + 1 : K;
  for (int64_t t = 0; t < T; t++) {
    const float* l = logits + t * E;
    int64_t cnt = 0;
    for (int64_t e = 0; e < E; e++) {
      float v = l[e];
      if (v != v) return 1;
      if (kind == 2) v = sigm(v) + bias[e];
      if (cnt == n && !(v > val[n - 1])) continue;
      int64_t j = cnt < n ? cnt++ : n - 1;
      while (j > 0 && v > val[j - 1]) { val[j] = val[j - 1]; idx[j] = idx[j - 1]; j--; }
      val[j] = v;
      idx[j] = e;
    }
    const float top = fabsf(val[0]);
    for (int64_t i = 0; i + 1 < cnt; i++)  /* NaN-safe: a gap that is not clearly positive gives up */
      if (!(val[i] - val[i + 1] > tol * (1.0f + fabsf(val[i]) + fabsf(val[i + 1]) + top))) return 1;
    float sum = 0.0f;
    if (kind == 0) {
      for (int64_t i = 0; i < K; i++) sum += (w[i] = expf(val[i] - val[0]));
      for (int64_t i = 0; i < K; i++) w[i] /= sum;
    } else if (kind == 1) {
      for (int64_t e = 0; e < E; e++) sum += expf(l[e] - val[0]);
      float p[MAX_K + 1];
      for (int64_t i = 0; i < cnt; i++) p[i] = expf(val[i] - val[0]) / sum;
      for (int64_t i = 0; i + 1 < cnt; i++)  /* torch ranks its probabilities: those must differ clearly too */
        if (!(p[i + 1] >= 1.17549435e-38f && p[i] - p[i + 1] > tol * p[i])) return 1;
      for (int64_t i = 0; i < K; i++) w[i] = p[i];
    } else {
      for (int64_t i = 0; i < K; i++) sum += (w[i] = sigm(l[idx[i]]));
      if (normalize) for (int64_t i = 0; i < K; i++) w[i] /= sum + 1e-20f;
    }
    for (int64_t i = 0; i < K; i++) {
      const float x = scale == 1.0f ? w[i] : w[i] * scale;
      ids[t * K + i] = idx[i];
      if (bf16) ((uint16_t*)weights)[t * K + i] = to_bf16(x);
      else ((float*)weights)[t * K + i] = x;
    }
  }
  return 0;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_gemv.build(_SOURCE, "router")
    if lib is None:
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moesaic_route.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ctypes.c_float,
                                  ctypes.c_float, ptr, ptr, ctypes.c_int]
    lib.moesaic_route.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel can run here (builds it on the first call)."""
    return _library() is not None


def route(logits_TE: torch.Tensor, k: int, kind: int, *, bias_E: torch.Tensor | None = None,
          normalize: bool = True, scale: float = 1.0, out_dtype: torch.dtype = torch.float32
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's top-k experts of fp32 CPU logits [T, E] (T <= MAX_ROWS, 1 <= k <= min(E, MAX_K)) ->
    (weights_TK in out_dtype, ids_TK int64), or None at a NaN or a (near) tie (then torch must decide).
    bias_E: the fp32 correction bias, required by (only) KIND_SIGMOID; normalize: KIND_SIGMOID only."""
    if logits_TE.dtype != torch.float32 or logits_TE.device.type != "cpu" or logits_TE.dim() != 2 \
            or not logits_TE.is_contiguous():
        raise ValueError(f"route: logits must be a contiguous fp32 CPU [T, E] tensor, got {logits_TE.dtype} "
                         f"{logits_TE.device.type} {tuple(logits_TE.shape)}")
    t, e = logits_TE.shape
    if not 0 < t <= MAX_ROWS or not 1 <= k <= min(e, MAX_K):
        raise ValueError(f"route: needs 1 <= T <= {MAX_ROWS} rows and 1 <= k <= min(E, {MAX_K}), got T={t}, "
                         f"E={e}, k={k}")
    if kind not in (KIND_SOFTMAX_RENORM, KIND_SOFTMAX, KIND_SIGMOID) or out_dtype not in DTYPES:
        raise ValueError(f"route: unknown kind {kind} or output dtype {out_dtype}")
    if (kind == KIND_SIGMOID) != (bias_E is not None) or bias_E is not None and (
            bias_E.dtype != torch.float32 or bias_E.shape != (e,) or not bias_E.is_contiguous()
            or bias_E.device.type != "cpu"):
        raise ValueError(f"route: the sigmoid kind (only) needs a contiguous fp32 CPU bias [{e}]")
    return route_unchecked(logits_TE, k, kind, bias_E, normalize, scale, out_dtype)


def route_unchecked(logits_TE: torch.Tensor, k: int, kind: int, bias_E: torch.Tensor | None, normalize: bool,
                    scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`route` without its argument checks (the router's hot path, whose caller has checked them)."""
    t, e = logits_TE.shape
    ids = torch.empty(t, k, dtype=torch.int64)
    w = torch.empty(t, k, dtype=out_dtype)
    rc = _library().moesaic_route(logits_TE.data_ptr(), t, e, k, kind, int(normalize),
                                  None if bias_E is None else bias_E.data_ptr(), scale,
                                  0.0 if kind == KIND_SOFTMAX_RENORM else TOL, ids.data_ptr(), w.data_ptr(),
                                  int(out_dtype == torch.bfloat16))
    return None if rc else (w, ids)
