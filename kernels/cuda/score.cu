/*
 * score.cu: centroid scoring and top-k cluster selection for all heads of
 * a layer.
 *
 * score_kernel (grid: SCORE_TILE-centroid tiles x heads) writes the base-2
 * logits q_i.c * scale * log2 e of every query head i of the group and,
 * per tile and query head, the max and the sum of exp2 (so the softmax
 * normaliser needs no second pass over the logits).
 *
 * select_kernel (a cluster of 8 blocks of 512 threads per head, each
 * block an eighth of the head's clusters) forms the cluster score
 * sum_i softmax_i(c), turns it into an order-preserving 32-bit key (0 for
 * clusters that cannot be selected: count 0), finds the thresholds of the
 * top k_r (retrieval) and top k_r + k_e (retrieval + estimation) keys by a
 * 3-pass MSB radix select (11/11/10 bits) over shared-memory histograms
 * summed across the cluster (distributed shared memory), and compacts the
 * two lists. Ties at a threshold take one ticket each (the block's first
 * ticket = ties held by the blocks before it), so the lists always have
 * exactly k_r and k_e entries and the retrieval set is inside the top
 * k_r + k_e set.
 */
#include "wave.cuh"

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

using namespace kvs_cuda;

namespace {

constexpr int SEL_THREADS = 512; /* select_kernel<512>; <256> when the
                                     grid would not fit in one wave */
constexpr int SEL_CLUSTER = 8;   /* blocks per head (a portable cluster) */
constexpr int SEL_BINS = 2048;
constexpr int SELB_THREADS = 1024;           /* select_block_kernel */
constexpr size_t SELB_SMEM_MAX = 160 * 1024; /* its keys in smem up to this */
constexpr size_t SEL_SMEM_MAX = 48 * 1024;   /* a block's keys in smem up to
                                                this, else in global memory */

/* Score blocks resident per SM when the grid is several waves (many
 * heads): a cap of 96 registers (5 blocks/SM instead of 4, 16 bytes of
 * spill) measured 2-3% faster at 128K batch 8 and 2% slower at batch 1,
 * where the grid is one wave (bench/RESULTS_gpu.md). */
#ifndef KVS_SCORE_MIN_BLOCKS_MANY
#define KVS_SCORE_MIN_BLOCKS_MANY 5
#endif

template <typename T, int G, int MB>
__global__ void __launch_bounds__(SCORE_TILE, MB)
    score_kernel(const kvs_cuda_layer_t L, const float *q, float qs,
                 float *logits, float *tile_ms, uint32_t tiles) {
    constexpr int HW = SCORE_TILE / LPR; /* 8 half-warps */
    constexpr int PER_HW = SCORE_TILE / HW;
    constexpr int U = 8;     /* centroid rows in flight per half-warp */
    pdl_launch_dependents(); /* select may start; it waits for us */
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
    uint32_t slice; /* clusters per block of the cluster: ceil(C / 8) */
    float rf, ef;
    const float *logits, *tile_ms;
    float *scores;
    uint32_t *keys; /* global fallback [H][C], NULL when in smem */
    uint32_t *ret, *n_ret, *est, *n_est;
    uint32_t *ghist; /* [H][5][SEL_BINS] + [H] valid counts (cluster
                        kernel): zero on entry, left zero on exit */
};

__device__ __forceinline__ uint32_t frac_count(float f, uint32_t n,
                                               uint32_t cap) {
    return min(cap, kvs__cuda_frac_count(f, n));
}

/* One warp folds a query head's per-tile (max, sum of exp2) partials, t[k *
 * G * 2 + {0,1}] for k < tiles, into the head's softmax max *M and
 * normaliser *Z (written by lane 0). */
__device__ __forceinline__ void head_normaliser(const float *t, uint32_t tiles,
                                                uint32_t G, int lane, float *M,
                                                float *Z) {
    float m = -INFINITY, s = 0.f;
    for (uint32_t k = lane; k < tiles; k += 32) {
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
        *M = m;
        *Z = s;
    }
}

__device__ __forceinline__ uint32_t clampu(int64_t x, uint32_t hi) {
    return x <= 0 ? 0u : x >= (int64_t)hi ? hi : (uint32_t)x;
}

/* Warp-aggregated add of a per-thread 0/1 flag to a shared counter. */
__device__ __forceinline__ void warp_count(uint32_t *ctr, bool flag) {
    const unsigned b = __ballot_sync(0xffffffffu, flag);
    if ((threadIdx.x & 31) == 0 && b)
        atomicAdd(ctr, (uint32_t)__popc(b));
}

/*
 * One thread-block cluster of SEL_CLUSTER blocks per head (grid
 * (SEL_CLUSTER, H)); block r owns clusters [r * slice, (r + 1) * slice).
 * The histograms of a pass are summed in L2 (one red.add per distinct bin
 * of a warp into the head's global histogram), a cluster barrier orders
 * them, and every block reads the whole sum back and scans it itself, so
 * all blocks find the same digits without another barrier. Each pass has
 * its own histogram (no reuse within a launch); the blocks clear them
 * again at the end, so they are zero at the next launch. Exact tie
 * counts: per block the numbers of keys above and at each threshold are
 * exchanged once (distributed shared memory), so each block knows how
 * many ties the blocks before it hold (its first ticket) and where its
 * entries go in the two lists. (A first version summed the histograms by
 * reading every block's shared memory from every block: 81 us at 128K
 * batch 1, stalled on the load queue.)
 */
template <int THREADS>
__global__ void __cluster_dims__(SEL_CLUSTER, 1, 1) __launch_bounds__(THREADS)
    select_kernel(sel_args a) {
    constexpr int BPT = SEL_BINS / THREADS; /* bins per thread */
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    typedef cub::BlockScan<unsigned long long, THREADS> scan_t;
    typedef cub::BlockReduce<uint32_t, THREADS> reduce_t;
    __shared__ union {
        typename scan_t::TempStorage scan;
        typename reduce_t::TempStorage reduce;
    } tmp;
    __shared__ float sM[KVS_CUDA_MAX_GROUP], sZ[KVS_CUDA_MAX_GROUP];
    __shared__ uint32_t sel_digit[2], sel_above[2];
    /* gt_r, eq_r, gt_e, eq_e of this block's slice */
    __shared__ uint32_t s_cnt[4];
    __shared__ uint32_t s_base_r, s_base_e, s_tp_r, s_tp_e, tk_r, tk_e;
    __shared__ uint32_t s_cnt_r, s_cnt_e;
    extern __shared__ uint32_t skeys[]; /* this block's keys, if they fit */

    pdl_wait(); /* logits and tile partials of score_kernel */
    pdl_launch_dependents();
    const uint32_t rank = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const uint32_t C = a.C, G = a.group, nc = a.n_clusters[h];
    const int warp = tid / 32, lane = tid % 32;
    const uint32_t lo = min(C, rank * a.slice), hi = min(C, lo + a.slice);
    const uint32_t n_loc = hi - lo;
    uint32_t *keys = a.keys ? a.keys + (size_t)h * C + lo : skeys;
    /* head's histograms: pass 0 (both prefixes empty), pass 1 (x2),
     * pass 2 (x2); then the head's valid-cluster counter */
    uint32_t *gh = a.ghist + (size_t)h * 5 * SEL_BINS;
    uint32_t *gvalid = a.ghist + (size_t)gridDim.y * 5 * SEL_BINS + h;

    if (tid < 4)
        s_cnt[tid] = 0;
    if (tid == 0)
        tk_r = tk_e = s_cnt_r = s_cnt_e = 0;

    /* softmax normaliser per query head from the tile partials */
    if (warp < (int)G)
        head_normaliser(a.tile_ms + ((size_t)h * a.tiles * G + warp) * 2,
                        a.tiles, G, lane, &sM[warp], &sZ[warp]);
    __syncthreads();

    /* scores and keys of the slice; pass-0 histogram as we go */
    uint32_t valid = 0;
    for (uint32_t i0 = 0; i0 < n_loc; i0 += THREADS) {
        const uint32_t i = i0 + tid, c = lo + i;
        uint32_t key = 0;
        if (i < n_loc) {
            float sc = -1.f;
            if (c < nc && a.counts[(size_t)h * C + c] > 0) {
                sc = 0.f;
                for (uint32_t q = 0; q < G; q++)
                    sc += exp2f(a.logits[((size_t)h * G + q) * C + c] - sM[q]) /
                          sZ[q];
                key = __float_as_uint(sc) + 1u;
                valid++;
            }
            a.scores[(size_t)h * C + c] = sc;
            keys[i] = key;
        }
        /* warp-uniform trip count: every lane takes part in the match */
        const bool in = i < n_loc;
        const uint32_t bin = in ? key >> 21 : 0xffffffffu;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (in && lane == __ffs(peers) - 1)
            atomicAdd(&gh[bin], (uint32_t)__popc(peers));
    }
    const uint32_t valid_blk = reduce_t(tmp.reduce).Sum(valid);
    if (tid == 0 && valid_blk)
        atomicAdd(gvalid, valid_blk);
    cluster.sync(); /* valid count and pass-0 histogram complete */

    const uint32_t nvalid = __ldcg(gvalid);
    const uint32_t kr = min(frac_count(a.rf, nc, a.rcap), nvalid);
    const uint32_t ke = frac_count(a.ef, nc, a.ecap);
    const uint32_t kre = min(kr + ke, nvalid);

    /* radix select of the kr-th and kre-th largest keys */
    uint32_t prefix[2] = {0, 0}, kk[2] = {kr, kre};
#pragma unroll
    for (int p = 0; p < 3; p++) {
        const int shift = p == 0 ? 21 : p == 1 ? 10 : 0;
        const int nbits[3] = {11, 11, 10};
        uint32_t *h0 = gh + (p == 0 ? 0 : p == 1 ? 1 : 3) * SEL_BINS;
        uint32_t *h1 = p == 0 ? h0 : h0 + SEL_BINS;
        if (p > 0) {
            const uint32_t hm = ~0u << (shift + nbits[p]);
            const uint32_t dm = (1u << nbits[p]) - 1;
            if (kk[0] || kk[1]) {
                for (uint32_t i0 = 0; i0 < n_loc; i0 += THREADS) {
                    const uint32_t i = i0 + tid;
                    const uint32_t key = i < n_loc ? keys[i] : 0;
#pragma unroll
                    for (int s = 0; s < 2; s++) {
                        const bool in =
                            i < n_loc && kk[s] && (key & hm) == prefix[s];
                        const uint32_t bin =
                            in ? (key >> shift) & dm : 0xffffffffu;
                        const unsigned peers =
                            __match_any_sync(0xffffffffu, bin);
                        if (in && lane == __ffs(peers) - 1)
                            atomicAdd((s ? h1 : h0) + bin,
                                      (uint32_t)__popc(peers));
                    }
                }
            }
            cluster.sync(); /* this pass's histograms complete */
        }
        /* thread t owns bins 2047 - BPT t - k, k < BPT (descending order),
         * one 16-byte L2 read per set; both sets scanned at once as
         * 32|32-bit halves of a 64-bit sum */
        static_assert(BPT % 4 == 0, "whole uint4s per thread and set");
        const uint32_t b0 = SEL_BINS - BPT * (tid + 1);
        unsigned long long v[BPT], ex[BPT];
#pragma unroll
        for (int j = 0; j < BPT / 4; j++) {
            const uint4 x0 =
                __ldcg(reinterpret_cast<const uint4 *>(h0 + b0 + 4 * j));
            const uint4 x1 =
                p == 0
                    ? x0
                    : __ldcg(reinterpret_cast<const uint4 *>(h1 + b0 + 4 * j));
            const int kb = BPT - 1 - 4 * j; /* v[kb] is bin b0 + 4 j */
            v[kb] = x0.x | ((unsigned long long)x1.x << 32);
            v[kb - 1] = x0.y | ((unsigned long long)x1.y << 32);
            v[kb - 2] = x0.z | ((unsigned long long)x1.z << 32);
            v[kb - 3] = x0.w | ((unsigned long long)x1.w << 32);
        }
        scan_t(tmp.scan).ExclusiveSum(v, ex);
#pragma unroll
        for (int s = 0; s < 2; s++) {
            if (kk[s] == 0)
                continue;
#pragma unroll
            for (int k = 0; k < BPT; k++) {
                const uint32_t cnt = (uint32_t)(v[k] >> (32 * s));
                const uint32_t e = (uint32_t)(ex[k] >> (32 * s));
                if (e < kk[s] && kk[s] <= e + cnt) {
                    sel_digit[s] = SEL_BINS - 1 - BPT * tid - k;
                    sel_above[s] = e;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < 2; s++) {
            if (kk[s] == 0)
                continue;
            prefix[s] |= sel_digit[s] << shift;
            kk[s] -= sel_above[s];
        }
        /* sel_digit is written again only after the next cluster barrier,
         * tmp.scan reused only after it (a block barrier as well) */
    }
    const uint32_t Tr = prefix[0], Te = prefix[1];
    const uint32_t need_r = kk[0], need_e = kk[1];
    const bool same = Tr == Te;

    /* counts of this slice above / at each threshold */
    if (kr) {
        for (uint32_t i0 = 0; i0 < n_loc; i0 += THREADS) {
            const uint32_t i = i0 + tid;
            const uint32_t key = i < n_loc ? keys[i] : 0;
            const bool ok = i < n_loc && key != 0;
            warp_count(&s_cnt[0], ok && key > Tr);
            warp_count(&s_cnt[1], ok && key == Tr);
            warp_count(&s_cnt[2], ok && key > Te);
            warp_count(&s_cnt[3], ok && key == Te);
        }
    }
    cluster.sync(); /* every block's counts complete; all histogram reads
                       are done: clear this block's share for next time */
    for (uint32_t i = rank * THREADS + tid; i < 5 * SEL_BINS;
         i += SEL_CLUSTER * THREADS)
        gh[i] = 0;
    if (rank == 0 && tid == 0)
        *gvalid = 0;
    if (tid == 0) {
        uint32_t base_r = 0, base_e = 0, tp_r = 0, tp_e = 0, tot_r = 0,
                 tot_e = 0;
        for (uint32_t r = 0; r < SEL_CLUSTER; r++) {
            const uint32_t *cn = cluster.map_shared_rank(s_cnt, r);
            const uint32_t gt_r = cn[0], eq_r = cn[1], gt_e = cn[2],
                           eq_e = cn[3];
            uint32_t nr = 0, ne = 0;
            if (kr) {
                const uint32_t take_r = clampu((int64_t)need_r - tp_r, eq_r);
                nr = gt_r + take_r;
                if (same)
                    ne = clampu((int64_t)need_e - tp_r, eq_r) - take_r;
                else
                    ne = gt_e - nr + clampu((int64_t)need_e - tp_e, eq_e);
            }
            if (r == rank) {
                s_base_r = base_r;
                s_base_e = base_e;
                s_tp_r = tp_r;
                s_tp_e = tp_e;
            }
            base_r += nr;
            base_e += ne;
            tp_r += eq_r;
            tp_e += eq_e;
            tot_r += nr;
            tot_e += ne;
        }
        if (rank == 0) {
            a.n_ret[h] = tot_r;
            a.n_est[h] = tot_e;
        }
    }
    /* no block reads another's shared memory after this barrier, so each
     * may run on and exit; it also publishes s_base_* to this block */
    cluster.sync();
    if (!kr)
        return;
    const uint32_t base_r = s_base_r, base_e = s_base_e;
    const uint32_t tp_r = s_tp_r, tp_e = s_tp_e;
    for (uint32_t i = tid; i < n_loc; i += THREADS) {
        const uint32_t key = keys[i];
        if (key == 0)
            continue;
        bool in_r = false, in_e = false;
        if (key > Tr) {
            in_r = true;
        } else if (key == Tr) {
            const uint32_t t = tp_r + atomicAdd(&tk_r, 1u);
            if (t < need_r)
                in_r = true;
            else
                in_e = !same || t < need_e;
        } else if (key > Te) {
            in_e = true;
        } else if (key == Te) { /* here Te < Tr */
            in_e = tp_e + atomicAdd(&tk_e, 1u) < need_e;
        }
        const uint32_t c = lo + i;
        if (in_r)
            a.ret[(size_t)h * a.rcap + base_r + atomicAdd(&s_cnt_r, 1u)] = c;
        else if (in_e)
            a.est[(size_t)h * a.ecap + base_e + atomicAdd(&s_cnt_e, 1u)] = c;
    }
}

/*
 * The first select: one 1024-thread block per head over all its clusters
 * (KVS_CUDA_SELECT=block); kept to compare with select_kernel.
 */
__global__ void __launch_bounds__(SELB_THREADS)
    select_block_kernel(sel_args a) {
    typedef cub::BlockScan<uint32_t, SELB_THREADS> scan_t;
    typedef cub::BlockReduce<uint32_t, SELB_THREADS> reduce_t;
    __shared__ union {
        typename scan_t::TempStorage scan;
        typename reduce_t::TempStorage reduce;
    } tmp;
    __shared__ uint32_t hist[2][2048];
    __shared__ float sM[KVS_CUDA_MAX_GROUP], sZ[KVS_CUDA_MAX_GROUP];
    __shared__ uint32_t sel_digit[2], sel_above[2], s_nvalid;
    __shared__ uint32_t cnt_r, cnt_e, tie_r, tie_e;
    extern __shared__ uint32_t skeys[];

    pdl_wait();
    pdl_launch_dependents();
    const uint32_t h = blockIdx.x, tid = threadIdx.x;
    const uint32_t C = a.C, G = a.group, nc = a.n_clusters[h];
    const int warp = tid / 32, lane = tid % 32;
    uint32_t *keys = a.keys ? a.keys + (size_t)h * C : skeys;

    /* softmax normaliser per query head from the tile partials */
    if (warp < (int)G)
        head_normaliser(a.tile_ms + ((size_t)h * a.tiles * G + warp) * 2,
                        a.tiles, G, lane, &sM[warp], &sZ[warp]);
    __syncthreads();

    uint32_t valid = 0;
    for (uint32_t c = tid; c < C; c += SELB_THREADS) {
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
    const uint32_t kr = min(frac_count(a.rf, nc, a.rcap), nvalid);
    const uint32_t ke = frac_count(a.ef, nc, a.ecap);
    const uint32_t kre = min(kr + ke, nvalid);

    /* radix select of the kr-th and kre-th largest keys */
    uint32_t prefix[2] = {0, 0}, kk[2] = {kr, kre};
    const int shifts[3] = {21, 10, 0}, nbits[3] = {11, 11, 10};
    for (int p = 0; p < 3; p++) {
        const int shift = shifts[p];
        const uint32_t hm = p == 0 ? 0u : ~0u << (shift + nbits[p]);
        const uint32_t dm = (1u << nbits[p]) - 1;
        for (uint32_t i = tid; i < 2 * 2048; i += SELB_THREADS)
            (&hist[0][0])[i] = 0;
        __syncthreads();
        if (kk[0] || kk[1]) {
            /* Scores crowd into few bins (same exponent): one shared atomic
             * per distinct bin per warp (__match_any_sync), not per key.
             * The loop count is warp-uniform so every lane matches. */
            for (uint32_t c0 = 0; c0 < nc; c0 += SELB_THREADS) {
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
    for (uint32_t c = tid; c < nc; c += SELB_THREADS) {
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
int launch_score(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L, const float *q,
                 cudaStream_t stream) {
    const uint32_t tiles = kvs__cuda_tiles(w, L);
    dim3 grid(tiles, L->n_heads);
    if (w->score_many)
        score_kernel<T, G, KVS_SCORE_MIN_BLOCKS_MANY>
            <<<grid, SCORE_TILE, 0, stream>>>(*L, q, w->scale * LOG2E,
                                              w->logits, w->tile_ms, tiles);
    else
        score_kernel<T, G, 1><<<grid, SCORE_TILE, 0, stream>>>(
            *L, q, w->scale * LOG2E, w->logits, w->tile_ms, tiles);
    KVS_CUDA_LAUNCHED();
    return 0;
}

} // namespace

static uint32_t sel_slice(uint32_t max_clusters) {
    return (max_clusters + SEL_CLUSTER - 1) / SEL_CLUSTER;
}

size_t kvs__cuda_select_smem(uint32_t max_clusters, int block) {
    if (block) {
        const size_t b = (size_t)max_clusters * sizeof(uint32_t);
        return b <= SELB_SMEM_MAX ? b : 0;
    }
    const size_t b = (size_t)sel_slice(max_clusters) * sizeof(uint32_t);
    return b <= SEL_SMEM_MAX ? b : 0;
}

int kvs__cuda_select_threads(uint32_t n_heads, size_t smem) {
    /* 512 threads a block while the 8 blocks of every head fit on the GPU
     * at once; else 256 (twice the blocks per SM): a second wave of
     * blocks costs a whole select again (batch 8 at 128K: 512 blocks,
     * 264 resident at 512 threads) */
    int dev = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, select_kernel<SEL_THREADS>, SEL_THREADS, smem) !=
            cudaSuccess) {
        cudaGetLastError();
        return SEL_THREADS;
    }
    return (uint64_t)n_heads * SEL_CLUSTER <= (uint64_t)per_sm * sms
               ? SEL_THREADS
               : SEL_THREADS / 2;
}

size_t kvs__cuda_select_hist_words(uint32_t n_heads) {
    return (size_t)n_heads * (5 * SEL_BINS + 1);
}

int kvs__cuda_select_prepare(size_t smem, int block) {
    if (block)
        KVS_CUDA_TRY(cudaFuncSetAttribute(
            select_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
            (int)smem));
    else {
        KVS_CUDA_TRY(cudaFuncSetAttribute(
            select_kernel<SEL_THREADS>,
            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        KVS_CUDA_TRY(cudaFuncSetAttribute(
            select_kernel<SEL_THREADS / 2>,
            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    return 0;
}

int kvs__cuda_score_select(kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L,
                           const float *q, cudaStream_t stream) {
    int rc = KVS_ENOTSUP;
    KVS_CUDA_DISPATCH(
        L->dtype, switch (L->group) {
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
    a.tiles = kvs__cuda_tiles(w, L); /* as the score launch above */
    a.rcap = w->rcap;
    a.ecap = w->ecap;
    a.slice = sel_slice(L->max_clusters);
    a.rf = w->rf;
    a.ef = w->ef;
    a.logits = w->logits;
    a.tile_ms = w->tile_ms;
    a.scores = w->scores;
    const size_t smem = kvs__cuda_select_smem(L->max_clusters, w->select_block);
    a.keys = smem ? nullptr : w->keys;
    a.ret = w->ret;
    a.n_ret = w->n_ret;
    a.est = w->est;
    a.n_est = w->n_est;
    a.ghist = w->ghist;
    if (w->select_block)
        KVS_CUDA_TRY(kvs__cuda_launch(select_block_kernel, dim3(L->n_heads),
                                      dim3(SELB_THREADS), smem, stream,
                                      (w->pdl & 2) != 0, a));
    else if (w->sel_threads == SEL_THREADS / 2)
        KVS_CUDA_TRY(kvs__cuda_launch(
            select_kernel<SEL_THREADS / 2>, dim3(SEL_CLUSTER, L->n_heads),
            dim3(SEL_THREADS / 2), smem, stream, (w->pdl & 2) != 0, a));
    else
        KVS_CUDA_TRY(kvs__cuda_launch(
            select_kernel<SEL_THREADS>, dim3(SEL_CLUSTER, L->n_heads),
            dim3(SEL_THREADS), smem, stream, (w->pdl & 2) != 0, a));
    return 0;
}
