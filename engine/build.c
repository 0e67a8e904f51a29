/*
 * build.c: background index builds.
 *
 * When a head's tail holds a whole segment a build job is queued; builder
 * threads copy the segment's rows out under the layer's read lock, run
 * k-means with no lock held (on the GPU where the store has one), and
 * publish the segment under the write lock. One build per head is in
 * flight at a time, so segments stay in position order.
 */
#include "engine_int.h"

#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* Background builds                                                      */

static void enqueue_build(kvs_store_t *s, seq_t *q, uint32_t layer,
                          uint32_t head) {
    build_job_t *j = malloc(sizeof *j);
    if (!j)
        return; /* retried at the next append to this head */
    q->layers[layer].heads[head].build_inflight = 1;
    atomic_fetch_add(&q->refs, 1);
    atomic_fetch_add(&q->builds_pending, 1);
    j->seq = q;
    j->layer = layer;
    j->head = head;
    j->next = NULL;
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    if (s->q_tail)
        s->q_tail->next = j;
    else
        s->q_head = j;
    s->q_tail = j;
    s->builds_pending++;
    pthread_cond_signal(&s->build_cv);
    kvs__unlock(&s->build_mu);
}

void kvs__maybe_build(kvs_store_t *s, seq_t *q, uint32_t layer, uint32_t head) {
    assert(kvs__held_write(&q->layers[layer].lock));
    head_t *h = &q->layers[layer].heads[head];
    if (!h->build_inflight && h->tail_len >= s->opts.segment_tokens &&
        !s->stopping)
        enqueue_build(s, q, layer, head);
}

/* After a burst of appends the tail buffer may be far larger than what is
 * left in it once segments are published: give the memory back (under the
 * layer's write lock, as run_build publishes). */
static void head_shrink(head_t *h, size_t rb, uint32_t segment_tokens,
                        uint64_t appending) {
    uint64_t keep = 2 * (uint64_t)segment_tokens;
    if (keep < h->tail_len + appending)
        keep = h->tail_len + appending;
    /* Hysteresis against kvs__head_reserve, which grows to twice what is
     * needed: shrinking to less would have the next appends grow it again
     * into fresh pages. */
    keep *= 2;
    if (h->tail_cap <= 2 * keep)
        return;
    memmove(h->tail_keys, h->tail_keys + h->tail_start * rb, h->tail_len * rb);
    memmove(h->tail_values, h->tail_values + h->tail_start * rb,
            h->tail_len * rb);
    h->tail_start = 0;
    char *k = realloc(h->tail_keys, keep * rb);
    if (k)
        h->tail_keys = k;
    char *v = realloc(h->tail_values, keep * rb);
    if (v)
        h->tail_values = v;
    /* A failed shrink leaves a buffer larger than `keep`: still valid. */
    h->tail_cap = keep;
}

static void build_finish(kvs_store_t *s, seq_t *q, double secs, uint64_t keys) {
    atomic_fetch_sub(&q->builds_pending, 1);
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    s->builds_pending--;
    s->builds_finished++;
    if (keys) {
        s->builds_done++;
        s->build_keys += keys;
        s->build_seconds += secs;
    }
    pthread_cond_broadcast(&s->build_done);
    kvs__unlock(&s->build_mu);
    kvs__seq_unref(q);
}

static void run_build(kvs_store_t *s, build_job_t *j) {
    seq_t *q = j->seq;
    layer_t *L = &q->layers[j->layer];
    head_t *h = &L->heads[j->head];
    uint32_t n = s->opts.segment_tokens;
    size_t bytes = (size_t)n * q->row_bytes;
    char *keys = malloc(bytes), *vals = malloc(bytes);
    double t0 = kvs__now_s();
    kvs_segment_t *seg = NULL;
    uint64_t first = 0;
    int rc = KVS_ENOMEM;

    if (keys && vals && !atomic_load(&q->dropped)) {
        kvs__rdlock(&L->lock, j->layer);
        first = h->indexed_tokens;
        memcpy(keys, h->tail_keys + h->tail_start * q->row_bytes, bytes);
        memcpy(vals, h->tail_values + h->tail_start * q->row_bytes, bytes);
        kvs__rwunlock(&L->lock);
        kvs_build_params_t bp = {
            .cluster_tokens = s->opts.cluster_tokens,
            .kmeans_iters = s->opts.kmeans_iters,
            .sink_tokens = s->opts.sink_tokens,
            .window_tokens = s->opts.window_tokens,
            .seed = 1234 + first,
        };
        char err[160] = "";
        rc = KVS_ENOTSUP;
        if (s->gpu && s->opts.cuda_build) {
            /* k-means on the GPU, the rest of the build here */
            uint32_t *label = malloc(sizeof *label * n), k = 0;
            rc = label ? kvs__gpu_cluster(s->gpu, q->geo.dtype, q->geo.head_dim,
                                          n, keys, &bp, label, &k)
                       : KVS_ENOMEM;
            if (rc == 0)
                rc = kvs_segment_from_labels(&bp, q->geo.dtype, q->geo.head_dim,
                                             first, n, keys, vals, k, label,
                                             &seg, err, sizeof err);
            free(label);
            if (rc && rc != KVS_ENOTSUP && rc != KVS_ENOTFINITE)
                kvs__store_log(
                    s, KVS_LOG_WARN,
                    "GPU clustering failed for sequence %llu layer %u "
                    "head %u: %s; building on the CPU",
                    (unsigned long long)q->id, j->layer, j->head,
                    kvs_strerror(rc));
        }
        if (rc)
            rc = kvs_segment_build(&bp, q->geo.dtype, q->geo.head_dim, first, n,
                                   keys, vals, &seg, err, sizeof err);
        if (rc)
            kvs__store_log(
                s, KVS_LOG_ERROR,
                "segment build failed for sequence %llu layer %u head "
                "%u: %s (%s)",
                (unsigned long long)q->id, j->layer, j->head, kvs_strerror(rc),
                err);
    }
    free(keys);
    free(vals);
    if (seg && s->db) {
        /* Under append_mu: a drop takes it before deleting the sequence's
         * records, so the segment cannot land under a dropped id (or a new
         * sequence that reuses it). A failed write leaves the rows stored:
         * the segment still serves from memory, rebuilt after a restart. */
        kvs__lock(&L->append_mu, KVS__RANK_APPEND, j->layer);
        char err[256];
        if (!atomic_load(&q->dropped) &&
            kvs__db_put_segment(s->db, q->id, j->layer, j->head, seg, err,
                                sizeof err))
            kvs__store_log(s, KVS_LOG_ERROR, "%s", err);
        kvs__unlock(&L->append_mu);
    }

    kvs__wrlock(&L->lock, j->layer);
    if (seg && h->n_segments == h->segments_cap) {
        uint32_t cap = h->segments_cap ? h->segments_cap * 2 : 8;
        kvs_segment_t **p = realloc(h->segments, cap * sizeof *p);
        if (p) {
            h->segments = p;
            h->segments_cap = cap;
        } else {
            kvs_segment_free(seg);
            seg = NULL;
        }
    }
    uint64_t keys_done = 0;
    if (seg) {
        h->segments[h->n_segments++] = seg;
        h->indexed_tokens += n;
        h->tail_start += n;
        h->tail_len -= n;
        keys_done = n;
        head_shrink(h, q->row_bytes, s->opts.segment_tokens, L->appending);
        kvs__bytes_add(s, q, (int64_t)kvs_segment_index_bytes(seg));
    }
    h->build_inflight = 0;
    /* A failed build is not retried in a loop: the tail stays exact and the
     * next append tries again. */
    if (seg)
        kvs__maybe_build(s, q, j->layer, j->head);
    kvs__rwunlock(&L->lock);
    build_finish(s, q, kvs__now_s() - t0, keys_done);
}

void *kvs__builder(void *arg) {
    kvs_store_t *s = arg;
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    for (;;) {
        while (!s->stopping && !s->q_head)
            pthread_cond_wait(&s->build_cv, &s->build_mu);
        if (s->stopping)
            break;
        build_job_t *j = s->q_head;
        s->q_head = j->next;
        if (!s->q_head)
            s->q_tail = NULL;
        kvs__unlock(&s->build_mu);
        run_build(s, j);
        free(j);
        kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    }
    kvs__unlock(&s->build_mu);
    return NULL;
}
