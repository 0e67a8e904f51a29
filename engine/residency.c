/*
 * residency.c: which sequences are in memory. Loading a data directory at
 * open, the memory budget (least recently used sequences are evicted to
 * storage) and paging an evicted sequence back in on its next use.
 *
 * A layer's `resident` flag, read under its lock, says whether its rows are
 * in memory; kvs__layer_lock() takes the lock with the rows there.
 */
#include "engine_int.h"

#include <assert.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* Loading a data directory                                               */

static int load_seq(void *ctx, uint64_t id, const kvs_geometry_t *g,
                    uint32_t ttl_s) {
    kvs_store_t *s = ctx;
    if (kvs__map_find(s, id))
        return KVS_EEXIST;
    int rc = kvs__check_geometry(s, g);
    seq_t *q;
    if (rc || (rc = kvs__seq_new(s, id, g, &q)))
        return rc;
    atomic_store(&q->ttl_s, ttl_s);
    /* Not in memory until its records are loaded (load_seq_done): a budget
     * enforced meanwhile must not pick it. */
    atomic_store(&q->evicted, 1);
    for (uint32_t l = 0; l < g->n_layers; l++)
        q->layers[l].resident = 0;
    /* Open is single-threaded until the loads are done; the lock is for
     * the table's rule (kvs__map_insert), not for a race. */
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    rc = kvs__map_insert(s, q);
    kvs__unlock(&s->map_mu);
    if (rc)
        kvs__seq_free(q);
    return rc;
}

/* The head a stored record belongs to, or NULL when it names no head of
 * a usable sequence. `into` (page-in): heads [n_layers][n_kv_heads] being
 * filled outside the sequence; NULL: the sequence's own (open). */
static head_t *record_head(seq_t *q, head_t *into, uint32_t layer,
                           uint32_t head) {
    if (!q || q->damage || layer >= q->geo.n_layers ||
        head >= q->geo.n_kv_heads)
        return NULL;
    if (into)
        return &into[(size_t)layer * q->geo.n_kv_heads + head];
    return &q->layers[layer].heads[head];
}

/* Segments must continue the head exactly where it stands. */
static int fill_segment(kvs_store_t *s, seq_t *q, head_t *into, uint32_t layer,
                        uint32_t head, kvs_segment_t *seg) {
    head_t *h = record_head(q, into, layer, head);
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

static int fill_rows(seq_t *q, head_t *into, uint32_t layer, uint32_t head,
                     uint64_t pos, uint32_t n, size_t half, const void *keys,
                     const void *values) {
    head_t *h = record_head(q, into, layer, head);
    if (!h || half != (size_t)n * q->row_bytes ||
        pos != h->indexed_tokens + h->tail_len)
        return KVS_ECORRUPT;
    int rc = kvs__head_reserve(h, q->row_bytes, n);
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
    return fill_segment(s, kvs__map_find(s, id), NULL, layer, head, seg);
}

static int load_rows(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                     uint64_t pos, uint32_t n, size_t half, const void *keys,
                     const void *values) {
    kvs_store_t *s = ctx;
    return fill_rows(kvs__map_find(s, id), NULL, layer, head, pos, n, half,
                     keys, values);
}

/* Page-in callbacks: the sequence is known, not looked up; its records go
 * into `heads`, installed under the layer locks once all are read. */
typedef struct page_ctx_s {
    kvs_store_t *s;
    seq_t *q;
    uint32_t layer; /* the layer being read */
    head_t *heads;  /* [n_kv_heads] of that layer */
    /* The KV heads are read in parallel (one walk each): `damage` (why the
     * records are damaged, NULL while they are not) is shared. A leaf
     * lock, private to the page-in. */
    pthread_mutex_t mu;
    char *damage;
    int rc[KVS_MAX_HEADS]; /* each head's walk */
    size_t readahead;      /* per iterator (kvs__db_loader_t) */
} page_ctx_t;

static int page_damage_seen(page_ctx_t *c) {
    pthread_mutex_lock(&c->mu);
    int seen = c->damage != NULL;
    pthread_mutex_unlock(&c->mu);
    return seen;
}

static int page_segment(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                        kvs_segment_t *seg) {
    page_ctx_t *c = ctx;
    (void)id;
    if (layer != c->layer || page_damage_seen(c)) {
        kvs_segment_free(seg);
        return KVS_ECORRUPT;
    }
    /* heads is one layer's: index it as layer 0 */
    return fill_segment(c->s, c->q, c->heads, 0, head, seg);
}

static int page_rows(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                     uint64_t pos, uint32_t n, size_t half, const void *keys,
                     const void *values) {
    page_ctx_t *c = ctx;
    (void)id;
    if (layer != c->layer || page_damage_seen(c))
        return KVS_ECORRUPT;
    return fill_rows(c->q, c->heads, 0, head, pos, n, half, keys, values);
}

static void page_damaged(void *ctx, uint64_t id, const char *why) {
    page_ctx_t *c = ctx;
    kvs__store_log(c->s, KVS_LOG_ERROR,
                   "sequence %llu quarantined at page-in: %s",
                   (unsigned long long)id, why ? why : "damaged");
    pthread_mutex_lock(&c->mu);
    if (!c->damage)
        c->damage = strdup(why ? why : "damaged");
    pthread_mutex_unlock(&c->mu);
}

static void load_damaged(void *ctx, uint64_t id, const char *why) {
    kvs_store_t *s = ctx;
    seq_t *q = kvs__map_find(s, id);
    kvs__store_log(s, KVS_LOG_ERROR, "sequence %llu quarantined: %s",
                   (unsigned long long)id, why ? why : "damaged");
    if (q && !q->damage)
        q->damage = strdup(why ? why : "damaged");
}

/* After a sequence's records are loaded: every head of a layer must hold
 * the same tokens; then its bytes count against the budget, which may evict
 * earlier sequences already (so an open never holds more than the budget
 * plus one sequence). */
static void load_seq_done(void *ctx, uint64_t id) {
    kvs_store_t *s = ctx;
    seq_t *q = kvs__map_find(s, id);
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
        kvs__wrlock(&L->lock, l);
        L->tokens = t0;
        L->resident = 1;
        kvs__bytes_add(s, q, kvs__layer_bytes(q, L));
        kvs__rwunlock(&L->lock);
    }
    atomic_store(&q->evicted, 0);
    atomic_store(&q->last_access, kvs__now_ms());
    kvs__enforce_budget(s, q);
}

/* Lazy open: layer `layer` of `id` holds ends[h] tokens in head h; the
 * records stay on disk until the sequence is first used or warmed up. */
static int load_extent(void *ctx, uint64_t id, uint32_t layer,
                       const uint64_t *ends) {
    kvs_store_t *s = ctx;
    seq_t *q = kvs__map_find(s, id);
    if (!q || q->damage || layer >= q->geo.n_layers)
        return 0;
    for (uint32_t h = 1; h < q->geo.n_kv_heads; h++)
        if (ends[h] != ends[0]) {
            char why[128];
            snprintf(why, sizeof why,
                     "layer %u: KV heads hold different token counts", layer);
            load_damaged(s, id, why);
            return 0;
        }
    layer_t *L = &q->layers[layer];
    kvs__wrlock(&L->lock, layer);
    L->tokens = ends[0];
    kvs__rwunlock(&L->lock);
    atomic_store(&q->cold, 1);
    return 0;
}

int kvs__store_load(kvs_store_t *s, char *err, size_t errlen) {
    kvs__db_loader_t loader = {
        .ctx = s,
        .seq = load_seq,
        .segment = load_segment,
        .rows = load_rows,
        .damaged = load_damaged,
        .loaded = load_seq_done,
    };
    if (s->opts.load != KVS_LOAD_EAGER) {
        loader.extent = load_extent;
        loader.segment_tokens = s->opts.segment_tokens;
    }
    return kvs__db_load(s->db, &loader, err, errlen);
}

/* Queue builds for every tail that holds a whole segment. */
void kvs__load_schedule_builds(kvs_store_t *s) {
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next) {
            if (q->damage)
                continue;
            for (uint32_t l = 0; l < q->geo.n_layers; l++) {
                kvs__wrlock(&q->layers[l].lock, l);
                for (uint32_t h = 0; h < q->geo.n_kv_heads; h++)
                    kvs__maybe_build(s, q, l, h);
                kvs__rwunlock(&q->layers[l].lock);
            }
        }
}

/* ---------------------------------------------------------------------- */
/* Memory budget: eviction to storage and paging back in                  */

void kvs__bytes_add(kvs_store_t *s, seq_t *q, int64_t delta) {
    atomic_fetch_add(&q->bytes, delta);
    /* A dropped sequence's bytes left the store total at the drop: later
     * changes (a finishing build, a racing eviction) must not count. */
    if (!atomic_load(&q->dropped))
        atomic_fetch_add(&s->resident_bytes, delta);
}

int64_t kvs__layer_bytes(const seq_t *q, const layer_t *L) {
    assert(kvs__held(&L->lock));
    int64_t b = 0;
    for (uint32_t h = 0; h < q->geo.n_kv_heads; h++) {
        const head_t *hd = &L->heads[h];
        for (uint32_t i = 0; i < hd->n_segments; i++)
            b += (int64_t)kvs_segment_bytes(hd->segments[i]);
        b += (int64_t)(2 * hd->tail_len * q->row_bytes);
    }
    return b;
}

/* Release what try_evict took: every layer's rwlock, then append_mu. */
static void unlock_all(seq_t *q) {
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        kvs__rwunlock(&q->layers[l].lock);
    for (uint32_t l = q->geo.n_layers; l-- > 0;)
        kvs__unlock(&q->layers[l].append_mu);
}

/* Free every head's rows and segments, leaving empty heads (under
 * lock_all). */
static void release_rows(seq_t *q) {
    for (uint32_t l = 0; l < q->geo.n_layers; l++) {
        assert(kvs__held_write(&q->layers[l].lock));
        for (uint32_t h = 0; h < q->geo.n_kv_heads; h++) {
            kvs__head_release(&q->layers[l].heads[h]);
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
    kvs__lock(&q->page_mu, KVS__RANK_PAGE, 0);
    /* A sequence partly read (some layers paged in) is evicted too: what
     * counts is that some of it is in memory. */
    if (atomic_load(&q->bytes) <= 0 || q->damage || atomic_load(&q->dropped))
        goto out;
    /* Appends first: none can start, so the sequence's last queued write
     * is final; wait for it to reach the disk (KVS_SYNC_ASYNC) before the
     * rows it frees are gone from memory, and before the layer locks, so
     * readers go on meanwhile. A write error means those rows exist only
     * here: then the sequence stays. */
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        kvs__lock(&q->layers[l].append_mu, KVS__RANK_APPEND, l);
    if (s->db && kvs__db_wait(s->db, atomic_load(&q->last_write))) {
        for (uint32_t l = q->geo.n_layers; l-- > 0;)
            kvs__unlock(&q->layers[l].append_mu);
        goto out;
    }
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        kvs__wrlock(&q->layers[l].lock, l);
    /* Builds are queued only under a layer's write lock: with all of them
     * held, the count cannot grow under us. A drop may have finished while
     * we waited for the appends: its bytes have left the total already. */
    if (atomic_load(&q->builds_pending) == 0 && !atomic_load(&q->dropped)) {
        release_rows(q);
        for (uint32_t l = 0; l < q->geo.n_layers; l++)
            q->layers[l].resident = 0;
        atomic_store(&q->evicted, 1);
        kvs__bytes_add(s, q, -atomic_load(&q->bytes));
        atomic_fetch_add(&s->evictions, 1);
        done = 1;
    }
    unlock_all(q);
    /* glibc keeps freed heap memory (and raises its mmap threshold after
     * large frees): hand what eviction freed back to the system. */
    if (done)
        malloc_trim(0);
out:
    kvs__unlock(&q->page_mu);
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
void kvs__enforce_budget(kvs_store_t *s, const seq_t *keep) {
    uint64_t budget = s->opts.memory_bytes;
    if (!budget || atomic_load(&s->resident_bytes) <= (int64_t)budget)
        return;
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    size_t n = 0;
    lru_t *c = malloc((s->n_seqs ? s->n_seqs : 1) * sizeof *c);
    if (!c) {
        kvs__unlock(&s->map_mu);
        return;
    }
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next)
            if (q != keep && atomic_load(&q->bytes) > 0 && !q->damage &&
                !atomic_load(&q->unlinking)) {
                atomic_fetch_add(&q->refs, 1);
                c[n++] = (lru_t){q, atomic_load(&q->last_access)};
            }
    kvs__unlock(&s->map_mu);
    qsort(c, n, sizeof *c, lru_cmp);
    for (size_t i = 0; i < n; i++) {
        if (atomic_load(&s->resident_bytes) > (int64_t)budget)
            try_evict(s, c[i].q);
        kvs__seq_unref(c[i].q);
    }
    free(c);
}

/* Free heads read by a page-in that are not installed. */
static void release_heads(uint32_t n, head_t *heads) {
    for (uint32_t i = 0; i < n; i++)
        kvs__head_release(&heads[i]);
    free(heads);
}

/* One KV head's records of the layer being read (a pool task). */
static void page_head_task(void *arg, uint32_t h) {
    page_ctx_t *c = arg;
    kvs__db_loader_t loader = {
        .ctx = c,
        .segment = page_segment,
        .rows = page_rows,
        .damaged = page_damaged,
        .cancel = &c->s->stopping, /* a close does not wait for the read */
        .one_layer = 1,
        .one_head = 1,
        .layer = c->layer,
        .head = h,
        .readahead = c->readahead,
    };
    char err[256] = "";
    c->rc[h] = kvs__db_load_seq(c->s->db, c->q->id, &loader, err, sizeof err);
}

/*
 * Read one layer of a sequence that is not resident and install it. Caller
 * holds page_mu, so nothing else changes the layer's heads meanwhile
 * (appends, reads and evictions all go through page_mu first; a drop is
 * checked for after). The records are read into heads of our own, without
 * the layer's locks, so calls that read the layers (info, stats, list:
 * they take the layer locks) do not wait for the read, which can take
 * seconds for a long sequence; the KV heads are read in parallel on the
 * worker pool (a walk each over its own keys: metadata records, their K/V
 * blocks, then rows). Then the layer's locks are taken, the heads' token
 * counts checked against what the open found, and the heads installed at
 * once: a call never sees a layer half read. 0, 1 when the sequence was
 * dropped meanwhile (ENOSEQ set), or an error with its message.
 */
static int page_in_layer(kvs_store_t *s, seq_t *q, uint32_t l, int64_t *bytes) {
    assert(kvs__held(&q->page_mu));
    const uint32_t n_heads = q->geo.n_kv_heads;
    layer_t *L = &q->layers[l];
    page_ctx_t ctx = {.s = s, .q = q, .layer = l};
    /* A head's K/V (and the index beside them) read as a stream: 4 MiB
     * ahead where the head holds more than 64 MiB (1M tokens of d=128
     * fp16 hold 512 MiB), RocksDB's adaptive readahead below. */
    if (L->tokens * 2 * q->row_bytes >= (64u << 20))
        ctx.readahead = 4u << 20;
    if (!(ctx.heads = calloc(n_heads, sizeof *ctx.heads)))
        return kvs__fail(s, KVS_ENOMEM, "paging sequence in");
    pthread_mutex_init(&ctx.mu, NULL);
    kvs__pool_run(s->pool, n_heads, page_head_task, &ctx);
    pthread_mutex_destroy(&ctx.mu);
    int rc = 0;
    char err[256] = "";
    for (uint32_t h = 0; h < n_heads && !rc; h++)
        rc = ctx.rc[h];
    kvs__lock(&L->append_mu, KVS__RANK_APPEND, l);
    kvs__wrlock(&L->lock, l);
    if (atomic_load(&q->dropped)) {
        /* dropped while we read (its records may have gone under the
         * read): nothing to install, and the id may name a new sequence */
        kvs__rwunlock(&L->lock);
        kvs__unlock(&L->append_mu);
        free(ctx.damage);
        release_heads(n_heads, ctx.heads);
        kvs__fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                  (unsigned long long)q->id);
        return 1;
    }
    for (uint32_t h = 0; h < n_heads && !rc && !ctx.damage; h++) {
        const head_t *hd = &ctx.heads[h];
        if (hd->indexed_tokens + hd->tail_len != L->tokens) {
            snprintf(err, sizeof err,
                     "layer %u head %u: storage holds "
                     "%llu + %llu tokens, %llu were acknowledged",
                     l, h, (unsigned long long)hd->indexed_tokens,
                     (unsigned long long)hd->tail_len,
                     (unsigned long long)L->tokens);
            rc = KVS_ECORRUPT;
        }
    }
    if (rc || ctx.damage) {
        /* Leave the layer out and refuse it: never serve partial data.
         * Damage quarantines the whole sequence (the call that found it is
         * told so: KVS_ECORRUPT, the sequence named; later ones are refused
         * as quarantined); a passing failure (memory, I/O, a close) leaves
         * the layer unread for the next call to try again. */
        if (ctx.damage)
            q->damage = ctx.damage;
        else if (rc == KVS_ECORRUPT)
            q->damage = strdup(err[0] ? err : "page-in found damage");
        if (!rc)
            rc = KVS_ECORRUPT;
        kvs__fail(s, rc, "sequence %llu: %s%s", (unsigned long long)q->id,
                  q->damage ? q->damage
                  : err[0]  ? err
                            : kvs_strerror(rc),
                  q->damage ? "; quarantined" : "");
        kvs__rwunlock(&L->lock);
        kvs__unlock(&L->append_mu);
        release_heads(n_heads, ctx.heads);
        return rc;
    }
    memcpy(L->heads, ctx.heads, n_heads * sizeof *ctx.heads);
    free(ctx.heads);
    L->resident = 1;
    int64_t b = kvs__layer_bytes(q, L);
    kvs__bytes_add(s, q, b);
    *bytes += b;
    for (uint32_t h = 0; h < n_heads; h++)
        kvs__maybe_build(s, q, l, h);
    kvs__rwunlock(&L->lock);
    kvs__unlock(&L->append_mu);
    return 0;
}

/*
 * Bring layer `one` of a sequence back from storage when it is not in
 * memory (evicted, or cold since a lazy open). A layer is the unit: the first
 * call on one layer of a cold sequence reads that layer's records, not the
 * others'. The sequence counts as resident (evicted 0) once every layer is.
 */
static int page_in(kvs_store_t *s, seq_t *q, uint32_t one) {
    int rc = 0, loaded = 0;
    int64_t bytes = 0;
    kvs__lock(&q->page_mu, KVS__RANK_PAGE, 0);
    if (!atomic_load(&q->evicted) || !s->db)
        goto out;
    if (q->damage) { /* found by an earlier read: never read again */
        rc = kvs__fail(s, KVS_EQUARANTINED, "sequence %llu: %s",
                       (unsigned long long)q->id, q->damage);
        goto out;
    }
    if (atomic_load(&q->dropped)) {
        rc = kvs__fail(s, KVS_ENOSEQ, "sequence %llu was dropped",
                       (unsigned long long)q->id);
        goto out;
    }
    /* `resident` changes only under page_mu (and the layer's write lock),
     * so it can be read here without the layer's lock. */
    int all = 1;
    for (uint32_t l = 0; l < q->geo.n_layers && !rc; l++) {
        if (q->layers[l].resident)
            continue;
        if (l != one) {
            all = 0;
            continue;
        }
        rc = page_in_layer(s, q, l, &bytes);
        if (rc == 1)
            rc = KVS_ENOSEQ; /* the message is set */
        loaded += !rc;
    }
    if (!rc) {
        /* A first read after a lazy open is no page-in: nothing was
         * evicted. The sequence stays cold until every layer is read. */
        int was_cold =
            all ? atomic_exchange(&q->cold, 0) : atomic_load(&q->cold);
        if (loaded && !was_cold)
            atomic_fetch_add(&s->page_ins, 1);
        if (all)
            atomic_store(&q->evicted, 0);
    }
out:
    kvs__unlock(&q->page_mu);
    if (!rc)
        kvs__enforce_budget(s, q);
    return rc;
}

int kvs__page_in(kvs_store_t *s, seq_t *q) {
    /* Layer by layer, page_mu released between them: a call needing
     * another layer (of a sequence the warm-up is reading) waits for one
     * layer's read, not the sequence's. */
    int rc = 0;
    for (uint32_t l = 0; l < q->geo.n_layers && !rc; l++)
        rc = page_in(s, q, l);
    return rc;
}

int kvs__page_in_layer(kvs_store_t *s, seq_t *q, uint32_t layer) {
    return page_in(s, q, layer);
}

int kvs__layer_lock(kvs_store_t *s, seq_t *q, layer_t *L, int write) {
    const uint32_t no = (uint32_t)(L - q->layers);
    for (;;) {
        if (write)
            kvs__wrlock(&L->lock, no);
        else
            kvs__rdlock(&L->lock, no);
        if (L->resident)
            return 0;
        kvs__rwunlock(&L->lock);
        int rc = kvs__page_in_layer(s, q, no);
        if (rc)
            return rc;
    }
}

/* ---------------------------------------------------------------------- */
/* Warm-up after a lazy open                                              */

static int id_cmp(const void *a, const void *b) {
    uint64_t x = (*(seq_t *const *)a)->id, y = (*(seq_t *const *)b)->id;
    return (x > y) - (x < y);
}

/* The K/V and index bytes a cold sequence will take once read: its rows
 * plus a quarter for what segments add (centroids, value sums, codes), an
 * overestimate so that the warm-up's page-in does not push the budget
 * over and evict. */
static uint64_t cold_bytes(const seq_t *q) {
    uint64_t b = 0;
    for (uint32_t l = 0; l < q->geo.n_layers; l++)
        b += q->layers[l].tokens * 2 * q->row_bytes * q->geo.n_kv_heads;
    return b + b / 4;
}

/*
 * KVS_LOAD_WARM: read every sequence the lazy open left on disk, in id
 * order, through the same page-in as a first use (so a call on a sequence
 * the warm-up has not reached reads it itself, and one on the sequence
 * being read waits for that read on its page_mu). It only fills free
 * budget: a sequence that would not fit memory_bytes beside what is
 * resident is left for its first use, so the warm-up never evicts what
 * calls are using. One pass; stops when the store closes.
 */
void *kvs__warmup_main(void *arg) {
    kvs_store_t *s = arg;
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    size_t n = 0;
    seq_t **c = malloc((s->n_seqs ? s->n_seqs : 1) * sizeof *c);
    if (c)
        for (size_t b = 0; b < s->n_buckets; b++)
            for (seq_t *q = s->buckets[b]; q; q = q->next)
                if (atomic_load(&q->cold) && !atomic_load(&q->unlinking)) {
                    atomic_fetch_add(&q->refs, 1);
                    c[n++] = q;
                }
    kvs__unlock(&s->map_mu);
    if (!c)
        return NULL;
    qsort(c, n, sizeof *c, id_cmp);
    uint64_t budget = s->opts.memory_bytes;
    for (size_t i = 0; i < n; i++) {
        seq_t *q = c[i];
        /* damage is checked by the page-in, under page_mu */
        if (!atomic_load(&s->stopping) && atomic_load(&q->cold) &&
            atomic_load(&q->evicted) && !atomic_load(&q->dropped) &&
            (!budget ||
             (uint64_t)atomic_load(&s->resident_bytes) + cold_bytes(q) <=
                 budget)) {
            int rc = kvs__page_in(s, q);
            if (rc && rc != KVS_ECLOSED && rc != KVS_ENOSEQ &&
                rc != KVS_EQUARANTINED)
                kvs__store_log(s, KVS_LOG_WARN, "warm-up of sequence %llu: %s",
                               (unsigned long long)q->id, kvs_strerror(rc));
        }
        kvs__seq_unref(q);
    }
    free(c);
    return NULL;
}
