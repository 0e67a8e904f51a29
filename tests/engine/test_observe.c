/*
 * test_observe.c: kvs_seq_observe_queries and the per-head budgets it
 * calibrates (engine/observe.c): every error path, the reservoir's bound
 * and its bytes in resident_bytes, budgets moved from an easy head to a
 * hard one under the same mean, decode attends feeding the reservoir, and
 * determinism (two stores fed the same calls answer bit for bit alike).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore.h"

enum { L = 2, QH = 4, KVH = 2, D = 32, G = QH / KVH };
enum { TOKENS = 4096 + 100, SEG = 1024 };

static uint64_t rng;
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

/* The sink direction of KV head 1: its queries point along it. */
static float sink_dir[D];

/* KV head 0: keys around 8 directions, attention spread over the context
 * (a hard head). KV head 1: a large key at position 0 (a sink) that its
 * queries point at, so the steady zone holds nearly all of its mass (an
 * easy head). Values Gaussian. */
static void make_rows(float *k, float *v, uint32_t first, uint32_t n) {
    float dirs[8][D];
    for (int c = 0; c < 8; c++)
        for (int t = 0; t < D; t++)
            dirs[c][t] = nrand();
    for (int t = 0; t < D; t++)
        sink_dir[t] = nrand();
    for (uint32_t i = 0; i < n; i++) {
        int c = (int)(urand() * 8);
        for (int t = 0; t < D; t++) {
            size_t o0 = ((size_t)i * KVH + 0) * D + t, o1 = o0 + D;
            k[o0] = dirs[c][t] + 0.7f * nrand();
            k[o1] = first + i == 0 ? 4 * sink_dir[t] : 0.3f * nrand();
            v[o0] = nrand();
            v[o1] = nrand();
        }
    }
}

/* One decode-like query: [QH][D]; group 0 random (hard head), group 1
 * along the sink. */
static void make_query(float *q) {
    for (int i = 0; i < G; i++)
        for (int t = 0; t < D; t++) {
            q[i * D + t] = 1.5f * nrand();
            q[(G + i) * D + t] = 3 * sink_dir[t] + 0.3f * nrand();
        }
}

static kvs_store_t *open_store(int32_t observe) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = SEG;
    o.n_threads = 2;
    o.deterministic = 1;
    o.observe_samples = observe;
    kvs_store_t *s = NULL;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    return s;
}

/* A sequence of TOKENS tokens per layer; the same data for every call
 * (the generator restarts). */
static void fill(kvs_store_t *s, uint64_t id) {
    const kvs_geometry_t g = {L, QH, KVH, D, KVS_DTYPE_F32};
    assert_int_equal(kvs_seq_create(s, id, &g), 0);
    float *k = malloc(sizeof(float) * TOKENS * KVH * D);
    float *v = malloc(sizeof(float) * TOKENS * KVH * D);
    rng = 0x0b5e77e;
    make_rows(k, v, 0, TOKENS);
    for (uint32_t l = 0; l < L; l++)
        assert_int_equal(kvs_seq_append(s, id, l, TOKENS, k, v), 0);
    assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
    free(k);
    free(v);
}

static double rel_l2(const float *a, const float *b, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

static void test_observe_errors(void **state) {
    (void)state;
    kvs_store_t *s = open_store(0);
    const kvs_geometry_t g = {L, QH, KVH, D, KVS_DTYPE_F32};
    assert_int_equal(kvs_seq_create(s, 1, &g), 0);
    float q[3 * QH * D];
    for (int i = 0; i < 3 * QH * D; i++)
        q[i] = (float)i / 100;
    assert_int_equal(kvs_seq_observe_queries(NULL, 1, 0, 3, q), KVS_EINVAL);
    assert_int_equal(kvs_seq_observe_queries(s, 2, 0, 3, q), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_observe_queries(s, 1, L, 3, q), KVS_ERANGE);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, 0, q), KVS_EINVAL);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, 3, NULL), KVS_EINVAL);
    /* Past the per-call limit: refused before a byte of it is read. */
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, KVS_OBSERVE_MAX + 1, q),
                     KVS_ETOOBIG);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, UINT32_MAX, q),
                     KVS_ETOOBIG);
    assert_true(strstr(kvs_store_errmsg(s), "queries") != NULL);
    q[QH * D + 5] = NAN;
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, 3, q), KVS_ENOTFINITE);
    q[QH * D + 5] = 0;
    /* Observing an empty layer is fine: the budgets wait for an index. */
    assert_int_equal(kvs_seq_observe_queries(s, 1, 1, 3, q), 0);
    assert_int_equal(kvs_seq_drop(s, 1), 0);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, 3, q), KVS_ENOSEQ);
    kvs_store_close(s);

    /* Off: validated, nothing kept. */
    s = open_store(-1);
    assert_int_equal(kvs_seq_create(s, 1, &g), 0);
    kvs_store_stats_t a, b;
    assert_int_equal(kvs_store_stats(s, &a), 0);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, 3, q), 0);
    assert_int_equal(kvs_seq_observe_queries(s, 1, 2, 3, q), KVS_ERANGE);
    assert_int_equal(kvs_store_stats(s, &b), 0);
    assert_int_equal(b.resident_bytes, a.resident_bytes);
    kvs_store_close(s);
}

/* The reservoir keeps at most observe_samples groups per (layer, KV head),
 * and exactly its bytes (plus a fixed header per sequence) count in
 * resident_bytes until the drop. */
static void test_observe_reservoir_bound(void **state) {
    (void)state;
    enum { CAP = 8, N = 100 };
    kvs_store_t *s = open_store(CAP);
    const kvs_geometry_t g = {L, QH, KVH, D, KVS_DTYPE_F32};
    kvs_store_stats_t st0, st1, st2, st3, st4;
    assert_int_equal(kvs_store_stats(s, &st0), 0);
    assert_int_equal(kvs_seq_create(s, 1, &g), 0);
    assert_int_equal(kvs_store_stats(s, &st1), 0);
    float *q = malloc(sizeof(float) * N * QH * D);
    rng = 99;
    for (int i = 0; i < N * QH * D; i++)
        q[i] = nrand();
    assert_int_equal(kvs_seq_observe_queries(s, 1, 0, N, q), 0);
    assert_int_equal(kvs_store_stats(s, &st2), 0);
    const uint64_t per_layer = (uint64_t)KVH * CAP * G * D * sizeof(float);
    uint64_t grew = st2.resident_bytes - st1.resident_bytes;
    assert_true(grew >= per_layer && grew < per_layer + 1024);
    /* More of the same layer: the bound holds, nothing more is held. */
    for (int r = 0; r < 5; r++)
        assert_int_equal(kvs_seq_observe_queries(s, 1, 0, N, q), 0);
    assert_int_equal(kvs_store_stats(s, &st3), 0);
    assert_int_equal(st3.resident_bytes, st2.resident_bytes);
    /* The other layer's reservoirs: exactly their samples. */
    assert_int_equal(kvs_seq_observe_queries(s, 1, 1, 1, q), 0);
    assert_int_equal(kvs_store_stats(s, &st4), 0);
    assert_int_equal(st4.resident_bytes - st3.resident_bytes, per_layer);
    /* A drop gives every byte back. */
    assert_int_equal(kvs_seq_drop(s, 1), 0);
    assert_int_equal(kvs_store_stats(s, &st4), 0);
    assert_int_equal(st4.resident_bytes, st0.resident_bytes);
    free(q);
    kvs_store_close(s);
}

/* Attend every query of `qs` ([n][QH][D]) at layer 0 in wave mode and
 * exactly; returns the hard head's mean rel. L2 error, the keys read in
 * full beyond the steady zone (summed) and the outputs ([n][QH][D]). */
static double run_queries(kvs_store_t *s, uint64_t id, const float *qs, int n,
                          uint64_t *beyond, float *outs) {
    kvs_query_params_t xp;
    kvs_query_params_default(&xp);
    xp.mode = KVS_MODE_EXACT;
    double err = 0;
    *beyond = 0;
    for (int i = 0; i < n; i++) {
        const float *q = qs + (size_t)i * QH * D;
        float *out = outs + (size_t)i * QH * D, ex[QH * D];
        kvs_attend_stats_t st;
        assert_int_equal(kvs_seq_attend(s, id, 0, q, NULL, out, &st), 0);
        assert_int_equal(kvs_seq_attend(s, id, 0, q, &xp, ex, NULL), 0);
        *beyond += st.keys_exact - st.keys_steady;
        err += rel_l2(out, ex, G * D); /* KV head 0's query heads */
    }
    return err / n;
}

/* Observed queries move budget from the easy head (its mass sits in the
 * steady zone) to the hard one: fewer keys in all, a lower error on the
 * hard head than the same store without observation. */
static void test_observe_budgets(void **state) {
    (void)state;
    enum { NOBS = 32, NQ = 8 };
    float *obs = malloc(sizeof(float) * NOBS * QH * D);
    float *qs = malloc(sizeof(float) * NQ * QH * D);
    float *o_on = malloc(sizeof(float) * NQ * QH * D);
    float *o_off = malloc(sizeof(float) * NQ * QH * D);
    uint64_t b_on, b_off;

    kvs_store_t *off = open_store(-1);
    fill(off, 5);
    rng = 0x9e37;
    for (int i = 0; i < NOBS; i++)
        make_query(obs + (size_t)i * QH * D);
    for (int i = 0; i < NQ; i++)
        make_query(qs + (size_t)i * QH * D);
    double e_off = run_queries(off, 5, qs, NQ, &b_off, o_off);
    kvs_store_close(off);

    kvs_store_t *on = open_store(0);
    fill(on, 5);
    assert_int_equal(kvs_seq_observe_queries(on, 5, 0, NOBS, obs), 0);
    double e_on = run_queries(on, 5, qs, NQ, &b_on, o_on);
    kvs_store_close(on);

    /* Without observation: ceil(0.018 x 4096) = 74 per head and call. */
    assert_int_equal(b_off, (uint64_t)NQ * KVH * 74);
    print_message("hard head rel. L2: %.4f with budgets (%llu keys beyond "
                  "steady), %.4f without (%llu)\n",
                  e_on, (unsigned long long)b_on, e_off,
                  (unsigned long long)b_off);
    assert_true(b_on <= b_off);
    assert_true(b_on != b_off);
    assert_true(e_on < e_off);
    free(obs);
    free(qs);
    free(o_on);
    free(o_off);
}

/* A sequence never observed keeps the call's budget; after one observed
 * query (too few to calibrate on), wave attends fill the reservoir and the
 * budgets follow once it holds a few queries. */
static void test_observe_decode_reservoir(void **state) {
    (void)state;
    enum { NQ = 12 };
    float *qs = malloc(sizeof(float) * NQ * QH * D);
    float *outs = malloc(sizeof(float) * NQ * QH * D);
    kvs_store_t *s = open_store(0);
    fill(s, 8);
    rng = 0x77;
    for (int i = 0; i < NQ; i++)
        make_query(qs + (size_t)i * QH * D);
    uint64_t first = 0, last = 0;
    kvs_attend_stats_t st0;
    for (int i = 0; i < 6; i++) {
        assert_int_equal(kvs_seq_attend(s, 8, 0, qs, NULL, outs, &st0), 0);
        assert_int_equal(st0.keys_exact - st0.keys_steady, KVH * 74);
    }
    assert_int_equal(kvs_seq_observe_queries(s, 8, 0, 1, qs), 0);
    for (int i = 0; i < NQ; i++) {
        kvs_attend_stats_t st;
        assert_int_equal(kvs_seq_attend(s, 8, 0, qs + (size_t)i * QH * D, NULL,
                                        outs + (size_t)i * QH * D, &st),
                         0);
        if (i == 0)
            first = st.keys_exact - st.keys_steady;
        last = st.keys_exact - st.keys_steady;
    }
    assert_int_equal(first, KVH * 74);
    assert_true(last < first);
    kvs_store_close(s);
    free(qs);
    free(outs);
}

/* Two stores fed the same appends, observations and attends answer bit
 * for bit alike (seeded reservoirs, calibration at fixed points). */
static void test_observe_deterministic(void **state) {
    (void)state;
    enum { NOBS = 40, NQ = 10 };
    float *obs = malloc(sizeof(float) * NOBS * QH * D);
    float *qs = malloc(sizeof(float) * NQ * QH * D);
    float *a = malloc(sizeof(float) * NQ * QH * D);
    float *b = malloc(sizeof(float) * NQ * QH * D);
    uint64_t ba, bb;
    double ea, eb;
    for (int r = 0; r < 2; r++) {
        kvs_store_t *s = open_store(6); /* < NOBS: sampling replaces */
        fill(s, 9);
        rng = 0x1357;
        for (int i = 0; i < NOBS; i++)
            make_query(obs + (size_t)i * QH * D);
        for (int i = 0; i < NQ; i++)
            make_query(qs + (size_t)i * QH * D);
        assert_int_equal(kvs_seq_observe_queries(s, 9, 0, NOBS, obs), 0);
        if (r == 0)
            ea = run_queries(s, 9, qs, NQ, &ba, a);
        else
            eb = run_queries(s, 9, qs, NQ, &bb, b);
        kvs_store_close(s);
    }
    assert_int_equal(ba, bb);
    assert_true(ea == eb);
    assert_memory_equal(a, b, sizeof(float) * NQ * QH * D);
    free(obs);
    free(qs);
    free(a);
    free(b);
}

/* Attends on both layers and observe calls on one sequence from three
 * threads at once: calibrations of different layers run concurrently
 * (each solves over the whole sequence under obs_mu) and every call
 * succeeds (TSan checks the locking). */
typedef struct race_s {
    kvs_store_t *s;
    uint32_t layer;
    int observe;
    int fails;
} race_t;

static void *race_main(void *arg) {
    race_t *r = arg;
    float q[QH * D], out[QH * D];
    uint64_t x = 0x1000 + r->layer + 7 * (uint64_t)r->observe;
    for (int i = 0; i < 12; i++) {
        for (int j = 0; j < QH * D; j++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            q[j] = (float)((int64_t)(x >> 40) % 1000) / 300.0f;
        }
        int rc = r->observe
                     ? kvs_seq_observe_queries(r->s, 4, r->layer, 1, q)
                     : kvs_seq_attend(r->s, 4, r->layer, q, NULL, out, NULL);
        r->fails += rc != 0;
        for (int j = 0; !r->observe && j < QH * D; j++)
            r->fails += !isfinite(out[j]);
    }
    return NULL;
}

static void test_observe_concurrent(void **state) {
    (void)state;
    kvs_store_t *s = open_store(0);
    fill(s, 4);
    float q[QH * D];
    rng = 0x42;
    make_query(q);
    assert_int_equal(kvs_seq_observe_queries(s, 4, 0, 1, q), 0);
    race_t r[3] = {{s, 0, 0, 0}, {s, 1, 0, 0}, {s, 1, 1, 0}};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&th[i], NULL, race_main, &r[i]), 0);
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(r[i].fails, 0);
    }
    kvs_store_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_observe_errors),
        cmocka_unit_test(test_observe_reservoir_bound),
        cmocka_unit_test(test_observe_budgets),
        cmocka_unit_test(test_observe_decode_reservoir),
        cmocka_unit_test(test_observe_deterministic),
        cmocka_unit_test(test_observe_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
