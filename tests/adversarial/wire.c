/*
 * wire.c: see wire.h. Loopback only; every wait is bounded.
 */
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

int aw_call(int fd, uint64_t id, const Kvs__V1__Request *req, int timeout_ms) {
    if (td_send_request(fd, id, KVS_PROTOCOL_VERSION, req))
        return -100001;
    kvs_frame_header_t h;
    Kvs__V1__Response *r = NULL;
    if (td_read_response(fd, timeout_ms, &h, &r))
        return -100002;
    int st = r->status;
    if (h.request_id != id)
        st = -100003;
    kvs__v1__response__free_unpacked(r, NULL);
    return st;
}

int aw_hello(int fd, const char *token) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest h = KVS__V1__HELLO_REQUEST__INIT;
    h.protocol_version = KVS_PROTOCOL_VERSION;
    h.auth_token = (char *)(token ? token : "");
    h.client_name = (char *)"adversarial";
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &h;
    return aw_call(fd, 1, &req, 10000);
}

long aw_rss_kb(int pid) {
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmRSS:", 6)) {
            kb = atol(line + 6);
            break;
        }
    fclose(f);
    return kb;
}

double aw_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void aw_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void aw_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}
