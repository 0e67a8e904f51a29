/*
 * attend.cuh: the flash-decoding building blocks shared by the zone
 * attention (attend.cu) and the full-attention baseline (full.cu).
 *
 * A block of 128 threads is 8 half-warps; a half-warp owns one key row at a
 * time (16 lanes x 8 elements = head_dim 128) and keeps, for each of the G
 * query heads of its group, an online-softmax state (max m, sum l, output
 * o[8] for its lanes' dims). Logits are kept in base 2 (q is pre-scaled by
 * scale * log2 e) so the exponentials are exp2. U rows are loaded before
 * any is used, so each lane has 2U 16-byte loads in flight. At the end the
 * block combines its half-warps and writes one partial: o / l and
 * lse = m + log2 l (base 2), -inf when it saw no rows. kvs__cuda_merge
 * combines a head's partials.
 */
#pragma once

#include "common.cuh"

namespace kvs_cuda {

constexpr int ATT_THREADS = 128;
constexpr int ATT_HW = ATT_THREADS / LPR; /* half-warps per block: 8 */
constexpr int ATT_U = 4;                  /* rows in flight per half-warp */

template <int G> struct att_state { float m[G], l[G], o[G][8]; };

template <int G> __device__ __forceinline__ void att_init(att_state<G> &s) {
#pragma unroll
    for (int i = 0; i < G; i++) {
        s.m[i] = -INFINITY;
        s.l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++)
            s.o[i][j] = 0.f;
    }
}

/* This lane's 8 dims of each query, pre-scaled into base-2 logits. */
template <int G>
__device__ __forceinline__ void att_load_q(const float *q, float qs,
                                           float qr[G][8]) {
    const int lane = threadIdx.x % LPR;
#pragma unroll
    for (int i = 0; i < G; i++) {
        const float4 *p =
            reinterpret_cast<const float4 *>(q + (size_t)i * D + lane * 8);
        float4 a = p[0], b = p[1];
        qr[i][0] = a.x * qs;
        qr[i][1] = a.y * qs;
        qr[i][2] = a.z * qs;
        qr[i][3] = a.w * qs;
        qr[i][4] = b.x * qs;
        qr[i][5] = b.y * qs;
        qr[i][6] = b.z * qs;
        qr[i][7] = b.w * qs;
    }
}

/*
 * U rows: kp[u]/vp[u] point at the rows and must always be readable (an
 * unused row slot repeats a valid row); bias[u] is added to the base-2
 * logit, -inf drops the row. When stk/stv are not NULL, rows with
 * st_row[u] >= 0 are also stored there (at stk + st_row[u] * D).
 */
template <typename T, int G>
__device__ __forceinline__ void
att_rows(att_state<G> &s, const float qr[G][8], const T *const kp[ATT_U],
         const T *const vp[ATT_U], const float bias[ATT_U], T *stk = nullptr,
         T *stv = nullptr, const int *st_row = nullptr) {
    const int lane = threadIdx.x % LPR;
    uint4 kr[ATT_U], vr[ATT_U];
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
        kr[u] = *reinterpret_cast<const uint4 *>(kp[u] + lane * 8);
        vr[u] = *reinterpret_cast<const uint4 *>(vp[u] + lane * 8);
    }
    if (stk) {
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            if (st_row[u] >= 0) {
                *reinterpret_cast<uint4 *>(stk + (size_t)st_row[u] * D +
                                           lane * 8) = kr[u];
                *reinterpret_cast<uint4 *>(stv + (size_t)st_row[u] * D +
                                           lane * 8) = vr[u];
            }
        }
    }
    float lg[ATT_U][G];
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
        float kf[8];
        cvt8(kr[u], kf, (const T *)nullptr);
#pragma unroll
        for (int i = 0; i < G; i++) {
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++)
                acc = fmaf(qr[i][j], kf[j], acc);
            lg[u][i] = acc;
        }
    }
#pragma unroll
    for (int u = 0; u < ATT_U; u++)
#pragma unroll
        for (int i = 0; i < G; i++) {
            const float t = hsum16(lg[u][i]); /* all 16 lanes, always */
            lg[u][i] = t + bias[u];
        }
    float vf[ATT_U][8];
#pragma unroll
    for (int u = 0; u < ATT_U; u++)
        cvt8(vr[u], vf[u], (const T *)nullptr);
#pragma unroll
    for (int i = 0; i < G; i++) {
        float mx = s.m[i];
#pragma unroll
        for (int u = 0; u < ATT_U; u++)
            mx = fmaxf(mx, lg[u][i]);
        const float ms = mx == -INFINITY ? 0.f : mx;
        const float c = exp2f(s.m[i] - ms);
        s.m[i] = mx;
        s.l[i] *= c;
#pragma unroll
        for (int j = 0; j < 8; j++)
            s.o[i][j] *= c;
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            const float p = exp2f(lg[u][i] - ms);
            s.l[i] += p;
#pragma unroll
            for (int j = 0; j < 8; j++)
                s.o[i][j] = fmaf(p, vf[u][j], s.o[i][j]);
        }
    }
}

/*
 * Combine the block's half-warps and write one partial: o [G][D] and lse
 * [G]. Must be reached by all threads of the block.
 */
template <int G>
__device__ __forceinline__ void att_finish(const att_state<G> &s, float *po,
                                           float *plse) {
    __shared__ float sm_m[ATT_HW][G], sm_l[ATT_HW][G];
    __shared__ float sm_o[ATT_HW][G][D];
    const int hw = threadIdx.x / LPR, lane = threadIdx.x % LPR;
#pragma unroll
    for (int i = 0; i < G; i++) {
        if (lane == 0) {
            sm_m[hw][i] = s.m[i];
            sm_l[hw][i] = s.l[i];
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
            sm_o[hw][i][lane * 8 + j] = s.o[i][j];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += ATT_THREADS) {
        const int i = e / D, dim = e % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < ATT_HW; w++)
            m = fmaxf(m, sm_m[w][i]);
        float l = 0.f, o = 0.f;
        if (m != -INFINITY) {
#pragma unroll
            for (int w = 0; w < ATT_HW; w++) {
                const float c = exp2f(sm_m[w][i] - m);
                l = fmaf(sm_l[w][i], c, l);
                o = fmaf(sm_o[w][i][dim], c, o);
            }
        }
        po[e] = l > 0.f ? o / l : 0.f;
        if (dim == 0)
            plse[i] = l > 0.f ? m + log2f(l) : -INFINITY;
    }
}

} // namespace kvs_cuda

/*
 * out[h][i][:] = sum_k 2^(lse[h][k][i] - LSE) o[h][k][i][:] over a head's
 * n_items partials (o [H][n_items][G][D], lse [H][n_items][G]).
 */
int kvs__cuda_merge(const float *po, const float *plse, uint32_t n_heads,
                    uint32_t group, uint32_t n_items, float *out,
                    cudaStream_t stream);
