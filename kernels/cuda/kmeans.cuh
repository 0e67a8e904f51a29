/*
 * kmeans.cuh: tile geometry of the GPU k-means assignment (kmeans.cu).
 * A block assigns KM_ROWS centred keys (bf16 in shared memory) against the
 * segment's normalised centroids, KM_CHUNK at a time, with bf16 tensor-core
 * products (WMMA, fp32 accumulate); each warp owns 16 rows.
 */
#pragma once

#include "common.cuh"

#define KM_ROWS 128
#define KM_CHUNK 64
#define KM_THREADS 256
#define KM_LD (KVS_CUDA_HEAD_DIM + 8) /* bf16 row pitch: 272 B */
#define KM_CLD (KM_CHUNK + 4)         /* fp32 score row pitch */
#define KM_SMEM                                                                \
    ((KM_ROWS + KM_CHUNK) * KM_LD * 2 + (KM_THREADS / 32) * 16 * KM_CLD * 4)
