/*
 * test_wire_rpc.c: the query modes through kvstored and libkvsclient give
 * the in-process store's answers. A real daemon on 127.0.0.1 and an
 * in-process store get the same keys, values and index options; attend and
 * search then run in FULL, EXACT, WAVE and DEFAULT mode, with a zero-filled
 * params struct and with NULL, on both paths, and the outputs and attend
 * stats are compared. FULL through RPC must equal in-process FULL, not
 * WAVE (the client used to send every non-exact mode as WAVE).
 *
 * Also: unknown enum values are refused with KVS_EINVAL on both sides, and
 * a search whose reply cannot fit a frame is refused with KVS_ETOOBIG
 * before the daemon allocates it.
 */
#include "daemon.h"
#include "kvs_kernels.h"
#include "kvstore.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* Enough tokens for built segments (so that WAVE differs from FULL), small
 * enough for a shared 2-core box: 4 segments of 256 tokens per kv head. */
#define QH 4
#define KVH 2
#define HD 32
#define TOK 1024
#define SEG "256"
#define CLU "16"

static const kvs_geometry_t GEO = {.n_layers = 1,
                                   .n_q_heads = QH,
                                   .n_kv_heads = KVH,
                                   .head_dim = HD,
                                   .dtype = KVS_DTYPE_F32};

static test_daemon_t D;
static kvs_client_t *C;
static kvs_store_t *S;
static float Q[QH * HD];

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static float frand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((int64_t)(*s >> 33) % 20001 - 10000) / 10000.0f;
}

/* Keys with a few strong directions so that attention is peaked (the
 * regime the wave index is for) and wave visibly differs from full. */
static void make_kv(float *k, float *v, uint64_t seed) {
    for (size_t t = 0; t < TOK; t++)
        for (size_t i = 0; i < (size_t)KVH * HD; i++) {
            float base = (t % 37 == 5) ? 3.0f * (float)((i % 7) == 0) : 0;
            k[t * KVH * HD + i] = base + frand(&seed);
            v[t * KVH * HD + i] = frand(&seed);
        }
}

static int group_setup(void **state) {
    (void)state;
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, 42);
    uint64_t s = 7;
    for (size_t i = 0; i < QH * HD; i++)
        Q[i] = 2.0f * frand(&s) + ((i % 7) == 0 ? 1.5f : 0);

    memset(&D, 0, sizeof(D));
    const char *extra[] = {"--segment-tokens", SEG, "--cluster-tokens", CLU,
                           NULL};
    if (td_start(&D, extra))
        return -1;
    C = td_client(&D, 0, NULL);
    if (!C)
        return -1;

    /* The daemon's engine options, in-process: same segments, clusters,
     * builder and BLAS threads, so the same index is built. */
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 256;
    o.cluster_tokens = 16;
    o.n_threads = 1;
    o.n_build_threads = 1;
    o.blas_threads = 1;
    if (kvs_store_open(&o, &S))
        return -1;

    if (kvs_seq_create(S, 1, &GEO) || kvs_client_seq_create(C, 1, &GEO))
        return -1;
    if (kvs_seq_append(S, 1, 0, TOK, k, v) ||
        kvs_client_seq_append(C, 1, 0, TOK, k, v, sizeof(k)))
        return -1;
    if (kvs_seq_wait_indexed(S, 1))
        return -1;
    kvs_seq_info_t li;
    if (kvs_seq_info(S, 1, &li) || li.segments == 0)
        return -1;
    /* The daemon builds in the background too: wait until it holds the
     * same index (bounded: 20 s). */
    for (int i = 0; i < 2000; i++) {
        kvs_seq_info_t ri;
        if (kvs_client_seq_info(C, 1, &ri))
            return -1;
        if (ri.builds_pending == 0 && ri.indexed_tokens == li.indexed_tokens &&
            ri.segments == li.segments)
            return 0;
        sleep_ms(10);
    }
    return -1;
}

static int group_teardown(void **state) {
    (void)state;
    kvs_client_close(C);
    kvs_store_close(S);
    int rc = td_stop(&D);
    td_cleanup(&D);
    return rc;
}

static double max_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m)
            m = d;
    }
    return m;
}

/* Everything but the wall time, field by field. */
static void check_stats_equal(const kvs_attend_stats_t *a,
                              const kvs_attend_stats_t *b) {
    assert_true(a->keys_total == b->keys_total);
    assert_true(a->keys_exact == b->keys_exact);
    assert_true(a->keys_steady == b->keys_steady);
    assert_true(a->clusters_total == b->clusters_total);
    assert_true(a->clusters_retrieved == b->clusters_retrieved);
    assert_true(a->clusters_estimated == b->clusters_estimated);
    assert_true(a->clusters_skipped == b->clusters_skipped);
}

typedef struct answer_s {
    float out[QH * HD];
    kvs_attend_stats_t st;
} answer_t;

static void local_attend(const kvs_query_params_t *p, answer_t *a) {
    memset(&a->st, 0, sizeof(a->st));
    assert_int_equal(kvs_seq_attend(S, 1, 0, Q, p, a->out, &a->st), 0);
}

static void rpc_attend(const kvs_query_params_t *p, answer_t *a) {
    memset(&a->st, 0, sizeof(a->st));
    int rc = kvs_client_seq_attend(C, 1, 0, Q, QH * HD, p, a->out, &a->st);
    if (rc)
        fprintf(stderr, "attend: %s\n", kvs_client_errmsg(C));
    assert_int_equal(rc, 0);
}

/* Same process image, same index, same inputs: the two paths run the same
 * code on the same numbers. The bound only allows for nothing. */
#define SAME 1e-6

static void test_wire_rpc_attend_modes(void **state) {
    (void)state;
    static answer_t lf, le, lw, ld, rf, re, rw, rd;
    kvs_query_params_t p;
    memset(&p, 0, sizeof(p));

    p.mode = KVS_MODE_FULL;
    local_attend(&p, &lf);
    rpc_attend(&p, &rf);
    p.mode = KVS_MODE_EXACT;
    local_attend(&p, &le);
    rpc_attend(&p, &re);
    p.mode = KVS_MODE_WAVE;
    local_attend(&p, &lw);
    rpc_attend(&p, &rw);
    p.mode = KVS_MODE_DEFAULT;
    local_attend(&p, &ld);
    rpc_attend(&p, &rd);

    /* The modes really differ here: FULL and EXACT attend every key, WAVE
     * (and DEFAULT, the store's default WAVE) far fewer. */
    assert_true(lf.st.keys_exact == lf.st.keys_total);
    assert_true(le.st.keys_exact == le.st.keys_total);
    assert_true(lw.st.keys_exact < lw.st.keys_total);
    assert_true(lw.st.clusters_estimated > 0);
    double wave_err = max_diff(lf.out, lw.out, QH * HD);
    assert_true(wave_err > 1e-4);
    assert_true(max_diff(lf.out, le.out, QH * HD) < 1e-4);

    /* Each mode through RPC is that mode in-process. */
    assert_true(max_diff(rf.out, lf.out, QH * HD) <= SAME);
    check_stats_equal(&rf.st, &lf.st);
    assert_true(max_diff(re.out, le.out, QH * HD) <= SAME);
    check_stats_equal(&re.st, &le.st);
    assert_true(max_diff(rw.out, lw.out, QH * HD) <= SAME);
    check_stats_equal(&rw.st, &lw.st);
    assert_true(max_diff(rd.out, ld.out, QH * HD) <= SAME);
    check_stats_equal(&rd.st, &ld.st);

    /* FULL through RPC is not WAVE (what the old client sent). */
    assert_true(max_diff(rf.out, lw.out, QH * HD) >= wave_err * 0.5);
    assert_true(rf.st.keys_exact == rf.st.keys_total);
    /* DEFAULT is the store's default, WAVE, on both paths. */
    assert_true(max_diff(rd.out, lw.out, QH * HD) <= SAME);
    check_stats_equal(&rd.st, &lw.st);
}

static void test_wire_rpc_zero_params_default(void **state) {
    (void)state;
    static answer_t lw, lz, rz, ln, rn;
    kvs_query_params_t w;
    kvs_query_params_default(&w); /* explicit WAVE, FIXED, the fractions */
    local_attend(&w, &lw);

    /* A zero-filled struct, through both paths: the store's defaults,
     * not the slow exact reference that 0 used to mean. */
    kvs_query_params_t z;
    memset(&z, 0, sizeof(z));
    local_attend(&z, &lz);
    rpc_attend(&z, &rz);
    local_attend(NULL, &ln);
    rpc_attend(NULL, &rn);
    const answer_t *all[] = {&lz, &rz, &ln, &rn};
    for (size_t i = 0; i < 4; i++) {
        assert_true(max_diff(all[i]->out, lw.out, QH * HD) <= SAME);
        check_stats_equal(&all[i]->st, &lw.st);
        assert_true(all[i]->st.keys_exact < all[i]->st.keys_total);
    }

    /* Budget DEFAULT with an explicit BOUNDED mode elsewhere: each field
     * resolves on its own. */
    static answer_t lb, rb;
    kvs_query_params_t b;
    memset(&b, 0, sizeof(b));
    b.budget = KVS_BUDGET_BOUNDED;
    b.epsilon = 0.05f;
    b.estimation_fraction = 0.1f;
    local_attend(&b, &lb);
    rpc_attend(&b, &rb);
    assert_true(max_diff(rb.out, lb.out, QH * HD) <= SAME);
    check_stats_equal(&rb.st, &lb.st);
}

static void test_wire_rpc_search_modes(void **state) {
    (void)state;
    const kvs_mode_t modes[] = {KVS_MODE_FULL, KVS_MODE_EXACT, KVS_MODE_WAVE,
                                KVS_MODE_DEFAULT};
    enum { K = 8 };
    for (size_t m = 0; m < 4; m++) {
        kvs_query_params_t p;
        memset(&p, 0, sizeof(p));
        p.mode = modes[m];
        int64_t lp[QH * K], rp[QH * K];
        float ls[QH * K], rs[QH * K];
        assert_int_equal(kvs_seq_search(S, 1, 0, Q, K, &p, lp, ls), 0);
        assert_int_equal(
            kvs_client_seq_search(C, 1, 0, Q, QH * HD, K, &p, rp, rs, QH * K),
            0);
        for (size_t i = 0; i < QH * K; i++) {
            assert_int_equal(rp[i], lp[i]);
            assert_true(rs[i] == ls[i]);
        }
    }
}

static void test_wire_rpc_unknown_enums(void **state) {
    (void)state;
    float out[QH * HD];
    /* The client refuses to send a mode the wire has no value for. */
    kvs_query_params_t p;
    memset(&p, 0, sizeof(p));
    p.mode = (kvs_mode_t)7;
    assert_int_equal(kvs_client_seq_attend(C, 1, 0, Q, QH * HD, &p, out, NULL),
                     KVS_EINVAL);
    assert_non_null(strstr(kvs_client_errmsg(C), "mode"));
    p.mode = KVS_MODE_WAVE;
    p.budget = (kvs_budget_t)3;
    assert_int_equal(kvs_client_seq_attend(C, 1, 0, Q, QH * HD, &p, out, NULL),
                     KVS_EINVAL);
    assert_non_null(strstr(kvs_client_errmsg(C), "budget"));
    kvs_geometry_t g = GEO;
    g.dtype = (kvs_dtype_t)5;
    assert_int_equal(kvs_client_seq_create(C, 9, &g), KVS_EINVAL);
    assert_non_null(strstr(kvs_client_errmsg(C), "dtype"));

    /* The daemon refuses one it does not know, with a clear status, and
     * the connection stays usable. */
    int fd = td_raw_connect(D.port, false);
    assert_true(fd >= 0);
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__AttendRequest at = KVS__V1__ATTEND_REQUEST__INIT;
    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    at.seq = 1;
    at.queries.data = (uint8_t *)Q;
    at.queries.len = sizeof(Q);
    at.query_dtype = KVS__V1__DTYPE__DTYPE_F32;
    at.params = &qp;
    qp.mode = (Kvs__V1__Mode)9;
    req.op_case = KVS__V1__REQUEST__OP_ATTEND;
    req.attend = &at;
    assert_int_equal(td_send_request(fd, 5, KVS_PROTOCOL_VERSION, &req), 0);
    kvs_frame_header_t h;
    Kvs__V1__Response *r = NULL;
    assert_int_equal(td_read_response(fd, 10000, &h, &r), 0);
    assert_int_equal(r->status, KVS_EINVAL);
    assert_non_null(strstr(r->message, "unknown mode 9"));
    kvs__v1__response__free_unpacked(r, NULL);
    /* MODE_FULL on the raw wire: runs, and is full attention. */
    qp.mode = KVS__V1__MODE__MODE_FULL;
    assert_int_equal(td_send_request(fd, 6, KVS_PROTOCOL_VERSION, &req), 0);
    assert_int_equal(td_read_response(fd, 10000, &h, &r), 0);
    assert_int_equal(r->status, 0);
    assert_non_null(r->attend);
    assert_non_null(r->attend->stats);
    assert_true(r->attend->stats->keys_exact == r->attend->stats->keys_total);
    kvs__v1__response__free_unpacked(r, NULL);
    close(fd);
}

/* Queries sent as f16 and bf16 (the daemon widens them with the kernels'
 * conversion) answer as the same queries rounded to that type and sent as
 * f32. */
static void test_wire_rpc_half_queries(void **state) {
    (void)state;
    const kvs_dtype_t types[] = {KVS_DTYPE_F16, KVS_DTYPE_BF16};
    const Kvs__V1__DType wire[] = {KVS__V1__DTYPE__DTYPE_F16,
                                   KVS__V1__DTYPE__DTYPE_BF16};
    for (int t = 0; t < 2; t++) {
        uint16_t half[QH * HD];
        float rounded[QH * HD];
        kvs_from_f32(types[t], Q, half, QH * HD);
        kvs_to_f32(types[t], half, rounded, QH * HD);
        float want[QH * HD];
        kvs_query_params_t p;
        memset(&p, 0, sizeof(p));
        p.mode = KVS_MODE_EXACT;
        assert_int_equal(
            kvs_client_seq_attend(C, 1, 0, rounded, QH * HD, &p, want, NULL),
            0);

        int fd = td_raw_connect(D.port, false);
        assert_true(fd >= 0);
        Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
        Kvs__V1__AttendRequest at = KVS__V1__ATTEND_REQUEST__INIT;
        Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
        at.seq = 1;
        at.queries.data = (uint8_t *)half;
        at.queries.len = sizeof(half);
        at.query_dtype = wire[t];
        at.params = &qp;
        qp.mode = KVS__V1__MODE__MODE_EXACT;
        req.op_case = KVS__V1__REQUEST__OP_ATTEND;
        req.attend = &at;
        assert_int_equal(td_send_request(fd, 7, KVS_PROTOCOL_VERSION, &req), 0);
        kvs_frame_header_t h;
        Kvs__V1__Response *r = NULL;
        assert_int_equal(td_read_response(fd, 10000, &h, &r), 0);
        assert_int_equal(r->status, 0);
        assert_non_null(r->attend);
        assert_int_equal(r->attend->output.len, sizeof(want));
        const float *got = (const float *)(const void *)r->attend->output.data;
        for (int i = 0; i < QH * HD; i++)
            assert_float_equal(got[i], want[i], 1e-6);
        kvs__v1__response__free_unpacked(r, NULL);
        close(fd);
    }
}

/* The reply of a search is k x n_q_heads x (8-byte position + 4-byte
 * score): one over max_frame_bytes is refused before anything is sized by
 * k, also on a layer shorter than k (the size does not depend on it). */
static void test_wire_rpc_search_reply_too_big(void **state) {
    (void)state;
    int64_t pos[QH * 8];
    float sc[QH * 8];
    /* k = 4M x 4 heads x 12 B = 192 MiB, over the default 64 MiB. */
    assert_int_equal(kvs_client_seq_search(C, 1, 0, Q, QH * HD, 4u << 20, NULL,
                                           pos, sc, QH * 8),
                     KVS_ETOOBIG);
    assert_non_null(strstr(kvs_client_errmsg(C), "max_frame_bytes"));
    assert_non_null(strstr(kvs_client_errmsg(C), "search reply"));

    /* At the limit: a daemon with 1 KiB frames holds a 40-token layer;
     * k = 16 (768 B of arrays) fits, k = 22 (1056 B) does not, though the
     * layer has the tokens. */
    test_daemon_t L;
    memset(&L, 0, sizeof(L));
    const char *extra[] = {"--max-frame-bytes", "1024", NULL};
    assert_int_equal(td_start(&L, extra), 0);
    kvs_client_t *c = td_client(&L, 0, NULL);
    assert_non_null(c);
    assert_int_equal(kvs_client_seq_create(c, 3, &GEO), 0);
    float k[KVH * HD], v[KVH * HD];
    uint64_t s = 3;
    for (int t = 0; t < 40; t++) { /* one token per frame fits 1 KiB */
        for (size_t i = 0; i < KVH * HD; i++) {
            k[i] = frand(&s);
            v[i] = frand(&s);
        }
        assert_int_equal(kvs_client_seq_append(c, 3, 0, 1, k, v, sizeof(k)), 0);
    }
    static int64_t p2[QH * 40];
    static float s2[QH * 40];
    assert_int_equal(
        kvs_client_seq_search(c, 3, 0, Q, QH * HD, 16, NULL, p2, s2, QH * 40),
        0);
    assert_int_equal(
        kvs_client_seq_search(c, 3, 0, Q, QH * HD, 22, NULL, p2, s2, QH * 40),
        KVS_ETOOBIG);
    assert_non_null(strstr(kvs_client_errmsg(c), "search reply"));
    /* The connection and the daemon carry on. */
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    assert_int_equal(td_stop(&L), 0);
    td_cleanup(&L);
}

/* The in-process side of the rule, resolved by the engine: DEFAULT fields
 * take kvs_options_t.defaults, whose own DEFAULT is WAVE / FIXED, and
 * KVS_SYNC_DEFAULT is batch on a persistent store. */
static void test_wire_rpc_store_defaults(void **state) {
    (void)state;
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, 42);
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 256;
    o.cluster_tokens = 16;
    o.n_threads = 1;
    o.n_build_threads = 1;
    o.blas_threads = 1;
    o.sync = KVS_SYNC_DEFAULT;
    memset(&o.defaults, 0, sizeof(o.defaults)); /* all DEFAULT / 0 */
    char dir[] = "/tmp/kvs-wire-defaults-XXXXXX";
    assert_non_null(mkdtemp(dir));
    o.data_dir = dir;
    kvs_store_t *a = NULL;
    assert_int_equal(kvs_store_open(&o, &a), 0);
    assert_int_equal(kvs_seq_create(a, 1, &GEO), 0);
    assert_int_equal(kvs_seq_append(a, 1, 0, TOK, k, v), 0);
    assert_int_equal(kvs_seq_wait_indexed(a, 1), 0);
    /* Zero-filled defaults: a zero params struct is WAVE + FIXED, the same
     * as the shared store's explicit wave answer on the same index. */
    static answer_t lw, z;
    kvs_query_params_t w;
    kvs_query_params_default(&w);
    local_attend(&w, &lw);
    kvs_query_params_t zp;
    memset(&zp, 0, sizeof(zp));
    memset(&z.st, 0, sizeof(z.st));
    assert_int_equal(kvs_seq_attend(a, 1, 0, Q, &zp, z.out, &z.st), 0);
    assert_true(max_diff(z.out, lw.out, QH * HD) <= SAME);
    check_stats_equal(&z.st, &lw.st);
    kvs_store_close(a);

    /* Reopen (sync DEFAULT kept the data) with defaults.mode EXACT: now a
     * zero params struct and NULL run the reference. */
    o.defaults.mode = KVS_MODE_EXACT;
    assert_int_equal(kvs_store_open(&o, &a), 0);
    static answer_t le;
    kvs_query_params_t ep;
    memset(&ep, 0, sizeof(ep));
    ep.mode = KVS_MODE_EXACT;
    local_attend(&ep, &le);
    memset(&z.st, 0, sizeof(z.st));
    assert_int_equal(kvs_seq_attend(a, 1, 0, Q, &zp, z.out, &z.st), 0);
    assert_true(z.st.keys_exact == z.st.keys_total);
    assert_true(max_diff(z.out, le.out, QH * HD) <= SAME);
    assert_int_equal(kvs_seq_attend(a, 1, 0, Q, NULL, z.out, &z.st), 0);
    assert_true(z.st.keys_exact == z.st.keys_total);
    /* An explicit mode still wins over the store's default. */
    zp.mode = KVS_MODE_WAVE;
    assert_int_equal(kvs_seq_attend(a, 1, 0, Q, &zp, z.out, &z.st), 0);
    assert_true(z.st.keys_exact < z.st.keys_total);
    kvs_store_close(a);

    /* Values outside the enums are refused, not taken as a default. */
    o.sync = (kvs_sync_t)9;
    assert_int_equal(kvs_store_open(&o, &a), KVS_EINVAL);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* kvs_client_options_t follows the same rule: a zero-filled struct (but
 * the addresses) is the defaults, not a client that refuses to open
 * (max_frame_bytes 0) or waits forever (timeouts 0). */
static void test_wire_rpc_zero_client_options(void **state) {
    (void)state;
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", D.port);
    const char *addrs[1] = {addr};
    kvs_client_options_t o;
    memset(&o, 0, sizeof(o));
    o.addrs = addrs;
    o.n_addrs = 1;
    kvs_client_t *c = NULL;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    /* Answers are accepted: max_frame_bytes 0 is not a 0-byte limit. */
    static float out[QH * HD];
    assert_int_equal(
        kvs_client_seq_attend(c, 1, 0, Q, QH * HD, NULL, out, NULL), 0);
    kvs_client_close(c);
    /* The explicit "never" still exists, and limits are still checked. */
    o.request_timeout_ms = KVS_CLIENT_TIMEOUT_NONE;
    o.connect_timeout_ms = KVS_CLIENT_TIMEOUT_NONE;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    o.max_frame_bytes = KVS_FRAME_MAX_BODY_LIMIT + 1u;
    assert_int_equal(kvs_client_open(&o, &c), KVS_EINVAL);
}

/* kvs_seq_observe_queries over the wire: the same observations and
 * attends on a fresh sequence give the daemon the in-process store's
 * per-head budgets (same outputs and stats), and each error comes back
 * with the engine's code. */
static void test_wire_rpc_observe(void **state) {
    (void)state;
    enum { NOBS = 24 };
    static float k[TOK * KVH * HD], v[TOK * KVH * HD], obs[NOBS * QH * HD];
    make_kv(k, v, 43);
    uint64_t s = 11;
    for (size_t i = 0; i < NOBS * QH * HD; i++)
        obs[i] = 2.0f * frand(&s) + ((i % 7) == 0 ? 1.5f : 0);
    assert_int_equal(kvs_seq_create(S, 2, &GEO), 0);
    assert_int_equal(kvs_client_seq_create(C, 2, &GEO), 0);
    assert_int_equal(kvs_seq_append(S, 2, 0, TOK, k, v), 0);
    assert_int_equal(kvs_client_seq_append(C, 2, 0, TOK, k, v, sizeof(k)), 0);
    assert_int_equal(kvs_seq_wait_indexed(S, 2), 0);
    kvs_seq_info_t li, ri;
    assert_int_equal(kvs_seq_info(S, 2, &li), 0);
    for (int i = 0; i < 2000; i++) {
        assert_int_equal(kvs_client_seq_info(C, 2, &ri), 0);
        if (ri.builds_pending == 0 && ri.indexed_tokens == li.indexed_tokens)
            break;
        sleep_ms(10);
    }
    assert_true(ri.indexed_tokens == li.indexed_tokens);

    assert_int_equal(kvs_seq_observe_queries(S, 2, 0, NOBS, obs), 0);
    assert_int_equal(
        kvs_client_seq_observe_queries(C, 2, 0, NOBS, obs, NOBS * QH * HD), 0);
    for (int r = 0; r < 3; r++) {
        static answer_t l, w;
        memset(&l.st, 0, sizeof(l.st));
        memset(&w.st, 0, sizeof(w.st));
        const float *q = obs + (size_t)r * QH * HD;
        assert_int_equal(kvs_seq_attend(S, 2, 0, q, NULL, l.out, &l.st), 0);
        assert_int_equal(
            kvs_client_seq_attend(C, 2, 0, q, QH * HD, NULL, w.out, &w.st), 0);
        assert_true(max_diff(w.out, l.out, QH * HD) <= SAME);
        check_stats_equal(&w.st, &l.st);
    }

    /* Errors: unknown sequence, layer, queries that do not match the
     * geometry, n 0 (refused by the client), too many tokens. */
    assert_int_equal(kvs_client_seq_observe_queries(C, 99, 0, 1, obs, QH * HD),
                     KVS_ENOSEQ);
    assert_int_equal(kvs_client_seq_observe_queries(C, 2, 1, 1, obs, QH * HD),
                     KVS_ERANGE);
    assert_int_equal(
        kvs_client_seq_observe_queries(C, 2, 0, 3, obs, 2 * QH * HD),
        KVS_EINVAL); /* 2 tokens' bytes for 3: not whole tokens */
    assert_int_equal(
        kvs_client_seq_observe_queries(C, 2, 0, 2, obs, 3 * QH * HD),
        KVS_EGEOMETRY); /* whole, but 1.5 tokens each */
    assert_int_equal(kvs_client_seq_observe_queries(C, 2, 0, 0, obs, QH * HD),
                     KVS_EINVAL);
    assert_int_equal(kvs_client_seq_observe_queries(C, 2, 0,
                                                    KVS_OBSERVE_MAX + 1, obs,
                                                    KVS_OBSERVE_MAX + 1),
                     KVS_ETOOBIG);
    assert_int_equal(kvs_seq_drop(S, 2), 0);
    assert_int_equal(kvs_client_seq_drop(C, 2), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wire_rpc_attend_modes),
        cmocka_unit_test(test_wire_rpc_zero_params_default),
        cmocka_unit_test(test_wire_rpc_search_modes),
        cmocka_unit_test(test_wire_rpc_unknown_enums),
        cmocka_unit_test(test_wire_rpc_half_queries),
        cmocka_unit_test(test_wire_rpc_search_reply_too_big),
        cmocka_unit_test(test_wire_rpc_zero_client_options),
        cmocka_unit_test(test_wire_rpc_store_defaults),
        cmocka_unit_test(test_wire_rpc_observe),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
