/*
 * test_frame.c: unit tests of the frame codec (proto/kvs_frame.h) and of
 * kvstored's configuration layers (server/kvs_server.h): header round trip
 * and every header error, the incremental reader fed byte by byte and in
 * one go, request checks against limits, and defaults < file < env < flags.
 */
#include "kvs_frame.h"
#include "kvs_server.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

static uint8_t *ping_frame(uint64_t id, size_t payload, size_t *len) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest p = KVS__V1__PING_REQUEST__INIT;
    static uint8_t blob[4096];
    p.payload.data = blob;
    p.payload.len = payload;
    req.op_case = KVS__V1__REQUEST__OP_PING;
    req.ping = &p;
    uint8_t *buf;
    assert_int_equal(kvs_frame_encode(id, 0, &req.base, 1 << 20, &buf, len), 0);
    return buf;
}

static void test_frame_header_roundtrip(void **state) {
    (void)state;
    kvs_frame_header_t h = {.magic = KVS_FRAME_MAGIC,
                            .version = KVS_PROTOCOL_VERSION,
                            .flags = KVS_FRAME_F_RESPONSE,
                            .request_id = 0x0102030405060708ull,
                            .body_len = 1234};
    uint8_t b[KVS_FRAME_HEADER_SIZE];
    kvs_frame_header_encode(&h, b);
    /* Little-endian on the wire, whatever the host. */
    assert_memory_equal(b, "KVSP", 4);
    assert_int_equal(b[8], 0x08);
    assert_int_equal(b[15], 0x01);
    /* Garbage in o first: every field must come from the decode, and the
     * padding (4 bytes after body_len) differs from h's, as it may in any
     * run; the old memcmp failed here every time. */
    kvs_frame_header_t o;
    memset(&o, 0xa5, sizeof(o));
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 1 << 20, &o, NULL, 0), 0);
    /* Field by field: memcmp would also compare the tail padding, which
     * decode never writes (the test failed at random, about one run in
     * two). */
    assert_int_equal(o.magic, h.magic);
    assert_int_equal(o.version, h.version);
    assert_int_equal(o.flags, h.flags);
    assert_int_equal(o.request_id, h.request_id);
    assert_int_equal(o.body_len, h.body_len);
}

static void test_frame_header_errors(void **state) {
    (void)state;
    kvs_frame_header_t h = {
        .magic = KVS_FRAME_MAGIC, .version = 1, .body_len = 100};
    uint8_t b[KVS_FRAME_HEADER_SIZE];
    kvs_frame_header_t o;
    char err[256];
    kvs_frame_header_encode(&h, b);
    assert_int_equal(kvs_frame_header_decode(b, 10, 1000, &o, err, sizeof(err)),
                     KVS_EINVAL);
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 99, &o, err, sizeof(err)),
        KVS_ETOOBIG);
    assert_non_null(strstr(err, "max_frame_bytes"));
    h.version = 2;
    kvs_frame_header_encode(&h, b);
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 1000, &o, err, sizeof(err)),
        KVS_EPROTO);
    assert_non_null(strstr(err, "version 2"));
    h.version = 1;
    h.flags = 0x10;
    kvs_frame_header_encode(&h, b);
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 1000, &o, err, sizeof(err)),
        KVS_EPROTO);
    h.flags = 0;
    kvs_frame_header_encode(&h, b);
    b[0] = 'X';
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 1000, &o, err, sizeof(err)),
        KVS_EPROTO);
    assert_non_null(strstr(err, "magic"));
    b[0] = 'K';
    b[23] = 1; /* reserved */
    assert_int_equal(
        kvs_frame_header_decode(b, sizeof(b), 1000, &o, err, sizeof(err)),
        KVS_EPROTO);
}

static void drain(kvs_frame_reader_t *r, uint64_t *next_id, int *frames) {
    kvs_frame_header_t h;
    const uint8_t *body;
    int rc;
    while ((rc = kvs_frame_reader_next(r, &h, &body, NULL, 0)) == 1) {
        assert_int_equal(h.request_id, *next_id);
        Kvs__V1__Request *q = NULL;
        assert_int_equal(
            kvs_frame_decode_request(body, h.body_len, NULL, &q, NULL, 0), 0);
        assert_int_equal(q->op_case, KVS__V1__REQUEST__OP_PING);
        kvs__v1__request__free_unpacked(q, NULL);
        (*next_id)++;
        (*frames)++;
    }
    assert_int_equal(rc, 0);
}

static void test_frame_reader_chunks(void **state) {
    (void)state;
    /* Ten frames of growing size, fed 1 byte, 7 bytes, then all at once. */
    uint8_t *all = NULL;
    size_t total = 0;
    for (int i = 0; i < 10; i++) {
        size_t len;
        uint8_t *f = ping_frame((uint64_t)i + 1, (size_t)i * 400, &len);
        all = realloc(all, total + len);
        memcpy(all + total, f, len);
        total += len;
        free(f);
    }
    size_t steps[] = {1, 7, 100000};
    for (size_t s = 0; s < 3; s++) {
        kvs_frame_reader_t r;
        assert_int_equal(kvs_frame_reader_init(&r, 1 << 20), 0);
        uint64_t next = 1;
        int frames = 0;
        for (size_t off = 0; off < total; off += steps[s]) {
            size_t n = total - off < steps[s] ? total - off : steps[s];
            if (s == 0) { /* the zero-copy path */
                void *p;
                size_t room;
                assert_int_equal(kvs_frame_reader_prepare(&r, 64, &p, &room),
                                 0);
                assert_true(room >= n);
                memcpy(p, all + off, n);
                kvs_frame_reader_commit(&r, n);
            } else {
                assert_int_equal(kvs_frame_reader_feed(&r, all + off, n), 0);
            }
            drain(&r, &next, &frames);
        }
        assert_int_equal(frames, 10);
        assert_int_equal(kvs_frame_reader_pending(&r), 0);
        kvs_frame_reader_destroy(&r);
    }
    free(all);
}

static void test_frame_reader_oversized(void **state) {
    (void)state;
    kvs_frame_reader_t r;
    assert_int_equal(kvs_frame_reader_init(&r, 100), 0);
    size_t len;
    uint8_t *f = ping_frame(3, 200, &len);
    assert_int_equal(kvs_frame_reader_feed(&r, f, KVS_FRAME_HEADER_SIZE), 0);
    kvs_frame_header_t h;
    const uint8_t *body;
    /* Refused from the header alone: the body is never buffered. */
    assert_int_equal(kvs_frame_reader_next(&r, &h, &body, NULL, 0),
                     KVS_ETOOBIG);
    assert_int_equal(h.request_id, 3);
    free(f);
    kvs_frame_reader_destroy(&r);
    assert_int_equal(kvs_frame_reader_init(&r, 0), KVS_EINVAL);
}

static void test_frame_request_checks(void **state) {
    (void)state;
    kvs_frame_limits_t lim = {.max_head_dim = 64, .max_tokens_per_append = 16};
    uint8_t blob[1024] = {0};
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__AppendRequest ap = KVS__V1__APPEND_REQUEST__INIT;
    req.op_case = KVS__V1__REQUEST__OP_APPEND;
    req.append = &ap;
    uint8_t buf[2048];
    char err[256];
    Kvs__V1__Request *q;
#define CHECK(expect)                                                          \
    do {                                                                       \
        size_t n = kvs__v1__request__pack(&req, buf);                          \
        assert_int_equal(                                                      \
            kvs_frame_decode_request(buf, n, &lim, &q, err, sizeof(err)),      \
            expect);                                                           \
        if (q)                                                                 \
            kvs__v1__request__free_unpacked(q, NULL);                          \
    } while (0)
    ap.n_tokens = 4;
    ap.keys.data = ap.values.data = blob;
    ap.keys.len = ap.values.len = 256;
    CHECK(0);
    ap.n_tokens = 17;
    CHECK(KVS_ETOOBIG);
    assert_non_null(strstr(err, "max_tokens_per_append"));
    ap.n_tokens = 0;
    CHECK(KVS_EINVAL);
    ap.n_tokens = 3; /* 256 bytes do not split into 3 tokens */
    CHECK(KVS_EINVAL);
    ap.n_tokens = 4;
    ap.values.len = 128;
    CHECK(KVS_EINVAL);

    Kvs__V1__CreateSequenceRequest cr = KVS__V1__CREATE_SEQUENCE_REQUEST__INIT;
    Kvs__V1__Geometry g = KVS__V1__GEOMETRY__INIT;
    req.op_case = KVS__V1__REQUEST__OP_CREATE;
    req.create = &cr;
    CHECK(KVS_EINVAL); /* no geometry */
    cr.geometry = &g;
    g.head_dim = 128;
    CHECK(KVS_ETOOBIG);
    g.head_dim = 64;
    g.dtype = (Kvs__V1__DType)7;
    CHECK(KVS_EINVAL);

    Kvs__V1__SearchRequest se = KVS__V1__SEARCH_REQUEST__INIT;
    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    req.op_case = KVS__V1__REQUEST__OP_SEARCH;
    req.search = &se;
    se.k = 1;
    se.queries.data = blob;
    se.queries.len = 6; /* not whole fp32s */
    CHECK(KVS_EINVAL);
    se.queries.len = 8;
    CHECK(0);
    se.params = &qp;
    qp.retrieval_fraction = 2.0f;
    CHECK(KVS_EINVAL);
    qp.retrieval_fraction = 0.1f;
    se.k = 0;
    CHECK(KVS_ERANGE);

    /* No op at all, and bytes that are not protobuf. */
    Kvs__V1__Request empty = KVS__V1__REQUEST__INIT;
    size_t n = kvs__v1__request__pack(&empty, buf);
    assert_int_equal(
        kvs_frame_decode_request(buf, n, &lim, &q, err, sizeof(err)),
        KVS_EPROTO);
    kvs__v1__request__free_unpacked(q, NULL);
    memset(buf, 0xff, 16);
    assert_int_equal(
        kvs_frame_decode_request(buf, 16, &lim, &q, err, sizeof(err)),
        KVS_EPROTO);
    assert_null(q);
#undef CHECK
}

static void test_frame_response_checks(void **state) {
    (void)state;
    uint8_t blob[256] = {0}, buf[1024];
    Kvs__V1__Response r = KVS__V1__RESPONSE__INIT;
    Kvs__V1__SearchResponse s = KVS__V1__SEARCH_RESPONSE__INIT;
    r.result_case = KVS__V1__RESPONSE__RESULT_SEARCH;
    r.search = &s;
    s.n_q_heads = 2, s.k = 3;
    s.positions.data = s.scores.data = blob;
    s.positions.len = 48;
    s.scores.len = 24;
    Kvs__V1__Response *o;
    size_t n = kvs__v1__response__pack(&r, buf);
    assert_int_equal(kvs_frame_decode_response(buf, n, &o, NULL, 0), 0);
    kvs__v1__response__free_unpacked(o, NULL);
    s.scores.len = 20;
    n = kvs__v1__response__pack(&r, buf);
    assert_int_equal(kvs_frame_decode_response(buf, n, &o, NULL, 0),
                     KVS_EPROTO);
    assert_null(o);
}

/* ------------------------------------------------------------ config */

static void test_config_layers(void **state) {
    (void)state;
    kvs_server_config_t cfg;
    char err[256];
    assert_int_equal(kvs_server_config_init(&cfg), 0);
    assert_int_equal(cfg.port, 7700);
    assert_int_equal(cfg.max_frame_bytes, 64u << 20);
    assert_true(cfg.tcp_nodelay);

    char path[] = "/tmp/kvs-cfg-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "# comment\n\nport 8000\nmax_frame_bytes 2M\n"
                       "data-dir \"/tmp/x y\"\nmax_inflight 9\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);

    char *envp[] = {"KVSTORED_MAX_INFLIGHT=10", "KVSTORED_PORT=8001",
                    "KVSTORED_UNRELATED_THING=1", "HOME=/", NULL};
    assert_int_equal(kvs_server_config_load_file(&cfg, path, err, sizeof(err)),
                     0);
    assert_int_equal(cfg.port, 8000);
    assert_int_equal(cfg.max_frame_bytes, 2u << 20);
    assert_string_equal(cfg.data_dir, "/tmp/x y");
    assert_int_equal(kvs_server_config_load_env(&cfg, envp, err, sizeof(err)),
                     0);
    assert_int_equal(cfg.port, 8001);
    assert_int_equal(cfg.max_inflight, 10);
    assert_int_equal(
        kvs_server_config_set(&cfg, "max-inflight", "11", err, sizeof(err)), 0);
    assert_int_equal(cfg.max_inflight, 11);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    kvs_server_config_destroy(&cfg);

    /* argv: flags beat file; --check-config is reported. */
    assert_int_equal(kvs_server_config_init(&cfg), 0);
    char *argv[] = {
        "kvstored", "--config",       path, "--port=9000", "--tcp-nodelay",
        "no",       "--check-config", NULL};
    int action = 0;
    assert_int_equal(
        kvs_server_config_from_args(&cfg, 7, argv, &action, err, sizeof(err)),
        0);
    assert_int_equal(action, 2);
    assert_int_equal(cfg.port, 9000);
    assert_int_equal(cfg.max_inflight, 9);
    assert_false(cfg.tcp_nodelay);
    kvs_server_config_destroy(&cfg);
    unlink(path);
}

static void test_config_errors(void **state) {
    (void)state;
    kvs_server_config_t cfg;
    char err[256];
    assert_int_equal(kvs_server_config_init(&cfg), 0);
    assert_int_equal(
        kvs_server_config_set(&cfg, "port", "70000", err, sizeof(err)),
        KVS_EINVAL);
    assert_non_null(strstr(err, "port"));
    assert_int_equal(
        kvs_server_config_set(&cfg, "max_frame_bytes", "12Q", err, sizeof(err)),
        KVS_EINVAL);
    assert_int_equal(kvs_server_config_set(&cfg, "nope", "1", err, sizeof(err)),
                     KVS_EINVAL);
    assert_non_null(strstr(err, "unknown option"));
    assert_int_equal(
        kvs_server_config_set(&cfg, "max_head_dim", "-3", err, sizeof(err)),
        KVS_EINVAL);
    assert_int_equal(
        kvs_server_config_set(&cfg, "log_level", "loud", err, sizeof(err)), 0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                     KVS_EINVAL);
    assert_non_null(strstr(err, "log_level"));
    kvs_server_config_destroy(&cfg);

    assert_int_equal(kvs_server_config_init(&cfg), 0);
    char path[] = "/tmp/kvs-cfg-XXXXXX";
    int fd = mkstemp(path);
    const char *text = "port 1\nbogus_key 3\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    assert_int_equal(kvs_server_config_load_file(&cfg, path, err, sizeof(err)),
                     KVS_EINVAL);
    assert_non_null(strstr(err, ":2:"));
    unlink(path);
    kvs_server_config_destroy(&cfg);
}

/* The options of the HTTP port, the Unix socket mode and the log file:
 * defaults, and a socket mode read as octal only. */
static void test_config_hardening_options(void **state) {
    (void)state;
    kvs_server_config_t cfg;
    char err[256];
    assert_int_equal(kvs_server_config_init(&cfg), 0);
    assert_int_equal(cfg.http_max_connections, 64);
    assert_int_equal(cfg.http_timeout_ms, 10000);
    assert_string_equal(cfg.unix_socket_mode, "0660");
    assert_string_equal(cfg.log_file, "");
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    assert_int_equal(kvs_server_config_set(&cfg, "http-max-connections", "0",
                                           err, sizeof(err)),
                     KVS_EINVAL);
    assert_int_equal(
        kvs_server_config_set(&cfg, "http_timeout_ms", "0", err, sizeof(err)),
        0);
    static const char *good[] = {"0660", "660", "0600", "0", "0777"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(kvs_server_config_set(&cfg, "unix_socket_mode",
                                               good[i], err, sizeof(err)),
                         0);
        assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    }
    /* 8 and 9 are not octal digits; 1777 is past 0777; "" and "0x1b6" are
     * not modes. */
    static const char *bad[] = {"660x", "0680", "1777", "", "0x1b6", "00660"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(kvs_server_config_set(&cfg, "unix_socket_mode", bad[i],
                                               err, sizeof(err)),
                         0);
        assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                         KVS_EINVAL);
        assert_non_null(strstr(err, "unix_socket_mode"));
    }
    kvs_server_config_destroy(&cfg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_header_roundtrip),
        cmocka_unit_test(test_frame_header_errors),
        cmocka_unit_test(test_frame_reader_chunks),
        cmocka_unit_test(test_frame_reader_oversized),
        cmocka_unit_test(test_frame_request_checks),
        cmocka_unit_test(test_frame_response_checks),
        cmocka_unit_test(test_config_layers),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_config_hardening_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
