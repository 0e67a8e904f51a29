/*
 * seedgen.c: writes the seed inputs of the frame fuzz corpus: one valid
 * frame of every request and response type, pipelined frames, and the
 * classic bad cases (bad magic, wrong version, oversized, truncated).
 * Run once by hand: seedgen DIR. The first byte of each input is the
 * fuzzer's chunk-size selector (see fuzz_frame.c).
 */
#include "kvs_frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put(const char *dir, const char *name, const uint8_t *a,
                size_t alen, const uint8_t *b, size_t blen) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/seed-%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    uint8_t sel = 7;
    fwrite(&sel, 1, 1, f);
    fwrite(a, 1, alen, f);
    if (b)
        fwrite(b, 1, blen, f);
    fclose(f);
}

static void frame(const char *dir, const char *name, uint16_t flags,
                  const ProtobufCMessage *m) {
    uint8_t *buf;
    size_t len;
    if (kvs_frame_encode(42, flags, m, KVS_FRAME_DEFAULT_MAX_BODY, &buf, &len))
        exit(1);
    put(dir, name, buf, len, buf, len); /* two frames back to back */
    free(buf);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    uint8_t blob[512];
    for (size_t i = 0; i < sizeof(blob); i++)
        blob[i] = (uint8_t)(i * 7);

    Kvs__V1__Request q = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest hello = KVS__V1__HELLO_REQUEST__INIT;
    hello.protocol_version = 1;
    hello.auth_token = "secret";
    q.op_case = KVS__V1__REQUEST__OP_HELLO;
    q.hello = &hello;
    frame(dir, "hello", 0, &q.base);

    Kvs__V1__Geometry g = KVS__V1__GEOMETRY__INIT;
    g.n_layers = 2, g.n_q_heads = 4, g.n_kv_heads = 2, g.head_dim = 64;
    g.dtype = KVS__V1__DTYPE__DTYPE_F16;
    Kvs__V1__CreateSequenceRequest cr = KVS__V1__CREATE_SEQUENCE_REQUEST__INIT;
    cr.seq = 7;
    cr.geometry = &g;
    q.op_case = KVS__V1__REQUEST__OP_CREATE;
    q.create = &cr;
    frame(dir, "create", 0, &q.base);

    Kvs__V1__AppendRequest ap = KVS__V1__APPEND_REQUEST__INIT;
    ap.seq = 7, ap.layer = 1, ap.n_tokens = 2;
    ap.keys.data = blob, ap.keys.len = 256;
    ap.values.data = blob, ap.values.len = 256;
    q.op_case = KVS__V1__REQUEST__OP_APPEND;
    q.append = &ap;
    frame(dir, "append", 0, &q.base);

    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    qp.mode = KVS__V1__MODE__MODE_WAVE;
    qp.budget = KVS__V1__BUDGET__BUDGET_BOUNDED;
    qp.epsilon = 0.02f;
    Kvs__V1__SearchRequest se = KVS__V1__SEARCH_REQUEST__INIT;
    se.seq = 7, se.k = 10;
    se.queries.data = blob, se.queries.len = 256;
    se.params = &qp;
    q.op_case = KVS__V1__REQUEST__OP_SEARCH;
    q.search = &se;
    frame(dir, "search", 0, &q.base);

    Kvs__V1__AttendRequest at = KVS__V1__ATTEND_REQUEST__INIT;
    at.seq = 7;
    at.queries.data = blob, at.queries.len = 128;
    at.query_dtype = KVS__V1__DTYPE__DTYPE_BF16;
    q.op_case = KVS__V1__REQUEST__OP_ATTEND;
    q.attend = &at;
    frame(dir, "attend", 0, &q.base);
    /* Every mode has a wire value now (MODE_FULL = 3). */
    Kvs__V1__QueryParams fp = KVS__V1__QUERY_PARAMS__INIT;
    fp.mode = KVS__V1__MODE__MODE_FULL;
    fp.budget = KVS__V1__BUDGET__BUDGET_FIXED;
    at.params = &fp;
    frame(dir, "attend-full", 0, &q.base);
    at.params = NULL;

    Kvs__V1__ForkRequest fk = KVS__V1__FORK_REQUEST__INIT;
    fk.src = 7, fk.dst = 8, fk.at_token = 100;
    q.op_case = KVS__V1__REQUEST__OP_FORK;
    q.fork = &fk;
    frame(dir, "fork", 0, &q.base);

    Kvs__V1__DropRequest dr = KVS__V1__DROP_REQUEST__INIT;
    dr.seq = 7;
    q.op_case = KVS__V1__REQUEST__OP_DROP;
    q.drop = &dr;
    frame(dir, "drop", 0, &q.base);

    Kvs__V1__StatsRequest st = KVS__V1__STATS_REQUEST__INIT;
    q.op_case = KVS__V1__REQUEST__OP_STATS;
    q.stats = &st;
    frame(dir, "stats", 0, &q.base);

    Kvs__V1__ListSequencesRequest ls = KVS__V1__LIST_SEQUENCES_REQUEST__INIT;
    ls.limit = 10;
    q.op_case = KVS__V1__REQUEST__OP_LIST;
    q.list = &ls;
    frame(dir, "list", 0, &q.base);

    Kvs__V1__PingRequest pg = KVS__V1__PING_REQUEST__INIT;
    pg.payload.data = blob, pg.payload.len = 8;
    q.op_case = KVS__V1__REQUEST__OP_PING;
    q.ping = &pg;
    frame(dir, "ping", 0, &q.base);

    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    in.seq = 7;
    q.op_case = KVS__V1__REQUEST__OP_INFO;
    q.info = &in;
    frame(dir, "info", 0, &q.base);

    /* Responses. */
    Kvs__V1__Response r = KVS__V1__RESPONSE__INIT;
    r.request_id = 42;
    Kvs__V1__SearchResponse sr = KVS__V1__SEARCH_RESPONSE__INIT;
    sr.n_q_heads = 2, sr.k = 4;
    sr.positions.data = blob, sr.positions.len = 64;
    sr.scores.data = blob, sr.scores.len = 32;
    r.result_case = KVS__V1__RESPONSE__RESULT_SEARCH;
    r.search = &sr;
    frame(dir, "resp-search", KVS_FRAME_F_RESPONSE, &r.base);

    Kvs__V1__AttendResponse ar = KVS__V1__ATTEND_RESPONSE__INIT;
    Kvs__V1__AttendStats as = KVS__V1__ATTEND_STATS__INIT;
    as.keys_total = 100;
    ar.output.data = blob, ar.output.len = 64;
    ar.stats = &as;
    r.result_case = KVS__V1__RESPONSE__RESULT_ATTEND;
    r.attend = &ar;
    frame(dir, "resp-attend", KVS_FRAME_F_RESPONSE, &r.base);

    Kvs__V1__ListSequencesResponse lr = KVS__V1__LIST_SEQUENCES_RESPONSE__INIT;
    uint64_t ids[3] = {1, 2, 300000};
    lr.ids = ids, lr.n_ids = 3, lr.total = 3;
    r.result_case = KVS__V1__RESPONSE__RESULT_LIST;
    r.list = &lr;
    frame(dir, "resp-list", KVS_FRAME_F_RESPONSE, &r.base);

    Kvs__V1__Response er = KVS__V1__RESPONSE__INIT;
    er.status = KVS_EBUSY;
    er.message = "too many connections";
    frame(dir, "resp-refusal", KVS_FRAME_F_RESPONSE | KVS_FRAME_F_CLOSE,
          &er.base);

    /* Bad frames. */
    uint8_t hdr[KVS_FRAME_HEADER_SIZE];
    kvs_frame_header_t h = {
        .magic = KVS_FRAME_MAGIC, .version = 1, .request_id = 1, .body_len = 4};
    kvs_frame_header_encode(&h, hdr);
    put(dir, "truncated", hdr, sizeof(hdr), blob, 2);
    h.version = 9;
    kvs_frame_header_encode(&h, hdr);
    put(dir, "bad-version", hdr, sizeof(hdr), blob, 4);
    h.version = 1;
    h.body_len = 0xffffffffu;
    kvs_frame_header_encode(&h, hdr);
    put(dir, "oversized", hdr, sizeof(hdr), NULL, 0);
    h.body_len = 4;
    h.magic = 0x20544547; /* "GET " */
    kvs_frame_header_encode(&h, hdr);
    put(dir, "bad-magic", hdr, sizeof(hdr), blob, 4);
    h.magic = KVS_FRAME_MAGIC;
    h.flags = 0x80;
    kvs_frame_header_encode(&h, hdr);
    put(dir, "bad-flags", hdr, sizeof(hdr), blob, 4);
    h.flags = 0;
    kvs_frame_header_encode(&h, hdr);
    put(dir, "garbage-body", hdr, sizeof(hdr), blob + 100, 4);
    return 0;
}
