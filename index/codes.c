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
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvs_rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Head dims up to this get codes (the stack buffer of one row's codes). */
#define CODES_MAX_D 1024

static int is_pow2(uint32_t d) {
    return d && !(d & (d - 1));
}

void kvs_codes_rotate(const kvs_codes_t *codes, uint32_t d, const float *x,
                      float *out) {
    kvs_rng_t s = {codes->seed};
    uint64_t bits = 0;
    for (uint32_t j = 0; j < d; j++) {
        if (j % 64 == 0)
            bits = kvs_rng_next(&s);
        out[j] = (bits >> (j % 64)) & 1 ? -x[j] : x[j];
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

size_t kvs_codes_bytes(uint32_t n, uint32_t C, uint32_t d) {
    return sizeof(kvs_codes_t) + 4 * (size_t)d * sizeof(float) +
           (size_t)n * (d / 2) + (size_t)C * d + (size_t)C * sizeof(float);
}

/* Offset and step per dim of rows x [n][d] for `levels` levels. */
static void fit_range(const float *x, uint32_t n, uint32_t d, int levels,
                      float *lo, float *step) {
    for (uint32_t j = 0; j < d; j++) {
        float mn = x[j], mx = x[j];
        for (uint32_t i = 1; i < n; i++) {
            float v = x[(size_t)i * d + j];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        lo[j] = mn;
        step[j] = (mx - mn) / (float)(levels - 1);
    }
}

static inline uint32_t quant(float v, float lo, float step, uint32_t top) {
    if (!(step > 0))
        return 0;
    float c = rintf((v - lo) / step);
    /* !(c > 0) also catches NaN, whose conversion would be undefined. */
    return !(c > 0) ? 0 : c >= (float)top ? top : (uint32_t)c;
}

int kvs_segment_build_codes(kvs_segment_t *seg, uint64_t seed) {
    if (!seg)
        return KVS_EINVAL;
    const uint32_t d = seg->d, n = seg->n_tokens, C = seg->n_clusters;
    if (d % 32 || d > CODES_MAX_D)
        return 0;
    int rc = KVS_ENOMEM;
    float *xr = malloc(sizeof(*xr) * (size_t)n * d);
    float *cr = malloc(sizeof(*cr) * (size_t)C * d);
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

    const size_t row = kvs_dtype_size(seg->dtype) * d;
    for (uint32_t i = 0; i < n; i++) {
        float *x = xr + (size_t)i * d;
        kvs_to_f32(seg->dtype, (const char *)seg->keys + row * i, x, d);
        kvs_codes_rotate(c, d, x, x);
    }
    for (uint32_t k = 0; k < C; k++) {
        float *x = cr + (size_t)k * d;
        kvs_to_f32(seg->dtype, (const char *)seg->centroids + row * k, x, d);
        kvs_codes_rotate(c, d, x, x);
    }
    fit_range(xr, n, d, 16, c->lo, c->step);
    fit_range(cr, C, d, 256, c->clo, c->cstep);

    uint32_t code[CODES_MAX_D];
    for (uint32_t i = 0; i < n; i++) {
        const float *x = xr + (size_t)i * d;
        for (uint32_t j = 0; j < d; j++)
            code[j] = quant(x[j], c->lo[j], c->step[j], 15);
        uint8_t *r = c->keys + (size_t)i * (d / 2);
        for (uint32_t b = 0; b < d; b += 32)
            for (uint32_t j = 0; j < 16; j++)
                r[b / 2 + j] = (uint8_t)(code[b + j] | code[b + 16 + j] << 4);
    }
    for (uint32_t k = 0; k < C; k++) {
        const float *x = cr + (size_t)k * d;
        for (uint32_t j = 0; j < d; j++)
            c->centroids[(size_t)k * d + j] =
                (uint8_t)quant(x[j], c->clo[j], c->cstep[j], 255);
        /* The rotation is orthonormal: distances are the raw ones. */
        double ss = 0;
        for (uint32_t s = seg->offsets[k]; s < seg->offsets[k + 1]; s++)
            for (uint32_t j = 0; j < d; j++) {
                double e = (double)xr[(size_t)s * d + j] - x[j];
                ss += e * e;
            }
        uint32_t m = seg->offsets[k + 1] - seg->offsets[k];
        c->spread[k] = m ? (float)sqrt(ss / ((double)m * d)) : 0.0f;
    }
    kvs_codes_free(seg->codes);
    seg->codes = c;
    c = NULL;
    rc = 0;
err:
    kvs_codes_free(c);
    free(xr);
    free(cr);
    return rc;
}
