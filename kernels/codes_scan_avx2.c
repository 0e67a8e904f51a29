/*
 * codes_scan_avx2.c: AVX2+FMA versions of the code scans of codes_scan.c.
 * Compiled with -mavx2 -mfma; called only after the run-time CPU check
 * below. Each row's codes are widened to fp32 and multiplied into four
 * accumulators, so the sums are ordered differently from the scalar loop
 * (results agree to float rounding, not bit for bit).
 */
#include "kvs_kernels.h"

#include <immintrin.h>

typedef void (*code_fn)(const float *, const uint8_t *, size_t, uint32_t, float,
                        float *);
typedef void (*code_pair_fn)(const float *, const float *, const uint8_t *,
                             size_t, uint32_t, float, float, float *, float *);
int kvs__code_scan_avx2(code_fn *c4, code_fn *c8, code_pair_fn *c4p);

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

int kvs__code_scan_avx2(code_fn *c4, code_fn *c8, code_pair_fn *c4p) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0;
    *c4 = code4_avx2;
    *c8 = code8_avx2;
    *c4p = code4_pair_avx2;
    return 1;
}
