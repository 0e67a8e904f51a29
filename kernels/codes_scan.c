/*
 * codes_scan.c: dot products of an fp32 weight vector with rows of small
 * unsigned integer codes (the wave index's 4-bit key codes and 8-bit
 * centroid codes, index/codes.c), scalar reference and the run-time choice
 * of the AVX2 versions in codes_scan_avx2.c. Kept apart from kernels.c so
 * that the scan kernels build and dispatch on their own.
 */
#include "kvs_kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef void (*code_fn)(const float *, const uint8_t *, size_t, uint32_t, float,
                        float *);
typedef void (*code_pair_fn)(const float *, const float *, const uint8_t *,
                             size_t, uint32_t, float, float, float *, float *);

/* codes_scan_avx2.c: the AVX2+FMA versions; 1 when the CPU runs them. */
int kvs__code_scan_avx2(code_fn *c4, code_fn *c8, code_pair_fn *c4p);

static void code4_scalar(const float *w, const uint8_t *codes, size_t n,
                         uint32_t d, float bias, float *out) {
    const size_t rb = d / 2;
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * rb;
        float s = 0;
        for (uint32_t b = 0; b < d; b += 32) {
            const uint8_t *blk = r + b / 2;
            for (uint32_t i = 0; i < 16; i++) {
                s += w[b + i] * (float)(blk[i] & 15);
                s += w[b + 16 + i] * (float)(blk[i] >> 4);
            }
        }
        out[j] = bias + s;
    }
}

static void code8_scalar(const float *w, const uint8_t *codes, size_t n,
                         uint32_t d, float bias, float *out) {
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * d;
        float s = 0;
        for (uint32_t i = 0; i < d; i++)
            s += w[i] * (float)r[i];
        out[j] = bias + s;
    }
}

static void code4_pair_scalar(const float *w, const float *w2,
                              const uint8_t *codes, size_t n, uint32_t d,
                              float bias, float bias2, float *out,
                              float *out2) {
    code4_scalar(w, codes, n, d, bias, out);
    code4_scalar(w2, codes, n, d, bias2, out2);
}

static code_fn g_c4 = code4_scalar, g_c8 = code8_scalar;
static code_pair_fn g_c4p = code4_pair_scalar;
static const char *g_isa = "scalar";
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void pick(void) {
    const char *force = getenv("KVS_FORCE_SCALAR");
    if (force && *force && strcmp(force, "0"))
        return;
    code_fn c4, c8;
    code_pair_fn c4p;
    if (kvs__code_scan_avx2(&c4, &c8, &c4p)) {
        g_c4 = c4;
        g_c8 = c8;
        g_c4p = c4p;
        g_isa = "avx2";
    }
}

const char *kvs_code_scan_isa(void) {
    pthread_once(&g_once, pick);
    return g_isa;
}

void kvs_code4_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out) {
    pthread_once(&g_once, pick);
    g_c4(w, codes, n, d, bias, out);
}

void kvs_code4_dot_rows_multi(const float *w, size_t w_stride, uint32_t g,
                              const float *bias, size_t bias_stride,
                              const uint8_t *codes, size_t n, uint32_t d,
                              float *out, size_t out_stride) {
    pthread_once(&g_once, pick);
    uint32_t i = 0;
    for (; i + 2 <= g; i += 2)
        g_c4p(w + i * w_stride, w + (i + 1) * w_stride, codes, n, d,
              bias[i * bias_stride], bias[(i + 1) * bias_stride],
              out + i * out_stride, out + (i + 1) * out_stride);
    if (i < g)
        g_c4(w + i * w_stride, codes, n, d, bias[i * bias_stride],
             out + i * out_stride);
}

void kvs_code8_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out) {
    pthread_once(&g_once, pick);
    g_c8(w, codes, n, d, bias, out);
}
