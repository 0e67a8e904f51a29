/*
 * test_engine.c: libkvstore through its public API: every error path, exact
 * attention and search against double-precision brute force, wave attention
 * at full budget equal to exact, bounded mode, fp16/bf16 storage, and
 * background builds racing with readers and appenders.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <sys/stat.h>
#include <time.h>

#include "kvs_kernels.h"
#include "kvstore.h"

#ifdef KVS_SANITIZER_RUN
#define SCALE_DOWN 4
#else
#define SCALE_DOWN 1
#endif

static _Thread_local uint64_t rng = 0x1234567;
static double urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static float nrand(void) {
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

/* Keys around a few directions plus a shared offset (as real keys are),
 * values Gaussian. fp32, [n][kvh][d]. */
static void make_kv(float *k, float *v, uint32_t n, uint32_t kvh, uint32_t d) {
    float dirs[8][256];
    for (int c = 0; c < 8; c++)
        for (uint32_t t = 0; t < d; t++)
            dirs[c][t] = nrand() * 2;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t h = 0; h < kvh; h++) {
            int c = (int)(urand() * 8);
            for (uint32_t t = 0; t < d; t++) {
                size_t o = ((size_t)i * kvh + h) * d + t;
                k[o] = dirs[c][t] + 0.5f * nrand() + (t % 3 == 0 ? 1.5f : 0);
                v[o] = nrand();
            }
        }
}

/* Softmax attention in double over the first n tokens, one query head. */
static void ref_attend(const float *k, const float *v, uint32_t n, uint32_t kvh,
                       uint32_t h, uint32_t d, const float *q, float scale,
                       double *out) {
    double m = -INFINITY;
    double *s = malloc(n * sizeof(double));
    for (uint32_t i = 0; i < n; i++) {
        double x = 0;
        for (uint32_t t = 0; t < d; t++)
            x += (double)q[t] * k[((size_t)i * kvh + h) * d + t];
        s[i] = x * scale;
        if (s[i] > m)
            m = s[i];
    }
    double z = 0;
    for (uint32_t t = 0; t < d; t++)
        out[t] = 0;
    for (uint32_t i = 0; i < n; i++) {
        double w = exp(s[i] - m);
        z += w;
        for (uint32_t t = 0; t < d; t++)
            out[t] += w * v[((size_t)i * kvh + h) * d + t];
    }
    for (uint32_t t = 0; t < d; t++)
        out[t] /= z;
    free(s);
}

static kvs_store_t *open_small(uint32_t segment_tokens) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = segment_tokens;
    o.n_threads = 2;
    kvs_store_t *s = NULL;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    return s;
}

static const kvs_geometry_t GEO = {2, 4, 2, 32, KVS_DTYPE_F32};

/* What a store gave its log callback (from any of its threads). */
typedef struct logbook_s {
    pthread_mutex_t mu;
    int n;
    int level[8];
    char msg[8][512];
} logbook_t;

static void log_capture(void *ctx, int level, const char *msg) {
    logbook_t *b = ctx;
    pthread_mutex_lock(&b->mu);
    if (b->n < 8) {
        b->level[b->n] = level;
        snprintf(b->msg[b->n], sizeof b->msg[0], "%s", msg);
    }
    b->n++;
    pthread_mutex_unlock(&b->mu);
}

/* Index of the first message at `level` that contains `needle`, or -1. */
static int logbook_find(logbook_t *b, int level, const char *needle) {
    pthread_mutex_lock(&b->mu);
    int at = -1;
    for (int i = 0; i < b->n && i < 8 && at < 0; i++)
        if (b->level[i] == level && strstr(b->msg[i], needle))
            at = i;
    pthread_mutex_unlock(&b->mu);
    return at;
}

static void test_engine_errors(void **state) {
    (void)state;
    kvs_store_t *s = open_small(256);
    kvs_geometry_t g = GEO;
    g.n_q_heads = 3;
    assert_int_equal(kvs_seq_create(s, 1, &g), KVS_EINVAL);
    assert_true(strstr(kvs_store_errmsg(s), "multiple") != NULL);
    g = GEO;
    g.head_dim = 0;
    assert_int_equal(kvs_seq_create(s, 1, &g), KVS_EINVAL);
    g = GEO;
    g.dtype = (kvs_dtype_t)7;
    assert_int_equal(kvs_seq_create(s, 1, &g), KVS_EINVAL);
    assert_int_equal(kvs_seq_create(s, 1, NULL), KVS_EINVAL);
    assert_int_equal(kvs_seq_create(s, 1, &GEO), 0);
    assert_int_equal(kvs_seq_create(s, 1, &GEO), KVS_EEXIST);

    float k[2 * 2 * 32], v[2 * 2 * 32], q[4 * 32], out[4 * 32];
    make_kv(k, v, 2, 2, 32);
    for (int i = 0; i < 4 * 32; i++)
        q[i] = nrand();
    int64_t pos[4 * 3];
    float sc[4 * 3];
    assert_int_equal(kvs_seq_append(s, 2, 0, 2, k, v), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_append(s, 1, 2, 2, k, v), KVS_ERANGE);
    assert_int_equal(kvs_seq_append(s, 1, 0, 0, k, v), KVS_EINVAL);
    assert_int_equal(kvs_seq_append(s, 1, 0, 2, NULL, v), KVS_EINVAL);
    /* Empty layer. */
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, out, NULL), KVS_ERANGE);
    k[5] = NAN;
    assert_int_equal(kvs_seq_append(s, 1, 0, 2, k, v), KVS_ENOTFINITE);
    k[5] = 0;
    v[7] = INFINITY;
    assert_int_equal(kvs_seq_append(s, 1, 0, 2, k, v), KVS_ENOTFINITE);
    v[7] = 0;
    /* Nothing was appended by the failed calls. */
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 1, &info), 0);
    assert_int_equal(info.tokens_max, 0);
    assert_int_equal(kvs_seq_append(s, 1, 0, 2, k, v), 0);
    assert_int_equal(kvs_seq_info(s, 1, &info), 0);
    assert_int_equal(info.tokens_max, 2);
    assert_int_equal(info.tokens_min, 0);
    kvs_geometry_t shape;
    uint64_t layer_tokens = 99;
    assert_int_equal(kvs_seq_shape(s, 1, 0, &shape, &layer_tokens), 0);
    /* Field by field, never memcmp: padding would be compared too. */
    assert_int_equal(shape.n_layers, GEO.n_layers);
    assert_int_equal(shape.n_q_heads, GEO.n_q_heads);
    assert_int_equal(shape.n_kv_heads, GEO.n_kv_heads);
    assert_int_equal(shape.head_dim, GEO.head_dim);
    assert_int_equal(shape.dtype, GEO.dtype);
    assert_int_equal(layer_tokens, 2);
    assert_int_equal(kvs_seq_shape(s, 1, 1, &shape, &layer_tokens), 0);
    assert_int_equal(layer_tokens, 0);
    assert_int_equal(kvs_seq_shape(s, 1, 2, &shape, &layer_tokens), KVS_ERANGE);
    assert_int_equal(kvs_seq_shape(s, 1, 2, &shape, NULL), 0);
    assert_int_equal(kvs_seq_shape(s, 5, 0, &shape, NULL), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_shape(s, 1, 0, NULL, NULL), KVS_EINVAL);

    assert_int_equal(kvs_seq_search(s, 1, 0, q, 3, NULL, pos, sc), KVS_ERANGE);
    assert_int_equal(kvs_seq_search(s, 1, 0, q, 0, NULL, pos, sc), KVS_ERANGE);
    assert_int_equal(kvs_seq_search(s, 1, 0, q, 2, NULL, pos, sc), 0);
    assert_int_equal(kvs_seq_search(s, 1, 5, q, 2, NULL, pos, sc), KVS_ERANGE);
    assert_int_equal(kvs_seq_search(s, 1, 0, NULL, 2, NULL, pos, sc),
                     KVS_EINVAL);
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, NULL, NULL), KVS_EINVAL);
    q[3] = NAN;
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, out, NULL),
                     KVS_ENOTFINITE);
    q[3] = 0;
    kvs_query_params_t p;
    kvs_query_params_default(&p);
    p.retrieval_fraction = 2;
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, &p, out, NULL), KVS_EINVAL);
    p.retrieval_fraction = 0.5f;
    p.mode = (kvs_mode_t)9;
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, &p, out, NULL), KVS_EINVAL);
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, out, NULL), 0);

    assert_int_equal(kvs_seq_drop(s, 1), 0);
    assert_int_equal(kvs_seq_drop(s, 1), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, out, NULL), KVS_ENOSEQ);
    assert_true(strstr(kvs_store_errmsg(s), "unknown sequence") != NULL);
    assert_int_equal(kvs_seq_info(s, 1, &info), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_wait_indexed(s, 1), KVS_ENOSEQ);
    /* The id is free again after a drop. */
    assert_int_equal(kvs_seq_create(s, 1, &GEO), 0);
    kvs_store_close(s);

    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 60; /* not above sink + window */
    assert_int_equal(kvs_store_open(&o, &s), KVS_EINVAL);
    assert_int_equal(kvs_store_open(NULL, NULL), KVS_EINVAL);
    assert_string_equal(kvs_strerror(KVS_ENOSEQ), "unknown sequence");
    assert_string_equal(kvs_err_name(KVS_ENOTFINITE), "KVS_ENOTFINITE");
}

typedef struct fixture_s {
    kvs_store_t *s;
    float *k, *v;
    uint32_t n, kvh, qh, d;
} fixture_t;

/* A store with one sequence of n tokens over both layers, built. */
static fixture_t build_fixture(uint32_t n, uint32_t segment_tokens,
                               kvs_dtype_t dtype) {
    fixture_t f = {0};
    f.s = open_small(segment_tokens);
    f.n = n;
    f.kvh = 2;
    f.qh = 4;
    f.d = 32;
    kvs_geometry_t g = {2, f.qh, f.kvh, f.d, dtype};
    assert_int_equal(kvs_seq_create(f.s, 7, &g), 0);
    size_t elems = (size_t)n * f.kvh * f.d;
    f.k = malloc(elems * 4);
    f.v = malloc(elems * 4);
    make_kv(f.k, f.v, n, f.kvh, f.d);
    void *ck = malloc(elems * 4), *cv = malloc(elems * 4);
    kvs_from_f32(dtype, f.k, ck, elems);
    kvs_from_f32(dtype, f.v, cv, elems);
    /* The reference sees the stored (rounded) values. */
    kvs_to_f32(dtype, ck, f.k, elems);
    kvs_to_f32(dtype, cv, f.v, elems);
    size_t esz = kvs_dtype_size(dtype);
    /* Uneven chunks, so segments are cut mid-append. */
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t i = 0; i < n;) {
            uint32_t m = 1 + (uint32_t)(urand() * 300);
            if (m > n - i)
                m = n - i;
            size_t off = (size_t)i * f.kvh * f.d * esz;
            assert_int_equal(kvs_seq_append(f.s, 7, l, m, (char *)ck + off,
                                            (char *)cv + off),
                             0);
            i += m;
        }
    free(ck);
    free(cv);
    assert_int_equal(kvs_seq_wait_indexed(f.s, 7), 0);
    return f;
}

static void free_fixture(fixture_t *f) {
    kvs_store_close(f->s);
    free(f->k);
    free(f->v);
}

static double max_err_vs_ref(fixture_t *f, const float *q, const float *out) {
    double worst = 0, ref[256];
    float scale = 1.0f / sqrtf((float)f->d);
    for (uint32_t i = 0; i < f->qh; i++) {
        ref_attend(f->k, f->v, f->n, f->kvh, i / (f->qh / f->kvh), f->d,
                   q + i * f->d, scale, ref);
        for (uint32_t t = 0; t < f->d; t++) {
            double e = fabs(ref[t] - out[i * f->d + t]);
            if (e > worst)
                worst = e;
        }
    }
    return worst;
}

/* Exact mode walks the rows in chunks merged by log-sum-exp: the result
 * must equal one-shot softmax in double. */
static void test_engine_exact_lse_merge(void **state) {
    (void)state;
    fixture_t f = build_fixture(3000, 512, KVS_DTYPE_F32);
    float q[4 * 32], out[4 * 32];
    for (int r = 0; r < 5; r++) {
        for (int i = 0; i < 4 * 32; i++)
            q[i] = nrand() * 0.7f;
        kvs_query_params_t p;
        kvs_query_params_default(&p);
        p.mode = KVS_MODE_EXACT;
        kvs_attend_stats_t st;
        assert_int_equal(kvs_seq_attend(f.s, 7, 1, q, &p, out, &st), 0);
        assert_true(max_err_vs_ref(&f, q, out) < 1e-5);
        assert_int_equal(st.keys_exact, 3000 * 2);
        assert_int_equal(st.keys_total, 3000 * 2);
    }
    free_fixture(&f);
}

/* With retrieval covering every cluster, wave = exact (each token is
 * attended exactly once: steady members are masked in their clusters). */
static void test_engine_wave_full_budget_equals_exact(void **state) {
    (void)state;
    kvs_dtype_t dts[] = {KVS_DTYPE_F32, KVS_DTYPE_F16, KVS_DTYPE_BF16};
    for (int di = 0; di < 3; di++) {
        fixture_t f = build_fixture(2500, 512, dts[di]);
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(f.s, 7, &info), 0);
        assert_int_equal(info.indexed_tokens, 2 * 2048); /* 4 segs x 2 layers */
        assert_int_equal(info.segments, 2 * 2 * 4);
        assert_true(info.index_bytes > 0);
        float q[4 * 32], out[4 * 32];
        for (int r = 0; r < 4; r++) {
            for (int i = 0; i < 4 * 32; i++)
                q[i] = nrand();
            kvs_query_params_t p;
            kvs_query_params_default(&p);
            p.retrieval_fraction = 1;
            p.estimation_fraction = 0;
            kvs_attend_stats_t st;
            assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, &st), 0);
            double tol = dts[di] == KVS_DTYPE_F32 ? 1e-5 : 1e-4;
            assert_true(max_err_vs_ref(&f, q, out) < tol);
            assert_int_equal(st.keys_exact, 2500 * 2);
            /* Every key is attended exactly; the only clusters skipped are
             * those whose members are all steady (nothing left to
             * retrieve), which depends on the clustering. */
            assert_int_equal(st.clusters_retrieved + st.clusters_skipped,
                             st.clusters_total);
            assert_true(st.clusters_skipped <= 2 * 2 * 4);
            /* sinks 4 + window 64 + tail 452, per KV head */
            assert_int_equal(st.keys_steady, (4 + 64 + 452) * 2);
            /* Bounded mode with epsilon 0 retrieves everything too. */
            p.budget = KVS_BUDGET_BOUNDED;
            p.epsilon = 0;
            p.retrieval_fraction = 0.01f;
            assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, &st), 0);
            assert_true(max_err_vs_ref(&f, q, out) < tol);
        }
        free_fixture(&f);
    }
}

/* Multi-query attention, more query heads per KV head than the kernels
 * take at once (40 on 1, as Falcon-style models have): accepted; exact
 * mode equals a double-precision softmax per head; wave mode at full
 * retrieval equals it too; the default wave answers every head, each
 * group of 16 as a call of its own would (bit for bit), and search gives
 * every head the exact top keys at full budget. */
static void test_engine_multi_query(void **state) {
    (void)state;
    /* the tests after this one draw the data they drew before it existed
     * (their thresholds were measured on it) */
    const uint64_t rng_before = rng;
    enum { QH = 40, N = 1500, D = 32 };
    const kvs_geometry_t geo = {1, QH, 1, D, KVS_DTYPE_F32};
    kvs_store_t *s = open_small(512);
    assert_int_equal(kvs_seq_create(s, 3, &geo), 0);
    float *k = malloc(sizeof(float) * N * D),
          *v = malloc(sizeof(float) * N * D);
    make_kv(k, v, N, 1, D);
    assert_int_equal(kvs_seq_append(s, 3, 0, N, k, v), 0);
    assert_int_equal(kvs_seq_wait_indexed(s, 3), 0);
    float q[QH * D], out[QH * D], part[16 * D];
    for (int i = 0; i < QH * D; i++)
        q[i] = nrand() * 0.7f;
    const float scale = 1.0f / sqrtf((float)D);
    kvs_query_params_t p;
    kvs_query_params_default(&p);
    p.mode = KVS_MODE_EXACT;
    assert_int_equal(kvs_seq_attend(s, 3, 0, q, &p, out, NULL), 0);
    double ref[D];
    for (int h = 0; h < QH; h++) {
        ref_attend(k, v, N, 1, 0, D, q + h * D, scale, ref);
        for (int t = 0; t < D; t++)
            assert_true(fabs(out[h * D + t] - ref[t]) < 1e-5);
    }
    kvs_query_params_default(&p);
    p.retrieval_fraction = 1;
    p.estimation_fraction = 0;
    assert_int_equal(kvs_seq_attend(s, 3, 0, q, &p, out, NULL), 0);
    for (int h = 0; h < QH; h++) {
        ref_attend(k, v, N, 1, 0, D, q + h * D, scale, ref);
        for (int t = 0; t < D; t++)
            assert_true(fabs(out[h * D + t] - ref[t]) < 1e-5);
    }
    /* default wave: groups of 16, 16, 8 query heads, each as its own call
     * on a store of that geometry would give */
    kvs_attend_stats_t st;
    assert_int_equal(kvs_seq_attend(s, 3, 0, q, NULL, out, &st), 0);
    assert_true(st.keys_exact > 0 && st.keys_exact < st.keys_total);
    const uint32_t groups[3][2] = {{0, 16}, {16, 16}, {32, 8}};
    for (int gi = 0; gi < 3; gi++) {
        const kvs_geometry_t gg = {1, groups[gi][1], 1, D, KVS_DTYPE_F32};
        uint64_t id = 10 + (uint64_t)gi;
        assert_int_equal(kvs_seq_create(s, id, &gg), 0);
        assert_int_equal(kvs_seq_append(s, id, 0, N, k, v), 0);
        assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
        assert_int_equal(
            kvs_seq_attend(s, id, 0, q + groups[gi][0] * D, NULL, part, NULL),
            0);
        assert_memory_equal(part, out + groups[gi][0] * D,
                            sizeof(float) * groups[gi][1] * D);
    }
    int64_t pos[QH * 4];
    float sc[QH * 4];
    kvs_query_params_t x;
    kvs_query_params_default(&x);
    x.retrieval_fraction = 1;
    assert_int_equal(kvs_seq_search(s, 3, 0, q, 4, &x, pos, sc), 0);
    for (int h = 0; h < QH; h++) {
        float best = -INFINITY;
        for (int i = 0; i < N; i++) {
            float d = 0;
            for (int t = 0; t < D; t++)
                d += q[h * D + t] * k[i * D + t];
            best = d > best ? d : best;
        }
        assert_true(pos[h * 4] >= 0);
        assert_true(fabsf(sc[h * 4] - best) < 1e-4f * (1 + fabsf(best)));
    }
    free(k);
    free(v);
    kvs_store_close(s);
    rng = rng_before;
}

/*
 * cuda_device on a store without a usable GPU (no CUDA in the build, or no
 * device): the store opens, says why it serves from the CPU, and answers
 * exactly as a store without the option. (The GPU comparison itself is
 * tests/gpu/test_engine_gpu.c, run on the GPU machine.)
 */
static void test_engine_cuda_option_without_gpu(void **state) {
    (void)state;
    kvs_options_t o;
    kvs_options_default(&o);
    assert_int_equal(o.cuda_device, -1);
    o.cuda_device = 0;
    o.cuda_cache_fraction = 0;
    kvs_store_t *bad = NULL;
    assert_int_equal(kvs_store_open(&o, &bad), KVS_EINVAL);
    assert_null(bad);
    assert_non_null(strstr(kvs_store_open_error(), "cuda_cache_fraction"));

    fixture_t f = build_fixture(2500, 512, KVS_DTYPE_BF16);
    kvs_options_default(&o);
    o.segment_tokens = 512;
    o.cuda_device = 0;
    logbook_t book = {.mu = PTHREAD_MUTEX_INITIALIZER};
    o.log = log_capture;
    o.log_ctx = &book;
    kvs_store_t *g = NULL;
    assert_int_equal(kvs_store_open(&o, &g), 0);
    const char *info = kvs_store_gpu_info(g);
    if (strncmp(info, "CPU (", 5) != 0) {
        /* a GPU is here after all: test_engine_gpu covers this case */
        kvs_store_close(g);
        free_fixture(&f);
        skip();
    }
    /* The open said why through the log callback. */
    int at = logbook_find(&book, KVS_LOG_WARN, "GPU path unavailable");
    assert_true(at >= 0);
    char reason[192]; /* gpu_info is "CPU (reason)" */
    snprintf(reason, sizeof reason, "%s", info + 5);
    reason[strlen(reason) - 1] = 0;
    assert_non_null(strstr(book.msg[at], reason));
    assert_string_equal(kvs_store_gpu_info(f.s), "CPU (no cuda_device)");
    kvs_geometry_t geo = {2, f.qh, f.kvh, f.d, KVS_DTYPE_BF16};
    assert_int_equal(kvs_seq_create(g, 7, &geo), 0);
    size_t elems = (size_t)f.n * f.kvh * f.d;
    uint16_t *ck = malloc(elems * 2), *cv = malloc(elems * 2);
    kvs_from_f32(KVS_DTYPE_BF16, f.k, ck, elems);
    kvs_from_f32(KVS_DTYPE_BF16, f.v, cv, elems);
    for (uint32_t l = 0; l < 2; l++)
        assert_int_equal(kvs_seq_append(g, 7, l, f.n, ck, cv), 0);
    assert_int_equal(kvs_seq_wait_indexed(g, 7), 0);
    float q[4 * 32], a[4 * 32], b[4 * 32];
    for (int r = 0; r < 8; r++) {
        for (int i = 0; i < 4 * 32; i++)
            q[i] = nrand();
        assert_int_equal(kvs_seq_attend(f.s, 7, r & 1, q, NULL, a, NULL), 0);
        assert_int_equal(kvs_seq_attend(g, 7, r & 1, q, NULL, b, NULL), 0);
        assert_memory_equal(a, b, sizeof a);
    }
    /* device-memory queries need the GPU path: refused, with the reason;
     * nothing is read through the pointers */
    assert_int_equal(kvs_seq_attend_device(g, 7, 0, q, 4 * 32, NULL, b, NULL),
                     KVS_ENOTSUP);
    assert_non_null(strstr(kvs_store_errmsg(g), "no GPU"));
    assert_int_equal(kvs_seq_attend_device(f.s, 7, 0, q, 4 * 32, NULL, b, NULL),
                     KVS_ENOTSUP);
    assert_int_equal(
        kvs_seq_attend_device(g, 7, 0, NULL, 4 * 32, NULL, b, NULL),
        KVS_EINVAL);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(g, &st), 0);
    assert_int_equal(st.gpu_device, -1);
    assert_int_equal(st.gpu_attends, 0);
    assert_int_equal(st.gpu_bytes, 0);
    free(ck);
    free(cv);
    kvs_store_close(g);
    free_fixture(&f);
}

/*
 * kvs_seq_attend_batch: six sequences of one layer in one call give, row by
 * row, what kvs_seq_attend gives each alone (bit for bit: same index, same
 * code); an unknown sequence and one of another geometry fail only their
 * rows (ENOSEQ, EGEOMETRY), named in the message, the rest are computed.
 */
static void test_engine_attend_batch(void **state) {
    (void)state;
    kvs_store_t *s = open_small(256);
    enum { NS = 6, T = 1500 };
    const uint32_t kvh = GEO.n_kv_heads, d = GEO.head_dim;
    const size_t row = (size_t)GEO.n_q_heads * d;
    float *k = malloc((size_t)T * kvh * d * sizeof(float));
    float *v = malloc((size_t)T * kvh * d * sizeof(float));
    uint64_t ids[NS];
    for (int i = 0; i < NS; i++) {
        ids[i] = 100 + (uint64_t)i;
        assert_int_equal(kvs_seq_create(s, ids[i], &GEO), 0);
        make_kv(k, v, T - 100 * (uint32_t)i, kvh, d);
        for (uint32_t l = 0; l < GEO.n_layers; l++)
            assert_int_equal(
                kvs_seq_append(s, ids[i], l, T - 100 * (uint32_t)i, k, v), 0);
        assert_int_equal(kvs_seq_wait_indexed(s, ids[i]), 0);
    }
    float q[NS * 4 * 32], got[NS * 4 * 32], one[4 * 32];
    for (size_t i = 0; i < NS * row; i++)
        q[i] = nrand();
    int rcs[NS];
    kvs_attend_stats_t st[NS];
    assert_int_equal(
        kvs_seq_attend_batch(s, NS, ids, 1, q, row, NULL, got, rcs, st), 0);
    for (int i = 0; i < NS; i++) {
        kvs_attend_stats_t one_st;
        assert_int_equal(rcs[i], 0);
        assert_int_equal(
            kvs_seq_attend(s, ids[i], 1, q + i * row, NULL, one, &one_st), 0);
        assert_memory_equal(one, got + i * row, sizeof one);
        assert_int_equal(st[i].keys_total, one_st.keys_total);
        assert_int_equal(st[i].keys_exact, one_st.keys_exact);
    }
    /* a bad row fails alone */
    kvs_geometry_t other = GEO;
    other.head_dim = 16;
    assert_int_equal(kvs_seq_create(s, 200, &other), 0);
    assert_int_equal(kvs_seq_append(s, 200, 1, 10, k, v), 0);
    uint64_t bad[NS];
    memcpy(bad, ids, sizeof bad);
    bad[2] = 999; /* unknown */
    bad[4] = 200; /* another shape */
    memset(got, 0, sizeof got);
    int rc = kvs_seq_attend_batch(s, NS, bad, 1, q, row, NULL, got, rcs, NULL);
    assert_int_equal(rc, KVS_ENOSEQ);
    assert_non_null(strstr(kvs_store_errmsg(s), "sequence 999 (batch row 2)"));
    assert_int_equal(rcs[2], KVS_ENOSEQ);
    assert_int_equal(rcs[4], KVS_EGEOMETRY);
    for (int i = 0; i < NS; i++) {
        if (i == 2 || i == 4)
            continue;
        assert_int_equal(rcs[i], 0);
        assert_int_equal(
            kvs_seq_attend(s, ids[i], 1, q + i * row, NULL, one, NULL), 0);
        assert_memory_equal(one, got + i * row, sizeof one);
    }
    /* the failed row's own detail reaches the caller's message */
    bad[2] = ids[2];
    rc = kvs_seq_attend_batch(s, NS, bad, 1, q, row, NULL, got, rcs, NULL);
    assert_int_equal(rc, KVS_EGEOMETRY);
    assert_non_null(strstr(kvs_store_errmsg(s), "sequence 200 (batch row 4)"));
    assert_non_null(strstr(kvs_store_errmsg(s), "head_dim 16"));
    /* a sequence twice: refused as a whole */
    bad[4] = ids[0];
    assert_int_equal(
        kvs_seq_attend_batch(s, NS, bad, 1, q, row, NULL, got, rcs, NULL),
        KVS_EINVAL);
    assert_non_null(strstr(kvs_store_errmsg(s), "sequence 100 appears twice"));
    /* argument errors; an empty batch is a no-op */
    assert_int_equal(
        kvs_seq_attend_batch(s, 0, NULL, 0, NULL, 0, NULL, NULL, NULL, NULL),
        0);
    assert_int_equal(
        kvs_seq_attend_batch(s, NS, ids, 1, NULL, row, NULL, got, NULL, NULL),
        KVS_EINVAL);
    assert_int_equal(
        kvs_seq_attend_batch(s, NS, ids, 1, q, 0, NULL, got, NULL, NULL),
        KVS_EINVAL);
    free(k);
    free(v);
    kvs_store_close(s);
}

/* Default budgets: zone sizes as documented, output close to exact. */
static double rel_l2(const float *a, const float *ref, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        e += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        r += (double)ref[i] * ref[i];
    }
    return sqrt(e / r);
}

/* The default attend ranks by codes: per head, the steady zone plus
 * ceil(0.018 x indexed keys) keys read in full, chosen by 4-bit code score
 * from clusters taken in centroid-and-spread order until 16x as many keys
 * are scored;
 * the next 0.5 of the clusters estimated. KVS_RANK_CENTROID is the
 * index before codes: 0.018 / 0.5 of the clusters, every member of the
 * retrieval clusters read in full. */
static void test_engine_wave_default_zones(void **state) {
    (void)state;
    fixture_t f = build_fixture(4096 + 100, 1024, KVS_DTYPE_F32);
    float q[4 * 32], out[4 * 32], ex[4 * 32], cen[4 * 32], cod[4 * 32];
    for (int i = 0; i < 4 * 32; i++)
        q[i] = nrand();
    kvs_attend_stats_t st;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, NULL, out, &st), 0);
    /* 4 segments of 1024 / 16 = 64 clusters, fewer if any came out empty. */
    uint64_t C = st.clusters_total / 2;
    assert_true(C <= 256 && C >= 200);
    /* Steady: 4 sinks + the last 64 indexed + the 100-token tail, per
     * KV head; full reads beyond it: ceil(0.018 x 4096) = 74 per head. */
    assert_int_equal(st.keys_total, 2 * (4096 + 100));
    assert_int_equal(st.keys_steady, 2 * (4 + 64 + 100));
    assert_int_equal(st.keys_exact, st.keys_steady + 2 * 74);
    /* Codes of 16 x 74 = 1184 keys are scanned per head: at ~16 keys a
     * cluster that is far more clusters than the centroid path's 5. */
    assert_true(st.clusters_retrieved >= 2 * (1184 / 32));
    assert_true(st.clusters_retrieved > 2 * (uint64_t)ceil(0.018 * C));
    assert_true(st.clusters_retrieved < 2 * C);
    assert_true(st.clusters_estimated <= 2 * (uint64_t)ceil(0.5 * C));
    assert_true(st.clusters_estimated > 0);
    assert_int_equal(st.clusters_total, st.clusters_retrieved +
                                            st.clusters_estimated +
                                            st.clusters_skipped);
    assert_true(st.seconds > 0);

    /* DEFAULT and KVS_RANK_CODES by name are the same call, bit for bit. */
    kvs_query_params_t p;
    memset(&p, 0, sizeof p);
    p.rank = KVS_RANK_CODES;
    kvs_attend_stats_t sc;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, cod, &sc), 0);
    for (int i = 0; i < 4 * 32; i++)
        assert_true(cod[i] == out[i]);
    assert_int_equal(sc.keys_exact, st.keys_exact);
    assert_int_equal(sc.clusters_retrieved, st.clusters_retrieved);

    /* The centroid ranking keeps its zone sizes. */
    p.rank = KVS_RANK_CENTROID;
    kvs_attend_stats_t sk;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, cen, &sk), 0);
    assert_int_equal(sk.clusters_total, st.clusters_total);
    assert_int_equal(sk.clusters_retrieved, 2 * (uint64_t)ceil(0.018 * C));
    assert_int_equal(sk.clusters_estimated, 2 * (uint64_t)ceil(0.5 * C));
    assert_int_equal(sk.keys_steady, st.keys_steady);
    assert_true(sk.keys_exact < sk.keys_total / 4);

    /* Random keys spread attention over the whole context, so neither
     * path is close at ~2% of keys; the codes path is still the nearer
     * one, at about the same keys read in full (0.37 vs 0.52 here). */
    kvs_query_params_default(&p);
    p.mode = KVS_MODE_EXACT;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, ex, NULL), 0);
    double e_codes = rel_l2(out, ex, 4 * 32), e_cen = rel_l2(cen, ex, 4 * 32);
    print_message("rel. L2 vs exact: codes %.4f (%llu keys exact), "
                  "centroid %.4f (%llu)\n",
                  e_codes, (unsigned long long)st.keys_exact, e_cen,
                  (unsigned long long)sk.keys_exact);
    assert_true(isfinite(e_codes) && isfinite(e_cen));
    assert_true(e_codes < 0.8 * e_cen);

    /* Codes with the bounded budget, or an unknown rank: refused. */
    kvs_query_params_default(&p);
    p.budget = KVS_BUDGET_BOUNDED;
    p.rank = KVS_RANK_CODES;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, NULL), KVS_EINVAL);
    p.budget = KVS_BUDGET_FIXED;
    p.rank = (kvs_rank_t)3;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, NULL), KVS_EINVAL);
    int64_t pos[4 * 8];
    float sco[4 * 8];
    assert_int_equal(kvs_seq_search(f.s, 7, 0, q, 8, &p, pos, sco), KVS_EINVAL);

    /* A tighter epsilon never retrieves fewer keys (bounded: centroid). */
    kvs_query_params_default(&p);
    p.budget = KVS_BUDGET_BOUNDED;
    p.epsilon = 0.2f;
    kvs_attend_stats_t a, b;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, &a), 0);
    p.epsilon = 0.01f;
    assert_int_equal(kvs_seq_attend(f.s, 7, 0, q, &p, out, &b), 0);
    assert_true(b.keys_exact >= a.keys_exact);
    for (int i = 0; i < 4 * 32; i++)
        assert_true(isfinite(out[i]));
    free_fixture(&f);
}

/* Deterministic mode: an attend right after the append that completes a
 * segment sees that segment indexed (never the tail it came from), so two
 * stores fed the same appends and queries give bit-identical outputs. */
static void run_deterministic(float *outs, uint64_t *clusters, int rounds) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 512;
    o.n_threads = 2;
    o.n_build_threads = 2;
    o.deterministic = 1;
    kvs_store_t *s = NULL;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    const kvs_geometry_t g = {1, 4, 2, 32, KVS_DTYPE_F32};
    assert_int_equal(kvs_seq_create(s, 3, &g), 0);
    const uint32_t chunk = 128, row = 2 * 32;
    float *k = malloc(sizeof(float) * chunk * row);
    float *v = malloc(sizeof(float) * chunk * row);
    float q[4 * 32];
    rng = 0x5eed;
    for (int r = 0; r < rounds; r++) {
        make_kv(k, v, chunk, 2, 32);
        for (int i = 0; i < 4 * 32; i++)
            q[i] = nrand();
        assert_int_equal(kvs_seq_append(s, 3, 0, chunk, k, v), 0);
        kvs_attend_stats_t st;
        assert_int_equal(
            kvs_seq_attend(s, 3, 0, q, NULL, outs + (size_t)r * 4 * 32, &st),
            0);
        clusters[r] = st.clusters_total;
    }
    free(k);
    free(v);
    kvs_store_close(s);
}

static void test_engine_deterministic(void **state) {
    (void)state;
    enum { ROUNDS = 24 }; /* 3072 tokens: 6 segments of 512 */
    float *a = malloc(sizeof(float) * ROUNDS * 4 * 32);
    float *b = malloc(sizeof(float) * ROUNDS * 4 * 32);
    uint64_t ca[ROUNDS], cb[ROUNDS];
    run_deterministic(a, ca, ROUNDS);
    run_deterministic(b, cb, ROUNDS);
    for (int r = 0; r < ROUNDS; r++) {
        /* every complete segment is indexed by the time the call runs */
        const uint32_t tokens = (uint32_t)(r + 1) * 128;
        if (tokens >= 512)
            assert_true(ca[r] > 0);
        else
            assert_int_equal(ca[r], 0);
        assert_int_equal(ca[r], cb[r]);
    }
    assert_memory_equal(a, b, sizeof(float) * ROUNDS * 4 * 32);
    free(a);
    free(b);
}

static int rm_entry(const char *path, const struct stat *st, int flag,
                    struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

/* Per-sequence bookkeeping counts in resident_bytes and memory_bytes, and
 * max_sequences caps the count: empty sequences cannot take unbounded RAM. */
static void test_engine_sequence_limits(void **state) {
    (void)state;
    /* 16 layers: a drop, and a page-in (the warm-up of a lazy open too),
     * hold every layer's append lock and rwlock at once (2 per layer), and
     * TSan's deadlock detector stops at 64 locks held by one thread. */
    const kvs_geometry_t g = {16, 64, 64, 64, KVS_DTYPE_BF16};
    kvs_store_t *s = open_small(1024);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.resident_bytes, 0);
    assert_int_equal(kvs_seq_create(s, 1, &g), 0);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    const uint64_t meta = st.resident_bytes;
    assert_true(meta >= 16ull * 64 * 40); /* every (layer, head) counted */
    assert_int_equal(kvs_seq_drop(s, 1), 0);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.resident_bytes, 0);
    kvs_store_close(s);

    char dir[] = "/tmp/kvs_test_limits_XXXXXX";
    assert_non_null(mkdtemp(dir));
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.sync = KVS_SYNC_NONE;
    o.memory_bytes = 2 * meta + meta / 2;
    o.max_sequences = 3;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    assert_int_equal(kvs_seq_create(s, 1, &g), 0);
    assert_int_equal(kvs_seq_create(s, 2, &g), 0);
    assert_int_equal(kvs_seq_create(s, 3, &g), KVS_ENOMEM);
    assert_non_null(strstr(kvs_store_errmsg(s), "memory_bytes"));
    assert_int_equal(kvs_seq_fork(s, 1, 0, 4), KVS_ENOMEM);
    assert_int_equal(kvs_seq_drop(s, 2), 0);
    assert_int_equal(kvs_seq_create(s, 3, &g), 0);
    /* small geometries fit the budget; the count limit stops them */
    const kvs_geometry_t small = {1, 1, 1, 8, KVS_DTYPE_F32};
    assert_int_equal(kvs_seq_create(s, 5, &small), 0);
    assert_int_equal(kvs_seq_create(s, 6, &small), KVS_ETOOBIG);
    assert_int_equal(kvs_seq_fork(s, 5, 0, 7), KVS_ETOOBIG);
    assert_non_null(strstr(kvs_store_errmsg(s), "max_sequences"));
    kvs_store_close(s);
    /* a reopen counts what it loads */
    o.max_sequences = 0;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_true(st.resident_bytes >= 2 * meta);
    assert_int_equal(kvs_seq_create(s, 8, &g), KVS_ENOMEM);
    kvs_store_close(s);
    /* nftw, not system("rm -rf"): no fork of a threaded process (TSan) */
    assert_int_equal(nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
}

static void test_engine_search(void **state) {
    (void)state;
    fixture_t f = build_fixture(2100, 512, KVS_DTYPE_F32);
    float q[4 * 32];
    for (int i = 0; i < 4 * 32; i++)
        q[i] = nrand();
    enum { K = 20 };
    int64_t pos[4 * K], pos2[4 * K];
    float sc[4 * K], sc2[4 * K];
    kvs_query_params_t p;
    kvs_query_params_default(&p);
    p.mode = KVS_MODE_EXACT;
    assert_int_equal(kvs_seq_search(f.s, 7, 1, q, K, &p, pos, sc), 0);
    for (uint32_t i = 0; i < 4; i++) {
        uint32_t h = i / 2;
        double *all = malloc(f.n * sizeof(double));
        for (uint32_t j = 0; j < f.n; j++) {
            double x = 0;
            for (uint32_t t = 0; t < 32; t++)
                x += (double)q[i * 32 + t] * f.k[((size_t)j * 2 + h) * 32 + t];
            all[j] = x;
        }
        for (int r = 0; r < K; r++) {
            assert_true(pos[i * K + r] >= 0 && pos[i * K + r] < 2100);
            assert_float_equal(sc[i * K + r], all[pos[i * K + r]], 1e-4);
            if (r)
                assert_true(sc[i * K + r] <= sc[i * K + r - 1]);
            /* Nothing outside the list beats its last entry. */
        }
        int better = 0;
        for (uint32_t j = 0; j < f.n; j++)
            if (all[j] > sc[i * K + K - 1] + 1e-4)
                better++;
        assert_true(better <= K - 1);
        free(all);
    }
    /* Wave search at 100% retrieval finds the same keys. */
    p.mode = KVS_MODE_WAVE;
    p.retrieval_fraction = 1;
    assert_int_equal(kvs_seq_search(f.s, 7, 1, q, K, &p, pos2, sc2), 0);
    for (int i = 0; i < 4 * K; i++) {
        assert_int_equal(pos[i], pos2[i]);
        assert_float_equal(sc[i], sc2[i], 1e-5);
    }
    /* Default wave search returns valid, sorted, distinct results. */
    assert_int_equal(kvs_seq_search(f.s, 7, 1, q, K, NULL, pos2, sc2), 0);
    for (int i = 0; i < 4; i++)
        for (int r = 1; r < K; r++)
            if (pos2[i * K + r] >= 0) {
                assert_true(sc2[i * K + r] <= sc2[i * K + r - 1]);
                assert_true(pos2[i * K + r] != pos2[i * K + r - 1]);
            }
    free_fixture(&f);
}

/* Readers and a writer on one sequence while segments are built. */
typedef struct race_s {
    kvs_store_t *s;
    int stop;
    int failures;
    pthread_mutex_t mu;
} race_t;

static void *reader(void *arg) {
    race_t *r = arg;
    float q[4 * 32], out[4 * 32];
    int64_t pos[4 * 8];
    float sc[4 * 8];
    for (int i = 0; i < 4 * 32; i++)
        q[i] = nrand();
    int n = 0;
    while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE) || n < 5) {
        int rc = kvs_seq_attend(r->s, 9, 0, q, NULL, out, NULL);
        int rc2 = kvs_seq_search(r->s, 9, 0, q, 8, NULL, pos, sc);
        int bad = (rc && rc != KVS_ERANGE) || (rc2 && rc2 != KVS_ERANGE);
        for (int i = 0; !rc && i < 4 * 32; i++)
            bad |= !isfinite(out[i]);
        if (bad) {
            pthread_mutex_lock(&r->mu);
            r->failures++;
            pthread_mutex_unlock(&r->mu);
        }
        n++;
    }
    return NULL;
}

static void test_engine_build_races_readers(void **state) {
    (void)state;
    race_t r = {.s = open_small(256)};
    pthread_mutex_init(&r.mu, NULL);
    assert_int_equal(kvs_seq_create(r.s, 9, &GEO), 0);
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, reader, &r);
    uint32_t n = 6000 / SCALE_DOWN;
    float *k = malloc((size_t)n * 2 * 32 * 4),
          *v = malloc((size_t)n * 2 * 32 * 4);
    make_kv(k, v, n, 2, 32);
    for (uint32_t i = 0; i < n; i += 50)
        for (uint32_t l = 0; l < 2; l++)
            assert_int_equal(kvs_seq_append(r.s, 9, l, 50, k + (size_t)i * 64,
                                            v + (size_t)i * 64),
                             0);
    __atomic_store_n(&r.stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(r.failures, 0);
    assert_int_equal(kvs_seq_wait_indexed(r.s, 9), 0);
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(r.s, 9, &info), 0);
    assert_int_equal(info.tokens_min, n);
    assert_int_equal(info.indexed_tokens, 2 * (n / 256) * 256);
    assert_int_equal(info.builds_pending, 0);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(r.s, &st), 0);
    assert_int_equal(st.sequences, 1);
    assert_int_equal(st.build_keys, 2 * 2 * (n / 256) * 256);
    /* Drop while builds may still be queued on another sequence. */
    assert_int_equal(kvs_seq_create(r.s, 10, &GEO), 0);
    for (uint32_t i = 0; i + 600 <= n; i += 600)
        assert_int_equal(kvs_seq_append(r.s, 10, 0, 600, k + (size_t)i * 64,
                                        v + (size_t)i * 64),
                         0);
    assert_int_equal(kvs_seq_drop(r.s, 10), 0);
    uint64_t ids[4];
    size_t nids;
    assert_int_equal(kvs_store_list(r.s, ids, 4, &nids), 0);
    assert_int_equal(nids, 1);
    assert_int_equal(ids[0], 9);
    kvs_store_close(r.s);
    free(k);
    free(v);
    pthread_mutex_destroy(&r.mu);
}

/* A fork shares the parent's segments, copies the rows past them, and is
 * independent afterwards. */
static void test_engine_fork(void **state) {
    (void)state;
    fixture_t f = build_fixture(1300, 256, KVS_DTYPE_F32);
    kvs_store_t *s = f.s;
    /* at 1000: segments 0..767 shared (3 x 256), 768..999 copied */
    assert_int_equal(kvs_seq_fork(s, 7, 1000, 8), 0);
    assert_int_equal(kvs_seq_fork(s, 7, 1000, 8), KVS_EEXIST);
    assert_int_equal(kvs_seq_fork(s, 7, 1301, 9), KVS_ERANGE);
    assert_int_equal(kvs_seq_fork(s, 99, 10, 9), KVS_ENOSEQ);
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 8, &info), 0);
    assert_int_equal(info.tokens_max, 1000);
    assert_int_equal(info.tokens_min, 1000);
    assert_int_equal(info.segments, 2 * 2 * 3);
    /* The child's first 1000 tokens equal the parent's. */
    size_t row = (size_t)f.kvh * f.d;
    float *a = malloc(1000 * row * 4), *b = malloc(1000 * row * 4);
    float *va = malloc(1000 * row * 4), *vb = malloc(1000 * row * 4);
    assert_int_equal(kvs_seq_read(s, 7, 1, 0, 1000, a, va), 0);
    assert_int_equal(kvs_seq_read(s, 8, 1, 0, 1000, b, vb), 0);
    assert_memory_equal(a, b, 1000 * row * 4);
    assert_memory_equal(va, vb, 1000 * row * 4);
    assert_memory_equal(a, f.k, 1000 * row * 4);
    /* Exact attention of the child = reference over its 1000 tokens. */
    float q[4 * 32], out[4 * 32];
    for (int i = 0; i < 4 * 32; i++)
        q[i] = nrand();
    kvs_query_params_t p;
    kvs_query_params_default(&p);
    p.mode = KVS_MODE_EXACT;
    assert_int_equal(kvs_seq_attend(s, 8, 0, q, &p, out, NULL), 0);
    uint32_t n_saved = f.n;
    f.n = 1000;
    assert_true(max_err_vs_ref(&f, q, out) < 1e-5);
    f.n = n_saved;
    /* Diverge: the child appends its own tokens; the parent is unchanged. */
    assert_int_equal(kvs_seq_append(s, 8, 0, 1, b, vb), 0);
    assert_int_equal(kvs_seq_info(s, 7, &info), 0);
    assert_int_equal(info.tokens_max, 1300);
    /* Dropping the parent keeps the child intact. */
    assert_int_equal(kvs_seq_drop(s, 7), 0);
    assert_int_equal(kvs_seq_read(s, 8, 1, 0, 1000, b, vb), 0);
    assert_memory_equal(a, b, 1000 * row * 4);
    p.mode = KVS_MODE_WAVE;
    assert_int_equal(kvs_seq_attend(s, 8, 1, q, &p, out, NULL), 0);
    free(a), free(b), free(va), free(vb);
    free_fixture(&f);
}

static void test_engine_ttl(void **state) {
    (void)state;
    logbook_t book = {.mu = PTHREAD_MUTEX_INITIALIZER};
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 256;
    o.n_threads = 2;
    o.log = log_capture;
    o.log_ctx = &book;
    kvs_store_t *s = NULL;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    assert_int_equal(kvs_seq_create(s, 1, &GEO), 0);
    assert_int_equal(kvs_seq_create(s, 2, &GEO), 0);
    assert_int_equal(kvs_seq_create(s, 3, &GEO), 0);
    assert_int_equal(kvs_seq_set_ttl(s, 1, 1), 0);
    assert_int_equal(kvs_seq_set_ttl(s, 2, 1), 0);
    assert_int_equal(kvs_seq_set_ttl(s, 9, 1), KVS_ENOSEQ);
    uint64_t n = 99;
    assert_int_equal(kvs_store_expire(s, &n), 0);
    assert_int_equal(n, 0);
    struct timespec ts = {0, 700 * 1000000L};
    nanosleep(&ts, NULL);
    float k[2 * 32] = {0}, v[2 * 32] = {0};
    /* Use keeps sequence 2 alive. */
    assert_int_equal(kvs_seq_append(s, 2, 0, 1, k, v), 0);
    nanosleep(&ts, NULL);
    assert_int_equal(kvs_store_expire(s, &n), 0);
    assert_true(n <= 1); /* the housekeeping thread may have been first */
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 1, &info), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_info(s, 2, &info), 0);
    assert_int_equal(kvs_seq_info(s, 3, &info), 0); /* no TTL */
    /* The housekeeping thread expires on its own within a second or two. */
    for (int i = 0; i < 40 && kvs_seq_info(s, 2, &info) == 0; i++)
        nanosleep(&ts, NULL);
    assert_int_equal(kvs_seq_info(s, 2, &info), KVS_ENOSEQ);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.expired, 2);
    assert_int_equal(st.sequences, 1);
    kvs_store_close(s);
    /* Each expiry went to the log callback, not to stderr. */
    assert_int_equal(book.n, 2);
    assert_true(logbook_find(&book, KVS_LOG_INFO, "sequence 1 expired") >= 0);
    assert_true(logbook_find(&book, KVS_LOG_INFO, "sequence 2 expired") >= 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_engine_errors),
        cmocka_unit_test(test_engine_exact_lse_merge),
        cmocka_unit_test(test_engine_multi_query),
        cmocka_unit_test(test_engine_wave_full_budget_equals_exact),
        cmocka_unit_test(test_engine_wave_default_zones),
        cmocka_unit_test(test_engine_search),
        cmocka_unit_test(test_engine_attend_batch),
        cmocka_unit_test(test_engine_deterministic),
        cmocka_unit_test(test_engine_sequence_limits),
        cmocka_unit_test(test_engine_build_races_readers),
        cmocka_unit_test(test_engine_fork),
        cmocka_unit_test(test_engine_ttl),
        cmocka_unit_test(test_engine_cuda_option_without_gpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
