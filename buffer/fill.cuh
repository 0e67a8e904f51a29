/*
 * fill.cuh: the cache fill of the wave buffer (fill.cu), callable from C.
 * Private to buffer/.
 */
#ifndef KVS_BUFFER_FILL_CUH
#define KVS_BUFFER_FILL_CUH

#include "kvs_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs__fill_s {
    uint32_t stage; /* index into the staging area, [H][rcap] */
    uint32_t slot;  /* destination slot */
    uint32_t rows;
} kvs__fill_t;

typedef struct kvs__upd_s {
    uint32_t index; /* h * C + c */
    int32_t slot;   /* new block-table value, -1 = evicted */
} kvs__upd_t;

/* Copies fills (staging -> slots; rows of row_bytes) and applies the
 * block-table updates, all in one launch on `stream`. */
int kvs__wbuf_fill(const kvs__fill_t *fills, uint32_t n_fills,
                   const kvs__upd_t *upds, uint32_t n_upds, int32_t *slot_of,
                   const void *stage_k, const void *stage_v, void *slot_k,
                   void *slot_v, uint32_t slot_tokens, uint32_t row_bytes,
                   cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
