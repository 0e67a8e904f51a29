/*
 * codes_scan_int.h: private to kernels/. The table of code scans that the
 * run-time CPU check fills with the AVX2 versions (codes_scan_avx2.c) or
 * leaves at the portable ones (codes_scan.c), and the portable pieces the
 * AVX2 file falls back to for shapes it does not take.
 */
#ifndef KVS_CODES_SCAN_INT_H
#define KVS_CODES_SCAN_INT_H

#include "kvs_kernels.h"

typedef struct kvs__code_scan_table_s {
    void (*c4)(const float *, const uint8_t *, size_t, uint32_t, float,
               float *);
    void (*c8)(const float *, const uint8_t *, size_t, uint32_t, float,
               float *);
    void (*c4_pair)(const float *, const float *, const uint8_t *, size_t,
                    uint32_t, float, float, float *, float *);
    void (*c4_q8)(const int8_t *, size_t, uint32_t, const float *,
                  const float *, const uint8_t *, size_t, uint32_t, float *,
                  size_t);
    void (*weights_q8)(const float *, const float *, float, uint32_t, int8_t *,
                       float *);
    void (*c8_q16)(const int16_t *, size_t, uint32_t, const float *,
                   const float *, const uint8_t *, size_t, uint32_t, float *,
                   size_t);
    void (*weights_q16)(const float *, const float *, float, uint32_t,
                        int16_t *, float *);
} kvs__code_scan_table_t;

/* Fills `t` with the AVX2 versions and returns 1 when the CPU runs them. */
int kvs__code_scan_avx2(kvs__code_scan_table_t *t);

/* The portable versions of the integer-weight scans (the AVX2 ones call
 * them for d they do not take). */
void kvs__code4_q8_scalar(const int8_t *q8, size_t q8_stride, uint32_t g,
                          const float *scale, const float *bias,
                          const uint8_t *codes, size_t n, uint32_t d,
                          float *out, size_t out_stride);
void kvs__weights_q8_scalar(const float *a, const float *b, float mul,
                            uint32_t d, int8_t *q8, float *scale);
void kvs__code8_q16_scalar(const int16_t *q16, size_t q16_stride, uint32_t g,
                           const float *scale, const float *bias,
                           const uint8_t *codes, size_t n, uint32_t d,
                           float *out, size_t out_stride);
void kvs__weights_q16_scalar(const float *a, const float *b, float mul,
                             uint32_t d, int16_t *q16, float *scale);
/* The largest |int16 weight| for rows of d 8-bit codes (kvs_kernels.h). */
int32_t kvs__q16_max(uint32_t d);

#endif
