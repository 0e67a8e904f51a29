/*
 * test_index_codes.c: the compact codes of a segment (index/codes.c), their
 * scan kernels (kernels/codes_scan*.c) and their storage (segment_io.c).
 *
 * Keys are synthetic with the shape of attention keys: a large common
 * offset, a few directions, noise, and two outlier channels (the reason for
 * the rotation). Every property is checked against a brute-force reference:
 * the rotation keeps dot products, each stored code is the nearest level
 * and the code score is within its error bound of q.k, code scores rank
 * keys close to the exact order, records round-trip (and format-1 records
 * rebuild their codes), damaged code sections are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvs_index.h"
#include "kvs_kernels.h"

static uint64_t rng_state;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_gauss(void) {
    double u = ((rng_next() >> 11) + 0.5) / 9007199254740992.0;
    double v = ((rng_next() >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* n keys of d dims in fp32 (token order), values alongside. */
static void make_keys(uint32_t n, uint32_t d, uint64_t seed, float **k,
                      float **v) {
    rng_state = seed;
    *k = malloc(sizeof(float) * n * d);
    *v = malloc(sizeof(float) * n * d);
    assert_non_null(*k);
    assert_non_null(*v);
    float off[1024], dir[16][1024];
    for (uint32_t j = 0; j < d; j++)
        off[j] = 3.0f + rng_gauss();
    for (int c = 0; c < 16; c++)
        for (uint32_t j = 0; j < d; j++)
            dir[c][j] = 1.5f * rng_gauss();
    for (uint32_t i = 0; i < n; i++) {
        int c = (int)(rng_next() % 16);
        for (uint32_t j = 0; j < d; j++) {
            float x = off[j] + dir[c][j] + 0.8f * rng_gauss();
            if (j < 2)
                x *= 8; /* outlier channels */
            (*k)[(size_t)i * d + j] = x;
            (*v)[(size_t)i * d + j] = rng_gauss();
        }
    }
}

static kvs_segment_t *build(uint32_t n, uint32_t d, uint64_t seed,
                            float **keys) {
    float *k, *v;
    make_keys(n, d, seed, &k, &v);
    kvs_build_params_t p = {.cluster_tokens = 16,
                            .kmeans_iters = 5,
                            .sink_tokens = 4,
                            .window_tokens = 16,
                            .seed = seed};
    kvs_segment_t *seg = NULL;
    char err[160];
    assert_int_equal(kvs_segment_build(&p, KVS_DTYPE_F32, d, 0, n, k, v, &seg,
                                       err, sizeof err),
                     0);
    free(v);
    if (keys)
        *keys = k;
    else
        free(k);
    return seg;
}

static uint32_t code4_at(const uint8_t *row, uint32_t j) {
    uint32_t b = j / 32 * 16, i = j % 32;
    return i < 16 ? row[b + i] & 15u : row[b + i - 16] >> 4;
}

/* The builder's batched SIMD rotation and quantiser give the codes of the
 * definition in kvs_index.h bit for bit: each key and centroid rotated
 * alone by kvs_codes_rotate, ranges by min/max, codes by rintf of the
 * scaled offset clamped to the levels. Both builders (k-means and labels)
 * and the rebuild from stored keys agree. */
static uint32_t ref_quant(float v, float lo, float step, uint32_t top) {
    if (!(step > 0))
        return 0;
    float c = rintf((v - lo) / step);
    return !(c > 0) ? 0 : c >= (float)top ? top : (uint32_t)c;
}

static void check_codes_reference(const kvs_segment_t *seg) {
    const uint32_t d = seg->d, n = seg->n_tokens, C = seg->n_clusters;
    const kvs_codes_t *c = seg->codes;
    assert_non_null(c);
    float *xr = malloc(sizeof(float) * n * d);
    float *cr = malloc(sizeof(float) * C * d);
    assert_non_null(xr);
    assert_non_null(cr);
    size_t row = kvs_dtype_size(seg->dtype) * d;
    for (uint32_t i = 0; i < n; i++) {
        kvs_to_f32(seg->dtype, (const char *)seg->keys + row * i,
                   xr + (size_t)i * d, d);
        kvs_codes_rotate(c, d, xr + (size_t)i * d, xr + (size_t)i * d);
    }
    for (uint32_t k = 0; k < C; k++) {
        kvs_to_f32(seg->dtype, (const char *)seg->centroids + row * k,
                   cr + (size_t)k * d, d);
        kvs_codes_rotate(c, d, cr + (size_t)k * d, cr + (size_t)k * d);
    }
    for (uint32_t j = 0; j < d; j++) {
        float mn = xr[j], mx = xr[j], cmn = cr[j], cmx = cr[j];
        for (uint32_t i = 1; i < n; i++) {
            float v = xr[(size_t)i * d + j];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        for (uint32_t k = 1; k < C; k++) {
            float v = cr[(size_t)k * d + j];
            cmn = v < cmn ? v : cmn;
            cmx = v > cmx ? v : cmx;
        }
        assert_true(c->lo[j] == mn && c->step[j] == (mx - mn) / 15.0f);
        assert_true(c->clo[j] == cmn && c->cstep[j] == (cmx - cmn) / 255.0f);
    }
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            assert_int_equal(
                code4_at(c->keys + (size_t)i * (d / 2), j),
                ref_quant(xr[(size_t)i * d + j], c->lo[j], c->step[j], 15));
    for (uint32_t k = 0; k < C; k++) {
        double ss = 0;
        for (uint32_t s = seg->offsets[k]; s < seg->offsets[k + 1]; s++)
            for (uint32_t j = 0; j < d; j++) {
                assert_int_equal(c->centroids[(size_t)k * d + j],
                                 ref_quant(cr[(size_t)k * d + j], c->clo[j],
                                           c->cstep[j], 255));
                double e =
                    (double)xr[(size_t)s * d + j] - cr[(size_t)k * d + j];
                ss += e * e;
            }
        uint32_t m = seg->offsets[k + 1] - seg->offsets[k];
        double want = m ? sqrt(ss / ((double)m * d)) : 0;
        /* The spread's sum runs in another order: equal to rounding. */
        assert_true(fabs(c->spread[k] - want) <= 1e-6 * want + 1e-30);
    }
    free(xr);
    free(cr);
}

static void test_index_codes_match_reference(void **state) {
    (void)state;
    static const uint32_t dims[] = {32, 64, 128, 256};
    for (size_t t = 0; t < 4; t++) {
        float *keys = NULL;
        kvs_segment_t *seg = build(512, dims[t], 11 + t, &keys);
        check_codes_reference(seg);
        /* The public rebuild (stored keys) gives the same codes. */
        kvs_codes_t *first = seg->codes;
        seg->codes = NULL;
        assert_int_equal(
            kvs_segment_build_codes(seg, first->seed ^ 0x636f646573ull), 0);
        assert_memory_equal(seg->codes->keys, first->keys,
                            (size_t)seg->n_tokens * (dims[t] / 2));
        assert_memory_equal(seg->codes->centroids, first->centroids,
                            (size_t)seg->n_clusters * dims[t]);
        assert_memory_equal(seg->codes->spread, first->spread,
                            sizeof(float) * seg->n_clusters);
        kvs_codes_free(first);
        kvs_segment_free(seg);
        free(keys);
    }
}

/* The rotation is orthonormal (Hadamard for powers of two, signs alone
 * otherwise) and deterministic in its seed. */
static void test_index_codes_rotation_keeps_dots(void **state) {
    (void)state;
    static const uint32_t dims[] = {32, 64, 128, 96};
    for (size_t t = 0; t < 4; t++) {
        uint32_t d = dims[t];
        kvs_codes_t c = {.seed = 99 + t};
        float a[1024], b[1024], ra[1024], rb[1024];
        rng_state = 5 + t;
        for (uint32_t j = 0; j < d; j++) {
            a[j] = rng_gauss();
            b[j] = rng_gauss();
        }
        kvs_codes_rotate(&c, d, a, ra);
        kvs_codes_rotate(&c, d, b, rb);
        double x = 0, y = 0, na = 0;
        for (uint32_t j = 0; j < d; j++) {
            x += (double)a[j] * b[j];
            y += (double)ra[j] * rb[j];
            na += (double)a[j] * a[j];
        }
        assert_true(fabs(x - y) < 1e-4 * na);
        float again[1024];
        kvs_codes_rotate(&c, d, a, again);
        assert_memory_equal(again, ra, d * sizeof(float));
    }
}

/* The scan kernels (whichever ISA runs) against a plain loop. */
static void test_index_codes_scan_kernels(void **state) {
    (void)state;
    static const uint32_t dims[] = {32, 64, 128, 256};
    uint8_t codes[37 * 256];
    float w[256], out[37];
    for (size_t t = 0; t < 4; t++) {
        uint32_t d = dims[t];
        rng_state = 11 + t;
        for (uint32_t j = 0; j < d; j++)
            w[j] = rng_gauss();
        for (size_t i = 0; i < sizeof codes; i++)
            codes[i] = (uint8_t)rng_next();
        kvs_code4_dot_rows(w, codes, 37, d, 0.5f, out);
        for (uint32_t r = 0; r < 37; r++) {
            double ref = 0.5, mag = 0;
            for (uint32_t j = 0; j < d; j++) {
                uint32_t c = code4_at(codes + (size_t)r * d / 2, j);
                ref += (double)w[j] * c;
                mag += fabs(w[j]) * c;
            }
            assert_true(fabs(out[r] - ref) <= 1e-5 * (mag + 1));
        }
        kvs_code8_dot_rows(w, codes, 37, d, -1.0f, out);
        for (uint32_t r = 0; r < 37; r++) {
            double ref = -1, mag = 0;
            for (uint32_t j = 0; j < d; j++) {
                ref += (double)w[j] * codes[(size_t)r * d + j];
                mag += fabs(w[j]) * codes[(size_t)r * d + j];
            }
            assert_true(fabs(out[r] - ref) <= 1e-5 * (mag + 1));
        }
    }
    const char *isa = kvs_code_scan_isa();
    assert_true(!strcmp(isa, "avx2") || !strcmp(isa, "scalar"));
}

/* kvs_code4_dot_rows_multi: every query's outputs equal the single-query
 * kernel's bit for bit (odd and even query counts, strides). */
static void test_index_codes_scan_multi(void **state) {
    (void)state;
    enum { N = 29, G = 5, D = 128, WS = D + 3 };
    static uint8_t codes[N * D / 2];
    static float w[G * WS], bias[G * 2], out[G * (N + 4)], one[N];
    rng_state = 77;
    for (size_t i = 0; i < sizeof codes; i++)
        codes[i] = (uint8_t)rng_next();
    for (size_t i = 0; i < G * WS; i++)
        w[i] = rng_gauss();
    for (size_t i = 0; i < G * 2; i++)
        bias[i] = rng_gauss();
    for (uint32_t g = 1; g <= G; g++) {
        kvs_code4_dot_rows_multi(w, WS, g, bias, 2, codes, N, D, out, N + 4);
        for (uint32_t i = 0; i < g; i++) {
            kvs_code4_dot_rows(w + i * WS, codes, N, D, bias[2 * i], one);
            assert_memory_equal(out + i * (N + 4), one, sizeof one);
        }
    }
}

/* Every code is the nearest of its 16 (256) levels, so the code score of
 * q.x is within sum_j |Rq_j| step_j / 2 of the exact one (plus rounding). */
/* For a head of d dims (codes of dc = kvs_codes_dim(d), the added dims
 * zero): every stored code is the level nearest its rotated value, and
 * the code score of every key is within the quantisation bound of q.k. */
static void check_error_bound(uint32_t d) {
    const uint32_t n = 1024, dc = kvs_codes_dim(d);
    assert_true(dc >= d && dc % 32 == 0 && dc <= 128);
    float *keys;
    kvs_segment_t *seg = build(n, d, 3, &keys);
    const kvs_codes_t *c = seg->codes;
    assert_non_null(c);
    const float *sk = seg->keys; /* slot order */
    float x[128], q[128], rq[128], w[128], est[1024];
    for (uint32_t s = 0; s < n; s++) {
        kvs_codes_rotate(c, d, sk + (size_t)s * d, x);
        const uint8_t *row = c->keys + (size_t)s * dc / 2;
        for (uint32_t j = 0; j < dc; j++) {
            float back = c->lo[j] + c->step[j] * (float)code4_at(row, j);
            assert_true(fabsf(back - x[j]) <=
                        0.5f * c->step[j] * 1.0001f + 1e-5f);
        }
    }
    for (uint32_t k = 0; k < seg->n_clusters; k++) {
        kvs_codes_rotate(c, d, (const float *)seg->centroids + (size_t)k * d,
                         x);
        for (uint32_t j = 0; j < dc; j++) {
            float back = c->clo[j] + c->cstep[j] * c->centroids[k * dc + j];
            assert_true(fabsf(back - x[j]) <=
                        0.5f * c->cstep[j] * 1.0001f + 1e-5f);
        }
        assert_true(c->spread[k] >= 0);
    }
    rng_state = 1234;
    for (uint32_t j = 0; j < d; j++)
        q[j] = rng_gauss();
    kvs_codes_rotate(c, d, q, rq);
    double bias = 0, bound = 0;
    for (uint32_t j = 0; j < dc; j++) {
        w[j] = rq[j] * c->step[j];
        bias += (double)rq[j] * c->lo[j];
        bound += 0.5 * fabs(rq[j]) * c->step[j];
    }
    kvs_code4_dot_rows(w, c->keys, n, dc, (float)bias, est);
    for (uint32_t s = 0; s < n; s++) {
        double e = 0;
        for (uint32_t j = 0; j < d; j++)
            e += (double)q[j] * sk[(size_t)s * d + j];
        assert_true(fabs(est[s] - e) <= bound * 1.001 + 1e-3 * fabs(e) + 1e-3);
    }
    free(keys);
    kvs_segment_free(seg);
}

static void test_index_codes_error_bound(void **state) {
    (void)state;
    check_error_bound(128);
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Code scores rank keys close to the exact order: over 20 queries, the
 * exact top 10 sit within the top 40 by code score (at least 95% of them),
 * and the top 100 within the top 400 (at least 90%). */
static void test_index_codes_rank_order(void **state) {
    (void)state;
    const uint32_t n = 4096, d = 128;
    kvs_segment_t *seg = build(n, d, 8, NULL);
    const kvs_codes_t *c = seg->codes;
    const float *sk = seg->keys;
    float *ex = malloc(sizeof(float) * n), *est = malloc(sizeof(float) * n);
    float *tmp = malloc(sizeof(float) * n);
    uint32_t hit10 = 0, hit100 = 0;
    for (int t = 0; t < 20; t++) {
        float q[128], rq[128], w[128];
        rng_state = 500 + t;
        for (uint32_t j = 0; j < d; j++)
            q[j] = rng_gauss() + (j < 2 ? 0.0f : 0.3f);
        kvs_codes_rotate(c, d, q, rq);
        double bias = 0;
        for (uint32_t j = 0; j < d; j++) {
            w[j] = rq[j] * c->step[j];
            bias += (double)rq[j] * c->lo[j];
        }
        kvs_code4_dot_rows(w, c->keys, n, d, (float)bias, est);
        for (uint32_t s = 0; s < n; s++) {
            double e = 0;
            for (uint32_t j = 0; j < d; j++)
                e += (double)q[j] * sk[(size_t)s * d + j];
            ex[s] = (float)e;
        }
        memcpy(tmp, ex, sizeof(float) * n);
        qsort(tmp, n, sizeof(float), cmp_desc);
        float t10 = tmp[9], t100 = tmp[99];
        memcpy(tmp, est, sizeof(float) * n);
        qsort(tmp, n, sizeof(float), cmp_desc);
        float e40 = tmp[39], e400 = tmp[399];
        for (uint32_t s = 0; s < n; s++) {
            hit10 += ex[s] >= t10 && est[s] >= e40;
            hit100 += ex[s] >= t100 && est[s] >= e400;
        }
    }
    assert_true(hit10 >= 190);
    assert_true(hit100 >= 1800);
    free(ex);
    free(est);
    free(tmp);
    kvs_segment_free(seg);
}

static void assert_codes_equal(const kvs_codes_t *a, const kvs_codes_t *b,
                               uint32_t n, uint32_t C, uint32_t d) {
    assert_non_null(a);
    assert_non_null(b);
    assert_true(a->seed == b->seed);
    assert_memory_equal(a->lo, b->lo, d * sizeof(float));
    assert_memory_equal(a->step, b->step, d * sizeof(float));
    assert_memory_equal(a->clo, b->clo, d * sizeof(float));
    assert_memory_equal(a->cstep, b->cstep, d * sizeof(float));
    assert_memory_equal(a->spread, b->spread, C * sizeof(float));
    assert_memory_equal(a->centroids, b->centroids, (size_t)C * d);
    assert_memory_equal(a->keys, b->keys, (size_t)n * d / 2);
}

/* Builds are deterministic; records round-trip with their codes; format-1
 * records (no codes section) decode and rebuild codes with seed
 * first_pos; damaged code sections are refused. */
static void test_index_codes_serialise(void **state) {
    (void)state;
    const uint32_t n = 600, d = 64;
    kvs_segment_t *a = build(n, d, 21, NULL), *b = build(n, d, 21, NULL);
    uint32_t C = a->n_clusters;
    assert_codes_equal(a->codes, b->codes, n, C, d);
    kvs_segment_free(b);

    size_t len = kvs_segment_encoded_size(a);
    char *buf = malloc(len);
    kvs_segment_encode(a, buf);
    kvs_segment_t *r = NULL;
    char err[160];
    assert_int_equal(kvs_segment_decode(buf, len, &r, err, sizeof err), 0);
    assert_codes_equal(a->codes, r->codes, n, C, d);
    assert_true(kvs_segment_index_bytes(r) == kvs_segment_index_bytes(a));
    kvs_segment_free(r);

    /* The codes section is the record's tail: a format-1 record is the
     * rest with version 1. */
    size_t code_bytes = 8 + 8 + 16 * d + 4 * C + (size_t)C * d + n * d / 2;
    char *v1 = malloc(len);
    memcpy(v1, buf, len - code_bytes);
    uint32_t one = 1;
    memcpy(v1 + 4, &one, 4);
    assert_int_equal(
        kvs_segment_decode(v1, len - code_bytes, &r, err, sizeof err), 0);
    assert_non_null(r->codes);
    kvs_segment_t *a2 = build(n, d, 21, NULL);
    assert_int_equal(kvs_segment_build_codes(a2, a2->first_pos), 0);
    assert_codes_equal(a2->codes, r->codes, n, C, d);
    kvs_segment_free(a2);
    kvs_segment_free(r);

    /* Damage: bad flag, negative step, NaN spread, truncation. */
    size_t at = len - code_bytes;
    uint32_t two = 2;
    memcpy(v1, buf, len);
    memcpy(v1 + at, &two, 4);
    assert_int_equal(kvs_segment_decode(v1, len, &r, err, sizeof err),
                     KVS_ECORRUPT);
    assert_null(r);
    memcpy(v1, buf, len);
    float neg = -1;
    memcpy(v1 + at + 16 + 4 * d, &neg, 4); /* step[0] */
    assert_int_equal(kvs_segment_decode(v1, len, &r, err, sizeof err),
                     KVS_ECORRUPT);
    memcpy(v1, buf, len);
    float nan = NAN;
    memcpy(v1 + at + 16 + 16 * d, &nan, 4); /* spread[0] */
    assert_int_equal(kvs_segment_decode(v1, len, &r, err, sizeof err),
                     KVS_ECORRUPT);
    assert_int_equal(kvs_segment_decode(buf, len - 1, &r, err, sizeof err),
                     KVS_ECORRUPT);
    free(v1);
    free(buf);
    kvs_segment_free(a);
}

/* `a` encoded (as a metadata record when `meta`) and decoded again. */
static kvs_segment_t *roundtrip(const kvs_segment_t *a, int meta) {
    size_t len =
        meta ? kvs_segment_meta_encoded_size(a) : kvs_segment_encoded_size(a);
    char *buf = malloc(len);
    assert_non_null(buf);
    kvs_segment_t *r = NULL;
    if (meta) {
        kvs_segment_meta_encode(a, buf);
        assert_int_equal(kvs_segment_meta_decode(buf, len, &r, NULL, 0), 0);
    } else {
        kvs_segment_encode(a, buf);
        assert_int_equal(kvs_segment_decode(buf, len, &r, NULL, 0), 0);
    }
    free(buf);
    return r;
}

/* Head dims that are not a multiple of 32 get codes padded to one (48 ->
 * 64, 80 -> 96: the error bound holds), which round-trip; a record of such
 * a segment written without codes (by a build before padding) gets them
 * rebuilt, bit for bit the builder's (a metadata record once its K/V
 * blocks are attached). Below 32 dims there are no codes. */
static void test_index_codes_padded_dims(void **state) {
    (void)state;
    assert_int_equal(kvs_codes_dim(16), 0);
    assert_int_equal(kvs_codes_dim(31), 0);
    assert_int_equal(kvs_codes_dim(32), 32);
    assert_int_equal(kvs_codes_dim(48), 64);
    assert_int_equal(kvs_codes_dim(80), 96);
    assert_int_equal(kvs_codes_dim(128), 128);
    assert_int_equal(kvs_codes_dim(KVS_CODES_MAX_D + 32), 0);
    check_error_bound(48);
    check_error_bound(80);
    const uint32_t d = 80, dc = 96, n = 300;
    kvs_segment_t *a = build(n, d, 4, NULL);
    assert_non_null(a->codes);
    kvs_segment_t *r = roundtrip(a, 0);
    assert_non_null(r->codes);
    assert_memory_equal(r->codes->keys, a->codes->keys, (size_t)n * dc / 2);
    assert_memory_equal(r->codes->centroids, a->codes->centroids,
                        (size_t)a->n_clusters * dc);
    kvs_segment_free(r);
    /* as a build before padding wrote it: no codes */
    kvs_codes_t *codes = a->codes;
    a->codes = NULL;
    r = roundtrip(a, 0);
    assert_non_null(r->codes);
    assert_int_equal(r->codes->seed, codes->seed);
    assert_memory_equal(r->codes->keys, codes->keys, (size_t)n * dc / 2);
    assert_memory_equal(r->codes->centroids, codes->centroids,
                        (size_t)a->n_clusters * dc);
    assert_memory_equal(r->codes->spread, codes->spread,
                        sizeof(float) * a->n_clusters);
    kvs_segment_free(r);
    /* a metadata record: codes once its K/V blocks make it whole */
    r = roundtrip(a, 1);
    assert_null(r->codes);
    uint32_t next = 0;
    for (uint32_t slot = 0; slot < n; slot += 128) {
        uint32_t m = n - slot < 128 ? n - slot : 128;
        size_t bl = kvs_segment_kv_block_size(a, m);
        char *blk = malloc(bl);
        kvs_segment_kv_block_encode(a, slot, m, blk);
        assert_int_equal(kvs_segment_kv_attach(r, blk, bl, &next, NULL, 0), 0);
        free(blk);
        if (next < n)
            assert_null(r->codes);
    }
    assert_int_equal(next, n);
    assert_non_null(r->codes);
    assert_memory_equal(r->codes->keys, codes->keys, (size_t)n * dc / 2);
    assert_memory_equal(r->codes->centroids, codes->centroids,
                        (size_t)a->n_clusters * dc);
    kvs_segment_free(r);
    a->codes = codes;
    kvs_segment_free(a);

    a = build(n, 16, 4, NULL);
    assert_null(a->codes);
    r = roundtrip(a, 0);
    assert_null(r->codes);
    kvs_segment_free(r);
    kvs_segment_free(a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_codes_rotation_keeps_dots),
        cmocka_unit_test(test_index_codes_match_reference),
        cmocka_unit_test(test_index_codes_scan_kernels),
        cmocka_unit_test(test_index_codes_scan_multi),
        cmocka_unit_test(test_index_codes_error_bound),
        cmocka_unit_test(test_index_codes_rank_order),
        cmocka_unit_test(test_index_codes_serialise),
        cmocka_unit_test(test_index_codes_padded_dims),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
