/*
 * kv_synth.h: synthetic keys, values and decoder-like queries for the
 * engine's GPU tests and benchmark (tests/gpu/test_engine_gpu.c,
 * bench/engine_gpu/bench_engine_gpu.c), header-only.
 *
 * Keys lie around n_centres centres per KV head plus a per-head offset (as
 * real keys do); values are random; queries aim at one centre of their KV
 * head, scaled and with their own noise (decoder queries are not keys).
 * Each generator has its own xorshift state, so a seed replays its data.
 * Real-model data: bench_gpu --trace and bench/accuracy.
 */
#ifndef KVS_TESTS_GPU_KV_SYNTH_H
#define KVS_TESTS_GPU_KV_SYNTH_H

#include "kvs_common.h"
#include "kvs_kernels.h"
#include "kvs_rng.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define KV_SYNTH_D 128

typedef struct kv_synth_s {
    kvs_rng_t rng;
    uint32_t kvh, n_centres;
    float *centres; /* [kvh][n_centres][D] */
    float *offset;  /* [kvh][D] */
} kv_synth_t;

static inline double kv_synth_urand(kv_synth_t *g) {
    return kvs_rng_uniform(&g->rng);
}

static inline float kv_synth_nrand(kv_synth_t *g) {
    return kvs_rng_normal(&g->rng);
}

/* Returns 0, or -1 when out of memory. */
static inline int kv_synth_init(kv_synth_t *g, uint32_t kvh, uint32_t n_centres,
                                uint64_t seed) {
    const size_t D = KV_SYNTH_D;
    g->rng.s = seed;
    g->kvh = kvh;
    g->n_centres = n_centres;
    g->centres = malloc((size_t)kvh * n_centres * D * sizeof(float));
    g->offset = malloc((size_t)kvh * D * sizeof(float));
    if (!g->centres || !g->offset)
        return -1;
    for (size_t i = 0; i < (size_t)kvh * n_centres * D; i++)
        g->centres[i] = 1.5f * kv_synth_nrand(g);
    for (size_t i = 0; i < (size_t)kvh * D; i++)
        g->offset[i] = 2.0f * kv_synth_nrand(g);
    return 0;
}

static inline void kv_synth_free(kv_synth_t *g) {
    free(g->centres);
    free(g->offset);
    g->centres = g->offset = NULL;
}

/* n floats into dtype elements at dst. */
static inline void kv_synth_put(kvs_dtype_t dt, void *dst, const float *src,
                                size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (dt == KVS_DTYPE_F32)
            ((float *)dst)[i] = src[i];
        else if (dt == KVS_DTYPE_F16)
            ((uint16_t *)dst)[i] = kvs_f32_to_f16(src[i]);
        else
            ((uint16_t *)dst)[i] = kvs_f32_to_bf16(src[i]);
    }
}

/* n tokens of keys and values, [n][kvh][D] of dtype each. */
static inline void kv_synth_rows(kv_synth_t *g, kvs_dtype_t dt, uint32_t n,
                                 void *keys, void *values) {
    const size_t D = KV_SYNTH_D, es = kvs_dtype_size(dt);
    float row[KV_SYNTH_D];
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t h = 0; h < g->kvh; h++) {
            const uint32_t c =
                (uint32_t)(kv_synth_urand(g) * g->n_centres) % g->n_centres;
            const float *cen = g->centres + ((size_t)h * g->n_centres + c) * D;
            for (size_t k = 0; k < D; k++)
                row[k] =
                    g->offset[h * D + k] + cen[k] + 0.5f * kv_synth_nrand(g);
            const size_t at = ((size_t)t * g->kvh + h) * D * es;
            kv_synth_put(dt, (char *)keys + at, row, D);
            for (size_t k = 0; k < D; k++)
                row[k] = kv_synth_nrand(g);
            kv_synth_put(dt, (char *)values + at, row, D);
        }
}

/* Queries [qh][D] fp32, qh a multiple of kvh (GQA). */
static inline void kv_synth_queries(kv_synth_t *g, uint32_t qh, float *q) {
    const size_t D = KV_SYNTH_D;
    const uint32_t group = qh / g->kvh;
    for (uint32_t i = 0; i < qh; i++) {
        const uint32_t h = i / group;
        const uint32_t c =
            (uint32_t)(kv_synth_urand(g) * g->n_centres) % g->n_centres;
        const float *cen = g->centres + ((size_t)h * g->n_centres + c) * D;
        for (size_t k = 0; k < D; k++)
            q[(size_t)i * D + k] = 0.35f * cen[k] + 0.3f * kv_synth_nrand(g);
    }
}

/* ||a - b|| / ||b|| in double. */
static inline double kv_synth_rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static inline int kv_synth_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#endif /* KVS_TESTS_GPU_KV_SYNTH_H */
