/*
 * kmeans.cu: segmented spherical k-means on the GPU, the same algorithm as
 * the engine's CPU build (index/kvs_index.h): per (head, segment) the keys
 * are centred on their mean; K centroids start as evenly spaced keys
 * (seed-shifted), L2-normalised; each iteration assigns every key to the
 * centroid of largest inner product (MIPS) and sets each centroid to the
 * normalised sum of its centred members (an empty cluster keeps its
 * centroid); a final pass assigns every key against all centroids again,
 * then each centroid becomes the plain mean of its members' raw keys.
 *
 * All segments of all heads are processed by each launch. Per pass:
 *   assign_kernel   tensor-core (WMMA bf16) q.c, argmax, member counts
 *   cub scan        counts -> cluster offsets
 *   cub radix sort  (cluster id, token) pairs, stable: members of a
 *                   cluster are in token order, so sums are deterministic
 *   update_kernel   one warp per cluster sums its members
 * and at the end gather_kernel writes cluster-ordered keys, values and
 * positions. Assignment products use bf16 centred keys and centroids
 * (fp32 accumulation); sums and means are fp32.
 */
#include "kmeans.cuh"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <mma.h>

using namespace kvs_cuda;
using namespace nvcuda;

struct kvs_cuda_kmeans_s {
    kvs_cuda_kmeans_params_t p;
    kvs_dtype_t dtype;
    uint32_t H, seg, n_seg, K, C, Np, S, gcl;
    size_t total;
    int end_bit;
    float *mean;
    __nv_bfloat16 *cn;
    uint32_t *assign, *assign_sorted, *ids, *ids_sorted, *counts, *offs;
    float *best;
    unsigned char *tmp;
    size_t tmp_bytes;
};

namespace {

template <typename T>
__device__ __forceinline__ void load4(const T *p, float f[4]) {
    const uint2 u = *reinterpret_cast<const uint2 *>(p);
    const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++)
        f[i] = to_f32(e[i]);
}

template <typename T>
__device__ __forceinline__ void store4(T *p, const float f[4]) {
    uint2 u;
    T *e = reinterpret_cast<T *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++)
        e[i] = from_f32<T>(f[i]);
    *reinterpret_cast<uint2 *>(p) = u;
}

__device__ __forceinline__ float wsum(float x) {
#pragma unroll
    for (int o = 16; o; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* mean[sg][:] over the segment's keys; grid S, 256 threads */
template <typename T>
__global__ void mean_kernel(const T *keys, size_t key_stride, uint32_t seg,
                            uint32_t n_seg, float *mean) {
    __shared__ float part[16][D];
    const uint32_t sg = blockIdx.x, h = sg / n_seg, j = sg % n_seg;
    const int lane = threadIdx.x % LPR, rg = threadIdx.x / LPR;
    const T *kb = keys + ((size_t)h * key_stride + (size_t)j * seg) * D;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t r = rg; r < seg; r += 16) {
        float f[8];
        cvt8(*reinterpret_cast<const uint4 *>(kb + (size_t)r * D + lane * 8), f,
             (const T *)nullptr);
#pragma unroll
        for (int i = 0; i < 8; i++)
            acc[i] += f[i];
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        part[rg][lane * 8 + i] = acc[i];
    __syncthreads();
    if (threadIdx.x < D) {
        float s = 0.f;
        for (int g = 0; g < 16; g++)
            s += part[g][threadIdx.x];
        mean[(size_t)sg * D + threadIdx.x] = s / (float)seg;
    }
}

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* cn[gc] = normalise(key[init index] - mean); one warp per cluster */
template <typename T>
__global__ void init_kernel(const T *keys, size_t key_stride, uint32_t seg,
                            uint32_t n_seg, uint32_t K, uint32_t gcl,
                            uint64_t seed, const float *mean,
                            __nv_bfloat16 *cn) {
    const uint32_t gc = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (gc >= gcl)
        return;
    const uint32_t sg = gc / K, k = gc % K, h = sg / n_seg, j = sg % n_seg;
    const uint32_t stride = seg / K > 0 ? seg / K : 1;
    uint32_t idx = (uint32_t)((uint64_t)k * seg / K) +
                   hash32(seed * 0x9e3779b97f4a7c15ULL + gc) % stride;
    idx = min(idx, seg - 1);
    float f[4];
    load4(keys + ((size_t)h * key_stride + (size_t)j * seg + idx) * D +
              lane * 4,
          f);
    float n2 = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[i] -= mean[(size_t)sg * D + lane * 4 + i];
        n2 += f[i] * f[i];
    }
    n2 = wsum(n2);
    const float inv = n2 > 0.f ? rsqrtf(n2) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++)
        f[i] *= inv;
    store4(cn + (size_t)gc * D + lane * 4, f);
}

template <typename T>
__global__ void __launch_bounds__(KM_THREADS)
    assign_kernel(const T *keys, size_t key_stride, uint32_t Np, uint32_t seg,
                  uint32_t n_seg, uint32_t K, const float *mean,
                  const __nv_bfloat16 *cn, uint32_t *assign, float *best,
                  uint32_t *counts) {
    extern __shared__ __align__(128) unsigned char km_smem[];
    __nv_bfloat16 *As = reinterpret_cast<__nv_bfloat16 *>(km_smem);
    __nv_bfloat16 *Bs = As + KM_ROWS * KM_LD;
    float *Cs = reinterpret_cast<float *>(Bs + KM_CHUNK * KM_LD);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t sg = blockIdx.y, h = sg / n_seg, j = sg % n_seg;
    const uint32_t row0 = blockIdx.x * KM_ROWS;
    const uint32_t rows = min((uint32_t)KM_ROWS, seg - row0);
    const T *kb = keys + ((size_t)h * key_stride + (size_t)j * seg + row0) * D;
    const float *mu = mean + (size_t)sg * D;
    for (int e = tid; e < KM_ROWS * (D / 8); e += KM_THREADS) {
        const int r = e / (D / 8), ch = e % (D / 8);
        uint4 o = make_uint4(0, 0, 0, 0);
        if (r < (int)rows) {
            float f[8];
            cvt8(*reinterpret_cast<const uint4 *>(kb + (size_t)r * D + ch * 8),
                 f, (const T *)nullptr);
            __nv_bfloat16 *b = reinterpret_cast<__nv_bfloat16 *>(&o);
#pragma unroll
            for (int i = 0; i < 8; i++)
                b[i] = __float2bfloat16_rn(f[i] - mu[ch * 8 + i]);
        }
        *reinterpret_cast<uint4 *>(As + r * KM_LD + ch * 8) = o;
    }
    const __nv_bfloat16 *cb_base = cn + (size_t)sg * K * D;
    float *cw = Cs + warp * 16 * KM_CLD;
    const int r = lane >> 1, half = lane & 1;
    float bv = -INFINITY;
    uint32_t bi = 0;
    for (uint32_t cb = 0; cb < K; cb += KM_CHUNK) {
        __syncthreads();
        for (int e = tid; e < KM_CHUNK * (D / 8); e += KM_THREADS) {
            const int rr = e / (D / 8), ch = e % (D / 8);
            uint4 u = make_uint4(0, 0, 0, 0);
            if (cb + rr < K)
                u = *reinterpret_cast<const uint4 *>(
                    cb_base + (size_t)(cb + rr) * D + ch * 8);
            *reinterpret_cast<uint4 *>(Bs + rr * KM_LD + ch * 8) = u;
        }
        __syncthreads();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[KM_CHUNK / 16];
#pragma unroll
        for (int n = 0; n < KM_CHUNK / 16; n++)
            wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
        for (int k = 0; k < D / 16; k++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                           wmma::row_major>
                fa;
            wmma::load_matrix_sync(fa, As + warp * 16 * KM_LD + k * 16, KM_LD);
#pragma unroll
            for (int n = 0; n < KM_CHUNK / 16; n++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                               wmma::col_major>
                    fb;
                wmma::load_matrix_sync(fb, Bs + n * 16 * KM_LD + k * 16, KM_LD);
                wmma::mma_sync(acc[n], fa, fb, acc[n]);
            }
        }
#pragma unroll
        for (int n = 0; n < KM_CHUNK / 16; n++)
            wmma::store_matrix_sync(cw + n * 16, acc[n], KM_CLD,
                                    wmma::mem_row_major);
        __syncwarp();
        for (int cc = half; cc < KM_CHUNK; cc += 2) {
            const uint32_t g = cb + cc;
            if (g < K) {
                const float v = cw[r * KM_CLD + cc];
                if (v > bv) {
                    bv = v;
                    bi = g;
                }
            }
        }
        __syncwarp();
    }
    const float ov = __shfl_xor_sync(0xffffffffu, bv, 1);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, 1);
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
    const uint32_t row = warp * 16 + r;
    if (half == 0 && row < rows) {
        const size_t t = (size_t)h * Np + (size_t)j * seg + row0 + row;
        const uint32_t gc = sg * K + bi;
        assign[t] = gc;
        best[t] = bv;
        atomicAdd(&counts[gc], 1u);
    }
}

struct upd_args {
    const void *keys, *values;
    size_t key_stride;
    uint32_t Np, n_seg, K, C, gcl;
    const uint32_t *offs, *ids;
    const float *mean;
    __nv_bfloat16 *cn;
    uint32_t first_pos, lo, hi;
    kvs_cuda_kmeans_out_t out;
};

/* One warp per cluster; FINAL writes the output index. */
template <typename T, bool FINAL> __global__ void update_kernel(upd_args a) {
    const uint32_t gc = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (gc >= a.gcl)
        return;
    const uint32_t sg = gc / a.K, h = sg / a.n_seg;
    const uint32_t o0 = a.offs[gc], n = a.offs[gc + 1] - o0;
    const T *kb = (const T *)a.keys + (size_t)h * a.key_stride * D + lane * 4;
    float s[4] = {0, 0, 0, 0};
    for (uint32_t m = 0; m < n; m++) {
        const uint32_t local = a.ids[o0 + m] - h * a.Np;
        float f[4];
        load4(kb + (size_t)local * D, f);
#pragma unroll
        for (int i = 0; i < 4; i++)
            s[i] += f[i];
    }
    if (!FINAL) {
        if (n == 0)
            return;
        float n2 = 0.f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s[i] -= (float)n * a.mean[(size_t)sg * D + lane * 4 + i];
            n2 += s[i] * s[i];
        }
        n2 = wsum(n2);
        if (n2 <= 0.f)
            return;
        const float inv = rsqrtf(n2);
#pragma unroll
        for (int i = 0; i < 4; i++)
            s[i] *= inv;
        store4(a.cn + (size_t)gc * D + lane * 4, s);
        return;
    }
    const uint32_t c = gc - h * a.C;
    const size_t oc = (size_t)h * a.out.cluster_stride + c;
    const float inv = n ? 1.f / (float)n : 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++)
        s[i] *= inv;
    store4((T *)a.out.centroids + oc * D + lane * 4, s);
    const T *vb = (const T *)a.values + (size_t)h * a.key_stride * D + lane * 4;
    float v[4] = {0, 0, 0, 0};
    uint32_t cnt = 0, flag = 0;
    for (uint32_t m = 0; m < n; m++) {
        const uint32_t local = a.ids[o0 + m] - h * a.Np;
        const uint32_t p = a.first_pos + local;
        if (p < a.lo || p >= a.hi) {
            flag = 1;
            continue;
        }
        float f[4];
        load4(vb + (size_t)local * D, f);
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] += f[i];
        cnt++;
    }
    const float vinv = cnt ? 1.f / (float)cnt : 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++)
        v[i] *= vinv;
    store4((T *)a.out.value_means + oc * D + lane * 4, v);
    if (lane == 0) {
        a.out.counts[oc] = cnt;
        a.out.steady_flags[oc] = (uint8_t)flag;
    }
}

/* cluster-ordered rows and positions; one half-warp per slot */
template <typename T>
__global__ void gather_kernel(const T *keys, const T *values, size_t key_stride,
                              uint32_t Np, size_t total, const uint32_t *ids,
                              uint32_t first_pos, kvs_cuda_kmeans_out_t out) {
    const size_t i =
        (size_t)blockIdx.x * (blockDim.x / LPR) + threadIdx.x / LPR;
    const int lane = threadIdx.x % LPR;
    if (i >= total)
        return;
    const uint32_t h = (uint32_t)(i / Np), slot = (uint32_t)(i % Np);
    const uint32_t local = ids[i] - h * Np;
    const size_t dst = (size_t)h * out.token_stride + slot;
    if (lane == 0)
        out.positions[dst] = first_pos + local;
    const size_t src = (size_t)h * key_stride + local;
    if (out.keys)
        *reinterpret_cast<uint4 *>((T *)out.keys + dst * D + lane * 8) =
            *reinterpret_cast<const uint4 *>(keys + src * D + lane * 8);
    if (out.values)
        *reinterpret_cast<uint4 *>((T *)out.values + dst * D + lane * 8) =
            *reinterpret_cast<const uint4 *>(values + src * D + lane * 8);
}

__global__ void offsets_kernel(const uint32_t *offs, uint32_t H, uint32_t C,
                               uint32_t Np, kvs_cuda_kmeans_out_t out) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)H * (C + 1))
        return;
    const uint32_t h = (uint32_t)(i / (C + 1)), c = (uint32_t)(i % (C + 1));
    out.offsets[(size_t)h * (out.cluster_stride + 1) + c] =
        offs[(size_t)h * C + c] - h * Np;
    if (c == 0)
        out.n_clusters[h] = C;
}

__global__ void iota_kernel(uint32_t *ids, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        ids[i] = (uint32_t)i;
}

uint32_t blocks(size_t n, uint32_t per) {
    return (uint32_t)((n + per - 1) / per);
}

template <typename T>
int build(kvs_cuda_kmeans_t *km, const void *keys, const void *values,
          uint32_t key_stride, uint32_t first_pos,
          const kvs_cuda_kmeans_out_t *out, cudaStream_t st) {
    const T *k = (const T *)keys;
    KVS_CUDA_TRY(cudaFuncSetAttribute(
        assign_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        KM_SMEM));
    iota_kernel<<<blocks(km->total, 256), 256, 0, st>>>(km->ids, km->total);
    mean_kernel<T>
        <<<km->S, 256, 0, st>>>(k, key_stride, km->seg, km->n_seg, km->mean);
    init_kernel<T><<<blocks(km->gcl, 8), 256, 0, st>>>(
        k, key_stride, km->seg, km->n_seg, km->K, km->gcl, km->p.seed, km->mean,
        km->cn);
    KVS_CUDA_LAUNCHED();
    upd_args a;
    memset(&a, 0, sizeof a);
    a.keys = keys;
    a.values = values;
    a.key_stride = key_stride;
    a.Np = km->Np;
    a.n_seg = km->n_seg;
    a.K = km->K;
    a.C = km->C;
    a.gcl = km->gcl;
    a.offs = km->offs;
    a.ids = km->ids_sorted;
    a.mean = km->mean;
    a.cn = km->cn;
    a.first_pos = first_pos;
    a.lo = km->p.steady_lo;
    a.hi = km->p.steady_hi;
    a.out = *out;
    const dim3 agrid(blocks(km->seg, KM_ROWS), km->S);
    for (uint32_t it = 0; it <= km->p.iters; it++) {
        KVS_CUDA_TRY(cudaMemsetAsync(km->counts, 0,
                                     (km->gcl + 1) * sizeof(uint32_t), st));
        assign_kernel<T><<<agrid, KM_THREADS, KM_SMEM, st>>>(
            k, key_stride, km->Np, km->seg, km->n_seg, km->K, km->mean, km->cn,
            km->assign, km->best, km->counts);
        KVS_CUDA_LAUNCHED();
        size_t tb = km->tmp_bytes;
        KVS_CUDA_TRY(cub::DeviceScan::ExclusiveSum(km->tmp, tb, km->counts,
                                                   km->offs, km->gcl + 1, st));
        tb = km->tmp_bytes;
        KVS_CUDA_TRY(cub::DeviceRadixSort::SortPairs(
            km->tmp, tb, km->assign, km->assign_sorted, km->ids, km->ids_sorted,
            km->total, 0, km->end_bit, st));
        if (it < km->p.iters)
            update_kernel<T, false><<<blocks(km->gcl, 8), 256, 0, st>>>(a);
        else
            update_kernel<T, true><<<blocks(km->gcl, 8), 256, 0, st>>>(a);
        KVS_CUDA_LAUNCHED();
    }
    gather_kernel<T><<<blocks(km->total, 8), 128, 0, st>>>(
        k, (const T *)values, key_stride, km->Np, km->total, km->ids_sorted,
        first_pos, *out);
    offsets_kernel<<<blocks((size_t)km->H * (km->C + 1), 256), 256, 0, st>>>(
        km->offs, km->H, km->C, km->Np, *out);
    KVS_CUDA_LAUNCHED();
    return 0;
}

} // namespace

extern "C" void kvs_cuda_kmeans_set_seed(kvs_cuda_kmeans_t *km, uint64_t seed) {
    km->p.seed = seed;
}

extern "C" int kvs_cuda_kmeans_new(const kvs_cuda_kmeans_params_t *p,
                                   kvs_dtype_t dtype, uint32_t d,
                                   uint32_t n_heads, uint32_t n_tokens,
                                   kvs_cuda_kmeans_t **out) {
    *out = NULL;
    if (!p || d != KVS_CUDA_HEAD_DIM || n_heads == 0 ||
        p->segment_tokens == 0 || p->cluster_tokens == 0 ||
        n_tokens < p->segment_tokens)
        return KVS_EINVAL;
    if (dtype != KVS_DTYPE_BF16 && dtype != KVS_DTYPE_F16)
        return KVS_ENOTSUP;
    kvs_cuda_kmeans_t *km = (kvs_cuda_kmeans_t *)calloc(1, sizeof *km);
    if (!km)
        return KVS_ENOMEM;
    km->p = *p;
    km->dtype = dtype;
    km->H = n_heads;
    km->seg = p->segment_tokens;
    km->n_seg = n_tokens / p->segment_tokens;
    uint32_t K = (uint32_t)floor((double)km->seg / p->cluster_tokens + 0.5);
    km->K = K ? K : 1;
    km->C = km->n_seg * km->K;
    km->Np = km->n_seg * km->seg;
    km->S = km->H * km->n_seg;
    km->gcl = km->S * km->K;
    km->total = (size_t)km->H * km->Np;
    int bits = 1;
    while (bits < 32 && (1ull << bits) < km->gcl)
        bits++;
    km->end_bit = bits;
    int rc = 0;
    size_t b1 = 0, b2 = 0;
    cudaError_t e;
#define ALLOC(ptr, n)                                                          \
    do {                                                                       \
        e = cudaMalloc((void **)&(ptr), (size_t)(n) * sizeof *(ptr));          \
        if (e != cudaSuccess) {                                                \
            rc = kvs__cuda_fail(e, "cudaMalloc " #ptr);                        \
            goto err;                                                          \
        }                                                                      \
    } while (0)
    ALLOC(km->mean, (size_t)km->S * D);
    ALLOC(km->cn, (size_t)km->gcl * D);
    ALLOC(km->assign, km->total);
    ALLOC(km->assign_sorted, km->total);
    ALLOC(km->ids, km->total);
    ALLOC(km->ids_sorted, km->total);
    ALLOC(km->best, km->total);
    ALLOC(km->counts, km->gcl + 1);
    ALLOC(km->offs, km->gcl + 1);
    e = cub::DeviceScan::ExclusiveSum(nullptr, b1, km->counts, km->offs,
                                      km->gcl + 1);
    if (e == cudaSuccess)
        e = cub::DeviceRadixSort::SortPairs(
            nullptr, b2, km->assign, km->assign_sorted, km->ids, km->ids_sorted,
            km->total, 0, km->end_bit);
    if (e != cudaSuccess) {
        rc = kvs__cuda_fail(e, "cub temp size");
        goto err;
    }
    km->tmp_bytes = b1 > b2 ? b1 : b2;
    ALLOC(km->tmp, km->tmp_bytes);
#undef ALLOC
    *out = km;
    return 0;
err:
    kvs_cuda_kmeans_free(km);
    return rc;
}

extern "C" void kvs_cuda_kmeans_free(kvs_cuda_kmeans_t *km) {
    if (!km)
        return;
    cudaFree(km->mean);
    cudaFree(km->cn);
    cudaFree(km->assign);
    cudaFree(km->assign_sorted);
    cudaFree(km->ids);
    cudaFree(km->ids_sorted);
    cudaFree(km->best);
    cudaFree(km->counts);
    cudaFree(km->offs);
    cudaFree(km->tmp);
    free(km);
}

extern "C" uint32_t
kvs_cuda_kmeans_clusters_per_head(const kvs_cuda_kmeans_t *km) {
    return km->C;
}

extern "C" uint32_t
kvs_cuda_kmeans_indexed_tokens(const kvs_cuda_kmeans_t *km) {
    return km->Np;
}

extern "C" const uint32_t *
kvs_cuda_kmeans_assignment(const kvs_cuda_kmeans_t *km) {
    return km->assign;
}

extern "C" int kvs_cuda_kmeans_build(kvs_cuda_kmeans_t *km, const void *keys,
                                     const void *values, uint32_t key_stride,
                                     uint32_t first_pos,
                                     const kvs_cuda_kmeans_out_t *out,
                                     cudaStream_t stream) {
    if (!keys || !values || !out || key_stride < km->Np ||
        out->cluster_stride < km->C || out->token_stride < km->Np)
        return KVS_EINVAL;
    KVS_CUDA_DISPATCH(km->dtype, return build<T>(km, keys, values, key_stride,
                                                 first_pos, out, stream));
    return KVS_ENOTSUP;
}

extern "C" int kvs_cuda_kmeans_objective(kvs_cuda_kmeans_t *km, double *out) {
    float *h = (float *)malloc(km->total * sizeof(float));
    if (!h)
        return KVS_ENOMEM;
    cudaError_t e = cudaMemcpy(h, km->best, km->total * sizeof(float),
                               cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        free(h);
        return kvs__cuda_fail(e, "cudaMemcpy objective");
    }
    double s = 0;
    for (size_t i = 0; i < km->total; i++)
        s += h[i];
    *out = s / (double)km->total;
    free(h);
    return 0;
}
