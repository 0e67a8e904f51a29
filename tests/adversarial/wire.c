/*
 * wire.c: see wire.h.
 */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

void aw_buf_free(aw_buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

int aw_buf_put(aw_buf_t *b, const void *data, size_t len) {
    if (b->cap - b->len < len) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap - b->len < len)
            cap *= 2;
        uint8_t *n = realloc(b->p, cap);
        if (!n)
            return -1;
        b->p = n;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    return 0;
}

int aw_buf_request(aw_buf_t *b, uint64_t id, const Kvs__V1__Request *req) {
    uint8_t *f;
    size_t len;
    if (kvs_frame_encode(id, 0, &req->base, KVS_FRAME_MAX_BODY_LIMIT, &f, &len))
        return -1;
    int rc = aw_buf_put(b, f, len);
    free(f);
    return rc;
}

void aw_create(Kvs__V1__Request *r, Kvs__V1__CreateSequenceRequest *c,
               Kvs__V1__Geometry *g, uint64_t seq, uint32_t q_heads,
               uint32_t kv_heads, uint32_t head_dim) {
    kvs__v1__request__init(r);
    kvs__v1__create_sequence_request__init(c);
    kvs__v1__geometry__init(g);
    g->n_layers = 1;
    g->n_q_heads = q_heads;
    g->n_kv_heads = kv_heads;
    g->head_dim = head_dim;
    g->dtype = KVS__V1__DTYPE__DTYPE_F32;
    c->seq = seq;
    c->geometry = g;
    r->op_case = KVS__V1__REQUEST__OP_CREATE;
    r->create = c;
}

void aw_append(Kvs__V1__Request *r, Kvs__V1__AppendRequest *a, uint64_t seq,
               uint32_t n_tokens, const float *k, const float *v,
               size_t bytes) {
    kvs__v1__request__init(r);
    kvs__v1__append_request__init(a);
    a->seq = seq;
    a->layer = 0;
    a->n_tokens = n_tokens;
    a->keys.data = (uint8_t *)k;
    a->keys.len = bytes;
    a->values.data = (uint8_t *)v;
    a->values.len = bytes;
    r->op_case = KVS__V1__REQUEST__OP_APPEND;
    r->append = a;
}

void aw_search(Kvs__V1__Request *r, Kvs__V1__SearchRequest *s,
               Kvs__V1__QueryParams *p, uint64_t seq, uint32_t k,
               const float *q, size_t bytes) {
    kvs__v1__request__init(r);
    kvs__v1__search_request__init(s);
    kvs__v1__query_params__init(p);
    p->mode = KVS__V1__MODE__MODE_EXACT;
    s->seq = seq;
    s->layer = 0;
    s->k = k;
    s->queries.data = (uint8_t *)q;
    s->queries.len = bytes;
    s->query_dtype = KVS__V1__DTYPE__DTYPE_F32;
    s->params = p;
    r->op_case = KVS__V1__REQUEST__OP_SEARCH;
    r->search = s;
}
