/*
 * wave.cuh: the wave-attention plan shared by wave.cu (lifecycle), score.cu
 * (select) and attend.cu (zones). Private to kernels/cuda.
 */
#pragma once

#include "common.cuh"

/* Split sizes of the zone attention (one block = one split). Few heads
 * (batch 1): small splits, so that the step is spread over the whole GPU;
 * many heads: larger ones (fewer partials to merge). */
#define ATT_STEADY_ROWS 256    /* steady rows per split */
#define ATT_RET_CLUSTERS 16    /* retrieval clusters per split (H > 16) */
#define ATT_RET_CLUSTERS_FEW 8 /*   (H <= 16); at most 32 */
#define ATT_EST_ROWS 128       /* estimation pseudo-tokens per split */
#define ATT_EST_ROWS_FEW 64
#define ATT_FEW_HEADS 16
#define SCORE_TILE 128 /* centroids per score block */

struct kvs_cuda_wave_s {
    kvs_dtype_t dtype;
    uint32_t n_heads, group, max_clusters, n_steady;
    float rf, ef, scale;
    uint32_t rcap, ecap, tiles;
    uint32_t ret_split, est_rows; /* clusters / rows per split */
    uint32_t steady_items, ret_items, est_items;
    unsigned pdl; /* 1: zones may start early (steady zone before select
                     ends), 2: select may start during score;
                     kvs_cuda_wave_params_t.pdl, default 0 */
    /* device scratch */
    float *logits;    /* [H][G][C] base-2 logits */
    float *tile_ms;   /* [H][tiles][G][2] tile max and sum of exp2 */
    float *scores;    /* [H][C] */
    uint32_t *keys;   /* [H][C] select keys when they do not fit in smem */
    uint32_t *ghist;  /* cluster select's histograms (zero between steps) */
    int select_block; /* 1: select_block_kernel (params.select_block) */
    int score_many;   /* 1: score blocks capped for 5 per SM (the grid is
                         more than one wave at 4 per SM) */
    int sel_threads;  /* select_kernel block size: 512 or 256 (by grid
                         size; params.select_threads overrides) */
    uint32_t *ret, *n_ret, *est, *n_est;
    float *po, *plse; /* partials */
    uint32_t *done;   /* [H] finished splits; the last one merges and
                         resets it to 0 */
};

/* ceil(f n) clusters, at most n (0 for f <= 0 or n = 0), in double: the CPU
 * engine's rule (kvs_zone_sizes in index/kvs_index.h), so that both paths
 * pick the same number of clusters. The select kernels, the plan's caps and
 * the launch grids all size zones with it. */
__host__ __device__ __forceinline__ uint32_t kvs__cuda_frac_count(float f,
                                                                  uint32_t n) {
    if (n == 0 || !(f > 0.f))
        return 0;
    const double x = ceil((double)f * (double)n);
    return x >= (double)n ? n : (uint32_t)x;
}

/* Score tiles a launch covers: those of L->clusters_hint when set. */
static inline uint32_t kvs__cuda_tiles(const kvs_cuda_wave_t *w,
                                       const kvs_cuda_layer_t *L) {
    if (!L->clusters_hint || L->clusters_hint >= L->max_clusters)
        return w->tiles;
    return (L->clusters_hint + SCORE_TILE - 1) / SCORE_TILE;
}

int kvs__cuda_score_select(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const float *q, cudaStream_t stream);
/* Dynamic shared memory of select for C clusters (0: keys in global). */
size_t kvs__cuda_select_smem(uint32_t max_clusters, int block);
int kvs__cuda_select_prepare(size_t smem, int block);
/* Words of the cluster select's global histograms for n_heads. */
size_t kvs__cuda_select_hist_words(uint32_t n_heads);
/* select_kernel's block size for n_heads (after select_prepare). */
int kvs__cuda_select_threads(uint32_t n_heads, size_t smem);
/* Zones and the merge (the last split of each head merges): out. */
int kvs__cuda_attend_zones(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const kvs_cuda_cache_t *cache, const float *q,
                           float *out, cudaStream_t stream);
