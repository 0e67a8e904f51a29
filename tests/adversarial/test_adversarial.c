/*
 * test_adversarial.c: kvstored against hostile and malformed clients, over
 * raw frames on loopback (wire.h). Each test starts its own daemon with the
 * limits it exercises, is bounded in time and request count, and checks
 * that the daemon is still alive and correct afterwards.
 *
 * Covered: pipelined mutations of one sequence take effect in the order
 * sent, and pipelined reads see exactly the changes sent before them (also
 * when the client disconnects mid-pipeline); a client that never reads
 * keeps the daemon's memory bounded and still gets every answer;
 * unauthenticated connections cannot make the daemon buffer more than a
 * Hello; slow senders are closed by the frame
 * deadline; the bytes buffered over all connections are capped; one busy
 * connection does not starve another's info; tokens with a NUL and junk
 * are refused; truncated, oversized, bad-magic, bad-version and garbage
 * frames. Peak daemon RSS under each hostile client is printed as
 * `adversarial_rss case=... base_kb=... peak_kb=...` lines.
 */
#include "wire.h"

#include <errno.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#define HD 32 /* head_dim of every test sequence */

/* Start a daemon with extra flags (NULL-terminated list). */
static void start(test_daemon_t *d, const char *const *extra) {
    memset(d, 0, sizeof(*d));
    assert_int_equal(td_start(d, extra), 0);
}

static void stop(test_daemon_t *d) {
    int rc = td_stop(d);
    if (rc != 0)
        td_dump_log(d);
    td_cleanup(d);
    assert_int_equal(rc, 0);
}

/* The daemon answers a fresh connection (it did not crash or wedge). */
static void assert_alive(const test_daemon_t *d, const char *token) {
    int fd = td_raw_connect(d->port, false);
    assert_true(fd >= 0);
    assert_int_equal(td_hello(fd, token), 0);
    close(fd);
}

static void report_rss(const char *name, long base, long peak) {
    printf("adversarial_rss case=%s base_kb=%ld peak_kb=%ld growth_kb=%ld\n",
           name, base, peak, peak - base);
    fflush(stdout);
}

/* Read exactly n answers (any order), counting non-zero statuses; ids must
 * be in [lo, lo + n) and each seen once. */
static void read_answers(int fd, uint64_t lo, size_t n, int timeout_ms,
                         size_t *errors) {
    uint8_t *seen = calloc(n, 1);
    assert_non_null(seen);
    *errors = 0;
    for (size_t i = 0; i < n; i++) {
        kvs_frame_header_t h;
        Kvs__V1__Response *r = NULL;
        int rc = td_read_response(fd, timeout_ms, &h, &r);
        if (rc)
            fprintf(stderr, "answer %zu of %zu: rc %d\n", i, n, rc);
        assert_int_equal(rc, 0);
        assert_true(h.request_id >= lo && h.request_id < lo + n);
        assert_int_equal(seen[h.request_id - lo], 0);
        seen[h.request_id - lo] = 1;
        if (r->status)
            (*errors)++;
        kvs__v1__response__free_unpacked(r, NULL);
    }
    free(seen);
}

/* ------------------------------------------------- 1. pipelined mutations */

/* 1,000 single-token appends pipelined on one connection right behind the
 * create: token i has key (i + 1, 0, ...), so an exact search with query
 * (1, 0, ...) returns every position with score position + 1 exactly when
 * each append landed at its own position. */
static void test_adversarial_pipelined_appends_in_order(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL);
    enum { N = 1000 };
    const uint64_t seq = 77;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);

    aw_buf_t b = {0};
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    aw_create(&r, &cr, &g, seq, 1, 1, HD);
    assert_int_equal(aw_buf_request(&b, 1000000, &r), 0);
    for (int i = 0; i < N; i++) {
        float k[HD] = {0}, v[HD] = {0};
        k[0] = (float)(i + 1);
        v[0] = (float)(i + 1);
        Kvs__V1__AppendRequest a;
        aw_append(&r, &a, seq, 1, k, v, sizeof(k));
        assert_int_equal(aw_buf_request(&b, (uint64_t)i, &r), 0);
    }
    /* All frames in one write: every one is read before the first append
     * finishes, the worst case for ordering. */
    assert_int_equal(td_send_all(fd, b.p, b.len), 0);
    aw_buf_free(&b);
    size_t errors = 0;
    kvs_frame_header_t h;
    Kvs__V1__Response *resp = NULL;
    /* The create's answer is among the first N + 1; read them all. */
    size_t create_seen = 0;
    for (int i = 0; i < N + 1; i++) {
        assert_int_equal(td_read_response(fd, 30000, &h, &resp), 0);
        if (h.request_id == 1000000)
            create_seen++;
        if (resp->status)
            errors++;
        kvs__v1__response__free_unpacked(resp, NULL);
    }
    assert_int_equal(create_seen, 1);
    assert_int_equal(errors, 0);

    float q[HD] = {0};
    q[0] = 1.0f;
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    aw_search(&r, &s, &p, seq, N, q, sizeof(q));
    assert_int_equal(td_send_request(fd, 5, KVS_PROTOCOL_VERSION, &r), 0);
    assert_int_equal(td_read_response(fd, 30000, &h, &resp), 0);
    assert_int_equal(resp->status, 0);
    assert_int_equal(resp->result_case, KVS__V1__RESPONSE__RESULT_SEARCH);
    assert_int_equal(resp->search->k, N);
    int64_t pos[N];
    float sc[N];
    assert_int_equal(resp->search->positions.len, sizeof(pos));
    memcpy(pos, resp->search->positions.data, sizeof(pos));
    memcpy(sc, resp->search->scores.data, sizeof(sc));
    kvs__v1__response__free_unpacked(resp, NULL);
    int wrong = 0;
    uint8_t seen[N] = {0};
    for (int i = 0; i < N; i++) {
        assert_true(pos[i] >= 0 && pos[i] < N);
        seen[pos[i]] = 1;
        if (sc[i] != (float)(pos[i] + 1))
            wrong++;
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    if (wrong)
        fprintf(stderr, "%d of %d tokens at the wrong position\n", wrong, N);
    assert_int_equal(wrong, 0);
    close(fd);
    stop(&d);
}

/* Check a search answer of layer `k` tokens: positions 0..k-1, each with
 * score position + 1 (token i has key (i + 1, 0, ...)). */
static void check_positions(const Kvs__V1__Response *resp, uint32_t k) {
    assert_int_equal(resp->status, 0);
    assert_int_equal(resp->search->k, k);
    assert_int_equal(resp->search->positions.len, k * sizeof(int64_t));
    int wrong = 0;
    for (uint32_t i = 0; i < k; i++) {
        int64_t pos;
        float sc;
        memcpy(&pos, resp->search->positions.data + i * sizeof(pos),
               sizeof(pos));
        memcpy(&sc, resp->search->scores.data + i * sizeof(sc), sizeof(sc));
        assert_true(pos >= 0 && pos < (int64_t)k);
        if (sc != (float)(pos + 1))
            wrong++;
    }
    assert_int_equal(wrong, 0);
}

/* Appends to two layers interleaved, with searches of layer 0 and an info
 * pipelined in the middle: the reads see exactly the appends sent before
 * them (layers may run side by side, each in order). */
static void test_adversarial_pipelined_layers_read_own_writes(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL);
    enum { N = 300, MID = 150 };
    const uint64_t seq = 78;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    aw_buf_t b = {0};
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    aw_create(&r, &cr, &g, seq, 1, 1, HD);
    g.n_layers = 2;
    assert_int_equal(aw_buf_request(&b, 1, &r), 0);
    float q[HD] = {1.0f};
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    uint64_t id = 10;
    for (int i = 0; i < N; i++) {
        for (uint32_t layer = 0; layer < 2; layer++) {
            float k[HD] = {0}, v[HD] = {0};
            k[0] = v[0] = (float)(i + 1);
            Kvs__V1__AppendRequest a;
            aw_append(&r, &a, seq, 1, k, v, sizeof(k));
            a.layer = layer;
            assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        }
        if (i + 1 == MID) {
            aw_search(&r, &s, &p, seq, MID, q, sizeof(q));
            assert_int_equal(aw_buf_request(&b, 2, &r), 0);
            kvs__v1__request__init(&r);
            in.seq = seq;
            r.op_case = KVS__V1__REQUEST__OP_INFO;
            r.info = &in;
            assert_int_equal(aw_buf_request(&b, 3, &r), 0);
        }
    }
    aw_search(&r, &s, &p, seq, N, q, sizeof(q));
    s.layer = 1;
    assert_int_equal(aw_buf_request(&b, 4, &r), 0);
    assert_int_equal(td_send_all(fd, b.p, b.len), 0);
    aw_buf_free(&b);
    size_t total = 1 + 2 * N + 3, errors = 0, checked = 0;
    for (size_t i = 0; i < total; i++) {
        kvs_frame_header_t h;
        Kvs__V1__Response *resp = NULL;
        assert_int_equal(td_read_response(fd, 30000, &h, &resp), 0);
        if (resp->status) {
            fprintf(stderr, "request %llu: status %d %s\n",
                    (unsigned long long)h.request_id, resp->status,
                    resp->message ? resp->message : "");
            errors++;
        } else if (h.request_id == 2) {
            check_positions(resp, MID);
            checked++;
        } else if (h.request_id == 3) {
            assert_int_equal(resp->info->tokens_max, MID);
            assert_int_equal(resp->info->tokens_min, MID);
            checked++;
        } else if (h.request_id == 4) {
            check_positions(resp, N);
            checked++;
        }
        kvs__v1__response__free_unpacked(resp, NULL);
    }
    assert_int_equal(errors, 0);
    assert_int_equal(checked, 3);
    close(fd);
    stop(&d);
}

/* A client pipelines 500 appends (and searches) and goes away without
 * reading: what the daemon had read is applied, in order (a prefix of the
 * tokens, each at its own position), and nothing leaks (ASan at exit). */
static void test_adversarial_disconnect_mid_pipeline(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL);
    enum { N = 500 };
    const uint64_t seq = 79;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    aw_create(&r, &cr, &g, seq, 1, 1, HD);
    assert_int_equal(td_call(fd, 1, &r, 10000), 0);
    aw_buf_t b = {0};
    float q[HD] = {1.0f};
    for (int i = 0; i < N; i++) {
        float k[HD] = {0}, v[HD] = {0};
        k[0] = v[0] = (float)(i + 1);
        Kvs__V1__AppendRequest a;
        aw_append(&r, &a, seq, 1, k, v, sizeof(k));
        assert_int_equal(aw_buf_request(&b, 10 + (uint64_t)i, &r), 0);
        if (i % 50 == 49) {
            Kvs__V1__SearchRequest s;
            Kvs__V1__QueryParams p;
            aw_search(&r, &s, &p, seq, (uint32_t)i + 1, q, sizeof(q));
            assert_int_equal(aw_buf_request(&b, 5000 + (uint64_t)i, &r), 0);
        }
    }
    assert_int_equal(td_send_all(fd, b.p, b.len), 0);
    aw_buf_free(&b);
    close(fd);
    td_sleep_ms(300);

    fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    in.seq = seq;
    kvs__v1__request__init(&r);
    r.op_case = KVS__V1__REQUEST__OP_INFO;
    r.info = &in;
    /* Wait until the appends already read have all run. */
    uint64_t tokens = 0, last = UINT64_MAX;
    for (int tries = 0; tries < 100 && tokens != last; tries++) {
        last = tokens;
        td_sleep_ms(100);
        assert_int_equal(td_send_request(fd, 2, 1, &r), 0);
        kvs_frame_header_t h;
        Kvs__V1__Response *resp = NULL;
        assert_int_equal(td_read_response(fd, 10000, &h, &resp), 0);
        assert_int_equal(resp->status, 0);
        tokens = resp->info->tokens_max;
        kvs__v1__response__free_unpacked(resp, NULL);
    }
    assert_true(tokens >= 1 && tokens <= N);
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    aw_search(&r, &s, &p, seq, (uint32_t)tokens, q, sizeof(q));
    assert_int_equal(td_send_request(fd, 3, 1, &r), 0);
    kvs_frame_header_t h;
    Kvs__V1__Response *resp = NULL;
    assert_int_equal(td_read_response(fd, 10000, &h, &resp), 0);
    check_positions(resp, (uint32_t)tokens);
    kvs__v1__response__free_unpacked(resp, NULL);
    close(fd);
    stop(&d);
}

/* create, appends, fork, drop, re-create of the same ids in one write:
 * each takes effect in the order sent, and infos pipelined behind them see
 * exactly the mutations sent before them. */
static void test_adversarial_pipelined_lifecycle_in_order(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL);
    const uint64_t a = 5, bseq = 6;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    aw_buf_t b = {0};
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    Kvs__V1__AppendRequest ap;
    Kvs__V1__ForkRequest fk = KVS__V1__FORK_REQUEST__INIT;
    Kvs__V1__DropRequest dr = KVS__V1__DROP_REQUEST__INIT;
    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    float k[HD] = {1.0f}, v[HD] = {1.0f};
    uint64_t id = 1;
    for (int round = 0; round < 20; round++) {
        aw_create(&r, &cr, &g, a, 1, 1, HD);
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        for (int i = 0; i < 10; i++) {
            aw_append(&r, &ap, a, 1, k, v, sizeof(k));
            assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        }
        kvs__v1__request__init(&r);
        fk.src = a;
        fk.dst = bseq;
        fk.whole = true;
        r.op_case = KVS__V1__REQUEST__OP_FORK;
        r.fork = &fk;
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        kvs__v1__request__init(&r);
        dr.seq = a;
        r.op_case = KVS__V1__REQUEST__OP_DROP;
        r.drop = &dr;
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        aw_create(&r, &cr, &g, a, 1, 1, HD);
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        aw_append(&r, &ap, a, 1, k, v, sizeof(k));
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        /* ids 1000000 + 2 * round: info of the child, + 1: of a */
        kvs__v1__request__init(&r);
        in.seq = bseq;
        r.op_case = KVS__V1__REQUEST__OP_INFO;
        r.info = &in;
        assert_int_equal(aw_buf_request(&b, 1000000 + 2 * (uint64_t)round, &r),
                         0);
        Kvs__V1__InfoRequest in2 = KVS__V1__INFO_REQUEST__INIT;
        in2.seq = a;
        r.info = &in2;
        assert_int_equal(aw_buf_request(&b, 1000001 + 2 * (uint64_t)round, &r),
                         0);
        /* Clean up for the next round, still pipelined. */
        Kvs__V1__DropRequest d1 = KVS__V1__DROP_REQUEST__INIT,
                             d2 = KVS__V1__DROP_REQUEST__INIT;
        d1.seq = a;
        d2.seq = bseq;
        kvs__v1__request__init(&r);
        r.op_case = KVS__V1__REQUEST__OP_DROP;
        r.drop = &d1;
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
        r.drop = &d2;
        assert_int_equal(aw_buf_request(&b, id++, &r), 0);
    }
    size_t total = (id - 1) + 40;
    assert_int_equal(td_send_all(fd, b.p, b.len), 0);
    aw_buf_free(&b);
    size_t errors = 0, infos = 0;
    for (size_t i = 0; i < total; i++) {
        kvs_frame_header_t h;
        Kvs__V1__Response *resp = NULL;
        assert_int_equal(td_read_response(fd, 30000, &h, &resp), 0);
        if (resp->status) {
            fprintf(stderr, "request %llu: status %d %s\n",
                    (unsigned long long)h.request_id, resp->status,
                    resp->message ? resp->message : "");
            errors++;
        }
        if (h.request_id >= 1000000) {
            assert_int_equal(resp->result_case, KVS__V1__RESPONSE__RESULT_INFO);
            uint64_t want = (h.request_id - 1000000) % 2 ? 1 : 10;
            assert_int_equal(resp->info->tokens_max, want);
            infos++;
        }
        kvs__v1__response__free_unpacked(resp, NULL);
    }
    assert_int_equal(errors, 0);
    assert_int_equal(infos, 40);
    close(fd);
    stop(&d);
}

/* ------------------------------------------- 2. a client that never reads */

#ifdef KVS_SANITIZER_RUN
/* ASan's quarantine keeps freed memory resident: only a loose bound. */
#define RSS_SLACK_KB (512L << 10)
#else
#define RSS_SLACK_KB 0L
#endif

/* Put n_tokens random fp32 tokens into layer 0 of seq over fd. */
static void fill_seq(int fd, uint64_t seq, uint32_t heads, uint32_t n_tokens,
                     uint32_t per_append) {
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    aw_create(&r, &cr, &g, seq, heads, heads, HD);
    assert_int_equal(td_call(fd, 2, &r, 20000), 0);
    size_t n = (size_t)per_append * heads * HD;
    float *k = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    assert_non_null(k);
    assert_non_null(v);
    uint64_t x = seq * 2654435761u + 1;
    for (uint32_t done = 0; done < n_tokens; done += per_append) {
        for (size_t i = 0; i < n; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            k[i] = (float)((x >> 40) % 2001) / 1000.0f - 1.0f;
            v[i] = k[i] * 0.5f;
        }
        Kvs__V1__AppendRequest a;
        aw_append(&r, &a, seq, per_append, k, v, n * sizeof(float));
        assert_int_equal(td_call(fd, 3, &r, 60000), 0);
    }
    free(k);
    free(v);
}

/* Pipelines N searches with 48 KiB answers (about 240 MiB in all) and reads
 * nothing until the daemon stops reading; the daemon's RSS must stay near
 * max_output_bytes (4 MiB by default) instead of holding every answer.
 * Then it reads, and every answer arrives. */
static void test_adversarial_never_reads_bounded(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL);
    enum { N = 5000, HEADS = 8, TOKENS = 512 };
    const uint64_t seq = 9;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    fill_seq(fd, seq, HEADS, TOKENS, TOKENS);
    aw_buf_t b = {0};
    float q[HEADS * HD];
    for (int i = 0; i < HEADS * HD; i++)
        q[i] = (float)(i % 7) - 3.0f;
    Kvs__V1__Request r;
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    aw_search(&r, &s, &p, seq, TOKENS, q, sizeof(q));
    for (int i = 0; i < N; i++)
        assert_int_equal(aw_buf_request(&b, 100 + (uint64_t)i, &r), 0);
    long base = td_rss_kb(d.pid), peak = base;
    td_nonblock(fd);
    size_t off = 0;
    double last_progress = td_now_ms();
    /* Send until everything is out or the daemon has stopped reading for
     * 1.5 s (backpressure), sampling the daemon's RSS. */
    while (off < b.len && td_now_ms() - last_progress < 1500) {
        ssize_t w = send(fd, b.p + off, b.len - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
            last_progress = td_now_ms();
        } else {
            assert_true(w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
            td_sleep_ms(20);
        }
        long rss = td_rss_kb(d.pid);
        if (rss > peak)
            peak = rss;
    }
    for (int i = 0; i < 10; i++) { /* let answers pile up, if they would */
        td_sleep_ms(100);
        long rss = td_rss_kb(d.pid);
        if (rss > peak)
            peak = rss;
    }
    report_rss("never_reads", base, peak);
    fprintf(stderr, "sent %zu of %zu request bytes before backpressure\n", off,
            b.len);
    assert_true(peak - base < 40L * 1024 + RSS_SLACK_KB);

    /* Now read: every answer arrives, the rest of the pipeline flows. */
    size_t answers = 0, errors = 0;
    double t0 = td_now_ms();
    uint8_t hdr[KVS_FRAME_HEADER_SIZE];
    aw_buf_t in = {0};
    while (answers < N && td_now_ms() - t0 < 60000) {
        struct pollfd pfd = {.fd = fd,
                             .events = POLLIN | (off < b.len ? POLLOUT : 0)};
        if (poll(&pfd, 1, 1000) <= 0)
            continue;
        if ((pfd.revents & POLLOUT) && off < b.len) {
            ssize_t w = send(fd, b.p + off, b.len - off, MSG_NOSIGNAL);
            if (w > 0)
                off += (size_t)w;
        }
        if (pfd.revents & POLLIN) {
            uint8_t chunk[1 << 16];
            ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
            assert_true(n > 0);
            assert_int_equal(aw_buf_put(&in, chunk, (size_t)n), 0);
            size_t pos = 0;
            while (in.len - pos >= KVS_FRAME_HEADER_SIZE) {
                kvs_frame_header_t h;
                memcpy(hdr, in.p + pos, sizeof(hdr));
                assert_int_equal(kvs_frame_header_decode(
                                     hdr, sizeof(hdr), KVS_FRAME_MAX_BODY_LIMIT,
                                     &h, NULL, 0),
                                 0);
                if (in.len - pos < KVS_FRAME_HEADER_SIZE + h.body_len)
                    break;
                Kvs__V1__Response *resp = NULL;
                assert_int_equal(kvs_frame_decode_response(
                                     in.p + pos + KVS_FRAME_HEADER_SIZE,
                                     h.body_len, &resp, NULL, 0),
                                 0);
                if (resp->status)
                    errors++;
                kvs__v1__response__free_unpacked(resp, NULL);
                answers++;
                pos += KVS_FRAME_HEADER_SIZE + h.body_len;
            }
            memmove(in.p, in.p + pos, in.len - pos);
            in.len -= pos;
        }
    }
    aw_buf_free(&in);
    aw_buf_free(&b);
    assert_int_equal(answers, N);
    assert_int_equal(errors, 0);
    close(fd);
    stop(&d);
}

/* A client that never reads at all is closed after idle_timeout_ms
 * without write progress, instead of holding max_output_bytes for ever:
 * reading afterwards yields what the kernel had buffered, then EOF, well
 * before all answers. */
static void test_adversarial_never_reads_closed(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--idle-timeout-ms", "1500", NULL};
    start(&d, flags);
    enum { N = 2000, HEADS = 8, TOKENS = 512 };
    const uint64_t seq = 10;
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    fill_seq(fd, seq, HEADS, TOKENS, TOKENS);
    aw_buf_t b = {0};
    float q[HEADS * HD];
    for (int i = 0; i < HEADS * HD; i++)
        q[i] = (float)(i % 7) - 3.0f;
    Kvs__V1__Request r;
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    aw_search(&r, &s, &p, seq, TOKENS, q, sizeof(q));
    for (int i = 0; i < N; i++)
        assert_int_equal(aw_buf_request(&b, 100 + (uint64_t)i, &r), 0);
    td_nonblock(fd);
    size_t off = 0;
    double t0 = td_now_ms();
    while (off < b.len && td_now_ms() - t0 < 3000) {
        ssize_t w = send(fd, b.p + off, b.len - off, MSG_NOSIGNAL);
        if (w > 0)
            off += (size_t)w;
        else
            td_sleep_ms(20);
    }
    aw_buf_free(&b);
    td_sleep_ms(3500); /* > idle_timeout_ms + a sweep */
    size_t got = 0;
    bool eof = false;
    t0 = td_now_ms();
    while (!eof && td_now_ms() - t0 < 15000) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 1000) <= 0)
            continue;
        uint8_t chunk[1 << 16];
        ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
        if (n > 0)
            got += (size_t)n;
        else if (n == 0 || errno == ECONNRESET)
            eof = true;
    }
    fprintf(stderr, "read %zu bytes before EOF (all answers: %zu)\n", got,
            (size_t)N * (HEADS * TOKENS * 12 + 40));
    assert_true(eof);
    assert_true(got < (size_t)N * HEADS * TOKENS * 12 / 2);
    close(fd);
    assert_alive(&d, NULL);
    stop(&d);
}

/* ------------------------------------- 3. memory before authentication */

/* Read one answer; expect `status` and the CLOSE flag, then EOF. */
static void expect_closed_with(int fd, int status, int timeout_ms) {
    kvs_frame_header_t h;
    Kvs__V1__Response *r = NULL;
    assert_int_equal(td_read_response(fd, timeout_ms, &h, &r), 0);
    if (r->status != status)
        fprintf(stderr, "status %d (%s), expected %d\n", r->status,
                r->message ? r->message : "", status);
    assert_int_equal(r->status, status);
    assert_true(h.flags & KVS_FRAME_F_CLOSE);
    kvs__v1__response__free_unpacked(r, NULL);
    assert_true(td_wait_eof(fd, timeout_ms));
}

/* With a token set, 12 connections announce 64 MiB bodies before Hello and
 * trickle bytes: each is refused at its header (Hello-sized frames only),
 * and the daemon's memory does not move. A Hello of 8 KiB is refused too;
 * a connection that never sends Hello is closed after frame_timeout_ms. */
static void test_adversarial_unauthenticated_memory(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--auth-token", "s3cret", "--frame-timeout-ms",
                           "1000", NULL};
    start(&d, flags);
    enum { CONNS = 12 };
    long base = td_rss_kb(d.pid), peak = base;
    int fds[CONNS];
    uint8_t buf[KVS_FRAME_HEADER_SIZE + 4096];
    memset(buf, 0x42, sizeof(buf));
    for (int i = 0; i < CONNS; i++) {
        fds[i] = td_raw_connect(d.port, i % 2);
        assert_true(fds[i] >= 0);
        td_put_header(buf, 7, 64u << 20);
        assert_int_equal(td_send_all(fds[i], buf, sizeof(buf)), 0);
    }
    for (int i = 0; i < CONNS; i++) {
        expect_closed_with(fds[i], KVS_ETOOBIG, 5000);
        close(fds[i]);
        long rss = td_rss_kb(d.pid);
        if (rss > peak)
            peak = rss;
    }
    report_rss("preauth_64MiB_headers", base, peak);
    assert_true(peak - base < 16L * 1024 + RSS_SLACK_KB);

    /* An oversized Hello is refused before auth as well. */
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    char name[8192];
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = 0;
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest h = KVS__V1__HELLO_REQUEST__INIT;
    h.protocol_version = 1;
    h.auth_token = (char *)"s3cret";
    h.client_name = name;
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &h;
    assert_int_equal(td_send_request(fd, 3, 1, &req), 0);
    expect_closed_with(fd, KVS_ETOOBIG, 5000);
    close(fd);

    /* Silent connection: closed once frame_timeout_ms passes without
     * Hello (with an answer saying why). */
    fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    double t0 = td_now_ms();
    expect_closed_with(fd, KVS_EAUTH, 5000);
    assert_true(td_now_ms() - t0 < 4000);
    close(fd);

    /* After Hello, large frames are fine again. */
    fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    assert_int_equal(td_hello(fd, "s3cret"), 0);
    Kvs__V1__PingRequest pr = KVS__V1__PING_REQUEST__INIT;
    static uint8_t payload[1 << 20];
    pr.payload.data = payload;
    pr.payload.len = sizeof(payload);
    kvs__v1__request__init(&req);
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &pr;
    assert_int_equal(td_call(fd, 4, &req, 10000), 0);
    close(fd);
    assert_alive(&d, "s3cret");
    stop(&d);
}

/* One byte every 150 ms of a 26-byte ping: closed by the frame deadline
 * (1 s) long before the frame completes. A connection idle between frames
 * is not (idle_timeout_ms is separate). */
static void test_adversarial_slow_sender(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--frame-timeout-ms", "1000", NULL};
    start(&d, flags);
    int idle = td_raw_connect(d.port, false);
    assert_true(idle >= 0);
    int fd = td_raw_connect(d.port, true);
    assert_true(fd >= 0);
    uint8_t frame[KVS_FRAME_HEADER_SIZE + 2];
    td_put_header(frame, 9, 2);
    frame[KVS_FRAME_HEADER_SIZE] = 0x52; /* Request{ping {}} */
    frame[KVS_FRAME_HEADER_SIZE + 1] = 0;
    long base = td_rss_kb(d.pid);
    double t0 = td_now_ms();
    size_t sent = 0;
    for (; sent < sizeof(frame); sent++) {
        if (td_send_all(fd, frame + sent, 1))
            break;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 150) > 0)
            break; /* the daemon answered: the timeout */
    }
    assert_true(sent < sizeof(frame));
    expect_closed_with(fd, KVS_ETIMEDOUT, 5000);
    double took = td_now_ms() - t0;
    assert_true(took >= 900 && took < 3500);
    close(fd);
    report_rss("slow_sender", base, td_rss_kb(d.pid));
    /* The idle connection (no frame started) still works. */
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest pr = KVS__V1__PING_REQUEST__INIT;
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &pr;
    assert_int_equal(td_call(idle, 10, &req, 5000), 0);
    close(idle);
    stop(&d);
}

/* 16 connections each start a 3 MiB append and stall after ~2.9 MiB:
 * with max_buffered_bytes 4M one is admitted and the others wait unread,
 * so the daemon buffers about 4 MiB, not 46. Small requests of another
 * client keep working meanwhile; once the stalled clients go, a large
 * append goes through. */
static void test_adversarial_buffered_bytes_capped(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--max-buffered-bytes", "4M", "--max-frame-bytes",
                           "16M", NULL};
    start(&d, flags);
    enum { CONNS = 16 };
    const uint32_t body = 3u << 20;
    const size_t part = body - (100u << 10);
    uint8_t *junk = malloc(KVS_FRAME_HEADER_SIZE + part);
    assert_non_null(junk);
    memset(junk, 0x11, KVS_FRAME_HEADER_SIZE + part);
    td_put_header(junk, 5, body);
    long base = td_rss_kb(d.pid), peak = base;
    int fds[CONNS];
    size_t off[CONNS];
    for (int i = 0; i < CONNS; i++) {
        fds[i] = td_raw_connect(d.port, false);
        assert_true(fds[i] >= 0);
        td_nonblock(fds[i]);
        off[i] = 0;
    }
    double t0 = td_now_ms();
    while (td_now_ms() - t0 < 2500) {
        for (int i = 0; i < CONNS; i++) {
            size_t len = KVS_FRAME_HEADER_SIZE + part;
            if (off[i] < len) {
                ssize_t w =
                    send(fds[i], junk + off[i], len - off[i], MSG_NOSIGNAL);
                if (w > 0)
                    off[i] += (size_t)w;
            }
        }
        long rss = td_rss_kb(d.pid);
        if (rss > peak)
            peak = rss;
        td_sleep_ms(20);
    }
    /* Meanwhile a small client is served, pipelining too (its requests
     * count against the exhausted budget: one at a time, but all). */
    int fd = td_raw_connect(d.port, false);
    assert_true(fd >= 0);
    assert_int_equal(td_hello(fd, NULL), 0);
    aw_buf_t pipe = {0};
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest pr = KVS__V1__PING_REQUEST__INIT;
    static uint8_t payload[1000];
    pr.payload.data = payload;
    pr.payload.len = sizeof(payload);
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &pr;
    Kvs__V1__StatsRequest st = KVS__V1__STATS_REQUEST__INIT;
    Kvs__V1__Request sreq = KVS__V1__REQUEST__INIT;
    sreq.op_case = KVS__V1__REQUEST__OP_STATS;
    sreq.stats = &st;
    for (int i = 0; i < 200; i++)
        assert_int_equal(
            aw_buf_request(&pipe, 100 + (uint64_t)i, i % 2 ? &req : &sreq), 0);
    assert_int_equal(td_send_all(fd, pipe.p, pipe.len), 0);
    aw_buf_free(&pipe);
    size_t errors = 0;
    read_answers(fd, 100, 200, 20000, &errors);
    assert_int_equal(errors, 0);
    report_rss("stalled_3MiB_frames_x16", base, peak);
    assert_true(peak - base < 20L * 1024 + RSS_SLACK_KB);
    for (int i = 0; i < CONNS; i++)
        close(fds[i]);
    free(junk);
    /* A large append is admitted once they are gone. */
    fill_seq(fd, 31, 8, 4096, 4096); /* 2 x 4 MiB of keys and values */
    close(fd);
    assert_alive(&d, NULL);
    stop(&d);
}

/* ---------------------------------------------------------- 4. fairness */

/* Client A pipelines heavy exact searches (more than max_inflight); client
 * B's info must not wait for A's whole pipeline, only for about one search
 * per worker. */
static void test_adversarial_fair_share(void **state) {
    (void)state;
    test_daemon_t d;
    start(&d, NULL); /* 2 workers (daemon.c) */
#ifdef KVS_SANITIZER_RUN
    enum { HEADS = 8, TOKENS = 8192, N = 100 }; /* searches are 10-50x slower */
#else
    enum { HEADS = 8, TOKENS = 32768, N = 200 };
#endif
    const uint64_t seq = 12;
    int a = td_raw_connect(d.port, false);
    assert_true(a >= 0);
    fill_seq(a, seq, HEADS, TOKENS, 4096);
    float q[HEADS * HD];
    for (int i = 0; i < HEADS * HD; i++)
        q[i] = (float)(i % 5) - 2.0f;
    Kvs__V1__Request r;
    Kvs__V1__SearchRequest s;
    Kvs__V1__QueryParams p;
    aw_search(&r, &s, &p, seq, 256, q, sizeof(q));
    /* One search alone, for the scale of the bound. */
    double t0 = td_now_ms();
    assert_int_equal(td_call(a, 50, &r, 20000), 0);
    assert_int_equal(td_call(a, 51, &r, 20000), 0);
    double one = (td_now_ms() - t0) / 2;
    aw_buf_t b = {0};
    for (int i = 0; i < N; i++)
        assert_int_equal(aw_buf_request(&b, 1000 + (uint64_t)i, &r), 0);
    assert_int_equal(td_send_all(a, b.p, b.len), 0);
    aw_buf_free(&b);
    td_sleep_ms(50 + (int)one); /* A's pipeline is queued by now */

    int bfd = td_raw_connect(d.port, false);
    assert_true(bfd >= 0);
    Kvs__V1__Request ir = KVS__V1__REQUEST__INIT;
    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    in.seq = seq;
    ir.op_case = KVS__V1__REQUEST__OP_INFO;
    ir.info = &in;
    t0 = td_now_ms();
    assert_int_equal(td_call(bfd, 7, &ir, 60000), 0);
    double waited = td_now_ms() - t0;
    printf("adversarial_fairness search_ms=%.1f info_ms=%.1f "
           "(a FIFO pool would give about %.0f)\n",
           one, waited, one * 64 / 2);
    assert_true(waited < 4 * one + 100);
    close(bfd);
    size_t errors = 0;
    read_answers(a, 1000, N, 120000, &errors);
    assert_int_equal(errors, 0);
    close(a);
    stop(&d);
}

/* --------------------------------------------------------------- 5. auth */

/* Send a Hello whose token is `tok` of `len` bytes (NULs allowed), built by
 * hand: protobuf-c would stop the string at the NUL. */
static void send_rtd_hello(int fd, const char *tok, size_t len) {
    uint8_t body[256], inner[200];
    size_t n = 0;
    assert_true(len < 100);
    inner[n++] = 0x08; /* protocol_version = 1 */
    inner[n++] = 0x01;
    inner[n++] = 0x12; /* auth_token */
    inner[n++] = (uint8_t)len;
    memcpy(inner + n, tok, len);
    n += len;
    size_t m = 0;
    body[m++] = 0x0a; /* Request.hello */
    body[m++] = (uint8_t)n;
    memcpy(body + m, inner, n);
    m += n;
    uint8_t frame[KVS_FRAME_HEADER_SIZE + 256];
    td_put_header(frame, 1, (uint32_t)m);
    memcpy(frame + KVS_FRAME_HEADER_SIZE, body, m);
    assert_int_equal(td_send_all(fd, frame, KVS_FRAME_HEADER_SIZE + m), 0);
}

static void test_adversarial_token_with_nul_refused(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--auth-token", "s3cret", NULL};
    start(&d, flags);
    static const struct {
        const char *tok;
        size_t len;
        int status;
    } cases[] = {
        {"s3cret\0junk", 11, KVS_EAUTH},
        {"s3cret\0", 7, KVS_EAUTH},
        {"s3cre", 5, KVS_EAUTH},
        {"s3cretX", 7, KVS_EAUTH},
        {"", 0, KVS_EAUTH},
        {"s3cret", 6, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int fd = td_raw_connect(d.port, false);
        assert_true(fd >= 0);
        send_rtd_hello(fd, cases[i].tok, cases[i].len);
        kvs_frame_header_t h;
        Kvs__V1__Response *r = NULL;
        assert_int_equal(td_read_response(fd, 5000, &h, &r), 0);
        if (r->status != cases[i].status)
            fprintf(stderr, "case %zu: status %d\n", i, r->status);
        assert_int_equal(r->status, cases[i].status);
        kvs__v1__response__free_unpacked(r, NULL);
        if (cases[i].status)
            assert_true(td_wait_eof(fd, 5000));
        close(fd);
    }
    stop(&d);
}

/* ------------------------------------------------------ 6. broken frames */

static void test_adversarial_malformed_frames(void **state) {
    (void)state;
    test_daemon_t d;
    const char *flags[] = {"--max-frame-bytes", "1M", "--frame-timeout-ms",
                           "1000", NULL};
    start(&d, flags);
    long base = td_rss_kb(d.pid), peak = base;
    uint8_t f[KVS_FRAME_HEADER_SIZE + 64];
    for (int round = 0; round < 3; round++) {
        /* Truncated frame, then the client goes away. */
        int fd = td_raw_connect(d.port, round % 2);
        assert_true(fd >= 0);
        td_put_header(f, 1, 100);
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE + 10), 0);
        shutdown(fd, SHUT_WR);
        assert_true(td_wait_eof(fd, 5000));
        close(fd);
        /* Truncated frame, client stays: the frame deadline closes it. */
        fd = td_raw_connect(d.port, false);
        assert_true(fd >= 0);
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE + 10), 0);
        expect_closed_with(fd, KVS_ETIMEDOUT, 5000);
        close(fd);
        /* Oversized length. */
        fd = td_raw_connect(d.port, false);
        td_put_header(f, 2, 0xFFFFFFF0u);
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE), 0);
        expect_closed_with(fd, KVS_ETOOBIG, 5000);
        close(fd);
        /* Bad magic. */
        fd = td_raw_connect(d.port, false);
        td_put_header(f, 3, 2);
        f[0] = 'X';
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE + 2), 0);
        expect_closed_with(fd, KVS_EPROTO, 5000);
        close(fd);
        /* Bad version. */
        fd = td_raw_connect(d.port, false);
        td_put_header(f, 4, 2);
        f[4] = 9;
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE + 2), 0);
        expect_closed_with(fd, KVS_EPROTO, 5000);
        close(fd);
        /* Garbage protobuf. */
        fd = td_raw_connect(d.port, false);
        td_put_header(f, 5, 40);
        for (int i = 0; i < 40; i++)
            f[KVS_FRAME_HEADER_SIZE + i] = (uint8_t)(0xff - i * 7);
        assert_int_equal(td_send_all(fd, f, KVS_FRAME_HEADER_SIZE + 40), 0);
        expect_closed_with(fd, KVS_EPROTO, 5000);
        close(fd);
        long rss = td_rss_kb(d.pid);
        if (rss > peak)
            peak = rss;
    }
    report_rss("malformed_frames", base, peak);
    assert_alive(&d, NULL);
    stop(&d);

    /* No token on a daemon that wants one. */
    const char *auth[] = {"--auth-token", "s3cret", NULL};
    start(&d, auth);
    int fd = td_raw_connect(d.port, false);
    Kvs__V1__Request r;
    Kvs__V1__CreateSequenceRequest cr;
    Kvs__V1__Geometry g;
    aw_create(&r, &cr, &g, 1, 1, 1, HD);
    assert_int_equal(td_send_request(fd, 6, 1, &r), 0);
    expect_closed_with(fd, KVS_EAUTH, 5000);
    close(fd);
    fd = td_raw_connect(d.port, false);
    assert_int_equal(td_hello(fd, NULL), KVS_EAUTH);
    close(fd);
    assert_alive(&d, "s3cret");
    stop(&d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adversarial_pipelined_appends_in_order),
        cmocka_unit_test(test_adversarial_pipelined_lifecycle_in_order),
        cmocka_unit_test(test_adversarial_pipelined_layers_read_own_writes),
        cmocka_unit_test(test_adversarial_disconnect_mid_pipeline),
        cmocka_unit_test(test_adversarial_never_reads_bounded),
        cmocka_unit_test(test_adversarial_never_reads_closed),
        cmocka_unit_test(test_adversarial_unauthenticated_memory),
        cmocka_unit_test(test_adversarial_slow_sender),
        cmocka_unit_test(test_adversarial_buffered_bytes_capped),
        cmocka_unit_test(test_adversarial_fair_share),
        cmocka_unit_test(test_adversarial_token_with_nul_refused),
        cmocka_unit_test(test_adversarial_malformed_frames),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
