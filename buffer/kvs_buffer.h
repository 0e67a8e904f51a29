/*
 * kvs_buffer.h: the wave buffer: one layer's wave index served from the
 * GPU while the keys and values live in pinned host memory.
 *
 * GPU-resident: all centroids and cluster metadata, the steady zone, and a
 * cache of cluster pages (a fixed pool of slots of slot_tokens rows, one
 * cluster per slot, slots_per_head slots for each head, a block table
 * cluster -> slot, LRU or clock replacement per head). Host-resident:
 * every cluster's keys and values, cluster-ordered, in mapped pinned
 * memory.
 *
 * A decode step (kvs_wbuf_step): the GPU scores the centroids and selects
 * the zones; the retrieval list is copied back while the GPU attends: hits
 * from their slots, misses read straight from pinned host memory by the
 * same kernel (unified addressing), which also stages the missed pages in
 * GPU memory; the log-sum-exp merge gives the output. Meanwhile the host
 * runs the replacement policy on the retrieval list; after the step a
 * fill kernel copies the chosen staged pages into their slots (device to
 * device) and updates the block table, so the next step sees them. Only
 * clusters of at most slot_tokens rows are cached; larger ones are always
 * read from host memory (counted as uncacheable).
 *
 * Misses can instead be brought in by the copy engines (miss mode
 * KVS_WBUF_MISS_COPY): the host waits for the retrieval list, queues one
 * batched copy of the missed pages that fit a slot from pinned host memory
 * into the staging area on a second stream, and points their block-table
 * entries at the staged pages for this step only; the zone kernel, ordered
 * after the copies by an event, then reads every cacheable cluster from
 * GPU memory. Same rows, same arithmetic: the output equals the in-place
 * mode's. Uncacheable misses are still read in place.
 *
 * With kv_on_device the keys/values live in GPU memory instead (a layer
 * that fits): a step is select + zones + merge, nothing crosses the bus.
 *
 * Not thread-safe: one buffer per stream. Errors as in kvs_cuda.h.
 */
#ifndef KVS_BUFFER_H
#define KVS_BUFFER_H

#include "kvs_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvs_wbuf_policy_e {
    KVS_WBUF_LRU = 0,
    KVS_WBUF_CLOCK = 1,
} kvs_wbuf_policy_t;

/* How misses that fit a slot reach the zone kernel (bench/RESULTS_gpu.md
 * has the measurements). */
typedef enum kvs_wbuf_miss_e {
    KVS_WBUF_MISS_INPLACE = 0,   /* read over the bus by the kernel, staged
                                    by it (default) */
    KVS_WBUF_MISS_COPY = 1,      /* copy engines, one cudaMemcpyBatchAsync
                                    per step (CUDA >= 13; else as _EACH) */
    KVS_WBUF_MISS_COPY_EACH = 2, /* copy engines, one cudaMemcpyAsync per
                                    contiguous run */
} kvs_wbuf_miss_t;

typedef struct kvs_wbuf_params_s {
    kvs_dtype_t dtype;
    uint32_t d, n_heads, group;
    uint32_t max_clusters;   /* C per head */
    uint32_t max_tokens;     /* N indexed tokens per head (K/V stride) */
    uint32_t n_steady;       /* steady rows per head */
    uint32_t slot_tokens;    /* rows per slot (32) */
    uint32_t slots_per_head; /* clusters cached per head */
    kvs_wbuf_policy_t policy;
    /* 1: keys/values in GPU memory instead of pinned host memory: no
     * cache, no bus reads (slot_tokens, slots_per_head, policy unused) */
    int kv_on_device;
    kvs_cuda_wave_params_t wave;
    /* misses: in-place reads (0, default) or copies; unused with
     * kv_on_device */
    kvs_wbuf_miss_t miss;
    /* the CUDA device the buffer lives on (made current by every
     * host-driven call below) */
    int device;
} kvs_wbuf_params_t;

typedef struct kvs_wbuf_stats_s {
    uint64_t steps;
    uint64_t lookups;     /* retrieved clusters */
    uint64_t hits;        /* found in a slot */
    uint64_t misses;      /* read from host memory */
    uint64_t uncacheable; /* misses larger than a slot */
    uint64_t inserted, evicted;
    uint64_t bytes_hit;    /* K+V bytes read from slots */
    uint64_t bytes_miss;   /* K+V bytes read over the bus */
    uint64_t bytes_fill;   /* K+V bytes copied staging -> slots */
    uint64_t bytes_gpu;    /* GPU memory held (index, steady, cache, scratch) */
    uint64_t bytes_host;   /* pinned host memory held */
    uint64_t bytes_copied; /* of bytes_miss: moved by the copy engines */
    uint64_t copies;       /* copy operations queued for them */
    uint64_t batches;      /* cudaMemcpyBatchAsync calls that took them */
} kvs_wbuf_stats_t;

typedef struct kvs_wbuf_s kvs_wbuf_t;

/* Allocates everything (synchronous) on p->device, which it makes
 * current. A failed allocation (KVS_ENOMEM) leaves no CUDA error behind
 * for the next launch check to report. */
int kvs_wbuf_new(const kvs_wbuf_params_t *p, kvs_wbuf_t **out);
/* Waits for the buffer's own stream, then frees everything. */
void kvs_wbuf_free(kvs_wbuf_t *wb);

/*
 * Host-driven use, for callers that keep no CUDA state of their own (the
 * engine): the buffer owns a non-blocking stream on its device and
 * pinned staging for one step's queries and outputs.
 *
 * kvs_wbuf_use: makes the buffer's device current for the calling thread
 * (call it before the put/set functions below on a thread that may have
 * another device current). kvs_wbuf_stream: the buffer's own stream, for
 * the put/set functions. kvs_wbuf_step_host: one decode step for host
 * queries q [H][group][d] fp32 into host out (same shape); returns once
 * out holds the result (the stream is synchronised). kvs_wbuf_sync: waits
 * for everything queued on the buffer's stream.
 */
int kvs_wbuf_use(kvs_wbuf_t *wb);
cudaStream_t kvs_wbuf_stream(const kvs_wbuf_t *wb);
int kvs_wbuf_step_host(kvs_wbuf_t *wb, const float *q, float *out);
/* kvs_wbuf_step_host with q and out in device memory: the step reads and
 * writes them in place on the buffer's stream; returns once out holds the
 * result. */
int kvs_wbuf_step_device(kvs_wbuf_t *wb, const float *q, float *out);
int kvs_wbuf_sync(kvs_wbuf_t *wb);

/*
 * The layer the buffer owns, for the caller to fill before
 * kvs_wbuf_commit(): *layer gets every pointer (device index arrays,
 * pinned host keys/values as device-usable addresses) and, if build_out is
 * not NULL, the same arrays as a kvs_cuda_kmeans_build() destination.
 * steady_lo/steady_hi are set by kvs_wbuf_commit().
 */
void kvs_wbuf_layer(kvs_wbuf_t *wb, kvs_cuda_layer_t *layer,
                    kvs_cuda_kmeans_out_t *build_out);

/* Takes the filled layer into use: reads the offsets back, empties the
 * cache. Synchronises the stream. */
int kvs_wbuf_commit(kvs_wbuf_t *wb, uint32_t steady_lo, uint32_t steady_hi,
                    cudaStream_t stream);

/*
 * Incremental filling from host arrays (the engine's way): instead of a
 * build into kvs_wbuf_layer() plus kvs_wbuf_commit(), the caller writes
 * clusters, tokens and steady rows as its index grows. A new buffer
 * starts with an empty cache; cached pages stay valid as long as the
 * keys/values of a cluster id do not change (metadata of a cluster such
 * as its view count may be rewritten). Host sources are ordinary memory;
 * copies are queued on `stream` (and staged by CUDA, so the sources may
 * be reused on return). Errors: KVS_EINVAL (out of the buffer's
 * capacity), or as in kvs_cuda.h.
 *
 * put_clusters: clusters first .. first + n of `head`: centroids and
 * value means [n][d] (dtype), counts, steady flags [n], and offsets
 * [n + 1]: absolute slot offsets into the head's tokens (offsets[n] is
 * where the next cluster starts).
 */
int kvs_wbuf_put_clusters(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                          uint32_t n, const void *centroids,
                          const void *value_means, const uint32_t *counts,
                          const uint8_t *steady_flags, const uint32_t *offsets,
                          cudaStream_t stream);
/* Slots first .. first + n of `head`: absolute positions, cluster-ordered
 * keys and values [n][d] (written into the pinned host arrays). */
int kvs_wbuf_put_tokens(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                        uint32_t n, const uint32_t *positions, const void *keys,
                        const void *values, cudaStream_t stream);
/* Steady rows first .. first + n of `head` ([n][d] keys and values). */
int kvs_wbuf_put_steady(kvs_wbuf_t *wb, uint32_t head, uint32_t first,
                        uint32_t n, const void *keys, const void *values,
                        cudaStream_t stream);
/* Clusters in use per head (host [H]), the steady position bounds and
 * the steady rows in use (1 .. n_steady), for the next steps. */
int kvs_wbuf_set_extent(kvs_wbuf_t *wb, const uint32_t *n_clusters,
                        uint32_t steady_lo, uint32_t steady_hi,
                        uint32_t steady_rows, cudaStream_t stream);

/* Switches the replacement policy; takes effect at the next commit. */
void kvs_wbuf_set_policy(kvs_wbuf_t *wb, kvs_wbuf_policy_t policy);
/* Switches the miss mode (ignored with kv_on_device); takes effect at the
 * next step. KVS_EINVAL for an unknown mode. */
int kvs_wbuf_set_miss(kvs_wbuf_t *wb, kvs_wbuf_miss_t miss);

/*
 * One decode step for queries q (device [H][group][d] fp32) into out
 * (device, same shape). Returns once the cache update is queued; the
 * output is ready when the stream reaches it. Waits on the host for the
 * retrieval list (both miss modes; in-place after queuing the zones, copy
 * before, since it must know the misses to queue their copies).
 */
int kvs_wbuf_step(kvs_wbuf_t *wb, const float *q, float *out,
                  cudaStream_t stream);

void kvs_wbuf_stats(const kvs_wbuf_t *wb, kvs_wbuf_stats_t *out);
void kvs_wbuf_reset_stats(kvs_wbuf_t *wb);

#ifdef __cplusplus
}
#endif
#endif /* KVS_BUFFER_H */
