/*
 * engine.c: libkvstore, the in-process store (include/kvstore.h).
 *
 * A store holds sequences in a hash table keyed by id. A sequence has one
 * layer_t per model layer, each guarded by a reader-writer lock and holding
 * one head_t per KV head: that head's built segments (immutable, from
 * index/) and its unindexed tail in token order.
 *
 * Appends copy into the tails under the layer's write lock. When a head's
 * tail holds a whole segment a build job is queued; builder threads copy the
 * segment's rows out under the read lock, run k-means with no lock held,
 * and publish the segment under the write lock. One build per head is in
 * flight at a time, so segments stay in position order.
 *
 * search/attend take the layer's read lock for the whole call and fan the
 * KV heads out over the worker pool; each thread keeps its own scratch.
 * Sequences are reference counted: a drop unlinks the sequence at once and
 * frees it when the last running call or build job lets go.
 */
#include "kvstore.h"

#include "engine/gpu.h"
#include "engine/persist.h"
#include "engine/pool.h"
#include "index/kvs_index.h"
#include "kernels/kvs_kernels.h"

#include <cblas.h> /* openblas_set_num_threads */
#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------- */
/* Types                                                                  */

typedef struct head_s {
    kvs_segment_t **segments;
    uint32_t n_segments, segments_cap;
    uint64_t indexed_tokens;
    /* Tail: rows tail_start .. tail_start + tail_len of the buffers. */
    char *tail_keys, *tail_values;
    uint64_t tail_start, tail_len, tail_cap; /* in tokens */
    int build_inflight;
} head_t;

typedef struct layer_s {
    pthread_rwlock_t lock;
    /* Serialises appends to this layer, so the storage write (which may
     * wait for an fsync) happens outside the rwlock readers need. */
    pthread_mutex_t append_mu;
    head_t *heads; /* [n_kv_heads] */
    uint64_t tokens;
    /* 0 while the sequence is evicted: heads are empty, tokens still
     * counts what storage holds. Read and written under `lock`. */
    int resident;
    /* Rows reserved by an append whose storage write is in flight (the
     * rwlock is released meanwhile): a shrink must keep room for them. */
    uint64_t appending;
    /* GPU mirror of the index (engine/gpu.h), NULL until a GPU attend;
     * freed under the write lock (eviction, drop, free). */
    kvs__gpu_layer_t *_Atomic gpu;
} layer_t;

typedef struct seq_s {
    uint64_t id;
    kvs_geometry_t geo;
    size_t row_bytes; /* head_dim * dtype size */
    atomic_int refs;
    atomic_int dropped;
    /* A drop is deleting the stored sequence: lookups see none (set and
     * cleared under map_mu, see drop_seq) */
    atomic_int unlinking;
    atomic_uint_fast64_t builds_pending;
    char *damage;            /* non-NULL: quarantined, and why */
    atomic_uint ttl_s;       /* 0: never expires */
    pthread_mutex_t page_mu; /* serialises evict / page-in */
    atomic_int evicted;
    atomic_int_fast64_t bytes;        /* counted against memory_bytes */
    atomic_uint_fast64_t last_access; /* monotonic ms */
    layer_t *layers;
    kvs__gpu_t *gpu; /* the store's, for freeing mirrors */
    struct seq_s *next; /* hash chain */
} seq_t;

typedef struct build_job_s {
    seq_t *seq;
    uint32_t layer, head;
    struct build_job_s *next;
} build_job_t;

struct kvs_store_s {
    kvs_options_t opts;
    char *data_dir;
    kvs__db_t *db; /* NULL: memory only */
    kvs__pool_t *pool;
    pthread_key_t scratch_key;
    /* Every thread's scratch, so that close frees those of threads that
     * are still alive (key destructors stop running once it is deleted). */
    pthread_mutex_t scratch_mu;
    struct scratch_node_s *scratches;

    /* Lock order: meta_mu, then append_mu (layer order), then map_mu.
     * meta_mu serialises the sequence-table changes that write storage
     * (create, fork, drop, set_ttl, expiry) and is held across their
     * writes, so that those of one id stay in order; map_mu guards the
     * table itself and is never held across I/O, so lookups (every call)
     * never wait for an fsync. */
    pthread_mutex_t meta_mu;
    pthread_mutex_t map_mu;
    seq_t **buckets;
    size_t n_buckets, n_seqs;

    /* Build queue. */
    pthread_mutex_t build_mu;
    pthread_cond_t build_cv;   /* work queued or stopping */
    pthread_cond_t build_done; /* some build finished */
    build_job_t *q_head, *q_tail;
    atomic_int stopping;
    pthread_t *builders;
    uint32_t n_builders;
    uint64_t builds_pending, builds_done, build_keys;
    double build_seconds;
    uint64_t expired;

    /* Memory budget. */
    atomic_int_fast64_t resident_bytes;
    atomic_uint_fast64_t evictions, page_ins;

    /* GPU attend path (NULL: CPU only; gpu_info says why). */
    kvs__gpu_t *gpu;
    char gpu_info[192];

    /* Housekeeping: TTL expiry. */
    pthread_t keeper;
    int keeper_running;
    pthread_cond_t keeper_cv;
};

/* Memory budget (defined below, used throughout). */
static void bytes_add(kvs_store_t *s, seq_t *q, int64_t delta);
static int64_t layer_bytes(const seq_t *q, const layer_t *L);
static void enforce_budget(kvs_store_t *s, const seq_t *keep);
static int page_in(kvs_store_t *s, seq_t *q);
static int layer_lock(kvs_store_t *s, seq_t *q, layer_t *L, int write);

/* ---------------------------------------------------------------------- */
/* Errors: one message per (thread, store).                               */

static _Thread_local const kvs_store_t *err_store;
static _Thread_local char err_msg[256];

__attribute__((format(printf, 3, 4))) static int
fail(const kvs_store_t *store, int code, const char *fmt, ...) {
    err_store = store;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return code;
}

static void clear_err(const kvs_store_t *store) {
    if (err_store == store)
        err_msg[0] = 0;
}

const char *kvs_store_errmsg(const kvs_store_t *store) {
    return err_store == store ? err_msg : "";
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------- */
/* Options                                                                */

void kvs_query_params_default(kvs_query_params_t *p) {
    memset(p, 0, sizeof *p);
    p->mode = KVS_MODE_WAVE;
    p->budget = KVS_BUDGET_FIXED;
    p->retrieval_fraction = 0.018f;
    p->estimation_fraction = 0.232f;
    p->epsilon = 0.02f;
    p->scale = 0;
}

void kvs_options_default(kvs_options_t *o) {
    memset(o, 0, sizeof *o);
    o->n_threads = 0;
    o->n_build_threads = 1;
    o->segment_tokens = 8192;
    o->cluster_tokens = 16;
    o->kmeans_iters = 10;
    o->sink_tokens = 4;
    o->window_tokens = 64;
    o->sync = KVS_SYNC_BATCH;
    o->sync_interval_ms = 2;
    o->cuda_device = -1;
    o->cuda_cache_fraction = 0.1f;
    o->cuda_build = 1;
    kvs_query_params_default(&o->defaults);
}

static int check_options(kvs_store_t *s, const kvs_options_t *o) {
    if (o->cluster_tokens == 0 || o->kmeans_iters == 0)
        return fail(s, KVS_EINVAL,
                    "cluster_tokens and kmeans_iters must be > 0");
    if (o->segment_tokens < o->cluster_tokens ||
        o->segment_tokens <= (uint64_t)o->sink_tokens + o->window_tokens)
        return fail(s, KVS_EINVAL,
                    "segment_tokens (%u) must exceed sink_tokens + "
                    "window_tokens (%u) and cluster_tokens",
                    o->segment_tokens, o->sink_tokens + o->window_tokens);
    if (o->segment_tokens > (1u << 24))
        return fail(s, KVS_EINVAL, "segment_tokens above 16M");
    const kvs_query_params_t *d = &o->defaults;
    if (!(d->retrieval_fraction >= 0 && d->retrieval_fraction <= 1) ||
        !(d->estimation_fraction >= 0 && d->estimation_fraction <= 1) ||
        !(d->epsilon >= 0 && d->epsilon <= 1) || !(d->scale >= 0) ||
        !isfinite(d->scale))
        return fail(s, KVS_EINVAL, "default query params out of range");
    if (o->n_threads > 1024 || o->n_build_threads > 64)
        return fail(s, KVS_EINVAL, "too many threads");
    if (o->cuda_device >= 0 &&
        !(o->cuda_cache_fraction > 0 && o->cuda_cache_fraction <= 1))
        return fail(s, KVS_EINVAL, "cuda_cache_fraction must be in (0, 1]");
    if (o->cuda_kv != KVS_CUDA_KV_AUTO && o->cuda_kv != KVS_CUDA_KV_HOST)
        return fail(s, KVS_EINVAL, "unknown cuda_kv %d", (int)o->cuda_kv);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Sequences                                                              */

/* Segments are shared between forks: the last owner frees. */
static void segment_unref(kvs_segment_t *seg) {
    if (__atomic_fetch_sub(&seg->extra_refs, 1, __ATOMIC_ACQ_REL) == 0)
        kvs_segment_free(seg);
}

static void head_release(head_t *h) {
    for (uint32_t i = 0; i < h->n_segments; i++)
        segment_unref(h->segments[i]);
    free(h->segments);
    free(h->tail_keys);
    free(h->tail_values);
}

static void seq_free(seq_t *q) {
    if (q->layers) {
        for (uint32_t l = 0; l < q->geo.n_layers; l++) {
            layer_t *L = &q->layers[l];
            if (!L->heads)
                continue;
            for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
                head_release(&L->heads[h]);
            kvs__gpu_layer_free(q->gpu, atomic_load(&L->gpu));
            free(L->heads);
            pthread_rwlock_destroy(&L->lock);
            pthread_mutex_destroy(&L->append_mu);
        }
        free(q->layers);
    }
    free(q->damage);
    pthread_mutex_destroy(&q->page_mu);
    free(q);
}

static void seq_unref(seq_t *q) {
    if (atomic_fetch_sub(&q->refs, 1) == 1)
        seq_free(q);
}

static size_t bucket_of(const kvs_store_t *s, uint64_t id) {
    uint64_t x = id * 0x9e3779b97f4a7c15ull;
    return (size_t)(x >> 17) & (s->n_buckets - 1);
}

/* Look `id` up and take a reference; NULL when unknown. */
static seq_t *seq_get(kvs_store_t *s, uint64_t id) {
    pthread_mutex_lock(&s->map_mu);
    seq_t *q = s->buckets[bucket_of(s, id)];
    while (q && (q->id != id || atomic_load(&q->unlinking)))
        q = q->next;
    if (q)
        atomic_fetch_add(&q->refs, 1);
    pthread_mutex_unlock(&s->map_mu);
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

static int check_geometry(kvs_store_t *s, const kvs_geometry_t *g) {
    if (!g)
        return fail(s, KVS_EINVAL, "geometry is NULL");
    if (g->n_layers == 0 || g->n_layers > KVS_MAX_LAYERS)
        return fail(s, KVS_EINVAL, "n_layers %u outside 1..%u", g->n_layers,
                    KVS_MAX_LAYERS);
    if (g->n_kv_heads == 0 || g->n_kv_heads > KVS_MAX_HEADS ||
        g->n_q_heads == 0 || g->n_q_heads > KVS_MAX_HEADS)
        return fail(s, KVS_EINVAL, "head counts outside 1..%u", KVS_MAX_HEADS);
    if (g->n_q_heads % g->n_kv_heads)
        return fail(s, KVS_EINVAL,
                    "n_q_heads %u is not a multiple of "
                    "n_kv_heads %u",
                    g->n_q_heads, g->n_kv_heads);
    if (g->n_q_heads / g->n_kv_heads > KVS_KERNEL_MAX_Q)
        return fail(s, KVS_EINVAL, "more than %d query heads per KV head",
                    KVS_KERNEL_MAX_Q);
    if (g->head_dim == 0 || g->head_dim > KVS_MAX_HEAD_DIM)
        return fail(s, KVS_EINVAL, "head_dim %u outside 1..%u", g->head_dim,
                    KVS_MAX_HEAD_DIM);
    if (kvs_dtype_size(g->dtype) == 0)
        return fail(s, KVS_EINVAL, "unknown dtype %d", (int)g->dtype);
    return 0;
}

/* A new, empty, unlinked sequence. */
static int seq_new(kvs_store_t *s, uint64_t id, const kvs_geometry_t *geo,
                   seq_t **out) {
    seq_t *q = calloc(1, sizeof *q);
    if (!q)
        return fail(s, KVS_ENOMEM, "sequence");
    q->id = id;
    q->geo = *geo;
    q->gpu = s->gpu;
    q->row_bytes = (size_t)geo->head_dim * kvs_dtype_size(geo->dtype);
    atomic_init(&q->refs, 1);
    atomic_init(&q->ttl_s, 0);
    atomic_init(&q->last_access, now_ms());
    atomic_init(&q->evicted, 0);
    atomic_init(&q->bytes, 0);
    pthread_mutex_init(&q->page_mu, NULL);
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
    seq_free(q);
    return fail(s, KVS_ENOMEM, "sequence");
}

/* Caller holds map_mu; `id` is not in the table. */
static int map_insert(kvs_store_t *s, seq_t *q) {
    if (s->n_seqs + 1 > s->n_buckets && map_grow(s))
        return KVS_ENOMEM;
    size_t b = bucket_of(s, q->id);
    q->next = s->buckets[b];
    s->buckets[b] = q;
    s->n_seqs++;
    return 0;
}

static seq_t *map_find(kvs_store_t *s, uint64_t id) {
    seq_t *q = s->buckets[bucket_of(s, id)];
    while (q && q->id != id)
        q = q->next;
    return q;
}

int kvs_seq_create(kvs_store_t *s, uint64_t id, const kvs_geometry_t *geo) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    int rc = check_geometry(s, geo);
    if (rc)
        return rc;
    seq_t *q;
    if ((rc = seq_new(s, id, geo, &q)))
        return rc;
    /* meta_mu across the storage write: a racing create or drop of the
     * same id cannot reorder with it; lookups go on meanwhile. */
    pthread_mutex_lock(&s->meta_mu);
    pthread_mutex_lock(&s->map_mu);
    int exists = map_find(s, id) != NULL;
    pthread_mutex_unlock(&s->map_mu);
    if (exists) {
        rc = fail(s, KVS_EEXIST, "sequence %llu already exists",
                  (unsigned long long)id);
    } else if (s->db) {
        char err[256];
        if ((rc = kvs__db_create_seq(s->db, id, geo, 0, err, sizeof err)))
            rc = fail(s, rc, "%s", err);
    }
    if (!rc) {
        pthread_mutex_lock(&s->map_mu);
        if ((rc = map_insert(s, q)))
            rc = fail(s, rc, "sequence table");
        pthread_mutex_unlock(&s->map_mu);
    }
    pthread_mutex_unlock(&s->meta_mu);
    if (rc)
        seq_free(q);
    return rc;
}

static int seq_expired(seq_t *q, uint64_t now);

/*
 * Delete `q` from storage and unlink it from the table. Caller holds
 * meta_mu and a reference (not map_mu); on success the table's reference
 * is the caller's to drop as well. Every layer's append_mu is taken before
 * the storage delete and `dropped` is set under them, so no append or
 * segment write can land under the id after its records are gone. While
 * the delete is written, `unlinking` hides the sequence from lookups. With
 * `if_expired`, a sequence used since it was judged expired is kept
 * (KVS_EBUSY).
 */
static int drop_seq(kvs_store_t *s, seq_t *q, int if_expired) {
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        pthread_mutex_lock(&q->layers[l].append_mu);
    int rc = 0;
    pthread_mutex_lock(&s->map_mu);
    if (if_expired && !seq_expired(q, now_ms()))
        rc = KVS_EBUSY;
    else
        atomic_store(&q->unlinking, 1);
    pthread_mutex_unlock(&s->map_mu);
    if (!rc && s->db) {
        char err[256];
        if ((rc = kvs__db_drop_seq(s->db, q->id, err, sizeof err)))
            fail(s, rc, "%s", err);
    }
    pthread_mutex_lock(&s->map_mu);
    if (!rc) {
        atomic_store(&q->dropped, 1);
        seq_t **pp = &s->buckets[bucket_of(s, q->id)];
        while (*pp != q)
            pp = &(*pp)->next;
        *pp = q->next;
        s->n_seqs--;
        atomic_fetch_sub(&s->resident_bytes, atomic_load(&q->bytes));
    }
    atomic_store(&q->unlinking, 0);
    pthread_mutex_unlock(&s->map_mu);
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        pthread_mutex_unlock(&q->layers[l].append_mu);
    return rc;
}

int kvs_seq_drop(kvs_store_t *s, uint64_t id) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    pthread_mutex_lock(&s->meta_mu);
    seq_t *q = seq_get(s, id);
    if (!q) {
        pthread_mutex_unlock(&s->meta_mu);
        return fail(s, KVS_ENOSEQ, "unknown sequence %llu",
                    (unsigned long long)id);
    }
    int rc = drop_seq(s, q, 0);
    pthread_mutex_unlock(&s->meta_mu);
    if (rc) {
        seq_unref(q);
        return rc;
    }
    seq_unref(q); /* the lookup's reference; the table's below */
    /* Wake kvs_seq_wait_indexed callers: a dropped sequence waits no more. */
    pthread_mutex_lock(&s->build_mu);
    pthread_cond_broadcast(&s->build_done);
    pthread_mutex_unlock(&s->build_mu);
    seq_unref(q);
    return 0;
}

/* Look up a usable sequence; `use` marks it accessed for its TTL
 * (inspecting a sequence through info or wait does not keep it alive). */
static seq_t *seq_lookup_use(kvs_store_t *s, uint64_t id, int *rc, int use) {
    seq_t *q = seq_get(s, id);
    if (!q) {
        *rc = fail(s, KVS_ENOSEQ, "unknown sequence %llu",
                   (unsigned long long)id);
    } else if (q->damage) {
        *rc = fail(s, KVS_EQUARANTINED, "sequence %llu is quarantined: %s",
                   (unsigned long long)id, q->damage);
        seq_unref(q);
        q = NULL;
    } else if (use) {
        atomic_store(&q->last_access, now_ms());
    }
    return q;
}

static seq_t *seq_lookup(kvs_store_t *s, uint64_t id, int *rc) {
    return seq_lookup_use(s, id, rc, 1);
}

/* For calls that inspect a sequence without using it. */
static seq_t *seq_peek(kvs_store_t *s, uint64_t id, int *rc) {
    return seq_lookup_use(s, id, rc, 0);
}

int kvs_seq_set_ttl(kvs_store_t *s, uint64_t id, uint32_t ttl_seconds) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    /* Under meta_mu: the rewrite of the metadata must not overtake a drop
     * of the same id. */
    pthread_mutex_lock(&s->meta_mu);
    if (atomic_load(&q->dropped)) {
        rc = fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                  (unsigned long long)id);
    } else if (s->db) {
        char err[256];
        rc = kvs__db_create_seq(s->db, id, &q->geo, ttl_seconds, err,
                                sizeof err);
        if (rc)
            rc = fail(s, rc, "%s", err);
    }
    if (!rc)
        atomic_store(&q->ttl_s, ttl_seconds);
    pthread_mutex_unlock(&s->meta_mu);
    seq_unref(q);
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
        uint64_t now = now_ms();
        seq_t *victim = NULL;
        pthread_mutex_lock(&s->meta_mu);
        pthread_mutex_lock(&s->map_mu);
        for (size_t b = 0; b < s->n_buckets && !victim; b++)
            for (seq_t *q = s->buckets[b]; q; q = q->next)
                if (seq_expired(q, now)) {
                    victim = q;
                    atomic_fetch_add(&q->refs, 1);
                    break;
                }
        pthread_mutex_unlock(&s->map_mu);
        int rc = victim ? drop_seq(s, victim, 1) : 0;
        pthread_mutex_unlock(&s->meta_mu);
        if (!victim)
            break;
        seq_unref(victim); /* the scan's reference */
        if (rc == 0) {
            fprintf(stderr,
                    "kvstore: sequence %llu expired (idle past its "
                    "TTL)\n",
                    (unsigned long long)victim->id);
            n++;
            seq_unref(victim); /* the table's */
        } else if (rc != KVS_EBUSY) {
            /* Storage refused the drop: leave it and stop trying now. */
            break;
        }
    }
    pthread_mutex_lock(&s->build_mu);
    s->expired += n;
    if (n)
        pthread_cond_broadcast(&s->build_done);
    pthread_mutex_unlock(&s->build_mu);
    if (n_expired)
        *n_expired = n;
    return 0;
}

static void *keeper_main(void *arg) {
    kvs_store_t *s = arg;
    pthread_mutex_lock(&s->build_mu);
    while (!atomic_load(&s->stopping)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        pthread_cond_timedwait(&s->keeper_cv, &s->build_mu, &ts);
        if (atomic_load(&s->stopping))
            break;
        pthread_mutex_unlock(&s->build_mu);
        kvs_store_expire(s, NULL);
        enforce_budget(s, NULL);
        pthread_mutex_lock(&s->build_mu);
    }
    pthread_mutex_unlock(&s->build_mu);
    return NULL;
}

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
    pthread_mutex_lock(&s->build_mu);
    if (s->q_tail)
        s->q_tail->next = j;
    else
        s->q_head = j;
    s->q_tail = j;
    s->builds_pending++;
    pthread_cond_signal(&s->build_cv);
    pthread_mutex_unlock(&s->build_mu);
}

/* Caller holds the layer's write lock. */
static void maybe_build(kvs_store_t *s, seq_t *q, uint32_t layer,
                        uint32_t head) {
    head_t *h = &q->layers[layer].heads[head];
    if (!h->build_inflight && h->tail_len >= s->opts.segment_tokens &&
        !s->stopping)
        enqueue_build(s, q, layer, head);
}

/* After a burst of appends the tail buffer may be far larger than what is
 * left in it once segments are published: give the memory back. Caller
 * holds the layer's write lock. */
static void head_shrink(head_t *h, size_t rb, uint32_t segment_tokens,
                        uint64_t appending) {
    uint64_t keep = 2 * (uint64_t)segment_tokens;
    if (keep < h->tail_len + appending)
        keep = h->tail_len + appending;
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
    pthread_mutex_lock(&s->build_mu);
    s->builds_pending--;
    if (keys) {
        s->builds_done++;
        s->build_keys += keys;
        s->build_seconds += secs;
    }
    pthread_cond_broadcast(&s->build_done);
    pthread_mutex_unlock(&s->build_mu);
    seq_unref(q);
}

static void run_build(kvs_store_t *s, build_job_t *j) {
    seq_t *q = j->seq;
    layer_t *L = &q->layers[j->layer];
    head_t *h = &L->heads[j->head];
    uint32_t n = s->opts.segment_tokens;
    size_t bytes = (size_t)n * q->row_bytes;
    char *keys = malloc(bytes), *vals = malloc(bytes);
    double t0 = now_s();
    kvs_segment_t *seg = NULL;
    uint64_t first = 0;
    int rc = KVS_ENOMEM;

    if (keys && vals && !atomic_load(&q->dropped)) {
        pthread_rwlock_rdlock(&L->lock);
        first = h->indexed_tokens;
        memcpy(keys, h->tail_keys + h->tail_start * q->row_bytes, bytes);
        memcpy(vals, h->tail_values + h->tail_start * q->row_bytes, bytes);
        pthread_rwlock_unlock(&L->lock);
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
            rc = label ? kvs__gpu_cluster(s->gpu, q->geo.dtype,
                                          q->geo.head_dim, n, keys, &bp,
                                          label, &k)
                       : KVS_ENOMEM;
            if (rc == 0)
                rc = kvs_segment_from_labels(&bp, q->geo.dtype,
                                             q->geo.head_dim, first, n, keys,
                                             vals, k, label, &seg, err,
                                             sizeof err);
            free(label);
            if (rc && rc != KVS_ENOTSUP && rc != KVS_ENOTFINITE)
                fprintf(stderr,
                        "kvstore: GPU clustering failed for sequence %llu "
                        "layer %u head %u: %s; building on the CPU\n",
                        (unsigned long long)q->id, j->layer, j->head,
                        kvs_strerror(rc));
        }
        if (rc)
            rc = kvs_segment_build(&bp, q->geo.dtype, q->geo.head_dim, first,
                                   n, keys, vals, &seg, err, sizeof err);
        if (rc)
            fprintf(stderr,
                    "kvstore: segment build failed for sequence %llu "
                    "layer %u head %u: %s (%s)\n",
                    (unsigned long long)q->id, j->layer, j->head,
                    kvs_strerror(rc), err);
    }
    free(keys);
    free(vals);
    if (seg && s->db) {
        /* Under append_mu: a drop takes it before deleting the sequence's
         * records, so the segment cannot land under a dropped id (or a new
         * sequence that reuses it). A failed write leaves the rows stored:
         * the segment still serves from memory, rebuilt after a restart. */
        pthread_mutex_lock(&L->append_mu);
        char err[256];
        if (!atomic_load(&q->dropped) &&
            kvs__db_put_segment(s->db, q->id, j->layer, j->head, seg, err,
                                sizeof err))
            fprintf(stderr, "kvstore: %s\n", err);
        pthread_mutex_unlock(&L->append_mu);
    }

    pthread_rwlock_wrlock(&L->lock);
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
        bytes_add(s, q, (int64_t)kvs_segment_index_bytes(seg));
    }
    h->build_inflight = 0;
    /* A failed build is not retried in a loop: the tail stays exact and the
     * next append tries again. */
    if (seg)
        maybe_build(s, q, j->layer, j->head);
    pthread_rwlock_unlock(&L->lock);
    build_finish(s, q, now_s() - t0, keys_done);
}

static void *builder(void *arg) {
    kvs_store_t *s = arg;
    pthread_mutex_lock(&s->build_mu);
    for (;;) {
        while (!s->stopping && !s->q_head)
            pthread_cond_wait(&s->build_cv, &s->build_mu);
        if (s->stopping)
            break;
        build_job_t *j = s->q_head;
        s->q_head = j->next;
        if (!s->q_head)
            s->q_tail = NULL;
        pthread_mutex_unlock(&s->build_mu);
        run_build(s, j);
        free(j);
        pthread_mutex_lock(&s->build_mu);
    }
    pthread_mutex_unlock(&s->build_mu);
    return NULL;
}

/* ---------------------------------------------------------------------- */
/* Loading a data directory                                               */

static int head_reserve(head_t *h, size_t row_bytes, uint64_t more);

static int load_seq(void *ctx, uint64_t id, const kvs_geometry_t *g,
                    uint32_t ttl_s) {
    kvs_store_t *s = ctx;
    if (map_find(s, id))
        return KVS_EEXIST;
    int rc = check_geometry(s, g);
    seq_t *q;
    if (rc || (rc = seq_new(s, id, g, &q)))
        return rc;
    atomic_store(&q->ttl_s, ttl_s);
    /* Not in memory until its records are loaded (load_seq_done): a budget
     * enforced meanwhile must not pick it. */
    atomic_store(&q->evicted, 1);
    for (uint32_t l = 0; l < g->n_layers; l++)
        q->layers[l].resident = 0;
    if ((rc = map_insert(s, q)))
        seq_free(q);
    return rc;
}

/* The head a stored record belongs to, or NULL when it names no head of
 * a usable sequence. */
static head_t *record_head(seq_t *q, uint32_t layer, uint32_t head) {
    if (!q || q->damage || layer >= q->geo.n_layers ||
        head >= q->geo.n_kv_heads)
        return NULL;
    return &q->layers[layer].heads[head];
}

/* Segments must continue the head exactly where it stands. */
static int fill_segment(kvs_store_t *s, seq_t *q, uint32_t layer, uint32_t head,
                        kvs_segment_t *seg) {
    head_t *h = record_head(q, layer, head);
    int rc = KVS_ECORRUPT;
    if (!h || seg->dtype != q->geo.dtype || seg->d != q->geo.head_dim ||
        seg->first_pos != h->indexed_tokens || h->tail_len != 0 ||
        seg->n_tokens != s->opts.segment_tokens)
        goto fail;
    if (h->n_segments == h->segments_cap) {
        uint32_t cap = h->segments_cap ? h->segments_cap * 2 : 8;
        kvs_segment_t **p = realloc(h->segments, cap * sizeof *p);
        if (!p) {
            rc = KVS_ENOMEM;
            goto fail;
        }
        h->segments = p;
        h->segments_cap = cap;
    }
    h->segments[h->n_segments++] = seg;
    h->indexed_tokens += seg->n_tokens;
    return 0;
fail:
    kvs_segment_free(seg);
    return rc;
}

static int fill_rows(seq_t *q, uint32_t layer, uint32_t head, uint64_t pos,
                     uint32_t n, size_t half, const void *keys,
                     const void *values) {
    head_t *h = record_head(q, layer, head);
    if (!h || half != (size_t)n * q->row_bytes ||
        pos != h->indexed_tokens + h->tail_len)
        return KVS_ECORRUPT;
    int rc = head_reserve(h, q->row_bytes, n);
    if (rc)
        return rc;
    size_t at = (h->tail_start + h->tail_len) * q->row_bytes;
    memcpy(h->tail_keys + at, keys, half);
    memcpy(h->tail_values + at, values, half);
    h->tail_len += n;
    return 0;
}

static int load_segment(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                        kvs_segment_t *seg) {
    kvs_store_t *s = ctx;
    return fill_segment(s, map_find(s, id), layer, head, seg);
}

static int load_rows(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                     uint64_t pos, uint32_t n, size_t half, const void *keys,
                     const void *values) {
    kvs_store_t *s = ctx;
    return fill_rows(map_find(s, id), layer, head, pos, n, half, keys, values);
}

/* Page-in callbacks: the sequence is known, not looked up. */
typedef struct page_ctx_s {
    kvs_store_t *s;
    seq_t *q;
} page_ctx_t;

static int page_segment(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                        kvs_segment_t *seg) {
    page_ctx_t *c = ctx;
    (void)id;
    return fill_segment(c->s, c->q, layer, head, seg);
}

static int page_rows(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                     uint64_t pos, uint32_t n, size_t half, const void *keys,
                     const void *values) {
    page_ctx_t *c = ctx;
    (void)id;
    return fill_rows(c->q, layer, head, pos, n, half, keys, values);
}

static void page_damaged(void *ctx, uint64_t id, const char *why) {
    page_ctx_t *c = ctx;
    fprintf(stderr, "kvstore: sequence %llu quarantined at page-in: %s\n",
            (unsigned long long)id, why);
    if (!c->q->damage)
        c->q->damage = strdup(why ? why : "damaged");
}

static void load_damaged(void *ctx, uint64_t id, const char *why) {
    kvs_store_t *s = ctx;
    seq_t *q = map_find(s, id);
    fprintf(stderr, "kvstore: sequence %llu quarantined: %s\n",
            (unsigned long long)id, why);
    if (q && !q->damage)
        q->damage = strdup(why ? why : "damaged");
}

/* After a sequence's records are loaded: every head of a layer must hold
 * the same tokens; then its bytes count against the budget, which may evict
 * earlier sequences already (so an open never holds more than the budget
 * plus one sequence). */
static void load_seq_done(void *ctx, uint64_t id) {
    kvs_store_t *s = ctx;
    seq_t *q = map_find(s, id);
    if (!q || q->damage)
        return;
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        layer_t *L = &q->layers[l];
        uint64_t t0 = L->heads[0].indexed_tokens + L->heads[0].tail_len;
        for (uint32_t h = 1; h < q->geo.n_kv_heads; h++)
            if (L->heads[h].indexed_tokens + L->heads[h].tail_len != t0) {
                char why[128];
                snprintf(why, sizeof why,
                         "layer %u: KV heads hold different token counts", l);
                load_damaged(s, q->id, why);
            }
        L->tokens = t0;
        L->resident = 1;
        bytes_add(s, q, layer_bytes(q, L));
    }
    atomic_store(&q->evicted, 0);
    atomic_store(&q->last_access, now_ms());
    enforce_budget(s, q);
}

/* Queue builds for every tail that holds a whole segment. */
static void load_schedule_builds(kvs_store_t *s) {
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next) {
            if (q->damage)
                continue;
            for (uint32_t l = 0; l < q->geo.n_layers; l++) {
                pthread_rwlock_wrlock(&q->layers[l].lock);
                for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
                    maybe_build(s, q, l, h);
                pthread_rwlock_unlock(&q->layers[l].lock);
            }
        }
}

/* ---------------------------------------------------------------------- */
/* Memory budget: eviction to storage and paging back in                  */

static void bytes_add(kvs_store_t *s, seq_t *q, int64_t delta) {
    atomic_fetch_add(&q->bytes, delta);
    /* A dropped sequence's bytes left the store total at the drop: later
     * changes (a finishing build, a racing eviction) must not count. */
    if (!atomic_load(&q->dropped))
        atomic_fetch_add(&s->resident_bytes, delta);
}

/* K/V plus index bytes of one resident layer. Caller holds its lock. */
static int64_t layer_bytes(const seq_t *q, const layer_t *L) {
    int64_t b = 0;
    for (uint32_t h = 0; h < q->geo.n_kv_heads; h++) {
        const head_t *hd = &L->heads[h];
        for (uint32_t i = 0; i < hd->n_segments; i++)
            b += (int64_t)kvs_segment_bytes(hd->segments[i]);
        b += (int64_t)(2 * hd->tail_len * q->row_bytes);
    }
    return b;
}

/* Lock order: page_mu, then every layer's append_mu, then every layer's
 * rwlock, each in layer order. Appends hold one append_mu while their
 * storage write runs, so holding them all means no append is half done. */
static void lock_all(seq_t *q) {
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        pthread_mutex_lock(&q->layers[l].append_mu);
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        pthread_rwlock_wrlock(&q->layers[l].lock);
}

static void unlock_all(seq_t *q) {
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        pthread_rwlock_unlock(&q->layers[l].lock);
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        pthread_mutex_unlock(&q->layers[l].append_mu);
}

/* Free every head's rows and segments, leaving empty heads. Caller holds
 * every layer's write lock (lock_all). */
static void release_rows(seq_t *q) {
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        for (uint32_t h = 0; h < q->geo.n_kv_heads; h++) {
            head_release(&q->layers[l].heads[h]);
            memset(&q->layers[l].heads[h], 0, sizeof(head_t));
        }
        kvs__gpu_layer_free(q->gpu, atomic_exchange(&q->layers[l].gpu, NULL));
    }
}

/* Evict `q` to storage: free every layer's rows and segments. Gives up
 * (returns 0) when a build is pending, since a build job works on the
 * rows without holding the lock throughout. */
static int try_evict(kvs_store_t *s, seq_t *q) {
    int done = 0;
    pthread_mutex_lock(&q->page_mu);
    if (atomic_load(&q->evicted) || q->damage || atomic_load(&q->dropped))
        goto out;
    lock_all(q);
    /* Builds are queued only under a layer's write lock: with all of them
     * held, the count cannot grow under us. A drop may have finished while
     * we waited for the appends: its bytes have left the total already. */
    if (atomic_load(&q->builds_pending) == 0 && !atomic_load(&q->dropped)) {
        release_rows(q);
        for (uint32_t l = 0; l < q->geo.n_layers; l++)
            q->layers[l].resident = 0;
        atomic_store(&q->evicted, 1);
        bytes_add(s, q, -atomic_load(&q->bytes));
        atomic_fetch_add(&s->evictions, 1);
        done = 1;
    }
    unlock_all(q);
    /* glibc keeps freed heap memory (and raises its mmap threshold after
     * large frees): hand what eviction freed back to the system. */
    if (done)
        malloc_trim(0);
out:
    pthread_mutex_unlock(&q->page_mu);
    return done;
}

typedef struct lru_s {
    seq_t *q;
    uint64_t at;
} lru_t;

static int lru_cmp(const void *a, const void *b) {
    uint64_t x = ((const lru_t *)a)->at, y = ((const lru_t *)b)->at;
    return (x > y) - (x < y);
}

/* Evict least recently used sequences (never `keep`) until the resident
 * bytes fit memory_bytes. */
static void enforce_budget(kvs_store_t *s, const seq_t *keep) {
    uint64_t budget = s->opts.memory_bytes;
    if (!budget || atomic_load(&s->resident_bytes) <= (int64_t)budget)
        return;
    pthread_mutex_lock(&s->map_mu);
    size_t n = 0;
    lru_t *c = malloc((s->n_seqs ? s->n_seqs : 1) * sizeof *c);
    if (!c) {
        pthread_mutex_unlock(&s->map_mu);
        return;
    }
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next)
            if (q != keep && !atomic_load(&q->evicted) && !q->damage &&
                !atomic_load(&q->unlinking)) {
                atomic_fetch_add(&q->refs, 1);
                c[n++] = (lru_t){q, atomic_load(&q->last_access)};
            }
    pthread_mutex_unlock(&s->map_mu);
    qsort(c, n, sizeof *c, lru_cmp);
    for (size_t i = 0; i < n; i++) {
        if (atomic_load(&s->resident_bytes) > (int64_t)budget)
            try_evict(s, c[i].q);
        seq_unref(c[i].q);
    }
    free(c);
}

/* Bring an evicted sequence back from storage. */
static int page_in(kvs_store_t *s, seq_t *q) {
    int rc = 0;
    pthread_mutex_lock(&q->page_mu);
    if (!atomic_load(&q->evicted) || !s->db)
        goto out;
    lock_all(q);
    if (atomic_load(&q->dropped)) {
        /* dropped while we waited for its appends: nothing to load, and
         * the id may name a new sequence by now */
        unlock_all(q);
        rc = fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                  (unsigned long long)q->id);
        goto out;
    }
    page_ctx_t ctx = {s, q};
    kvs__db_loader_t loader = {&ctx,      NULL,         page_segment,
                               page_rows, page_damaged, NULL};
    char err[256] = "";
    rc = kvs__db_load_seq(s->db, q->id, &loader, err, sizeof err);
    int64_t bytes = 0;
    for (uint32_t l = 0; l < q->geo.n_layers && !rc && !q->damage; l++) {
        layer_t *L = &q->layers[l];
        for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
            if (L->heads[h].indexed_tokens + L->heads[h].tail_len !=
                L->tokens) {
                snprintf(err, sizeof err,
                         "layer %u head %u: storage holds "
                         "%llu + %llu tokens, %llu were acknowledged",
                         l, h, (unsigned long long)L->heads[h].indexed_tokens,
                         (unsigned long long)L->heads[h].tail_len,
                         (unsigned long long)L->tokens);
                rc = KVS_ECORRUPT;
                break;
            }
        bytes += layer_bytes(q, L);
    }
    if (rc || q->damage) {
        /* Leave it evicted and refuse it: never serve partial data. */
        release_rows(q);
        /* Damage quarantines; a passing failure (memory, I/O) leaves the
         * sequence evicted for the next call to try again. */
        if (!q->damage && rc == KVS_ECORRUPT)
            q->damage = strdup(err[0] ? err : "page-in found damage");
        if (!rc)
            rc = KVS_EQUARANTINED;
        fail(s, rc, "paging sequence %llu in: %s", (unsigned long long)q->id,
             q->damage ? q->damage : err);
    } else {
        for (uint32_t l = 0; l < q->geo.n_layers; l++)
            q->layers[l].resident = 1;
        atomic_store(&q->evicted, 0);
        bytes_add(s, q, bytes);
        atomic_fetch_add(&s->page_ins, 1);
    }
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        layer_t *L = &q->layers[l];
        if (L->resident)
            for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
                maybe_build(s, q, l, h);
    }
    unlock_all(q);
out:
    pthread_mutex_unlock(&q->page_mu);
    if (!rc)
        enforce_budget(s, q);
    return rc;
}

/* Take `L`'s lock with its rows in memory, paging the sequence in first
 * when it was evicted. */
static int layer_lock(kvs_store_t *s, seq_t *q, layer_t *L, int write) {
    for (;;) {
        if (write)
            pthread_rwlock_wrlock(&L->lock);
        else
            pthread_rwlock_rdlock(&L->lock);
        if (L->resident)
            return 0;
        pthread_rwlock_unlock(&L->lock);
        int rc = page_in(s, q);
        if (rc)
            return rc;
    }
}

/* ---------------------------------------------------------------------- */
/* Open / close                                                           */

typedef struct scratch_node_s {
    kvs_scratch_t *sc;
    kvs_store_t *s;
    struct scratch_node_s *prev, *next;
} scratch_node_t;

/* Thread exit: unlink and free this thread's scratch. */
static void scratch_destroy(void *p) {
    scratch_node_t *n = p;
    pthread_mutex_lock(&n->s->scratch_mu);
    if (n->prev)
        n->prev->next = n->next;
    else
        n->s->scratches = n->next;
    if (n->next)
        n->next->prev = n->prev;
    pthread_mutex_unlock(&n->s->scratch_mu);
    kvs_scratch_free(n->sc);
    free(n);
}

static _Thread_local char open_err[320];

const char *kvs_store_open_error(void) {
    return open_err;
}

/* Fail an open: the message goes where kvs_store_open_error() finds it. */
__attribute__((format(printf, 2, 3))) static int
open_fail(int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(open_err, sizeof open_err, fmt, ap);
    va_end(ap);
    return rc;
}

int kvs_store_open(const kvs_options_t *opts, kvs_store_t **out) {
    open_err[0] = 0;
    if (!out)
        return open_fail(KVS_EINVAL, "out is NULL");
    *out = NULL;
    kvs_store_t *s = calloc(1, sizeof *s);
    if (!s)
        return open_fail(KVS_ENOMEM, "store");
    if (opts)
        s->opts = *opts;
    else
        kvs_options_default(&s->opts);
    kvs_query_params_t def;
    kvs_query_params_default(&def);
    kvs_query_params_t *d = &s->opts.defaults;
    if (d->retrieval_fraction == 0 && d->estimation_fraction == 0 &&
        d->epsilon == 0) {
        kvs_mode_t m = d->mode;
        kvs_budget_t b = d->budget;
        float scale = d->scale;
        *d = def;
        d->mode = m;
        d->budget = b;
        d->scale = scale;
    }
    int rc = check_options(s, &s->opts);
    if (rc) {
        open_fail(rc, "%s", err_msg);
        free(s);
        return rc;
    }
    if (s->opts.sync != KVS_SYNC_BATCH && s->opts.sync != KVS_SYNC_ALWAYS &&
        s->opts.sync != KVS_SYNC_NONE) {
        int mode = (int)s->opts.sync;
        free(s);
        return open_fail(KVS_EINVAL, "unknown sync mode %d", mode);
    }
    if (s->opts.memory_bytes && !(opts && opts->data_dir)) {
        free(s);
        return open_fail(KVS_EINVAL, "memory_bytes needs a data_dir to evict "
                                     "to");
    }
    if (s->opts.n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        s->opts.n_threads = n > 0 ? (uint32_t)n : 1;
    }
    if (s->opts.n_build_threads == 0)
        s->opts.n_build_threads = 1;
    if (s->opts.blas_threads)
        openblas_set_num_threads((int)s->opts.blas_threads);

    pthread_mutex_init(&s->meta_mu, NULL);
    pthread_mutex_init(&s->map_mu, NULL);
    pthread_mutex_init(&s->build_mu, NULL);
    pthread_cond_init(&s->build_cv, NULL);
    pthread_cond_init(&s->build_done, NULL);
    atomic_init(&s->stopping, 0);
    s->n_buckets = 64;
    s->buckets = calloc(s->n_buckets, sizeof *s->buckets);
    pthread_mutex_init(&s->scratch_mu, NULL);
    if (!s->buckets || pthread_key_create(&s->scratch_key, scratch_destroy)) {
        free(s->buckets);
        free(s);
        return open_fail(KVS_ENOMEM, "store");
    }
    if (s->opts.cuda_device >= 0) {
        kvs__gpu_params_t gp = {
            .device = s->opts.cuda_device,
            .cache_fraction = s->opts.cuda_cache_fraction,
            .memory_bytes = s->opts.cuda_memory_bytes,
            .kv_host_only = s->opts.cuda_kv == KVS_CUDA_KV_HOST,
            .segment_tokens = s->opts.segment_tokens,
            .sink_tokens = s->opts.sink_tokens,
            .window_tokens = s->opts.window_tokens,
        };
        if ((rc = kvs__gpu_open(&gp, &s->gpu, s->gpu_info,
                                sizeof s->gpu_info))) {
            open_fail(rc, "GPU path");
            goto fail;
        }
        if (!s->gpu) { /* the CPU path serves; say why */
            char why[sizeof s->gpu_info];
            memcpy(why, s->gpu_info, sizeof why);
            why[sizeof why - 8] = 0; /* room for "CPU (" ")" */
            snprintf(s->gpu_info, sizeof s->gpu_info, "CPU (%.*s)",
                     (int)(sizeof why - 8), why);
        }
    } else {
        snprintf(s->gpu_info, sizeof s->gpu_info, "CPU (no cuda_device)");
    }
    s->opts.data_dir = NULL;
    if (opts && opts->data_dir) {
        if (!(s->data_dir = strdup(opts->data_dir))) {
            rc = open_fail(KVS_ENOMEM, "store");
            goto fail;
        }
        s->opts.data_dir = s->data_dir;
        char err[256] = "";
        rc = kvs__db_open(s->data_dir, s->opts.sync, s->opts.sync_interval_ms,
                          &s->db, err, sizeof err);
        kvs__db_format_t fmt = {s->opts.segment_tokens, s->opts.sink_tokens,
                                s->opts.window_tokens};
        if (!rc)
            rc = kvs__db_check_format(s->db, &fmt, err, sizeof err);
        if (!rc) {
            kvs__db_loader_t loader = {s,         load_seq,     load_segment,
                                       load_rows, load_damaged, load_seq_done};
            rc = kvs__db_load(s->db, &loader, err, sizeof err);
        }
        if (rc) {
            open_fail(rc, "%s: %s", s->data_dir, err);
            goto fail;
        }
    }
    /* The calling thread works on its own calls, so n_threads - 1 helpers. */
    if ((rc = kvs__pool_new(s->opts.n_threads - 1, &s->pool))) {
        open_fail(rc, "worker pool");
        goto fail;
    }
    s->builders = calloc(s->opts.n_build_threads, sizeof(pthread_t));
    if (!s->builders) {
        rc = open_fail(KVS_ENOMEM, "builders");
        goto fail;
    }
    for (uint32_t i = 0; i < s->opts.n_build_threads; i++) {
        if ((rc = -pthread_create(&s->builders[i], NULL, builder, s))) {
            open_fail(rc, "builder thread");
            goto fail;
        }
        s->n_builders++;
    }
    /* Builds are queued and idle clocks restarted before the housekeeping
     * thread can expire anything (it would free sequences under this walk,
     * and a long load must not count as idle time). */
    load_schedule_builds(s);
    uint64_t now = now_ms();
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next)
            atomic_store(&q->last_access, now);
    pthread_cond_init(&s->keeper_cv, NULL);
    if ((rc = -pthread_create(&s->keeper, NULL, keeper_main, s))) {
        open_fail(rc, "housekeeping thread");
        goto fail;
    }
    s->keeper_running = 1;
    *out = s;
    return 0;
fail:
    kvs_store_close(s);
    return rc;
}

int kvs_store_close(kvs_store_t *s) {
    if (!s)
        return 0;
    pthread_mutex_lock(&s->build_mu);
    s->stopping = 1;
    pthread_cond_broadcast(&s->build_cv);
    if (s->keeper_running)
        pthread_cond_broadcast(&s->keeper_cv);
    pthread_mutex_unlock(&s->build_mu);
    if (s->keeper_running) {
        pthread_join(s->keeper, NULL);
        pthread_cond_destroy(&s->keeper_cv);
    }
    for (uint32_t i = 0; i < s->n_builders; i++)
        pthread_join(s->builders[i], NULL);
    /* Jobs never started: their tails simply stay unindexed. */
    for (build_job_t *j = s->q_head, *nx; j; j = nx) {
        nx = j->next;
        atomic_fetch_sub(&j->seq->builds_pending, 1);
        seq_unref(j->seq);
        free(j);
    }
    free(s->builders);
    if (s->pool)
        kvs__pool_free(s->pool);
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i], *nx; q; q = nx) {
            nx = q->next;
            seq_unref(q);
        }
    free(s->buckets);
    kvs__gpu_close(s->gpu); /* after every sequence's mirrors */
    /* This thread's scratch; other threads' go with their exit. */
    pthread_key_delete(s->scratch_key);
    pthread_mutex_lock(&s->scratch_mu);
    for (scratch_node_t *n = s->scratches, *nx; n; n = nx) {
        nx = n->next;
        kvs_scratch_free(n->sc);
        free(n);
    }
    s->scratches = NULL;
    pthread_mutex_unlock(&s->scratch_mu);
    pthread_mutex_destroy(&s->scratch_mu);
    pthread_cond_destroy(&s->build_cv);
    pthread_cond_destroy(&s->build_done);
    pthread_mutex_destroy(&s->build_mu);
    pthread_mutex_destroy(&s->map_mu);
    pthread_mutex_destroy(&s->meta_mu);
    /* After every build has stopped: nothing writes to it any more. */
    int rc = kvs__db_close(s->db);
    free(s->data_dir);
    free(s);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Append                                                                 */

static int head_reserve(head_t *h, size_t row_bytes, uint64_t more) {
    if (h->tail_start + h->tail_len + more <= h->tail_cap)
        return 0;
    /* Slide the live rows down before growing: the front was consumed by
     * published segments. */
    if (h->tail_start > 0) {
        memmove(h->tail_keys, h->tail_keys + h->tail_start * row_bytes,
                h->tail_len * row_bytes);
        memmove(h->tail_values, h->tail_values + h->tail_start * row_bytes,
                h->tail_len * row_bytes);
        h->tail_start = 0;
        if (h->tail_len + more <= h->tail_cap)
            return 0;
    }
    uint64_t cap = h->tail_cap ? h->tail_cap : 256;
    while (cap < h->tail_len + more)
        cap *= 2;
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

int kvs_seq_append(kvs_store_t *s, uint64_t id, uint32_t layer,
                   uint32_t n_tokens, const void *keys, const void *values) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!keys || !values)
        return fail(s, KVS_EINVAL, "keys or values is NULL");
    if (n_tokens == 0)
        return fail(s, KVS_EINVAL, "zero tokens");
    int rc = 0;
    seq_t *q = seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    const kvs_geometry_t *g = &q->geo;
    if (layer >= g->n_layers) {
        rc = fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)", layer,
                  g->n_layers);
        goto out;
    }
    size_t n_elems = (size_t)n_tokens * g->n_kv_heads * g->head_dim;
    if (!kvs_all_finite(g->dtype, keys, n_elems) ||
        !kvs_all_finite(g->dtype, values, n_elems)) {
        rc = fail(s, KVS_ENOTFINITE, "NaN or Inf in appended keys/values");
        goto out;
    }
    layer_t *L = &q->layers[layer];
    for (;;) {
        if (atomic_load(&q->evicted) && (rc = page_in(s, q)))
            goto out;
        pthread_mutex_lock(&L->append_mu);
        /* A drop takes every append_mu before deleting the stored
         * sequence: past this check nothing can delete it under us. */
        if (atomic_load(&q->dropped)) {
            pthread_mutex_unlock(&L->append_mu);
            rc = fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                      (unsigned long long)id);
            goto out;
        }
        pthread_rwlock_wrlock(&L->lock);
        if (L->resident)
            break;
        /* Evicted between the check and the locks: page in again. */
        pthread_rwlock_unlock(&L->lock);
        pthread_mutex_unlock(&L->append_mu);
    }
    /* Room first, so nothing can fail between the storage write and the
     * copy into memory. */
    for (uint32_t h = 0; h < g->n_kv_heads; h++)
        if ((rc = head_reserve(&L->heads[h], q->row_bytes, n_tokens))) {
            pthread_rwlock_unlock(&L->lock);
            pthread_mutex_unlock(&L->append_mu);
            rc = fail(s, rc, "cannot grow the tail of layer %u", layer);
            goto out;
        }
    uint64_t pos0 = L->tokens;
    L->appending = n_tokens;
    pthread_rwlock_unlock(&L->lock);
    if (s->db) {
        char err[256];
        rc = kvs__db_append(s->db, id, layer, g, pos0, n_tokens, keys, values,
                            s->opts.segment_tokens, err, sizeof err);
        if (rc) {
            pthread_rwlock_wrlock(&L->lock);
            L->appending = 0;
            pthread_rwlock_unlock(&L->lock);
            pthread_mutex_unlock(&L->append_mu);
            rc = fail(s, rc, "%s", err);
            goto out;
        }
    }
    pthread_rwlock_wrlock(&L->lock);
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
        maybe_build(s, q, layer, h);
    }
    L->tokens += n_tokens;
    pthread_rwlock_unlock(&L->lock);
    pthread_mutex_unlock(&L->append_mu);
    bytes_add(s, q, (int64_t)(2 * (size_t)n_tokens * stride));
    enforce_budget(s, q);
out:
    seq_unref(q);
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
    pthread_mutex_lock(&s->scratch_mu);
    n->next = s->scratches;
    if (n->next)
        n->next->prev = n;
    s->scratches = n;
    pthread_mutex_unlock(&s->scratch_mu);
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
                          const kvs_query_params_t *p, kvs_zone_params_t *zp) {
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
    if (m.mode != KVS_MODE_EXACT && m.mode != KVS_MODE_WAVE &&
        m.mode != KVS_MODE_FULL)
        return fail(s, KVS_EINVAL, "unknown mode %d", (int)m.mode);
    if (m.budget != KVS_BUDGET_FIXED && m.budget != KVS_BUDGET_BOUNDED)
        return fail(s, KVS_EINVAL, "unknown budget %d", (int)m.budget);
    if (!(m.retrieval_fraction >= 0 && m.retrieval_fraction <= 1) ||
        !(m.estimation_fraction >= 0 && m.estimation_fraction <= 1) ||
        !(m.epsilon >= 0 && m.epsilon <= 1) || !(m.scale >= 0) ||
        !isfinite(m.scale))
        return fail(s, KVS_EINVAL, "query params out of range");
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
    return 0;
}

typedef struct call_s {
    kvs_store_t *s;
    seq_t *q;
    layer_t *L;
    const float *queries;
    kvs_zone_params_t zp;
    uint32_t group, k;
    float *out;
    int64_t *positions;
    float *scores;
    kvs_zone_stats_t stats[KVS_MAX_HEADS];
    int rc[KVS_MAX_HEADS];
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
    c->rc[h] = kvs_head_attend(&v, c->queries + off, c->group, &c->zp, sc,
                               c->out + off, &c->stats[h]);
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
    c->rc[h] = kvs_head_search_group(&v, c->queries + qh * v.d, c->group, c->k,
                                     &c->zp, sc, c->positions + qh * c->k,
                                     c->scores + qh * c->k, &c->stats[h]);
}

/* The GPU path for a wave attend (caller holds the layer's read lock).
 * Nonzero: not served there (the CPU path runs; a GPU failure is counted
 * in the store's stats, never returned). */
static int gpu_attend(kvs_store_t *s, call_t *c) {
    const uint32_t nh = c->q->geo.n_kv_heads;
    kvs_head_view_t *v = malloc(nh * sizeof *v);
    if (!v)
        return KVS_ENOMEM;
    for (uint32_t h = 0; h < nh; h++)
        head_view(s, c->q, &c->L->heads[h], &v[h]);
    int rc = kvs__gpu_attend(s->gpu, &c->L->gpu, v, nh, c->group, c->queries,
                             &c->zp, c->out, c->stats);
    free(v);
    return rc;
}

/* Shared front half of search and attend: validation and the lock. */
static int call_begin(kvs_store_t *s, uint64_t id, uint32_t layer,
                      const float *queries, const kvs_query_params_t *params,
                      call_t **out) {
    int rc = 0;
    seq_t *q = seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    const kvs_geometry_t *g = &q->geo;
    if (layer >= g->n_layers) {
        rc = fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)", layer,
                  g->n_layers);
        goto err;
    }
    if (!kvs_all_finite(KVS_DTYPE_F32, queries,
                        (size_t)g->n_q_heads * g->head_dim)) {
        rc = fail(s, KVS_ENOTFINITE, "NaN or Inf in queries");
        goto err;
    }
    call_t *c = malloc(sizeof *c);
    if (!c) {
        rc = fail(s, KVS_ENOMEM, "call state");
        goto err;
    }
    memset(c->stats, 0, g->n_kv_heads * sizeof c->stats[0]);
    memset(c->rc, 0, g->n_kv_heads * sizeof c->rc[0]);
    if ((rc = resolve_params(s, q, params, &c->zp))) {
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
    seq_unref(q);
    return rc;
}

static int call_end(call_t *c, kvs_attend_stats_t *stats, double t0) {
    uint32_t nh = c->q->geo.n_kv_heads;
    int rc = 0;
    for (uint32_t h = 0; h < nh && !rc; h++)
        rc = c->rc[h];
    if (rc)
        rc = fail(c->s, rc, "head computation failed: %s", kvs_strerror(rc));
    if (stats) {
        memset(stats, 0, sizeof *stats);
        for (uint32_t h = 0; h < nh; h++) {
            stats->keys_total += c->stats[h].keys_total;
            stats->keys_exact += c->stats[h].keys_exact;
            stats->keys_steady += c->stats[h].keys_steady;
            stats->clusters_total += c->stats[h].clusters_total;
            stats->clusters_retrieved += c->stats[h].clusters_retrieved;
            stats->clusters_estimated += c->stats[h].clusters_estimated;
            stats->clusters_skipped += c->stats[h].clusters_skipped;
        }
        stats->seconds = now_s() - t0;
    }
    seq_unref(c->q);
    free(c);
    return rc;
}

int kvs_seq_attend(kvs_store_t *s, uint64_t id, uint32_t layer,
                   const float *queries, const kvs_query_params_t *params,
                   float *out, kvs_attend_stats_t *stats) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!queries || !out)
        return fail(s, KVS_EINVAL, "queries or out is NULL");
    double t0 = now_s();
    call_t *c;
    int rc = call_begin(s, id, layer, queries, params, &c);
    if (rc)
        return rc;
    c->out = out;
    if ((rc = layer_lock(s, c->q, c->L, 0))) {
        seq_unref(c->q);
        free(c);
        return rc;
    }
    if (c->L->tokens == 0) {
        pthread_rwlock_unlock(&c->L->lock);
        seq_unref(c->q);
        free(c);
        return fail(s, KVS_ERANGE, "layer %u is empty", layer);
    }
    if (!s->gpu || c->zp.exact || gpu_attend(s, c) != 0)
        kvs__pool_run(s->pool, c->q->geo.n_kv_heads, attend_task, c);
    pthread_rwlock_unlock(&c->L->lock);
    return call_end(c, stats, t0);
}

int kvs_seq_search(kvs_store_t *s, uint64_t id, uint32_t layer,
                   const float *queries, uint32_t k,
                   const kvs_query_params_t *params, int64_t *positions,
                   float *scores) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!queries || !positions || !scores)
        return fail(s, KVS_EINVAL, "queries, positions or scores is NULL");
    call_t *c;
    int rc = call_begin(s, id, layer, queries, params, &c);
    if (rc)
        return rc;
    c->k = k;
    c->positions = positions;
    c->scores = scores;
    if ((rc = layer_lock(s, c->q, c->L, 0))) {
        seq_unref(c->q);
        free(c);
        return rc;
    }
    if (k == 0 || k > c->L->tokens) {
        uint64_t have = c->L->tokens;
        pthread_rwlock_unlock(&c->L->lock);
        seq_unref(c->q);
        free(c);
        return fail(s, KVS_ERANGE, "k %u outside 1..%llu (tokens in layer)", k,
                    (unsigned long long)have);
    }
    kvs__pool_run(s->pool, c->q->geo.n_kv_heads, search_task, c);
    pthread_rwlock_unlock(&c->L->lock);
    return call_end(c, NULL, 0);
}

/* Copy tokens pos .. pos+n of one head into rows `stride` bytes apart
 * (either destination may be NULL). Caller holds the layer lock. */
static void head_gather(const head_t *hd, size_t rb, uint64_t pos, uint64_t n,
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
    clear_err(s);
    int rc = 0;
    seq_t *q = seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    if (layer >= q->geo.n_layers) {
        rc = fail(s, KVS_ERANGE, "layer %u out of range", layer);
        goto out;
    }
    layer_t *L = &q->layers[layer];
    if ((rc = layer_lock(s, q, L, 0)))
        goto out;
    if (pos > L->tokens || n > L->tokens - pos) {
        rc = fail(s, KVS_ERANGE, "tokens %llu..%llu past the %llu held",
                  (unsigned long long)pos, (unsigned long long)(pos + n),
                  (unsigned long long)L->tokens);
        pthread_rwlock_unlock(&L->lock);
        goto out;
    }
    size_t rb = q->row_bytes, stride = rb * q->geo.n_kv_heads;
    for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
        head_gather(&L->heads[h], rb, pos, n,
                    keys ? (char *)keys + h * rb : NULL,
                    values ? (char *)values + h * rb : NULL, stride);
    pthread_rwlock_unlock(&L->lock);
out:
    seq_unref(q);
    return rc;
}

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
        int rc = head_reserve(c, rb, rest);
        if (rc)
            return rc;
        head_gather(p, rb, c->indexed_tokens, rest, c->tail_keys,
                    c->tail_values, rb);
        c->tail_len = rest;
    }
    return 0;
}

/* Store a forked child: its segments and rows first, its metadata last, so
 * a crash in between leaves records of an unknown id (deleted at the next
 * open), never half a sequence. */
static int fork_persist(kvs_store_t *s, seq_t *c, char *err, size_t errlen) {
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
        /* kvs_seq_fork shares the same segments in every head of a layer,
         * so the rows past them start at one position for all heads. */
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
            head_gather(&L->heads[h], rb, indexed, rest, k + h * rb, v + h * rb,
                        stride);
        rc = kvs__db_append(s->db, c->id, l, g, indexed, (uint32_t)rest, k, v,
                            s->opts.segment_tokens, err, errlen);
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
    clear_err(s);
    int rc = 0;
    seq_t *p = seq_lookup(s, parent, &rc);
    if (!p)
        return rc;
    seq_t *c = NULL;
    if ((rc = seq_new(s, child, &p->geo, &c)))
        goto out;
    atomic_store(&c->ttl_s, atomic_load(&p->ttl_s));
    size_t rb = p->row_bytes;
    for (uint32_t l = 0; l < p->geo.n_layers && !rc; l++) {
        layer_t *PL = &p->layers[l], *CL = &c->layers[l];
        if ((rc = layer_lock(s, p, PL, 0)))
            break;
        if (at > PL->tokens)
            rc =
                fail(s, KVS_ERANGE,
                     "at_token %llu past the %llu tokens of "
                     "layer %u",
                     (unsigned long long)at, (unsigned long long)PL->tokens, l);
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
                rc = fail(s, rc, "fork of layer %u", l);
        pthread_rwlock_unlock(&PL->lock);
        CL->tokens = at;
    }
    if (rc)
        goto out;
    /* meta_mu across the storage write (as create); lookups go on */
    pthread_mutex_lock(&s->meta_mu);
    pthread_mutex_lock(&s->map_mu);
    int exists = map_find(s, child) != NULL;
    pthread_mutex_unlock(&s->map_mu);
    if (exists) {
        pthread_mutex_unlock(&s->meta_mu);
        rc = fail(s, KVS_EEXIST, "sequence %llu already exists",
                  (unsigned long long)child);
        goto out;
    }
    if (s->db) {
        char err[256] = "";
        if ((rc = fork_persist(s, c, err, sizeof err))) {
            pthread_mutex_unlock(&s->meta_mu);
            rc = fail(s, rc, "storing the fork: %s", err);
            goto out;
        }
    }
    pthread_mutex_lock(&s->map_mu);
    if ((rc = map_insert(s, c))) {
        pthread_mutex_unlock(&s->map_mu);
        pthread_mutex_unlock(&s->meta_mu);
        rc = fail(s, rc, "sequence table");
        goto out;
    }
    atomic_fetch_add(&c->refs, 1); /* a racing drop must not free it */
    pthread_mutex_unlock(&s->map_mu);
    pthread_mutex_unlock(&s->meta_mu);
    /* The copied rows may hold a whole segment: index them as usual. */
    for (uint32_t l = 0; l < c->geo.n_layers; l++) {
        pthread_rwlock_wrlock(&c->layers[l].lock);
        bytes_add(s, c, layer_bytes(c, &c->layers[l]));
        for (uint32_t h = 0; h < c->geo.n_kv_heads; h++)
            maybe_build(s, c, l, h);
        pthread_rwlock_unlock(&c->layers[l].lock);
    }
    seq_unref(c);
    c = NULL;
out:
    if (c)
        seq_free(c);
    seq_unref(p);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Introspection                                                          */

static void seq_account(const seq_t *q, kvs_seq_info_t *info) {
    memset(info, 0, sizeof *info);
    info->geometry = q->geo;
    info->tokens_min = UINT64_MAX;
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        layer_t *L = &q->layers[l];
        pthread_rwlock_rdlock(&L->lock);
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
        pthread_rwlock_unlock(&L->lock);
    }
    if (q->geo.n_kv_heads)
        info->indexed_tokens /= q->geo.n_kv_heads;
    info->builds_pending = atomic_load(&q->builds_pending);
    info->resident = !atomic_load(&q->evicted);
}

int kvs_seq_info(kvs_store_t *s, uint64_t id, kvs_seq_info_t *info) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!info)
        return fail(s, KVS_EINVAL, "info is NULL");
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    seq_account(q, info);
    seq_unref(q);
    return 0;
}

int kvs_seq_shape(kvs_store_t *s, uint64_t id, uint32_t layer,
                  kvs_geometry_t *geometry, uint64_t *layer_tokens) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!geometry)
        return fail(s, KVS_EINVAL, "geometry is NULL");
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    *geometry = q->geo;
    if (layer_tokens) {
        if (layer >= q->geo.n_layers) {
            rc = fail(s, KVS_ERANGE, "layer %u out of range (n_layers %u)",
                      layer, q->geo.n_layers);
        } else {
            /* tokens is kept while evicted: no page-in needed. */
            layer_t *L = &q->layers[layer];
            pthread_rwlock_rdlock(&L->lock);
            *layer_tokens = L->tokens;
            pthread_rwlock_unlock(&L->lock);
        }
    }
    seq_unref(q);
    return rc;
}

int kvs_seq_wait_indexed(kvs_store_t *s, uint64_t id) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    int rc = 0;
    seq_t *q = seq_peek(s, id, &rc);
    if (!q)
        return rc;
    pthread_mutex_lock(&s->build_mu);
    while (atomic_load(&q->builds_pending) > 0 && !atomic_load(&q->dropped) &&
           !s->stopping)
        pthread_cond_wait(&s->build_done, &s->build_mu);
    pthread_mutex_unlock(&s->build_mu);
    seq_unref(q);
    return 0;
}

int kvs_store_stats(kvs_store_t *s, kvs_store_stats_t *st) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!st)
        return fail(s, KVS_EINVAL, "stats is NULL");
    memset(st, 0, sizeof *st);
    /* Take references under the map lock, account outside it. */
    pthread_mutex_lock(&s->map_mu);
    size_t n = s->n_seqs, k = 0;
    seq_t **all = malloc((n ? n : 1) * sizeof *all);
    if (!all) {
        pthread_mutex_unlock(&s->map_mu);
        return fail(s, KVS_ENOMEM, "stats");
    }
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i]; q; q = q->next) {
            if (atomic_load(&q->unlinking))
                continue; /* as lookups and list: being dropped */
            atomic_fetch_add(&q->refs, 1);
            all[k++] = q;
        }
    pthread_mutex_unlock(&s->map_mu);
    st->sequences = k;
    for (size_t i = 0; i < k; i++) {
        kvs_seq_info_t info;
        if (all[i]->damage) {
            st->quarantined++;
            seq_unref(all[i]);
            continue;
        }
        seq_account(all[i], &info);
        st->bytes += info.bytes;
        st->index_bytes += info.index_bytes;
        seq_unref(all[i]);
    }
    free(all);
    if (s->db)
        st->disk_bytes = kvs__db_disk_bytes(s->db);
    pthread_mutex_lock(&s->build_mu);
    st->builds_pending = s->builds_pending;
    st->builds_done = s->builds_done;
    st->build_keys = s->build_keys;
    st->build_seconds = s->build_seconds;
    st->expired = s->expired;
    int64_t rb = atomic_load(&s->resident_bytes);
    st->resident_bytes = rb > 0 ? (uint64_t)rb : 0; /* racing drops */
    st->evictions = atomic_load(&s->evictions);
    st->page_ins = atomic_load(&s->page_ins);
    pthread_mutex_unlock(&s->build_mu);
    kvs__gpu_stats_t g;
    kvs__gpu_stats(s->gpu, &g);
    st->gpu_device = g.device;
    st->gpu_attends = g.attends;
    st->gpu_fallbacks = g.fallbacks;
    st->gpu_errors = g.errors;
    st->gpu_bytes = g.bytes_gpu;
    st->gpu_pinned_bytes = g.bytes_pinned;
    st->gpu_kv_bytes = g.bytes_kv_device;
    st->gpu_builds = g.builds;
    st->gpu_build_errors = g.build_errors;
    st->gpu_cache_lookups = g.lookups;
    st->gpu_cache_hits = g.hits;
    st->gpu_bus_bytes = g.bytes_bus;
    st->gpu_upload_bytes = g.bytes_uploaded;
    return 0;
}

const char *kvs_store_gpu_info(const kvs_store_t *s) {
    return s ? s->gpu_info : "";
}

int kvs_store_compact(kvs_store_t *s) {
    if (!s)
        return KVS_EINVAL;
    if (s->db)
        kvs__db_compact(s->db);
    return 0;
}

int kvs_store_list(kvs_store_t *s, uint64_t *ids, size_t cap, size_t *n_out) {
    if (!s)
        return KVS_EINVAL;
    clear_err(s);
    if (!n_out || (cap && !ids))
        return fail(s, KVS_EINVAL, "ids or n_out is NULL");
    pthread_mutex_lock(&s->map_mu);
    size_t k = 0;
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i]; q; q = q->next) {
            if (atomic_load(&q->unlinking))
                continue; /* as lookups: a drop is being written */
            if (k < cap)
                ids[k] = q->id;
            k++;
        }
    pthread_mutex_unlock(&s->map_mu);
    *n_out = k;
    return 0;
}
