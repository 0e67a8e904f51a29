/*
 * wire.h: request builders for the adversarial tests: whole pipelines of
 * encoded frames in one buffer, so that a test can send what a
 * well-behaved client never would (unread answers, pipelines far past what
 * libkvsclient allows). Sockets, single calls, raw headers, timing and the
 * daemon's memory come from tests/server/daemon.h.
 */
#ifndef KVS_TEST_WIRE_H
#define KVS_TEST_WIRE_H

#include "daemon.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A growable byte buffer of encoded frames (to send many at once). */
typedef struct aw_buf_s {
    uint8_t *p;
    size_t len, cap;
} aw_buf_t;

void aw_buf_free(aw_buf_t *b);
/* Append raw bytes / one encoded request frame. Return 0 or -1 (ENOMEM). */
int aw_buf_put(aw_buf_t *b, const void *data, size_t len);
int aw_buf_request(aw_buf_t *b, uint64_t id, const Kvs__V1__Request *req);

/* Requests (fp32, one layer). Keys and values of an append: n_tokens x
 * n_kv_heads x head_dim floats each. */
void aw_create(Kvs__V1__Request *r, Kvs__V1__CreateSequenceRequest *c,
               Kvs__V1__Geometry *g, uint64_t seq, uint32_t q_heads,
               uint32_t kv_heads, uint32_t head_dim);
void aw_append(Kvs__V1__Request *r, Kvs__V1__AppendRequest *a, uint64_t seq,
               uint32_t n_tokens, const float *k, const float *v, size_t bytes);
/* Exact search of layer 0; q is q_heads x head_dim floats. */
void aw_search(Kvs__V1__Request *r, Kvs__V1__SearchRequest *s,
               Kvs__V1__QueryParams *p, uint64_t seq, uint32_t k,
               const float *q, size_t bytes);

#endif
