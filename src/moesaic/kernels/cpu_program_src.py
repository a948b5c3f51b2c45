"""C source of `cpu_program` (the interpreter and its wrapper ops), kept apart so each file stays readable."""

from moesaic.kernels.cpu_gemv import BF16_C

MAX_ARGS = 32


def _calls(ret: str, cast: str) -> str:
    cases = []
    for n in range(MAX_ARGS + 1):
        params = ", ".join(["i64"] * n) or "void"
        args = ", ".join(f"a[{i}]" for i in range(n))
        cases.append(f"    case {n}: {ret}(({cast} (*)({params}))fn)({args}); break;")
    return "\n".join(cases)


def source() -> str:
    return BF16_C + r"""
#include <stdint.h>
#include <string.h>
typedef int64_t i64;

static void call_void(void* fn, i64 n, const i64* a) {
  switch (n) {
""" + _calls("", "void") + r"""
    default: break;
  }
}

static i64 call_int(void* fn, i64 n, const i64* a) {
  int r = 0;
  switch (n) {
""" + _calls("r = ", "int") + r"""
    default: break;
  }
  return r;
}

/* Runs the ops of prog from word `start` to word `end`. Returns -1 when all ran, else the word offset of the op
   whose int result was nonzero (that result in *rc); that op's work is the caller's. */
i64 moesaic_program_run(const i64* prog, i64 start, i64 end, i64* rc) {
  i64 p = start;
  while (p < end) {
    void* fn = (void*)prog[p];
    const i64 flags = prog[p + 1], n = prog[p + 2];
    if (flags & 1) {
      const i64 r = call_int(fn, n, prog + p + 3);
      if (r) { *rc = r; return p; }
    } else {
      call_void(fn, n, prog + p + 3);
    }
    p += 3 + n;
  }
  return -1;
}

static inline float f32_of(i64 bits) { uint32_t u = (uint32_t)bits; float f; memcpy(&f, &u, 4); return f; }
static inline float bf16_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* cpu_norm's kernels: (x, w, y, R, D, float eps) */
void moesaic_op_norm(i64 fn, i64 x, i64 w, i64 y, i64 R, i64 D, i64 eps) {
  ((void (*)(i64, i64, i64, i64, i64, float))fn)(x, w, y, R, D, f32_of(eps));
}

/* cpu_attention's kernels: (q, qs, k, ks, v, vs, cos, sinr, rs, kbuf, vbuf, slots, pos, B, H, Hkv, D, M,
   float scale, out) -> 0, or -1 (no scratch memory) */
int moesaic_op_attn(i64 fn, i64 q, i64 qs, i64 k, i64 ks, i64 v, i64 vs, i64 cos, i64 sinr, i64 rs, i64 kbuf,
                    i64 vbuf, i64 slots, i64 pos, i64 B, i64 H, i64 Hkv, i64 D, i64 M, i64 scale, i64 out) {
  return ((int (*)(i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, float,
                   i64))fn)(q, qs, k, ks, v, vs, cos, sinr, rs, kbuf, vbuf, slots, pos, B, H, Hkv, D, M,
                            f32_of(scale), out);
}

/* cpu_router's moesaic_route: 0, 1 (a near-tie or a NaN: torch must choose), 2 (no scratch memory) */
int moesaic_op_route(i64 fn, i64 x, i64 xbf, i64 w, i64 wbf, i64 T, i64 D, i64 E, i64 K, i64 kind, i64 normalize,
                     i64 bias, i64 scale, i64 tol, i64 g_set, i64 g_ord, i64 logits, i64 ids, i64 weights,
                     i64 obf) {
  return ((int (*)(i64, int, i64, int, i64, i64, i64, i64, int, int, i64, float, float, float, float, i64, i64, i64,
                   int))fn)(x, (int)xbf, w, (int)wbf, T, D, E, K, (int)kind, (int)normalize, bias, f32_of(scale),
                            f32_of(tol), f32_of(g_set), f32_of(g_ord), logits, ids, weights, (int)obf);
}

/* dst = row *tok of table (row_bytes each): the embedding lookup */
void moesaic_op_row(const char* table, const i64* tok, i64 row_bytes, char* dst) {
  memcpy(dst, table + *tok * row_bytes, (size_t)row_bytes);
}

/* x[i] += y[i] (fp32), or x = bf16(x + y) (bf16: torch's bf16 add), or x = bf16(x + bf16(y)) (y fp32: the
   experts' fp32 sum cast to bf16, then the residual add) */
void moesaic_op_add_f32(float* x, const float* y, i64 n) { for (i64 i = 0; i < n; i++) x[i] += y[i]; }
void moesaic_op_add_bf16(uint16_t* x, const uint16_t* y, i64 n) {
  for (i64 i = 0; i < n; i++) x[i] = fp32_to_bf16(bf16_f32(x[i]) + bf16_f32(y[i]));
}
void moesaic_op_add_bf16_f32(uint16_t* x, const float* y, i64 n) {
  for (i64 i = 0; i < n; i++) x[i] = fp32_to_bf16(bf16_f32(x[i]) + bf16_f32(fp32_to_bf16(y[i])));
}

/* dst [n] fp32 = src [n] bf16 (exact): a bf16 row for the weight-only int8 kernels, which take fp32 */
void moesaic_op_bf16_to_f32(const uint16_t* src, float* dst, i64 n) { for (i64 i = 0; i < n; i++) dst[i] = bf16_f32(src[i]); }

/* One token's expert groups (e, slot, 1 row) and fp32 combine weights from the router's ids [K] and weights [K]
   (fp32, or bf16 when wbf), as cpu_experts.one_token builds them. */
void moesaic_op_groups(const i64* ids, i64 K, i64* groups, const void* w, i64 wbf, float* wk) {
  for (i64 g = 0; g < K; g++) {
    groups[3 * g] = ids[g];
    groups[3 * g + 1] = g;
    groups[3 * g + 2] = 1;
    wk[g] = wbf ? bf16_f32(((const uint16_t*)w)[g]) : ((const float*)w)[g];
  }
}

/* returns code: an op that stops the program for the caller (Python work in the middle of a step) */
int moesaic_op_yield(i64 code) { return (int)code; }

/* lengths[*slot] += 1: the KV cache's length after the step (SlotView.advance) */
void moesaic_op_advance(i64* lengths, const i64* slot) { lengths[*slot] += 1; }
"""
