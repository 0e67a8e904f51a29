/*
 * codes_scan.c: dot products of an fp32 weight vector with rows of small
 * unsigned integer codes (the wave index's 4-bit key codes and 8-bit
 * centroid codes, index/codes.c), scalar reference and the run-time choice
 * of the AVX2 versions in codes_scan_avx2.c. Kept apart from kernels.c so
 * that the scan kernels build and dispatch on their own.
 */
#include "codes_scan_int.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The place in kvs_code4_weights_q8's order of dim t. Per 64 dims: low
 * nibbles (dims 0-15 and 32-47 of the 64) first, then high ones. */
static uint32_t q8_place(uint32_t t, uint32_t d) {
    uint32_t base = t & ~63u, r = t & 63;
    if (base + 64 > d)
        return t;                       /* a last block of 32: in order */
    uint32_t blk = r / 32, in = r % 32; /* block of 32, dim within it */
    return base + (in < 16 ? 0 : 32) + blk * 16 + in % 16;
}

void kvs__weights_q8_scalar(const float *a, const float *b, float mul,
                            uint32_t d, int8_t *q8, float *scale) {
    float mx = 0;
    for (uint32_t t = 0; t < d; t++) {
        float w = a[t] * b[t] * mul;
        w = w < 0 ? -w : w;
        mx = w > mx ? w : mx;
    }
    float inv = mx > 0 ? 127.0f / mx : 0.0f;
    for (uint32_t t = 0; t < d; t++) {
        long r = lrintf(a[t] * b[t] * mul * inv); /* to nearest even */
        q8[q8_place(t, d)] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    *scale = mx / 127.0f;
}

int32_t kvs__q16_max(uint32_t d) {
    int64_t m = ((int64_t)1 << 31) / (255 * (int64_t)(d ? d : 1)) - 1;
    return m > 32767 ? 32767 : (int32_t)m;
}

void kvs__weights_q16_scalar(const float *a, const float *b, float mul,
                             uint32_t d, int16_t *q16, float *scale) {
    float mx = 0;
    for (uint32_t t = 0; t < d; t++) {
        float w = a[t] * b[t] * mul;
        w = w < 0 ? -w : w;
        mx = w > mx ? w : mx;
    }
    const float top = (float)kvs__q16_max(d);
    float inv = mx > 0 ? top / mx : 0.0f;
    for (uint32_t t = 0; t < d; t++) {
        long r = lrintf(a[t] * b[t] * mul * inv);
        q16[t] = (int16_t)(r > top ? top : r < -top ? -top : r);
    }
    *scale = mx / top;
}

void kvs__code8_q16_scalar(const int16_t *q16, size_t q16_stride, uint32_t g,
                           const float *scale, const float *bias,
                           const uint8_t *codes, size_t n, uint32_t d,
                           float *out, size_t out_stride) {
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * d;
        for (uint32_t i = 0; i < g; i++) {
            const int16_t *w = q16 + i * q16_stride;
            int32_t s = 0;
            for (uint32_t t = 0; t < d; t++)
                s += w[t] * r[t];
            out[i * out_stride + j] = bias[i] + scale[i] * (float)s;
        }
    }
}

void kvs__code4_q8_scalar(const int8_t *q8, size_t q8_stride, uint32_t g,
                          const float *scale, const float *bias,
                          const uint8_t *codes, size_t n, uint32_t d,
                          float *out, size_t out_stride) {
    const size_t rb = d / 2;
    for (size_t j = 0; j < n; j++) {
        const uint8_t *r = codes + j * rb;
        for (uint32_t i = 0; i < g; i++) {
            const int8_t *w = q8 + i * q8_stride;
            int32_t s = 0;
            for (uint32_t b = 0; b < d; b += 32)
                for (uint32_t u = 0; u < 16; u++) {
                    uint8_t c = r[b / 2 + u];
                    s += w[q8_place(b + u, d)] * (c & 15);
                    s += w[q8_place(b + 16 + u, d)] * (c >> 4);
                }
            out[i * out_stride + j] = bias[i] + scale[i] * (float)s;
        }
    }
}

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

static kvs__code_scan_table_t scan = {
    .c4 = code4_scalar,
    .c8 = code8_scalar,
    .c4_pair = code4_pair_scalar,
    .c4_q8 = kvs__code4_q8_scalar,
    .weights_q8 = kvs__weights_q8_scalar,
    .c8_q16 = kvs__code8_q16_scalar,
    .weights_q16 = kvs__weights_q16_scalar,
};
static const char *g_isa = "scalar";
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void pick(void) {
    const char *force = getenv("KVS_FORCE_SCALAR");
    if (force && *force && strcmp(force, "0"))
        return;
    kvs__code_scan_table_t t = scan;
    if (kvs__code_scan_avx2(&t)) {
        scan = t;
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
    scan.c4(w, codes, n, d, bias, out);
}

void kvs_code4_dot_rows_multi(const float *w, size_t w_stride, uint32_t g,
                              const float *bias, size_t bias_stride,
                              const uint8_t *codes, size_t n, uint32_t d,
                              float *out, size_t out_stride) {
    pthread_once(&g_once, pick);
    uint32_t i = 0;
    for (; i + 2 <= g; i += 2)
        scan.c4_pair(w + i * w_stride, w + (i + 1) * w_stride, codes, n, d,
                     bias[i * bias_stride], bias[(i + 1) * bias_stride],
                     out + i * out_stride, out + (i + 1) * out_stride);
    if (i < g)
        scan.c4(w + i * w_stride, codes, n, d, bias[i * bias_stride],
                out + i * out_stride);
}

void kvs_code8_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out) {
    pthread_once(&g_once, pick);
    scan.c8(w, codes, n, d, bias, out);
}

void kvs_code4_dot_rows_q8(const int8_t *q8, size_t q8_stride, uint32_t g,
                           const float *scale, const float *bias,
                           const uint8_t *codes, size_t n, uint32_t d,
                           float *out, size_t out_stride) {
    pthread_once(&g_once, pick);
    scan.c4_q8(q8, q8_stride, g, scale, bias, codes, n, d, out, out_stride);
}

void kvs_code4_weights_q8(const float *a, const float *b, float mul, uint32_t d,
                          int8_t *q8, float *scale) {
    pthread_once(&g_once, pick);
    scan.weights_q8(a, b, mul, d, q8, scale);
}

void kvs_code8_dot_rows_q16(const int16_t *q16, size_t q16_stride, uint32_t g,
                            const float *scale, const float *bias,
                            const uint8_t *codes, size_t n, uint32_t d,
                            float *out, size_t out_stride) {
    pthread_once(&g_once, pick);
    scan.c8_q16(q16, q16_stride, g, scale, bias, codes, n, d, out, out_stride);
}

void kvs_code8_weights_q16(const float *a, const float *b, float mul,
                           uint32_t d, int16_t *q16, float *scale) {
    pthread_once(&g_once, pick);
    scan.weights_q16(a, b, mul, d, q16, scale);
}
