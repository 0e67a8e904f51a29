/*
 * query.c: the per-layer calls: append, search, attend and read.
 *
 * Appends copy into the heads' tails under the layer's write lock, with the
 * storage write in between under the layer's append_mu only. search and
 * attend take the layer's read lock for the whole call and fan the KV
 * heads out over the worker pool; each thread keeps its own scratch.
 */
#include "engine_int.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* Append                                                                 */

int kvs__head_reserve(head_t *h, size_t row_bytes, uint64_t more) {
    if (h->tail_start + h->tail_len + more <= h->tail_cap)
        return 0;
    uint64_t need = h->tail_len + more;
    /* Slide the live rows down (the front was consumed by published
     * segments) only when that leaves half the buffer free: a tail that
     * builds consume at the front while appends fill the back would
     * otherwise be copied whole by nearly every append. */
    if (h->tail_start > 0 && need <= h->tail_cap / 2) {
        memmove(h->tail_keys, h->tail_keys + h->tail_start * row_bytes,
                h->tail_len * row_bytes);
        memmove(h->tail_values, h->tail_values + h->tail_start * row_bytes,
                h->tail_len * row_bytes);
        h->tail_start = 0;
        return 0;
    }
    /* Grow to twice what is needed, so that the copy is amortised. */
    uint64_t cap = h->tail_cap ? h->tail_cap : 256;
    while (cap < 2 * need)
        cap *= 2;
    if (h->tail_start == 0) { /* realloc may move pages, not copy them */
        char *k = realloc(h->tail_keys, cap * row_bytes);
        if (!k)
            return KVS_ENOMEM;
        h->tail_keys = k;
        char *v = realloc(h->tail_values, cap * row_bytes);
        if (!v)
            return KVS_ENOMEM;
        h->tail_values = v;
        h->tail_cap = cap;
        return 0;
    }
    /* Copy the live rows only, not the consumed front. */
    char *k = malloc(cap * row_bytes), *v = malloc(cap * row_bytes);
    if (!k || !v) {
        free(k);
        free(v);
        return KVS_ENOMEM;
    }
    memcpy(k, h->tail_keys + h->tail_start * row_bytes,
           h->tail_len * row_bytes);
    memcpy(v, h->tail_values + h->tail_start * row_bytes,
           h->tail_len * row_bytes);
    free(h->tail_keys);
    free(h->tail_values);
    h->tail_keys = k;
    h->tail_values = v;
    h->tail_start = 0;
    h->tail_cap = cap;
    return 0;
}

int kvs_seq_append(kvs_store_t *s, uint64_t id, uint32_t layer,
                   uint32_t n_tokens, const void *keys, const void *values) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!keys || !values)
        return kvs__fail(s, KVS_EINVAL, "keys or values is NULL");
    if (n_tokens == 0)
        return kvs__fail(s, KVS_EINVAL, "zero tokens");
    int rc = 0;
    seq_t *q = kvs__seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    const kvs_geometry_t *g = &q->geo;
    if (layer >= g->n_layers) {
        rc = kvs__fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)",
                       layer, g->n_layers);
        goto out;
    }
    size_t n_elems = (size_t)n_tokens * g->n_kv_heads * g->head_dim;
    if (!kvs_all_finite(g->dtype, keys, n_elems) ||
        !kvs_all_finite(g->dtype, values, n_elems)) {
        rc = kvs__fail(s, KVS_ENOTFINITE, "NaN or Inf in appended keys/values");
        goto out;
    }
    layer_t *L = &q->layers[layer];
    for (;;) {
        /* The layer appended to, not the whole sequence: paging is per
         * layer (residency.c). */
        if (atomic_load(&q->evicted) && (rc = kvs__page_in_layer(s, q, layer)))
            goto out;
        kvs__lock(&L->append_mu, KVS__RANK_APPEND, layer);
        /* A drop takes every append_mu before deleting the stored
         * sequence: past this check nothing can delete it under us. */
        if (atomic_load(&q->dropped)) {
            kvs__unlock(&L->append_mu);
            rc = kvs__fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                           (unsigned long long)id);
            goto out;
        }
        kvs__wrlock(&L->lock, layer);
        if (L->resident)
            break;
        /* Evicted between the check and the locks: page in again. */
        kvs__rwunlock(&L->lock);
        kvs__unlock(&L->append_mu);
    }
    /* Room first, so nothing can fail between the storage write and the
     * copy into memory. */
    for (uint32_t h = 0; h < g->n_kv_heads; h++)
        if ((rc = kvs__head_reserve(&L->heads[h], q->row_bytes, n_tokens))) {
            kvs__rwunlock(&L->lock);
            kvs__unlock(&L->append_mu);
            rc = kvs__fail(s, rc, "cannot grow the tail of layer %u", layer);
            goto out;
        }
    uint64_t pos0 = L->tokens;
    L->appending = n_tokens;
    kvs__rwunlock(&L->lock);
    if (s->db) {
        char err[256];
        uint64_t ticket = 0;
        rc = kvs__db_append(s->db, id, layer, g, pos0, n_tokens, keys, values,
                            s->opts.segment_tokens, &ticket, err, sizeof err);
        /* Tickets of two layers' appends may be stored out of order. */
        uint_fast64_t was = atomic_load(&q->last_write);
        while (!rc && was < ticket &&
               !atomic_compare_exchange_weak(&q->last_write, &was, ticket))
            ;
        if (rc) {
            kvs__wrlock(&L->lock, layer);
            L->appending = 0;
            kvs__rwunlock(&L->lock);
            kvs__unlock(&L->append_mu);
            rc = kvs__fail(s, rc, "%s", err);
            goto out;
        }
    }
    kvs__wrlock(&L->lock, layer);
    L->appending = 0;
    size_t stride = (size_t)g->n_kv_heads * q->row_bytes;
    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        head_t *hd = &L->heads[h];
        char *dk =
            hd->tail_keys + (hd->tail_start + hd->tail_len) * q->row_bytes;
        char *dv =
            hd->tail_values + (hd->tail_start + hd->tail_len) * q->row_bytes;
        const char *sk = (const char *)keys + h * q->row_bytes;
        const char *sv = (const char *)values + h * q->row_bytes;
        for (uint32_t t = 0; t < n_tokens; t++) {
            memcpy(dk + t * q->row_bytes, sk + t * stride, q->row_bytes);
            memcpy(dv + t * q->row_bytes, sv + t * stride, q->row_bytes);
        }
        hd->tail_len += n_tokens;
        kvs__maybe_build(s, q, layer, h);
    }
    L->tokens += n_tokens;
    kvs__rwunlock(&L->lock);
    kvs__unlock(&L->append_mu);
    kvs__bytes_add(s, q, (int64_t)(2 * (size_t)n_tokens * stride));
    kvs__enforce_budget(s, q);
out:
    kvs__seq_unref(q);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Search / attend                                                        */

static kvs_scratch_t *thread_scratch(kvs_store_t *s) {
    scratch_node_t *n = pthread_getspecific(s->scratch_key);
    if (n)
        return n->sc;
    n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->s = s;
    if (!(n->sc = kvs_scratch_new()) ||
        pthread_setspecific(s->scratch_key, n)) {
        kvs_scratch_free(n->sc);
        free(n);
        return NULL;
    }
    kvs__lock(&s->scratch_mu, KVS__RANK_SCRATCH, 0);
    n->next = s->scratches;
    if (n->next)
        n->next->prev = n;
    s->scratches = n;
    kvs__unlock(&s->scratch_mu);
    return n->sc;
}

static void head_view(const kvs_store_t *s, const seq_t *q, const head_t *h,
                      kvs_head_view_t *v) {
    v->dtype = q->geo.dtype;
    v->d = q->geo.head_dim;
    v->segments = h->segments;
    v->n_segments = h->n_segments;
    v->indexed_tokens = h->indexed_tokens;
    v->tail_keys = h->tail_keys + h->tail_start * q->row_bytes;
    v->tail_values = h->tail_values + h->tail_start * q->row_bytes;
    v->tail_tokens = (uint32_t)h->tail_len;
    v->sink_tokens = s->opts.sink_tokens;
    v->window_tokens = s->opts.window_tokens;
}

static int resolve_params(kvs_store_t *s, const seq_t *q,
                          const kvs_query_params_t *p, kvs_zone_params_t *zp,
                          kvs_rank_params_t *rp) {
    /* Zeroed first: a field the index gains later must read as its
     * default here, never as whatever malloc left in the call state. */
    memset(zp, 0, sizeof *zp);
    memset(rp, 0, sizeof *rp);
    const kvs_query_params_t *d = &s->opts.defaults;
    kvs_query_params_t m = p ? *p : *d;
    if (p) {
        if (m.retrieval_fraction == 0 && m.estimation_fraction == 0 &&
            m.epsilon == 0) {
            m.retrieval_fraction = d->retrieval_fraction;
            m.estimation_fraction = d->estimation_fraction;
            m.epsilon = d->epsilon;
        }
        if (m.scale == 0)
            m.scale = d->scale;
    }
    /* DEFAULT (0) takes the store's default, whose own DEFAULT is WAVE /
     * FIXED: a zero-filled params struct must not run the slow reference. */
    if (m.mode == KVS_MODE_DEFAULT)
        m.mode = d->mode != KVS_MODE_DEFAULT ? d->mode : KVS_MODE_WAVE;
    if (m.budget == KVS_BUDGET_DEFAULT)
        m.budget =
            d->budget != KVS_BUDGET_DEFAULT ? d->budget : KVS_BUDGET_FIXED;
    /* The store's DEFAULT rank stays DEFAULT for the index: codes where a
     * head's segments have them, per head (segments reloaded from before
     * codes have none). */
    if (m.rank == KVS_RANK_DEFAULT)
        m.rank = d->rank;
    /* With a usable GPU, DEFAULT is what its kernels serve (they rank by
     * centroid), so a GPU store attends on the GPU unless a call asks for
     * codes. */
    if (m.rank == KVS_RANK_DEFAULT && s->gpu)
        m.rank = KVS_RANK_CENTROID;
    if (m.mode != KVS_MODE_EXACT && m.mode != KVS_MODE_WAVE &&
        m.mode != KVS_MODE_FULL)
        return kvs__fail(s, KVS_EINVAL, "unknown mode %d", (int)m.mode);
    if (m.budget != KVS_BUDGET_FIXED && m.budget != KVS_BUDGET_BOUNDED)
        return kvs__fail(s, KVS_EINVAL, "unknown budget %d", (int)m.budget);
    if (m.rank != KVS_RANK_DEFAULT && m.rank != KVS_RANK_CODES &&
        m.rank != KVS_RANK_CENTROID)
        return kvs__fail(s, KVS_EINVAL, "unknown rank %d", (int)m.rank);
    if (m.rank == KVS_RANK_CODES && m.budget == KVS_BUDGET_BOUNDED &&
        m.mode == KVS_MODE_WAVE)
        return kvs__fail(s, KVS_EINVAL,
                         "the bounded budget ranks by centroid mass: "
                         "rank codes needs the fixed budget");
    if (!(m.retrieval_fraction >= 0 && m.retrieval_fraction <= 1) ||
        !(m.estimation_fraction >= 0 && m.estimation_fraction <= 1) ||
        !(m.epsilon >= 0 && m.epsilon <= 1) || !(m.scale >= 0) ||
        !isfinite(m.scale))
        return kvs__fail(s, KVS_EINVAL, "query params out of range");
    zp->exact = m.mode == KVS_MODE_EXACT || m.mode == KVS_MODE_FULL;
    zp->precise = m.mode == KVS_MODE_EXACT;
    zp->bounded = m.budget == KVS_BUDGET_BOUNDED;
    zp->retrieval_fraction = m.retrieval_fraction;
    zp->estimation_fraction = m.estimation_fraction;
    zp->epsilon = m.epsilon;
    zp->scale = m.scale > 0 ? m.scale : 1.0f / sqrtf((float)q->geo.head_dim);
    /* The reference uses 1/sqrt(d) in double: a float scale alone moves
     * every score by ~1e-7 relative. */
    zp->scale_f64 =
        m.scale > 0 ? (double)m.scale : 1.0 / sqrt((double)q->geo.head_dim);
    rp->rank = m.rank;
    return 0;
}

typedef struct call_s {
    kvs_store_t *s;
    seq_t *q;
    layer_t *L;
    const float *queries;
    kvs_zone_params_t zp;
    kvs_rank_params_t rp;
    uint32_t group, k;
    float *out;
    /* kvs_seq_attend_device: the caller's device copies of queries/out
     * (the GPU step uses them in place); NULL otherwise */
    const float *dev_queries;
    float *dev_out;
    int served_on_device; /* the GPU step wrote dev_out */
    int64_t *positions;
    float *scores;
    kvs_zone_stats_t stats[KVS_MAX_HEADS];
    int rc[KVS_MAX_HEADS];
    float budget[KVS_MAX_HEADS]; /* attend: per-head budget (observe.c) */
} call_t;

static void attend_task(void *arg, uint32_t h) {
    call_t *c = arg;
    kvs_scratch_t *sc = thread_scratch(c->s);
    if (!sc) {
        c->rc[h] = KVS_ENOMEM;
        return;
    }
    kvs_head_view_t v;
    head_view(c->s, c->q, &c->L->heads[h], &v);
    size_t off = (size_t)h * c->group * c->q->geo.head_dim;
    kvs_rank_params_t rp = c->rp;
    rp.budget_scale = c->budget[h];
    c->rc[h] = kvs_head_attend_ranked(&v, c->queries + off, c->group, &c->zp,
                                      &rp, sc, c->out + off, &c->stats[h]);
}

static void search_task(void *arg, uint32_t h) {
    call_t *c = arg;
    kvs_scratch_t *sc = thread_scratch(c->s);
    if (!sc) {
        c->rc[h] = KVS_ENOMEM;
        return;
    }
    kvs_head_view_t v;
    head_view(c->s, c->q, &c->L->heads[h], &v);
    size_t qh = (size_t)h * c->group;
    c->rc[h] = kvs_head_search_group_ranked(
        &v, c->queries + qh * v.d, c->group, c->k, &c->zp, &c->rp, sc,
        c->positions + qh * c->k, c->scores + qh * c->k, &c->stats[h]);
}

int kvs__head_errors(kvs_store_t *s, const seq_t *q, const layer_t *L,
                     uint32_t h, const float *samples, uint32_t n,
                     const kvs_zone_params_t *zp, const kvs_rank_params_t *rp,
                     const float *mults, int nm, double *err) {
    assert(kvs__held(&L->lock));
    kvs_scratch_t *sc = thread_scratch(s);
    if (!sc)
        return KVS_ENOMEM;
    const uint32_t G = q->geo.n_q_heads / q->geo.n_kv_heads,
                   d = q->geo.head_dim;
    kvs_head_view_t v;
    head_view(s, q, &L->heads[h], &v);
    float *ex = malloc(2 * (size_t)G * d * sizeof(float));
    if (!ex)
        return KVS_ENOMEM;
    float *out = ex + (size_t)G * d;
    kvs_zone_params_t xz = *zp;
    xz.exact = 1;
    xz.precise = 0;
    int rc = 0;
    for (int j = 0; j < nm; j++)
        err[j] = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        const float *x = samples + (size_t)i * G * d;
        kvs_zone_stats_t st = {0};
        if ((rc = kvs_head_attend_ranked(&v, x, G, &xz, rp, sc, ex, &st)))
            break;
        for (int j = 0; j < nm && !rc; j++) {
            kvs_rank_params_t r = *rp;
            r.budget_scale = mults[j];
            if ((rc = kvs_head_attend_ranked(&v, x, G, zp, &r, sc, out, &st)))
                break;
            for (uint32_t g = 0; g < G; g++) {
                double num = 0, den = 0;
                for (uint32_t t = 0; t < d; t++) {
                    double e = (double)out[g * d + t] - ex[g * d + t];
                    num += e * e;
                    den += (double)ex[g * d + t] * ex[g * d + t];
                }
                err[j] += den > 0 ? sqrt(num / den) : sqrt(num);
            }
        }
    }
    for (int j = 0; j < nm; j++)
        err[j] /= (double)n * G;
    free(ex);
    return rc;
}

/* The GPU path for a wave attend, under the layer's read lock. Nonzero:
 * not served there (the CPU path runs; a GPU failure is counted in the
 * store's stats, never returned). */
static int gpu_attend(kvs_store_t *s, call_t *c) {
    assert(kvs__held(&c->L->lock));
    const uint32_t nh = c->q->geo.n_kv_heads;
    kvs_head_view_t *v = malloc(nh * sizeof *v);
    if (!v)
        return KVS_ENOMEM;
    for (uint32_t h = 0; h < nh; h++)
        head_view(s, c->q, &c->L->heads[h], &v[h]);
    int rc;
    if (c->dev_queries) {
        rc = kvs__gpu_attend_device(s->gpu, &c->L->gpu, v, nh, c->group,
                                    c->dev_queries, &c->zp, &c->rp, c->dev_out,
                                    c->stats);
        c->served_on_device = rc == 0;
    } else {
        rc = kvs__gpu_attend(s->gpu, &c->L->gpu, v, nh, c->group, c->queries,
                             &c->zp, &c->rp, c->out, c->stats);
    }
    free(v);
    return rc;
}

/* Shared front half of search and attend: validation and the lock. */
static int call_begin(kvs_store_t *s, uint64_t id, uint32_t layer,
                      const float *queries, size_t expect_floats,
                      const kvs_query_params_t *params, call_t **out) {
    int rc = 0;
    seq_t *q = kvs__seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    const kvs_geometry_t *g = &q->geo;
    if (layer >= g->n_layers) {
        rc = kvs__fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)",
                       layer, g->n_layers);
        goto err;
    }
    /* a caller that sized its arrays (kvs_seq_attend_device) must match
     * the sequence as it is now, before anything reads them */
    if (expect_floats && expect_floats != (size_t)g->n_q_heads * g->head_dim) {
        rc = kvs__fail(s, KVS_EGEOMETRY,
                       "queries hold %zu floats; sequence %llu has %u query "
                       "heads x head_dim %u",
                       expect_floats, (unsigned long long)id, g->n_q_heads,
                       g->head_dim);
        goto err;
    }
    if (!kvs_all_finite(KVS_DTYPE_F32, queries,
                        (size_t)g->n_q_heads * g->head_dim)) {
        rc = kvs__fail(s, KVS_ENOTFINITE, "NaN or Inf in queries");
        goto err;
    }
    call_t *c = malloc(sizeof *c);
    if (!c) {
        rc = kvs__fail(s, KVS_ENOMEM, "call state");
        goto err;
    }
    memset(c->stats, 0, g->n_kv_heads * sizeof c->stats[0]);
    memset(c->rc, 0, g->n_kv_heads * sizeof c->rc[0]);
    if ((rc = resolve_params(s, q, params, &c->zp, &c->rp))) {
        free(c);
        goto err;
    }
    c->s = s;
    c->q = q;
    c->L = &q->layers[layer];
    c->queries = queries;
    c->group = g->n_q_heads / g->n_kv_heads;
    *out = c;
    return 0;
err:
    kvs__seq_unref(q);
    return rc;
}

/* Locks the call's layer for reading. With opts.deterministic, first waits
 * until no head of the layer has a build queued or running. Race-free: the
 * finish counter is read under build_mu while the layer lock still keeps the
 * in-flight build from publishing, and a build bumps it only after its
 * publish, so the wait cannot miss it. */
static int call_lock(kvs_store_t *s, call_t *c) {
    for (;;) {
        int rc = kvs__layer_lock(s, c->q, c->L, 0);
        if (rc || !s->opts.deterministic)
            return rc;
        int busy = 0;
        for (uint32_t h = 0; h < c->q->geo.n_kv_heads; h++)
            busy |= c->L->heads[h].build_inflight;
        if (!busy)
            return 0;
        kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
        const uint64_t seen = s->builds_finished;
        kvs__rwunlock(&c->L->lock);
        while (s->builds_finished == seen && !s->stopping)
            pthread_cond_wait(&s->build_done, &s->build_mu);
        const int stopping = s->stopping;
        kvs__unlock(&s->build_mu);
        if (stopping)
            return kvs__fail(s, KVS_ECLOSED, "store is closing");
    }
}

static int call_end(call_t *c, kvs_attend_stats_t *stats, double t0) {
    uint32_t nh = c->q->geo.n_kv_heads;
    int rc = 0;
    for (uint32_t h = 0; h < nh && !rc; h++)
        rc = c->rc[h];
    if (rc)
        rc = kvs__fail(c->s, rc, "head computation failed: %s",
                       kvs_strerror(rc));
    if (stats) {
        kvs_zone_stats_t sum = {0};
        for (uint32_t h = 0; h < nh; h++)
            kvs_zone_stats_add(&sum, &c->stats[h]);
        *stats = (kvs_attend_stats_t){
            .keys_total = sum.keys_total,
            .keys_exact = sum.keys_exact,
            .keys_steady = sum.keys_steady,
            .clusters_total = sum.clusters_total,
            .clusters_retrieved = sum.clusters_retrieved,
            .clusters_estimated = sum.clusters_estimated,
            .clusters_skipped = sum.clusters_skipped,
            .seconds = kvs__now_s() - t0,
        };
    }
    kvs__seq_unref(c->q);
    free(c);
    return rc;
}

/* kvs_seq_attend. expect_floats (0: any): how many floats the caller's
 * queries and out hold, which the sequence must still match. With
 * dev_queries, the GPU step takes dev_queries and dev_out in place of
 * queries and out, and *on_device says whether it did (else out holds the
 * answer). */
static int attend(kvs_store_t *s, uint64_t id, uint32_t layer,
                  const float *queries, const float *dev_queries,
                  size_t expect_floats, const kvs_query_params_t *params,
                  float *out, float *dev_out, int *on_device,
                  kvs_attend_stats_t *stats, double t0) {
    call_t *c;
    int rc = call_begin(s, id, layer, queries, expect_floats, params, &c);
    if (rc)
        return rc;
    c->out = out;
    c->dev_queries = dev_queries;
    c->dev_out = dev_out;
    c->served_on_device = 0;
    if ((rc = call_lock(s, c))) {
        kvs__seq_unref(c->q);
        free(c);
        return rc;
    }
    if (c->L->tokens == 0) {
        kvs__rwunlock(&c->L->lock);
        kvs__seq_unref(c->q);
        free(c);
        return kvs__fail(s, KVS_ERANGE, "layer %u is empty", layer);
    }
    /* Per-head budgets. A failure here (out of memory for a reservoir)
     * leaves every head at the call's budget: the answer stays what the
     * call asked for, only not tuned. */
    if (c->zp.exact ||
        kvs__obs_attend(s, c->q, layer, queries, &c->zp, &c->rp, c->budget))
        for (uint32_t h = 0; h < c->q->geo.n_kv_heads; h++)
            c->budget[h] = 1.0f;
    if (!s->gpu || c->zp.exact || gpu_attend(s, c) != 0)
        kvs__pool_run(s->pool, c->q->geo.n_kv_heads, attend_task, c);
    kvs__rwunlock(&c->L->lock);
    if (on_device)
        *on_device = c->served_on_device;
    return call_end(c, stats, t0);
}

int kvs_seq_attend(kvs_store_t *s, uint64_t id, uint32_t layer,
                   const float *queries, const kvs_query_params_t *params,
                   float *out, kvs_attend_stats_t *stats) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!queries || !out)
        return kvs__fail(s, KVS_EINVAL, "queries or out is NULL");
    return attend(s, id, layer, queries, NULL, 0, params, out, NULL, NULL,
                  stats, kvs__now_s());
}

/* kvs_seq_attend_batch: one task per sequence (its heads run as a nested
 * job of the same pool: a submitter works on its own job, so nesting
 * cannot stall). */
typedef struct batch_s {
    kvs_store_t *s;
    const uint64_t *seqs;
    uint32_t layer;
    const float *queries;
    size_t row;
    const kvs_query_params_t *params;
    float *out;
    int *rc;
    kvs_attend_stats_t *stats;
    char (*msg)[160]; /* a failure's detail, from the thread that had it */
} batch_t;

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void batch_task(void *arg, uint32_t i) {
    batch_t *b = arg;
    const size_t at = (size_t)i * b->row;
    kvs__clear_err(b->s); /* this worker's last message is not ours */
    b->rc[i] = attend(b->s, b->seqs[i], b->layer, b->queries + at, NULL, b->row,
                      b->params, b->out + at, NULL, NULL,
                      b->stats ? &b->stats[i] : NULL, kvs__now_s());
    if (b->rc[i])
        snprintf(b->msg[i], sizeof b->msg[i], "%s", kvs_store_errmsg(b->s));
}

int kvs_seq_attend_batch(kvs_store_t *s, uint32_t n, const uint64_t *seqs,
                         uint32_t layer, const float *queries,
                         size_t row_floats, const kvs_query_params_t *params,
                         float *out, int *rcs, kvs_attend_stats_t *stats) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (n == 0)
        return 0;
    if (!seqs || !queries || !out || row_floats == 0)
        return kvs__fail(s, KVS_EINVAL,
                         "seqs, queries or out is NULL, or row_floats is 0");
    int *rc = rcs ? rcs : malloc(n * sizeof *rc);
    char(*msg)[160] = malloc(n * sizeof *msg);
    uint64_t *sorted = malloc(n * sizeof *sorted);
    int first = 0;
    if (!rc || !msg || !sorted) {
        first = kvs__fail(s, KVS_ENOMEM, "batch state");
        goto done;
    }
    /* One row per sequence: two rows of one sequence would run in either
     * order (its per-head budgets learn from each call), so their answers
     * would depend on scheduling. */
    memcpy(sorted, seqs, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_u64);
    for (uint32_t i = 1; i < n; i++)
        if (sorted[i] == sorted[i - 1]) {
            first = kvs__fail(s, KVS_EINVAL,
                              "sequence %llu appears twice in the batch",
                              (unsigned long long)sorted[i]);
            goto done;
        }
    batch_t b = {s,      seqs, layer, queries, row_floats,
                 params, out,  rc,    stats,   msg};
    kvs__pool_run(s->pool, n, batch_task, &b);
    for (uint32_t i = 0; i < n && !first; i++)
        if (rc[i])
            first = kvs__fail(s, rc[i], "sequence %llu (batch row %u): %s",
                              (unsigned long long)seqs[i], i, msg[i]);
done:
    if (!rcs)
        free(rc);
    free(msg);
    free(sorted);
    return first;
}

int kvs_seq_attend_device(kvs_store_t *s, uint64_t id, uint32_t layer,
                          const float *queries, size_t n,
                          const kvs_query_params_t *params, float *out,
                          kvs_attend_stats_t *stats) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!queries || !out || n == 0)
        return kvs__fail(s, KVS_EINVAL, "queries or out is NULL, or n is 0");
    if (!s->gpu)
        return kvs__fail(s, KVS_ENOTSUP, "no GPU in this store: %s",
                         kvs_store_gpu_info(s));
    const double t0 = kvs__now_s();
    int rc;
    if ((rc = kvs__gpu_check_ptr(s->gpu, queries, n * sizeof(float))) ||
        (rc = kvs__gpu_check_ptr(s->gpu, out, n * sizeof(float))))
        return kvs__fail(s, rc,
                         "queries and out must be memory of the store's CUDA "
                         "device");
    /* host copies: validation, per-head budgets and the CPU path read
     * the queries; the CPU path writes its answer here */
    float *host = malloc(2 * n * sizeof(float));
    if (!host)
        return kvs__fail(s, KVS_ENOMEM, "host copy of the queries");
    if ((rc = kvs__gpu_copy(s->gpu, host, queries, n * sizeof(float), 0))) {
        free(host);
        return kvs__fail(s, rc, "copying the queries from the device failed");
    }
    int on_device = 0;
    rc = attend(s, id, layer, host, queries, n, params, host + n, out,
                &on_device, stats, t0);
    if (!rc && !on_device &&
        (rc = kvs__gpu_copy(s->gpu, out, host + n, n * sizeof(float), 1)))
        rc = kvs__fail(s, rc, "copying the output to the device failed");
    free(host);
    return rc;
}

int kvs_seq_search(kvs_store_t *s, uint64_t id, uint32_t layer,
                   const float *queries, uint32_t k,
                   const kvs_query_params_t *params, int64_t *positions,
                   float *scores) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!queries || !positions || !scores)
        return kvs__fail(s, KVS_EINVAL, "queries, positions or scores is NULL");
    call_t *c;
    int rc = call_begin(s, id, layer, queries, 0, params, &c);
    if (rc)
        return rc;
    c->k = k;
    c->positions = positions;
    c->scores = scores;
    if ((rc = call_lock(s, c))) {
        kvs__seq_unref(c->q);
        free(c);
        return rc;
    }
    if (k == 0 || k > c->L->tokens) {
        uint64_t have = c->L->tokens;
        kvs__rwunlock(&c->L->lock);
        kvs__seq_unref(c->q);
        free(c);
        return kvs__fail(s, KVS_ERANGE,
                         "k %u outside 1..%llu (tokens in layer)", k,
                         (unsigned long long)have);
    }
    kvs__pool_run(s->pool, c->q->geo.n_kv_heads, search_task, c);
    kvs__rwunlock(&c->L->lock);
    return call_end(c, NULL, 0);
}

/* Copy tokens pos .. pos+n of one head into rows `stride` bytes apart
 * (either destination may be NULL). Under the layer's lock, or of a head
 * nobody else can see yet (a fork's child before it is linked). */
void kvs__head_gather(const head_t *hd, size_t rb, uint64_t pos, uint64_t n,
                      char *keys, char *values, size_t stride) {
    uint64_t end = pos + n;
    for (uint32_t si = 0; si < hd->n_segments; si++) {
        const kvs_segment_t *seg = hd->segments[si];
        uint64_t a = seg->first_pos, b = a + seg->n_tokens;
        if (b <= pos || a >= end)
            continue;
        for (uint32_t slot = 0; slot < seg->n_tokens; slot++) {
            uint64_t p = a + seg->positions[slot];
            if (p < pos || p >= end)
                continue;
            size_t o = (p - pos) * stride;
            if (keys)
                memcpy(keys + o, (const char *)seg->keys + slot * rb, rb);
            if (values)
                memcpy(values + o, (const char *)seg->values + slot * rb, rb);
        }
    }
    uint64_t t0 = hd->indexed_tokens;
    for (uint64_t p = pos > t0 ? pos : t0; p < end; p++) {
        size_t src = (hd->tail_start + (p - t0)) * rb;
        size_t o = (p - pos) * stride;
        if (keys)
            memcpy(keys + o, hd->tail_keys + src, rb);
        if (values)
            memcpy(values + o, hd->tail_values + src, rb);
    }
}

int kvs_seq_read(kvs_store_t *s, uint64_t id, uint32_t layer, uint64_t pos,
                 uint32_t n, void *keys, void *values) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = 0;
    seq_t *q = kvs__seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    if (layer >= q->geo.n_layers) {
        rc = kvs__fail(s, KVS_ERANGE, "layer %u out of range", layer);
        goto out;
    }
    layer_t *L = &q->layers[layer];
    if ((rc = kvs__layer_lock(s, q, L, 0)))
        goto out;
    if (pos > L->tokens || n > L->tokens - pos) {
        rc = kvs__fail(s, KVS_ERANGE, "tokens %llu..%llu past the %llu held",
                       (unsigned long long)pos, (unsigned long long)(pos + n),
                       (unsigned long long)L->tokens);
        kvs__rwunlock(&L->lock);
        goto out;
    }
    size_t rb = q->row_bytes, stride = rb * q->geo.n_kv_heads;
    for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
        kvs__head_gather(&L->heads[h], rb, pos, n,
                         keys ? (char *)keys + h * rb : NULL,
                         values ? (char *)values + h * rb : NULL, stride);
    kvs__rwunlock(&L->lock);
out:
    kvs__seq_unref(q);
    return rc;
}
