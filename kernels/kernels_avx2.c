/*
 * kernels_avx2.c: AVX2 + FMA + F16C versions of the CPU kernels. Compiled
 * with -mavx2 -mfma -mf16c; nothing here runs before kvs__kernels_avx2_init()
 * has checked that the CPU has those extensions.
 *
 * The hot loops are dot_rows (scores of a GQA group of queries against key
 * rows) and axpy_rows (weighted sums of value rows). Both read each key or
 * value row once for all queries of the group, since decode attention is
 * bound by memory traffic, not arithmetic.
 */
#include "kernels_int.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m256 load8(kvs_dtype_t dtype, const void *p, size_t i) {
    switch (dtype) {
    case KVS_DTYPE_F16:
        return _mm256_cvtph_ps(
            _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    case KVS_DTYPE_BF16:
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                                  (const __m128i *)((const uint16_t *)p + i))),
                              16));
    default:
        return _mm256_loadu_ps((const float *)p + i);
    }
}

ALWAYS_INLINE float load1(kvs_dtype_t dtype, const void *p, size_t i) {
    switch (dtype) {
    case KVS_DTYPE_F16:
        return _cvtsh_ss(((const uint16_t *)p)[i]);
    case KVS_DTYPE_BF16:
        return kvs_bf16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

ALWAYS_INLINE float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

static void avx2_to_f32(kvs_dtype_t dtype, const void *src, float *dst,
                        size_t n) {
    if (dtype == KVS_DTYPE_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, load8(dtype, src, i));
    for (; i < n; i++)
        dst[i] = load1(dtype, src, i);
}

static void avx2_from_f32(kvs_dtype_t dtype, const float *src, void *dst,
                          size_t n) {
    uint16_t *h = dst;
    size_t i = 0;
    switch (dtype) {
    case KVS_DTYPE_F16:
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(h + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                             _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++)
            h[i] = kvs_f32_to_f16(src[i]);
        break;
    case KVS_DTYPE_BF16:
        for (; i < n; i++)
            h[i] = kvs_f32_to_bf16(src[i]);
        break;
    default:
        memcpy(dst, src, n * sizeof(float));
    }
}

/* One key row against NQ queries; d8 = d rounded down to a multiple of 8. */
ALWAYS_INLINE void dot_row_q(kvs_dtype_t dtype, const float *q, uint32_t nq,
                             const void *row, uint32_t d, float scale,
                             float *out, size_t ld, size_t j) {
    __m256 acc[KVS_KERNEL_MAX_Q];
    for (uint32_t i = 0; i < nq; i++)
        acc[i] = _mm256_setzero_ps();
    uint32_t t = 0;
    for (; t + 8 <= d; t += 8) {
        __m256 k = load8(dtype, row, t);
        for (uint32_t i = 0; i < nq; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * d + t), k, acc[i]);
    }
    for (uint32_t i = 0; i < nq; i++) {
        float s = hsum(acc[i]);
        for (uint32_t u = t; u < d; u++)
            s += q[i * d + u] * load1(dtype, row, u);
        out[i * ld + j] = s * scale;
    }
}

/* Four key rows against one query: four independent FMA chains. */
ALWAYS_INLINE void dot_4rows_1q(kvs_dtype_t dtype, const float *q,
                                const void *keys, size_t j, uint32_t d,
                                float scale, float *out) {
    size_t esz = kvs_dtype_size(dtype);
    const char *r0 = (const char *)keys + (j + 0) * d * esz;
    const char *r1 = (const char *)keys + (j + 1) * d * esz;
    const char *r2 = (const char *)keys + (j + 2) * d * esz;
    const char *r3 = (const char *)keys + (j + 3) * d * esz;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    uint32_t t = 0;
    for (; t + 8 <= d; t += 8) {
        __m256 qv = _mm256_loadu_ps(q + t);
        a0 = _mm256_fmadd_ps(qv, load8(dtype, r0, t), a0);
        a1 = _mm256_fmadd_ps(qv, load8(dtype, r1, t), a1);
        a2 = _mm256_fmadd_ps(qv, load8(dtype, r2, t), a2);
        a3 = _mm256_fmadd_ps(qv, load8(dtype, r3, t), a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; t < d; t++) {
        s0 += q[t] * load1(dtype, r0, t);
        s1 += q[t] * load1(dtype, r1, t);
        s2 += q[t] * load1(dtype, r2, t);
        s3 += q[t] * load1(dtype, r3, t);
    }
    out[j] = s0 * scale;
    out[j + 1] = s1 * scale;
    out[j + 2] = s2 * scale;
    out[j + 3] = s3 * scale;
}

/* Sums of four accumulators at once: lane i of the result = hsum(a_i). */
ALWAYS_INLINE __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s01 = _mm256_hadd_ps(a0, a1);
    __m256 s23 = _mm256_hadd_ps(a2, a3);
    __m256 s = _mm256_hadd_ps(s01, s23);
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Two key rows against four queries: the q loads are shared by both rows
 * and the eight sums are reduced four at a time. d % 8 == 0. */
ALWAYS_INLINE void dot_2rows_4q(kvs_dtype_t dtype, const float *q,
                                const void *r0, const void *r1, uint32_t d,
                                float scale, float *out, size_t ld, size_t j) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    for (uint32_t t = 0; t < d; t += 8) {
        __m256 k0 = load8(dtype, r0, t), k1 = load8(dtype, r1, t);
        __m256 q0 = _mm256_loadu_ps(q + t);
        a0 = _mm256_fmadd_ps(q0, k0, a0);
        b0 = _mm256_fmadd_ps(q0, k1, b0);
        __m256 q1 = _mm256_loadu_ps(q + d + t);
        a1 = _mm256_fmadd_ps(q1, k0, a1);
        b1 = _mm256_fmadd_ps(q1, k1, b1);
        __m256 q2 = _mm256_loadu_ps(q + 2 * d + t);
        a2 = _mm256_fmadd_ps(q2, k0, a2);
        b2 = _mm256_fmadd_ps(q2, k1, b2);
        __m256 q3 = _mm256_loadu_ps(q + 3 * d + t);
        a3 = _mm256_fmadd_ps(q3, k0, a3);
        b3 = _mm256_fmadd_ps(q3, k1, b3);
    }
    float sa[4], sb[4];
    __m128 sc = _mm_set1_ps(scale);
    _mm_storeu_ps(sa, _mm_mul_ps(hsum4(a0, a1, a2, a3), sc));
    _mm_storeu_ps(sb, _mm_mul_ps(hsum4(b0, b1, b2, b3), sc));
    for (int i = 0; i < 4; i++) {
        out[i * ld + j] = sa[i];
        out[i * ld + j + 1] = sb[i];
    }
}

ALWAYS_INLINE void dot_rows_t(kvs_dtype_t dtype, const float *q, uint32_t nq,
                              const void *keys, size_t n, uint32_t d,
                              float scale, float *out, size_t ld) {
    size_t esz = kvs_dtype_size(dtype);
    size_t rb = (size_t)d * esz;
    size_t j = 0;
    if (nq == 1)
        for (; j + 4 <= n; j += 4)
            dot_4rows_1q(dtype, q, keys, j, d, scale, out);
    if (nq == 4 && (d & 7) == 0)
        for (; j + 2 <= n; j += 2) {
            const char *r0 = (const char *)keys + j * rb;
            __builtin_prefetch(r0 + 8 * rb);
            __builtin_prefetch(r0 + 9 * rb);
            dot_2rows_4q(dtype, q, r0, r0 + rb, d, scale, out, ld, j);
        }
    for (; j < n; j++) {
        if (j + 8 < n)
            __builtin_prefetch((const char *)keys + (j + 8) * rb);
        dot_row_q(dtype, q, nq, (const char *)keys + j * rb, d, scale, out, ld,
                  j);
    }
}

/* dot_rows_t over rows given by address: the rows of a shortlist are
 * scattered, so each is prefetched GATHER_AHEAD rows before its use (the
 * hardware prefetcher cannot guess the next address). */
enum { GATHER_AHEAD = 6 };

ALWAYS_INLINE void prefetch_row(const void *p, size_t rb) {
    for (size_t o = 0; o < rb; o += 64)
        __builtin_prefetch((const char *)p + o);
}

ALWAYS_INLINE void dot_gather_t(kvs_dtype_t dtype, const float *q, uint32_t nq,
                                const void *const *rows, size_t n, uint32_t d,
                                float scale, float *out, size_t ld) {
    size_t rb = (size_t)d * kvs_dtype_size(dtype);
    for (size_t j = 0; j < n && j < GATHER_AHEAD; j++)
        prefetch_row(rows[j], rb);
    size_t j = 0;
    if (nq == 4 && (d & 7) == 0)
        for (; j + 2 <= n; j += 2) {
            if (j + GATHER_AHEAD < n)
                prefetch_row(rows[j + GATHER_AHEAD], rb);
            if (j + GATHER_AHEAD + 1 < n)
                prefetch_row(rows[j + GATHER_AHEAD + 1], rb);
            dot_2rows_4q(dtype, q, rows[j], rows[j + 1], d, scale, out, ld, j);
        }
    for (; j < n; j++) {
        if (j + GATHER_AHEAD < n)
            prefetch_row(rows[j + GATHER_AHEAD], rb);
        dot_row_q(dtype, q, nq, rows[j], d, scale, out, ld, j);
    }
}

#define DISPATCH_DTYPE(fn, dtype, ...)                                         \
    switch (dtype) {                                                           \
    case KVS_DTYPE_F16:                                                        \
        fn(KVS_DTYPE_F16, __VA_ARGS__);                                        \
        break;                                                                 \
    case KVS_DTYPE_BF16:                                                       \
        fn(KVS_DTYPE_BF16, __VA_ARGS__);                                       \
        break;                                                                 \
    default:                                                                   \
        fn(KVS_DTYPE_F32, __VA_ARGS__);                                        \
    }

/* Specialise on the common group sizes so the accumulators stay in
 * registers. */
#define DOT_NQ(dt, q, nq, keys, n, d, scale, out, ld)                          \
    switch (nq) {                                                              \
    case 1:                                                                    \
        dot_rows_t(dt, q, 1, keys, n, d, scale, out, ld);                      \
        break;                                                                 \
    case 2:                                                                    \
        dot_rows_t(dt, q, 2, keys, n, d, scale, out, ld);                      \
        break;                                                                 \
    case 4:                                                                    \
        dot_rows_t(dt, q, 4, keys, n, d, scale, out, ld);                      \
        break;                                                                 \
    case 8:                                                                    \
        dot_rows_t(dt, q, 8, keys, n, d, scale, out, ld);                      \
        break;                                                                 \
    default:                                                                   \
        dot_rows_t(dt, q, nq, keys, n, d, scale, out, ld);                     \
    }

static void avx2_dot_rows(kvs_dtype_t dtype, const float *q, uint32_t nq,
                          const void *keys, size_t n, uint32_t d, float scale,
                          float *out, size_t ld) {
    DISPATCH_DTYPE(DOT_NQ, dtype, q, nq, keys, n, d, scale, out, ld);
}

/*
 * acc[i][t..t+8] += sum_j w[i][j] * v[j][t..t+8], rows in blocks small
 * enough to stay in L1 while every 8-float column chunk walks over them.
 */
ALWAYS_INLINE const char *row_at(const void *vals, const void *const *rows,
                                 size_t j, size_t rb) {
    return rows ? (const char *)rows[j] : (const char *)vals + j * rb;
}

/* Rows are vals[j] (rows NULL) or rows[j]; a constant NULL folds away. */
ALWAYS_INLINE void axpy_any_t(kvs_dtype_t dtype, const float *w, size_t ldw,
                              uint32_t nq, const void *vals,
                              const void *const *rows, size_t n, uint32_t d,
                              float *acc) {
    enum { BLOCK = 32 };
    size_t esz = kvs_dtype_size(dtype);
    size_t rb = (size_t)d * esz;
    uint32_t d8 = d & ~7u;
    if (rows)
        for (size_t j = 0; j < n && j < BLOCK; j++)
            prefetch_row(rows[j], rb);
    for (size_t j0 = 0; j0 < n; j0 += BLOCK) {
        size_t j1 = j0 + BLOCK < n ? j0 + BLOCK : n;
        if (rows) /* the next block's rows while this one is summed */
            for (size_t j = j1; j < j1 + BLOCK && j < n; j++)
                prefetch_row(rows[j], rb);
        for (uint32_t t = 0; t < d8; t += 8) {
            __m256 a[KVS_KERNEL_MAX_Q];
            for (uint32_t i = 0; i < nq; i++)
                a[i] = _mm256_loadu_ps(acc + i * d + t);
            for (size_t j = j0; j < j1; j++) {
                __m256 v = load8(dtype, row_at(vals, rows, j, rb), t);
                for (uint32_t i = 0; i < nq; i++)
                    a[i] = _mm256_fmadd_ps(_mm256_set1_ps(w[i * ldw + j]), v,
                                           a[i]);
            }
            for (uint32_t i = 0; i < nq; i++)
                _mm256_storeu_ps(acc + i * d + t, a[i]);
        }
        for (uint32_t t = d8; t < d; t++)
            for (size_t j = j0; j < j1; j++) {
                float v = load1(dtype, row_at(vals, rows, j, rb), t);
                for (uint32_t i = 0; i < nq; i++)
                    acc[i * d + t] += w[i * ldw + j] * v;
            }
    }
}

ALWAYS_INLINE void axpy_rows_t(kvs_dtype_t dtype, const float *w, size_t ldw,
                               uint32_t nq, const void *vals, size_t n,
                               uint32_t d, float *acc) {
    axpy_any_t(dtype, w, ldw, nq, vals, NULL, n, d, acc);
}

ALWAYS_INLINE void axpy_gather_t(kvs_dtype_t dtype, const float *w, size_t ldw,
                                 uint32_t nq, const void *const *rows, size_t n,
                                 uint32_t d, float *acc) {
    axpy_any_t(dtype, w, ldw, nq, NULL, rows, n, d, acc);
}

#define AXPY_NQ(dt, w, ldw, nq, vals, n, d, acc)                               \
    switch (nq) {                                                              \
    case 1:                                                                    \
        axpy_rows_t(dt, w, ldw, 1, vals, n, d, acc);                           \
        break;                                                                 \
    case 2:                                                                    \
        axpy_rows_t(dt, w, ldw, 2, vals, n, d, acc);                           \
        break;                                                                 \
    case 4:                                                                    \
        axpy_rows_t(dt, w, ldw, 4, vals, n, d, acc);                           \
        break;                                                                 \
    case 8:                                                                    \
        axpy_rows_t(dt, w, ldw, 8, vals, n, d, acc);                           \
        break;                                                                 \
    default:                                                                   \
        axpy_rows_t(dt, w, ldw, nq, vals, n, d, acc);                          \
    }

static void avx2_axpy_rows(kvs_dtype_t dtype, const float *w, size_t ldw,
                           uint32_t nq, const void *vals, size_t n, uint32_t d,
                           float *acc) {
    DISPATCH_DTYPE(AXPY_NQ, dtype, w, ldw, nq, vals, n, d, acc);
}

#define DOT_GATHER_NQ(dt, q, nq, rows, n, d, scale, out, ld)                   \
    switch (nq) {                                                              \
    case 4:                                                                    \
        dot_gather_t(dt, q, 4, rows, n, d, scale, out, ld);                    \
        break;                                                                 \
    case 8:                                                                    \
        dot_gather_t(dt, q, 8, rows, n, d, scale, out, ld);                    \
        break;                                                                 \
    default:                                                                   \
        dot_gather_t(dt, q, nq, rows, n, d, scale, out, ld);                   \
    }

static void avx2_dot_gather(kvs_dtype_t dtype, const float *q, uint32_t nq,
                            const void *const *rows, size_t n, uint32_t d,
                            float scale, float *out, size_t ld) {
    DISPATCH_DTYPE(DOT_GATHER_NQ, dtype, q, nq, rows, n, d, scale, out, ld);
}

#define AXPY_GATHER_NQ(dt, w, ldw, nq, rows, n, d, acc)                        \
    switch (nq) {                                                              \
    case 4:                                                                    \
        axpy_gather_t(dt, w, ldw, 4, rows, n, d, acc);                         \
        break;                                                                 \
    case 8:                                                                    \
        axpy_gather_t(dt, w, ldw, 8, rows, n, d, acc);                         \
        break;                                                                 \
    default:                                                                   \
        axpy_gather_t(dt, w, ldw, nq, rows, n, d, acc);                        \
    }

static void avx2_axpy_gather(kvs_dtype_t dtype, const float *w, size_t ldw,
                             uint32_t nq, const void *const *rows, size_t n,
                             uint32_t d, float *acc) {
    DISPATCH_DTYPE(AXPY_GATHER_NQ, dtype, w, ldw, nq, rows, n, d, acc);
}

/* exp(x) for x in [-87.3, 88.7] with ~1 ulp error (Cephes polynomial);
 * below -87.3 the result is 0 so that masked scores (-inf) carry no mass. */
ALWAYS_INLINE __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.7f));
    __m256 fx =
        _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    __m256 x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

static float avx2_exp_sum(float *x, size_t n, float m) {
    __m256 mv = _mm256_set1_ps(m);
    __m256 s = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    float sum = hsum(s);
    if (i < n) {
        float buf[8];
        size_t r = n - i;
        for (size_t u = 0; u < 8; u++)
            buf[u] = u < r ? x[i + u] - m : -INFINITY;
        __m256 e = exp8(_mm256_loadu_ps(buf));
        _mm256_storeu_ps(buf, e);
        for (size_t u = 0; u < r; u++) {
            x[i + u] = buf[u];
            sum += buf[u];
        }
    }
    return sum;
}

/* Largest of x[0 .. n): NaN is never taken (as the scalar loop: a NaN
 * compares false), -inf for n == 0. */
static float avx2_max(const float *x, size_t n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    size_t i = 0;
    /* max_ps(a, b) returns b when either is NaN: x second keeps m */
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
        m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
    }
    m0 = _mm256_max_ps(m0, m1);
    float buf[8], m = -INFINITY;
    _mm256_storeu_ps(buf, m0);
    for (int k = 0; k < 8; k++)
        m = buf[k] > m ? buf[k] : m;
    for (; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

int kvs__kernels_avx2_init(kvs__kernel_table_t *t) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0;
    /* F16C has no __builtin_cpu_supports name in older GCCs: read CPUID. */
    unsigned a, b, c, d;
    __asm__ volatile("cpuid"
                     : "=a"(a), "=b"(b), "=c"(c), "=d"(d)
                     : "a"(1), "c"(0));
    if (!(c & (1u << 29)))
        return 0;
    t->isa = "avx2";
    t->to_f32 = avx2_to_f32;
    t->from_f32 = avx2_from_f32;
    t->dot_rows = avx2_dot_rows;
    t->axpy_rows = avx2_axpy_rows;
    t->dot_gather = avx2_dot_gather;
    t->axpy_gather = avx2_axpy_gather;
    t->exp_sum = avx2_exp_sum;
    t->max = avx2_max;
    return 1;
}
