/*
 * seq.c: the sequence table and the calls on whole sequences: create, drop,
 * fork, TTL and its expiry (the housekeeping thread), info and list.
 *
 * Sequences live in a hash table keyed by id, guarded by map_mu, which is
 * never held across I/O; the table changes that write storage serialise on
 * meta_mu (engine_int.h states the lock order). Sequences are reference
 * counted: a drop unlinks the sequence at once and frees it when the last
 * running call or build job lets go.
 */
#include "engine_int.h"

#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------------- */
/* Sequences                                                              */

/* Segments are shared between forks: the last owner frees. */
void kvs__segment_unref(kvs_segment_t *seg) {
    if (__atomic_fetch_sub(&seg->extra_refs, 1, __ATOMIC_ACQ_REL) == 0)
        kvs_segment_free(seg);
}

void kvs__head_release(head_t *h) {
    for (uint32_t i = 0; i < h->n_segments; i++)
        kvs__segment_unref(h->segments[i]);
    free(h->segments);
    free(h->tail_keys);
    free(h->tail_values);
}

void kvs__seq_free(seq_t *q) {
    if (q->layers) {
        for (uint32_t l = 0; l < q->geo.n_layers; l++) {
            layer_t *L = &q->layers[l];
            if (!L->heads)
                continue;
            for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
                kvs__head_release(&L->heads[h]);
            kvs__gpu_layer_free(q->gpu, atomic_load(&L->gpu));
            free(L->heads);
            pthread_rwlock_destroy(&L->lock);
            pthread_mutex_destroy(&L->append_mu);
        }
        free(q->layers);
    }
    kvs__obs_free(q);
    free(q->damage);
    pthread_mutex_destroy(&q->obs_mu);
    pthread_mutex_destroy(&q->page_mu);
    free(q);
}

void kvs__seq_unref(seq_t *q) {
    if (atomic_fetch_sub(&q->refs, 1) == 1)
        kvs__seq_free(q);
}

static size_t bucket_of(const kvs_store_t *s, uint64_t id) {
    uint64_t x = id * 0x9e3779b97f4a7c15ull;
    return (size_t)(x >> 17) & (s->n_buckets - 1);
}

/* Look `id` up and take a reference; NULL when unknown. */
static seq_t *seq_get(kvs_store_t *s, uint64_t id) {
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    seq_t *q = s->buckets[bucket_of(s, id)];
    while (q && (q->id != id || atomic_load(&q->unlinking)))
        q = q->next;
    if (q)
        atomic_fetch_add(&q->refs, 1);
    kvs__unlock(&s->map_mu);
    return q;
}

static int map_grow(kvs_store_t *s) {
    size_t nb = s->n_buckets * 2;
    seq_t **b = calloc(nb, sizeof *b);
    if (!b)
        return KVS_ENOMEM;
    seq_t **old = s->buckets;
    size_t on = s->n_buckets;
    s->buckets = b;
    s->n_buckets = nb;
    for (size_t i = 0; i < on; i++)
        for (seq_t *q = old[i], *nx; q; q = nx) {
            nx = q->next;
            size_t k = bucket_of(s, q->id);
            q->next = b[k];
            b[k] = q;
        }
    free(old);
    return 0;
}

int kvs__check_geometry(kvs_store_t *s, const kvs_geometry_t *g) {
    if (!g)
        return kvs__fail(s, KVS_EINVAL, "geometry is NULL");
    if (g->n_layers == 0 || g->n_layers > KVS_MAX_LAYERS)
        return kvs__fail(s, KVS_EINVAL, "n_layers %u outside 1..%u",
                         g->n_layers, KVS_MAX_LAYERS);
    if (g->n_kv_heads == 0 || g->n_kv_heads > KVS_MAX_HEADS ||
        g->n_q_heads == 0 || g->n_q_heads > KVS_MAX_HEADS)
        return kvs__fail(s, KVS_EINVAL, "head counts outside 1..%u",
                         KVS_MAX_HEADS);
    if (g->n_q_heads % g->n_kv_heads)
        return kvs__fail(s, KVS_EINVAL,
                         "n_q_heads %u is not a multiple of "
                         "n_kv_heads %u",
                         g->n_q_heads, g->n_kv_heads);
    if (g->head_dim == 0 || g->head_dim > KVS_MAX_HEAD_DIM)
        return kvs__fail(s, KVS_EINVAL, "head_dim %u outside 1..%u",
                         g->head_dim, KVS_MAX_HEAD_DIM);
    if (kvs_dtype_size(g->dtype) == 0)
        return kvs__fail(s, KVS_EINVAL, "unknown dtype %d", (int)g->dtype);
    return 0;
}

/* A new, empty, unlinked sequence. */
int kvs__seq_new(kvs_store_t *s, uint64_t id, const kvs_geometry_t *geo,
                 seq_t **out) {
    seq_t *q = calloc(1, sizeof *q);
    if (!q)
        return kvs__fail(s, KVS_ENOMEM, "sequence");
    q->id = id;
    q->geo = *geo;
    q->gpu = s->gpu;
    q->row_bytes = (size_t)geo->head_dim * kvs_dtype_size(geo->dtype);
    atomic_init(&q->refs, 1);
    atomic_init(&q->ttl_s, 0);
    atomic_init(&q->last_access, kvs__now_ms());
    atomic_init(&q->evicted, 0);
    atomic_init(&q->bytes, 0);
    atomic_init(&q->obs_bytes, 0);
    pthread_mutex_init(&q->page_mu, NULL);
    pthread_mutex_init(&q->obs_mu, NULL);
    q->layers = calloc(geo->n_layers, sizeof(layer_t));
    if (!q->layers)
        goto oom;
    for (uint32_t l = 0; l < geo->n_layers; l++) {
        q->layers[l].heads = calloc(geo->n_kv_heads, sizeof(head_t));
        if (!q->layers[l].heads)
            goto oom;
        pthread_rwlockattr_t attr;
        pthread_rwlockattr_init(&attr);
        /* Writers (appends, publishes) must not starve behind a stream of
         * attends. */
        pthread_rwlockattr_setkind_np(
            &attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&q->layers[l].lock, &attr);
        pthread_rwlockattr_destroy(&attr);
        pthread_mutex_init(&q->layers[l].append_mu, NULL);
        q->layers[l].resident = 1;
    }
    *out = q;
    return 0;
oom:
    kvs__seq_free(q);
    return kvs__fail(s, KVS_ENOMEM, "sequence");
}

uint64_t kvs__seq_meta_bytes(const kvs_geometry_t *g) {
    return sizeof(seq_t) + (uint64_t)g->n_layers * sizeof(layer_t) +
           (uint64_t)g->n_layers * g->n_kv_heads * sizeof(head_t);
}

int kvs__seq_admit(kvs_store_t *s, const kvs_geometry_t *g) {
    assert(kvs__held(&s->map_mu));
    if (s->opts.max_sequences && s->n_seqs >= s->opts.max_sequences)
        return kvs__fail(s, KVS_ETOOBIG,
                         "the store holds max_sequences (%llu) sequences",
                         (unsigned long long)s->opts.max_sequences);
    const uint64_t meta = kvs__seq_meta_bytes(g);
    if (s->opts.memory_bytes && s->meta_bytes + meta > s->opts.memory_bytes)
        return kvs__fail(s, KVS_ENOMEM,
                         "the bookkeeping of one more sequence of this "
                         "geometry (%llu bytes; %llu held by %zu sequences) "
                         "would exceed memory_bytes (%llu)",
                         (unsigned long long)meta,
                         (unsigned long long)s->meta_bytes, s->n_seqs,
                         (unsigned long long)s->opts.memory_bytes);
    return 0;
}

/* `id` is not in the table. */
int kvs__map_insert(kvs_store_t *s, seq_t *q) {
    assert(kvs__held(&s->map_mu));
    if (s->n_seqs + 1 > s->n_buckets && map_grow(s))
        return KVS_ENOMEM;
    size_t b = bucket_of(s, q->id);
    q->next = s->buckets[b];
    s->buckets[b] = q;
    s->n_seqs++;
    const uint64_t meta = kvs__seq_meta_bytes(&q->geo);
    s->meta_bytes += meta;
    atomic_fetch_add(&s->resident_bytes, (int64_t)meta);
    return 0;
}

seq_t *kvs__map_find(kvs_store_t *s, uint64_t id) {
    seq_t *q = s->buckets[bucket_of(s, id)];
    while (q && q->id != id)
        q = q->next;
    return q;
}

int kvs_seq_create(kvs_store_t *s, uint64_t id, const kvs_geometry_t *geo) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = kvs__check_geometry(s, geo);
    if (rc)
        return rc;
    seq_t *q;
    if ((rc = kvs__seq_new(s, id, geo, &q)))
        return rc;
    /* meta_mu across the storage write: a racing create or drop of the
     * same id cannot reorder with it; lookups go on meanwhile. */
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    int exists = kvs__map_find(s, id) != NULL;
    int admit = exists ? 0 : kvs__seq_admit(s, geo);
    kvs__unlock(&s->map_mu);
    if (exists) {
        rc = kvs__fail(s, KVS_EEXIST, "sequence %llu already exists",
                       (unsigned long long)id);
    } else if (admit) {
        rc = admit;
    } else if (s->db) {
        char err[256];
        if ((rc = kvs__db_create_seq(s->db, id, geo, 0, err, sizeof err)))
            rc = kvs__fail(s, rc, "%s", err);
    }
    if (!rc) {
        kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
        if ((rc = kvs__map_insert(s, q)))
            rc = kvs__fail(s, rc, "sequence table");
        kvs__unlock(&s->map_mu);
    }
    kvs__unlock(&s->meta_mu);
    if (rc)
        kvs__seq_free(q);
    return rc;
}

static int seq_expired(seq_t *q, uint64_t now);

/*
 * Delete `q` from storage and unlink it from the table, under meta_mu,
 * with a reference; on success the table's reference is the caller's to
 * drop as well. Every layer's append_mu is taken before
 * the storage delete and `dropped` is set under them, so no append or
 * segment write can land under the id after its records are gone. While
 * the delete is written, `unlinking` hides the sequence from lookups. With
 * `if_expired`, a sequence used since it was judged expired is kept
 * (KVS_EBUSY).
 */
static int drop_seq_held(kvs_store_t *s, seq_t *q, int if_expired);

static int drop_seq(kvs_store_t *s, seq_t *q, int if_expired) {
    assert(kvs__held(&s->meta_mu) && !kvs__held(&s->map_mu));
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        kvs__lock(&q->layers[l].append_mu, KVS__RANK_APPEND, l);
    int rc = drop_seq_held(s, q, if_expired);
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        kvs__unlock(&q->layers[l].append_mu);
    return rc;
}

int kvs__drop_seq_held(kvs_store_t *s, seq_t *q) {
    return drop_seq_held(s, q, 0);
}

/* drop_seq with every layer's append_mu already held by the caller. */
static int drop_seq_held(kvs_store_t *s, seq_t *q, int if_expired) {
    assert(kvs__held(&s->meta_mu) && !kvs__held(&s->map_mu));
    int rc = 0;
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    if (if_expired && !seq_expired(q, kvs__now_ms()))
        rc = KVS_EBUSY;
    else
        atomic_store(&q->unlinking, 1);
    kvs__unlock(&s->map_mu);
    if (!rc && s->db) {
        char err[256];
        if ((rc = kvs__db_drop_seq(s->db, q->id, err, sizeof err)))
            kvs__fail(s, rc, "%s", err);
    }
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    if (!rc) {
        atomic_store(&q->dropped, 1);
        seq_t **pp = &s->buckets[bucket_of(s, q->id)];
        while (*pp != q)
            pp = &(*pp)->next;
        *pp = q->next;
        s->n_seqs--;
        const uint64_t meta = kvs__seq_meta_bytes(&q->geo);
        s->meta_bytes -= meta;
        atomic_fetch_sub(&s->resident_bytes, atomic_load(&q->bytes) +
                                                 atomic_load(&q->obs_bytes) +
                                                 (int64_t)meta);
    }
    atomic_store(&q->unlinking, 0);
    kvs__unlock(&s->map_mu);
    return rc;
}

int kvs_seq_drop(kvs_store_t *s, uint64_t id) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    seq_t *q = seq_get(s, id);
    if (!q) {
        kvs__unlock(&s->meta_mu);
        return kvs__fail(s, KVS_ENOSEQ, "unknown sequence %llu",
                         (unsigned long long)id);
    }
    int rc = drop_seq(s, q, 0);
    kvs__unlock(&s->meta_mu);
    if (rc) {
        kvs__seq_unref(q);
        return rc;
    }
    kvs__seq_unref(q); /* the lookup's reference; the table's below */
    /* Wake kvs_seq_wait_indexed callers: a dropped sequence waits no more. */
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    pthread_cond_broadcast(&s->build_done);
    kvs__unlock(&s->build_mu);
    kvs__seq_unref(q);
    return 0;
}

/* Look up a usable sequence; `use` marks it accessed for its TTL
 * (inspecting a sequence through info or wait does not keep it alive). */
static seq_t *seq_lookup_use(kvs_store_t *s, uint64_t id, int *rc, int use) {
    seq_t *q = seq_get(s, id);
    if (!q) {
        *rc = kvs__fail(s, KVS_ENOSEQ, "unknown sequence %llu",
                        (unsigned long long)id);
    } else if (q->damage) {
        *rc = kvs__fail(s, KVS_EQUARANTINED, "sequence %llu is quarantined: %s",
                        (unsigned long long)id, q->damage);
        kvs__seq_unref(q);
        q = NULL;
    } else if (use) {
        atomic_store(&q->last_access, kvs__now_ms());
    }
    return q;
}

seq_t *kvs__seq_lookup(kvs_store_t *s, uint64_t id, int *rc) {
    return seq_lookup_use(s, id, rc, 1);
}

/* For calls that inspect a sequence without using it. */
static seq_t *seq_peek(kvs_store_t *s, uint64_t id, int *rc) {
    return seq_lookup_use(s, id, rc, 0);
}

int kvs_seq_set_ttl(kvs_store_t *s, uint64_t id, uint32_t ttl_seconds) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    /* Under meta_mu: the rewrite of the metadata must not overtake a drop
     * of the same id. */
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    if (atomic_load(&q->dropped)) {
        rc = kvs__fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                       (unsigned long long)id);
    } else if (s->db) {
        char err[256];
        rc = kvs__db_create_seq(s->db, id, &q->geo, ttl_seconds, err,
                                sizeof err);
        if (rc)
            rc = kvs__fail(s, rc, "%s", err);
    }
    if (!rc)
        atomic_store(&q->ttl_s, ttl_seconds);
    kvs__unlock(&s->meta_mu);
    kvs__seq_unref(q);
    return rc;
}

/* Idle past its TTL at `now`? last_access may be newer than `now` (a
 * call touched it after `now` was read): then it is not idle. */
static int seq_expired(seq_t *q, uint64_t now) {
    uint32_t ttl = atomic_load(&q->ttl_s);
    uint64_t la = atomic_load(&q->last_access);
    return ttl && la < now && now - la >= ttl * 1000ull;
}

int kvs_store_expire(kvs_store_t *s, uint64_t *n_expired) {
    if (!s)
        return KVS_EINVAL;
    uint64_t n = 0;
    /* One sequence at a time, under meta_mu (no create or drop of the id
     * can come between), judged again once its appends are held (a
     * sequence used meanwhile is kept), hidden from lookups while its
     * records are deleted. */
    for (;;) {
        uint64_t now = kvs__now_ms();
        seq_t *victim = NULL;
        kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
        kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
        for (size_t b = 0; b < s->n_buckets && !victim; b++)
            for (seq_t *q = s->buckets[b]; q; q = q->next)
                if (seq_expired(q, now)) {
                    victim = q;
                    atomic_fetch_add(&q->refs, 1);
                    break;
                }
        kvs__unlock(&s->map_mu);
        int rc = victim ? drop_seq(s, victim, 1) : 0;
        kvs__unlock(&s->meta_mu);
        if (!victim)
            break;
        kvs__seq_unref(victim); /* the scan's reference */
        if (rc == 0) {
            kvs__store_log(s, KVS_LOG_INFO,
                           "sequence %llu expired (idle past its TTL)",
                           (unsigned long long)victim->id);
            n++;
            kvs__seq_unref(victim); /* the table's */
        } else if (rc != KVS_EBUSY) {
            /* Storage refused the drop: leave it and stop trying now. */
            break;
        }
    }
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    s->expired += n;
    if (n)
        pthread_cond_broadcast(&s->build_done);
    kvs__unlock(&s->build_mu);
    if (n_expired)
        *n_expired = n;
    return 0;
}

void *kvs__keeper_main(void *arg) {
    kvs_store_t *s = arg;
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    while (!atomic_load(&s->stopping)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&s->keeper_cv, &s->build_mu, &ts);
        if (atomic_load(&s->stopping))
            break;
        kvs__unlock(&s->build_mu);
        kvs_store_expire(s, NULL);
        kvs__enforce_budget(s, NULL);
        kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    }
    kvs__unlock(&s->build_mu);
    return NULL;
}

/* ---------------------------------------------------------------------- */
/* Fork                                                                   */

/* End of the segments of `p` that lie wholly below `at`. */
static uint64_t shareable_end(const head_t *p, uint64_t at) {
    uint64_t end = 0;
    for (uint32_t i = 0; i < p->n_segments; i++) {
        uint64_t e = p->segments[i]->first_pos + p->segments[i]->n_tokens;
        if (e <= at)
            end = e;
    }
    return end;
}

/* Fill child head `c` from parent head `p` up to `at`: share the segments
 * below `share_end`, copy the rest as tail rows. Parent layer locked. */
static int fork_head(const head_t *p, head_t *c, size_t rb, uint64_t share_end,
                     uint64_t at) {
    uint32_t shared = 0;
    while (shared < p->n_segments &&
           p->segments[shared]->first_pos + p->segments[shared]->n_tokens <=
               share_end)
        shared++;
    if (shared) {
        c->segments = malloc(shared * sizeof *c->segments);
        if (!c->segments)
            return KVS_ENOMEM;
        c->segments_cap = shared;
    }
    for (uint32_t i = 0; i < shared; i++) {
        __atomic_fetch_add(&p->segments[i]->extra_refs, 1, __ATOMIC_RELAXED);
        c->segments[c->n_segments++] = p->segments[i];
        c->indexed_tokens += p->segments[i]->n_tokens;
    }
    uint64_t rest = at - c->indexed_tokens;
    if (rest) {
        int rc = kvs__head_reserve(c, rb, rest);
        if (rc)
            return rc;
        kvs__head_gather(p, rb, c->indexed_tokens, rest, c->tail_keys,
                         c->tail_values, rb);
        c->tail_len = rest;
    }
    return 0;
}

/* Store a forked child (or an imported sequence, transfer.c): its segments
 * and rows first, its metadata last, so a crash in between leaves records
 * of an unknown id (deleted at the next open), never half a sequence. */
int kvs__seq_persist(kvs_store_t *s, seq_t *c, char *err, size_t errlen) {
    const kvs_geometry_t *g = &c->geo;
    size_t rb = c->row_bytes, stride = rb * g->n_kv_heads;
    int rc = 0;
    for (uint32_t l = 0; l < g->n_layers && !rc; l++) {
        layer_t *L = &c->layers[l];
        uint64_t indexed = L->heads[0].indexed_tokens;
        for (uint32_t h = 0; h < g->n_kv_heads && !rc; h++) {
            head_t *hd = &L->heads[h];
            for (uint32_t i = 0; i < hd->n_segments && !rc; i++)
                rc = kvs__db_put_segment(s->db, c->id, l, h, hd->segments[i],
                                         err, errlen);
        }
        /* kvs_seq_fork shares the same segments in every head of a layer
         * (an import checks the same), so the rows past them start at one
         * position for all heads. */
        uint64_t rest = L->tokens - indexed;
        if (rc || rest == 0)
            continue;
        char *k = malloc(rest * stride), *v = malloc(rest * stride);
        if (!k || !v) {
            free(k);
            free(v);
            return KVS_ENOMEM;
        }
        for (uint32_t h = 0; h < g->n_kv_heads; h++)
            kvs__head_gather(&L->heads[h], rb, indexed, rest, k + h * rb,
                             v + h * rb, stride);
        rc = kvs__db_append(s->db, c->id, l, g, indexed, (uint32_t)rest, k, v,
                            s->opts.segment_tokens, NULL, err, errlen);
        free(k);
        free(v);
    }
    if (!rc)
        rc = kvs__db_create_seq(s->db, c->id, g, atomic_load(&c->ttl_s), err,
                                errlen);
    return rc;
}

int kvs_seq_fork(kvs_store_t *s, uint64_t parent, uint64_t at, uint64_t child) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = 0;
    seq_t *p = kvs__seq_lookup(s, parent, &rc);
    if (!p)
        return rc;
    seq_t *c = NULL;
    if ((rc = kvs__seq_new(s, child, &p->geo, &c)))
        goto out;
    atomic_store(&c->ttl_s, atomic_load(&p->ttl_s));
    size_t rb = p->row_bytes;
    for (uint32_t l = 0; l < p->geo.n_layers && !rc; l++) {
        layer_t *PL = &p->layers[l], *CL = &c->layers[l];
        if ((rc = kvs__layer_lock(s, p, PL, 0)))
            break;
        if (at > PL->tokens)
            rc = kvs__fail(s, KVS_ERANGE,
                           "at_token %llu past the %llu tokens of "
                           "layer %u",
                           (unsigned long long)at,
                           (unsigned long long)PL->tokens, l);
        /* Heads finish their builds at different times: share only what
         * every head of the layer has built, so the child's heads agree. */
        uint64_t share_end = at;
        for (uint32_t h = 0; h < p->geo.n_kv_heads; h++) {
            uint64_t e = shareable_end(&PL->heads[h], at);
            if (e < share_end)
                share_end = e;
        }
        for (uint32_t h = 0; h < p->geo.n_kv_heads && !rc; h++)
            if ((rc = fork_head(&PL->heads[h], &CL->heads[h], rb, share_end,
                                at)))
                rc = kvs__fail(s, rc, "fork of layer %u", l);
        kvs__rwunlock(&PL->lock);
        CL->tokens = at;
    }
    if (rc)
        goto out;
    /* meta_mu across the storage write (as create); lookups go on */
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    int exists = kvs__map_find(s, child) != NULL;
    int admit = exists ? 0 : kvs__seq_admit(s, &p->geo);
    kvs__unlock(&s->map_mu);
    if (exists) {
        kvs__unlock(&s->meta_mu);
        rc = kvs__fail(s, KVS_EEXIST, "sequence %llu already exists",
                       (unsigned long long)child);
        goto out;
    }
    if (admit) {
        kvs__unlock(&s->meta_mu);
        rc = admit;
        goto out;
    }
    if (s->db) {
        char err[256] = "";
        if ((rc = kvs__seq_persist(s, c, err, sizeof err))) {
            kvs__unlock(&s->meta_mu);
            rc = kvs__fail(s, rc, "storing the fork: %s", err);
            goto out;
        }
    }
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    if ((rc = kvs__map_insert(s, c))) {
        kvs__unlock(&s->map_mu);
        kvs__unlock(&s->meta_mu);
        rc = kvs__fail(s, rc, "sequence table");
        goto out;
    }
    atomic_fetch_add(&c->refs, 1); /* a racing drop must not free it */
    kvs__unlock(&s->map_mu);
    kvs__unlock(&s->meta_mu);
    /* The copied rows may hold a whole segment: index them as usual. */
    for (uint32_t l = 0; l < c->geo.n_layers; l++) {
        kvs__wrlock(&c->layers[l].lock, l);
        kvs__bytes_add(s, c, kvs__layer_bytes(c, &c->layers[l]));
        for (uint32_t h = 0; h < c->geo.n_kv_heads; h++)
            kvs__maybe_build(s, c, l, h);
        kvs__rwunlock(&c->layers[l].lock);
    }
    kvs__seq_unref(c);
    c = NULL;
out:
    if (c)
        kvs__seq_free(c);
    kvs__seq_unref(p);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Introspection                                                          */

void kvs__seq_account(const seq_t *q, kvs_seq_info_t *info) {
    memset(info, 0, sizeof *info);
    info->geometry = q->geo;
    info->tokens_min = UINT64_MAX;
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        layer_t *L = &q->layers[l];
        kvs__rdlock(&L->lock, l);
        if (L->tokens < info->tokens_min)
            info->tokens_min = L->tokens;
        if (L->tokens > info->tokens_max)
            info->tokens_max = L->tokens;
        for (uint32_t h = 0; h < q->geo.n_kv_heads; h++) {
            const head_t *hd = &L->heads[h];
            info->segments += hd->n_segments;
            info->indexed_tokens += hd->indexed_tokens;
            for (uint32_t i = 0; i < hd->n_segments; i++) {
                info->bytes += kvs_segment_bytes(hd->segments[i]);
                info->index_bytes += kvs_segment_index_bytes(hd->segments[i]);
            }
            info->bytes += 2 * hd->tail_cap * q->row_bytes;
        }
        kvs__rwunlock(&L->lock);
    }
    if (q->geo.n_kv_heads)
        info->indexed_tokens /= q->geo.n_kv_heads;
    info->builds_pending = atomic_load(&q->builds_pending);
    info->resident = !atomic_load(&q->evicted);
}

int kvs_seq_info(kvs_store_t *s, uint64_t id, kvs_seq_info_t *info) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!info)
        return kvs__fail(s, KVS_EINVAL, "info is NULL");
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    kvs__seq_account(q, info);
    kvs__seq_unref(q);
    return 0;
}

int kvs_seq_shape(kvs_store_t *s, uint64_t id, uint32_t layer,
                  kvs_geometry_t *geometry, uint64_t *layer_tokens) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!geometry)
        return kvs__fail(s, KVS_EINVAL, "geometry is NULL");
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    *geometry = q->geo;
    if (layer_tokens) {
        if (layer >= q->geo.n_layers) {
            rc = kvs__fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)",
                           layer, q->geo.n_layers);
        } else {
            /* tokens is kept while evicted: no page-in needed. */
            layer_t *L = &q->layers[layer];
            kvs__rdlock(&L->lock, layer);
            *layer_tokens = L->tokens;
            kvs__rwunlock(&L->lock);
        }
    }
    kvs__seq_unref(q);
    return rc;
}

int kvs_seq_wait_indexed(kvs_store_t *s, uint64_t id) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    while (atomic_load(&q->builds_pending) > 0 && !atomic_load(&q->dropped) &&
           !s->stopping)
        pthread_cond_wait(&s->build_done, &s->build_mu);
    kvs__unlock(&s->build_mu);
    kvs__seq_unref(q);
    return 0;
}

int kvs_store_list(kvs_store_t *s, uint64_t *ids, size_t cap, size_t *n_out) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!n_out || (cap && !ids))
        return kvs__fail(s, KVS_EINVAL, "ids or n_out is NULL");
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    size_t k = 0;
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i]; q; q = q->next) {
            if (atomic_load(&q->unlinking))
                continue; /* as lookups: a drop is being written */
            if (k < cap)
                ids[k] = q->id;
            k++;
        }
    kvs__unlock(&s->map_mu);
    *n_out = k;
    return 0;
}
