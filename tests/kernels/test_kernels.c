/* test_kernels.c: the CPU kernels against plain double-precision loops. The
 * test runs twice under CTest: with the CPU's best ISA and with
 * KVS_FORCE_SCALAR=1. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvs_rng.h"
#include "kvs_kernels.h"

static kvs_rng_t rng = {88172645463325252ull};
static double urand(void) {
    return kvs_rng_uniform(&rng);
}

static void test_kernels_f16_roundtrip(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvs_f16_to_f32((uint16_t)h);
        if (isnan(f)) {
            assert_true(isnan(kvs_f16_to_f32(kvs_f32_to_f16(f))));
            continue;
        }
        assert_int_equal(kvs_f32_to_f16(f), h);
    }
    assert_true(kvs_f16_to_f32(0x3c00) == 1.0f);
    assert_true(kvs_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_true(kvs_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(isinf(kvs_f16_to_f32(kvs_f32_to_f16(70000.0f))));
    assert_int_equal(kvs_f32_to_f16(ldexpf(1.0f, -26)), 0);
}

/* Round to nearest: no other half is closer to x than the chosen one. */
static void test_kernels_f16_bf16_rounding(void **state) {
    (void)state;
    for (int i = 0; i < 200000; i++) {
        float x = (float)((urand() - 0.5) * pow(2.0, (int)(urand() * 35) - 20));
        /* |x| < 2^15: above 65520 IEEE rounds to Inf, not to 65504. */
        uint16_t h = kvs_f32_to_f16(x);
        double err = fabs((double)kvs_f16_to_f32(h) - x);
        assert_true(!(fabs((double)kvs_f16_to_f32(h + 1) - x) < err));
        assert_true(!(fabs((double)kvs_f16_to_f32(h - 1) - x) < err));
        uint16_t b = kvs_f32_to_bf16(x);
        double berr = fabs((double)kvs_bf16_to_f32(b) - x);
        assert_true(!(fabs((double)kvs_bf16_to_f32(b + 1) - x) < berr));
        assert_true(!(fabs((double)kvs_bf16_to_f32(b - 1) - x) < berr));
    }
}

static void fill(kvs_dtype_t dt, void *dst, float *ref, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = (float)(urand() * 2 - 1);
        if (dt == KVS_DTYPE_F32) {
            ((float *)dst)[i] = x;
        } else if (dt == KVS_DTYPE_F16) {
            ((uint16_t *)dst)[i] = kvs_f32_to_f16(x);
            x = kvs_f16_to_f32(((uint16_t *)dst)[i]);
        } else {
            ((uint16_t *)dst)[i] = kvs_f32_to_bf16(x);
            x = kvs_bf16_to_f32(((uint16_t *)dst)[i]);
        }
        ref[i] = x;
    }
}

static void test_kernels_convert(void **state) {
    (void)state;
    kvs_dtype_t dts[] = {KVS_DTYPE_F32, KVS_DTYPE_F16, KVS_DTYPE_BF16};
    for (int k = 0; k < 3; k++) {
        size_t n = 1037;
        void *buf = malloc(n * 4);
        void *back = malloc(n * 4);
        float *ref = malloc(n * 4), *out = malloc(n * 4);
        fill(dts[k], buf, ref, n);
        kvs_to_f32(dts[k], buf, out, n);
        assert_memory_equal(out, ref, n * 4);
        kvs_from_f32(dts[k], out, back, n);
        assert_memory_equal(back, buf, n * kvs_dtype_size(dts[k]));
        assert_true(kvs_all_finite(dts[k], buf, n));
        free(buf), free(back), free(ref), free(out);
    }
    float bad[3] = {1, NAN, 2};
    assert_false(kvs_all_finite(KVS_DTYPE_F32, bad, 3));
    bad[1] = INFINITY;
    assert_false(kvs_all_finite(KVS_DTYPE_F32, bad, 3));
    uint16_t h[2] = {0x3c00, 0x7c00};
    assert_false(kvs_all_finite(KVS_DTYPE_F16, h, 2));
    uint16_t b[2] = {0x3f80, 0x7fc0};
    assert_false(kvs_all_finite(KVS_DTYPE_BF16, b, 2));
    /* At an odd address (kvstored passes rows inside a received frame):
     * the same answers, and nothing for UBSan to report. */
    unsigned char odd[1 + 3 * 4];
    float f3[3] = {1, 2, 3};
    memcpy(odd + 1, f3, sizeof(f3));
    assert_true(kvs_all_finite(KVS_DTYPE_F32, odd + 1, 3));
    f3[2] = NAN;
    memcpy(odd + 1, f3, sizeof(f3));
    assert_false(kvs_all_finite(KVS_DTYPE_F32, odd + 1, 3));
    memcpy(odd + 1, b, sizeof(b));
    assert_false(kvs_all_finite(KVS_DTYPE_BF16, odd + 1, 2));
    b[1] = 0x3f80;
    memcpy(odd + 1, b, sizeof(b));
    assert_true(kvs_all_finite(KVS_DTYPE_BF16, odd + 1, 2));
}

static void test_kernels_dot_axpy(void **state) {
    (void)state;
    kvs_dtype_t dts[] = {KVS_DTYPE_F32, KVS_DTYPE_F16, KVS_DTYPE_BF16};
    uint32_t dims[] = {8, 64, 100, 128};
    uint32_t nqs[] = {1, 2, 3, 4, 8, 16};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 6; c++) {
                kvs_dtype_t dt = dts[a];
                uint32_t d = dims[b], nq = nqs[c];
                size_t n = 75;
                void *keys = malloc(n * d * 4);
                float *kref = malloc(n * d * 4);
                float *q = malloc(nq * d * 4);
                float *out = malloc(nq * n * 4);
                float *w = malloc(nq * n * 4);
                float *acc = calloc(nq * d, 4);
                fill(dt, keys, kref, n * d);
                fill(KVS_DTYPE_F32, q, q, nq * d);
                fill(KVS_DTYPE_F32, w, w, nq * n);
                kvs_dot_rows(dt, q, nq, keys, n, d, 0.5f, out, n);
                for (uint32_t i = 0; i < nq; i++)
                    for (size_t j = 0; j < n; j++) {
                        double s = 0;
                        for (uint32_t t = 0; t < d; t++)
                            s += (double)q[i * d + t] * kref[j * d + t];
                        assert_float_equal(out[i * n + j], 0.5 * s, 1e-5);
                    }
                kvs_axpy_rows(dt, w, n, nq, keys, n, d, acc);
                for (uint32_t i = 0; i < nq; i++)
                    for (uint32_t t = 0; t < d; t++) {
                        double s = 0;
                        for (size_t j = 0; j < n; j++)
                            s += (double)w[i * n + j] * kref[j * d + t];
                        assert_float_equal(acc[i * d + t], s, 1e-5);
                    }
                free(keys), free(kref), free(q), free(out), free(w), free(acc);
            }
}

/* The gather kernels over rows in a scattered order (some twice) equal the
 * row-array kernels over the same rows copied together. */
static void test_kernels_gather(void **state) {
    (void)state;
    kvs_dtype_t dts[] = {KVS_DTYPE_F32, KVS_DTYPE_F16, KVS_DTYPE_BF16};
    uint32_t dims[] = {8, 100, 128};
    uint32_t nqs[] = {1, 3, 4, 8};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 4; c++) {
                kvs_dtype_t dt = dts[a];
                uint32_t d = dims[b], nq = nqs[c];
                size_t esz = kvs_dtype_size(dt), rb = d * esz;
                size_t pool = 90, n = 77; /* > the kernels' prefetch blocks */
                char *keys = malloc(pool * rb), *packed = malloc(n * rb);
                float *kref = malloc(pool * d * 4);
                const void **rows = malloc(n * sizeof(*rows));
                float *q = malloc(nq * d * 4), *w = malloc(nq * n * 4);
                float *o1 = malloc(nq * n * 4), *o2 = malloc(nq * n * 4);
                float *a1 = calloc(nq * d, 4), *a2 = calloc(nq * d, 4);
                fill(dt, keys, kref, pool * d);
                fill(KVS_DTYPE_F32, q, q, nq * d);
                fill(KVS_DTYPE_F32, w, w, nq * n);
                for (size_t j = 0; j < n; j++) {
                    size_t r = (j * 37 + 11) % pool;
                    rows[j] = keys + r * rb;
                    memcpy(packed + j * rb, keys + r * rb, rb);
                }
                kvs_dot_gather(dt, q, nq, rows, n, d, 0.25f, o1, n);
                kvs_dot_rows(dt, q, nq, packed, n, d, 0.25f, o2, n);
                for (size_t i = 0; i < nq * n; i++)
                    assert_float_equal(o1[i], o2[i], 1e-6);
                kvs_axpy_gather(dt, w, n, nq, rows, n, d, a1);
                kvs_axpy_rows(dt, w, n, nq, packed, n, d, a2);
                for (size_t i = 0; i < nq * d; i++)
                    assert_float_equal(a1[i], a2[i], 1e-6);
                /* none at all: nothing is read or written */
                kvs_axpy_gather(dt, w, n, nq, rows, 0, d, a1);
                for (size_t i = 0; i < nq * d; i++)
                    assert_float_equal(a1[i], a2[i], 1e-6);
                free(keys), free(packed), free(kref), free(rows), free(q);
                free(w), free(o1), free(o2), free(a1), free(a2);
            }
}

static void test_kernels_exp_sum(void **state) {
    (void)state;
    size_t n = 1001;
    float *x = malloc(n * 4), *y = malloc(n * 4);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(urand() * 100 - 90);
    x[5] = -INFINITY;
    memcpy(y, x, n * 4);
    float m = kvs_max(x, n);
    float s = kvs_exp_sum(x, n, m);
    double ref = 0;
    for (size_t i = 0; i < n; i++) {
        double e = exp((double)(y[i] - m)); /* the kernel subtracts in fp32 */
        ref += e;
        if (!(fabs(x[i] - e) <= 4e-7 * e + 1e-37))
            fail_msg("exp(%g): %g vs %g", y[i] - m, x[i], e);
    }
    assert_true(x[5] == 0.0f);
    assert_float_equal(s, ref, 1e-6 * ref);
    /* All masked: no mass, no NaN. */
    for (size_t i = 0; i < 10; i++)
        x[i] = -INFINITY;
    assert_true(kvs_exp_sum(x, 10, kvs_max(x, 10)) == 0.0f);
    assert_true(x[3] == 0.0f);
    free(x), free(y);
}

/* The integer-weight code scans against the fp64 dot product with the
 * fp32 weights they round: within half a weight step x the row's sum of
 * codes (a wrong weight order would be off by whole weights), for 4-bit
 * rows (d with and without a last block of 32) and 8-bit rows, 1 to 6
 * queries. */
static void test_kernels_code_scans_int(void **state) {
    (void)state;
    uint32_t dims[] = {32, 64, 96, 128, 256};
    for (int b = 0; b < 5; b++)
        for (uint32_t g = 1; g <= 6; g++) {
            uint32_t d = dims[b];
            size_t n = 37;
            float *a = malloc(4 * g * d), *st = malloc(4 * d);
            float sc8[6], bias[6], sc16[6], out[6 * 37], out16[6 * 37];
            int8_t *q8 = malloc(g * d);
            int16_t *q16 = malloc(2 * g * d);
            uint8_t *c4 = malloc(n * d / 2), *c8 = malloc(n * d);
            for (size_t i = 0; i < g * d; i++)
                a[i] = (float)(urand() * 2 - 1);
            for (uint32_t t = 0; t < d; t++)
                st[t] = (float)(0.01 + urand() * 0.1);
            for (size_t i = 0; i < n * d / 2; i++)
                c4[i] = (uint8_t)(urand() * 256);
            for (size_t i = 0; i < n * d; i++)
                c8[i] = (uint8_t)(urand() * 256);
            for (uint32_t i = 0; i < g; i++) {
                bias[i] = (float)urand();
                kvs_code4_weights_q8(a + i * d, st, 0.5f, d, q8 + i * d,
                                     &sc8[i]);
                kvs_code8_weights_q16(a + i * d, st, 0.5f, d, q16 + i * d,
                                      &sc16[i]);
            }
            kvs_code4_dot_rows_q8(q8, d, g, sc8, bias, c4, n, d, out, n);
            kvs_code8_dot_rows_q16(q16, d, g, sc16, bias, c8, n, d, out16, n);
            for (uint32_t i = 0; i < g; i++)
                for (size_t j = 0; j < n; j++) {
                    double r4 = bias[i], r8 = bias[i], s4 = 0, s8 = 0;
                    for (uint32_t blk = 0; blk < d; blk += 32)
                        for (uint32_t u = 0; u < 16; u++) {
                            uint8_t c = c4[j * d / 2 + blk / 2 + u];
                            double wl =
                                (double)a[i * d + blk + u] * st[blk + u] * 0.5;
                            double wh = (double)a[i * d + blk + 16 + u] *
                                        st[blk + 16 + u] * 0.5;
                            r4 += wl * (c & 15) + wh * (c >> 4);
                            s4 += (c & 15) + (c >> 4);
                        }
                    for (uint32_t t = 0; t < d; t++) {
                        uint8_t c = c8[j * d + t];
                        r8 += (double)a[i * d + t] * st[t] * 0.5 * c;
                        s8 += c;
                    }
                    double e4 = fabs(out[i * n + j] - r4);
                    double e8 = fabs(out16[i * n + j] - r8);
                    if (e4 > sc8[i] * 0.5 * s4 + 1e-4 ||
                        e8 > sc16[i] * 0.5 * s8 + 1e-4)
                        fail_msg("d %u g %u: %g vs %g, %g vs %g", d, g,
                                 out[i * n + j], r4, out16[i * n + j], r8);
                }
            free(a), free(st), free(q8), free(q16), free(c4), free(c8);
        }
}

/* kvs_max: the largest element at every length and position, NaN never
 * taken, -inf for none. */
static void test_kernels_max(void **state) {
    (void)state;
    float x[67] = {0};
    assert_true(kvs_max(x, 0) == -INFINITY);
    for (size_t n = 1; n <= 67; n++)
        for (size_t at = 0; at < n; at += 5) {
            for (size_t i = 0; i < n; i++)
                x[i] = (float)(urand() * 10 - 20);
            x[at] = 7.5f;
            if (n > 2)
                x[(at + 1) % n] = NAN;
            assert_true(kvs_max(x, n) == 7.5f);
        }
    for (size_t i = 0; i < 20; i++)
        x[i] = -INFINITY;
    assert_true(kvs_max(x, 20) == -INFINITY);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_max),
        cmocka_unit_test(test_kernels_code_scans_int),
        cmocka_unit_test(test_kernels_f16_roundtrip),
        cmocka_unit_test(test_kernels_f16_bf16_rounding),
        cmocka_unit_test(test_kernels_convert),
        cmocka_unit_test(test_kernels_dot_axpy),
        cmocka_unit_test(test_kernels_gather),
        cmocka_unit_test(test_kernels_exp_sum),
    };
    print_message("kernels ISA: %s\n", kvs_kernels_isa());
    return cmocka_run_group_tests(tests, NULL, NULL);
}
