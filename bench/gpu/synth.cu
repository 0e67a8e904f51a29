/* synth.cu: see synth.cuh. */
#include "synth.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define D 128

static __device__ uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static __device__ float hnorm(uint64_t key) {
    const uint64_t r = mix(key);
    const float u1 = ((uint32_t)r + 0.5f) * (1.f / 4294967296.f);
    const float u2 = ((uint32_t)(r >> 32) + 0.5f) * (1.f / 4294967296.f);
    return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

static __device__ float offset_of(uint64_t seed, uint32_t h, int d) {
    return 2.f *
           hnorm(seed * 0x100000001b3ULL + ((uint64_t)h << 20) + d + 0x5555);
}

static __global__ void kv_kernel(__nv_bfloat16 *k, __nv_bfloat16 *v, uint32_t H,
                                 uint64_t n, uint64_t stride,
                                 uint32_t n_centers, uint64_t seed) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (uint64_t)H * n * (D / 8))
        return;
    const int chunk = (int)(i % (D / 8));
    const uint64_t t = (i / (D / 8)) % n;
    const uint32_t h = (uint32_t)(i / (D / 8) / n);
    /* centres are local to each 8192-token segment (topics come and go) */
    const uint64_t c =
        (t / 8192) * n_centers +
        mix(seed ^ (t * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)h << 56)) %
            n_centers;
    const size_t row = ((size_t)h * stride + t) * D;
    for (int j = 0; j < 8; j++) {
        const int d = chunk * 8 + j;
        const uint64_t tk = ((((uint64_t)h << 40) ^ t) << 7) + d;
        const float kc = hnorm(seed * 31 + (((uint64_t)h << 40) ^ (c << 7)) +
                               d + 0x77777777ULL);
        k[row + d] = __float2bfloat16_rn(offset_of(seed, h, d) + kc +
                                         0.6f * hnorm(seed * 7 + tk));
        v[row + d] = __float2bfloat16_rn(hnorm(seed * 13 + tk + 0x1234567ULL));
    }
}

static __global__ void q_kernel(float *q, const __nv_bfloat16 *k,
                                uint64_t stride, uint32_t G,
                                const uint32_t *focus, uint64_t kv_seed,
                                uint64_t seed, float strength, float noise) {
    const uint32_t hg = blockIdx.x, h = hg / G;
    const int d = threadIdx.x;
    const size_t row = ((size_t)h * stride + focus[hg]) * D;
    const float x = __bfloat162float(k[row + d]) - offset_of(kv_seed, h, d);
    __shared__ float red[D];
    red[d] = x * x;
    __syncthreads();
    for (int s = D / 2; s; s >>= 1) {
        if (d < s)
            red[d] += red[d + s];
        __syncthreads();
    }
    const float inv = red[0] > 0.f ? rsqrtf(red[0]) : 0.f;
    q[(size_t)hg * D + d] =
        strength * x * inv +
        noise * hnorm(seed * 0xabcdefULL + (uint64_t)hg * D + d + 99);
}

extern "C" int bench_synth_kv(void *k, void *v, uint32_t H, uint64_t n,
                              uint64_t stride, uint32_t n_centers,
                              uint64_t seed, cudaStream_t s) {
    const uint64_t total = (uint64_t)H * n * (D / 8);
    kv_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(
        (__nv_bfloat16 *)k, (__nv_bfloat16 *)v, H, n, stride, n_centers, seed);
    return (int)cudaGetLastError();
}

extern "C" int bench_synth_q(float *q, const void *k, uint64_t stride,
                             uint32_t H, uint32_t G, const uint32_t *focus,
                             uint64_t kv_seed, uint64_t seed, float strength,
                             float noise, cudaStream_t s) {
    q_kernel<<<H * G, D, 0, s>>>(q, (const __nv_bfloat16 *)k, stride, G, focus,
                                 kv_seed, seed, strength, noise);
    return (int)cudaGetLastError();
}
