/*
 * test_dump.c: the dump reader (tools/kvdecode/kvs_dump.h) against its
 * writer (kvs_qkv_dump_*). A synthetic geometry (no model: the writer only
 * needs the config) is written in fp32 and fp16 and read back row by row;
 * then damaged copies — truncated, wrong magic, absurd header sizes,
 * oversized — must each be refused with KVS_ECORRUPT and a message naming
 * the file and the fault, and the row reader refuses what lies outside
 * the dump.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kvs_decoder.h"
#include "kvs_dump.h"
#include "kvs_kernels.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* 3 layers, 4 query heads over 2 KV heads, head_dim 8, 37 tokens. */
enum { L = 3, HQ = 4, HKV = 2, HD = 8, N = 37 };

static char g_dir[64];

static int setup(void **state) {
    (void)state;
    strcpy(g_dir, "/tmp/kvs_test_dump_XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", g_dir);
    return 0;
}

static const char *path_of(const char *name) {
    static char path[128];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    return path;
}

/* The value the writer is given for element i of head h of array a
 * (0 = Q, 1 = K, 2 = V) of layer l at position t: distinct per place in
 * fp32. */
static float value(uint32_t l, uint32_t a, uint32_t h, uint32_t t, uint32_t i) {
    return (float)(((l * 3 + a) * 8 + h) * 64 + t) + (float)i / 8.0f - 500.0f;
}

/* What a dump of `dtype` gives back for it: itself in fp32, the value
 * rounded by the writer's conversion in fp16. */
static float stored(kvs_dtype_t dtype, float x) {
    if (dtype == KVS_DTYPE_F32)
        return x;
    uint16_t h;
    kvs_from_f32(KVS_DTYPE_F16, &x, &h, 1);
    return kvs_f16_to_f32(h);
}

static kvs_model_config_t config(void) {
    kvs_model_config_t c;
    memset(&c, 0, sizeof(c));
    c.n_layers = L;
    c.n_heads = HQ;
    c.n_kv_heads = HKV;
    c.head_dim = HD;
    c.dim = HQ * HD;
    c.kv_dim = HKV * HD;
    c.seq_len = 1024;
    c.vocab_size = 256;
    return c;
}

/* Write a dump of N tokens in chunks of 10, as the decoder would. */
static void write_dump(const char *path, kvs_dtype_t dtype) {
    kvs_model_config_t c = config();
    int32_t tok[N];
    for (int t = 0; t < N; t++)
        tok[t] = 1000 + t;
    kvs_qkv_dump_t *d = NULL;
    char err[256];
    assert_int_equal(
        kvs_qkv_dump_open(path, &c, tok, N, dtype, &d, err, sizeof(err)), 0);
    float q[10][HQ * HD], k[10][HKV * HD], v[10][HKV * HD];
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t p = 0; p < N; p += 10) {
            uint32_t n = N - p < 10 ? N - p : 10;
            for (uint32_t t = 0; t < n; t++)
                for (uint32_t i = 0; i < HD; i++) {
                    for (uint32_t h = 0; h < HQ; h++)
                        q[t][h * HD + i] = value(l, 0, h, p + t, i);
                    for (uint32_t h = 0; h < HKV; h++) {
                        k[t][h * HD + i] = value(l, 1, h, p + t, i);
                        v[t][h * HD + i] = value(l, 2, h, p + t, i);
                    }
                }
            assert_int_equal(
                kvs_qkv_dump_observe(d, l, p, n, &q[0][0], &k[0][0], &v[0][0]),
                0);
        }
    assert_int_equal(kvs_qkv_dump_close(d), 0);
}

static void check_round_trip(kvs_dtype_t dtype) {
    const char *path = path_of(dtype == KVS_DTYPE_F32 ? "f32.bin" : "f16.bin");
    write_dump(path, dtype);
    kvs_dump_t *d = NULL;
    char err[256];
    assert_int_equal(kvs_dump_open(path, &d, err, sizeof(err)), 0);
    assert_string_equal(err, "");
    const kvs_dump_info_t *in = kvs_dump_info(d);
    assert_int_equal(in->n_layers, L);
    assert_int_equal(in->n_q_heads, HQ);
    assert_int_equal(in->n_kv_heads, HKV);
    assert_int_equal(in->head_dim, HD);
    assert_int_equal(in->n_tokens, N);
    assert_int_equal(in->dtype, dtype);
    assert_int_equal(in->seq_len, 1024);
    assert_int_equal(in->vocab_size, 256);
    assert_true(fabsf(in->scale - 1.0f / sqrtf((float)HD)) < 1e-7f);
    const int32_t *tok = kvs_dump_tokens(d);
    for (int t = 0; t < N; t++)
        assert_int_equal(tok[t], 1000 + t);

    float rows[N * HD];
    static const uint32_t heads[3] = {HQ, HKV, HKV};
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t a = 0; a < 3; a++)
            for (uint32_t h = 0; h < heads[a]; h++) {
                /* A window in the middle, then one row at the end. */
                assert_int_equal(
                    kvs_dump_rows(d, l, (kvs_dump_array_t)a, h, 5, 20, rows),
                    0);
                for (uint32_t t = 0; t < 20; t++)
                    for (uint32_t i = 0; i < HD; i++)
                        assert_true(rows[t * HD + i] ==
                                    stored(dtype, value(l, a, h, 5 + t, i)));
                assert_int_equal(
                    kvs_dump_rows(d, l, (kvs_dump_array_t)a, h, N - 1, 1, rows),
                    0);
                assert_true(rows[HD - 1] ==
                            stored(dtype, value(l, a, h, N - 1, HD - 1)));
            }

    /* Outside the dump: refused, out untouched. */
    rows[0] = 42.0f;
    assert_int_equal(kvs_dump_rows(d, L, KVS_DUMP_Q, 0, 0, 1, rows),
                     KVS_ERANGE);
    assert_int_equal(kvs_dump_rows(d, 0, KVS_DUMP_Q, HQ, 0, 1, rows),
                     KVS_ERANGE);
    assert_int_equal(kvs_dump_rows(d, 0, KVS_DUMP_K, HKV, 0, 1, rows),
                     KVS_ERANGE);
    assert_int_equal(kvs_dump_rows(d, 0, KVS_DUMP_V, 0, N - 3, 4, rows),
                     KVS_ERANGE);
    assert_int_equal(kvs_dump_rows(d, 0, KVS_DUMP_V, 0, N + 1, 0, rows),
                     KVS_ERANGE);
    assert_int_equal(kvs_dump_rows(d, 0, (kvs_dump_array_t)3, 0, 0, 1, rows),
                     KVS_EINVAL);
    assert_true(rows[0] == 42.0f);
    assert_int_equal(kvs_dump_rows(d, 0, KVS_DUMP_V, 0, N, 0, rows), 0);
    kvs_dump_close(d);
}

static void test_dump_round_trip_f32(void **state) {
    (void)state;
    check_round_trip(KVS_DTYPE_F32);
}

static void test_dump_round_trip_f16(void **state) {
    (void)state;
    check_round_trip(KVS_DTYPE_F16);
}

/* The whole file at `path` (malloc'ed; *len its size). */
static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len + 8192);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, *len, f), *len);
    fclose(f);
    return b;
}

/* Write `len` bytes of `b` as `name`; opening it must fail with `want`
 * and a message naming the file and containing `needle`. The same bytes
 * through kvs_dump_open_buffer must fail the same way. */
static void expect_refused(const char *name, const unsigned char *b, size_t len,
                           int want, const char *needle) {
    const char *path = path_of(name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    kvs_dump_t *d = (kvs_dump_t *)0x1;
    char err[512];
    int rc = kvs_dump_open(path, &d, err, sizeof(err));
    if (rc != want || !strstr(err, needle) || !strstr(err, path))
        fprintf(stderr, "%s: got %d \"%s\", wanted %d and \"%s\"\n", name, rc,
                err, want, needle);
    assert_int_equal(rc, want);
    assert_null(d);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, needle));

    void *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, b, len);
    d = (kvs_dump_t *)0x1;
    assert_int_equal(
        kvs_dump_open_buffer(copy, len, name, &d, err, sizeof(err)), want);
    assert_null(d);
    assert_non_null(strstr(err, needle));
    free(copy);
}

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static void test_dump_damaged(void **state) {
    (void)state;
    const char *good = path_of("good.bin");
    write_dump(good, KVS_DTYPE_F32);
    size_t len;
    unsigned char *b = slurp(good, &len);
    unsigned char *m = malloc(len + 8192);
    assert_non_null(m);

    /* Truncated: in the header, in the tokens, by one byte of data. */
    expect_refused("short_header.bin", b, 40, KVS_ECORRUPT, "truncated");
    expect_refused("empty.bin", b, 0, KVS_ECORRUPT, "truncated");
    expect_refused("short_tokens.bin", b, 64 + 20, KVS_ECORRUPT, "truncated");
    expect_refused("short_data.bin", b, len - 1, KVS_ECORRUPT, "truncated");
    /* Oversized: a byte too many. */
    memcpy(m, b, len);
    m[len] = 0;
    expect_refused("long.bin", m, len + 1, KVS_ECORRUPT, "oversized");

    struct {
        const char *name;
        size_t off;
        uint64_t val;
        int wide;
        const char *needle;
    } cases[] = {
        {"magic.bin", 0, 0x31504d5544534b4cull, 1, "not a kvdecode --dump"},
        {"version.bin", 8, 2, 0, "version 2"},
        {"hbytes.bin", 12, 128, 0, "128-byte header"},
        {"layers0.bin", 16, 0, 0, "damaged header"},
        {"layers_huge.bin", 16, 0xffffffffu, 0, "damaged header"},
        {"heads_huge.bin", 20, 1u << 30, 0, "damaged header"},
        {"kv0.bin", 24, 0, 0, "damaged header"},
        {"kv_nodiv.bin", 24, 3, 0, "damaged header"},
        {"hd_huge.bin", 28, 1u << 20, 0, "damaged header"},
        {"tokens0.bin", 32, 0, 0, "damaged header"},
        /* Sizes that would wrap a naive product of the header's fields. */
        {"tokens_huge.bin", 32, 0xffffffffu, 0, "data offset"},
        {"dtype.bin", 36, 7, 0, "dtype 7"},
        {"off_small.bin", 48, 0, 1, "data offset"},
        {"off_odd.bin", 48, 4097, 1, "data offset"},
        {"off_huge.bin", 48, 0xfffffffffffff000ull, 1, "truncated"},
        {"scale_nan.bin", 56, 0x7fc00000u, 0, "softmax scale"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        memcpy(m, b, len);
        if (cases[i].wide)
            put64(m + cases[i].off, cases[i].val);
        else
            put32(m + cases[i].off, (uint32_t)cases[i].val);
        expect_refused(cases[i].name, m, len, KVS_ECORRUPT, cases[i].needle);
    }
    /* More layers than the file holds, within the limits. */
    memcpy(m, b, len);
    put32(m + 16, KVS_DUMP_MAX_LAYERS);
    expect_refused("layers_more.bin", m, len, KVS_ECORRUPT, "truncated");

    /* Not there: -errno, named. */
    kvs_dump_t *d = NULL;
    char err[256];
    assert_int_equal(
        kvs_dump_open(path_of("missing.bin"), &d, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "missing.bin"));
    /* A directory is no dump. */
    assert_int_equal(kvs_dump_open(g_dir, &d, err, sizeof(err)), KVS_ECORRUPT);
    assert_int_equal(kvs_dump_open(NULL, &d, err, sizeof(err)), KVS_EINVAL);
    assert_int_equal(
        kvs_dump_open_buffer(b + 1, len - 1, "x", &d, err, sizeof(err)),
        KVS_EINVAL);
    /* The good one still opens from memory. */
    assert_int_equal(kvs_dump_open_buffer(b, len, "x", &d, NULL, 0), 0);
    assert_int_equal(kvs_dump_info(d)->n_tokens, N);
    kvs_dump_close(d);
    kvs_dump_close(NULL);
    free(m);
    free(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dump_round_trip_f32),
        cmocka_unit_test(test_dump_round_trip_f16),
        cmocka_unit_test(test_dump_damaged),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
