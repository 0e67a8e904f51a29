/*
 * synth.cuh: synthetic clustered keys/values and queries for the GPU
 * benchmark (synth.cu), callable from C. Keys of head h: a head offset
 * (2 N(0,1) per dim) + one of n_centers centres (N(0,1)) + 0.6 N(0,1)
 * noise; values N(0,1); all bf16, from counter-based hashes (no state).
 * A query aims at a "focus" token: strength * unit(k_focus - offset) +
 * noise * N(0,1), so attention concentrates on the focus token's centre.
 */
#ifndef KVS_BENCH_SYNTH_CUH
#define KVS_BENCH_SYNTH_CUH

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* k, v: device bf16 [H][stride][128], rows 0..n filled. */
int bench_synth_kv(void *k, void *v, uint32_t H, uint64_t n, uint64_t stride,
                   uint32_t n_centers, uint64_t seed, cudaStream_t s);

/* q: device fp32 [H][G][128]; focus: device [H][G] token indices;
 * kv_seed: the seed the keys were made with (for the head offset). */
int bench_synth_q(float *q, const void *k, uint64_t stride, uint32_t H,
                  uint32_t G, const uint32_t *focus, uint64_t kv_seed,
                  uint64_t seed, float strength, float noise, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
