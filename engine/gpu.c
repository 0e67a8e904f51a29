/*
 * gpu.c: the engine's GPU attend path (gpu_int.h): layer mirrors kept in step
 * with the CPU wave index, and the decode step through the wave buffer.
 * Built where the CUDA parts are (buffer/, kernels/cuda/); gpu_none.c
 * stands in for it elsewhere.
 */
#include "gpu_int.h"

#include "kvs_buffer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* kvs_options_t.cuda_profile: where the host time of a GPU attend goes, per
 * phase, given to the store's log callback at close (for tuning the engine
 * path). */
enum { PH_LOCK, PH_SYNC, PH_STEP, PH_POST, PH_N };
static const char *const ph_name[PH_N] = {"lock+device", "mirror sync", "step",
                                          "stats"};

static uint64_t ns_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define SLOT_TOKENS 32         /* rows per cache slot: 2x the mean cluster */
#define KVS_MAX_HEADS_GPU 1024 /* = KVS_MAX_HEADS */

struct kvs__gpu_s {
    kvs__gpu_params_t p;
    /* K/V of layers kept in GPU memory: up to kv_budget bytes (half the
     * device memory free at open, or of memory_bytes) */
    uint64_t kv_budget;
    atomic_uint_fast64_t kv_used;
    atomic_uint_fast64_t attends, fallbacks, errors, bytes_gpu, bytes_pinned,
        lookups, hits, bytes_bus, bytes_uploaded, mirrors_built, builds,
        build_errors;
    int profile;
    atomic_uint_fast64_t ph_ns[PH_N], ph_calls;
    /* Layers holding a wave buffer, most recently attended first. Over
     * memory_bytes (or when the GPU is out of memory) a new buffer evicts
     * the least recently used ones (mirror_evict) instead of being
     * refused. Lock order: a layer's mu, then lru_mu, then other layers'
     * mu by trylock only (a busy layer is never waited for, so two layers
     * evicting each other cannot deadlock). */
    pthread_mutex_t lru_mu;
    kvs__gpu_layer_t *lru_first, *lru_last;
    atomic_uint_fast64_t mirrors_evicted;
    /* segment k-means: one context for every builder thread */
    pthread_mutex_t build_mu;
    kvs_cuda_cluster_t *cl;
};

int kvs__gpu_cluster(kvs__gpu_t *g, kvs_dtype_t dtype, uint32_t d, uint32_t n,
                     const void *keys, const kvs_build_params_t *bp,
                     uint32_t *label, uint32_t *k) {
    if (!g || d != KVS_CUDA_HEAD_DIM ||
        (dtype != KVS_DTYPE_F16 && dtype != KVS_DTYPE_BF16) ||
        bp->cluster_tokens == 0 || bp->kmeans_iters == 0)
        return KVS_ENOTSUP;
    kvs_cuda_kmeans_params_t kp = {
        .segment_tokens = n,
        .cluster_tokens = bp->cluster_tokens,
        .iters = bp->kmeans_iters,
        .seed = bp->seed,
        .steady_lo = 0, /* the views are the CPU segment's business */
        .steady_hi = UINT32_MAX,
    };
    pthread_mutex_lock(&g->build_mu);
    int rc = g->cl ? 0 : kvs_cuda_cluster_new(g->p.device, &g->cl);
    if (!rc)
        rc = kvs_cuda_cluster_run(g->cl, &kp, dtype, n, keys, label, k);
    if (!rc)
        atomic_fetch_add(&g->builds, 1);
    else if (rc != KVS_ENOTSUP)
        atomic_fetch_add(&g->build_errors, 1);
    pthread_mutex_unlock(&g->build_mu);
    return rc;
}

struct kvs__gpu_layer_s {
    pthread_mutex_t mu;
    kvs_wbuf_t *wb; /* NULL: nothing uploaded; owns its stream */
    /* in g's LRU list while wb is held (under g->lru_mu) */
    kvs__gpu_layer_t *lru_prev, *lru_next;
    int in_lru;
    /* geometry and plan of wb */
    kvs_dtype_t dtype;
    uint32_t H, G, C_cap, N_cap, S_cap;
    float rf, ef, scale;
    uint64_t held_gpu, held_pinned, held_kv;
    /* A buffer was refused (over cuda_memory_bytes, or the GPU out of
     * memory) while the mirrors held refused_at bytes: no new attempt
     * until some memory is given back, so that a layer over the budget
     * does not allocate and free a whole buffer on every call. */
    int refused;
    uint64_t refused_at;
    /* what has been uploaded */
    uint32_t n_segments, seg_cap;
    const kvs_segment_t **segs; /* [H][seg_cap] */
    uint32_t *cbase, *tbase;    /* [H][seg_cap + 1] */
    uint32_t *n_valid;          /* [H][seg_cap] clusters with count > 0 */
    uint64_t indexed;           /* indexed tokens of the steady zone */
    uint32_t steady_idx;        /* steady rows inside segments */
    uint32_t tail_up;           /* tail rows uploaded */
    /* host scratch for one segment's cluster arrays */
    void *tmp_vm;
    uint32_t *tmp_cnt, *tmp_off, *tmp_pos;
    uint8_t *tmp_flag;
    char *tmp_sk, *tmp_sv;
    size_t tmp_clusters, tmp_tokens, tmp_steady;
    kvs_wbuf_stats_t seen; /* wave buffer stats already counted */
};

int kvs__gpu_open(const kvs__gpu_params_t *p, kvs__gpu_t **out, char *why,
                  size_t why_len) {
    *out = NULL;
    if (!p || p->device < 0)
        return 0;
    if (!(p->cache_fraction > 0 && p->cache_fraction <= 1))
        return KVS_EINVAL;
    size_t free_b = 0;
    char name[256];
    if (kvs_cuda_device_check(p->device, 9, &free_b, name, sizeof name, why,
                              why_len))
        return 0; /* the CPU path serves; `why` says why */
    kvs__gpu_t *g = calloc(1, sizeof *g);
    if (!g)
        return KVS_ENOMEM;
    g->p = *p;
    g->profile = p->profile;
    pthread_mutex_init(&g->build_mu, NULL);
    pthread_mutex_init(&g->lru_mu, NULL);
    g->kv_budget = p->kv_host_only   ? 0
                   : p->memory_bytes ? p->memory_bytes / 2
                                     : (uint64_t)free_b / 2;
    snprintf(why, why_len, "CUDA device %d: %s", p->device, name);
    *out = g;
    return 0;
}

void kvs__gpu_close(kvs__gpu_t *g) {
    if (!g)
        return;
    const uint64_t calls = atomic_load(&g->ph_calls);
    if (g->profile && calls && g->p.log) {
        char msg[256];
        int at = snprintf(msg, sizeof msg,
                          "GPU attend host time, mean over %llu calls:",
                          (unsigned long long)calls);
        for (int i = 0; i < PH_N && at > 0 && (size_t)at < sizeof msg; i++)
            at +=
                snprintf(msg + at, sizeof msg - at, " %s %.1f us%s", ph_name[i],
                         atomic_load(&g->ph_ns[i]) / 1e3 / (double)calls,
                         i + 1 < PH_N ? "," : "");
        g->p.log(g->p.log_ctx, KVS_LOG_INFO, msg);
    }
    kvs_cuda_cluster_free(g->cl);
    pthread_mutex_destroy(&g->build_mu);
    pthread_mutex_destroy(&g->lru_mu);
    free(g);
}

static void scratch_free(kvs__gpu_layer_t *m) {
    free(m->tmp_vm);
    free(m->tmp_cnt);
    free(m->tmp_off);
    free(m->tmp_pos);
    free(m->tmp_flag);
    free(m->tmp_sk);
    free(m->tmp_sv);
    m->tmp_vm = NULL;
    m->tmp_cnt = m->tmp_off = m->tmp_pos = NULL;
    m->tmp_flag = NULL;
    m->tmp_sk = m->tmp_sv = NULL;
    m->tmp_clusters = m->tmp_tokens = m->tmp_steady = 0;
}

/* LRU list of layers holding a buffer; callers hold g->lru_mu. */
static void lru_unlink(kvs__gpu_t *g, kvs__gpu_layer_t *m) {
    if (!m->in_lru)
        return;
    if (m->lru_prev)
        m->lru_prev->lru_next = m->lru_next;
    else
        g->lru_first = m->lru_next;
    if (m->lru_next)
        m->lru_next->lru_prev = m->lru_prev;
    else
        g->lru_last = m->lru_prev;
    m->lru_prev = m->lru_next = NULL;
    m->in_lru = 0;
}

/* Marks m (holding its mu and a buffer) most recently used. */
static void lru_touch(kvs__gpu_t *g, kvs__gpu_layer_t *m) {
    pthread_mutex_lock(&g->lru_mu);
    if (g->lru_first != m) {
        lru_unlink(g, m);
        m->lru_next = g->lru_first;
        if (g->lru_first)
            g->lru_first->lru_prev = m;
        g->lru_first = m;
        if (!g->lru_last)
            g->lru_last = m;
        m->in_lru = 1;
    }
    pthread_mutex_unlock(&g->lru_mu);
}

static void mirror_release(kvs__gpu_t *g, kvs__gpu_layer_t *m);

/* Gives back the least recently used other layer's buffer (one that is
 * not in use right now); 0 if none could be. The caller holds m->mu. */
static int mirror_evict(kvs__gpu_t *g, const kvs__gpu_layer_t *m) {
    pthread_mutex_lock(&g->lru_mu);
    kvs__gpu_layer_t *v = g->lru_last;
    while (v && (v == m || pthread_mutex_trylock(&v->mu) != 0))
        v = v->lru_prev;
    if (v)
        lru_unlink(g, v);
    pthread_mutex_unlock(&g->lru_mu);
    if (!v)
        return 0;
    mirror_release(g, v); /* the next attend of v uploads it again */
    pthread_mutex_unlock(&v->mu);
    atomic_fetch_add(&g->mirrors_evicted, 1);
    return 1;
}

/* Everything but the mutex: back to "nothing uploaded". */
static void mirror_release(kvs__gpu_t *g, kvs__gpu_layer_t *m) {
    pthread_mutex_lock(&g->lru_mu);
    lru_unlink(g, m);
    pthread_mutex_unlock(&g->lru_mu);
    if (m->wb) {
        kvs_wbuf_free(m->wb);
        m->wb = NULL;
        atomic_fetch_sub(&g->bytes_gpu, m->held_gpu);
        atomic_fetch_sub(&g->bytes_pinned, m->held_pinned);
        atomic_fetch_sub(&g->kv_used, m->held_kv);
        m->held_gpu = m->held_pinned = m->held_kv = 0;
    }
    free(m->segs);
    free(m->cbase);
    free(m->tbase);
    free(m->n_valid);
    m->segs = NULL;
    m->cbase = m->tbase = m->n_valid = NULL;
    m->n_segments = m->seg_cap = 0;
    m->tail_up = m->steady_idx = 0;
    m->indexed = 0;
    scratch_free(m);
}

void kvs__gpu_layer_free(kvs__gpu_t *g, kvs__gpu_layer_t *m) {
    if (!m)
        return;
    if (g) {
        /* an evictor may hold m->mu: wait for it (after release, m is in
         * no list, so no evictor can find it again) */
        pthread_mutex_lock(&m->mu);
        mirror_release(g, m);
        pthread_mutex_unlock(&m->mu);
    }
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static uint32_t grow(uint64_t need, uint64_t floor_) {
    uint64_t x = need + need / 2;
    if (x < floor_)
        x = floor_;
    return x > UINT32_MAX ? UINT32_MAX : (uint32_t)x;
}

/* A fresh wave buffer for at least these extents. */
static int mirror_alloc(kvs__gpu_t *g, kvs__gpu_layer_t *m,
                        const kvs_head_view_t *v, uint32_t H, uint32_t G,
                        uint64_t C_need, uint64_t N_need, uint64_t S_need,
                        const kvs_zone_params_t *zp) {
    mirror_release(g, m);
    if (m->refused && atomic_load(&g->bytes_gpu) >= m->refused_at)
        return KVS_ENOTSUP; /* nothing was given back since */
    const uint32_t seg = g->p.segment_tokens;
    m->dtype = v->dtype;
    m->H = H;
    m->G = G;
    m->C_cap = grow(C_need, 1024);
    m->N_cap = grow(N_need, 2ull * seg);
    /* sinks + window + a tail of up to two segments (builds lag behind) */
    m->S_cap = grow(S_need, (uint64_t)g->p.sink_tokens + g->p.window_tokens +
                                2ull * seg);
    m->rf = zp->retrieval_fraction;
    m->ef = zp->estimation_fraction;
    m->scale = zp->scale;
    uint32_t slots = (uint32_t)((double)g->p.cache_fraction * m->C_cap);
    slots = slots ? slots : 1;
    /* K/V in GPU memory while they fit the budget: no bus reads */
    const uint64_t kv_bytes =
        2ull * H * m->N_cap * kvs_dtype_size(v->dtype) * v->d;
    int on_device = 0;
    if (g->kv_budget) {
        uint64_t used = atomic_fetch_add(&g->kv_used, kv_bytes);
        on_device = used + kv_bytes <= g->kv_budget;
        if (!on_device)
            atomic_fetch_sub(&g->kv_used, kv_bytes);
    }
    kvs_wbuf_params_t bp = {
        .dtype = v->dtype,
        .d = v->d,
        .n_heads = H,
        .group = G,
        .max_clusters = m->C_cap,
        .max_tokens = m->N_cap,
        .n_steady = m->S_cap,
        .slot_tokens = SLOT_TOKENS,
        .slots_per_head = slots,
        .policy = KVS_WBUF_LRU,
        .kv_on_device = on_device,
        .device = g->p.device,
        .wave = {.retrieval_fraction = m->rf,
                 .estimation_fraction = m->ef,
                 .scale = m->scale},
    };
    int rc;
    /* the GPU out of memory: evict other layers' buffers until it fits */
    while ((rc = kvs_wbuf_new(&bp, &m->wb)) == KVS_ENOMEM && mirror_evict(g, m))
        ;
    if (rc) {
        if (on_device)
            atomic_fetch_sub(&g->kv_used, kv_bytes);
        if (rc != KVS_ENOMEM)
            return rc;
        /* GPU or pinned memory full: the CPU serves this layer for now */
        m->refused = 1;
        m->refused_at = atomic_load(&g->bytes_gpu);
        return KVS_ENOTSUP;
    }
    m->held_kv = on_device ? kv_bytes : 0;
    kvs_wbuf_stats(m->wb, &m->seen);
    m->held_gpu = m->seen.bytes_gpu;
    m->held_pinned = m->seen.bytes_host;
    atomic_fetch_add(&g->bytes_gpu, m->held_gpu);
    atomic_fetch_add(&g->bytes_pinned, m->held_pinned);
    lru_touch(g, m);
    /* over the budget: least recently used layers make room; if they
     * cannot (this layer alone is over it), the CPU serves this one */
    while (g->p.memory_bytes &&
           atomic_load(&g->bytes_gpu) > g->p.memory_bytes && mirror_evict(g, m))
        ;
    if (g->p.memory_bytes && atomic_load(&g->bytes_gpu) > g->p.memory_bytes) {
        mirror_release(g, m);
        m->refused = 1;
        m->refused_at = atomic_load(&g->bytes_gpu);
        return KVS_ENOTSUP; /* over the GPU budget: CPU path */
    }
    m->refused = 0;
    m->seg_cap = 16;
    m->segs = calloc((size_t)H * m->seg_cap, sizeof *m->segs);
    m->cbase = calloc((size_t)H * (m->seg_cap + 1), 4);
    m->tbase = calloc((size_t)H * (m->seg_cap + 1), 4);
    m->n_valid = calloc((size_t)H * m->seg_cap, 4);
    if (!m->segs || !m->cbase || !m->tbase || !m->n_valid)
        return KVS_ENOMEM;
    atomic_fetch_add(&g->mirrors_built, 1);
    return 0;
}

static int seg_table_grow(kvs__gpu_layer_t *m, uint32_t need) {
    if (need <= m->seg_cap)
        return 0;
    uint32_t cap = m->seg_cap;
    while (cap < need)
        cap *= 2;
    const uint32_t H = m->H;
    const kvs_segment_t **segs = calloc((size_t)H * cap, sizeof *segs);
    uint32_t *cb = calloc((size_t)H * (cap + 1), 4);
    uint32_t *tb = calloc((size_t)H * (cap + 1), 4);
    uint32_t *nv = calloc((size_t)H * cap, 4);
    if (!segs || !cb || !tb || !nv) {
        free(segs);
        free(cb);
        free(tb);
        free(nv);
        return KVS_ENOMEM;
    }
    for (uint32_t h = 0; h < H; h++) {
        memcpy(segs + (size_t)h * cap, m->segs + (size_t)h * m->seg_cap,
               m->seg_cap * sizeof *segs);
        memcpy(cb + (size_t)h * (cap + 1),
               m->cbase + (size_t)h * (m->seg_cap + 1), (m->seg_cap + 1) * 4);
        memcpy(tb + (size_t)h * (cap + 1),
               m->tbase + (size_t)h * (m->seg_cap + 1), (m->seg_cap + 1) * 4);
        memcpy(nv + (size_t)h * cap, m->n_valid + (size_t)h * m->seg_cap,
               m->seg_cap * 4);
    }
    free(m->segs);
    free(m->cbase);
    free(m->tbase);
    free(m->n_valid);
    m->segs = segs;
    m->cbase = cb;
    m->tbase = tb;
    m->n_valid = nv;
    m->seg_cap = cap;
    return 0;
}

static int scratch_fit(kvs__gpu_layer_t *m, size_t row, size_t clusters,
                       size_t tokens, size_t steady) {
    if (clusters > m->tmp_clusters) {
        void *vm = realloc(m->tmp_vm, clusters * row);
        if (vm)
            m->tmp_vm = vm;
        uint32_t *c = realloc(m->tmp_cnt, clusters * 4);
        if (c)
            m->tmp_cnt = c;
        uint32_t *o = realloc(m->tmp_off, (clusters + 1) * 4);
        if (o)
            m->tmp_off = o;
        uint8_t *f = realloc(m->tmp_flag, clusters);
        if (f)
            m->tmp_flag = f;
        if (!vm || !c || !o || !f)
            return KVS_ENOMEM;
        m->tmp_clusters = clusters;
    }
    if (tokens > m->tmp_tokens) {
        uint32_t *p = realloc(m->tmp_pos, tokens * 4);
        if (!p)
            return KVS_ENOMEM;
        m->tmp_pos = p;
        m->tmp_tokens = tokens;
    }
    if (steady > m->tmp_steady) {
        char *k = realloc(m->tmp_sk, steady * row);
        if (k)
            m->tmp_sk = k;
        char *v = realloc(m->tmp_sv, steady * row);
        if (v)
            m->tmp_sv = v;
        if (!k || !v)
            return KVS_ENOMEM;
        m->tmp_steady = steady;
    }
    return 0;
}

/* Cluster views of segment si of head h (counts, value means, flags with
 * its steady members left out as seen while `is_last`); tokens too when
 * `with_tokens`. */
static int put_segment(kvs__gpu_t *g, kvs__gpu_layer_t *m, uint32_t h,
                       uint32_t si, const kvs_segment_t *seg, int is_last,
                       int with_tokens) {
    const size_t row = kvs_dtype_size(seg->dtype) * seg->d;
    const uint32_t nc = seg->n_clusters, nt = seg->n_tokens;
    uint32_t *cb = m->cbase + (size_t)h * (m->seg_cap + 1);
    uint32_t *tb = m->tbase + (size_t)h * (m->seg_cap + 1);
    int rc = scratch_fit(m, row, nc, with_tokens ? nt : 0, 0);
    if (rc)
        return rc;
    const uint8_t mask =
        is_last ? (KVS_ADJ_ALWAYS | KVS_ADJ_LAST) : KVS_ADJ_ALWAYS;
    uint32_t valid = 0;
    for (uint32_t c = 0; c < nc; c++) {
        const void *mean;
        m->tmp_cnt[c] = kvs_segment_cluster_view(seg, c, is_last, &mean);
        memcpy((char *)m->tmp_vm + c * row, mean, row);
        m->tmp_flag[c] = (seg->adj_flags[c] & mask) != 0;
        m->tmp_off[c] = tb[si] + seg->offsets[c];
        valid += m->tmp_cnt[c] > 0;
    }
    m->tmp_off[nc] = tb[si] + seg->offsets[nc];
    m->n_valid[(size_t)h * m->seg_cap + si] = valid;
    if ((rc = kvs_wbuf_put_clusters(m->wb, h, cb[si], nc, seg->centroids,
                                    m->tmp_vm, m->tmp_cnt, m->tmp_flag,
                                    m->tmp_off, kvs_wbuf_stream(m->wb))))
        return rc;
    uint64_t up = (uint64_t)nc * (2 * row + 9);
    if (with_tokens) {
        for (uint32_t t = 0; t < nt; t++)
            m->tmp_pos[t] = (uint32_t)(seg->first_pos + seg->positions[t]);
        if ((rc = kvs_wbuf_put_tokens(m->wb, h, tb[si], nt, m->tmp_pos,
                                      seg->keys, seg->values,
                                      kvs_wbuf_stream(m->wb))))
            return rc;
        up += (uint64_t)nt * (2 * row + 4);
    }
    atomic_fetch_add(&g->bytes_uploaded, up);
    return 0;
}

/* The steady rows inside segments (sinks, window) of head h, rewritten. */
static int put_steady_indexed(kvs__gpu_t *g, kvs__gpu_layer_t *m, uint32_t h,
                              const kvs_head_view_t *v, uint32_t *rows) {
    const size_t row = kvs_dtype_size(v->dtype) * v->d;
    const uint32_t cap = v->sink_tokens + v->window_tokens;
    int rc = scratch_fit(m, row, 0, 0, cap ? cap : 1);
    if (rc)
        return rc;
    uint32_t n = 0;
    for (uint32_t si = 0; si < v->n_segments; si++) {
        const kvs_segment_t *seg = v->segments[si];
        if (si != 0 && si + 1 != v->n_segments)
            continue; /* sinks live in the first, the window in the last */
        for (uint32_t t = 0; t < seg->n_tokens; t++) {
            const uint64_t pos = seg->first_pos + seg->positions[t];
            if (!kvs_head_is_steady(v, pos))
                continue;
            if (n == cap)
                return KVS_ENOTSUP; /* unexpected layout: CPU path */
            memcpy(m->tmp_sk + (size_t)n * row,
                   (const char *)seg->keys + (size_t)t * row, row);
            memcpy(m->tmp_sv + (size_t)n * row,
                   (const char *)seg->values + (size_t)t * row, row);
            n++;
        }
    }
    if ((rc = kvs_wbuf_put_steady(m->wb, h, 0, n, m->tmp_sk, m->tmp_sv,
                                  kvs_wbuf_stream(m->wb))))
        return rc;
    atomic_fetch_add(&g->bytes_uploaded, (uint64_t)n * 2 * row);
    *rows = n;
    return 0;
}

/* Brings the mirror in step with the views. */
static int mirror_sync(kvs__gpu_t *g, kvs__gpu_layer_t *m,
                       const kvs_head_view_t *v, uint32_t H, uint32_t G,
                       const kvs_zone_params_t *zp) {
    const uint32_t nseg = v[0].n_segments;
    uint64_t C_need = 0, N_need = 0;
    for (uint32_t h = 0; h < H; h++) {
        if (v[h].n_segments != nseg || v[h].tail_tokens != v[0].tail_tokens ||
            v[h].indexed_tokens != v[0].indexed_tokens)
            return KVS_ENOTSUP; /* a build is halfway through the heads */
        uint64_t c = 0;
        for (uint32_t si = 0; si < nseg; si++)
            c += v[h].segments[si]->n_clusters;
        C_need = c > C_need ? c : C_need;
    }
    N_need = v[0].indexed_tokens;
    const uint64_t S_need =
        (uint64_t)v[0].sink_tokens + v[0].window_tokens + v[0].tail_tokens;
    if (v[0].indexed_tokens + v[0].tail_tokens > UINT32_MAX)
        return KVS_ENOTSUP; /* positions are 32-bit on the GPU */

    int fresh = !m->wb || C_need > m->C_cap || N_need > m->N_cap ||
                S_need > m->S_cap || nseg < m->n_segments ||
                m->dtype != v[0].dtype || m->rf != zp->retrieval_fraction ||
                m->ef != zp->estimation_fraction || m->scale != zp->scale;
    for (uint32_t h = 0; h < H && !fresh; h++)
        for (uint32_t si = 0; si < m->n_segments && !fresh; si++)
            fresh = m->segs[(size_t)h * m->seg_cap + si] != v[h].segments[si];
    int rc;
    if (fresh && (rc = mirror_alloc(g, m, v, H, G, C_need, N_need, S_need, zp)))
        return rc;
    if ((rc = seg_table_grow(m, nseg + 1)))
        return rc;

    const uint32_t first_new = m->n_segments;
    for (uint32_t h = 0; h < H; h++) {
        uint32_t *cb = m->cbase + (size_t)h * (m->seg_cap + 1);
        uint32_t *tb = m->tbase + (size_t)h * (m->seg_cap + 1);
        /* the old newest segment now shows its window members again */
        if (first_new > 0 && nseg > first_new &&
            (rc = put_segment(g, m, h, first_new - 1,
                              v[h].segments[first_new - 1], 0, 0)))
            return rc;
        for (uint32_t si = first_new; si < nseg; si++) {
            const kvs_segment_t *seg = v[h].segments[si];
            cb[si + 1] = cb[si] + seg->n_clusters;
            tb[si + 1] = tb[si] + seg->n_tokens;
            if ((rc = put_segment(g, m, h, si, seg, si + 1 == nseg, 1)))
                return rc;
            m->segs[(size_t)h * m->seg_cap + si] = seg;
        }
    }
    m->n_segments = nseg;

    /* steady zone: [sinks and window][tail] */
    const size_t row = kvs_dtype_size(v[0].dtype) * v[0].d;
    const uint32_t tail = v[0].tail_tokens;
    if (fresh || nseg != first_new || m->indexed != v[0].indexed_tokens) {
        uint32_t rows = 0;
        for (uint32_t h = 0; h < H; h++) {
            uint32_t r;
            if ((rc = put_steady_indexed(g, m, h, &v[h], &r)))
                return rc;
            if (h > 0 && r != rows)
                return KVS_ENOTSUP;
            rows = r;
        }
        m->steady_idx = rows;
        m->indexed = v[0].indexed_tokens;
        m->tail_up = 0;
    }
    if (tail < m->tail_up)
        m->tail_up = 0; /* cannot happen while indexed is unchanged */
    if (tail > m->tail_up) {
        for (uint32_t h = 0; h < H; h++) {
            const size_t off = (size_t)m->tail_up * row;
            if ((rc = kvs_wbuf_put_steady(m->wb, h, m->steady_idx + m->tail_up,
                                          tail - m->tail_up,
                                          (const char *)v[h].tail_keys + off,
                                          (const char *)v[h].tail_values + off,
                                          kvs_wbuf_stream(m->wb))))
                return rc;
        }
        atomic_fetch_add(&g->bytes_uploaded,
                         (uint64_t)H * (tail - m->tail_up) * 2 * row);
        m->tail_up = tail;
    }
    const uint32_t steady_rows = m->steady_idx + tail;
    if (steady_rows == 0)
        return KVS_ENOTSUP; /* the kernels read 0 as "all rows" */
    uint32_t ncl[KVS_MAX_HEADS_GPU];
    for (uint32_t h = 0; h < H; h++)
        ncl[h] = m->cbase[(size_t)h * (m->seg_cap + 1) + nseg];
    const uint64_t lo = v[0].sink_tokens;
    const uint64_t hi = v[0].indexed_tokens > v[0].window_tokens
                            ? v[0].indexed_tokens - v[0].window_tokens
                            : 0;
    return kvs_wbuf_set_extent(m->wb, ncl, (uint32_t)lo, (uint32_t)hi,
                               steady_rows, kvs_wbuf_stream(m->wb));
}

static void zone_stats(const kvs__gpu_layer_t *m, const kvs_head_view_t *v,
                       uint32_t H, const kvs_wbuf_stats_t *d,
                       kvs_zone_stats_t *st) {
    const uint64_t row2 = 2ull * kvs_dtype_size(v[0].dtype) * v[0].d;
    const uint64_t retrieved_rows =
        row2 ? (d->bytes_hit + d->bytes_miss) / row2 : 0;
    for (uint32_t h = 0; h < H; h++) {
        kvs_zone_stats_t *s = &st[h];
        memset(s, 0, sizeof *s);
        const uint32_t C =
            m->cbase[(size_t)h * (m->seg_cap + 1) + m->n_segments];
        uint32_t valid = 0;
        for (uint32_t si = 0; si < m->n_segments; si++)
            valid += m->n_valid[(size_t)h * m->seg_cap + si];
        uint32_t R, E;
        kvs_zone_sizes(m->rf, m->ef, C, valid, &R, &E);
        s->keys_total = v[h].indexed_tokens + v[h].tail_tokens;
        s->keys_steady = m->steady_idx + v[h].tail_tokens;
        /* retrieved rows of all heads, given to head 0 (the buffer counts
         * per step, not per head); steady members inside retrieved
         * clusters are masked but counted here */
        s->keys_exact = s->keys_steady + (h == 0 ? retrieved_rows : 0);
        s->clusters_total = C;
        s->clusters_retrieved = R;
        s->clusters_estimated = E;
        s->clusters_skipped = C - R - E;
    }
}

/* dev_io: q and out are device memory (kvs__gpu_attend_device). */
static int gpu_attend(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *slot,
                      const kvs_head_view_t *v, uint32_t H, uint32_t G,
                      const float *q, const kvs_zone_params_t *zp,
                      const kvs_rank_params_t *rp, float *out,
                      kvs_zone_stats_t *stats, int dev_io) {
    if (!g)
        return KVS_ENOTSUP;
    /* The kernels rank by centroid; DEFAULT may mean codes on the CPU. */
    if (zp->exact || zp->bounded || rp->rank != KVS_RANK_CENTROID || H == 0 ||
        H > KVS_MAX_HEADS_GPU || v[0].n_segments == 0 ||
        v[0].d != KVS_CUDA_HEAD_DIM ||
        (v[0].dtype != KVS_DTYPE_F16 && v[0].dtype != KVS_DTYPE_BF16) ||
        (G != 1 && G != 2 && G != 4 && G != 8)) {
        atomic_fetch_add(&g->fallbacks, 1);
        return KVS_ENOTSUP;
    }
    kvs__gpu_layer_t *m = atomic_load(slot);
    if (!m) {
        kvs__gpu_layer_t *n = calloc(1, sizeof *n);
        if (!n)
            return KVS_ENOMEM;
        pthread_mutex_init(&n->mu, NULL);
        kvs__gpu_layer_t *expect = NULL;
        if (atomic_compare_exchange_strong(slot, &expect, n)) {
            m = n;
        } else {
            pthread_mutex_destroy(&n->mu);
            free(n);
            m = expect;
        }
    }
    uint64_t t[PH_N + 1] = {0};
    if (g->profile)
        t[0] = ns_now();
    pthread_mutex_lock(&m->mu);
    /* this thread may have another device current (a new buffer makes
     * its own current) */
    int rc = m->wb ? kvs_wbuf_use(m->wb) : 0;
    if (g->profile)
        t[1] = ns_now();
    if (!rc)
        rc = mirror_sync(g, m, v, H, G, zp);
    if (g->profile)
        t[2] = ns_now();
    if (!rc) {
        rc = dev_io ? kvs_wbuf_step_device(m->wb, q, out)
                    : kvs_wbuf_step_host(m->wb, q, out);
        if (g->profile)
            t[3] = ns_now();
    }
    if (!rc) {
        kvs_wbuf_stats_t now, d;
        kvs_wbuf_stats(m->wb, &now);
        d.lookups = now.lookups - m->seen.lookups;
        d.hits = now.hits - m->seen.hits;
        d.bytes_hit = now.bytes_hit - m->seen.bytes_hit;
        d.bytes_miss = now.bytes_miss - m->seen.bytes_miss;
        m->seen = now;
        atomic_fetch_add(&g->lookups, d.lookups);
        atomic_fetch_add(&g->hits, d.hits);
        atomic_fetch_add(&g->bytes_bus, d.bytes_miss);
        atomic_fetch_add(&g->attends, 1);
        lru_touch(g, m);
        if (stats)
            zone_stats(m, v, H, &d, stats);
        if (g->profile) {
            t[4] = ns_now();
            for (int i = 0; i < PH_N; i++)
                atomic_fetch_add(&g->ph_ns[i], t[i + 1] - t[i]);
            atomic_fetch_add(&g->ph_calls, 1);
        }
    } else if (rc == KVS_ENOTSUP) {
        atomic_fetch_add(&g->fallbacks, 1);
    } else {
        /* a CUDA failure: start over from the CPU index next time */
        atomic_fetch_add(&g->errors, 1);
        mirror_release(g, m);
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

int kvs__gpu_attend(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *slot,
                    const kvs_head_view_t *v, uint32_t H, uint32_t G,
                    const float *q, const kvs_zone_params_t *zp,
                    const kvs_rank_params_t *rp, float *out,
                    kvs_zone_stats_t *stats) {
    return gpu_attend(g, slot, v, H, G, q, zp, rp, out, stats, 0);
}

int kvs__gpu_attend_device(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *slot,
                           const kvs_head_view_t *v, uint32_t H, uint32_t G,
                           const float *q_dev, const kvs_zone_params_t *zp,
                           const kvs_rank_params_t *rp, float *out_dev,
                           kvs_zone_stats_t *stats) {
    /* the caller's thread: its current device is the caller's business
     * (torch's, say); the buffer makes its own current */
    const int was = kvs_cuda_current_device();
    int rc = gpu_attend(g, slot, v, H, G, q_dev, zp, rp, out_dev, stats, 1);
    kvs_cuda_restore_device(was);
    return rc;
}

int kvs__gpu_check_ptr(kvs__gpu_t *g, const void *p, size_t n) {
    if (!g)
        return KVS_ENOTSUP;
    return kvs_cuda_device_ptr(g->p.device, p, n) ? KVS_EINVAL : 0;
}

int kvs__gpu_copy(kvs__gpu_t *g, void *dst, const void *src, size_t n,
                  int to_device) {
    if (!g)
        return KVS_ENOTSUP;
    int rc = kvs_cuda_copy(g->p.device, dst, src, n, to_device);
    if (rc && g->p.log) {
        char msg[256];
        snprintf(msg, sizeof msg, "GPU copy of %zu bytes %s the device: %s", n,
                 to_device ? "to" : "from", kvs_cuda_last_error());
        g->p.log(g->p.log_ctx, KVS_LOG_WARN, msg);
    }
    return rc ? KVS_EIO : 0;
}

void kvs__gpu_stats(const kvs__gpu_t *g, kvs__gpu_stats_t *o) {
    memset(o, 0, sizeof *o);
    if (!g) {
        o->device = -1;
        return;
    }
    o->device = g->p.device;
    o->attends = atomic_load(&g->attends);
    o->fallbacks = atomic_load(&g->fallbacks);
    o->errors = atomic_load(&g->errors);
    o->bytes_gpu = atomic_load(&g->bytes_gpu);
    o->bytes_pinned = atomic_load(&g->bytes_pinned);
    o->bytes_kv_device = atomic_load(&g->kv_used);
    o->lookups = atomic_load(&g->lookups);
    o->hits = atomic_load(&g->hits);
    o->bytes_bus = atomic_load(&g->bytes_bus);
    o->bytes_uploaded = atomic_load(&g->bytes_uploaded);
    o->mirrors_built = atomic_load(&g->mirrors_built);
    o->builds = atomic_load(&g->builds);
    o->build_errors = atomic_load(&g->build_errors);
    o->mirrors_evicted = atomic_load(&g->mirrors_evicted);
}
