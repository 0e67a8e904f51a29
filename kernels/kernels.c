/*
 * kernels.c: portable scalar kernels, and the run-time choice between them
 * and the AVX2 versions in kernels_avx2.c. The scalar code is the reference
 * the AVX2 code is tested against, so it favours plain loops over speed.
 */
#include "kernels_int.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

float kvs_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalise into a float. */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t kvs_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* Inf or NaN; keep NaN quiet and non-zero */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to Inf */
        return (uint16_t)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* below the smallest normal half */
        if (absx < 0x33000000u)
            return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14 .. 24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((absx >> 13) - (112u << 10));
    uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1)))
        half++;
    return (uint16_t)(sign | half);
}

float kvs_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t kvs_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

static inline float load_elem(kvs_dtype_t dtype, const void *p, size_t i) {
    switch (dtype) {
    case KVS_DTYPE_F16:
        return kvs_f16_to_f32(((const uint16_t *)p)[i]);
    case KVS_DTYPE_BF16:
        return kvs_bf16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

static void scalar_to_f32(kvs_dtype_t dtype, const void *src, float *dst,
                          size_t n) {
    if (dtype == KVS_DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (size_t i = 0; i < n; i++)
        dst[i] = load_elem(dtype, src, i);
}

static void scalar_from_f32(kvs_dtype_t dtype, const float *src, void *dst,
                            size_t n) {
    uint16_t *h = dst;
    switch (dtype) {
    case KVS_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            h[i] = kvs_f32_to_f16(src[i]);
        break;
    case KVS_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            h[i] = kvs_f32_to_bf16(src[i]);
        break;
    default:
        memcpy(dst, src, n * sizeof(float));
    }
}

static void scalar_dot_rows(kvs_dtype_t dtype, const float *q, uint32_t nq,
                            const void *keys, size_t n, uint32_t d, float scale,
                            float *out, size_t ld) {
    size_t esz = kvs_dtype_size(dtype);
    for (size_t j = 0; j < n; j++) {
        const char *row = (const char *)keys + j * d * esz;
        for (uint32_t i = 0; i < nq; i++) {
            float s = 0;
            for (uint32_t t = 0; t < d; t++)
                s += q[i * d + t] * load_elem(dtype, row, t);
            out[i * ld + j] = s * scale;
        }
    }
}

static void scalar_axpy_rows(kvs_dtype_t dtype, const float *w, size_t ldw,
                             uint32_t nq, const void *vals, size_t n,
                             uint32_t d, float *acc) {
    size_t esz = kvs_dtype_size(dtype);
    for (size_t j = 0; j < n; j++) {
        const char *row = (const char *)vals + j * d * esz;
        for (uint32_t i = 0; i < nq; i++) {
            float wij = w[i * ldw + j];
            if (wij == 0.0f)
                continue;
            for (uint32_t t = 0; t < d; t++)
                acc[i * d + t] += wij * load_elem(dtype, row, t);
        }
    }
}

static void scalar_dot_gather(kvs_dtype_t dtype, const float *q, uint32_t nq,
                              const void *const *rows, size_t n, uint32_t d,
                              float scale, float *out, size_t ld) {
    for (size_t j = 0; j < n; j++)
        scalar_dot_rows(dtype, q, nq, rows[j], 1, d, scale, out + j, ld);
}

static void scalar_axpy_gather(kvs_dtype_t dtype, const float *w, size_t ldw,
                               uint32_t nq, const void *const *rows, size_t n,
                               uint32_t d, float *acc) {
    for (size_t j = 0; j < n; j++)
        scalar_axpy_rows(dtype, w + j, ldw, nq, rows[j], 1, d, acc);
}

static float scalar_max(const float *x, size_t n) {
    float m = -INFINITY;
    for (size_t i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

static float scalar_exp_sum(float *x, size_t n, float m) {
    float s = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}

static kvs__kernel_table_t table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void table_init(void) {
    const char *force = getenv("KVS_FORCE_SCALAR");
    if ((force == NULL || strcmp(force, "1") != 0) &&
        kvs__kernels_avx2_init(&table))
        return;
    table.isa = "scalar";
    table.to_f32 = scalar_to_f32;
    table.from_f32 = scalar_from_f32;
    table.dot_rows = scalar_dot_rows;
    table.axpy_rows = scalar_axpy_rows;
    table.dot_gather = scalar_dot_gather;
    table.axpy_gather = scalar_axpy_gather;
    table.exp_sum = scalar_exp_sum;
    table.max = scalar_max;
}

static inline const kvs__kernel_table_t *kt(void) {
    pthread_once(&table_once, table_init);
    return &table;
}

const char *kvs_kernels_isa(void) {
    return kt()->isa;
}

void kvs_to_f32(kvs_dtype_t dtype, const void *src, float *dst, size_t n) {
    kt()->to_f32(dtype, src, dst, n);
}

void kvs_from_f32(kvs_dtype_t dtype, const float *src, void *dst, size_t n) {
    kt()->from_f32(dtype, src, dst, n);
}

int kvs_all_finite(kvs_dtype_t dtype, const void *src, size_t n) {
    /* Loads through memcpy: appended rows may sit at any address (kvstored
     * hands the engine keys and values inside the received frame, where
     * protobuf put them); on x86 these are plain unaligned loads. */
    const unsigned char *p = src;
    uint32_t bad = 0;
    if (dtype == KVS_DTYPE_F32) {
        for (size_t i = 0; i < n; i++) {
            uint32_t x;
            memcpy(&x, p + 4 * i, 4);
            bad |= (uint32_t)((x & 0x7f800000u) == 0x7f800000u);
        }
        return !bad;
    }
    uint16_t mask = dtype == KVS_DTYPE_F16 ? 0x7c00 : 0x7f80;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        bad |= (uint32_t)((h & mask) == mask);
    }
    return !bad;
}

void kvs_dot_rows(kvs_dtype_t dtype, const float *q, uint32_t nq,
                  const void *keys, size_t n, uint32_t d, float scale,
                  float *out, size_t ld) {
    kt()->dot_rows(dtype, q, nq, keys, n, d, scale, out, ld);
}

void kvs_axpy_rows(kvs_dtype_t dtype, const float *w, size_t ldw, uint32_t nq,
                   const void *vals, size_t n, uint32_t d, float *acc) {
    kt()->axpy_rows(dtype, w, ldw, nq, vals, n, d, acc);
}

void kvs_dot_gather(kvs_dtype_t dtype, const float *q, uint32_t nq,
                    const void *const *rows, size_t n, uint32_t d, float scale,
                    float *out, size_t ld) {
    kt()->dot_gather(dtype, q, nq, rows, n, d, scale, out, ld);
}

void kvs_axpy_gather(kvs_dtype_t dtype, const float *w, size_t ldw, uint32_t nq,
                     const void *const *rows, size_t n, uint32_t d,
                     float *acc) {
    kt()->axpy_gather(dtype, w, ldw, nq, rows, n, d, acc);
}

float kvs_max(const float *x, size_t n) {
    return kt()->max(x, n);
}

float kvs_exp_sum(float *x, size_t n, float m) {
    if (m == -INFINITY) { /* every score is -inf: no mass at all */
        memset(x, 0, n * sizeof(float));
        return 0;
    }
    return kt()->exp_sum(x, n, m);
}
