/*
 * wave.cuh: the wave-attention plan shared by wave.cu (lifecycle), score.cu
 * (select) and attend.cu (zones). Private to kernels/cuda.
 */
#pragma once

#include "common.cuh"

/* Split sizes of the zone attention (one block = one split). */
#define ATT_STEADY_ROWS 256 /* steady rows per split */
#define ATT_RET_CLUSTERS 16 /* retrieval clusters per split */
#define ATT_EST_ROWS 128    /* estimation pseudo-tokens per split */
#define SCORE_TILE 128      /* centroids per score block */

struct kvs_cuda_wave_s {
    kvs_dtype_t dtype;
    uint32_t n_heads, group, max_clusters, n_steady;
    float rf, ef, scale;
    uint32_t rcap, ecap, tiles;
    uint32_t steady_items, ret_items, est_items;
    /* device scratch */
    float *logits;  /* [H][G][C] base-2 logits */
    float *tile_ms; /* [H][tiles][G][2] tile max and sum of exp2 */
    float *scores;  /* [H][C] */
    uint32_t *keys; /* [H][C] select keys when they do not fit in smem */
    uint32_t *ret, *n_ret, *est, *n_est;
    float *po, *plse; /* partials */
};

int kvs__cuda_score_select(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const float *q, cudaStream_t stream);
/* Dynamic shared memory of select for C clusters (0: keys in global). */
size_t kvs__cuda_select_smem(uint32_t max_clusters);
int kvs__cuda_select_prepare(size_t smem);
int kvs__cuda_attend_zones(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const kvs_cuda_cache_t *cache, const float *q,
                           cudaStream_t stream);
