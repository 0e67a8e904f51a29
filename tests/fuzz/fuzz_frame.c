/*
 * fuzz_frame.c: libFuzzer target for everything kvstored and libkvsclient do
 * with bytes from the network: the incremental frame reader (fed in uneven
 * chunks, as a socket would), the header codec, and the Request/Response
 * decoders with their structural checks; the in-place Append decode is
 * checked against protobuf-c's on every body. The same function is replayed
 * over the committed corpus (tests/fuzz/corpus/frame) by replay.c under CTest,
 * so every crash the fuzzer finds becomes a regression test once its input is
 * added to the corpus.
 */
#include "kvs_frame.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The in-place decode must agree with protobuf-c's on every input: same
 * code, same op, the same append fields and bytes. */
static void check_in_place(const uint8_t *body, size_t len,
                           const kvs_frame_limits_t *lim) {
    char err[256];
    Kvs__V1__Request *u = NULL;
    kvs_frame_request_t q;
    int a = kvs_frame_decode_request(body, len, lim, &u, err, sizeof(err));
    int b =
        kvs_frame_decode_request_in_place(body, len, lim, &q, err, sizeof(err));
    if (a != b || (u == NULL) != (q.msg == NULL))
        abort();
    if (u && u->op_case != q.msg->op_case)
        abort();
    if (u && u->op_case == KVS__V1__REQUEST__OP_APPEND) {
        const Kvs__V1__AppendRequest *x = u->append, *y = q.msg->append;
        if (x->seq != y->seq || x->layer != y->layer ||
            x->n_tokens != y->n_tokens || x->keys.len != y->keys.len ||
            x->values.len != y->values.len ||
            (x->keys.len && memcmp(x->keys.data, y->keys.data, x->keys.len)) ||
            (x->values.len &&
             memcmp(x->values.data, y->values.data, x->values.len)))
            abort();
        if (q.borrowed && y->keys.len &&
            (y->keys.data < body || y->keys.data + y->keys.len > body + len))
            abort();
    }
    kvs_frame_request_release(&q);
    if (u)
        kvs__v1__request__free_unpacked(u, NULL);
}

static void decode_body(const kvs_frame_header_t *h, const uint8_t *body) {
    char err[256];
    if (h->flags & KVS_FRAME_F_RESPONSE) {
        Kvs__V1__Response *r = NULL;
        if (kvs_frame_decode_response(body, h->body_len, &r, err,
                                      sizeof(err)) == 0)
            kvs__v1__response__free_unpacked(r, NULL);
        return;
    }
    kvs_frame_limits_t lim = {.max_head_dim = 256,
                              .max_tokens_per_append = 4096};
    check_in_place(body, h->body_len, &lim);
    Kvs__V1__Request *q = NULL;
    kvs_frame_decode_request(body, h->body_len, &lim, &q, err, sizeof(err));
    if (q) {
        /* Touch what the server reads on success paths. */
        (void)kvs_frame_op_name(q->op_case);
        kvs__v1__request__free_unpacked(q, NULL);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* The first byte picks the chunk size used to feed the reader, so that
     * partial headers and bodies split across reads are exercised. */
    size_t chunk = size ? (size_t)(data[0] % 31) + 1 : 1;
    kvs_frame_reader_t rd;
    if (kvs_frame_reader_init(&rd, 1u << 20))
        return 0;
    size_t off = size ? 1 : 0;
    int rc = 0;
    while (off < size && rc >= 0) {
        size_t n = size - off < chunk ? size - off : chunk;
        if (kvs_frame_reader_feed(&rd, data + off, n))
            break;
        off += n;
        kvs_frame_header_t h;
        const uint8_t *body;
        char err[256];
        while ((rc = kvs_frame_reader_next(&rd, &h, &body, err, sizeof(err))) ==
               1)
            decode_body(&h, body);
    }
    kvs_frame_reader_destroy(&rd);

    /* The bare decoders on the whole input, without a header. */
    check_in_place(data, size, NULL);
    char err[256];
    Kvs__V1__Request *q = NULL;
    kvs_frame_decode_request(data, size, NULL, &q, err, sizeof(err));
    if (q)
        kvs__v1__request__free_unpacked(q, NULL);
    Kvs__V1__Response *r = NULL;
    if (kvs_frame_decode_response(data, size, &r, err, sizeof(err)) == 0)
        kvs__v1__response__free_unpacked(r, NULL);
    kvs_frame_header_t h;
    kvs_frame_header_decode(data, size, KVS_FRAME_DEFAULT_MAX_BODY, &h, err,
                            sizeof(err));
    return 0;
}
