/*
 * kvs_kernels.h: the CPU compute kernels under the wave index: dtype
 * conversion, dot products of a few queries against many keys, weighted sums
 * of value rows, and the exp/max helpers of softmax.
 *
 * Each kernel has an AVX2+FMA+F16C version and a portable scalar one; the
 * choice is made once, at the first call, from what the CPU supports
 * (kvs_kernels_isa() tells which). Setting KVS_FORCE_SCALAR=1 in the
 * environment forces the scalar versions (tests compare the two).
 * All functions are thread-safe and allocate nothing.
 */
#ifndef KVS_KERNELS_H
#define KVS_KERNELS_H

#include "kvs_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* "avx2" or "scalar". */
const char *kvs_kernels_isa(void);

/* Scalar conversions; fp16 <-> fp32 round to nearest even, NaN kept. */
float kvs_f16_to_f32(uint16_t h);
uint16_t kvs_f32_to_f16(float f);
float kvs_bf16_to_f32(uint16_t h);
uint16_t kvs_f32_to_bf16(float f);

/* dst[i] = src[i] as fp32, for n elements of `dtype`. */
void kvs_to_f32(kvs_dtype_t dtype, const void *src, float *dst, size_t n);
/* dst[i] = src[i] converted to `dtype` (rounded to nearest even). */
void kvs_from_f32(kvs_dtype_t dtype, const float *src, void *dst, size_t n);
/* True when all n elements are finite (no NaN/Inf). */
int kvs_all_finite(kvs_dtype_t dtype, const void *src, size_t n);

/*
 * out[i * ld + j] = scale * dot(q[i], keys[j]) for i < nq, j < n.
 * q is [nq][d] fp32, keys [n][d] of `dtype`. Each key row is read once for
 * all nq queries. nq <= KVS_KERNEL_MAX_Q.
 */
#define KVS_KERNEL_MAX_Q 16
void kvs_dot_rows(kvs_dtype_t dtype, const float *q, uint32_t nq,
                  const void *keys, size_t n, uint32_t d, float scale,
                  float *out, size_t ld);

/*
 * acc[i][:] += sum_j w[i * ldw + j] * vals[j][:] for i < nq, j < n.
 * vals is [n][d] of `dtype`, acc is [nq][d] fp32. Each value row is read once
 * for all nq weight rows. nq <= KVS_KERNEL_MAX_Q.
 */
void kvs_axpy_rows(kvs_dtype_t dtype, const float *w, size_t ldw, uint32_t nq,
                   const void *vals, size_t n, uint32_t d, float *acc);

/*
 * kvs_dot_rows and kvs_axpy_rows over rows given by address (rows[j], each
 * d elements of `dtype`): a shortlist's scattered keys and values, or
 * value means of clusters across segments, without copying them together
 * first. Rows are prefetched ahead, since their addresses are not a
 * stream the hardware can follow. out[i * ld + j] and acc as above.
 */
void kvs_dot_gather(kvs_dtype_t dtype, const float *q, uint32_t nq,
                    const void *const *rows, size_t n, uint32_t d, float scale,
                    float *out, size_t ld);
void kvs_axpy_gather(kvs_dtype_t dtype, const float *w, size_t ldw, uint32_t nq,
                     const void *const *rows, size_t n, uint32_t d, float *acc);

/*
 * Code scans (kernels/codes_scan.c): out[j] = bias + sum_i w[i] * code_j[i]
 * for rows j < n of unsigned integer codes, w [d] fp32.
 *   4-bit rows are d/2 bytes, d a multiple of 32: per block of 32 dims, 16
 *   bytes, byte b holding dim b in its low nibble and dim b + 16 in its
 *   high nibble (so a SIMD unpack needs no shuffle);
 *   8-bit rows are d bytes, one per dim.
 * kvs_code_scan_isa() tells which version runs ("avx2" or "scalar";
 * KVS_FORCE_SCALAR=1 forces scalar as for the other kernels).
 */
void kvs_code4_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out);
void kvs_code8_dot_rows(const float *w, const uint8_t *codes, size_t n,
                        uint32_t d, float bias, float *out);
/* kvs_code4_dot_rows for g queries over the same rows (each row's codes
 * are unpacked once per pair of queries): query i has weights
 * w + i * w_stride, bias bias[i * bias_stride] and writes
 * out + i * out_stride [n]. Each output equals kvs_code4_dot_rows' for that
 * query bit for bit. */
void kvs_code4_dot_rows_multi(const float *w, size_t w_stride, uint32_t g,
                              const float *bias, size_t bias_stride,
                              const uint8_t *codes, size_t n, uint32_t d,
                              float *out, size_t out_stride);
const char *kvs_code_scan_isa(void);

/*
 * 4-bit code scans with int8 weights, the codes attend's fast path (a
 * quarter of the instructions of the fp32 scan: products of 8-bit
 * integers, 32 at a time). kvs_code4_weights_q8 makes the weights
 * w[t] = a[t] x b[t] x mul (t < d, d a multiple of 32), rounds them to
 * int8 in [-127, 127] at one scale per vector (*scale = max |w| / 127) and
 * stores them in the scan's order (per 64 dims: the 32 low-nibble dims,
 * then the 32 high-nibble ones; a last 32 dims in order); then
 *   out[i * out_stride + j] = bias[i] + scale[i] x sum_t q8_i[t] code_j[t]
 * for g queries with int8 weights q8 + i * q8_stride, the sum exact in
 * int32. Rounding moves a score by at most scale/2 x the sum of the row's
 * codes; on real keys well under the 4-bit codes' own error. Both give
 * the same bits in their scalar and SIMD versions.
 */
void kvs_code4_weights_q8(const float *a, const float *b, float mul, uint32_t d,
                          int8_t *q8, float *scale);
/*
 * 8-bit code scans with int16 weights (the codes attend's centroid scores,
 * half the bytes of bf16 centroids): kvs_code8_weights_q16 makes
 * w[t] = a[t] x b[t] x mul, rounds it to int16 at one scale per vector
 * (largest magnitude at most 32767 and small enough that a row's sum
 * cannot leave int32: 255 x d x max < 2^31), in order; then
 *   out[i * out_stride + j] = bias[i] + scale[i] x sum_t q16_i[t] code_j[t]
 * exact in int32. The same bits from the scalar and SIMD versions.
 */
void kvs_code8_weights_q16(const float *a, const float *b, float mul,
                           uint32_t d, int16_t *q16, float *scale);
void kvs_code8_dot_rows_q16(const int16_t *q16, size_t q16_stride, uint32_t g,
                            const float *scale, const float *bias,
                            const uint8_t *codes, size_t n, uint32_t d,
                            float *out, size_t out_stride);
void kvs_code4_dot_rows_q8(const int8_t *q8, size_t q8_stride, uint32_t g,
                           const float *scale, const float *bias,
                           const uint8_t *codes, size_t n, uint32_t d,
                           float *out, size_t out_stride);

/* Largest of x[0..n); -INFINITY when n is 0. */
float kvs_max(const float *x, size_t n);
/* x[i] = exp(x[i] - m) in place; returns the sum. exp(-inf) = 0. */
float kvs_exp_sum(float *x, size_t n, float m);

#ifdef __cplusplus
}
#endif
#endif /* KVS_KERNELS_H */
