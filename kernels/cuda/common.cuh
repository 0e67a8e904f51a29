/*
 * common.cuh: what every kvstore CUDA op shares: CUDA_CHECK (abort, for
 * invariants, tests and benchmarks), KVS_CUDA_TRY (convert to a KVS_E* code
 * at the C boundary), 16-byte loads of 8 F16/BF16 elements into fp32, and
 * the half-warp row layout (head_dim 128 = 16 lanes x 8 elements).
 */
#pragma once

#include "kvs_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <utility>
#include <stdio.h>
#include <stdlib.h>

#define CUDA_CHECK(call)                                                       \
    do {                                                                       \
        cudaError_t err_ = (call);                                             \
        if (err_ != cudaSuccess) {                                             \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #call, __FILE__,   \
                    __LINE__, cudaGetErrorString(err_));                       \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* Records the message for kvs_cuda_last_error() and returns the code. */
int kvs__cuda_fail(cudaError_t e, const char *what);

#define KVS_CUDA_TRY(call)                                                     \
    do {                                                                       \
        cudaError_t err_ = (call);                                             \
        if (err_ != cudaSuccess)                                               \
            return kvs__cuda_fail(err_, #call);                                \
    } while (0)

/* Launch check: the launch itself (bad configuration) fails here. */
#define KVS_CUDA_LAUNCHED() KVS_CUDA_TRY(cudaGetLastError())

namespace kvs_cuda {

constexpr int D = KVS_CUDA_HEAD_DIM;
constexpr int LPR = D / 8; /* lanes per row: 16, a half-warp */
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ void cvt8(const uint4 &u, float f[8],
                                     const __nv_bfloat16 *) {
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(p[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void cvt8(const uint4 &u, float f[8],
                                     const __half *) {
    const __half2 *p = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __half22float2(p[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32(float x) {
    return __float2half_rn(x);
}
template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
    return __bfloat162float(x);
}
template <> __device__ __forceinline__ float to_f32(__half x) {
    return __half2float(x);
}

/*
 * Sum over the 16 lanes of a half-warp. The mask names only this half-warp
 * (xor offsets < 16 stay inside it): the two half-warps of a warp walk
 * different rows and clusters, so they may be on different iterations.
 */
__device__ __forceinline__ float hsum16(float x) {
    const unsigned m = (threadIdx.x & 16) ? 0xffff0000u : 0x0000ffffu;
    x += __shfl_xor_sync(m, x, 8);
    x += __shfl_xor_sync(m, x, 4);
    x += __shfl_xor_sync(m, x, 2);
    x += __shfl_xor_sync(m, x, 1);
    return x;
}

/*
 * Programmatic dependent launch (sm_90): a kernel launched with
 * kvs__cuda_launch(..., pdl = true) may start while the previous kernel of
 * the stream still runs, once that kernel has called
 * pdl_launch_dependents(); it must call pdl_wait() before touching what
 * the previous kernel writes (pdl_wait returns once that kernel has
 * completed and its writes are visible). Both are no-ops for a kernel
 * launched without the attribute.
 */
__device__ __forceinline__ void pdl_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void pdl_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

} // namespace kvs_cuda

/* Launch, with the programmatic-serialization attribute when pdl. */
template <typename... KArgs, typename... Args>
cudaError_t kvs__cuda_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, bool pdl,
                             Args &&...args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

/* Dispatch on dtype: BODY sees `T` as the element type. */
#define KVS_CUDA_DISPATCH(dtype, ...)                                          \
    do {                                                                       \
        if ((dtype) == KVS_DTYPE_BF16) {                                       \
            typedef __nv_bfloat16 T;                                           \
            __VA_ARGS__;                                                       \
        } else if ((dtype) == KVS_DTYPE_F16) {                                 \
            typedef __half T;                                                  \
            __VA_ARGS__;                                                       \
        } else {                                                               \
            return KVS_ENOTSUP;                                                \
        }                                                                      \
    } while (0)
