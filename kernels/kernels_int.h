/*
 * kernels_impl.h: private to kernels/. The function table that the run-time
 * CPU check fills with either the AVX2 or the scalar versions.
 */
#ifndef KVS_KERNELS_IMPL_H
#define KVS_KERNELS_IMPL_H

#include "kvs_kernels.h"

typedef struct kvs__kernel_table_s {
    const char *isa;
    void (*to_f32)(kvs_dtype_t, const void *, float *, size_t);
    void (*from_f32)(kvs_dtype_t, const float *, void *, size_t);
    void (*dot_rows)(kvs_dtype_t, const float *, uint32_t, const void *, size_t,
                     uint32_t, float, float *, size_t);
    void (*axpy_rows)(kvs_dtype_t, const float *, size_t, uint32_t,
                      const void *, size_t, uint32_t, float *);
    void (*dot_gather)(kvs_dtype_t, const float *, uint32_t,
                       const void *const *, size_t, uint32_t, float, float *,
                       size_t);
    void (*axpy_gather)(kvs_dtype_t, const float *, size_t, uint32_t,
                        const void *const *, size_t, uint32_t, float *);
    float (*exp_sum)(float *, size_t, float);
    float (*max)(const float *, size_t);
} kvs__kernel_table_t;

/* Fills `t` and returns 1 when the CPU has AVX2, FMA and F16C; else 0. */
int kvs__kernels_avx2_init(kvs__kernel_table_t *t);

#endif
