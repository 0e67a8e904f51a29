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

/* codes_scan_avx2.c: the AVX2+FMA versions; 1 when the CPU runs them. */
int kvs__code_scan_avx2(code_fn *c4, code_fn *c8);

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

static code_fn g_c4 = code4_scalar, g_c8 = code8_scalar;
static const char *g_isa = "scalar";
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void pick(void) {
    const char *force = getenv("KVS_FORCE_SCALAR");
    if (force && *force && strcmp(force, "0"))
        return;
    code_fn c4, c8;
    if (kvs__code_scan_avx2(&c4, &c8)) {
        g_c4 = c4;
        g_c8 = c8;
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

void kvs_code8_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out) {
    pthread_once(&g_once, pick);
    g_c8(w, codes, n, d, bias, out);
}
