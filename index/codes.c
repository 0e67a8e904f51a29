/*
 * codes.c: the compact codes of a segment (kvs_codes_t in kvs_index.h), so
 * that search can rank keys without reading them in full: 4 bits per key
 * dimension and 8 per centroid dimension after a seeded random rotation,
 * with offsets and steps fitted to the segment's own rotated keys.
 *
 * Why a rotation: attention keys carry a few channels far larger than the
 * rest (RoPE pairs, outlier features); a per-dimension quantiser spends its
 * 16 levels on their range and loses the small channels. A random sign
 * flip followed by a Walsh-Hadamard transform mixes every channel into
 * every dimension, so the ranges even out, and, being orthonormal, keeps
 * q.k unchanged. Why min/max ranges rather than clipped ones: the keys a
 * query wants are the ones that stick out in its direction; clipping would
 * flatten exactly those.
 */
#include "codes_int.h"
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvs_rng.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Head dims up to this get codes (the stack buffer of one row's codes). */
#define CODES_MAX_D KVS__CODES_MAX_D

static int is_pow2(uint32_t d) {
    return d && !(d & (d - 1));
}

/* The dimensions the rotation of a head of d dims works in: those of its
 * codes, or d itself for a head without codes (the rotation's own tests). */
static uint32_t rot_dim(uint32_t d) {
    uint32_t dc = kvs_codes_dim(d);
    return dc ? dc : d;
}

void kvs_codes_rotate(const kvs_codes_t *codes, uint32_t d0, const float *x,
                      float *out) {
    const uint32_t d = rot_dim(d0);
    kvs_rng_t s = {codes->seed};
    uint64_t bits = 0;
    for (uint32_t j = 0; j < d; j++) {
        if (j % 64 == 0)
            bits = kvs_rng_next(&s);
        float v = j < d0 ? x[j] : 0.0f;
        out[j] = (bits >> (j % 64)) & 1 ? -v : v;
    }
    if (!is_pow2(d))
        return;
    for (uint32_t h = 1; h < d; h *= 2)
        for (uint32_t i = 0; i < d; i += 2 * h)
            for (uint32_t j = i; j < i + h; j++) {
                float a = out[j], b = out[j + h];
                out[j] = a + b;
                out[j + h] = a - b;
            }
    float inv = 1.0f / sqrtf((float)d);
    for (uint32_t j = 0; j < d; j++)
        out[j] *= inv;
}

void kvs_codes_free(kvs_codes_t *c) {
    if (!c)
        return;
    free(c->lo);
    free(c->step);
    free(c->clo);
    free(c->cstep);
    free(c->keys);
    free(c->centroids);
    free(c->spread);
    free(c);
}

size_t kvs_codes_bytes(uint32_t n, uint32_t C, uint32_t d0) {
    size_t d = rot_dim(d0);
    return sizeof(kvs_codes_t) + 4 * (size_t)d * sizeof(float) +
           (size_t)n * (d / 2) + (size_t)C * d + (size_t)C * sizeof(float);
}

/* Offset and step per dim of rows x [n][d] for `levels` levels. Row by
 * row, so the loads are contiguous; min and max are exact, so the order
 * does not change the result. */
static void fit_range(const float *x, uint32_t n, uint32_t d, int levels,
                      float *lo, float *step) {
    float mx[CODES_MAX_D];
    memcpy(lo, x, sizeof(*lo) * d);
    memcpy(mx, x, sizeof(*mx) * d);
    for (uint32_t i = 1; i < n; i++) {
        const float *r = x + (size_t)i * d;
        uint32_t j = 0;
#ifdef __SSE2__
        /* minps/maxps return the second operand on NaN, as `v < mn ? v :
         * mn` keeps mn. */
        for (; j + 4 <= d; j += 4) {
            __m128 v = _mm_loadu_ps(r + j);
            _mm_storeu_ps(lo + j, _mm_min_ps(v, _mm_loadu_ps(lo + j)));
            _mm_storeu_ps(mx + j, _mm_max_ps(v, _mm_loadu_ps(mx + j)));
        }
#endif
        for (; j < d; j++) {
            float v = r[j];
            lo[j] = v < lo[j] ? v : lo[j];
            mx[j] = v > mx[j] ? v : mx[j];
        }
    }
    for (uint32_t j = 0; j < d; j++)
        step[j] = (mx[j] - lo[j]) / (float)(levels - 1);
}

static inline uint32_t quant(float v, float lo, float step, uint32_t top) {
    if (!(step > 0))
        return 0;
    float c = rintf((v - lo) / step);
    /* !(c > 0) also catches NaN, whose conversion would be undefined. */
    return !(c > 0) ? 0 : c >= (float)top ? top : (uint32_t)c;
}

/* code[j] = quant(x[j], lo[j], step[j], top) for j < d. The SSE2 version
 * clamps before it rounds (the same result for integral bounds; NaN goes
 * to 0 through maxps) and rounds with cvtps, to nearest even like rintf in
 * the default rounding mode. */
static void quant_row(const float *x, const float *lo, const float *step,
                      uint32_t d, uint32_t top, uint8_t *code) {
    uint32_t j = 0;
#ifdef __SSE2__
    const __m128 zero = _mm_setzero_ps(), hi = _mm_set1_ps((float)top);
    for (; j + 8 <= d; j += 8) {
        __m128i q[2];
        for (int h = 0; h < 2; h++) {
            __m128 st = _mm_loadu_ps(step + j + 4 * h);
            __m128 f = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(x + j + 4 * h),
                                             _mm_loadu_ps(lo + j + 4 * h)),
                                  st);
            f = _mm_min_ps(_mm_max_ps(f, zero), hi);
            f = _mm_and_ps(f, _mm_cmpgt_ps(st, zero));
            q[h] = _mm_cvtps_epi32(f);
        }
        __m128i w = _mm_packs_epi32(q[0], q[1]);
        _mm_storel_epi64((__m128i *)(code + j), _mm_packus_epi16(w, w));
    }
#endif
    for (; j < d; j++)
        code[j] = (uint8_t)quant(x[j], lo[j], step[j], top);
}

/* kvs_codes_rotate over rows x [n][d] in place. Each element goes through
 * the same additions in the same order as in kvs_codes_rotate (the
 * butterflies of one stage are independent), so the result is bit for bit
 * the same; the signs are drawn once instead of once per row. */
static void rotate_rows(const kvs_codes_t *codes, uint32_t d, float *x,
                        size_t n) {
    uint32_t neg[CODES_MAX_D];
    kvs_rng_t s = {codes->seed};
    uint64_t bits = 0;
    for (uint32_t j = 0; j < d; j++) {
        if (j % 64 == 0)
            bits = kvs_rng_next(&s);
        neg[j] = (bits >> (j % 64)) & 1 ? 0x80000000u : 0;
    }
    if (!is_pow2(d) || d < 8) {
        for (size_t i = 0; i < n; i++)
            kvs_codes_rotate(codes, d, x + i * d, x + i * d);
        return;
    }
    const float inv = 1.0f / sqrtf((float)d);
    for (size_t i = 0; i < n; i++) {
        float *r = x + i * d;
#ifdef __SSE2__
        /* A sign flip is an xor of the sign bit, which is what -x does. */
        for (uint32_t j = 0; j < d; j += 4)
            _mm_storeu_ps(r + j, _mm_xor_ps(_mm_loadu_ps(r + j),
                                            _mm_castsi128_ps(_mm_loadu_si128(
                                                (const __m128i *)(neg + j)))));
        /* Stages h = 1 and 2 inside each group of 4. */
        for (uint32_t j = 0; j < d; j += 4) {
            __m128 v = _mm_loadu_ps(r + j);
            __m128 a = _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 2, 0, 0));
            __m128 b = _mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 3, 1, 1));
            __m128 s1 = _mm_add_ps(a, b), d1 = _mm_sub_ps(a, b);
            /* v = (a0+a1, a0-a1, a2+a3, a2-a3) */
            v = _mm_shuffle_ps(_mm_unpacklo_ps(s1, d1), _mm_unpackhi_ps(s1, d1),
                               _MM_SHUFFLE(3, 2, 1, 0));
            a = _mm_movelh_ps(v, v);
            b = _mm_movehl_ps(v, v);
            _mm_storeu_ps(r + j,
                          _mm_movelh_ps(_mm_add_ps(a, b), _mm_sub_ps(a, b)));
        }
        for (uint32_t h = 4; h < d; h *= 2)
            for (uint32_t k = 0; k < d; k += 2 * h)
                for (uint32_t j = k; j < k + h; j += 4) {
                    __m128 a = _mm_loadu_ps(r + j), b = _mm_loadu_ps(r + j + h);
                    _mm_storeu_ps(r + j, _mm_add_ps(a, b));
                    _mm_storeu_ps(r + j + h, _mm_sub_ps(a, b));
                }
        const __m128 vi = _mm_set1_ps(inv);
        for (uint32_t j = 0; j < d; j += 4)
            _mm_storeu_ps(r + j, _mm_mul_ps(_mm_loadu_ps(r + j), vi));
#else
        for (uint32_t j = 0; j < d; j++)
            r[j] = neg[j] ? -r[j] : r[j];
        for (uint32_t h = 1; h < d; h *= 2)
            for (uint32_t k = 0; k < d; k += 2 * h)
                for (uint32_t j = k; j < k + h; j++) {
                    float a = r[j], b = r[j + h];
                    r[j] = a + b;
                    r[j + h] = a - b;
                }
        for (uint32_t j = 0; j < d; j++)
            r[j] *= inv;
#endif
    }
}

/* Sum over rows x [m][d] of |x - c|^2, in double. Four partial sums (two
 * per SSE2 register) rather than one chain: the additions do not wait on
 * each other. */
static double sq_dist_sum(const float *x, uint32_t m, const float *c,
                          uint32_t d) {
    double ss = 0;
    uint32_t j0 = 0;
#ifdef __SSE2__
    __m128d a0 = _mm_setzero_pd(), a1 = _mm_setzero_pd();
    for (uint32_t i = 0; i < m; i++) {
        const float *r = x + (size_t)i * d;
        for (uint32_t j = 0; j + 4 <= d; j += 4) {
            __m128 rv = _mm_loadu_ps(r + j), cv = _mm_loadu_ps(c + j);
            __m128d lo = _mm_sub_pd(_mm_cvtps_pd(rv), _mm_cvtps_pd(cv));
            __m128d hi = _mm_sub_pd(_mm_cvtps_pd(_mm_movehl_ps(rv, rv)),
                                    _mm_cvtps_pd(_mm_movehl_ps(cv, cv)));
            a0 = _mm_add_pd(a0, _mm_mul_pd(lo, lo));
            a1 = _mm_add_pd(a1, _mm_mul_pd(hi, hi));
        }
    }
    double t[4];
    _mm_storeu_pd(t, a0);
    _mm_storeu_pd(t + 2, a1);
    ss = (t[0] + t[1]) + (t[2] + t[3]);
    j0 = d & ~3u;
#endif
    for (uint32_t i = 0; i < m; i++)
        for (uint32_t j = j0; j < d; j++) {
            double e = (double)x[(size_t)i * d + j] - c[j];
            ss += e * e;
        }
    return ss;
}

/* Rows x [n][d0] of `dtype` as fp32 [n][d] (d >= d0), the added dims
 * zero, in a fresh buffer; NULL when out of memory. */
static float *rows_f32(kvs_dtype_t dtype, const void *x, size_t n, uint32_t d0,
                       uint32_t d) {
    float *p = calloc(n ? n * d : 1, sizeof(*p));
    const size_t rb = kvs_dtype_size(dtype) * d0;
    for (size_t i = 0; p && i < n; i++)
        kvs_to_f32(dtype, (const char *)x + i * rb, p + i * d, d0);
    return p;
}

int kvs__segment_build_codes_f32(kvs_segment_t *seg, uint64_t seed,
                                 float *xr0) {
    /* In the codes' dims d: keys (xr) and centroids (cr) padded with zero
     * dims. The rotation is orthonormal in d dims, so q.k is kept; without
     * a Hadamard (d not a power of two) the added dims stay zero, quantise
     * to code 0 with step 0 and weigh nothing, with one (48 -> 64) they
     * are mixed in like any other. */
    const uint32_t d0 = seg->d, d = kvs_codes_dim(d0), n = seg->n_tokens,
                   C = seg->n_clusters;
    int rc = KVS_ENOMEM;
    float *xr = d == d0 ? xr0 : rows_f32(KVS_DTYPE_F32, xr0, n, d0, d);
    float *cr = rows_f32(seg->dtype, seg->centroids, C, d0, d);
    kvs_codes_t *c = calloc(1, sizeof(*c));
    if (!xr || !cr || !c)
        goto err;
    c->seed = seed ^ 0x636f646573ull; /* "codes": not the k-means stream */
    c->lo = malloc(sizeof(float) * d);
    c->step = malloc(sizeof(float) * d);
    c->clo = malloc(sizeof(float) * d);
    c->cstep = malloc(sizeof(float) * d);
    c->keys = malloc((size_t)n * (d / 2));
    c->centroids = malloc((size_t)C * d);
    c->spread = malloc(sizeof(float) * C);
    if (!c->lo || !c->step || !c->clo || !c->cstep || !c->keys ||
        !c->centroids || !c->spread)
        goto err;

    rotate_rows(c, d, xr, n);
    rotate_rows(c, d, cr, C);
    fit_range(xr, n, d, 16, c->lo, c->step);
    fit_range(cr, C, d, 256, c->clo, c->cstep);

    uint8_t code[CODES_MAX_D];
    for (uint32_t i = 0; i < n; i++) {
        quant_row(xr + (size_t)i * d, c->lo, c->step, d, 15, code);
        uint8_t *r = c->keys + (size_t)i * (d / 2);
        for (uint32_t b = 0; b < d; b += 32)
            for (uint32_t j = 0; j < 16; j++)
                r[b / 2 + j] = (uint8_t)(code[b + j] | code[b + 16 + j] << 4);
    }
    for (uint32_t k = 0; k < C; k++) {
        const float *x = cr + (size_t)k * d;
        quant_row(x, c->clo, c->cstep, d, 255, c->centroids + (size_t)k * d);
        /* The rotation is orthonormal: distances are the raw ones. */
        uint32_t m = seg->offsets[k + 1] - seg->offsets[k];
        double ss = sq_dist_sum(xr + (size_t)seg->offsets[k] * d, m, x, d);
        c->spread[k] = m ? (float)sqrt(ss / ((double)m * d0)) : 0.0f;
    }
    kvs_codes_free(seg->codes);
    seg->codes = c;
    c = NULL;
    rc = 0;
err:
    kvs_codes_free(c);
    free(cr);
    if (xr != xr0)
        free(xr);
    return rc;
}

int kvs_segment_build_codes(kvs_segment_t *seg, uint64_t seed) {
    if (!seg)
        return KVS_EINVAL;
    const uint32_t d = seg->d, n = seg->n_tokens;
    if (!kvs_codes_dim(d))
        return 0;
    float *xr = malloc(sizeof(*xr) * (size_t)n * d);
    if (!xr)
        return KVS_ENOMEM;
    kvs_to_f32(seg->dtype, seg->keys, xr, (size_t)n * d);
    int rc = kvs__segment_build_codes_f32(seg, seed, xr);
    free(xr);
    return rc;
}
