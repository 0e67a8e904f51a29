/*
 * wave_buffer.c: the wave buffer of kvs_buffer.h: memory, the decode step,
 * and the per-head replacement policies (LRU: a doubly-linked list over
 * the head's slots, most recent first; clock: reference bits and a hand).
 * A slot used by the current step is never a victim, so a step never
 * evicts what it is reading, and the policy never admits more pages than
 * the head has slots. The policy walks each head's retrieval list in
 * cluster order (select leaves it in no fixed order), so the cache's
 * decisions depend on the retrieved set alone and repeat run to run.
 *
 * The staging area lies right behind the slot pool in one allocation, so
 * staged page j of head h is also "slot" H * S + h * rcap + j: the copy
 * miss mode presents its copied misses to the zone kernel as temporary
 * slots (block-table entries written before the zones and reset or
 * replaced by the fill after them) and the kernel needs no change.
 */
#include "kvs_buffer.h"
#include "fill.cuh"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef CUDART_VERSION
#error "CUDART_VERSION: include the CUDA runtime headers"
#endif
/* cudaMemcpyBatchAsync without failIdx is CUDA 13's signature */
#define KVS_WBUF_BATCH (CUDART_VERSION >= 13000)
/* copies per cudaMemcpyBatchAsync call (a step has up to 2 * H * rcap) */
#define KVS_WBUF_BATCH_MAX 256

struct kvs_wbuf_s {
    kvs_wbuf_params_t p;
    uint32_t H, C, N, S, st, rcap, esz;
    kvs_cuda_wave_t *wave;
    kvs_cuda_layer_t layer;
    kvs_cuda_cache_t cache;
    /* device memory we own */
    uint32_t *d_nc, *d_counts, *d_offs, *d_pos;
    uint8_t *d_flags;
    void *d_cent, *d_vmean, *d_sk, *d_sv, *d_slot_k, *d_slot_v;
    void *d_stage_k, *d_stage_v;
    void *d_keys, *d_values; /* kv_on_device */
    int32_t *d_slot_of;
    kvs__fill_t *d_fill;
    kvs__upd_t *d_upd;
    /* pinned host memory */
    void *h_keys, *h_values;
    uint32_t *h_ret, *h_nret;
    uint32_t *h_nc; /* pinned [H]: n_clusters last sent (set_extent) */
    int nc_sent;    /* h_nc holds what the device has */
    kvs__fill_t *h_fill;
    kvs__upd_t *h_upd;
    /* copy miss mode: temporary block-table entries (pinned, device),
     * the copies of one step, a second stream and its event */
    kvs__upd_t *h_tmp, *d_tmp;
    void **cp_dst, **cp_src;
    size_t *cp_size;
    cudaStream_t side;
    cudaEvent_t ev_copied;
    /* host policy state */
    uint32_t *offs;       /* [H][C+1] */
    int32_t *slot_of;     /* [H][C] mirror of the block table */
    int32_t *slot_cl;     /* [H*S] cluster in slot, -1 free */
    uint64_t *stamp;      /* [H*S] last step that used the slot */
    int32_t *prev, *next; /* [H*S] LRU list links (local slot ids) */
    int32_t *mru, *lru;   /* [H] list ends */
    uint8_t *ref;         /* [H*S] clock reference bits */
    uint32_t *hand;       /* [H] clock hands */
    uint32_t *ord;        /* [H][rcap] list indices in cluster order */
    uint32_t *n_ord;      /* [H] */
    uint64_t *mark;       /* [C / 64 + 1] one head's retrieved clusters */
    uint32_t *at;         /* [C] list index of a retrieved cluster */
    uint64_t step;
    cudaEvent_t ev_lists;
    /* host-driven use: own stream, one step's queries/outputs (device and
     * pinned host copies, [H][group][d] fp32) */
    cudaStream_t own;
    float *d_q, *d_out, *h_q, *h_out;
    size_t q_floats;
    kvs_wbuf_stats_t stats;
};

static void cache_reset(kvs_wbuf_t *wb);

static int cu(cudaError_t e) {
    return kvs_cuda_err(e);
}

int kvs_wbuf_new(const kvs_wbuf_params_t *p, kvs_wbuf_t **out) {
    *out = NULL;
    if (!p || p->d != KVS_CUDA_HEAD_DIM || p->n_heads == 0 ||
        p->max_clusters == 0 || p->max_tokens == 0 ||
        (unsigned)p->miss > KVS_WBUF_MISS_COPY_EACH ||
        (!p->kv_on_device && (p->slot_tokens == 0 || p->slots_per_head == 0 ||
                              p->slots_per_head > p->max_clusters)))
        return KVS_EINVAL;
    int rc = cu(cudaSetDevice(p->device));
    if (rc)
        return rc;
    kvs_wbuf_t *wb = calloc(1, sizeof *wb);
    if (!wb)
        return KVS_ENOMEM;
    wb->p = *p;
    wb->H = p->n_heads;
    wb->C = p->max_clusters;
    wb->N = p->max_tokens;
    /* device-resident K/V: a token cache of one slot keeps the code paths
     * uniform; it is never used */
    wb->S = p->kv_on_device ? 1 : p->slots_per_head;
    wb->st = p->kv_on_device ? 1 : p->slot_tokens;
    wb->esz = (uint32_t)kvs_dtype_size(p->dtype);
    const size_t H = wb->H, C = wb->C, N = wb->N, S = wb->S, D = p->d;
    const size_t row = D * wb->esz;
    kvs_cuda_layer_t *L = &wb->layer;
    L->dtype = p->dtype;
    L->d = p->d;
    L->n_heads = p->n_heads;
    L->group = p->group;
    L->max_clusters = p->max_clusters;
    L->max_tokens = p->max_tokens;
    L->n_steady = p->n_steady;
    if ((rc = kvs_cuda_wave_new(L, &p->wave, &wb->wave)) != 0)
        goto err;
    wb->rcap = kvs_cuda_wave_retrieval_cap(wb->wave);
    const size_t R = wb->rcap;
    size_t gpu = 0;
#define DALLOC(ptr, bytes)                                                     \
    do {                                                                       \
        if ((rc = cu(cudaMalloc((void **)&(ptr), (bytes)))) != 0)              \
            goto err;                                                          \
        gpu += (bytes);                                                        \
    } while (0)
    DALLOC(wb->d_nc, H * 4);
    DALLOC(wb->d_counts, H * C * 4);
    DALLOC(wb->d_offs, H * (C + 1) * 4);
    DALLOC(wb->d_pos, H * N * 4);
    DALLOC(wb->d_flags, H * C);
    DALLOC(wb->d_cent, H * C * row);
    DALLOC(wb->d_vmean, H * C * row);
    DALLOC(wb->d_sk, H * (p->n_steady ? p->n_steady : 1) * row);
    DALLOC(wb->d_sv, H * (p->n_steady ? p->n_steady : 1) * row);
    if (p->kv_on_device) {
        DALLOC(wb->d_slot_k, H * S * wb->st * row);
        DALLOC(wb->d_slot_v, H * S * wb->st * row);
        DALLOC(wb->d_keys, H * N * row);
        DALLOC(wb->d_values, H * N * row);
    } else {
        /* slot pool, then staging (see the top of the file) */
        DALLOC(wb->d_slot_k, (H * S + H * R) * wb->st * row);
        DALLOC(wb->d_slot_v, (H * S + H * R) * wb->st * row);
        wb->d_stage_k = (char *)wb->d_slot_k + H * S * wb->st * row;
        wb->d_stage_v = (char *)wb->d_slot_v + H * S * wb->st * row;
        DALLOC(wb->d_tmp, H * R * sizeof(kvs__upd_t));
    }
    DALLOC(wb->d_slot_of, H * C * 4);
    DALLOC(wb->d_fill, H * R * sizeof(kvs__fill_t));
    DALLOC(wb->d_upd, 2 * H * R * sizeof(kvs__upd_t));
    wb->q_floats = H * (p->group ? p->group : 1) * D;
    DALLOC(wb->d_q, wb->q_floats * sizeof(float));
    DALLOC(wb->d_out, wb->q_floats * sizeof(float));
#undef DALLOC
    wb->stats.bytes_gpu = gpu;
#define HALLOC(ptr, bytes)                                                     \
    do {                                                                       \
        if ((rc = cu(cudaHostAlloc((void **)&(ptr), (bytes),                   \
                                   cudaHostAllocMapped))) != 0)                \
            goto err;                                                          \
    } while (0)
    if (!p->kv_on_device) {
        HALLOC(wb->h_keys, H * N * row);
        HALLOC(wb->h_values, H * N * row);
    }
    HALLOC(wb->h_ret, H * R * 4);
    HALLOC(wb->h_nret, H * 4);
    HALLOC(wb->h_nc, H * 4);
    HALLOC(wb->h_fill, H * R * sizeof(kvs__fill_t));
    HALLOC(wb->h_upd, 2 * H * R * sizeof(kvs__upd_t));
    if (!p->kv_on_device)
        HALLOC(wb->h_tmp, H * R * sizeof(kvs__upd_t));
    HALLOC(wb->h_q, wb->q_floats * sizeof(float));
    HALLOC(wb->h_out, wb->q_floats * sizeof(float));
#undef HALLOC
    wb->stats.bytes_host = p->kv_on_device ? 0 : 2 * H * N * row;
    wb->offs = malloc(H * (C + 1) * 4);
    wb->slot_of = malloc(H * C * 4);
    wb->slot_cl = malloc(H * S * 4);
    wb->stamp = malloc(H * S * 8);
    wb->prev = malloc(H * S * 4);
    wb->next = malloc(H * S * 4);
    wb->mru = malloc(H * 4);
    wb->lru = malloc(H * 4);
    wb->ref = malloc(H * S);
    wb->hand = malloc(H * 4);
    wb->ord = malloc(H * R * 4);
    wb->n_ord = malloc(H * 4);
    wb->mark = calloc(C / 64 + 1, 8);
    wb->at = malloc(C * 4);
    wb->cp_dst = malloc(2 * H * R * sizeof(void *));
    wb->cp_src = malloc(2 * H * R * sizeof(void *));
    wb->cp_size = malloc(2 * H * R * sizeof(size_t));
    if (!wb->offs || !wb->slot_of || !wb->slot_cl || !wb->stamp || !wb->prev ||
        !wb->next || !wb->mru || !wb->lru || !wb->ref || !wb->hand ||
        !wb->ord || !wb->n_ord || !wb->mark || !wb->at || !wb->cp_dst ||
        !wb->cp_src || !wb->cp_size) {
        rc = KVS_ENOMEM;
        goto err;
    }
    if ((rc = cu(cudaEventCreateWithFlags(&wb->ev_lists,
                                          cudaEventDisableTiming))) != 0 ||
        (rc = cu(cudaEventCreateWithFlags(&wb->ev_copied,
                                          cudaEventDisableTiming))) != 0 ||
        (rc = cu(cudaStreamCreateWithFlags(&wb->side,
                                           cudaStreamNonBlocking))) != 0 ||
        (rc = cu(cudaStreamCreateWithFlags(&wb->own, cudaStreamNonBlocking))) !=
            0)
        goto err;
    if ((rc = cu(cudaMemset(wb->d_slot_of, 0xff, H * C * 4))) != 0 ||
        (rc = cu(cudaMemset(wb->d_nc, 0, H * 4))) != 0)
        goto err;
    cache_reset(wb);
    L->n_clusters = wb->d_nc;
    L->centroids = wb->d_cent;
    L->value_means = wb->d_vmean;
    L->counts = wb->d_counts;
    L->offsets = wb->d_offs;
    L->steady_flags = wb->d_flags;
    L->positions = wb->d_pos;
    /* pinned: unified addressing makes the host pointer usable */
    L->keys = p->kv_on_device ? wb->d_keys : wb->h_keys;
    L->values = p->kv_on_device ? wb->d_values : wb->h_values;
    L->steady_keys = wb->d_sk;
    L->steady_values = wb->d_sv;
    wb->cache.slot_of = wb->d_slot_of;
    wb->cache.slot_keys = wb->d_slot_k;
    wb->cache.slot_values = wb->d_slot_v;
    wb->cache.slot_tokens = wb->st;
    wb->cache.stage_keys = wb->d_stage_k;
    wb->cache.stage_values = wb->d_stage_v;
    *out = wb;
    return 0;
err:
    kvs_wbuf_free(wb);
    /* a failed cudaMalloc is sticky until read: read it here, so that it
     * does not surface at the next launch check as someone else's error */
    (void)cudaGetLastError();
    return rc;
}

void kvs_wbuf_free(kvs_wbuf_t *wb) {
    if (!wb)
        return;
    cudaSetDevice(wb->p.device);
    if (wb->own)
        cudaStreamSynchronize(wb->own);
    kvs_cuda_wave_free(wb->wave);
    cudaFree(wb->d_nc);
    cudaFree(wb->d_counts);
    cudaFree(wb->d_offs);
    cudaFree(wb->d_pos);
    cudaFree(wb->d_flags);
    cudaFree(wb->d_cent);
    cudaFree(wb->d_vmean);
    cudaFree(wb->d_sk);
    cudaFree(wb->d_sv);
    cudaFree(wb->d_slot_k); /* staging included */
    cudaFree(wb->d_slot_v);
    cudaFree(wb->d_tmp);
    cudaFree(wb->d_keys);
    cudaFree(wb->d_values);
    cudaFree(wb->d_slot_of);
    cudaFree(wb->d_fill);
    cudaFree(wb->d_upd);
    cudaFreeHost(wb->h_keys);
    cudaFreeHost(wb->h_values);
    cudaFreeHost(wb->h_ret);
    cudaFreeHost(wb->h_nret);
    cudaFreeHost(wb->h_nc);
    cudaFreeHost(wb->h_fill);
    cudaFreeHost(wb->h_upd);
    cudaFreeHost(wb->h_tmp);
    if (wb->ev_lists)
        cudaEventDestroy(wb->ev_lists);
    if (wb->ev_copied)
        cudaEventDestroy(wb->ev_copied);
    if (wb->side)
        cudaStreamDestroy(wb->side);
    if (wb->own)
        cudaStreamDestroy(wb->own);
    cudaFree(wb->d_q);
    cudaFree(wb->d_out);
    cudaFreeHost(wb->h_q);
    cudaFreeHost(wb->h_out);
    free(wb->ord);
    free(wb->n_ord);
    free(wb->mark);
    free(wb->at);
    free(wb->cp_dst);
    free(wb->cp_src);
    free(wb->cp_size);
    free(wb->offs);
    free(wb->slot_of);
    free(wb->slot_cl);
    free(wb->stamp);
    free(wb->prev);
    free(wb->next);
    free(wb->mru);
    free(wb->lru);
    free(wb->ref);
    free(wb->hand);
    free(wb);
}

void kvs_wbuf_layer(kvs_wbuf_t *wb, kvs_cuda_layer_t *layer,
                    kvs_cuda_kmeans_out_t *o) {
    *layer = wb->layer;
    if (!o)
        return;
    o->cluster_stride = wb->C;
    o->token_stride = wb->N;
    o->n_clusters = wb->d_nc;
    o->centroids = wb->d_cent;
    o->value_means = wb->d_vmean;
    o->counts = wb->d_counts;
    o->offsets = wb->d_offs;
    o->steady_flags = wb->d_flags;
    o->positions = wb->d_pos;
    o->keys = (void *)wb->layer.keys;
    o->values = (void *)wb->layer.values;
}

static void lru_reset(kvs_wbuf_t *wb, uint32_t h) {
    const uint32_t S = wb->S;
    int32_t *prev = wb->prev + (size_t)h * S, *next = wb->next + (size_t)h * S;
    for (uint32_t s = 0; s < S; s++) {
        prev[s] = (int32_t)s - 1;
        next[s] = s + 1 < S ? (int32_t)s + 1 : -1;
    }
    wb->mru[h] = 0;
    wb->lru[h] = (int32_t)S - 1;
}

/* Empty cache: host policy state (the device block table separately). */
static void cache_reset(kvs_wbuf_t *wb) {
    const size_t H = wb->H, C = wb->C, S = wb->S;
    memset(wb->slot_of, 0xff, H * C * 4);
    memset(wb->slot_cl, 0xff, H * S * 4);
    memset(wb->stamp, 0, H * S * 8);
    memset(wb->ref, 0, H * S);
    memset(wb->hand, 0, H * 4);
    for (uint32_t h = 0; h < H; h++)
        lru_reset(wb, h);
    wb->step = 0;
}

int kvs_wbuf_commit(kvs_wbuf_t *wb, uint32_t steady_lo, uint32_t steady_hi,
                    cudaStream_t stream) {
    const size_t H = wb->H, C = wb->C;
    int rc;
    wb->layer.steady_lo = steady_lo;
    wb->layer.steady_hi = steady_hi;
    if ((rc = cu(cudaMemcpyAsync(wb->offs, wb->d_offs, H * (C + 1) * 4,
                                 cudaMemcpyDeviceToHost, stream))) != 0)
        return rc;
    if ((rc = cu(cudaMemsetAsync(wb->d_slot_of, 0xff, H * C * 4, stream))) != 0)
        return rc;
    if ((rc = cu(cudaStreamSynchronize(stream))) != 0)
        return rc;
    cache_reset(wb);
    return 0;
}

int kvs_wbuf_put_clusters(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                          uint32_t n, const void *centroids,
                          const void *value_means, const uint32_t *counts,
                          const uint8_t *steady_flags, const uint32_t *offsets,
                          cudaStream_t stream) {
    if (head >= wb->H || first > wb->C || n > wb->C - first ||
        offsets[n] > wb->N)
        return KVS_EINVAL;
    if (n == 0)
        return 0;
    const size_t row = (size_t)wb->p.d * wb->esz;
    const size_t c0 = (size_t)head * wb->C + first;
    int rc;
    if ((rc = cu(cudaMemcpyAsync((char *)wb->d_cent + c0 * row, centroids,
                                 n * row, cudaMemcpyHostToDevice, stream))) ||
        (rc = cu(cudaMemcpyAsync((char *)wb->d_vmean + c0 * row, value_means,
                                 n * row, cudaMemcpyHostToDevice, stream))) ||
        (rc = cu(cudaMemcpyAsync(wb->d_counts + c0, counts, n * 4,
                                 cudaMemcpyHostToDevice, stream))) ||
        (rc = cu(cudaMemcpyAsync(wb->d_flags + c0, steady_flags, n,
                                 cudaMemcpyHostToDevice, stream))))
        return rc;
    const size_t o0 = (size_t)head * (wb->C + 1) + first;
    if ((rc = cu(cudaMemcpyAsync(wb->d_offs + o0, offsets, (n + 1) * 4,
                                 cudaMemcpyHostToDevice, stream))))
        return rc;
    memcpy(wb->offs + o0, offsets, (n + 1) * 4);
    return 0;
}

int kvs_wbuf_put_tokens(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                        uint32_t n, const uint32_t *positions, const void *keys,
                        const void *values, cudaStream_t stream) {
    if (head >= wb->H || first > wb->N || n > wb->N - first)
        return KVS_EINVAL;
    if (n == 0)
        return 0;
    const size_t row = (size_t)wb->p.d * wb->esz;
    const size_t t0 = (size_t)head * wb->N + first;
    int rc;
    if (wb->p.kv_on_device) {
        if ((rc = cu(cudaMemcpyAsync((char *)wb->d_keys + t0 * row, keys,
                                     n * row, cudaMemcpyHostToDevice,
                                     stream))) ||
            (rc = cu(cudaMemcpyAsync((char *)wb->d_values + t0 * row, values,
                                     n * row, cudaMemcpyHostToDevice, stream))))
            return rc;
    } else {
        /* new slots: no kernel in flight reads them yet */
        memcpy((char *)wb->h_keys + t0 * row, keys, n * row);
        memcpy((char *)wb->h_values + t0 * row, values, n * row);
    }
    return cu(cudaMemcpyAsync(wb->d_pos + t0, positions, (size_t)n * 4,
                              cudaMemcpyHostToDevice, stream));
}

int kvs_wbuf_put_steady(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                        uint32_t n, const void *keys, const void *values,
                        cudaStream_t stream) {
    const uint32_t ns = wb->p.n_steady;
    if (head >= wb->H || first > ns || n > ns - first)
        return KVS_EINVAL;
    if (n == 0)
        return 0;
    const size_t row = (size_t)wb->p.d * wb->esz;
    const size_t r0 = (size_t)head * ns + first;
    int rc = cu(cudaMemcpyAsync((char *)wb->d_sk + r0 * row, keys, n * row,
                                cudaMemcpyHostToDevice, stream));
    if (!rc)
        rc = cu(cudaMemcpyAsync((char *)wb->d_sv + r0 * row, values, n * row,
                                cudaMemcpyHostToDevice, stream));
    return rc;
}

int kvs_wbuf_set_extent(kvs_wbuf_t *wb, const uint32_t *n_clusters,
                        uint32_t steady_lo, uint32_t steady_hi,
                        uint32_t steady_rows, cudaStream_t stream) {
    for (uint32_t h = 0; h < wb->H; h++)
        if (n_clusters[h] > wb->C)
            return KVS_EINVAL;
    if (steady_rows > wb->p.n_steady || (steady_rows == 0 && wb->p.n_steady))
        return KVS_EINVAL; /* 0 means "all rows" to the kernels */
    wb->layer.steady_lo = steady_lo;
    wb->layer.steady_hi = steady_hi;
    wb->layer.steady_rows = steady_rows;
    uint32_t most = 0;
    for (uint32_t h = 0; h < wb->H; h++)
        most = n_clusters[h] > most ? n_clusters[h] : most;
    /* the kernels launch for the clusters in use, not the capacity */
    wb->layer.clusters_hint = most ? most : 1;
    if (wb->nc_sent && !memcmp(wb->h_nc, n_clusters, (size_t)wb->H * 4))
        return 0; /* a decode step: only the tail moved */
    /* pinned source (no staging copy); a copy of the last change may
     * still be queued: let it finish before h_nc changes */
    int rc;
    if (wb->nc_sent && (rc = cu(cudaStreamSynchronize(stream))) != 0)
        return rc;
    memcpy(wb->h_nc, n_clusters, (size_t)wb->H * 4);
    wb->nc_sent = 1;
    return cu(cudaMemcpyAsync(wb->d_nc, wb->h_nc, (size_t)wb->H * 4,
                              cudaMemcpyHostToDevice, stream));
}

static void lru_unlink(kvs_wbuf_t *wb, uint32_t h, int32_t s) {
    int32_t *prev = wb->prev + (size_t)h * wb->S;
    int32_t *next = wb->next + (size_t)h * wb->S;
    if (prev[s] >= 0)
        next[prev[s]] = next[s];
    else
        wb->mru[h] = next[s];
    if (next[s] >= 0)
        prev[next[s]] = prev[s];
    else
        wb->lru[h] = prev[s];
}

static void lru_front(kvs_wbuf_t *wb, uint32_t h, int32_t s) {
    int32_t *prev = wb->prev + (size_t)h * wb->S;
    int32_t *next = wb->next + (size_t)h * wb->S;
    if (wb->mru[h] == s)
        return;
    lru_unlink(wb, h, s);
    prev[s] = -1;
    next[s] = wb->mru[h];
    if (wb->mru[h] >= 0)
        prev[wb->mru[h]] = s;
    wb->mru[h] = s;
    if (wb->lru[h] < 0)
        wb->lru[h] = s;
}

/* A local slot of head h to (re)use now, or -1. */
static int32_t victim(kvs_wbuf_t *wb, uint32_t h) {
    const uint64_t *stamp = wb->stamp + (size_t)h * wb->S;
    if (wb->p.policy == KVS_WBUF_LRU) {
        const int32_t s = wb->lru[h];
        return s >= 0 && stamp[s] != wb->step ? s : -1;
    }
    uint8_t *ref = wb->ref + (size_t)h * wb->S;
    for (uint32_t k = 0; k < 2 * wb->S; k++) {
        const uint32_t s = wb->hand[h];
        wb->hand[h] = s + 1 < wb->S ? s + 1 : 0;
        if (stamp[s] == wb->step)
            continue;
        if (ref[s]) {
            ref[s] = 0;
            continue;
        }
        return (int32_t)s;
    }
    return -1;
}

static void touch(kvs_wbuf_t *wb, uint32_t h, int32_t s) {
    wb->stamp[(size_t)h * wb->S + s] = wb->step;
    if (wb->p.policy == KVS_WBUF_LRU)
        lru_front(wb, h, s);
    else
        wb->ref[(size_t)h * wb->S + s] = 1;
}

/* Each head's retrieval list (h_ret) as list indices in cluster order
 * (ord, n_ord): a bitmap of the retrieved clusters, read word by word. */
static void lists_order(kvs_wbuf_t *wb) {
    const uint32_t R = wb->rcap, W = wb->C / 64 + 1;
    for (uint32_t h = 0; h < wb->H; h++) {
        const uint32_t *ret = wb->h_ret + (size_t)h * R;
        const uint32_t n_ret = wb->h_nret[h] < R ? wb->h_nret[h] : R;
        uint32_t *ord = wb->ord + (size_t)h * R, k = 0;
        for (uint32_t j = 0; j < n_ret; j++) {
            const uint32_t c = ret[j];
            wb->mark[c >> 6] |= 1ull << (c & 63);
            wb->at[c] = j;
        }
        for (uint32_t w = 0; w < W && k < n_ret; w++) {
            uint64_t m = wb->mark[w];
            wb->mark[w] = 0;
            while (m) {
                ord[k++] = wb->at[w * 64 + (uint32_t)__builtin_ctzll(m)];
                m &= m - 1;
            }
        }
        wb->n_ord[h] = k;
    }
}

/* Appends a copy to the list, or extends the last one when both sides
 * continue it (neighbouring clusters of whole slots). */
static void copy_add(kvs_wbuf_t *wb, size_t *n, size_t base, void *dst,
                     const void *src, size_t bytes) {
    if (*n > base) {
        const size_t k = *n - 1;
        if ((const char *)wb->cp_src[k] + wb->cp_size[k] == src &&
            (char *)wb->cp_dst[k] + wb->cp_size[k] == dst) {
            wb->cp_size[k] += bytes;
            return;
        }
    }
    wb->cp_dst[*n] = dst;
    wb->cp_src[*n] = (void *)src;
    wb->cp_size[*n] = bytes;
    (*n)++;
}

/*
 * Copy miss mode, after the lists are on the host and before the zones
 * are queued: the misses that fit a slot are copied from pinned host
 * memory into their staging pages on the side stream by the copy engines,
 * and their block-table entries point at those pages (slot H * S +
 * h * rcap + j) until the fill after the zones resets or replaces them.
 * `stream` waits for the copies. *n_tmp: the temporary entries (h_tmp).
 */
static int miss_copy(kvs_wbuf_t *wb, cudaStream_t stream, uint32_t *n_tmp) {
    const uint32_t H = wb->H, C = wb->C, S = wb->S, R = wb->rcap;
    const size_t row = (size_t)wb->p.d * wb->esz, slot = wb->st * row;
    const size_t half = (size_t)H * R; /* keys' copies, then values' */
    size_t nk = 0, nv = half;
    uint32_t nt = 0;
    int rc;
    *n_tmp = 0;
    for (uint32_t h = 0; h < H; h++) {
        const uint32_t *offs = wb->offs + (size_t)h * (C + 1);
        const uint32_t *ret = wb->h_ret + (size_t)h * R;
        const uint32_t *ord = wb->ord + (size_t)h * R;
        const int32_t *slot_of = wb->slot_of + (size_t)h * C;
        for (uint32_t i = 0; i < wb->n_ord[h]; i++) {
            const uint32_t j = ord[i], c = ret[j];
            const uint32_t rows = offs[c + 1] - offs[c];
            if (slot_of[c] >= 0 || rows > wb->st || rows == 0)
                continue;
            const size_t src = ((size_t)h * wb->N + offs[c]) * row;
            const size_t dst = ((size_t)h * R + j) * slot;
            copy_add(wb, &nk, 0, (char *)wb->d_stage_k + dst,
                     (const char *)wb->h_keys + src, rows * row);
            copy_add(wb, &nv, half, (char *)wb->d_stage_v + dst,
                     (const char *)wb->h_values + src, rows * row);
            wb->h_tmp[nt++] = (kvs__upd_t){
                h * C + c, (int32_t)((size_t)H * S + (size_t)h * R + j)};
            wb->stats.bytes_copied += 2ull * rows * row;
        }
    }
    if (nt == 0)
        return 0;
    /* one list: the values' copies behind the keys' */
    memmove(wb->cp_dst + nk, wb->cp_dst + half, (nv - half) * sizeof(void *));
    memmove(wb->cp_src + nk, wb->cp_src + half, (nv - half) * sizeof(void *));
    memmove(wb->cp_size + nk, wb->cp_size + half, (nv - half) * sizeof(size_t));
    const size_t n = nk + nv - half;
    wb->stats.copies += n;
    /* the staging pages were last read by the previous fill on `stream` */
    if ((rc = cu(cudaStreamWaitEvent(wb->side, wb->ev_lists, 0))) != 0)
        return rc;
    size_t done = 0;
#if KVS_WBUF_BATCH
    if (wb->p.miss == KVS_WBUF_MISS_COPY) {
        struct cudaMemcpyAttributes at;
        memset(&at, 0, sizeof at);
        at.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        at.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        size_t at_idx = 0;
        while (done < n) {
            const size_t k =
                n - done < KVS_WBUF_BATCH_MAX ? n - done : KVS_WBUF_BATCH_MAX;
            if (cudaMemcpyBatchAsync((void *const *)wb->cp_dst + done,
                                     (const void *const *)wb->cp_src + done,
                                     wb->cp_size + done, k, &at, &at_idx, 1,
                                     wb->side) != cudaSuccess) {
                /* refused (driver, count): the rest one by one;
                 * stats.batches tells */
                (void)cudaGetLastError();
                break;
            }
            wb->stats.batches++;
            done += k;
        }
    }
#endif
    {
        for (size_t i = done; i < n; i++)
            if ((rc = cu(cudaMemcpyAsync(wb->cp_dst[i], wb->cp_src[i],
                                         wb->cp_size[i], cudaMemcpyHostToDevice,
                                         wb->side))) != 0)
                return rc;
    }
    if ((rc = cu(cudaEventRecord(wb->ev_copied, wb->side))) != 0)
        return rc;
    /* temporary block-table entries, while the copies run */
    if ((rc = cu(cudaMemcpyAsync(wb->d_tmp, wb->h_tmp, nt * sizeof(kvs__upd_t),
                                 cudaMemcpyHostToDevice, stream))) != 0)
        return rc;
    if ((rc = kvs__wbuf_fill(NULL, 0, wb->d_tmp, nt, wb->d_slot_of,
                             wb->d_stage_k, wb->d_stage_v, wb->d_slot_k,
                             wb->d_slot_v, wb->st, wb->p.d * wb->esz,
                             stream)) != 0)
        return rc;
    if ((rc = cu(cudaStreamWaitEvent(stream, wb->ev_copied, 0))) != 0)
        return rc;
    *n_tmp = nt;
    return 0;
}

int kvs_wbuf_step(kvs_wbuf_t *wb, const float *q, float *out,
                  cudaStream_t stream) {
    const uint32_t H = wb->H, C = wb->C, S = wb->S, R = wb->rcap;
    const uint64_t row2 = 2ull * wb->p.d * wb->esz; /* K + V bytes per row */
    int rc;
    const uint32_t *d_nret;
    const uint32_t *d_ret = kvs_cuda_wave_retrieved(wb->wave, &d_nret);
    if ((rc = kvs_cuda_wave_select(wb->wave, &wb->layer, q, stream)) != 0)
        return rc;
    if (wb->p.kv_on_device) {
        wb->stats.steps++;
        return kvs_cuda_wave_attend(wb->wave, &wb->layer, NULL, q, out, stream);
    }
    if ((rc = cu(cudaMemcpyAsync(wb->h_ret, d_ret, (size_t)H * R * 4,
                                 cudaMemcpyDeviceToHost, stream))) != 0 ||
        (rc = cu(cudaMemcpyAsync(wb->h_nret, d_nret, (size_t)H * 4,
                                 cudaMemcpyDeviceToHost, stream))) != 0 ||
        (rc = cu(cudaEventRecord(wb->ev_lists, stream))) != 0)
        return rc;
    const int copy = wb->p.miss != KVS_WBUF_MISS_INPLACE;
    uint32_t n_tmp = 0;
    if (copy) {
        /* the zones must wait for the copies, the copies for the lists */
        if ((rc = cu(cudaEventSynchronize(wb->ev_lists))) != 0)
            return rc;
        lists_order(wb);
        if ((rc = miss_copy(wb, stream, &n_tmp)) != 0)
            return rc;
    }
    if ((rc = kvs_cuda_wave_attend(wb->wave, &wb->layer, &wb->cache, q, out,
                                   stream)) != 0)
        return rc;
    if (!copy) {
        if ((rc = cu(cudaEventSynchronize(wb->ev_lists))) != 0)
            return rc;
        lists_order(wb);
    }

    /* replacement policy, on the host while the GPU attends */
    wb->step++;
    uint32_t nf = 0, nu = 0;
    kvs_wbuf_stats_t *st = &wb->stats;
    for (uint32_t h = 0; h < H; h++) {
        const uint32_t *offs = wb->offs + (size_t)h * (C + 1);
        const uint32_t *ret = wb->h_ret + (size_t)h * R;
        const uint32_t *ord = wb->ord + (size_t)h * R;
        int32_t *slot_of = wb->slot_of + (size_t)h * C;
        const uint32_t n_ret = wb->n_ord[h];
        /* hits first, so that this step's pages are protected */
        for (uint32_t i = 0; i < n_ret; i++) {
            const uint32_t c = ret[ord[i]];
            const uint64_t bytes = (uint64_t)(offs[c + 1] - offs[c]) * row2;
            st->lookups++;
            if (slot_of[c] >= 0) {
                st->hits++;
                st->bytes_hit += bytes;
                touch(wb, h, slot_of[c] - (int32_t)(h * S));
            } else {
                st->misses++;
                st->bytes_miss += bytes;
            }
        }
        for (uint32_t i = 0; i < n_ret; i++) {
            const uint32_t j = ord[i], c = ret[j];
            const uint32_t rows = offs[c + 1] - offs[c];
            if (slot_of[c] >= 0)
                continue;
            if (rows > wb->st) {
                st->uncacheable++;
                continue;
            }
            const int32_t s = victim(wb, h);
            if (s < 0)
                continue;
            const int32_t gs = (int32_t)(h * S) + s;
            const int32_t old = wb->slot_cl[gs];
            if (old >= 0) {
                slot_of[old] = -1;
                wb->h_upd[nu++] = (kvs__upd_t){h * C + (uint32_t)old, -1};
                st->evicted++;
            }
            wb->slot_cl[gs] = (int32_t)c;
            slot_of[c] = gs;
            wb->h_upd[nu++] = (kvs__upd_t){h * C + c, gs};
            wb->h_fill[nf++] = (kvs__fill_t){h * R + j, (uint32_t)gs, rows};
            st->inserted++;
            st->bytes_fill += (uint64_t)rows * row2;
            touch(wb, h, s);
        }
    }
    /* temporary entries the policy did not turn into slots: back to -1 */
    for (uint32_t i = 0; i < n_tmp; i++)
        if (wb->slot_of[wb->h_tmp[i].index] < 0)
            wb->h_upd[nu++] = (kvs__upd_t){wb->h_tmp[i].index, -1};
    st->steps++;
    if (nf || nu) {
        if (nf && (rc = cu(cudaMemcpyAsync(
                       wb->d_fill, wb->h_fill, nf * sizeof(kvs__fill_t),
                       cudaMemcpyHostToDevice, stream))) != 0)
            return rc;
        if (nu && (rc = cu(cudaMemcpyAsync(
                       wb->d_upd, wb->h_upd, nu * sizeof(kvs__upd_t),
                       cudaMemcpyHostToDevice, stream))) != 0)
            return rc;
        rc = kvs__wbuf_fill(wb->d_fill, nf, wb->d_upd, nu, wb->d_slot_of,
                            wb->d_stage_k, wb->d_stage_v, wb->d_slot_k,
                            wb->d_slot_v, wb->st, wb->p.d * wb->esz, stream);
        if (rc)
            return rc;
    }
    return 0;
}

int kvs_wbuf_use(kvs_wbuf_t *wb) {
    return cu(cudaSetDevice(wb->p.device));
}

cudaStream_t kvs_wbuf_stream(const kvs_wbuf_t *wb) {
    return wb->own;
}

int kvs_wbuf_step_host(kvs_wbuf_t *wb, const float *q, float *out) {
    const size_t bytes = wb->q_floats * sizeof(float);
    int rc;
    if ((rc = kvs_wbuf_use(wb)) != 0)
        return rc;
    memcpy(wb->h_q, q, bytes);
    if ((rc = cu(cudaMemcpyAsync(wb->d_q, wb->h_q, bytes,
                                 cudaMemcpyHostToDevice, wb->own))) != 0 ||
        (rc = kvs_wbuf_step(wb, wb->d_q, wb->d_out, wb->own)) != 0 ||
        (rc = cu(cudaMemcpyAsync(wb->h_out, wb->d_out, bytes,
                                 cudaMemcpyDeviceToHost, wb->own))) != 0 ||
        (rc = cu(cudaStreamSynchronize(wb->own))) != 0)
        return rc;
    memcpy(out, wb->h_out, bytes);
    return 0;
}

int kvs_wbuf_step_device(kvs_wbuf_t *wb, const float *q, float *out) {
    const size_t bytes = wb->q_floats * sizeof(float);
    int rc;
    if ((rc = kvs_wbuf_use(wb)) != 0)
        return rc;
    /* the kernels move q and out 16 bytes at a time: a tensor that starts
     * elsewhere goes through the buffer's own arrays */
    const int q_odd = ((uintptr_t)q & 15) != 0,
              out_odd = ((uintptr_t)out & 15) != 0;
    if (q_odd &&
        (rc = cu(cudaMemcpyAsync(wb->d_q, q, bytes, cudaMemcpyDeviceToDevice,
                                 wb->own))) != 0)
        return rc;
    if ((rc = kvs_wbuf_step(wb, q_odd ? wb->d_q : q, out_odd ? wb->d_out : out,
                            wb->own)) != 0)
        return rc;
    if (out_odd &&
        (rc = cu(cudaMemcpyAsync(out, wb->d_out, bytes,
                                 cudaMemcpyDeviceToDevice, wb->own))) != 0)
        return rc;
    return cu(cudaStreamSynchronize(wb->own));
}

int kvs_wbuf_sync(kvs_wbuf_t *wb) {
    return cu(cudaStreamSynchronize(wb->own));
}

void kvs_wbuf_set_policy(kvs_wbuf_t *wb, kvs_wbuf_policy_t policy) {
    wb->p.policy = policy;
}

int kvs_wbuf_set_miss(kvs_wbuf_t *wb, kvs_wbuf_miss_t miss) {
    if ((unsigned)miss > KVS_WBUF_MISS_COPY_EACH)
        return KVS_EINVAL;
    wb->p.miss = miss;
    return 0;
}

void kvs_wbuf_stats(const kvs_wbuf_t *wb, kvs_wbuf_stats_t *out) {
    *out = wb->stats;
}

void kvs_wbuf_reset_stats(kvs_wbuf_t *wb) {
    const uint64_t g = wb->stats.bytes_gpu, h = wb->stats.bytes_host;
    memset(&wb->stats, 0, sizeof wb->stats);
    wb->stats.bytes_gpu = g;
    wb->stats.bytes_host = h;
}
