/*
 * kvs_cuda.h: the GPU kernels of the wave index, callable from C.
 *
 * What runs on the GPU for one layer of a decode step:
 *   kvs_cuda_wave_select   centroid scores (softmax of q.c * scale over the
 *                          clusters, summed over the query heads of a GQA
 *                          group) and top-k: the retrieval zone (best
 *                          retrieval_fraction of the clusters) and the
 *                          estimation zone (the next estimation_fraction)
 *   kvs_cuda_wave_attend   steady, retrieval and estimation zones attended
 *                          in parallel splits (flash-decoding), each split
 *                          leaving a partial output and its log-sum-exp,
 *                          then one merge
 * plus a full-attention decode kernel over the same layout (our baseline)
 * and segmented spherical k-means that builds the index on the GPU.
 *
 * Conventions:
 * - "Heads" are the (sequence, KV head) pairs of one layer, H of them; each
 *   has `group` query heads (GQA), so queries are [H][group][d] fp32 with
 *   query head i of KV head h at row h * group + i, and outputs are the
 *   same shape, fp32.
 * - Keys/values are F16 or BF16 (fp32 accumulation inside); head_dim 128.
 * - All arrays named "device" are device pointers (or mapped pinned host
 *   memory where a field says so), owned by the caller unless a _new
 *   function allocated them. Work is queued on the given stream; nothing
 *   synchronises unless documented.
 * - Functions return 0 or a negative KVS_E* code: KVS_EINVAL for bad
 *   geometry, KVS_ENOTSUP for what this build does not cover, KVS_ENOMEM
 *   for failed allocations, KVS_EIO for any other CUDA error (the CUDA
 *   message is kept in the handle: kvs_cuda_last_error()).
 * - Handles are not thread-safe; use one per stream.
 */
#ifndef KVS_CUDA_H
#define KVS_CUDA_H

#include "kvs_common.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_CUDA_HEAD_DIM 128 /* the one head_dim this build supports */
#define KVS_CUDA_MAX_GROUP 8  /* query heads per KV head */

/* Number of CUDA devices, 0 when there is no usable device or driver. */
int kvs_cuda_device_count(void);
/*
 * Is `device` usable by these kernels (present, compute capability
 * min_major or above)? 0 with its free memory and name (NUL-terminated in
 * name_len), or KVS_ENOTSUP with the reason in `why`. Sets the calling
 * thread's current device.
 */
int kvs_cuda_device_check(int device, int min_major, size_t *free_bytes,
                          char *name, size_t name_len, char *why,
                          size_t why_len);
/* Synchronous copy of n bytes between host memory and device `device`
 * (to_device 1: host -> device) on that device's legacy default stream, so
 * ordered after the work queued there; returns once the bytes have landed.
 * The calling thread's current device is restored. 0 or a KVS_E* code, the
 * message in kvs_cuda_last_error(). */
int kvs_cuda_copy(int device, void *dst, const void *src, size_t n,
                  int to_device);
/* 0 when [p, p + n) lies in memory of device `device` that its kernels can
 * read and write (device or managed memory), else KVS_EINVAL (host memory,
 * another device, unknown to CUDA). */
int kvs_cuda_device_ptr(int device, const void *p, size_t n);
/* The calling thread's current device (-1 if CUDA cannot say), and making
 * one current again (a no-op for -1): callers that must leave it as they
 * found it. */
int kvs_cuda_current_device(void);
void kvs_cuda_restore_device(int device);
/* KVS_E* code for a CUDA error (0 for cudaSuccess). */
int kvs_cuda_err(cudaError_t e);
/* Last CUDA error message seen by any kvs_cuda call of this thread. */
const char *kvs_cuda_last_error(void);

/*
 * One layer's wave index as the kernels read it. Per head h:
 * clusters 0 .. n_clusters[h], cluster c holding slots offsets[h][c] ..
 * offsets[h][c+1] of the cluster-ordered keys/values. counts and
 * value_means are the view of a query: steady members left out (a cluster
 * with count 0 is never selected). Steady positions (p < steady_lo or
 * p >= steady_hi) are attended from the steady zone, so retrieval masks
 * them in clusters whose steady_flags is set.
 */
typedef struct kvs_cuda_layer_s {
    kvs_dtype_t dtype;           /* KVS_DTYPE_F16 or KVS_DTYPE_BF16 */
    uint32_t d;                  /* head_dim (128) */
    uint32_t n_heads;            /* H */
    uint32_t group;              /* query heads per head, 1..8 */
    uint32_t max_clusters;       /* C: stride of per-cluster arrays */
    uint32_t max_tokens;         /* N: stride of keys/values/positions */
    const uint32_t *n_clusters;  /* device [H] */
    const void *centroids;       /* device [H][C][d]: mean of member keys */
    const void *value_means;     /* device [H][C][d]: non-steady members */
    const uint32_t *counts;      /* device [H][C]: non-steady members */
    const uint32_t *offsets;     /* device [H][C + 1] */
    const uint8_t *steady_flags; /* device [H][C]: 1 = has steady members */
    const uint32_t *positions;   /* device [H][N]: absolute position */
    const void *keys;            /* [H][N][d] cluster-ordered: device or */
    const void *values;          /*   mapped pinned host memory           */
    uint32_t steady_lo;          /* indexed p < steady_lo is steady */
    uint32_t steady_hi;          /* indexed p >= steady_hi is steady */
    uint32_t n_steady;           /* steady rows per head (sinks, window,
                                    unindexed tail): the stride of
                                    steady_keys/values and the plan's size */
    uint32_t steady_rows;        /* rows in use, <= n_steady; 0 = all. Lets
                                    a growing tail keep one plan */
    uint32_t clusters_hint;      /* host-side bound: no n_clusters[h] is
                                    larger (0 = max_clusters). A plan sized
                                    for growth then launches only the blocks
                                    the layer needs now */
    const void *steady_keys;     /* device [H][n_steady][d] */
    const void *steady_values;   /* device [H][n_steady][d] */
} kvs_cuda_layer_t;

/*
 * A cache of cluster pages in GPU memory (the wave buffer's slot pool).
 * Retrieval reads cluster (h, c) from slot slot_of[h][c] when >= 0, else
 * from layer->keys/values (pinned host memory read over the bus). Misses
 * whose size fits a slot are also copied by the kernel into the staging
 * area at [h][j] (j = the cluster's index in the retrieval list), so that
 * filling the cache afterwards is a device-to-device copy.
 */
typedef struct kvs_cuda_cache_s {
    const int32_t *slot_of; /* device [H][C] */
    const void *slot_keys;  /* device [n_slots][slot_tokens][d] */
    const void *slot_values;
    uint32_t slot_tokens; /* rows per slot */
    void *stage_keys;     /* device [H][retrieval_cap][slot_tokens][d] */
    void *stage_values;   /*   or NULL: no staging */
} kvs_cuda_cache_t;

/* ------------------------------------------------------------------------ */
/* Wave attention: selection + zone attention + merge.                      */

typedef struct kvs_cuda_wave_params_s {
    float retrieval_fraction;  /* of a head's clusters (0.018) */
    float estimation_fraction; /* next clusters (the store's 0.5) */
    float scale;               /* softmax scale; 0 = 1/sqrt(d) */
    /* Launch variants, 0 = the defaults (bench/gpu measures the others;
     * they were the KVS_CUDA_PDL, KVS_CUDA_SELECT and KVS_CUDA_SEL_THREADS
     * environment variables): pdl 0..3, bit 0: zones may start before
     * select ends, bit 1: select may start during score (programmatic
     * dependent launch); select_block 1: the one-block select kernel;
     * select_threads 256 or 512: select block size (0: by grid size). */
    uint32_t pdl;
    int32_t select_block;
    uint32_t select_threads;
} kvs_cuda_wave_params_t;

typedef struct kvs_cuda_wave_s kvs_cuda_wave_t;

/*
 * Scratch and launch plan for layers of geometry `geom` (dtype, d, n_heads,
 * group, max_clusters, n_steady are used; pointers are not). Retrieval per
 * head is max(1, ceil(fraction * n_clusters[h])) clusters and estimation
 * ceil(fraction * n_clusters[h]) more (the CPU engine's rule), both taken
 * only from clusters with count > 0, at most kvs_cuda_wave_retrieval_cap()
 * / _estimation_cap(). Allocates device memory (synchronous).
 */
int kvs_cuda_wave_new(const kvs_cuda_layer_t *geom,
                      const kvs_cuda_wave_params_t *params,
                      kvs_cuda_wave_t **out);
void kvs_cuda_wave_free(kvs_cuda_wave_t *w);
uint32_t kvs_cuda_wave_retrieval_cap(const kvs_cuda_wave_t *w);
uint32_t kvs_cuda_wave_estimation_cap(const kvs_cuda_wave_t *w);

/* Score and select for queries q (device [H][group][d] fp32). */
int kvs_cuda_wave_select(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *layer,
                         const float *q, cudaStream_t stream);

/*
 * Attend the three zones chosen by the last select and merge into out
 * (device [H][group][d] fp32). `cache` may be NULL (all of keys/values
 * device-readable).
 */
int kvs_cuda_wave_attend(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *layer,
                         const kvs_cuda_cache_t *cache, const float *q,
                         float *out, cudaStream_t stream);

/*
 * Results of the last select, device arrays owned by `w`, valid until the
 * next select: retrieved clusters [H][retrieval_cap] (first n_retrieved[h]
 * of each row valid, in no particular order), estimated [H][estimation_cap],
 * and the summed group softmax score of every cluster [H][C] (count-0 and
 * unused clusters: -1).
 */
const uint32_t *kvs_cuda_wave_retrieved(const kvs_cuda_wave_t *w,
                                        const uint32_t **n_retrieved);
const uint32_t *kvs_cuda_wave_estimated(const kvs_cuda_wave_t *w,
                                        const uint32_t **n_estimated);
const float *kvs_cuda_wave_scores(const kvs_cuda_wave_t *w);

/* ------------------------------------------------------------------------ */
/* Full attention (no index), split over the sequence: our baseline.        */

typedef struct kvs_cuda_full_s kvs_cuda_full_t;

/* Scratch for H heads of up to max_tokens keys (stride of keys/values). */
int kvs_cuda_full_new(kvs_dtype_t dtype, uint32_t d, uint32_t n_heads,
                      uint32_t group, uint32_t max_tokens,
                      kvs_cuda_full_t **out);
void kvs_cuda_full_free(kvs_cuda_full_t *f);

/*
 * out = softmax(q K^T * scale) V over keys/values [H][max_tokens][d]
 * (token order, first n_tokens rows used; device or mapped pinned host
 * memory). scale 0 = 1/sqrt(d).
 */
int kvs_cuda_full_attend(kvs_cuda_full_t *f, const void *keys,
                         const void *values, uint32_t n_tokens, float scale,
                         const float *q, float *out, cudaStream_t stream);

/* ------------------------------------------------------------------------ */
/* Segmented spherical k-means on the GPU.                                  */

typedef struct kvs_cuda_kmeans_params_s {
    uint32_t segment_tokens; /* tokens per segment (8192) */
    uint32_t cluster_tokens; /* mean members per cluster (16) */
    uint32_t iters;          /* spherical iterations (10) */
    uint64_t seed;           /* initial centroid choice; builds are
                                deterministic for a given seed */
    uint32_t steady_lo;      /* positions < steady_lo are steady */
    uint32_t steady_hi;      /* positions >= steady_hi are steady */
} kvs_cuda_kmeans_params_t;

/*
 * Where a build writes the index: strides cluster_stride (>= clusters per
 * head) and token_stride (>= indexed tokens per head). All device arrays,
 * or mapped pinned host memory for keys/values. keys/values may be NULL
 * (then only the cluster metadata and positions are written).
 */
typedef struct kvs_cuda_kmeans_out_s {
    uint32_t cluster_stride;
    uint32_t token_stride;
    uint32_t *n_clusters;  /* [H] */
    void *centroids;       /* [H][C][d] plain mean of raw member keys */
    void *value_means;     /* [H][C][d] mean of non-steady member values */
    uint32_t *counts;      /* [H][C] non-steady members */
    uint32_t *offsets;     /* [H][C + 1] */
    uint8_t *steady_flags; /* [H][C] */
    uint32_t *positions;   /* [H][N'] absolute positions, slot order */
    void *keys;            /* [H][N'][d] cluster-ordered */
    void *values;
} kvs_cuda_kmeans_out_t;

typedef struct kvs_cuda_kmeans_s kvs_cuda_kmeans_t;

/*
 * Scratch for building H heads of `n_tokens` keys each: n_tokens /
 * segment_tokens whole segments (the remainder is the caller's unindexed
 * tail). Clusters per segment K = max(1, round(segment_tokens /
 * cluster_tokens)); clusters per head C = segments * K, ordered by segment.
 * Empty clusters stay in place with count 0.
 */
int kvs_cuda_kmeans_new(const kvs_cuda_kmeans_params_t *params,
                        kvs_dtype_t dtype, uint32_t d, uint32_t n_heads,
                        uint32_t n_tokens, kvs_cuda_kmeans_t **out);
void kvs_cuda_kmeans_free(kvs_cuda_kmeans_t *km);
/* The seed of the next builds (a handle serves many segments). */
void kvs_cuda_kmeans_set_seed(kvs_cuda_kmeans_t *km, uint64_t seed);
uint32_t kvs_cuda_kmeans_clusters_per_head(const kvs_cuda_kmeans_t *km);
uint32_t kvs_cuda_kmeans_indexed_tokens(const kvs_cuda_kmeans_t *km);

/*
 * Build from keys/values (device [H][key_stride][d], token order, first
 * token of every head at position first_pos). Positions in the output
 * are first_pos + token index.
 */
int kvs_cuda_kmeans_build(kvs_cuda_kmeans_t *km, const void *keys,
                          const void *values, uint32_t key_stride,
                          uint32_t first_pos, const kvs_cuda_kmeans_out_t *out,
                          cudaStream_t stream);

/*
 * Mean over all indexed keys of the final assignment's inner product
 * between the centred key and its L2-normalised centroid (synchronous;
 * for tests and tuning).
 */
int kvs_cuda_kmeans_objective(kvs_cuda_kmeans_t *km, double *out);

/*
 * The final assignment of the last build: global cluster id per token,
 * device [H * indexed_tokens] (token t of head h at h * indexed + t; id =
 * (h * segments + segment) * K + cluster in segment). Owned by km.
 */
const uint32_t *kvs_cuda_kmeans_assignment(const kvs_cuda_kmeans_t *km);

/* ------------------------------------------------------------------------ */
/* One segment clustered from host memory (the engine's GPU builds).        */

typedef struct kvs_cuda_cluster_s kvs_cuda_cluster_t;

/* A context on `device` with its own stream; buffers come with the first
 * run and stay for segments of the same shape. Not thread-safe. */
int kvs_cuda_cluster_new(int device, kvs_cuda_cluster_t **out);
void kvs_cuda_cluster_free(kvs_cuda_cluster_t *c);

/*
 * The k-means of kvs_cuda_kmeans_build over one segment of n keys (host
 * [n][KVS_CUDA_HEAD_DIM], F16 or BF16; params->segment_tokens is taken to
 * be n): label[n] (host) gets each key's cluster in the segment, *k the
 * number of cluster ids. Synchronous. KVS_ENOTSUP for another dtype; after
 * any other failure the buffers are freed and the next run starts clean.
 */
int kvs_cuda_cluster_run(kvs_cuda_cluster_t *c,
                         const kvs_cuda_kmeans_params_t *params,
                         kvs_dtype_t dtype, uint32_t n, const void *keys,
                         uint32_t *label, uint32_t *k);

#ifdef __cplusplus
}
#endif
#endif /* KVS_CUDA_H */
