/*
 * score.cu: centroid scoring and top-k cluster selection for all heads of
 * a layer.
 *
 * score_kernel (grid: SCORE_TILE-centroid tiles x heads) writes the base-2
 * logits q_i.c * scale * log2 e of every query head i of the group and,
 * per tile and query head, the max and the sum of exp2 (so the softmax
 * normaliser needs no second pass over the logits).
 *
 * select_kernel (one 1024-thread block per head) forms the cluster score
 * sum_i softmax_i(c), turns it into an order-preserving 32-bit key (0 for
 * clusters that cannot be selected: count 0), finds the thresholds of the
 * top k_r (retrieval) and top k_r + k_e (retrieval + estimation) keys by a
 * 3-pass MSB radix select (11/11/10 bits) over shared-memory histograms,
 * and compacts the two lists. Ties at a threshold take one ticket each
 * from a shared counter, so the lists always have exactly k_r and k_e
 * entries and the retrieval set is inside the top k_r + k_e set.
 */
#include "wave.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

using namespace kvs_cuda;

namespace {

constexpr int SEL_THREADS = 1024;
constexpr size_t SEL_SMEM_MAX = 160 * 1024; /* keys in smem up to this */

template <typename T, int G>
__global__ void __launch_bounds__(SCORE_TILE)
    score_kernel(const kvs_cuda_layer_t L, const float *q, float qs,
                 float *logits, float *tile_ms, uint32_t tiles) {
    constexpr int HW = SCORE_TILE / LPR; /* 8 half-warps */
    constexpr int PER_HW = SCORE_TILE / HW;
    constexpr int U = 4;
    const int h = blockIdx.y, tile = blockIdx.x;
    const int hw = threadIdx.x / LPR, lane = threadIdx.x % LPR;
    const uint32_t C = L.max_clusters, nc = L.n_clusters[h];
    const T *cen = (const T *)L.centroids + (size_t)h * C * D;
    float qr[G][8];
    {
        const float *qh = q + (size_t)h * G * D;
#pragma unroll
        for (int i = 0; i < G; i++)
#pragma unroll
            for (int j = 0; j < 8; j++)
                qr[i][j] = qh[i * D + lane * 8 + j] * qs;
    }
    float m[G], l[G];
#pragma unroll
    for (int i = 0; i < G; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
#pragma unroll
    for (int k0 = 0; k0 < PER_HW; k0 += U) {
        uint4 kr[U];
        uint32_t c[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            c[u] = tile * SCORE_TILE + hw + HW * (k0 + u);
            kr[u] = c[u] < nc ? *reinterpret_cast<const uint4 *>(
                                    cen + (size_t)c[u] * D + lane * 8)
                              : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            cvt8(kr[u], kf, (const T *)nullptr);
#pragma unroll
            for (int i = 0; i < G; i++) {
                float acc = 0.f;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    acc = fmaf(qr[i][j], kf[j], acc);
                acc = hsum16(acc);
                if (c[u] < nc) {
                    if (lane == i % LPR)
                        logits[((size_t)h * G + i) * C + c[u]] = acc;
                    const float mx = fmaxf(m[i], acc);
                    l[i] = l[i] * exp2f(m[i] - mx) + exp2f(acc - mx);
                    m[i] = mx;
                }
            }
        }
    }
    __shared__ float sm[HW][G], sl[HW][G];
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < G; i++) {
            sm[hw][i] = m[i];
            sl[hw][i] = l[i];
        }
    }
    __syncthreads();
    if (threadIdx.x < G) {
        const int i = threadIdx.x;
        float mx = -INFINITY;
        for (int w = 0; w < HW; w++)
            mx = fmaxf(mx, sm[w][i]);
        float sum = 0.f;
        if (mx != -INFINITY)
            for (int w = 0; w < HW; w++)
                sum += sl[w][i] * exp2f(sm[w][i] - mx);
        float *o = tile_ms + (((size_t)h * tiles + tile) * G + i) * 2;
        o[0] = mx;
        o[1] = sum;
    }
}

struct sel_args {
    const uint32_t *n_clusters, *counts;
    uint32_t C, group, tiles, rcap, ecap;
    float rf, ef;
    const float *logits, *tile_ms;
    float *scores;
    uint32_t *keys; /* global fallback, NULL when in smem */
    uint32_t *ret, *n_ret, *est, *n_est;
};

__device__ __forceinline__ uint32_t frac_count(float f, uint32_t n,
                                               uint32_t cap) {
    if (n == 0)
        return 0;
    uint32_t k = (uint32_t)floorf(f * (float)n + 0.5f);
    return min(cap, k);
}

__global__ void __launch_bounds__(SEL_THREADS) select_kernel(sel_args a) {
    typedef cub::BlockScan<uint32_t, SEL_THREADS> scan_t;
    typedef cub::BlockReduce<uint32_t, SEL_THREADS> reduce_t;
    __shared__ union {
        typename scan_t::TempStorage scan;
        typename reduce_t::TempStorage reduce;
    } tmp;
    __shared__ uint32_t hist[2][2048];
    __shared__ float sM[KVS_CUDA_MAX_GROUP], sZ[KVS_CUDA_MAX_GROUP];
    __shared__ uint32_t sel_digit[2], sel_above[2], s_nvalid;
    __shared__ uint32_t cnt_r, cnt_e, tie_r, tie_e;
    extern __shared__ uint32_t skeys[];

    const uint32_t h = blockIdx.x, tid = threadIdx.x;
    const uint32_t C = a.C, G = a.group, nc = a.n_clusters[h];
    const int warp = tid / 32, lane = tid % 32;
    uint32_t *keys = a.keys ? a.keys + (size_t)h * C : skeys;

    /* softmax normaliser per query head from the tile partials */
    if (warp < (int)G) {
        const float *t = a.tile_ms + ((size_t)h * a.tiles * G + warp) * 2;
        float m = -INFINITY, s = 0.f;
        for (uint32_t k = lane; k < a.tiles; k += 32) {
            const float tm = t[(size_t)k * G * 2], ts = t[(size_t)k * G * 2 + 1];
            const float mx = fmaxf(m, tm);
            if (mx != -INFINITY) {
                s = s * exp2f(m - mx) + ts * exp2f(tm - mx);
                m = mx;
            }
        }
        for (int off = 16; off; off >>= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, m, off);
            const float os = __shfl_xor_sync(0xffffffffu, s, off);
            const float mx = fmaxf(m, om);
            if (mx != -INFINITY) {
                s = s * exp2f(m - mx) + os * exp2f(om - mx);
                m = mx;
            }
        }
        if (lane == 0) {
            sM[warp] = m;
            sZ[warp] = s;
        }
    }
    __syncthreads();

    uint32_t valid = 0;
    for (uint32_t c = tid; c < C; c += SEL_THREADS) {
        float sc = -1.f;
        uint32_t key = 0;
        if (c < nc && a.counts[(size_t)h * C + c] > 0) {
            sc = 0.f;
            for (uint32_t i = 0; i < G; i++)
                sc += exp2f(a.logits[((size_t)h * G + i) * C + c] - sM[i]) /
                      sZ[i];
            key = __float_as_uint(sc) + 1u;
            valid++;
        }
        a.scores[(size_t)h * C + c] = sc;
        if (c < nc)
            keys[c] = key;
    }
    const uint32_t nvalid_part = reduce_t(tmp.reduce).Sum(valid);
    if (tid == 0) {
        s_nvalid = nvalid_part;
        cnt_r = cnt_e = tie_r = tie_e = 0;
    }
    __syncthreads();
    const uint32_t nvalid = s_nvalid;
    const uint32_t kr = min(max(frac_count(a.rf, nc, a.rcap), nc ? 1u : 0u),
                            nvalid);
    const uint32_t ke = frac_count(a.ef, nc, a.ecap);
    const uint32_t kre = min(kr + ke, nvalid);

    /* radix select of the kr-th and kre-th largest keys */
    uint32_t prefix[2] = {0, 0}, kk[2] = {kr, kre};
    const int shifts[3] = {21, 10, 0}, nbits[3] = {11, 11, 10};
    for (int p = 0; p < 3; p++) {
        const int shift = shifts[p];
        const uint32_t hm = p == 0 ? 0u : ~0u << (shift + nbits[p]);
        const uint32_t dm = (1u << nbits[p]) - 1;
        for (uint32_t i = tid; i < 2 * 2048; i += SEL_THREADS)
            (&hist[0][0])[i] = 0;
        __syncthreads();
        if (kk[0] || kk[1]) {
            /* Scores crowd into few bins (same exponent): one shared atomic
             * per distinct bin per warp (__match_any_sync), not per key.
             * The loop count is warp-uniform so every lane matches. */
            for (uint32_t c0 = 0; c0 < nc; c0 += SEL_THREADS) {
                const uint32_t c = c0 + tid;
                const uint32_t key = c < nc ? keys[c] : 0;
#pragma unroll
                for (int s = 0; s < 2; s++) {
                    const bool in = c < nc && kk[s] && (key & hm) == prefix[s];
                    const uint32_t bin = in ? (key >> shift) & dm : 0xffffffffu;
                    const unsigned peers = __match_any_sync(0xffffffffu, bin);
                    if (in && lane == __ffs(peers) - 1)
                        atomicAdd(&hist[s][bin], (uint32_t)__popc(peers));
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < 2; s++) {
            if (kk[s] == 0)
                continue;
            const uint32_t b0 = 2047 - 2 * tid, b1 = 2046 - 2 * tid;
            uint32_t v[2] = {hist[s][b0], hist[s][b1]}, ex[2];
            scan_t(tmp.scan).ExclusiveSum(v, ex);
            if (ex[0] < kk[s] && kk[s] <= ex[0] + v[0]) {
                sel_digit[s] = b0;
                sel_above[s] = ex[0];
            }
            if (ex[1] < kk[s] && kk[s] <= ex[1] + v[1]) {
                sel_digit[s] = b1;
                sel_above[s] = ex[1];
            }
            __syncthreads();
            prefix[s] |= sel_digit[s] << shift;
            kk[s] -= sel_above[s];
            __syncthreads();
        }
    }
    const uint32_t Tr = prefix[0], Te = prefix[1];
    const uint32_t need_r = kk[0], need_e = kk[1];
    for (uint32_t c = tid; c < nc; c += SEL_THREADS) {
        const uint32_t key = keys[c];
        if (key == 0)
            continue;
        bool in_r = false, in_e = false;
        if (kr) {
            if (key > Tr) {
                in_r = true;
            } else if (key == Tr) {
                const uint32_t t = atomicAdd(&tie_r, 1u);
                in_r = t < need_r;
                if (!in_r && Tr == Te)
                    in_e = t < need_e;
            }
        }
        if (!in_r && !in_e && kre && !(kr && key == Tr && Tr == Te)) {
            if (key > Te) {
                in_e = true;
            } else if (key == Te) {
                in_e = atomicAdd(&tie_e, 1u) < need_e;
            }
        }
        if (in_r)
            a.ret[(size_t)h * a.rcap + atomicAdd(&cnt_r, 1u)] = c;
        else if (in_e)
            a.est[(size_t)h * a.ecap + atomicAdd(&cnt_e, 1u)] = c;
    }
    __syncthreads();
    if (tid == 0) {
        a.n_ret[h] = cnt_r;
        a.n_est[h] = cnt_e;
    }
}

template <typename T, int G>
int launch_score(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                 const float *q, cudaStream_t stream) {
    dim3 grid(w->tiles, L->n_heads);
    score_kernel<T, G><<<grid, SCORE_TILE, 0, stream>>>(
        *L, q, w->scale * LOG2E, w->logits, w->tile_ms, w->tiles);
    KVS_CUDA_LAUNCHED();
    return 0;
}

} // namespace

size_t kvs__cuda_select_smem(uint32_t max_clusters) {
    const size_t b = (size_t)max_clusters * sizeof(uint32_t);
    return b <= SEL_SMEM_MAX ? b : 0;
}

int kvs__cuda_select_prepare(size_t smem) {
    KVS_CUDA_TRY(cudaFuncSetAttribute(
        select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        (int)smem));
    return 0;
}

int kvs__cuda_score_select(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const float *q, cudaStream_t stream) {
    int rc = KVS_ENOTSUP;
    KVS_CUDA_DISPATCH(L->dtype, switch (L->group) {
        case 1:
            rc = launch_score<T, 1>(w, L, q, stream);
            break;
        case 2:
            rc = launch_score<T, 2>(w, L, q, stream);
            break;
        case 4:
            rc = launch_score<T, 4>(w, L, q, stream);
            break;
        case 8:
            rc = launch_score<T, 8>(w, L, q, stream);
            break;
        default:
            return KVS_ENOTSUP;
    });
    if (rc)
        return rc;
    sel_args a;
    a.n_clusters = L->n_clusters;
    a.counts = L->counts;
    a.C = L->max_clusters;
    a.group = L->group;
    a.tiles = w->tiles;
    a.rcap = w->rcap;
    a.ecap = w->ecap;
    a.rf = w->rf;
    a.ef = w->ef;
    a.logits = w->logits;
    a.tile_ms = w->tile_ms;
    a.scores = w->scores;
    const size_t smem = kvs__cuda_select_smem(L->max_clusters);
    a.keys = smem ? nullptr : w->keys;
    a.ret = w->ret;
    a.n_ret = w->n_ret;
    a.est = w->est;
    a.n_est = w->n_est;
    select_kernel<<<L->n_heads, SEL_THREADS, smem, stream>>>(a);
    KVS_CUDA_LAUNCHED();
    return 0;
}
