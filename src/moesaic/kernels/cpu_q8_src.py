"""C source of `cpu_q8` (W8A8: int8 activations x int8 weights through AVX-512 VNNI), kept apart so each file stays
readable. It is appended to `cpu_experts_src.SOURCE` (it reuses its `reduce4`, `swiglu` and `M16`)."""

Q8_SOURCE = r"""
/* ================= W8A8 (dynamic int8 activations, as llama.cpp's q8_0 x q8_0) =================
   An activation row x [K] is quantized per block of QB inputs (QB a multiple of 4): s_b = max|x_b| / 127,
   q_i = round(x_i * (127 / max|x_b|)) in [-127, 127] (round half to even), zero-padded to Kp = K rounded up to 64.
   Beside q the row keeps, per lane of a 64-byte chunk (4 consecutive inputs), sv = the scale of the lane's block and
   nc = -128 * (the lane's 4 q values summed).
   vpdpbusd multiplies unsigned by signed bytes: the int8 weights w become unsigned by flipping their top bit
   (w ^ 0x80 = w + 128), so sum_i (w_i + 128) q_i = sum_i w_i q_i + 128 sum_i q_i, and starting the lane's int32
   accumulator at nc removes the second term exactly. y[o] = scale[o] * sum_lanes sv * (exact int32 lane dot),
   the lane sums accumulated in fp32. */

static inline __m512 q8_ld16(const float* xf, const uint16_t* xb, int64_t i, int64_t n) {
  const __mmask16 k = n >= 16 ? (__mmask16)0xFFFF : M16(n);
  if (xf) return _mm512_maskz_loadu_ps(k, xf + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, xb + i)), 16));
}

/* One row (fp32 xf or bf16 xb) of K inputs -> q [Kp], sv [Kp / 4], nc [Kp / 4]. */
static void q8_row(const float* xf, const uint16_t* xb, int64_t K, int64_t QB, int8_t* q, float* sv, int32_t* nc) {
  const int64_t Kp = (K + 63) & ~(int64_t)63;
  for (int64_t b0 = 0; b0 < K; b0 += QB) {
    const int64_t n = K - b0 < QB ? K - b0 : QB;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(q8_ld16(xf, xb, b0 + i, n - i)));
    const float amax = _mm512_reduce_max_ps(mx);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, s = amax / 127.0f;
    const __m512 iv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : M16(n - i);
      __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(q8_ld16(xf, xb, b0 + i, n - i), iv));
      _mm512_mask_cvtepi32_storeu_epi8(q + b0 + i, k, qi);
    }
    for (int64_t j = b0 / 4; j < (b0 + n + 3) / 4; j++) sv[j] = s;
  }
  for (int64_t i = K; i < Kp; i++) q[i] = 0;
  for (int64_t j = (K + 3) / 4; j < Kp / 4; j++) sv[j] = 0.0f;
  const __m512i m128 = _mm512_set1_epi8((char)0x80);  /* 128 as an unsigned byte */
  for (int64_t i = 0; i < Kp; i += 64) {
    __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), m128, _mm512_loadu_si512(q + i));
    _mm512_storeu_si512(nc + i / 4, _mm512_sub_epi32(_mm512_setzero_si512(), c));
  }
}

/* exported for the tests: M rows (row stride ldx, fp32 or bf16) -> q [M, ldq], sv / nc [M, lds] */
void moesaic_q8_rows(const void* x, int64_t xbf16, int64_t ldx, int64_t M, int64_t K, int64_t QB, int8_t* q,
                     int64_t ldq, float* sv, int32_t* nc, int64_t lds) {
  for (int64_t m = 0; m < M; m++)
    q8_row(xbf16 ? NULL : (const float*)x + m * ldx, xbf16 ? (const uint16_t*)x + m * ldx : NULL, K, QB,
           q + m * ldq, sv + m * lds, nc + m * lds);
}

/* One 64-input chunk at i of OB weight rows x MB quantized rows; LOADW loads a weight row's chunk. */
#define Q8_CHUNK(LOADW)                                                                                        \
  {                                                                                                             \
    __m512i wv[4];                                                                                              \
    for (int o = 0; o < OB; o++) {                                                                              \
      wv[o] = _mm512_xor_si512(LOADW(w + o * ldw + i), flip);                                                  \
      __asm__("" : "+v"(wv[o]));                                                                                \
      _mm_prefetch((const char*)(w + (o + OB) * ldw + i), _MM_HINT_T1);                                        \
      _mm_prefetch((const char*)(w + (o + 3 * OB) * ldw + i), _MM_HINT_T2);                                    \
      _mm_prefetch((const char*)(w + (o + 6 * OB) * ldw + i), _MM_HINT_T2);                                    \
      _mm_prefetch((const char*)(w + (o + 12 * OB) * ldw + i), _MM_HINT_T2);                                   \
    }                                                                                                           \
    for (int m = 0; m < MB; m++) {                                                                              \
      const __m512i xm = _mm512_loadu_si512(xq + m * ldq + i);                                                  \
      const __m512i cm = _mm512_loadu_si512(xc + m * lds + i / 4);                                              \
      const __m512 sm = _mm512_loadu_ps(xs + m * lds + i / 4);                                                  \
      for (int o = 0; o < OB; o++)                                                                              \
        acc[o][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cm, wv[o], xm)), sm, acc[o][m]);    \
    }                                                                                                           \
  }
#define Q8_FULL(p) _mm512_loadu_si512(p)
#define Q8_TAIL(p) _mm512_maskz_loadu_epi8(tail, p)

/* y[m * ldy + o] = scale[o] * (w[o] . x[m]) for o < OB, m < MB (constants after inlining). */
static inline __attribute__((always_inline)) void blk_q8(const int8_t* xq, int64_t ldq, const float* xs,
    const int32_t* xc, int64_t lds, const int8_t* w, int64_t ldw, int64_t K, float* y, int64_t ldy,
    const float* scale, const int OB, const int MB) {
  __m512 acc[4][8];
  for (int o = 0; o < OB; o++) for (int m = 0; m < MB; m++) acc[o][m] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int64_t kv = K & ~(int64_t)63;
  int64_t i = 0;
  for (; i < kv; i += 64) Q8_CHUNK(Q8_FULL)
  if (i < K) {
    const __mmask64 tail = (__mmask64)((1ull << (K - i)) - 1ull);
    Q8_CHUNK(Q8_TAIL)
  }
  if (OB == 4) {
    const __m128 s4 = _mm_loadu_ps(scale);
    for (int m = 0; m < MB; m++)
      _mm_storeu_ps(y + m * ldy, _mm_mul_ps(reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), s4));
  } else {
    for (int o = 0; o < OB; o++) for (int m = 0; m < MB; m++)
      y[m * ldy + o] = scale[o] * _mm512_reduce_add_ps(acc[o][m]);
  }
}

#define QCALL(OB, MB) blk_q8(xq + m * ldq, ldq, xs + m * lds, xc + m * lds, lds, wo, ldw, K, y + m * ldy + o, ldy, \
                             scale + o, OB, MB)
#define QROWS(OB, R) switch (R) {                                                                              \
    case 1: QCALL(OB, 1); break; case 2: QCALL(OB, 2); break; case 3: QCALL(OB, 3); break;                    \
    case 4: QCALL(OB, 4); break; case 5: QCALL(OB, 5); break; case 6: QCALL(OB, 6); break;                    \
    case 7: QCALL(OB, 7); break; }

/* y [M, O] (ldy) = (x [M, K] quantized: q / sv / nc) @ (w [O, K] int8 (ldw) * scale [O]).T. 1-4 rows: blocks of 4
   weight rows x all rows; 5-8: 3 weight rows x all rows (24 accumulators); more: 4 weight rows x passes of 4 rows
   (the block's weights, 4 x K bytes, stay in L1 for the later passes). */
static void skinny_q8(const int8_t* xq, int64_t ldq, const float* xs, const int32_t* xc, int64_t lds, int64_t M,
                      const int8_t* w, int64_t ldw, int64_t O, int64_t K, float* y, int64_t ldy, const float* scale) {
  if (M <= 0) return;
  const int64_t ob = (M <= 4 || M > 8) ? 4 : 3;
  int64_t o = 0;
  for (; o + ob <= O; o += ob) {
    const int8_t* wo = w + o * ldw;
    int64_t m = 0;
    if (ob == 4) {
      for (; m + 4 <= M; m += 4) QCALL(4, 4);
      QROWS(4, M - m)
    } else {
      for (; m + 8 <= M; m += 8) QCALL(3, 8);
      QROWS(3, M - m)
    }
  }
  for (; o < O; o++) {
    const int8_t* wo = w + o * ldw;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) QCALL(1, 4);
    QROWS(1, M - m)
  }
}

/* Groups g0 .. g1 of (expert, first row, rows), as moesaic_experts_*: y rows = swiglu(x rows @ w13[e].T) @ w2[e].T
   with x and the SwiGLU output quantized per block of QB. x [N, D] fp32 or bf16 (xbf16; row stride ldx, 0: every
   group reads row 0); h [N, 2F] fp32 scratch (ldh); xq [N, ldq] int8, xs / xc [N, lds] scratch for the quantized
   rows (ldq >= max(D, F) rounded up to 64, lds = ldq / 4); sc13 / sc2 fp32 scales; y [N, D] fp32. */
void moesaic_experts_q8(const void* x, int64_t xbf16, int64_t ldx, const int64_t* groups, int64_t g0, int64_t g1,
                        const int8_t* w13, int64_t s13, int64_t ld13, const float* sc13, const int8_t* w2,
                        int64_t s2, int64_t ld2, const float* sc2, float* h, int64_t ldh, int8_t* xq, int64_t ldq,
                        float* xs, int32_t* xc, int64_t lds, float* y, int64_t D, int64_t F, int64_t QB) {
  for (int64_t g = g0; g < g1; g++) {
    const int64_t e = groups[3 * g], r = groups[3 * g + 1], c = groups[3 * g + 2];
    for (int64_t m = 0; m < c; m++) {
      const int64_t row = r + m;
      q8_row(xbf16 ? NULL : (const float*)x + row * ldx, xbf16 ? (const uint16_t*)x + row * ldx : NULL, D, QB,
             xq + row * ldq, xs + row * lds, xc + row * lds);
    }
    skinny_q8(xq + r * ldq, ldq, xs + r * lds, xc + r * lds, lds, c, w13 + e * s13, ld13, 2 * F, D, h + r * ldh,
              ldh, sc13 + e * 2 * F);
    swiglu(h + r * ldh, ldh, c, F, h + r * ldh, NULL, ldh);
    for (int64_t m = 0; m < c; m++) {
      const int64_t row = r + m;
      q8_row(h + row * ldh, NULL, F, QB, xq + row * ldq, xs + row * lds, xc + row * lds);
    }
    skinny_q8(xq + r * ldq, ldq, xs + r * lds, xc + r * lds, lds, c, w2 + e * s2, ld2, D, F, y + r * D, D,
              sc2 + e * D);
  }
}

/* A linear's rows: y [M, O] fp32 (ldy) = quantized x [M, I] (fp32 / bf16, ldx) @ (w [O, I] int8 * scale).T; the
   scratch as above, for M rows of I inputs. */
void moesaic_linear_q8(const void* x, int64_t xbf16, int64_t ldx, int64_t M, const int8_t* w, int64_t ldw,
                       int64_t O, int64_t I, const float* scale, float* y, int64_t ldy, int8_t* xq, int64_t ldq,
                       float* xs, int32_t* xc, int64_t lds, int64_t QB) {
  for (int64_t m = 0; m < M; m++)
    q8_row(xbf16 ? NULL : (const float*)x + m * ldx, xbf16 ? (const uint16_t*)x + m * ldx : NULL, I, QB,
           xq + m * ldq, xs + m * lds, xc + m * lds);
  skinny_q8(xq, ldq, xs, xc, lds, M, w, ldw, O, I, y, ldy, scale);
}
"""
