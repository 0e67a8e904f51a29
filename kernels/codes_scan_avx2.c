/*
 * codes_scan_avx2.c: AVX2+FMA versions of the code scans of codes_scan.c.
 * Compiled with -mavx2 -mfma; called only after the run-time CPU check
 * below. Each row's codes are widened to fp32 and multiplied into four
 * accumulators, so the sums are ordered differently from the scalar loop
 * (results agree to float rounding, not bit for bit).
 */
#include "codes_scan_int.h"

#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 a =
        _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

static inline __m256 widen8(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

static void code4_avx2(const float *w, const uint8_t *codes, size_t n,
                       uint32_t d, float bias, float *out) {
    const size_t rb = d / 2;
    const __m128i mask = _mm_set1_epi8(15);
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * rb;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (uint32_t b = 0; b < d; b += 32) {
            __m128i v = _mm_loadu_si128((const __m128i *)(r + b / 2));
            __m128i lo = _mm_and_si128(v, mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b), widen8(lo), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 8),
                                 widen8(_mm_srli_si128(lo, 8)), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 16), widen8(hi), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 24),
                                 widen8(_mm_srli_si128(hi, 8)), a3);
        }
        out[j] = bias + hsum(_mm256_add_ps(_mm256_add_ps(a0, a1),
                                           _mm256_add_ps(a2, a3)));
    }
}

/* Two queries over the same rows: each row's codes are widened once; every
 * query keeps code4_avx2's four accumulators and order of sums, so each
 * output equals code4_avx2's bit for bit. */
static void code4_pair_avx2(const float *w, const float *w2,
                            const uint8_t *codes, size_t n, uint32_t d,
                            float bias, float bias2, float *out, float *out2) {
    const size_t rb = d / 2;
    const __m128i mask = _mm_set1_epi8(15);
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * rb;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (uint32_t b = 0; b < d; b += 32) {
            __m128i v = _mm_loadu_si128((const __m128i *)(r + b / 2));
            __m128i lo = _mm_and_si128(v, mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            __m256 x0 = widen8(lo), x1 = widen8(_mm_srli_si128(lo, 8));
            __m256 x2 = widen8(hi), x3 = widen8(_mm_srli_si128(hi, 8));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b), x0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 8), x1, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 16), x2, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + b + 24), x3, a3);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + b), x0, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + b + 8), x1, b1);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + b + 16), x2, b2);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + b + 24), x3, b3);
        }
        out[j] = bias + hsum(_mm256_add_ps(_mm256_add_ps(a0, a1),
                                           _mm256_add_ps(a2, a3)));
        out2[j] = bias2 + hsum(_mm256_add_ps(_mm256_add_ps(b0, b1),
                                             _mm256_add_ps(b2, b3)));
    }
}

static void code8_avx2(const float *w, const uint8_t *codes, size_t n,
                       uint32_t d, float bias, float *out) {
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        uint32_t i = 0;
        for (; i + 16 <= d; i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(r + i));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), widen8(v), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8),
                                 widen8(_mm_srli_si128(v, 8)), a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; i < d; i++)
            s += w[i] * (float)r[i];
        out[j] = bias + s;
    }
}

/* x[0 .. n) in the first n of four lanes (n <= 4), zeros after: the
 * scales or biases of a group of up to four queries. */
static inline __m128 load_upto4(const float *x, uint32_t n) {
    float v[4] = {0};
    for (uint32_t i = 0; i < n && i < 4; i++)
        v[i] = x[i];
    return _mm_loadu_ps(v);
}

/* Up to four queries (nq) over rows whose d is a multiple of 64: per 32
 * code bytes (64 dims) the low and high nibbles are multiplied into the
 * weights as unsigned x signed bytes (maddubs: pairs summed to int16, at
 * most 2 x 15 x 127 in magnitude), two chunks summed in int16 (< 2^15),
 * then widened to int32 pairs. The four sums are reduced together. */
static inline void code4_q8_rows4(const int8_t *const *w, uint32_t nq,
                                  const float *scale, const float *bias,
                                  const uint8_t *codes, size_t n, uint32_t d,
                                  float *const *out) {
    const size_t rb = d / 2;
    const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m128 sc = load_upto4(scale, nq), bi = load_upto4(bias, nq);
    const int8_t *w0 = w[0], *w1 = nq > 1 ? w[1] : w[0],
                 *w2 = nq > 2 ? w[2] : w[0], *w3 = nq > 3 ? w[3] : w[0];
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * rb;
        if (j + 8 < n)
            __builtin_prefetch(r + 8 * rb);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (uint32_t t = 0; t < d; t += 128) {
            __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
            for (uint32_t u = t; u < t + 128 && u < d; u += 64) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(r + u / 2));
                __m256i lo = _mm256_and_si256(v, mask);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#define Q8_STEP(acc, wq)                                                       \
    acc = _mm256_add_epi16(                                                    \
        acc, _mm256_add_epi16(                                                 \
                 _mm256_maddubs_epi16(                                         \
                     lo, _mm256_loadu_si256((const __m256i *)(wq + u))),       \
                 _mm256_maddubs_epi16(                                         \
                     hi, _mm256_loadu_si256((const __m256i *)(wq + u + 32)))))
                Q8_STEP(s0, w0);
                Q8_STEP(s1, w1);
                Q8_STEP(s2, w2);
                Q8_STEP(s3, w3);
#undef Q8_STEP
            }
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(s0, ones));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(s1, ones));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(s2, ones));
            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(s3, ones));
        }
        __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1),
                                      _mm256_hadd_epi32(a2, a3));
        __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h),
                                    _mm256_extracti128_si256(h, 1));
        float res[4];
        _mm_storeu_ps(res,
                      _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(sum), sc), bi));
        for (uint32_t i = 0; i < nq; i++)
            out[i][j] = res[i];
    }
}

static void code4_q8_avx2(const int8_t *q8, size_t q8_stride, uint32_t g,
                          const float *scale, const float *bias,
                          const uint8_t *codes, size_t n, uint32_t d,
                          float *out, size_t out_stride) {
    if (d % 64) { /* a last block of 32 dims: the portable loop */
        kvs__code4_q8_scalar(q8, q8_stride, g, scale, bias, codes, n, d, out,
                             out_stride);
        return;
    }
    for (uint32_t i = 0; i < g; i += 4) {
        uint32_t nq = g - i < 4 ? g - i : 4;
        const int8_t *w[4];
        float *o[4];
        for (uint32_t k = 0; k < nq; k++) {
            w[k] = q8 + (i + k) * q8_stride;
            o[k] = out + (i + k) * out_stride;
        }
        code4_q8_rows4(w, nq, scale + i, bias + i, codes, n, d, o);
    }
}

/* w[t] = a[t] x b[t] x mul (d a multiple of 8), returns max |w[t]|: the
 * products in the scalar versions' order, so both round the same. */
static float products_max(const float *a, const float *b, float mul, uint32_t d,
                          float *w) {
    const __m256 mv = _mm256_set1_ps(mul);
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    for (uint32_t t = 0; t < d; t += 8) {
        __m256 x = _mm256_mul_ps(
            _mm256_mul_ps(_mm256_loadu_ps(a + t), _mm256_loadu_ps(b + t)), mv);
        _mm256_storeu_ps(w + t, x);
        mx = _mm256_max_ps(mx, _mm256_and_ps(x, absm));
    }
    __m128 m4 =
        _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    return _mm_cvtss_f32(m4);
}

/* 32 int32 (four vectors, in order) to 32 int8 in order; |x| <= 127. */
static inline __m256i pack32(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1),
                                   _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(
        b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* codes_scan.c's weights_q8_scalar, bit for bit: the same products in the
 * same order, rounding to nearest even (cvtps_epi32 in the default
 * mode); d a multiple of 64 and at most 1024, else the scalar one. */
static void weights_q8_avx2(const float *a, const float *b, float mul,
                            uint32_t d, int8_t *q8, float *scale) {
    if (d % 64 || d > 1024) {
        kvs__weights_q8_scalar(a, b, mul, d, q8, scale);
        return;
    }
    float w[1024];
    float m = products_max(a, b, mul, d, w);
    const __m256 inv = _mm256_set1_ps(m > 0 ? 127.0f / m : 0.0f);
#define Q8_ROUND(off)                                                          \
    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + (off)), inv))
    for (uint32_t t = 0; t < d; t += 64) {
        /* low nibbles: dims t..t+15, t+32..t+47; high: t+16.., t+48.. */
        _mm256_storeu_si256((__m256i *)(q8 + t),
                            pack32(Q8_ROUND(t), Q8_ROUND(t + 8),
                                   Q8_ROUND(t + 32), Q8_ROUND(t + 40)));
        _mm256_storeu_si256((__m256i *)(q8 + t + 32),
                            pack32(Q8_ROUND(t + 16), Q8_ROUND(t + 24),
                                   Q8_ROUND(t + 48), Q8_ROUND(t + 56)));
    }
#undef Q8_ROUND
    *scale = m / 127.0f;
}

/* Up to four queries over rows of 8-bit codes, d a multiple of 16: per
 * 16 codes widened to int16 once, madd with each query's int16 weights
 * (pairs summed in int32; the weights' bound keeps every sum in int32). */
static void code8_q16_avx2(const int16_t *q16, size_t q16_stride, uint32_t g,
                           const float *scale, const float *bias,
                           const uint8_t *codes, size_t n, uint32_t d,
                           float *out, size_t out_stride) {
    if (d % 16) {
        kvs__code8_q16_scalar(q16, q16_stride, g, scale, bias, codes, n, d, out,
                              out_stride);
        return;
    }
    for (uint32_t i0 = 0; i0 < g; i0 += 4) {
        uint32_t nq = g - i0 < 4 ? g - i0 : 4;
        const int16_t *w0 = q16 + i0 * q16_stride;
        const int16_t *w1 = nq > 1 ? w0 + q16_stride : w0;
        const int16_t *w2 = nq > 2 ? w0 + 2 * q16_stride : w0;
        const int16_t *w3 = nq > 3 ? w0 + 3 * q16_stride : w0;
        const __m128 scv = load_upto4(scale + i0, nq),
                     biv = load_upto4(bias + i0, nq);
        for (size_t j = 0; j < n; j++) {
            const uint8_t *r = codes + j * d;
            if (j + 4 < n)
                __builtin_prefetch(r + 4 * d);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (uint32_t t = 0; t < d; t += 16) {
                __m256i c = _mm256_cvtepu8_epi16(
                    _mm_loadu_si128((const __m128i *)(r + t)));
#define Q16_STEP(acc, w)                                                       \
    acc = _mm256_add_epi32(                                                    \
        acc,                                                                   \
        _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)((w) + t))))
                Q16_STEP(a0, w0);
                Q16_STEP(a1, w1);
                Q16_STEP(a2, w2);
                Q16_STEP(a3, w3);
#undef Q16_STEP
            }
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1),
                                          _mm256_hadd_epi32(a2, a3));
            __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h),
                                        _mm256_extracti128_si256(h, 1));
            float res[4];
            _mm_storeu_ps(
                res, _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(sum), scv), biv));
            for (uint32_t k = 0; k < nq; k++)
                out[(i0 + k) * out_stride + j] = res[k];
        }
    }
}

/* codes_scan.c's weights_q16 scalar loop, bit for bit (same products in
 * the same order, rounding to nearest even); d a multiple of 16 and at
 * most 1024, else the scalar one. */
static void weights_q16_avx2(const float *a, const float *b, float mul,
                             uint32_t d, int16_t *q16, float *scale) {
    if (d % 16 || d > 1024) {
        kvs__weights_q16_scalar(a, b, mul, d, q16, scale);
        return;
    }
    float w[1024];
    float m = products_max(a, b, mul, d, w), top = (float)kvs__q16_max(d);
    const __m256 inv = _mm256_set1_ps(m > 0 ? top / m : 0.0f);
    for (uint32_t t = 0; t < d; t += 16) {
        __m256i lo =
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + t), inv));
        __m256i hi =
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(w + t + 8), inv));
        /* packs works per 128-bit lane: put the quarters back in order */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi),
                                             _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(q16 + t), p);
    }
    *scale = m / top;
}

int kvs__code_scan_avx2(kvs__code_scan_table_t *t) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0;
    t->c4 = code4_avx2;
    t->c8 = code8_avx2;
    t->c4_pair = code4_pair_avx2;
    t->c4_q8 = code4_q8_avx2;
    t->weights_q8 = weights_q8_avx2;
    t->c8_q16 = code8_q16_avx2;
    t->weights_q16 = weights_q16_avx2;
    return 1;
}
