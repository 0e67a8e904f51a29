/*
 * test_server.c: integration tests of kvstored and libkvsclient: real
 * daemon processes on 127.0.0.1, ::1 and a Unix socket with ephemeral
 * ports, driven through the client library and through raw frames.
 *
 * Covered: every op with its results checked against a local reference;
 * pipelining with out-of-order completion; 1,000 concurrent connections;
 * every configured limit and its status; missing and wrong auth; oversized,
 * truncated, garbage, wrong-version frames; a client killed mid-request;
 * SIGTERM with requests in flight; restart on the same port and data dir.
 */
#include "daemon.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* Small geometry so every engine call is fast on a shared 2-core box. */
#define LAYERS 2
#define QH 4
#define KVH 2
#define HD 32
#define TOK 256

static test_daemon_t D; /* shared by the tests that need no special flags */

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static float frand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((int64_t)(*s >> 33) % 20001 - 10000) / 10000.0f;
}

static const kvs_geometry_t GEO = {.n_layers = LAYERS,
                                   .n_q_heads = QH,
                                   .n_kv_heads = KVH,
                                   .head_dim = HD,
                                   .dtype = KVS_DTYPE_F32};

/* Keys/values [TOK][KVH][HD] fp32. */
static void make_kv(float *k, float *v, uint64_t seed) {
    for (size_t i = 0; i < (size_t)TOK * KVH * HD; i++) {
        k[i] = frand(&seed);
        v[i] = frand(&seed);
    }
}

static int group_setup(void **state) {
    (void)state;
    memset(&D, 0, sizeof(D));
    return td_start(&D, NULL);
}

static int group_teardown(void **state) {
    (void)state;
    int rc = td_stop(&D);
    td_cleanup(&D);
    return rc;
}

/* ---------------------------------------------------------------- ops */

static void exercise_ops(kvs_client_t *c, uint64_t seq) {
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, seq);
    assert_int_equal(kvs_client_seq_create(c, seq, &GEO), 0);
    assert_int_equal(kvs_client_seq_create(c, seq, &GEO), KVS_EEXIST);
    assert_non_null(strstr(kvs_client_errmsg(c), "exist"));
    /* Two appends of half the tokens to layer 1. */
    size_t half = (size_t)TOK / 2 * KVH * HD;
    assert_int_equal(kvs_client_seq_append(c, seq, 1, TOK / 2, k, v, half * 4),
                     0);
    assert_int_equal(
        kvs_client_seq_append(c, seq, 1, TOK / 2, k + half, v + half, half * 4),
        0);
    assert_int_equal(kvs_client_seq_append(c, seq, 0, TOK, v, k,
                                           sizeof(float) * TOK * KVH * HD),
                     0);
    /* Wrong byte count for the geometry. */
    assert_int_equal(kvs_client_seq_append(c, seq, 1, 2, k, v, 100 * 4),
                     KVS_EGEOMETRY);
    assert_int_equal(kvs_client_seq_append(c, seq, 7, 1, k, v, KVH * HD * 4),
                     KVS_ERANGE);

    kvs_seq_info_t in;
    assert_int_equal(kvs_client_seq_info(c, seq, &in), 0);
    assert_int_equal(in.geometry.n_layers, LAYERS);
    assert_int_equal(in.geometry.n_q_heads, QH);
    assert_int_equal(in.geometry.head_dim, HD);
    assert_int_equal(in.geometry.dtype, KVS_DTYPE_F32);
    assert_int_equal(in.tokens_max, TOK);

    /* Search, exact: query head h = 10 x key of token 17 on its kv head,
     * so token 17 must rank first for every head. */
    float q[QH * HD];
    for (int h = 0; h < QH; h++)
        for (int d = 0; d < HD; d++)
            q[h * HD + d] = 10.0f * k[(17 * KVH + h / (QH / KVH)) * HD + d];
    /* Zero fields mean the server's defaults (the client does not link the
     * engine, so there is no kvs_query_params_default here). */
    kvs_query_params_t p = {.mode = KVS_MODE_EXACT};
    int64_t pos[QH * 5];
    float sc[QH * 5];
    assert_int_equal(
        kvs_client_seq_search(c, seq, 1, q, QH * HD, 5, &p, pos, sc, QH * 5),
        0);
    for (int h = 0; h < QH; h++) {
        assert_int_equal(pos[h * 5], 17);
        assert_true(sc[h * 5] >= sc[h * 5 + 1]);
    }
    /* Output capacity too small: a clear client-side range error. */
    assert_int_equal(
        kvs_client_seq_search(c, seq, 1, q, QH * HD, 5, &p, pos, sc, 3),
        KVS_ERANGE);
    /* Queries of the wrong shape. */
    assert_int_equal(
        kvs_client_seq_search(c, seq, 1, q, HD, 5, &p, pos, sc, QH * 5),
        KVS_EGEOMETRY);

    /* Attend, exact, against a double-precision reference. */
    float out[QH * HD];
    kvs_attend_stats_t st;
    assert_int_equal(kvs_client_seq_attend(c, seq, 1, q, QH * HD, &p, out, &st),
                     0);
    assert_int_equal(st.keys_total, (uint64_t)TOK * KVH);
    double scale = 1.0 / sqrt((double)HD);
    for (int h = 0; h < QH; h++) {
        int kh = h / (QH / KVH);
        double w[TOK], mx = -1e300, sum = 0;
        for (int t = 0; t < TOK; t++) {
            double s = 0;
            for (int d = 0; d < HD; d++)
                s += (double)q[h * HD + d] * k[(t * KVH + kh) * HD + d];
            w[t] = s * scale;
            if (w[t] > mx)
                mx = w[t];
        }
        for (int t = 0; t < TOK; t++)
            sum += (w[t] = exp(w[t] - mx));
        for (int d = 0; d < HD; d++) {
            double o = 0;
            for (int t = 0; t < TOK; t++)
                o += w[t] / sum * v[(t * KVH + kh) * HD + d];
            assert_true(fabs(o - out[h * HD + d]) < 1e-3);
        }
    }
    /* Layer out of range. */
    assert_int_equal(
        kvs_client_seq_attend(c, seq, LAYERS, q, QH * HD, &p, out, NULL),
        KVS_ERANGE);

    uint64_t ids[64];
    size_t n = 0;
    uint64_t total = 0;
    assert_int_equal(kvs_client_store_list(c, 0, ids, 64, &n, &total), 0);
    bool found = false;
    for (size_t i = 0; i < n; i++)
        found |= ids[i] == seq;
    assert_true(found);
    assert_true(total >= 1);

    kvs_client_stats_t s;
    assert_int_equal(kvs_client_store_stats(c, 0, &s), 0);
    assert_true(s.store.sequences >= 1);
    assert_true(s.store.bytes > 0);
    assert_string_equal(s.server_version, "0.1.0");
    assert_true(s.requests_total > 0);
    /* started without --gpu: the CPU serves, and says so */
    assert_string_equal(s.attend_path, "CPU (no cuda_device)");
    assert_int_equal(s.store.gpu_attends, 0);

    assert_int_equal(kvs_client_ping(c, 0), 0);
    /* Fork: all of it, and a prefix; children are independent. */
    uint64_t all = seq + 1000, pre = seq + 2000;
    assert_int_equal(kvs_client_seq_fork(c, seq, KVS_CLIENT_FORK_ALL, all), 0);
    assert_int_equal(kvs_client_seq_fork(c, seq, 100, pre), 0);
    assert_int_equal(kvs_client_seq_fork(c, seq, 100, pre), KVS_EEXIST);
    assert_int_equal(kvs_client_seq_fork(c, seq, TOK + 1, seq + 3000),
                     KVS_ERANGE);
    assert_int_equal(kvs_client_seq_fork(c, seq + 4000, 1, seq + 5000),
                     KVS_ENOSEQ);
    assert_int_equal(kvs_client_seq_info(c, pre, &in), 0);
    assert_int_equal(in.tokens_max, 100);
    assert_int_equal(kvs_client_seq_append(c, pre, 1, 1, k, v, KVH * HD * 4),
                     0);
    assert_int_equal(kvs_client_seq_info(c, pre, &in), 0);
    assert_int_equal(in.tokens_max, 101);
    assert_int_equal(kvs_client_seq_drop(c, seq), 0);
    /* The whole fork answers like its parent did. */
    int64_t pos2[QH * 5];
    float sc2[QH * 5];
    assert_int_equal(
        kvs_client_seq_search(c, all, 1, q, QH * HD, 5, &p, pos2, sc2, QH * 5),
        0);
    assert_memory_equal(pos, pos2, sizeof(pos));
    assert_int_equal(kvs_client_seq_info(c, all, &in), 0);
    assert_int_equal(in.tokens_max, TOK);
    assert_int_equal(kvs_client_seq_drop(c, all), 0);
    assert_int_equal(kvs_client_seq_drop(c, pre), 0);
    assert_int_equal(kvs_client_seq_drop(c, seq), KVS_ENOSEQ);
    assert_int_equal(kvs_client_seq_info(c, seq, &in), KVS_ENOSEQ);
}

static void test_server_every_op_ipv4(void **state) {
    (void)state;
    kvs_client_t *c = td_client(&D, 0, NULL);
    assert_non_null(c);
    exercise_ops(c, 101);
    kvs_client_close(c);
}

static void test_server_every_op_ipv6(void **state) {
    (void)state;
    kvs_client_t *c = td_client(&D, 1, NULL);
    assert_non_null(c);
    exercise_ops(c, 102);
    kvs_client_close(c);
}

static void test_server_every_op_unix(void **state) {
    (void)state;
    kvs_client_t *c = td_client(&D, 2, NULL);
    assert_non_null(c);
    exercise_ops(c, 103);
    kvs_client_close(c);
}

static void test_server_metrics_and_health(void **state) {
    (void)state;
    int status = 0;
    char *h = td_http_get(D.http_port, "/healthz", &status);
    assert_non_null(h);
    assert_int_equal(status, 200);
    free(h);
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_int_equal(status, 200);
    assert_non_null(strstr(m, "kvstored_requests_total{op=\"append\"}"));
    assert_non_null(strstr(m, "kvstored_request_duration_seconds_bucket{op="
                              "\"search\",le=\"+Inf\"}"));
    assert_non_null(strstr(m, "kvstored_errors_total{op=\"create\",status="
                              "\"KVS_EEXIST\"}"));
    assert_true(td_metric(m, "kvstored_received_bytes_total") > 0);
    assert_true(td_metric(m, "kvstore_sequences") >= 0);
    assert_true(td_metric(m, "kvstore_ram_bytes") >= 0);
    assert_true(td_metric(m, "kvstore_build_backlog") >= 0);
    assert_true(td_metric(m, "kvstore_resident_bytes") >= 0);
    assert_true(td_metric(m, "kvstore_evictions_total") == 0);
    assert_true(td_metric(m, "kvstore_page_ins_total") == 0);
    assert_true(td_metric(m, "kvstore_expired_total") >= 0);
    free(m);
    m = td_http_get(D.http_port, "/nope", &status);
    assert_int_equal(status, 404);
    free(m);
}

/* Appends of 256 KiB and more are decoded in place (no copy in the daemon,
 * counted by /metrics) and the engine still gets every byte: an exact
 * top-1 search for a stored key finds its position. A small append takes
 * the copying path and is counted as such. */
static void test_server_append_in_place(void **state) {
    (void)state;
    enum { H = 8, D128 = 128, N = 64, SMALL = 2, APPENDS = 3 };
    const kvs_geometry_t g = {.n_layers = 1,
                              .n_q_heads = H,
                              .n_kv_heads = H,
                              .head_dim = D128,
                              .dtype = KVS_DTYPE_F32};
    size_t row = (size_t)H * D128, bytes = (size_t)N * row * sizeof(float);
    float *k = malloc(APPENDS * bytes), *v = malloc(APPENDS * bytes);
    assert_non_null(k);
    assert_non_null(v);
    uint64_t seed = 77;
    for (size_t i = 0; i < APPENDS * (size_t)N * row; i++) {
        k[i] = frand(&seed);
        v[i] = frand(&seed);
    }
    int status = 0;
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    double in0 = td_metric(m, "kvstored_appends_in_place_total");
    double pay0 = td_metric(m, "kvstored_append_payload_bytes_total");
    double dec0 =
        td_metric(m, "kvstored_append_copied_bytes_total{stage=\"decode\"}");
    double rd0 =
        td_metric(m, "kvstored_append_copied_bytes_total{stage=\"reader\"}");
    free(m);
    assert_true(in0 >= 0 && pay0 >= 0 && dec0 >= 0 && rd0 >= 0);

    kvs_client_t *c = td_client(&D, 0, NULL);
    assert_non_null(c);
    assert_int_equal(kvs_client_seq_create(c, 700, &g), 0);
    for (int a = 0; a < APPENDS; a++)
        assert_int_equal(kvs_client_seq_append(c, 700, 0, N, k + a * N * row,
                                               v + a * N * row, bytes),
                         0);
    /* Its keys are values of the first append: unlike any stored key. */
    assert_int_equal(kvs_client_seq_append(c, 700, 0, SMALL, v + 10 * row, k,
                                           SMALL * row * sizeof(float)),
                     0);
    m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    double in1 = td_metric(m, "kvstored_appends_in_place_total");
    double pay1 = td_metric(m, "kvstored_append_payload_bytes_total");
    double dec1 =
        td_metric(m, "kvstored_append_copied_bytes_total{stage=\"decode\"}");
    double rd1 =
        td_metric(m, "kvstored_append_copied_bytes_total{stage=\"reader\"}");
    free(m);
    double small = 2.0 * SMALL * (double)row * sizeof(float);
    assert_true(in1 - in0 == APPENDS);
    assert_true(pay1 - pay0 == 2.0 * APPENDS * (double)bytes + small);
    assert_true(dec1 - dec0 == small); /* only the small one was copied */
    /* The reader moves at most a read chunk of each large frame. */
    assert_true(rd1 - rd0 <= APPENDS * 65536.0 + small + 4096);

    /* Every query head asks for the key of token t of its KV head: the
     * exact top-1 is t (random 128-d keys: |k|^2 dwarfs any other q.k). */
    kvs_query_params_t p = {.mode = KVS_MODE_EXACT};
    uint32_t ts[] = {0, 77, APPENDS * N - 1, APPENDS * N + 1};
    float *q = malloc(row * sizeof(float));
    assert_non_null(q);
    for (size_t i = 0; i < sizeof(ts) / sizeof(ts[0]); i++) {
        uint32_t t = ts[i];
        const float *src = t < APPENDS * N
                               ? k + (size_t)t * row
                               : v + (size_t)(10 + t - APPENDS * N) * row;
        for (size_t j = 0; j < row; j++)
            q[j] = 4 * src[j];
        int64_t pos[H];
        float sc[H];
        assert_int_equal(
            kvs_client_seq_search(c, 700, 0, q, row, 1, &p, pos, sc, H), 0);
        for (int h = 0; h < H; h++)
            assert_int_equal(pos[h], t);
    }
    assert_int_equal(kvs_client_seq_drop(c, 700), 0);
    kvs_client_close(c);
    free(q);
    free(k);
    free(v);
}

/* --------------------------------------------------------- pipelining */

static void test_server_pipelining_out_of_order(void **state) {
    (void)state;
    kvs_client_t *c = td_client(&D, 0, NULL);
    const uint64_t seq = 201;
    /* A context large enough that one exact attend takes far longer than
     * a ping's trip through the loop. */
    enum { CTX = 16384 };
    kvs_geometry_t g = GEO;
    g.n_layers = 1;
    assert_int_equal(kvs_client_seq_create(c, seq, &g), 0);
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, 7);
    kvs_client_op_t app[CTX / TOK];
    memset(app, 0, sizeof(app));
    for (int i = 0; i < CTX / TOK; i++) {
        app[i].type = KVS_CLIENT_APPEND;
        app[i].seq = seq;
        app[i].n_tokens = TOK;
        app[i].keys = k;
        app[i].values = v;
        app[i].kv_bytes = sizeof(k);
        assert_int_equal(kvs_client_submit(c, &app[i]), 0);
    }
    kvs_client_op_t *done[256];
    size_t got = 0, n;
    while (got < CTX / TOK) {
        assert_int_equal(kvs_client_poll(c, done, 256, &n, 10000), 0);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++)
            assert_int_equal(done[i]->status, 0);
        got += n;
    }
    kvs_seq_info_t in;
    assert_int_equal(kvs_client_seq_info(c, seq, &in), 0);
    assert_int_equal(in.tokens_max, CTX);

    /* Heavy attends first, then pings behind them on the same connection. */
    enum { NA = 4, NP = 32 };
    float q[QH * HD], out[NA][QH * HD];
    uint64_t s = 3;
    for (int i = 0; i < QH * HD; i++)
        q[i] = frand(&s);
    /* Zero fields mean the server's defaults (the client does not link the
     * engine, so there is no kvs_query_params_default here). */
    kvs_query_params_t p = {.mode = KVS_MODE_EXACT};
    kvs_client_op_t ops[NA + NP];
    memset(ops, 0, sizeof(ops));
    for (int i = 0; i < NA + NP; i++) {
        kvs_client_op_t *op = &ops[i];
        op->data = (void *)(intptr_t)i;
        if (i < NA) {
            op->type = KVS_CLIENT_ATTEND;
            op->seq = seq;
            op->queries = q;
            op->n_query_floats = QH * HD;
            op->params = &p;
            op->output = out[i];
        } else {
            op->type = KVS_CLIENT_PING;
        }
        assert_int_equal(kvs_client_submit(c, op), 0);
    }
    int order[NA + NP], no = 0;
    while (no < NA + NP) {
        assert_int_equal(kvs_client_poll(c, done, 256, &n, 20000), 0);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(done[i]->status, 0);
            order[no++] = (int)(intptr_t)done[i]->data;
        }
    }
    /* Some ping overtook the first attend: answers are matched by id,
     * not by position. */
    int first_attend_at = -1, first_ping_at = -1;
    for (int i = 0; i < no; i++) {
        if (order[i] < NA && first_attend_at < 0)
            first_attend_at = i;
        if (order[i] >= NA && first_ping_at < 0)
            first_ping_at = i;
    }
    assert_true(first_ping_at < first_attend_at);
    /* Identical attends give identical outputs, whatever their order. */
    for (int i = 1; i < NA; i++)
        assert_memory_equal(out[0], out[i], sizeof(out[0]));
    assert_int_equal(kvs_client_seq_drop(c, seq), 0);
    kvs_client_close(c);
}

/* ----------------------------------------------------- many connections */

static void test_server_many_connections(void **state) {
    (void)state;
    enum { N = 1000 };
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < N + 64) {
        rl.rlim_cur = rl.rlim_max < N + 64 ? rl.rlim_max : N + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < N + 64) {
        print_message("RLIMIT_NOFILE hard limit %llu too low for %d "
                      "connections\n",
                      (unsigned long long)rl.rlim_max, N);
        skip();
    }
    static int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = td_raw_connect(D.port, i % 2);
        assert_true(fds[i] >= 0);
    }
    /* All connected at once: each pings, all are answered. */
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest ping = KVS__V1__PING_REQUEST__INIT;
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &ping;
    for (int i = 0; i < N; i++)
        assert_int_equal(td_send_request(fds[i], (uint64_t)i + 1,
                                         KVS_PROTOCOL_VERSION, &req),
                         0);
    for (int i = 0; i < N; i++) {
        kvs_frame_header_t h;
        Kvs__V1__Response *r = NULL;
        assert_int_equal(td_read_response(fds[i], 10000, &h, &r), 0);
        assert_int_equal(h.request_id, (uint64_t)i + 1);
        assert_int_equal(r->status, 0);
        kvs__v1__response__free_unpacked(r, NULL);
    }
    int status;
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_true(td_metric(m, "kvstored_connections") >= N);
    free(m);
    for (int i = 0; i < N; i++)
        close(fds[i]);
}

/* ------------------------------------------------------------ bad input */

static void expect_fatal(int fd, int status, uint64_t id) {
    kvs_frame_header_t h;
    Kvs__V1__Response *r = NULL;
    assert_int_equal(td_read_response(fd, 5000, &h, &r), 0);
    assert_int_equal(r->status, status);
    assert_int_equal(h.request_id, id);
    assert_true(h.flags & KVS_FRAME_F_CLOSE);
    assert_true(r->message && r->message[0]);
    kvs__v1__response__free_unpacked(r, NULL);
    assert_true(td_wait_eof(fd, 5000));
}

static void still_alive(void) {
    kvs_client_t *c = td_client(&D, 0, NULL);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
}

static void test_server_bad_frames(void **state) {
    (void)state;
    uint8_t hdr[KVS_FRAME_HEADER_SIZE];
    kvs_frame_header_t h = {.magic = KVS_FRAME_MAGIC,
                            .version = KVS_PROTOCOL_VERSION,
                            .request_id = 77};

    /* Oversized: body_len above max_frame_bytes (64 MiB default). */
    int fd = td_raw_connect(D.port, false);
    h.body_len = 200u << 20;
    kvs_frame_header_encode(&h, hdr);
    assert_int_equal(td_send_all(fd, hdr, sizeof(hdr)), 0);
    expect_fatal(fd, KVS_ETOOBIG, 77);
    close(fd);

    /* Garbage: not even a magic; answered with id 0. */
    fd = td_raw_connect(D.port, true);
    const char junk[] = "GET / HTTP/1.1\r\nHost: kvstored\r\n\r\n";
    assert_int_equal(td_send_all(fd, junk, sizeof(junk) - 1), 0);
    expect_fatal(fd, KVS_EPROTO, 0);
    close(fd);

    /* Wrong protocol version in the header. */
    fd = td_raw_connect(D.port, false);
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest ping = KVS__V1__PING_REQUEST__INIT;
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &ping;
    assert_int_equal(td_send_request(fd, 78, 9, &req), 0);
    expect_fatal(fd, KVS_EPROTO, 78);
    close(fd);

    /* Wrong protocol version in Hello. */
    fd = td_raw_connect(D.port, false);
    Kvs__V1__HelloRequest hello = KVS__V1__HELLO_REQUEST__INIT;
    hello.protocol_version = 2;
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &hello;
    assert_int_equal(td_send_request(fd, 79, KVS_PROTOCOL_VERSION, &req), 0);
    expect_fatal(fd, KVS_EPROTO, 79);
    close(fd);

    /* A valid header with a body that is not a Request. */
    fd = td_raw_connect(D.port, false);
    h.body_len = 6;
    kvs_frame_header_encode(&h, hdr);
    assert_int_equal(td_send_all(fd, hdr, sizeof(hdr)), 0);
    assert_int_equal(td_send_all(fd, "\xff\xff\xff\xff\xff\xff", 6), 0);
    expect_fatal(fd, KVS_EPROTO, 77);
    close(fd);

    /* Truncated: a header promising 1000 bytes, 10 sent, then close. The
     * server must simply drop the connection. */
    fd = td_raw_connect(D.port, false);
    h.body_len = 1000;
    kvs_frame_header_encode(&h, hdr);
    assert_int_equal(td_send_all(fd, hdr, sizeof(hdr)), 0);
    assert_int_equal(td_send_all(fd, "0123456789", 10), 0);
    close(fd);

    /* A well-formed request before it still gets its answer. */
    fd = td_raw_connect(D.port, false);
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &ping;
    assert_int_equal(td_send_request(fd, 5, KVS_PROTOCOL_VERSION, &req), 0);
    assert_int_equal(td_send_all(fd, junk, sizeof(junk) - 1), 0);
    kvs_frame_header_t rh;
    Kvs__V1__Response *r = NULL;
    assert_int_equal(td_read_response(fd, 5000, &rh, &r), 0);
    assert_int_equal(rh.request_id, 5);
    assert_int_equal(r->status, 0);
    kvs__v1__response__free_unpacked(r, NULL);
    expect_fatal(fd, KVS_EPROTO, 0);
    close(fd);

    /* Random bytes in random splits, many times. */
    uint64_t s = 99;
    for (int i = 0; i < 50; i++) {
        fd = td_raw_connect(D.port, i % 2);
        uint8_t buf[300];
        for (size_t j = 0; j < sizeof(buf); j++)
            buf[j] = (uint8_t)(frand(&s) * 127 + 128);
        if (i % 3 == 0) { /* a valid header in front of random bodies */
            h.body_len = 200;
            kvs_frame_header_encode(&h, buf);
        }
        td_send_all(fd, buf, sizeof(buf));
        assert_true(td_wait_eof(fd, 5000));
        close(fd);
    }
    still_alive();
}

/* A client process killed while its requests run. */
static void test_server_client_killed(void **state) {
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kvs_client_t *c = td_client(&D, 0, NULL);
        kvs_geometry_t g = GEO;
        g.n_layers = 1;
        if (kvs_client_seq_create(c, 301, &g))
            _exit(3);
        static float k[TOK * KVH * HD], v[TOK * KVH * HD];
        make_kv(k, v, 1);
        static kvs_client_op_t ops[64];
        for (int i = 0; i < 64; i++) {
            ops[i].type = KVS_CLIENT_APPEND;
            ops[i].seq = 301;
            ops[i].n_tokens = TOK;
            ops[i].keys = k;
            ops[i].values = v;
            ops[i].kv_bytes = sizeof(k);
            kvs_client_submit(c, &ops[i]);
        }
        raise(SIGKILL); /* no close, no reads: the socket just dies */
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    assert_true(WIFSIGNALED(st));
    still_alive();
    /* Whatever was applied was applied whole: tokens are a multiple of
     * one append. */
    kvs_client_t *c = td_client(&D, 0, NULL);
    kvs_seq_info_t in;
    assert_int_equal(kvs_client_seq_info(c, 301, &in), 0);
    assert_int_equal(in.tokens_max % TOK, 0);
    assert_int_equal(kvs_client_seq_drop(c, 301), 0);
    kvs_client_close(c);
}

/* systemd readiness: with NOTIFY_SOCKET set, READY=1 arrives once the
 * daemon listens, STOPPING=1 when it shuts down. */
static void test_server_sd_notify(void **state) {
    (void)state;
    char path[108];
    snprintf(path, sizeof(path), "/tmp/kvs-notify-%d", (int)getpid());
    unlink(path);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    setenv("NOTIFY_SOCKET", path, 1);
    test_daemon_t N = {0};
    int rc = td_start(&N, NULL);
    unsetenv("NOTIFY_SOCKET");
    assert_int_equal(rc, 0);
    char msg[256];
    struct pollfd p = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, 5000), 1);
    ssize_t n = recv(fd, msg, sizeof(msg) - 1, 0);
    assert_true(n > 0);
    msg[n] = 0;
    assert_non_null(strstr(msg, "READY=1"));
    assert_int_equal(td_stop(&N), 0);
    assert_int_equal(poll(&p, 1, 5000), 1);
    n = recv(fd, msg, sizeof(msg) - 1, 0);
    assert_true(n > 0);
    msg[n] = 0;
    assert_non_null(strstr(msg, "STOPPING=1"));
    close(fd);
    unlink(path);
    td_cleanup(&N);
}

/* ---------------------------------------------------------------- limits */

static void test_server_limits(void **state) {
    (void)state;
    test_daemon_t L = {0};
    const char *extra[] = {"--max-frame-bytes",
                           "64K",
                           "--max-tokens-per-append",
                           "64",
                           "--max-head-dim",
                           "32",
                           "--max-connections",
                           "3",
                           "--idle-timeout-ms",
                           "1500",
                           NULL};
    assert_int_equal(td_start(&L, extra), 0);
    kvs_client_t *c = td_client(&L, 0, NULL);
    kvs_geometry_t g = GEO;
    g.head_dim = 64;
    assert_int_equal(kvs_client_seq_create(c, 1, &g), KVS_ETOOBIG);
    assert_non_null(strstr(kvs_client_errmsg(c), "max_head_dim"));
    assert_int_equal(kvs_client_seq_create(c, 1, &GEO), 0);
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, 5);
    /* 65 tokens: over max_tokens_per_append, connection stays usable. */
    assert_int_equal(
        kvs_client_seq_append(c, 1, 0, 65, k, v, 65 * KVH * HD * 4),
        KVS_ETOOBIG);
    assert_non_null(strstr(kvs_client_errmsg(c), "max_tokens_per_append"));
    assert_int_equal(
        kvs_client_seq_append(c, 1, 0, 64, k, v, 64 * KVH * HD * 4), 0);
    /* 256 tokens x 2 x 256 B = 128 KiB body: over max_frame_bytes. The
     * client refuses to send what it cannot; a raw sender gets ETOOBIG. */
    int fd = td_raw_connect(L.port, false);
    uint8_t hdr[KVS_FRAME_HEADER_SIZE];
    kvs_frame_header_t h = {.magic = KVS_FRAME_MAGIC,
                            .version = KVS_PROTOCOL_VERSION,
                            .request_id = 9,
                            .body_len = 65 << 10};
    kvs_frame_header_encode(&h, hdr);
    td_send_all(fd, hdr, sizeof(hdr));
    expect_fatal(fd, KVS_ETOOBIG, 9);
    close(fd);
    assert_int_equal(kvs_client_ping(c, 0), 0);

    /* max_connections 3: c holds one; two more fit, the fourth is refused
     * with a frame that says why. A ping answered on each of them (and on
     * c, whose idle clock restarts) shows the daemon holds all three
     * before the fourth comes, however loaded the machine: a fixed sleep
     * was not enough under a parallel test run. */
    assert_int_equal(kvs_client_ping(c, 0), 0);
    int a = td_raw_connect(L.port, false), b = td_raw_connect(L.port, true);
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest ping = KVS__V1__PING_REQUEST__INIT;
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &ping;
    assert_int_equal(td_call(a, 1, &req, 5000), 0);
    assert_int_equal(td_call(b, 1, &req, 5000), 0);
    int x = td_raw_connect(L.port, false);
    kvs_frame_header_t rh;
    Kvs__V1__Response *r = NULL;
    assert_int_equal(td_read_response(x, 5000, &rh, &r), 0);
    assert_int_equal(r->status, KVS_EBUSY);
    assert_true(rh.flags & KVS_FRAME_F_CLOSE);
    assert_non_null(strstr(r->message, "max_connections"));
    kvs__v1__response__free_unpacked(r, NULL);
    assert_true(td_wait_eof(x, 5000));
    close(x);

    /* Idle timeout: a and b say nothing more and are closed. */
    assert_true(td_wait_eof(a, 6000));
    assert_true(td_wait_eof(b, 6000));
    close(a);
    close(b);
    /* The client's connection idled out too (closed in the same sweep as a
     * and b; give its FIN a moment to arrive); it reconnects on next use. */
    sleep_ms(100);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    assert_int_equal(td_stop(&L), 0);
    td_cleanup(&L);
}

/* ------------------------------------------------------------------ auth */

static void test_server_auth(void **state) {
    (void)state;
    test_daemon_t A = {0};
    const char *extra[] = {"--auth-token", "s3cret-token", NULL};
    assert_int_equal(td_start(&A, extra), 0);

    kvs_client_t *c = td_client(&A, 0, NULL); /* no token */
    assert_int_equal(kvs_client_ping(c, 0), KVS_EAUTH);
    assert_non_null(strstr(kvs_client_errmsg(c), "authentication"));
    kvs_client_close(c);

    c = td_client(&A, 1, "wrong-token!");
    assert_int_equal(kvs_client_ping(c, 0), KVS_EAUTH);
    assert_non_null(strstr(kvs_client_errmsg(c), "wrong token"));
    kvs_client_close(c);

    c = td_client(&A, 0, "s3cret-token");
    assert_int_equal(kvs_client_ping(c, 0), 0);
    assert_int_equal(kvs_client_seq_create(c, 1, &GEO), 0);
    kvs_client_close(c);

    /* Raw: a request before Hello is refused and the connection closed. */
    int fd = td_raw_connect(A.port, false);
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__DropRequest dr = KVS__V1__DROP_REQUEST__INIT;
    dr.seq = 1;
    req.op_case = KVS__V1__REQUEST__OP_DROP;
    req.drop = &dr;
    assert_int_equal(td_send_request(fd, 11, KVS_PROTOCOL_VERSION, &req), 0);
    expect_fatal(fd, KVS_EAUTH, 11);
    close(fd);

    /* ... and did nothing. */
    c = td_client(&A, 0, "s3cret-token");
    kvs_seq_info_t in;
    assert_int_equal(kvs_client_seq_info(c, 1, &in), 0);
    kvs_client_close(c);
    int status;
    char *m = td_http_get(A.http_port, "/metrics", &status);
    assert_true(td_metric(m, "kvstored_auth_failures_total") >= 3);
    free(m);
    assert_int_equal(td_stop(&A), 0);
    td_cleanup(&A);
}

/* ------------------------------------------------- shutdown and restart */

static void test_server_sigterm_inflight_and_restart(void **state) {
    (void)state;
    test_daemon_t S = {0};
    assert_int_equal(td_start(&S, NULL), 0);
    kvs_client_t *c = td_client(&S, 0, NULL);
    kvs_geometry_t g = GEO;
    g.n_layers = 1;
    assert_int_equal(kvs_client_seq_create(c, 5, &g), 0);
    static float k[TOK * KVH * HD], v[TOK * KVH * HD];
    make_kv(k, v, 9);
    enum { N = 96 };
    static kvs_client_op_t ops[N];
    memset(ops, 0, sizeof(ops));
    for (int i = 0; i < N; i++) {
        ops[i].type = KVS_CLIENT_APPEND;
        ops[i].seq = 5;
        ops[i].n_tokens = TOK;
        ops[i].keys = k;
        ops[i].values = v;
        ops[i].kv_bytes = sizeof(k);
        assert_int_equal(kvs_client_submit(c, &ops[i]), 0);
    }
    /* Wait until the daemon is busy with them, then ask it to stop. */
    kvs_client_op_t *done[N];
    size_t n = 0, got = 0;
    int ok = 0, lost = 0;
    assert_int_equal(kvs_client_poll(c, done, N, &n, 10000), 0);
    assert_true(n > 0);
    kill(S.pid, SIGTERM);
    for (;;) {
        for (size_t i = 0; i < n; i++) {
            /* Each request is answered, or reported lost with the
             * connection: never another error. */
            if (done[i]->status == 0)
                ok++;
            else if (done[i]->status == KVS_ECONN)
                lost++;
            else
                fail_msg("unexpected status %s: %s",
                         kvs_err_name(done[i]->status), done[i]->message);
        }
        got += n;
        if (got == N)
            break;
        assert_int_equal(kvs_client_poll(c, done, N, &n, 20000), 0);
        assert_true(n > 0);
    }
    assert_int_equal(ok + lost, N);
    assert_true(ok > 0);
    /* Exit 0 after draining: every request it had read was answered. */
    int st = 0;
    for (int i = 0; i < 2000 && S.pid; i++) {
        if (waitpid(S.pid, &st, WNOHANG) == S.pid)
            S.pid = 0;
        else
            sleep_ms(10);
    }
    assert_int_equal(S.pid, 0);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);

    /* The daemon is gone: the client reports it clearly. */
    assert_int_equal(kvs_client_ping(c, 0), KVS_ECONN);

    /* Restart on the same port and data directory; the same client
     * reconnects by itself. */
    assert_int_equal(td_start(&S, NULL), 0);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_seq_info_t in;
    assert_int_equal(kvs_client_seq_info(c, 5, &in), 0);
    /* Every acknowledged append is there, none half-applied (appends the
     * daemon applied but could not acknowledge may be there too). */
    assert_true(in.tokens_max >= (uint64_t)ok * TOK);
    assert_int_equal(in.tokens_max % TOK, 0);
    assert_int_equal(in.geometry.head_dim, HD);
    kvs_client_close(c);
    assert_int_equal(td_stop(&S), 0);
    td_cleanup(&S);
}

/* TTL: a sequence left alone past its TTL is dropped by the daemon's store;
 * one created with a TTL likewise. */
static void test_server_ttl(void **state) {
    (void)state;
    kvs_client_t *c = td_client(&D, 0, NULL);
    assert_int_equal(kvs_client_seq_create(c, 401, &GEO), 0);
    assert_int_equal(kvs_client_seq_set_ttl(c, 401, 1), 0);
    kvs_client_op_t op = {.type = KVS_CLIENT_CREATE,
                          .seq = 402,
                          .geometry = GEO,
                          .ttl_seconds = 1};
    kvs_client_op_t *done[1];
    size_t n = 0;
    assert_int_equal(kvs_client_submit(c, &op), 0);
    assert_int_equal(kvs_client_poll(c, done, 1, &n, 5000), 0);
    assert_int_equal(n, 1);
    assert_int_equal(done[0]->status, 0);
    assert_int_equal(kvs_client_seq_set_ttl(c, 403, 1), KVS_ENOSEQ);
    kvs_seq_info_t in;
    int gone = 0;
    for (int i = 0; i < 50 && gone < 2; i++) { /* expiry runs every second */
        sleep_ms(100);
        gone = (kvs_client_seq_info(c, 401, &in) == KVS_ENOSEQ) +
               (kvs_client_seq_info(c, 402, &in) == KVS_ENOSEQ);
    }
    assert_int_equal(gone, 2);
    kvs_client_close(c);
}

/* Many daemons: rendezvous hashing spreads sequences, every client with the
 * same list agrees. */
static void test_server_two_nodes(void **state) {
    (void)state;
    test_daemon_t B = {0};
    assert_int_equal(td_start(&B, NULL), 0);
    char a1[64], a2[64];
    snprintf(a1, sizeof(a1), "127.0.0.1:%d", D.port);
    snprintf(a2, sizeof(a2), "[::1]:%d", B.port);
    const char *addrs[2] = {a1, a2};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 2;
    kvs_client_t *c;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    int per[2] = {0, 0};
    for (uint64_t s = 1000; s < 1040; s++) {
        per[kvs_client_node_for(c, s)]++;
        assert_int_equal(kvs_client_seq_create(c, s, &GEO), 0);
    }
    assert_true(per[0] > 5 && per[1] > 5);
    size_t n0, n1;
    uint64_t ids[128], t0, t1;
    assert_int_equal(kvs_client_store_list(c, 0, ids, 128, &n0, &t0), 0);
    assert_int_equal(kvs_client_store_list(c, 1, ids, 128, &n1, &t1), 0);
    assert_int_equal(t1, (uint64_t)per[1]);
    assert_true(t0 >= (uint64_t)per[0]);
    for (uint64_t s = 1000; s < 1040; s++)
        assert_int_equal(kvs_client_seq_drop(c, s), 0);
    kvs_client_close(c);
    assert_int_equal(td_stop(&B), 0);
    td_cleanup(&B);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest shared[] = {
        cmocka_unit_test(test_server_every_op_ipv4),
        cmocka_unit_test(test_server_every_op_ipv6),
        cmocka_unit_test(test_server_every_op_unix),
        cmocka_unit_test(test_server_metrics_and_health),
        cmocka_unit_test(test_server_append_in_place),
        cmocka_unit_test(test_server_pipelining_out_of_order),
        cmocka_unit_test(test_server_many_connections),
        cmocka_unit_test(test_server_bad_frames),
        cmocka_unit_test(test_server_client_killed),
        cmocka_unit_test(test_server_two_nodes),
        cmocka_unit_test(test_server_ttl),
    };
    const struct CMUnitTest own[] = {
        cmocka_unit_test(test_server_limits),
        cmocka_unit_test(test_server_auth),
        cmocka_unit_test(test_server_sigterm_inflight_and_restart),
        cmocka_unit_test(test_server_sd_notify),
    };
    int fails = cmocka_run_group_tests_name("kvstored_shared", shared,
                                            group_setup, group_teardown);
    fails += cmocka_run_group_tests_name("kvstored_own", own, NULL, NULL);
    return fails;
}
