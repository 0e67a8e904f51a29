/*
 * gpu_int.h: the engine's GPU attend path (engine-internal).
 *
 * A store opened with a CUDA device keeps, per (sequence, layer) that is
 * attended in wave mode, a *mirror* of its wave index in a wave buffer
 * (buffer/kvs_buffer.h): centroids, cluster metadata and the steady zone
 * in GPU memory, the cluster-ordered keys/values in pinned host memory
 * with a GPU cache of cluster pages. The mirror follows the CPU index
 * incrementally: new segments are uploaded once, the previously newest
 * segment's cluster views are rewritten when it stops being newest, new
 * tail rows are appended to the steady zone. The CPU index stays the
 * source of truth; a mirror can always be dropped and rebuilt from it.
 *
 * kvs__gpu_attend returns KVS_ENOTSUP when a call is not for the GPU
 * (exact/full mode, bounded budget, F32 keys, head_dim other than 128,
 * GQA group not 1/2/4/8, heads with different index extents while a build
 * is halfway, GPU memory budget full): the engine then runs the CPU path,
 * which gives the same result within fp32 rounding (docs/gpu.md).
 * Without CUDA in the build, kvs__gpu_open reports why and returns NULL.
 */
#ifndef KVS_ENGINE_GPU_H
#define KVS_ENGINE_GPU_H

#include "kvs_index.h"
#include "kvstore.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvs__gpu_s kvs__gpu_t;
typedef struct kvs__gpu_layer_s kvs__gpu_layer_t;

typedef struct kvs__gpu_params_s {
    int device;            /* CUDA device ordinal */
    float cache_fraction;  /* GPU slots per head, fraction of clusters */
    uint64_t memory_bytes; /* GPU bytes for all mirrors; 0: no limit */
    int kv_host_only;      /* 1: K/V always in pinned host memory */
    int profile;           /* 1: time attend phases, log them at close */
    uint32_t segment_tokens, sink_tokens, window_tokens;
    kvs_log_fn log; /* the store's (kvs_options_t.log); may be NULL */
    void *log_ctx;
} kvs__gpu_params_t;

typedef struct kvs__gpu_stats_s {
    int device; /* -1: no GPU in use */
    uint64_t attends, fallbacks, errors;
    uint64_t bytes_gpu, bytes_pinned, bytes_kv_device;
    uint64_t lookups, hits, bytes_bus, bytes_uploaded;
    uint64_t mirrors_built;
    uint64_t mirrors_evicted;      /* buffers given back for other layers */
    uint64_t builds, build_errors; /* segment clusterings on the GPU */
} kvs__gpu_stats_t;

/*
 * *out = the store's GPU context, or NULL with the reason in `why` when
 * the build has no CUDA or the device is missing. Returns 0 either way,
 * or KVS_EINVAL for a bad parameter.
 */
int kvs__gpu_open(const kvs__gpu_params_t *p, kvs__gpu_t **out, char *why,
                  size_t why_len);
void kvs__gpu_close(kvs__gpu_t *g);

/*
 * Wave attention of one layer on the GPU: views[n_heads] (a consistent
 * snapshot under the layer's read lock), queries [n_heads][group][d],
 * out the same shape. *mirror is the layer's mirror slot (created on
 * first use; concurrent callers serialise on it). stats[h] get the zone
 * counts. Serves the centroid ranking only (rp->rank KVS_RANK_CENTROID):
 * any other rank, which may take the codes path on the CPU, is KVS_ENOTSUP
 * and counted as a fallback, so that a call never answers differently on
 * the GPU than on the CPU. Returns 0, KVS_ENOTSUP (use the CPU path), or
 * another error
 * (counted; the mirror is dropped; the caller should use the CPU path).
 */
int kvs__gpu_attend(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *mirror,
                    const kvs_head_view_t *views, uint32_t n_heads,
                    uint32_t group, const float *q, const kvs_zone_params_t *zp,
                    const kvs_rank_params_t *rp, float *out,
                    kvs_zone_stats_t *stats);

/* kvs__gpu_attend with q and out in device memory (kvs_seq_attend_device):
 * the step reads and writes them in place. */
int kvs__gpu_attend_device(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *mirror,
                           const kvs_head_view_t *views, uint32_t n_heads,
                           uint32_t group, const float *q_dev,
                           const kvs_zone_params_t *zp,
                           const kvs_rank_params_t *rp, float *out_dev,
                           kvs_zone_stats_t *stats);

/* 0 when [p, p + n) is memory of the store's device (device or managed
 * memory there), else KVS_EINVAL; KVS_ENOTSUP without a GPU. */
int kvs__gpu_check_ptr(kvs__gpu_t *g, const void *p, size_t n);

/* Synchronous copy of n bytes between host memory and the store's device
 * (to_device 1: host -> device), on the device's legacy default stream, so
 * ordered after the work queued there; returns once the bytes have landed.
 * KVS_ENOTSUP without a GPU; KVS_EIO when CUDA refuses it (the message
 * through the log callback). */
int kvs__gpu_copy(kvs__gpu_t *g, void *dst, const void *src, size_t n,
                  int to_device);

/*
 * The k-means of one index segment on the GPU (the engine then finishes
 * it with kvs_segment_from_labels): label[n] gets each key's cluster,
 * *k the number of cluster ids. Same algorithm as the CPU build (centred
 * spherical k-means, bp->kmeans_iters iterations, a final assignment;
 * bf16 tensor cores for the assignment), so clusterings differ in detail.
 * Builder threads share one handle (serialised). Returns KVS_ENOTSUP when
 * the keys are not for the GPU (F32, head_dim not 128, no GPU).
 */
int kvs__gpu_cluster(kvs__gpu_t *g, kvs_dtype_t dtype, uint32_t d, uint32_t n,
                     const void *keys, const kvs_build_params_t *bp,
                     uint32_t *label, uint32_t *k);

/* Frees a layer's mirror (no attend may be using it). NULL is a no-op. */
void kvs__gpu_layer_free(kvs__gpu_t *g, kvs__gpu_layer_t *m);

void kvs__gpu_stats(const kvs__gpu_t *g, kvs__gpu_stats_t *out);

#endif /* KVS_ENGINE_GPU_H */
