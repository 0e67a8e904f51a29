/*
 * full.cu: full-attention decode over keys/values in token order, split
 * over the sequence (flash-decoding): grid (splits, heads), each block a
 * contiguous chunk of rows, then the shared log-sum-exp merge. It reads
 * every key and value once, so its time is the bandwidth floor that the
 * wave index is measured against; keys/values may be mapped pinned host
 * memory (then it measures streaming the whole KV over the bus).
 */
#include "attend.cuh"

using namespace kvs_cuda;

struct kvs_cuda_full_s {
    kvs_dtype_t dtype;
    uint32_t n_heads, group, max_tokens, max_items, sms;
    float *po, *plse;
};

namespace {

template <typename T, int G>
__global__ void __launch_bounds__(ATT_THREADS)
    full_kernel(const T *keys, const T *values, size_t stride, uint32_t n,
                uint32_t chunk, const float *q, float qs, float *po,
                float *plse) {
    const int h = blockIdx.y, item = blockIdx.x;
    const int hw = threadIdx.x / LPR;
    float qr[G][8];
    att_load_q<G>(q + (size_t)h * G * D, qs, qr);
    att_state<G> s;
    att_init(s);
    const T *kb = keys + (size_t)h * stride * D;
    const T *vb = values + (size_t)h * stride * D;
    const uint32_t r0 = item * chunk, r1 = min(n, r0 + chunk);
    const T *kp[ATT_U], *vp[ATT_U];
    float bias[ATT_U];
    for (uint32_t r = r0 + hw; r < r1; r += ATT_HW * ATT_U) {
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            const uint32_t row = r + u * ATT_HW;
            const uint32_t rr = row < r1 ? row : r;
            kp[u] = kb + (size_t)rr * D;
            vp[u] = vb + (size_t)rr * D;
            bias[u] = row < r1 ? 0.f : -INFINITY;
        }
        att_rows<T, G>(s, qr, kp, vp, bias);
    }
    const size_t pi = (size_t)h * gridDim.x + item;
    att_finish<G>(s, po + pi * G * D, plse + pi * G);
}

template <typename T, int G>
int launch_full(kvs_cuda_full_t *f, const void *k, const void *v, uint32_t n,
                uint32_t chunk, uint32_t items, float qs, const float *q,
                cudaStream_t stream) {
    dim3 grid(items, f->n_heads);
    full_kernel<T, G><<<grid, ATT_THREADS, 0, stream>>>(
        (const T *)k, (const T *)v, f->max_tokens, n, chunk, q, qs, f->po,
        f->plse);
    KVS_CUDA_LAUNCHED();
    return 0;
}

} // namespace

extern "C" int kvs_cuda_full_new(kvs_dtype_t dtype, uint32_t d,
                                 uint32_t n_heads, uint32_t group,
                                 uint32_t max_tokens, kvs_cuda_full_t **out) {
    *out = NULL;
    if (d != KVS_CUDA_HEAD_DIM || n_heads == 0 || group == 0 ||
        group > KVS_CUDA_MAX_GROUP || max_tokens == 0)
        return KVS_EINVAL;
    if (dtype != KVS_DTYPE_BF16 && dtype != KVS_DTYPE_F16)
        return KVS_ENOTSUP;
    int dev = 0, sms = 0;
    KVS_CUDA_TRY(cudaGetDevice(&dev));
    KVS_CUDA_TRY(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    kvs_cuda_full_t *f = (kvs_cuda_full_t *)calloc(1, sizeof *f);
    if (!f)
        return KVS_ENOMEM;
    f->dtype = dtype;
    f->n_heads = n_heads;
    f->group = group;
    f->max_tokens = max_tokens;
    f->sms = (uint32_t)sms;
    /* about four blocks per SM in all */
    uint32_t items = (4 * f->sms + n_heads - 1) / n_heads;
    const uint32_t by_rows = (max_tokens + 127) / 128;
    f->max_items = items < by_rows ? items : by_rows;
    const size_t np = (size_t)n_heads * f->max_items * group;
    cudaError_t e = cudaMalloc((void **)&f->po, np * D * sizeof(float));
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&f->plse, np * sizeof(float));
    if (e != cudaSuccess) {
        kvs_cuda_full_free(f);
        return kvs__cuda_fail(e, "cudaMalloc full partials");
    }
    *out = f;
    return 0;
}

extern "C" void kvs_cuda_full_free(kvs_cuda_full_t *f) {
    if (!f)
        return;
    cudaFree(f->po);
    cudaFree(f->plse);
    free(f);
}

extern "C" int kvs_cuda_full_attend(kvs_cuda_full_t *f, const void *keys,
                                    const void *values, uint32_t n_tokens,
                                    float scale, const float *q, float *out,
                                    cudaStream_t stream) {
    if (n_tokens == 0 || n_tokens > f->max_tokens)
        return KVS_EINVAL;
    if (scale <= 0)
        scale = 1.f / sqrtf((float)D);
    uint32_t chunk = (n_tokens + f->max_items - 1) / f->max_items;
    chunk = (chunk + 31) / 32 * 32;
    if (chunk < 128)
        chunk = 128;
    const uint32_t items = (n_tokens + chunk - 1) / chunk;
    const float qs = scale * LOG2E;
    int rc = KVS_ENOTSUP;
    KVS_CUDA_DISPATCH(
        f->dtype, switch (f->group) {
            case 1:
                rc = launch_full<T, 1>(f, keys, values, n_tokens, chunk, items,
                                       qs, q, stream);
                break;
            case 2:
                rc = launch_full<T, 2>(f, keys, values, n_tokens, chunk, items,
                                       qs, q, stream);
                break;
            case 4:
                rc = launch_full<T, 4>(f, keys, values, n_tokens, chunk, items,
                                       qs, q, stream);
                break;
            case 8:
                rc = launch_full<T, 8>(f, keys, values, n_tokens, chunk, items,
                                       qs, q, stream);
                break;
            default:
                return KVS_ENOTSUP;
        });
    if (rc)
        return rc;
    return kvs__cuda_merge(f->po, f->plse, f->n_heads, f->group, items, out,
                           stream);
}
