"""C source of `cpu_experts` (skinny GEMMs + SwiGLU, AVX-512), kept apart so each file stays readable."""

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* 4 horizontal sums at once: [sum a, sum b, sum c, sum d] */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a02 b02 a13 b13 per lane */
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  /* a b c d per lane */
  __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* One block: y[m * ldy + o] = sum_i w[o * ldw + i] * x[m * ldx + i] (* scale[o]) for o < OB, m < MB (OB, MB constants
   after inlining; OB * MB <= 24 accumulators). pf: prefetch the next block of weight rows (on a block's first pass). */
#define BLOCK(NAME, WT, XT, VW, VX, STEP, LOADW, LOADX, TLOADW, TLOADX, FMA, PFCOND)                          \
static inline __attribute__((always_inline)) void NAME(const XT* x, int64_t ldx, const WT* w, int64_t ldw,    \
    int64_t I, float* y, int64_t ldy, const float* scale, const int OB, const int MB, const int pf, const int add) {\
  __m512 acc[4][8];                                                                                             \
  for (int o = 0; o < OB; o++) for (int m = 0; m < MB; m++) acc[o][m] = _mm512_setzero_ps();                  \
  const int64_t iv = I - I % STEP;                                                                              \
  int64_t i = 0;                                                                                                \
  for (; i < iv; i += STEP) {                                                                                   \
    VW wv[4];                                                                                                   \
    for (int o = 0; o < OB; o++) {                                                                              \
      wv[o] = LOADW(w + o * ldw + i);                                                                           \
      __asm__("" : "+v"(wv[o]));                                                                                \
      if (pf && (PFCOND)) { /* the next block into L2, and 3, 6, 12 blocks ahead (T2): more lines in flight */  \
        _mm_prefetch((const char*)(w + (o + OB) * ldw + i), _MM_HINT_T1);                                      \
        _mm_prefetch((const char*)(w + (o + 3 * OB) * ldw + i), _MM_HINT_T2);                                  \
        _mm_prefetch((const char*)(w + (o + 6 * OB) * ldw + i), _MM_HINT_T2);                                  \
        _mm_prefetch((const char*)(w + (o + 12 * OB) * ldw + i), _MM_HINT_T2);                                 \
      }                                                                                                         \
    }                                                                                                           \
    /* one input row at a time, in a register (gcc would otherwise fold it into each FMA as a memory operand) */ \
    for (int m = 0; m < MB; m++) {                                                                              \
      VX xm = LOADX(x + m * ldx + i);                                                                           \
      __asm__("" : "+v"(xm));                                                                                   \
      for (int o = 0; o < OB; o++) acc[o][m] = FMA(acc[o][m], wv[o], xm);                                       \
    }                                                                                                           \
  }                                                                                                             \
  if (i < I) {                                                                                                  \
    const int64_t n = I - i;                                                                                    \
    VW wv[4]; VX xv[8];                                                                                         \
    for (int o = 0; o < OB; o++) wv[o] = TLOADW(w + o * ldw + i, n);                                           \
    for (int m = 0; m < MB; m++) xv[m] = TLOADX(x + m * ldx + i, n);                                           \
    for (int o = 0; o < OB; o++) for (int m = 0; m < MB; m++) acc[o][m] = FMA(acc[o][m], wv[o], xv[m]);       \
  }                                                                                                             \
  if (OB == 4) {                                                                                                \
    for (int m = 0; m < MB; m++) {                                                                              \
      __m128 s = reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);                                           \
      if (scale) s = _mm_mul_ps(s, _mm_loadu_ps(scale));                                                        \
      if (add) s = _mm_add_ps(s, _mm_loadu_ps(y + m * ldy));                                                    \
      _mm_storeu_ps(y + m * ldy, s);                                                                            \
    }                                                                                                           \
  } else {                                                                                                      \
    for (int o = 0; o < OB; o++) for (int m = 0; m < MB; m++) {                                                 \
      float s = _mm512_reduce_add_ps(acc[o][m]);                                                                \
      s = scale ? scale[o] * s : s;                                                                             \
      y[m * ldy + o] = add ? y[m * ldy + o] + s : s;                                                            \
    }                                                                                                           \
  }                                                                                                             \
}

#define M16(n) ((__mmask16)((1u << (n)) - 1u))
#define M32(n) ((__mmask32)((1ull << (n)) - 1ull))
#define F32_LOAD(p) _mm512_loadu_ps(p)
#define F32_TLOAD(p, n) _mm512_maskz_loadu_ps(M16(n), p)
#define F32_FMA(a, w, x) _mm512_fmadd_ps(w, x, a)
#define BF_LOAD(p) ((__m512bh)_mm512_loadu_si512(p))
#define BF_TLOAD(p, n) ((__m512bh)_mm512_maskz_loadu_epi16(M32(n), p))
#define BF_FMA(a, w, x) _mm512_dpbf16_ps(a, w, x)
#define I8_LOAD(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
#define I8_TLOAD(p, n) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(M16(n), p)))

BLOCK(blk_f32, float, float, __m512, __m512, 16, F32_LOAD, F32_LOAD, F32_TLOAD, F32_TLOAD, F32_FMA, 1)
BLOCK(blk_bf16, uint16_t, uint16_t, __m512bh, __m512bh, 32, BF_LOAD, BF_LOAD, BF_TLOAD, BF_TLOAD, BF_FMA, 1)
BLOCK(blk_i8, int8_t, float, __m512, __m512, 16, I8_LOAD, F32_LOAD, I8_TLOAD, F32_TLOAD, F32_FMA, (i & 63) == 0)

/* One input row against weight rows one by one, four accumulators over four vectors a step, prefetching 4 KiB ahead
   with HINT (the loop of `cpu_gemv`): NTA for fp32 (the decode step's small ops keep more of the caches; see
   cpu_gemv's docstring), into L2 (T1) for bf16, where NTA was slower. */
#define ROW1(NAME, WT, XT, STEP, LOADW, LOADX, TLOADW, TLOADX, FMA, HINT)                                         \
static void NAME(const XT* x, const WT* w, int64_t ldw, int64_t O, int64_t I, float* y) {                      \
  const int64_t i4 = I - I % (4 * STEP), iv = I - I % STEP;                                                     \
  for (int64_t o = 0; o < O; o++) {                                                                             \
    const WT* r = w + o * ldw;                                                                                  \
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();\
    int64_t i = 0;                                                                                              \
    for (; i < i4; i += 4 * STEP) {                                                                             \
      for (int u = 0; u < 4; u++) _mm_prefetch((const char*)(r + i + u * STEP) + 4096, HINT);                   \
      a0 = FMA(a0, LOADW(r + i), LOADX(x + i));                                                                 \
      a1 = FMA(a1, LOADW(r + i + STEP), LOADX(x + i + STEP));                                                   \
      a2 = FMA(a2, LOADW(r + i + 2 * STEP), LOADX(x + i + 2 * STEP));                                           \
      a3 = FMA(a3, LOADW(r + i + 3 * STEP), LOADX(x + i + 3 * STEP));                                           \
    }                                                                                                           \
    for (; i < iv; i += STEP) a0 = FMA(a0, LOADW(r + i), LOADX(x + i));                                        \
    if (i < I) a1 = FMA(a1, TLOADW(r + i, I - i), TLOADX(x + i, I - i));                                       \
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));                 \
  }                                                                                                             \
}

ROW1(row1_f32, float, float, 16, F32_LOAD, F32_LOAD, F32_TLOAD, F32_TLOAD, F32_FMA, _MM_HINT_NTA)
/* T1 for `cpu_program`'s batch-1 step (no ATen ops between its kernels; see cpu_gemv's moesaic_gemv_f32_t1) */
ROW1(row1_f32_t1, float, float, 16, F32_LOAD, F32_LOAD, F32_TLOAD, F32_TLOAD, F32_FMA, _MM_HINT_T1)
ROW1(row1_bf16, uint16_t, uint16_t, 32, BF_LOAD, BF_LOAD, BF_TLOAD, BF_TLOAD, BF_FMA, _MM_HINT_T1)
ROW1(row1_i8, int8_t, float, 16, I8_LOAD, F32_LOAD, I8_TLOAD, F32_TLOAD, F32_FMA, _MM_HINT_T1)  /* unused: int8 takes 4 rows */

/* y [M, O] (row stride ldy) = x [M, I] (ldx) @ w [O, I].T (ldw) (* scale [O] if given), M >= 0 rows.
   One row: M1OB weight rows at a time (1 for floats, prefetching the next row; 4 for int8, whose int8 -> fp32
   conversion, not the memory, bounds it). 2-4 rows: blocks of 4 weight rows x M input rows, one pass. 5-8 rows:
   blocks of 3 weight rows x M input rows (24 accumulators), one pass (the rows are computed while the weights stream
   in; 3 rows 1.07-1.14x faster than 2 at 8 rows). More: blocks
   of 4 weight rows, passes of 4 input rows over chunks of KC inputs (a block's chunk stays in L1 for the later
   passes; later chunks add to y). From memory (fine-64x8 layer, huge pages) these read 25-32 GB/s at 1-4 rows and
   compute 55-67 GFLOP/s at 8 rows; from L2 95-110 GFLOP/s at 4-8 rows. */
#define CALL(BLK, OB, MB) BLK(x + m * ldx + k, ldx, wo + k, ldw, kn, y + m * ldy + o, ldy, so, OB, MB, m == 0, k > 0)
#define ROWS(BLK, OB, R) switch (R) {                                                                          \
    case 1: CALL(BLK, OB, 1); break; case 2: CALL(BLK, OB, 2); break; case 3: CALL(BLK, OB, 3); break;         \
    case 4: CALL(BLK, OB, 4); break; case 5: CALL(BLK, OB, 5); break; case 6: CALL(BLK, OB, 6); break;         \
    case 7: CALL(BLK, OB, 7); break; case 8: CALL(BLK, OB, 8); break; }
#define ROWS4(BLK, R) switch (R) {                                                                             \
    case 1: CALL(BLK, 4, 1); break; case 2: CALL(BLK, 4, 2); break; case 3: CALL(BLK, 4, 3); break;            \
    case 4: CALL(BLK, 4, 4); break; }
#define SKINNY(NAME, BLK, WT, XT, KC, M1OB, R1)                                                                 \
static void NAME(const XT* x, int64_t ldx, int64_t M, const WT* w, int64_t ldw, int64_t O, int64_t I,          \
                 float* y, int64_t ldy, const float* scale) {                                                   \
  if (M <= 0) return;                                                                                           \
  if (M == 1 && M1OB == 1 && !scale) { R1(x, w, ldw, O, I, y); return; }                                        \
  const int64_t ob = M == 1 ? M1OB : (M <= 4 || M > 8) ? 4 : 3, kc = M <= 8 ? I : KC;                                                      \
  for (int64_t k = 0; k < I || k == 0; k += kc) {                                                               \
    const int64_t kn = I - k < kc ? I - k : kc;                                                                 \
    int64_t o = 0;                                                                                              \
    for (; o + ob <= O; o += ob) {                                                                              \
      const WT* wo = w + o * ldw;                                                                               \
      const float* so = scale ? scale + o : NULL;                                                               \
      int64_t m = 0;                                                                                            \
      if (ob == 1) { CALL(BLK, 1, 1); continue; }                                                               \
      if (ob == 4) { for (; m + 4 <= M; m += 4) CALL(BLK, 4, 4); ROWS4(BLK, M - m) continue; }                  \
      for (; m + 8 <= M; m += 8) CALL(BLK, 3, 8);                                                               \
      ROWS(BLK, 3, M - m)                                                                                       \
    }                                                                                                           \
    for (; o < O; o++) {                                                                                        \
      const WT* wo = w + o * ldw;                                                                               \
      const float* so = scale ? scale + o : NULL;                                                               \
      int64_t m = 0;                                                                                            \
      for (; m + 8 <= M; m += 8) CALL(BLK, 1, 8);                                                               \
      ROWS(BLK, 1, M - m)                                                                                       \
    }                                                                                                           \
  }                                                                                                             \
}

SKINNY(skinny_f32, blk_f32, float, float, 512, 1, row1_f32)
SKINNY(skinny_f32_t1, blk_f32, float, float, 512, 1, row1_f32_t1)
SKINNY(skinny_bf16, blk_bf16, uint16_t, uint16_t, 1024, 1, row1_bf16)
SKINNY(skinny_i8, blk_i8, int8_t, float, 512, 4, row1_i8)

static inline __m512 exp512(__m512 x) {  /* Cephes expf: ~1 ulp on [-87, 88] */
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* a[m, f] = silu(h[m, f]) * h[m, F + f] for M rows of h [M, 2F] (row stride ldh); a fp32 (af, may alias h) or bf16
   (ab), row stride lda. */
static void swiglu(const float* h, int64_t ldh, int64_t M, int64_t F, float* af, uint16_t* ab, int64_t lda) {
  for (int64_t m = 0; m < M; m++) {
    const float* g = h + m * ldh;
    for (int64_t f = 0; f < F; f += 16) {
      const __mmask16 k = F - f >= 16 ? (__mmask16)0xFFFF : M16(F - f);
      __m512 gv = _mm512_maskz_loadu_ps(k, g + f), uv = _mm512_maskz_loadu_ps(k, g + F + f);
      __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
      __m512 v = _mm512_mul_ps(_mm512_div_ps(gv, den), uv);
      if (ab) _mm256_mask_storeu_epi16(ab + m * lda + f, k, (__m256i)_mm512_cvtneps_pbh(v));
      else _mm512_mask_storeu_ps(af + m * lda + f, k, v);
    }
  }
}

/* Groups g0 .. g1 of (expert, first row, rows): y rows = swiglu(x rows @ w13[e].T) @ w2[e].T. x [N, D] (row stride
   ldx); w13 [E, 2F, D] with expert stride s13 and row stride ld13 (w2 [E, D, F]: s2, ld2); sc13 / sc2 the int8
   scales [E, 2F] / [E, D] (fp32, contiguous) or NULL; h [N, 2F] fp32 scratch (ldh); a the SwiGLU output (h itself
   for fp32 / int8, [N, F] bf16 for bf16; lda); y [N, D] fp32 (contiguous). Row strides that are not a multiple of
   4 KiB keep the rows of a block out of one L1 set (4 KiB aliasing). */
#define EXPERTS(NAME, SK, WT, XT, BF)                                                                           \
void NAME(const XT* x, int64_t ldx, const int64_t* groups, int64_t g0, int64_t g1, const WT* w13, int64_t s13,  \
          int64_t ld13, const float* sc13, const WT* w2, int64_t s2, int64_t ld2, const float* sc2, float* h,   \
          int64_t ldh, void* a, int64_t lda, float* y, int64_t D, int64_t F) {                                  \
  for (int64_t g = g0; g < g1; g++) {                                                                           \
    const int64_t e = groups[3 * g], r = groups[3 * g + 1], c = groups[3 * g + 2];                              \
    SK(x + r * ldx, ldx, c, w13 + e * s13, ld13, 2 * F, D, h + r * ldh, ldh, sc13 ? sc13 + e * 2 * F : NULL);  \
    if (BF) {                                                                                                   \
      uint16_t* ab = (uint16_t*)a + r * lda;                                                                    \
      swiglu(h + r * ldh, ldh, c, F, NULL, ab, lda);                                                            \
      SK((const XT*)ab, lda, c, w2 + e * s2, ld2, D, F, y + r * D, D, sc2 ? sc2 + e * D : NULL);               \
    } else {                                                                                                    \
      float* af = (float*)a + r * lda;                                                                          \
      swiglu(h + r * ldh, ldh, c, F, af, NULL, lda);                                                            \
      SK((const XT*)af, lda, c, w2 + e * s2, ld2, D, F, y + r * D, D, sc2 ? sc2 + e * D : NULL);               \
    }                                                                                                           \
  }                                                                                                             \
}

EXPERTS(moesaic_experts_f32, skinny_f32, float, float, 0)
EXPERTS(moesaic_experts_f32_t1, skinny_f32_t1, float, float, 0)
EXPERTS(moesaic_experts_bf16, skinny_bf16, uint16_t, uint16_t, 1)
EXPERTS(moesaic_experts_i8, skinny_i8, int8_t, float, 0)

/* One token's combine: out [D] = sum_k wk[k] * y[k, :] over its K expert outputs y [K, D] (fp32, slot order). */
void moesaic_combine_f32(const float* y, const float* wk, int64_t K, int64_t D, float* out) {
  for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
  for (int64_t k = 0; k < K; k++)
    for (int64_t d = 0; d < D; d++) out[d] += wk[k] * y[k * D + d];
}

/* A batch's combine: out [T, D] = 0, then out[order[i] / K] += w[order[i]] * y[i] for i = 0 .. N-1 in that order (the
   product rounded to fp32, then added, as torch's index_add_ of y * w). y [N, D]: the expert outputs of the routed
   pairs, sorted by expert; order [N]: their flat (token * K + slot) indices; w [T * K]: the routing weights. One
   thread: at ~64 rows torch's index_add_ woke a parallel region, whose second thread the C worker was still
   spinning on. */
void moesaic_combine_sorted_f32(const float* y, const int64_t* order, int64_t K, const float* w, int64_t N,
                                int64_t T, int64_t D, float* out) {
  memset(out, 0, sizeof(float) * (size_t)(T * D));
  for (int64_t i = 0; i < N; i++) {
    const float wi = w[order[i]];
    float* o = out + (order[i] / K) * D;
    const float* yi = y + i * D;
    for (int64_t d = 0; d < D; d++) {
      const float p = wi * yi[d];
      o[d] += p;
    }
  }
}

/* A linear's few rows: y [M, O] fp32 (ldy) = x [M, I] (ldx) @ w [O, I].T (ldw). */
void moesaic_linear_f32(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t O, int64_t I,
                        float* y, int64_t ldy) { skinny_f32(x, ldx, M, w, ldw, O, I, y, ldy, NULL); }
void moesaic_linear_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t ldw, int64_t O,
                         int64_t I, float* y, int64_t ldy) { skinny_bf16(x, ldx, M, w, ldw, O, I, y, ldy, NULL); }
"""
