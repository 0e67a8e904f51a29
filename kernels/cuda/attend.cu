/*
 * attend.cu: tripartite (steady / retrieval / estimation) attention of one
 * layer over the zones chosen by select, and the log-sum-exp merge (fused:
 * the last split of each head to finish merges that head).
 *
 * Grid: (steady items + retrieval items + estimation items, heads). Each
 * block is one split of one head's work and writes one partial; the item
 * counts are fixed by the plan (caps), so a launch has a static shape and
 * can be captured in a CUDA graph. Items beyond a head's actual list write
 * an empty partial (lse -inf).
 *   steady item:     ATT_STEADY_ROWS consecutive steady rows, rows spread
 *                    over the half-warps
 *   retrieval item:  ret_split clusters of the retrieval list, their rows
 *                    dealt evenly to the half-warps; steady members masked
 *                    by position; rows from the GPU cache slot on a hit,
 *                    else from layer keys/values (pinned host on the
 *                    offload path), misses staged for the cache fill
 *   estimation item: est_rows clusters of the estimation list as
 *                    pseudo-tokens: key = centroid, value = value mean,
 *                    logit bias log(count)
 */
#include "attend.cuh"
#include "wave.cuh"

using namespace kvs_cuda;

namespace {

struct zone_args {
    kvs_cuda_layer_t L;
    kvs_cuda_cache_t cache; /* slot_of NULL: no cache */
    const float *q;
    float qs;
    const uint32_t *ret, *n_ret, *est, *n_est;
    uint32_t rcap, ecap;
    uint32_t ret_split, est_rows;
    uint32_t steady_items, ret_items, est_items;
    float *po, *plse;
    uint32_t *done;
    float *out;
};

constexpr int RET_SPLIT_MAX = 32; /* one warp scans a split's sizes */

/* Blocks of the zone kernel resident per SM (a register cap of 128; G = 8
 * spills under it and keeps the default). 3 at 148 registers left the
 * 408 splits of the 128K batch-1 step 12 short of one wave (132 x 3 =
 * 396 slots). */
#ifndef KVS_ZONE_MIN_BLOCKS
#define KVS_ZONE_MIN_BLOCKS 4
#endif

/*
 * The last split of head h to finish merges the head's partials into out
 * (log-sum-exp weights), then resets done[h] for the next launch. The
 * partials of other blocks are read through L2 (__ldcg) after the fence.
 */
template <int G>
__device__ __forceinline__ void merge_if_last(const zone_args &a, int h,
                                              uint32_t n_items) {
    __shared__ uint32_t s_last;
    __shared__ float s_m[G], s_l[G];
    __threadfence(); /* this block's partial before the counter */
    __syncthreads();
    if (threadIdx.x == 0)
        s_last = atomicAdd(&a.done[h], 1u) == n_items - 1;
    __syncthreads();
    if (!s_last)
        return;
    __threadfence();
    const float *lse = a.plse + (size_t)h * n_items * G;
    const float4 *po =
        reinterpret_cast<const float4 *>(a.po + (size_t)h * n_items * G * D);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = warp; i < G; i += ATT_THREADS / 32) {
        float m = -INFINITY;
        for (uint32_t k = lane; k < n_items; k += 32)
            m = fmaxf(m, __ldcg(lse + (size_t)k * G + i));
        for (int off = 16; off; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float l = 0.f;
        if (m != -INFINITY)
            for (uint32_t k = lane; k < n_items; k += 32)
                l += exp2f(__ldcg(lse + (size_t)k * G + i) - m);
        for (int off = 16; off; off >>= 1)
            l += __shfl_xor_sync(0xffffffffu, l, off);
        if (lane == 0) {
            s_m[i] = m;
            s_l[i] = l;
        }
    }
    __syncthreads();
    constexpr int V = G * D / 4; /* float4 per partial */
    for (int e = threadIdx.x; e < V; e += ATT_THREADS) {
        const int i = e / (D / 4);
        const float m = s_m[i], l = s_l[i];
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        if (m != -INFINITY) {
#pragma unroll 8
            for (uint32_t k = 0; k < n_items; k++) {
                const float c = exp2f(__ldcg(lse + (size_t)k * G + i) - m);
                const float4 p = __ldcg(po + (size_t)k * V + e);
                o.x = fmaf(c, p.x, o.x);
                o.y = fmaf(c, p.y, o.y);
                o.z = fmaf(c, p.z, o.z);
                o.w = fmaf(c, p.w, o.w);
            }
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        reinterpret_cast<float4 *>(a.out + (size_t)h * G * D)[e] =
            make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    }
    if (threadIdx.x == 0)
        a.done[h] = 0;
}

template <typename T, int G>
__global__ void __launch_bounds__(ATT_THREADS, G >= 8 ? 1 : KVS_ZONE_MIN_BLOCKS)
    zone_kernel(zone_args a) {
    const int h = blockIdx.y, item = blockIdx.x;
    const int hw = threadIdx.x / LPR;
    const uint32_t C = a.L.max_clusters;
    const size_t N = a.L.max_tokens;
    float qr[G][8];
    att_load_q<G>(a.q + (size_t)h * G * D, a.qs, qr);
    att_state<G> s;
    att_init(s);
    const T *kp[ATT_U], *vp[ATT_U];
    float bias[ATT_U];

    if (item < (int)a.steady_items) {
        /* needs nothing from select: runs while it finishes (PDL) */
        const uint32_t n = a.L.n_steady; /* stride */
        const uint32_t used = a.L.steady_rows ? min(a.L.steady_rows, n) : n;
        const uint32_t r0 = item * ATT_STEADY_ROWS;
        const uint32_t r1 = min(used, r0 + ATT_STEADY_ROWS);
        const T *sk = (const T *)a.L.steady_keys + (size_t)h * n * D;
        const T *sv = (const T *)a.L.steady_values + (size_t)h * n * D;
        for (uint32_t r = r0 + hw; r < r1; r += ATT_HW * ATT_U) {
#pragma unroll
            for (int u = 0; u < ATT_U; u++) {
                const uint32_t row = r + u * ATT_HW;
                const uint32_t rr = row < r1 ? row : r;
                kp[u] = sk + (size_t)rr * D;
                vp[u] = sv + (size_t)rr * D;
                bias[u] = row < r1 ? 0.f : -INFINITY;
            }
            att_rows<T, G>(s, qr, kp, vp, bias);
        }
    } else if (item < (int)(a.steady_items + a.ret_items)) {
        /* The split's clusters' rows as one list, dealt to the half-warps
         * ATT_U consecutive rows at a time: a large cluster is spread over
         * several half-warps instead of holding one back. */
        __shared__ uint32_t s_pre[RET_SPLIT_MAX + 1], s_o0[RET_SPLIT_MAX];
        __shared__ int s_slot[RET_SPLIT_MAX];
        __shared__ uint32_t s_flag[RET_SPLIT_MAX];
        pdl_wait();
        const uint32_t j0 = (item - a.steady_items) * a.ret_split;
        const uint32_t nr = a.n_ret[h];
        const uint32_t nj = nr > j0 ? min(nr - j0, a.ret_split) : 0;
        const uint32_t *offs = a.L.offsets + (size_t)h * (C + 1);
        if (threadIdx.x < 32) {
            const uint32_t k = threadIdx.x;
            uint32_t n = 0;
            if (k < nj) {
                const uint32_t c = a.ret[(size_t)h * a.rcap + j0 + k];
                const uint32_t o0 = offs[c];
                n = offs[c + 1] - o0;
                s_o0[k] = o0;
                s_slot[k] =
                    a.cache.slot_of ? a.cache.slot_of[(size_t)h * C + c] : -1;
                s_flag[k] = a.L.steady_flags[(size_t)h * C + c];
            }
            uint32_t x = n; /* inclusive scan of the sizes */
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const uint32_t y = __shfl_up_sync(0xffffffffu, x, off);
                if ((int)k >= off)
                    x += y;
            }
            if (k == 0)
                s_pre[0] = 0;
            if (k < nj)
                s_pre[k + 1] = x;
        }
        __syncthreads();
        const uint32_t total = nj ? s_pre[nj] : 0;
        const T *keys = (const T *)a.L.keys + (size_t)h * N * D;
        const T *vals = (const T *)a.L.values + (size_t)h * N * D;
        const uint32_t *pos = a.L.positions + (size_t)h * N;
        const uint32_t st = a.cache.slot_tokens;
        T *stk = (T *)a.cache.stage_keys, *stv = (T *)a.cache.stage_values;
        for (uint32_t r0 = hw * ATT_U; r0 < total; r0 += ATT_HW * ATT_U) {
            int strow[ATT_U];
#pragma unroll
            for (int u = 0; u < ATT_U; u++) {
                const uint32_t row = r0 + u;
                const bool ok = row < total;
                const uint32_t rr = ok ? row : r0;
                /* the cluster k holding row rr: last s_pre[k] <= rr */
                int lo = 0, hi = (int)nj - 1;
                while (lo < hi) {
                    const int mid = (lo + hi + 1) >> 1;
                    if (s_pre[mid] <= rr)
                        lo = mid;
                    else
                        hi = mid - 1;
                }
                const uint32_t t = rr - s_pre[lo];
                const uint32_t n = s_pre[lo + 1] - s_pre[lo];
                const uint32_t o0 = s_o0[lo];
                const int slot = s_slot[lo];
                strow[u] = -1;
                if (slot >= 0) {
                    const size_t so = ((size_t)slot * st + t) * D;
                    kp[u] = (const T *)a.cache.slot_keys + so;
                    vp[u] = (const T *)a.cache.slot_values + so;
                } else {
                    kp[u] = keys + (size_t)(o0 + t) * D;
                    vp[u] = vals + (size_t)(o0 + t) * D;
                    if (ok && stk && n <= st)
                        strow[u] =
                            (int)(((size_t)h * a.rcap + j0 + lo) * st + t);
                }
                bias[u] = ok ? 0.f : -INFINITY;
                if (ok && s_flag[lo]) {
                    const uint32_t p = pos[o0 + t];
                    if (p < a.L.steady_lo || p >= a.L.steady_hi)
                        bias[u] = -INFINITY;
                }
            }
            att_rows<T, G>(s, qr, kp, vp, bias, stk, stv, strow);
        }
    } else {
        pdl_wait();
        const uint32_t j0 = (item - a.steady_items - a.ret_items) * a.est_rows;
        const uint32_t j1 = min(a.n_est[h], j0 + a.est_rows);
        const T *cen = (const T *)a.L.centroids + (size_t)h * C * D;
        const T *vm = (const T *)a.L.value_means + (size_t)h * C * D;
        const uint32_t *cnt = a.L.counts + (size_t)h * C;
        const uint32_t *est = a.est + (size_t)h * a.ecap;
        for (uint32_t j = j0 + hw; j < j1; j += ATT_HW * ATT_U) {
#pragma unroll
            for (int u = 0; u < ATT_U; u++) {
                const uint32_t jj = j + u * ATT_HW;
                const bool ok = jj < j1;
                const uint32_t c = est[ok ? jj : j];
                kp[u] = cen + (size_t)c * D;
                vp[u] = vm + (size_t)c * D;
                bias[u] = ok ? log2f((float)cnt[c]) : -INFINITY;
            }
            att_rows<T, G>(s, qr, kp, vp, bias);
        }
    }
    const uint32_t n_items = a.steady_items + a.ret_items + a.est_items;
    const size_t pi = (size_t)h * n_items + item;
    att_finish<G>(s, a.po + pi * G * D, a.plse + pi * G);
    merge_if_last<G>(a, h, n_items);
}

__global__ void merge_kernel(const float *po, const float *plse, uint32_t group,
                             uint32_t n_items, float *out) {
    const uint32_t h = blockIdx.x / group, i = blockIdx.x % group;
    const int dim = threadIdx.x;
    const float *lse = plse + (size_t)h * n_items * group + i;
    float m = -INFINITY;
    for (uint32_t k = 0; k < n_items; k++)
        m = fmaxf(m, lse[(size_t)k * group]);
    float l = 0.f, o = 0.f;
    if (m != -INFINITY) {
        for (uint32_t k = 0; k < n_items; k++) {
            const float c = exp2f(lse[(size_t)k * group] - m);
            l += c;
            o = fmaf(c, po[(((size_t)h * n_items + k) * group + i) * D + dim],
                     o);
        }
    }
    out[((size_t)h * group + i) * D + dim] = l > 0.f ? o / l : 0.f;
}

template <typename T, int G>
int launch_zones(const zone_args &a, uint32_t n_heads, bool pdl,
                 cudaStream_t stream) {
    dim3 grid(a.steady_items + a.ret_items + a.est_items, n_heads);
    KVS_CUDA_TRY(kvs__cuda_launch(zone_kernel<T, G>, grid, dim3(ATT_THREADS), 0,
                                  stream, pdl, a));
    return 0;
}

} // namespace

int kvs__cuda_merge(const float *po, const float *plse, uint32_t n_heads,
                    uint32_t group, uint32_t n_items, float *out,
                    cudaStream_t stream) {
    merge_kernel<<<n_heads * group, D, 0, stream>>>(po, plse, group, n_items,
                                                    out);
    KVS_CUDA_LAUNCHED();
    return 0;
}

int kvs__cuda_attend_zones(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const kvs_cuda_cache_t *cache, const float *q,
                           float *out, cudaStream_t stream) {
    zone_args a;
    a.L = *L;
    if (cache) {
        a.cache = *cache;
    } else {
        memset(&a.cache, 0, sizeof a.cache);
    }
    a.q = q;
    a.qs = w->scale * LOG2E;
    a.ret = w->ret;
    a.n_ret = w->n_ret;
    a.est = w->est;
    a.n_est = w->n_est;
    a.rcap = w->rcap;
    a.ecap = w->ecap;
    a.ret_split = w->ret_split;
    a.est_rows = w->est_rows;
    /* only the splits the steady rows in use need: a growing tail keeps a
     * plan sized for its capacity (the engine's mirrors: sinks + window +
     * two segments) without launching hundreds of empty steady splits */
    a.steady_items =
        L->steady_rows && L->steady_rows < L->n_steady
            ? (L->steady_rows + ATT_STEADY_ROWS - 1) / ATT_STEADY_ROWS
            : w->steady_items;
    a.ret_items = w->ret_items;
    a.est_items = w->est_items;
    if (L->clusters_hint && L->clusters_hint < L->max_clusters) {
        /* no head selects more than the hint's counts (the rule of
         * score.cu: ceil(f n) over n <= hint clusters) */
        const uint32_t r = kvs__cuda_frac_count(w->rf, L->clusters_hint);
        const uint32_t e = kvs__cuda_frac_count(w->ef, L->clusters_hint);
        const uint32_t rr = r < w->rcap ? r : w->rcap;
        const uint32_t ee = e < w->ecap ? e : w->ecap;
        a.ret_items = (rr + a.ret_split - 1) / a.ret_split;
        a.est_items = (ee + a.est_rows - 1) / a.est_rows;
    }
    a.po = w->po;
    a.plse = w->plse;
    a.done = w->done;
    a.out = out;
    const bool pdl = (w->pdl & 1) != 0;
    KVS_CUDA_DISPATCH(
        L->dtype, switch (L->group) {
            case 1:
                return launch_zones<T, 1>(a, L->n_heads, pdl, stream);
            case 2:
                return launch_zones<T, 2>(a, L->n_heads, pdl, stream);
            case 4:
                return launch_zones<T, 4>(a, L->n_heads, pdl, stream);
            case 8:
                return launch_zones<T, 8>(a, L->n_heads, pdl, stream);
            default:
                return KVS_ENOTSUP;
        });
    return KVS_ENOTSUP;
}
