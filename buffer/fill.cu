/*
 * fill.cu: after a decode step, copy the staged pages that the replacement
 * policy admitted into their slots and update the block table. One block
 * per fill; the extra last block applies the table updates. Runs after the
 * step's attention on the same stream, so no slot is overwritten while it
 * is read.
 */
#include "fill.cuh"

#include <cuda_runtime.h>

static __global__ void fill_kernel(const kvs__fill_t *fills, uint32_t n_fills,
                                   const kvs__upd_t *upds, uint32_t n_upds,
                                   int32_t *slot_of, const uint4 *stage_k,
                                   const uint4 *stage_v, uint4 *slot_k,
                                   uint4 *slot_v, uint32_t slot_u4,
                                   uint32_t row_u4) {
    if (blockIdx.x == n_fills) {
        for (uint32_t i = threadIdx.x; i < n_upds; i += blockDim.x)
            slot_of[upds[i].index] = upds[i].slot;
        return;
    }
    const kvs__fill_t f = fills[blockIdx.x];
    const size_t src = (size_t)f.stage * slot_u4,
                 dst = (size_t)f.slot * slot_u4;
    for (uint32_t i = threadIdx.x; i < f.rows * row_u4; i += blockDim.x) {
        slot_k[dst + i] = stage_k[src + i];
        slot_v[dst + i] = stage_v[src + i];
    }
}

extern "C" int kvs__wbuf_fill(const kvs__fill_t *fills, uint32_t n_fills,
                              const kvs__upd_t *upds, uint32_t n_upds,
                              int32_t *slot_of, const void *stage_k,
                              const void *stage_v, void *slot_k, void *slot_v,
                              uint32_t slot_tokens, uint32_t row_bytes,
                              cudaStream_t stream) {
    if (n_fills == 0 && n_upds == 0)
        return 0;
    const uint32_t row_u4 = row_bytes / 16;
    fill_kernel<<<n_fills + 1, 256, 0, stream>>>(
        fills, n_fills, upds, n_upds, slot_of, (const uint4 *)stage_k,
        (const uint4 *)stage_v, (uint4 *)slot_k, (uint4 *)slot_v,
        slot_tokens * row_u4, row_u4);
    return kvs_cuda_err(cudaGetLastError());
}
