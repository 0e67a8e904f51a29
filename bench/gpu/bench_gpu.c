/*
 * bench_gpu.c: the GPU benchmark of issue 7 at Llama-3-8B geometry per
 * layer (32 query heads, 8 KV heads, head_dim 128, bf16).
 *
 *   1. KV on the GPU, contexts 32K/128K/512K (+256 unindexed decode
 *      tokens), batch 1 and 8: wave attention (select + zones + merge, one
 *      CUDA graph) vs our full-attention kernel vs torch SDPA (timed by
 *      bench/gpu/sdpa.py in the same run, read from --sdpa FILE); bytes
 *      each reads and effective bandwidth as a share of the measured
 *      device-to-device copy bandwidth; wave vs full relative L2 error.
 *   2. Index build: GPU segmented k-means for every config (128K x 8 KV
 *      heads is the headline, median of 3).
 *   3. KV in pinned host memory at 1M tokens, a GPU cache of 5% of the
 *      clusters (LRU and clock): time per step over a decode trace, hit
 *      rate, bytes over the bus; streaming all KV over PCIe (our full
 *      kernel reading pinned memory) as the baseline.
 *
 * Data are synthetic (synth.cuh): keys clustered around 256 centres per
 * 8192-token segment, queries aimed at a focus token that moves with
 * probability 0.05 per step. They time the kernels honestly, but hit rates
 * and errors on real model traces will differ. Every timing is the median over repetitions with a 256 MiB
 * memset between repetitions so that L2 holds nothing of the inputs.
 *
 * Usage: bench_gpu [--quick] [--sdpa FILE] [--json FILE] [--ctx N]
 *                  [--batch B] [--no-offload] [--breakdown]
 *   --ctx/--batch: only that context / batch (KV-on-GPU part);
 *   --no-offload: skip part 3; --breakdown: also time select alone and
 *   attend alone (each its own graph, L2 flushed before each).
 * Environment: KVS_CUDA_PDL (0..3, see kernels/cuda/wave.cuh).
 */
#include "kvs_buffer.h"
#include "kvs_cuda.h"
#include "synth.cuh"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define D 128
#define G 4
#define TAIL 256
#define SINKS 4
#define WINDOW 64
#define FLUSH_BYTES (256u << 20)

#define CU(call)                                                               \
    do {                                                                       \
        cudaError_t e_ = (call);                                               \
        if (e_ != cudaSuccess) {                                               \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #call, __FILE__,   \
                    __LINE__, cudaGetErrorString(e_));                         \
            exit(1);                                                           \
        }                                                                      \
    } while (0)
#define KV(call)                                                               \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_) {                                                             \
            fprintf(stderr, "%s failed: %d (%s)\n", #call, rc_,                \
                    kvs_cuda_last_error());                                    \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

static cudaStream_t st;
static void *flush_buf;
static cudaEvent_t e0, e1;
static char rows[1 << 16];
static size_t rows_len;
static double copy_gbs, h2d_gbs;
static int breakdown;

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
static double pct(double *v, int n, double p) {
    qsort(v, n, sizeof *v, cmp_d);
    int i = (int)ceil(p * n) - 1;
    return v[i < 0 ? 0 : i];
}
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void row_add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void row_add(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (rows_len)
        rows_len += snprintf(rows + rows_len, sizeof rows - rows_len, ",\n    ");
    rows_len += vsnprintf(rows + rows_len, sizeof rows - rows_len, fmt, ap);
    va_end(ap);
}

/* Median ms of a graph replay, L2 flushed before each. */
static double time_graph(cudaGraphExec_t g, int reps) {
    double *t = malloc(reps * sizeof *t);
    for (int r = 0; r < reps; r++) {
        CU(cudaMemsetAsync(flush_buf, r & 0xff, FLUSH_BYTES, st));
        CU(cudaEventRecord(e0, st));
        CU(cudaGraphLaunch(g, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        t[r] = ms;
    }
    double m = median(t, reps);
    free(t);
    return m;
}

static void measure_copy(void) {
    const size_t bytes = 1ull << 30;
    void *a, *b, *h;
    CU(cudaMalloc(&a, bytes));
    CU(cudaMalloc(&b, bytes));
    CU(cudaMemset(a, 1, bytes));
    double t[10];
    for (int r = 0; r < 10; r++) {
        CU(cudaEventRecord(e0, st));
        CU(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        t[r] = ms;
    }
    copy_gbs = 2.0 * bytes / (median(t, 10) * 1e-3) / 1e9;
    CU(cudaHostAlloc(&h, bytes / 2, cudaHostAllocDefault));
    memset(h, 1, bytes / 2);
    for (int r = 0; r < 5; r++) {
        CU(cudaEventRecord(e0, st));
        CU(cudaMemcpyAsync(a, h, bytes / 2, cudaMemcpyHostToDevice, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        t[r] = ms;
    }
    h2d_gbs = (double)(bytes / 2) / (median(t, 5) * 1e-3) / 1e9;
    printf("device-to-device copy %.0f GB/s (read+write), host-to-device "
           "pinned %.1f GB/s\n",
           copy_gbs, h2d_gbs);
    CU(cudaFree(a));
    CU(cudaFree(b));
    CU(cudaFreeHost(h));
}

static double sdpa_ms(const char *path, uint32_t ctx, uint32_t b,
                      char *backend) {
    FILE *f = path ? fopen(path, "r") : NULL;
    double best = -1;
    strcpy(backend, "-");
    if (!f)
        return -1;
    unsigned c, bb;
    double ms;
    char name[64];
    while (fscanf(f, "%u %u %lf %63s", &c, &bb, &ms, name) == 4)
        if (c == ctx && bb == b && ms > 0 && (best < 0 || ms < best)) {
            best = ms;
            strcpy(backend, name);
        }
    fclose(f);
    return best;
}

static void rel_rows(const float *a, const float *b, uint32_t nrows,
                     double *out) {
    for (uint32_t r = 0; r < nrows; r++) {
        double num = 0, den = 0;
        for (int k = 0; k < D; k++) {
            double d = (double)a[r * D + k] - b[r * D + k];
            num += d * d;
            den += (double)b[r * D + k] * b[r * D + k];
        }
        out[r] = sqrt(num / (den > 0 ? den : 1));
    }
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

typedef struct {
    double build_ms, wave_ms, full_ms, sdpa, rel_med, rel_p95;
    double wave_bytes, full_bytes;
} gres_t;

static gres_t run_gpu(uint32_t ctx, uint32_t b, int reps, int build_reps,
                      const char *sdpa_path) {
    gres_t r = {0};
    const uint32_t H = 8 * b, n = ctx + TAIL, ns = SINKS + WINDOW + TAIL;
    const size_t kvb = (size_t)H * n * D * 2;
    void *dk, *dv;
    CU(cudaMalloc(&dk, kvb));
    CU(cudaMalloc(&dv, kvb));
    KV(bench_synth_kv(dk, dv, H, n, n, 256, 1234 + ctx + b, st));

    kvs_cuda_kmeans_params_t kp = {8192, 16, 10, 1, SINKS, ctx - WINDOW};
    kvs_cuda_kmeans_t *km;
    KV(kvs_cuda_kmeans_new(&kp, KVS_DTYPE_BF16, D, H, ctx, &km));
    const uint32_t C = kvs_cuda_kmeans_clusters_per_head(km);
    kvs_cuda_kmeans_out_t o;
    o.cluster_stride = C;
    o.token_stride = ctx;
    CU(cudaMalloc((void **)&o.n_clusters, H * 4));
    CU(cudaMalloc(&o.centroids, (size_t)H * C * D * 2));
    CU(cudaMalloc(&o.value_means, (size_t)H * C * D * 2));
    CU(cudaMalloc((void **)&o.counts, (size_t)H * C * 4));
    CU(cudaMalloc((void **)&o.offsets, (size_t)H * (C + 1) * 4));
    CU(cudaMalloc((void **)&o.steady_flags, (size_t)H * C));
    CU(cudaMalloc((void **)&o.positions, (size_t)H * ctx * 4));
    CU(cudaMalloc(&o.keys, (size_t)H * ctx * D * 2));
    CU(cudaMalloc(&o.values, (size_t)H * ctx * D * 2));
    double bt[5];
    for (int i = 0; i < build_reps; i++) {
        CU(cudaEventRecord(e0, st));
        KV(kvs_cuda_kmeans_build(km, dk, dv, n, 0, &o, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        bt[i] = ms;
    }
    r.build_ms = median(bt, build_reps);
    kvs_cuda_kmeans_free(km);

    kvs_cuda_layer_t L;
    memset(&L, 0, sizeof L);
    L.dtype = KVS_DTYPE_BF16;
    L.d = D;
    L.n_heads = H;
    L.group = G;
    L.max_clusters = C;
    L.max_tokens = ctx;
    L.n_clusters = o.n_clusters;
    L.centroids = o.centroids;
    L.value_means = o.value_means;
    L.counts = o.counts;
    L.offsets = o.offsets;
    L.steady_flags = o.steady_flags;
    L.positions = o.positions;
    L.keys = o.keys;
    L.values = o.values;
    L.steady_lo = SINKS;
    L.steady_hi = ctx - WINDOW;
    L.n_steady = ns;
    void *sk, *sv;
    CU(cudaMalloc(&sk, (size_t)H * ns * D * 2));
    CU(cudaMalloc(&sv, (size_t)H * ns * D * 2));
    const size_t rb = D * 2;
    CU(cudaMemcpy2DAsync(sk, ns * rb, dk, n * rb, SINKS * rb, H,
                         cudaMemcpyDeviceToDevice, st));
    CU(cudaMemcpy2DAsync((char *)sk + SINKS * rb, ns * rb,
                         (char *)dk + (size_t)(ctx - WINDOW) * rb, n * rb,
                         (WINDOW + TAIL) * rb, H, cudaMemcpyDeviceToDevice,
                         st));
    CU(cudaMemcpy2DAsync(sv, ns * rb, dv, n * rb, SINKS * rb, H,
                         cudaMemcpyDeviceToDevice, st));
    CU(cudaMemcpy2DAsync((char *)sv + SINKS * rb, ns * rb,
                         (char *)dv + (size_t)(ctx - WINDOW) * rb, n * rb,
                         (WINDOW + TAIL) * rb, H, cudaMemcpyDeviceToDevice,
                         st));
    L.steady_keys = sk;
    L.steady_values = sv;

    uint32_t *focus = malloc(H * G * 4), *dfocus;
    for (uint32_t i = 0; i < H * G; i++)
        focus[i] = SINKS + rnd() % (ctx - SINKS);
    CU(cudaMalloc((void **)&dfocus, H * G * 4));
    CU(cudaMemcpy(dfocus, focus, H * G * 4, cudaMemcpyHostToDevice));
    float *q, *ow, *of;
    CU(cudaMalloc((void **)&q, (size_t)H * G * D * 4));
    CU(cudaMalloc((void **)&ow, (size_t)H * G * D * 4));
    CU(cudaMalloc((void **)&of, (size_t)H * G * D * 4));
    KV(bench_synth_q(q, dk, n, H, G, dfocus, 1234 + ctx + b, 77 + ctx, 12.f,
                      0.3f, st));

    kvs_cuda_wave_params_t wp = {0.018f, 0.232f, 0};
    kvs_cuda_wave_t *w;
    KV(kvs_cuda_wave_new(&L, &wp, &w));
    kvs_cuda_full_t *f;
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, G, n, &f));
    /* warm-up, then capture each as one graph */
    KV(kvs_cuda_wave_select(w, &L, q, st));
    KV(kvs_cuda_wave_attend(w, &L, NULL, q, ow, st));
    KV(kvs_cuda_full_attend(f, dk, dv, n, 0, q, of, st));
    CU(cudaStreamSynchronize(st));
    cudaGraph_t g;
    cudaGraphExec_t gw, gf;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    KV(kvs_cuda_wave_select(w, &L, q, st));
    KV(kvs_cuda_wave_attend(w, &L, NULL, q, ow, st));
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&gw, g, 0));
    CU(cudaGraphDestroy(g));
    if (breakdown) {
        cudaGraphExec_t gs, ga;
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        KV(kvs_cuda_wave_select(w, &L, q, st));
        CU(cudaStreamEndCapture(st, &g));
        CU(cudaGraphInstantiate(&gs, g, 0));
        CU(cudaGraphDestroy(g));
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        KV(kvs_cuda_wave_attend(w, &L, NULL, q, ow, st));
        CU(cudaStreamEndCapture(st, &g));
        CU(cudaGraphInstantiate(&ga, g, 0));
        CU(cudaGraphDestroy(g));
        const double ts = time_graph(gs, reps), ta = time_graph(ga, reps);
        printf("ctx %7u b%u breakdown: select (score+select) %.4f ms, "
               "attend (zones+merge) %.4f ms, step %.4f ms\n",
               ctx, b, ts, ta, time_graph(gw, reps));
        CU(cudaGraphExecDestroy(gs));
        CU(cudaGraphExecDestroy(ga));
    }
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    KV(kvs_cuda_full_attend(f, dk, dv, n, 0, q, of, st));
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&gf, g, 0));
    CU(cudaGraphDestroy(g));
    r.wave_ms = time_graph(gw, reps);
    r.full_ms = time_graph(gf, reps);

    /* accuracy and bytes */
    float *hw = malloc((size_t)H * G * D * 4), *hf = malloc((size_t)H * G * D * 4);
    CU(cudaMemcpy(hw, ow, (size_t)H * G * D * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(hf, of, (size_t)H * G * D * 4, cudaMemcpyDeviceToHost));
    double *rel = malloc(H * G * sizeof *rel);
    rel_rows(hw, hf, H * G, rel);
    r.rel_med = median(rel, H * G);
    r.rel_p95 = pct(rel, H * G, 0.95);
    const uint32_t rcap = kvs_cuda_wave_retrieval_cap(w);
    const uint32_t *dnr, *dne;
    const uint32_t *dret = kvs_cuda_wave_retrieved(w, &dnr);
    kvs_cuda_wave_estimated(w, &dne);
    uint32_t *ret = malloc((size_t)H * rcap * 4), *nr = malloc(H * 4),
             *ne = malloc(H * 4), *offs = malloc((size_t)H * (C + 1) * 4);
    CU(cudaMemcpy(ret, dret, (size_t)H * rcap * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(nr, dnr, H * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(ne, dne, H * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(offs, o.offsets, (size_t)H * (C + 1) * 4,
                  cudaMemcpyDeviceToHost));
    double bytes = 0, ret_rows = 0;
    for (uint32_t h = 0; h < H; h++) {
        bytes += (double)C * rb;            /* centroids, scoring */
        bytes += 2.0 * ne[h] * rb;          /* centroid + value mean */
        bytes += 2.0 * ns * rb;             /* steady K+V */
        for (uint32_t j = 0; j < nr[h]; j++) {
            const uint32_t c = ret[(size_t)h * rcap + j];
            ret_rows += offs[(size_t)h * (C + 1) + c + 1] -
                        offs[(size_t)h * (C + 1) + c];
        }
    }
    bytes += 2.0 * ret_rows * rb;
    r.wave_bytes = bytes;
    r.full_bytes = 2.0 * H * n * rb;
    char backend[64];
    r.sdpa = sdpa_ms(sdpa_path, ctx, b, backend);
    const double wbw = bytes / (r.wave_ms * 1e-3) / 1e9;
    const double fbw = r.full_bytes / (r.full_ms * 1e-3) / 1e9;
    printf("ctx %7u b%u: build %8.2f ms (%.1f Mkeys/s) | wave %.4f ms "
           "(%.1f MB, %.0f GB/s) | full %.4f ms (%.0f GB/s) | sdpa %.4f ms "
           "[%s] | wave speedup x%.2f vs full, x%.2f vs sdpa | rel L2 "
           "median %.4f p95 %.4f | exact keys %.2f%%\n",
           ctx, b, r.build_ms, H * (double)ctx / (r.build_ms * 1e-3) / 1e6,
           r.wave_ms, bytes / 1e6, wbw, r.full_ms, fbw, r.sdpa, backend,
           r.full_ms / r.wave_ms, r.sdpa > 0 ? r.sdpa / r.wave_ms : 0,
           r.rel_med, r.rel_p95, 100.0 * (ret_rows + H * ns) / ((double)H * n));
    row_add("{\"part\": \"gpu_kv\", \"context\": %u, \"batch\": %u, "
            "\"kv_heads\": %u, \"wave_ms\": %.5f, \"full_kernel_ms\": %.5f, "
            "\"sdpa_ms\": %.5f, \"sdpa_backend\": \"%s\", "
            "\"speedup_vs_full_kernel\": %.3f, \"speedup_vs_sdpa\": %.3f, "
            "\"wave_bytes\": %.0f, \"wave_gb_s\": %.1f, "
            "\"wave_bandwidth_share\": %.3f, \"full_bytes\": %.0f, "
            "\"full_gb_s\": %.1f, \"full_bandwidth_share\": %.3f, "
            "\"exact_key_fraction\": %.5f, \"rel_l2_median\": %.5f, "
            "\"rel_l2_p95\": %.5f, \"build_ms\": %.3f, "
            "\"build_keys_per_s\": %.0f}",
            ctx, b, H, r.wave_ms, r.full_ms, r.sdpa, backend,
            r.full_ms / r.wave_ms, r.sdpa > 0 ? r.sdpa / r.wave_ms : -1, bytes,
            wbw, wbw / copy_gbs, r.full_bytes, fbw, fbw / copy_gbs,
            (ret_rows + H * ns) / ((double)H * n), r.rel_med, r.rel_p95,
            r.build_ms, H * (double)ctx / (r.build_ms * 1e-3));

    free(hw);
    free(hf);
    free(rel);
    free(ret);
    free(nr);
    free(ne);
    free(offs);
    free(focus);
    CU(cudaGraphExecDestroy(gw));
    CU(cudaGraphExecDestroy(gf));
    kvs_cuda_wave_free(w);
    kvs_cuda_full_free(f);
    CU(cudaFree(dfocus));
    CU(cudaFree(q));
    CU(cudaFree(ow));
    CU(cudaFree(of));
    CU(cudaFree(sk));
    CU(cudaFree(sv));
    CU(cudaFree(o.n_clusters));
    CU(cudaFree(o.centroids));
    CU(cudaFree(o.value_means));
    CU(cudaFree(o.counts));
    CU(cudaFree(o.offsets));
    CU(cudaFree(o.steady_flags));
    CU(cudaFree(o.positions));
    CU(cudaFree(o.keys));
    CU(cudaFree(o.values));
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    return r;
}

typedef struct {
    double step_ms[2], hit[2], pcie_mb[2], fill_mb[2], uncacheable[2];
    double stream_ms, rel_med, rel_p95, build_ms;
} ores_t;

static ores_t run_offload(uint32_t ctx, uint32_t steps, uint32_t warm) {
    ores_t r = {0};
    const uint32_t H = 8, n = ctx + TAIL, ns = SINKS + WINDOW + TAIL;
    const size_t kvb = (size_t)H * n * D * 2, rb = D * 2;
    void *dk, *dv;
    CU(cudaMalloc(&dk, kvb));
    CU(cudaMalloc(&dv, kvb));
    KV(bench_synth_kv(dk, dv, H, n, n, 256, 99, st));
    kvs_cuda_kmeans_params_t kp = {8192, 16, 10, 1, SINKS, ctx - WINDOW};
    kvs_cuda_kmeans_t *km;
    KV(kvs_cuda_kmeans_new(&kp, KVS_DTYPE_BF16, D, H, ctx, &km));
    const uint32_t C = kvs_cuda_kmeans_clusters_per_head(km);
    kvs_wbuf_params_t bp;
    memset(&bp, 0, sizeof bp);
    bp.dtype = KVS_DTYPE_BF16;
    bp.d = D;
    bp.n_heads = H;
    bp.group = G;
    bp.max_clusters = C;
    bp.max_tokens = ctx;
    bp.n_steady = ns;
    bp.slot_tokens = 32;
    bp.slots_per_head = (uint32_t)ceil(0.05 * C);
    bp.policy = KVS_WBUF_LRU;
    bp.wave = (kvs_cuda_wave_params_t){0.018f, 0.232f, 0};
    kvs_wbuf_t *wb;
    double t0 = now_s();
    KV(kvs_wbuf_new(&bp, &wb));
    printf("offload ctx %u: buffer allocated in %.2f s\n", ctx, now_s() - t0);
    kvs_cuda_layer_t L;
    kvs_cuda_kmeans_out_t o;
    kvs_wbuf_layer(wb, &L, &o);
    CU(cudaEventRecord(e0, st));
    KV(kvs_cuda_kmeans_build(km, dk, dv, n, 0, &o, st));
    CU(cudaEventRecord(e1, st));
    CU(cudaEventSynchronize(e1));
    float bms;
    CU(cudaEventElapsedTime(&bms, e0, e1));
    r.build_ms = bms;
    kvs_cuda_kmeans_free(km);
    void *sk = (void *)L.steady_keys, *sv = (void *)L.steady_values;
    CU(cudaMemcpy2D(sk, ns * rb, dk, n * rb, SINKS * rb, H,
                    cudaMemcpyDeviceToDevice));
    CU(cudaMemcpy2D((char *)sk + SINKS * rb, ns * rb,
                    (char *)dk + (size_t)(ctx - WINDOW) * rb, n * rb,
                    (WINDOW + TAIL) * rb, H, cudaMemcpyDeviceToDevice));
    CU(cudaMemcpy2D(sv, ns * rb, dv, n * rb, SINKS * rb, H,
                    cudaMemcpyDeviceToDevice));
    CU(cudaMemcpy2D((char *)sv + SINKS * rb, ns * rb,
                    (char *)dv + (size_t)(ctx - WINDOW) * rb, n * rb,
                    (WINDOW + TAIL) * rb, H, cudaMemcpyDeviceToDevice));

    /* decode trace: per query head a focus token that moves w.p. 0.05 */
    float *qs;
    uint32_t *focus = malloc(H * G * 4), *dfocus;
    CU(cudaMalloc((void **)&qs, (size_t)steps * H * G * D * 4));
    CU(cudaMalloc((void **)&dfocus, H * G * 4));
    for (uint32_t i = 0; i < H * G; i++)
        focus[i] = SINKS + rnd() % (ctx - SINKS);
    for (uint32_t s = 0; s < steps; s++) {
        for (uint32_t i = 0; i < H * G; i++)
            if (rnd() % 100 < 5)
                focus[i] = SINKS + rnd() % (ctx - SINKS);
        CU(cudaMemcpy(dfocus, focus, H * G * 4, cudaMemcpyHostToDevice));
        KV(bench_synth_q(qs + (size_t)s * H * G * D, dk, n, H, G, dfocus,
                         99, 1000 + s, 12.f, 0.3f, st));
    }
    float *out, *of;
    CU(cudaMalloc((void **)&out, (size_t)H * G * D * 4));
    CU(cudaMalloc((void **)&of, (size_t)H * G * D * 4));
    kvs_cuda_full_t *f;
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, G, n, &f));
    double *t = malloc(steps * sizeof *t);
    const uint32_t n_acc = steps < 16 ? steps : 16;
    double *rel = malloc((size_t)n_acc * H * G * sizeof *rel);
    float *hw = malloc((size_t)H * G * D * 4), *hf = malloc((size_t)H * G * D * 4);
    for (int pol = 0; pol < 2; pol++) {
        kvs_wbuf_set_policy(wb, pol ? KVS_WBUF_CLOCK : KVS_WBUF_LRU);
        KV(kvs_wbuf_commit(wb, SINKS, ctx - WINDOW, st));
        kvs_wbuf_reset_stats(wb);
        for (uint32_t s = 0; s < steps; s++) {
            if (s == warm)
                kvs_wbuf_reset_stats(wb);
            CU(cudaStreamSynchronize(st));
            const double a = now_s();
            KV(kvs_wbuf_step(wb, qs + (size_t)s * H * G * D, out, st));
            CU(cudaStreamSynchronize(st));
            t[s] = (now_s() - a) * 1e3;
            if (pol == 0 && s >= steps - n_acc) {
                KV(kvs_cuda_full_attend(f, dk, dv, n, 0,
                                        qs + (size_t)s * H * G * D, of, st));
                CU(cudaMemcpy(hw, out, (size_t)H * G * D * 4,
                              cudaMemcpyDeviceToHost));
                CU(cudaMemcpy(hf, of, (size_t)H * G * D * 4,
                              cudaMemcpyDeviceToHost));
                rel_rows(hw, hf, H * G,
                         rel + (size_t)(s - (steps - n_acc)) * H * G);
            }
        }
        kvs_wbuf_stats_t S;
        kvs_wbuf_stats(wb, &S);
        r.step_ms[pol] = median(t + warm, steps - warm);
        r.hit[pol] = S.lookups ? (double)S.hits / S.lookups : 0;
        r.pcie_mb[pol] = S.steps ? S.bytes_miss / 1e6 / S.steps : 0;
        r.fill_mb[pol] = S.steps ? S.bytes_fill / 1e6 / S.steps : 0;
        r.uncacheable[pol] = S.lookups ? (double)S.uncacheable / S.lookups : 0;
        printf("offload ctx %u %s: step median %.3f ms (p90 %.3f), hit rate "
               "%.3f, over the bus %.1f MB/step, staged->slot %.1f MB/step, "
               "uncacheable %.3f of lookups; GPU %.2f GB, pinned host %.2f GB\n",
               ctx, pol ? "clock" : "LRU", r.step_ms[pol],
               pct(t + warm, steps - warm, 0.9), r.hit[pol], r.pcie_mb[pol],
               r.fill_mb[pol], r.uncacheable[pol], S.bytes_gpu / 1e9,
               S.bytes_host / 1e9);
    }
    r.rel_med = median(rel, n_acc * H * G);
    r.rel_p95 = pct(rel, n_acc * H * G, 0.95);
    /* baseline: stream all KV from pinned host memory */
    double ts[3];
    for (int i = 0; i < 3; i++) {
        CU(cudaEventRecord(e0, st));
        KV(kvs_cuda_full_attend(f, L.keys, L.values, ctx, 0, qs, of, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        ts[i] = ms;
    }
    r.stream_ms = median(ts, 3);
    printf("offload ctx %u: rel L2 vs exact median %.4f p95 %.4f; streaming "
           "all KV from pinned memory %.2f ms (%.1f GB/s; copy model at "
           "measured H2D %.2f ms); build %.1f ms\n",
           ctx, r.rel_med, r.rel_p95, r.stream_ms,
           2.0 * H * ctx * rb / (r.stream_ms * 1e-3) / 1e9,
           2.0 * H * ctx * rb / (h2d_gbs * 1e9) * 1e3, r.build_ms);
    for (int pol = 0; pol < 2; pol++)
        row_add("{\"part\": \"offload\", \"context\": %u, \"batch\": 1, "
                "\"policy\": \"%s\", \"cache_clusters_fraction\": 0.05, "
                "\"slot_tokens\": 32, \"steps\": %u, \"warmup_steps\": %u, "
                "\"step_ms_median\": %.4f, \"hit_rate\": %.4f, "
                "\"bus_mb_per_step\": %.2f, \"fill_mb_per_step\": %.2f, "
                "\"uncacheable_fraction\": %.4f, \"stream_all_kv_ms\": %.3f, "
                "\"rel_l2_median\": %.5f, \"rel_l2_p95\": %.5f, "
                "\"build_ms\": %.2f}",
                ctx, pol ? "clock" : "lru", steps, warm, r.step_ms[pol],
                r.hit[pol], r.pcie_mb[pol], r.fill_mb[pol],
                r.uncacheable[pol], r.stream_ms, r.rel_med, r.rel_p95,
                r.build_ms);
    free(t);
    free(rel);
    free(hw);
    free(hf);
    free(focus);
    kvs_cuda_full_free(f);
    kvs_wbuf_free(wb);
    CU(cudaFree(qs));
    CU(cudaFree(dfocus));
    CU(cudaFree(out));
    CU(cudaFree(of));
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    return r;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int quick = 0;
    const char *sdpa = NULL, *json = NULL;
    uint32_t only_ctx = 0, only_b = 0;
    int no_offload = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc)
            only_ctx = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            only_b = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--no-offload"))
            no_offload = 1;
        else if (!strcmp(argv[i], "--breakdown"))
            breakdown = 1;
        else if (!strcmp(argv[i], "--sdpa") && i + 1 < argc)
            sdpa = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
    }
    if (kvs_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, L2 %d MiB\n", prop.name,
           prop.multiProcessorCount, prop.l2CacheSize >> 20);
    CU(cudaStreamCreate(&st)); /* blocking: plain cudaMemcpy orders with it */
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    CU(cudaMalloc(&flush_buf, FLUSH_BYTES));
    measure_copy();
    row_add("{\"part\": \"device\", \"name\": \"%s\", \"sms\": %d, "
            "\"copy_gb_s\": %.1f, \"h2d_pinned_gb_s\": %.1f, \"data\": "
            "\"synthetic clustered keys, focus-token queries\"}",
            prop.name, prop.multiProcessorCount, copy_gbs, h2d_gbs);

    const uint32_t ctxs[3] = {32768, 131072, 524288};
    const uint32_t nctx = quick && !only_ctx ? 1 : 3, nb = quick ? 1 : 2;
    const uint32_t bs[2] = {1, 8};
    gres_t r128[2];
    memset(r128, 0, sizeof r128);
    int have128 = 0;
    for (uint32_t c = 0; c < nctx; c++)
        for (uint32_t bi = 0; bi < (only_b ? 2 : nb); bi++) {
            if ((only_ctx && ctxs[c] != only_ctx) ||
                (only_b && bs[bi] != only_b))
                continue;
            const int is128 = ctxs[c] == 131072;
            gres_t r = run_gpu(ctxs[c], bs[bi], quick ? 10 : 30,
                               is128 && bi == 0 ? 3 : 1, sdpa);
            if (is128) {
                r128[bi] = r;
                have128 = 1;
            }
        }
    ores_t o;
    memset(&o, 0, sizeof o);
    if (!no_offload)
        o = run_offload(quick ? 65536 : 1048576, quick ? 40 : 300,
                        quick ? 10 : 50);

    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            perror(json);
            return 1;
        }
        char date[32];
        time_t now = time(NULL);
        strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        fprintf(f, "{\n  \"bench\": \"gpu\",\n  \"command\": \"bench/run.sh "
                   "gpu%s\",\n",
                quick ? " --quick" : "");
        fprintf(f, "  \"machine\": \"%ld-core x86-64 | %s\",\n",
                sysconf(_SC_NPROCESSORS_ONLN), prop.name);
        fprintf(f, "  \"date\": \"%s\",\n  \"quick\": %s,\n", date,
                quick ? "true" : "false");
        fprintf(f, "  \"data\": \"synthetic clustered keys, focus-token "
                   "queries (bench/gpu/synth.cuh)\",\n");
        fprintf(f, "  \"copy_gb_s\": %.1f,\n  \"h2d_pinned_gb_s\": %.1f,\n",
                copy_gbs, h2d_gbs);
        fprintf(f, "  \"metrics\": {");
        const char *sep = "";
        if (have128 && r128[0].wave_ms > 0) {
            if (r128[0].sdpa > 0) {
                fprintf(f, "%s\n    \"speedup_vs_sdpa_128k_b1\": %.3f", sep,
                        r128[0].sdpa / r128[0].wave_ms);
                sep = ",";
            }
            if (r128[1].sdpa > 0) {
                fprintf(f, "%s\n    \"speedup_vs_sdpa_128k_b8\": %.3f", sep,
                        r128[1].sdpa / r128[1].wave_ms);
                sep = ",";
            }
            fprintf(f,
                    "%s\n    \"bandwidth_share_128k\": %.3f,"
                    "\n    \"build_s_128k_32layers\": %.4f,"
                    "\n    \"gpu_rel_l2_median\": %.5f",
                    sep,
                    r128[0].wave_bytes / (r128[0].wave_ms * 1e-3) / 1e9 /
                        copy_gbs,
                    32 * r128[0].build_ms * 1e-3, r128[0].rel_med);
            sep = ",";
        }
        if (!quick && !no_offload) {
            fprintf(f,
                    "%s\n    \"offload_ms_per_layer_1m\": %.4f,"
                    "\n    \"cache_hit_rate_1m\": %.4f",
                    sep, o.step_ms[0], o.hit[0]);
        }
        fprintf(f, "\n  },\n  \"rows\": [\n    %s\n  ]\n}\n", rows);
        fclose(f);
        printf("wrote %s\n", json);
    }
    return 0;
}
