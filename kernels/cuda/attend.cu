/*
 * attend.cu: tripartite (steady / retrieval / estimation) attention of one
 * layer over the zones chosen by select, and the log-sum-exp merge.
 *
 * Grid: (steady items + retrieval items + estimation items, heads). Each
 * block is one split of one head's work and writes one partial; the item
 * counts are fixed by the plan (caps), so a launch has a static shape and
 * can be captured in a CUDA graph. Items beyond a head's actual list write
 * an empty partial (lse -inf).
 *   steady item:     ATT_STEADY_ROWS consecutive steady rows, rows spread
 *                    over the half-warps
 *   retrieval item:  ATT_RET_CLUSTERS clusters of the retrieval list, one
 *                    cluster at a time per half-warp; steady members masked
 *                    by position; rows from the GPU cache slot on a hit,
 *                    else from layer keys/values (pinned host on the
 *                    offload path), misses staged for the cache fill
 *   estimation item: ATT_EST_ROWS clusters of the estimation list as
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
    uint32_t steady_items, ret_items, est_items;
    float *po, *plse;
};

template <typename T, int G>
__global__ void __launch_bounds__(ATT_THREADS) zone_kernel(zone_args a) {
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
        const uint32_t n = a.L.n_steady;
        const uint32_t r0 = item * ATT_STEADY_ROWS;
        const uint32_t r1 = min(n, r0 + ATT_STEADY_ROWS);
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
        const uint32_t j0 = (item - a.steady_items) * ATT_RET_CLUSTERS;
        const uint32_t j1 = min(a.n_ret[h], j0 + ATT_RET_CLUSTERS);
        const uint32_t *offs = a.L.offsets + (size_t)h * (C + 1);
        const T *keys = (const T *)a.L.keys + (size_t)h * N * D;
        const T *vals = (const T *)a.L.values + (size_t)h * N * D;
        const uint32_t *pos = a.L.positions + (size_t)h * N;
        const uint32_t st = a.cache.slot_tokens;
        for (uint32_t j = j0 + hw; j < j1; j += ATT_HW) {
            const uint32_t c = a.ret[(size_t)h * a.rcap + j];
            const uint32_t o0 = offs[c], n = offs[c + 1] - o0;
            const int slot =
                a.cache.slot_of ? a.cache.slot_of[(size_t)h * C + c] : -1;
            const T *kb, *vb;
            T *stk = nullptr, *stv = nullptr;
            if (slot >= 0) {
                kb = (const T *)a.cache.slot_keys + (size_t)slot * st * D;
                vb = (const T *)a.cache.slot_values + (size_t)slot * st * D;
            } else {
                kb = keys + (size_t)o0 * D;
                vb = vals + (size_t)o0 * D;
                if (a.cache.stage_keys && n <= st) {
                    const size_t so = ((size_t)h * a.rcap + j) * st * D;
                    stk = (T *)a.cache.stage_keys + so;
                    stv = (T *)a.cache.stage_values + so;
                }
            }
            const bool flagged = a.L.steady_flags[(size_t)h * C + c] != 0;
            for (uint32_t t = 0; t < n; t += ATT_U) {
                int strow[ATT_U];
#pragma unroll
                for (int u = 0; u < ATT_U; u++) {
                    const uint32_t row = t + u;
                    const bool ok = row < n;
                    const uint32_t rr = ok ? row : t;
                    kp[u] = kb + (size_t)rr * D;
                    vp[u] = vb + (size_t)rr * D;
                    strow[u] = ok ? (int)row : -1;
                    bias[u] = ok ? 0.f : -INFINITY;
                    if (ok && flagged) {
                        const uint32_t p = pos[o0 + row];
                        if (p < a.L.steady_lo || p >= a.L.steady_hi)
                            bias[u] = -INFINITY;
                    }
                }
                att_rows<T, G>(s, qr, kp, vp, bias, stk, stv, strow);
            }
        }
    } else {
        const uint32_t j0 =
            (item - a.steady_items - a.ret_items) * ATT_EST_ROWS;
        const uint32_t j1 = min(a.n_est[h], j0 + ATT_EST_ROWS);
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
    const size_t n_items = a.steady_items + a.ret_items + a.est_items;
    const size_t pi = (size_t)h * n_items + item;
    att_finish<G>(s, a.po + pi * G * D, a.plse + pi * G);
}

__global__ void merge_kernel(const float *po, const float *plse,
                             uint32_t group, uint32_t n_items, float *out) {
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
            o = fmaf(c,
                     po[(((size_t)h * n_items + k) * group + i) * D + dim], o);
        }
    }
    out[((size_t)h * group + i) * D + dim] = l > 0.f ? o / l : 0.f;
}

template <typename T, int G>
int launch_zones(const zone_args &a, uint32_t n_heads, cudaStream_t stream) {
    dim3 grid(a.steady_items + a.ret_items + a.est_items, n_heads);
    zone_kernel<T, G><<<grid, ATT_THREADS, 0, stream>>>(a);
    KVS_CUDA_LAUNCHED();
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
                           cudaStream_t stream) {
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
    a.steady_items = w->steady_items;
    a.ret_items = w->ret_items;
    a.est_items = w->est_items;
    a.po = w->po;
    a.plse = w->plse;
    KVS_CUDA_DISPATCH(L->dtype, switch (L->group) {
        case 1:
            return launch_zones<T, 1>(a, L->n_heads, stream);
        case 2:
            return launch_zones<T, 2>(a, L->n_heads, stream);
        case 4:
            return launch_zones<T, 4>(a, L->n_heads, stream);
        case 8:
            return launch_zones<T, 8>(a, L->n_heads, stream);
        default:
            return KVS_ENOTSUP;
    });
    return KVS_ENOTSUP;
}
