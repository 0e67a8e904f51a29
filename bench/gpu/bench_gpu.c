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
 *      kernel reading pinned memory) as the baseline. LRU again with the
 *      misses copied by the copy engines (one batched copy per step, and
 *      one cudaMemcpyAsync per run) instead of read in place by the zone
 *      kernel, same run; outputs compared with the in-place pass.
 *
 * Data are synthetic (synth.cuh): keys clustered around 256 centres per
 * 8192-token segment, queries aimed at a focus token that moves with
 * probability 0.05 per step. They time the kernels honestly, but hit rates
 * and errors on real model traces differ: --trace DIR replaces all three
 * parts with a real tinycode128 decode trace written by bench/gpu/trace.py
 * (8 (layer, KV head) pairs as the heads, GQA group 2 from the files):
 * KV on the GPU at 32K, 128K (prefixes) and the whole trace, per real step
 * wave time and error vs our full kernel; then the whole trace offloaded
 * (5% of the clusters cached, LRU and clock) over its decode steps.
 * Every timing is the median over repetitions with a 256 MiB memset
 * between repetitions so that L2 holds nothing of the inputs.
 *
 * Usage: bench_gpu [--quick] [--sdpa FILE] [--json FILE] [--ctx N]
 *                  [--batch B] [--no-offload] [--breakdown]
 *        bench_gpu --trace DIR [--quick] [--json FILE] [--steps N]
 *                  [--warm N]
 *   --ctx/--batch: only that context / batch (KV-on-GPU part);
 *   --no-offload: skip part 3; --breakdown: also time select alone and
 *   attend alone (each its own graph, L2 flushed before each);
 *   --steps: offloaded decode steps over the trace (default: its S
 *   steps; more cycle through them), --warm: steps left out of the
 *   offload times and counts (50).
 * Environment: KVS_CUDA_PDL (0..3), KVS_CUDA_SELECT=block,
 * KVS_CUDA_SEL_THREADS (256|512): the launch variants of
 * kvs_cuda_wave_params_t (kernels/cuda/kvs_cuda.h), read here.
 */
#include "kvs_rng.h"
#include "kvs_buffer.h"
#include "kvs_cuda.h"
#include "synth.cuh"

#include <errno.h>
#include <execinfo.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The wave kernels' parameters: the default fractions, and the launch
 * variants from this program's environment (KVS_CUDA_PDL 0..3,
 * KVS_CUDA_SELECT=block, KVS_CUDA_SEL_THREADS=256|512), which the library
 * itself no longer reads (kvs_cuda_wave_params_t). */
static kvs_cuda_wave_params_t wave_params(void) {
    kvs_cuda_wave_params_t wp = {.retrieval_fraction = 0.018f,
                                 .estimation_fraction = 0.232f};
    const char *e = getenv("KVS_CUDA_PDL");
    wp.pdl = e && *e ? (uint32_t)atoi(e) & 3u : 0u;
    e = getenv("KVS_CUDA_SELECT");
    wp.select_block = e && !strcmp(e, "block");
    e = getenv("KVS_CUDA_SEL_THREADS");
    wp.select_threads = e && *e ? (uint32_t)atoi(e) : 0u;
    return wp;
}

#define D 128
#define TAIL 256
#define SINKS 4
#define WINDOW 64
#define FLUSH_BYTES (256u << 20)

/* Query heads per KV head: 4 (Llama-3-8B) for the synthetic parts, the
 * trace's GQA group (2 for tinycode128) with --trace. */

/* Opens a BENCH.md result file and writes its common head (bench, command,
 * machine, date, quick). NULL (and a message) when it cannot be opened. */
static FILE *json_begin(const char *path, const char *bench,
                        const char *command, int quick, const char *device) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return NULL;
    }
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    fprintf(f, "{\n  \"bench\": \"%s\",\n  \"command\": \"%s%s\",\n", bench,
            command, quick ? " --quick" : "");
    fprintf(f, "  \"machine\": \"%ld-core x86-64 | %s\",\n",
            sysconf(_SC_NPROCESSORS_ONLN), device);
    fprintf(f, "  \"date\": \"%s\",\n  \"quick\": %s,\n", date,
            quick ? "true" : "false");
    return f;
}

static uint32_t n_group = 4;

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
        rows_len +=
            snprintf(rows + rows_len, sizeof rows - rows_len, ",\n    ");
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

static kvs_rng_t rng = {88172645463325252ull};
static uint32_t rnd(void) {
    return (uint32_t)(kvs_rng_next(&rng) >> 32);
}

/* Steady rows [H][SINKS + WINDOW + TAIL][D] from token-order keys/values
 * [H][stride][D] whose first ctx tokens are indexed. */
static void steady_copy(void *sk, void *sv, const void *dk, const void *dv,
                        uint32_t H, uint32_t ctx, uint32_t stride) {
    const size_t rb = D * 2, ns = SINKS + WINDOW + TAIL;
    const void *src[2] = {dk, dv};
    void *dst[2] = {sk, sv};
    for (int i = 0; i < 2; i++) {
        CU(cudaMemcpy2DAsync(dst[i], ns * rb, src[i], stride * rb, SINKS * rb,
                             H, cudaMemcpyDeviceToDevice, st));
        CU(cudaMemcpy2DAsync((char *)dst[i] + SINKS * rb, ns * rb,
                             (const char *)src[i] + (size_t)(ctx - WINDOW) * rb,
                             stride * rb, (WINDOW + TAIL) * rb, H,
                             cudaMemcpyDeviceToDevice, st));
    }
}

/*
 * A wave index on the GPU built from the first ctx tokens of keys/values
 * (device bf16 [H][stride][D], token order): GPU k-means (segments of
 * 8192, 16 tokens per cluster, 10 iterations), and the steady zone = the
 * SINKS first tokens, the last WINDOW indexed ones and the TAIL unindexed
 * tokens after ctx.
 */
typedef struct {
    kvs_cuda_kmeans_out_t o;
    kvs_cuda_layer_t L;
    void *sk, *sv;
    uint32_t C;
    double build_ms; /* median of build_reps builds */
} gindex_t;

static void gindex_build(gindex_t *x, const void *dk, const void *dv,
                         uint32_t H, uint32_t ctx, uint32_t stride,
                         int build_reps) {
    const uint32_t ns = SINKS + WINDOW + TAIL;
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
        KV(kvs_cuda_kmeans_build(km, dk, dv, stride, 0, &o, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        bt[i] = ms;
    }
    x->build_ms = median(bt, build_reps);
    kvs_cuda_kmeans_free(km);

    kvs_cuda_layer_t L;
    memset(&L, 0, sizeof L);
    L.dtype = KVS_DTYPE_BF16;
    L.d = D;
    L.n_heads = H;
    L.group = n_group;
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
    steady_copy(sk, sv, dk, dv, H, ctx, stride);
    L.steady_keys = sk;
    L.steady_values = sv;
    x->o = o;
    x->L = L;
    x->sk = sk;
    x->sv = sv;
    x->C = C;
}

static void gindex_free(gindex_t *x) {
    CU(cudaFree(x->sk));
    CU(cudaFree(x->sv));
    CU(cudaFree(x->o.n_clusters));
    CU(cudaFree(x->o.centroids));
    CU(cudaFree(x->o.value_means));
    CU(cudaFree(x->o.counts));
    CU(cudaFree(x->o.offsets));
    CU(cudaFree(x->o.steady_flags));
    CU(cudaFree(x->o.positions));
    CU(cudaFree(x->o.keys));
    CU(cudaFree(x->o.values));
}

/*
 * Bytes the last wave step read -- centroids scored, estimation
 * pseudo-tokens (centroid + value mean), steady K/V, retrieved clusters'
 * K/V -- from the selection lists; *ret_rows = retrieved rows. offs: host
 * copy of the layer's offsets [H][C + 1].
 */
static double wave_read_bytes(const kvs_cuda_wave_t *w, const uint32_t *offs,
                              uint32_t H, uint32_t C, double *ret_rows) {
    const size_t rb = D * 2, ns = SINKS + WINDOW + TAIL;
    const uint32_t rcap = kvs_cuda_wave_retrieval_cap(w);
    const uint32_t *dnr, *dne;
    const uint32_t *dret = kvs_cuda_wave_retrieved(w, &dnr);
    kvs_cuda_wave_estimated(w, &dne);
    uint32_t *ret = malloc((size_t)H * rcap * 4), *nr = malloc(H * 4),
             *ne = malloc(H * 4);
    CU(cudaMemcpy(ret, dret, (size_t)H * rcap * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(nr, dnr, H * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(ne, dne, H * 4, cudaMemcpyDeviceToHost));
    double bytes = 0, rows_ = 0;
    for (uint32_t h = 0; h < H; h++) {
        bytes += (double)C * rb;   /* centroids, scoring */
        bytes += 2.0 * ne[h] * rb; /* centroid + value mean */
        bytes += 2.0 * ns * rb;    /* steady K+V */
        for (uint32_t j = 0; j < nr[h]; j++) {
            const uint32_t c = ret[(size_t)h * rcap + j];
            rows_ += offs[(size_t)h * (C + 1) + c + 1] -
                     offs[(size_t)h * (C + 1) + c];
        }
    }
    free(ret);
    free(nr);
    free(ne);
    *ret_rows = rows_;
    return bytes + 2.0 * rows_ * rb;
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

    gindex_t x;
    gindex_build(&x, dk, dv, H, ctx, n, build_reps);
    r.build_ms = x.build_ms;
    const uint32_t C = x.C;
    const kvs_cuda_layer_t L = x.L;
    const kvs_cuda_kmeans_out_t o = x.o;
    const size_t rb = D * 2;

    uint32_t *focus = malloc(H * n_group * 4), *dfocus;
    for (uint32_t i = 0; i < H * n_group; i++)
        focus[i] = SINKS + rnd() % (ctx - SINKS);
    CU(cudaMalloc((void **)&dfocus, H * n_group * 4));
    CU(cudaMemcpy(dfocus, focus, H * n_group * 4, cudaMemcpyHostToDevice));
    float *q, *ow, *of;
    CU(cudaMalloc((void **)&q, (size_t)H * n_group * D * 4));
    CU(cudaMalloc((void **)&ow, (size_t)H * n_group * D * 4));
    CU(cudaMalloc((void **)&of, (size_t)H * n_group * D * 4));
    KV(bench_synth_q(q, dk, n, H, n_group, dfocus, 1234 + ctx + b, 77 + ctx,
                     12.f, 0.3f, st));

    kvs_cuda_wave_params_t wp = wave_params();
    kvs_cuda_wave_t *w;
    KV(kvs_cuda_wave_new(&L, &wp, &w));
    kvs_cuda_full_t *f;
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, n_group, n, &f));
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
    const size_t qb = (size_t)H * n_group * D * 4;
    float *hw = malloc(qb), *hf = malloc(qb);
    CU(cudaMemcpy(hw, ow, (size_t)H * n_group * D * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(hf, of, (size_t)H * n_group * D * 4, cudaMemcpyDeviceToHost));
    double *rel = malloc(H * n_group * sizeof *rel);
    rel_rows(hw, hf, H * n_group, rel);
    r.rel_med = median(rel, H * n_group);
    r.rel_p95 = pct(rel, H * n_group, 0.95);
    uint32_t *offs = malloc((size_t)H * (C + 1) * 4);
    CU(cudaMemcpy(offs, o.offsets, (size_t)H * (C + 1) * 4,
                  cudaMemcpyDeviceToHost));
    double ret_rows;
    const double bytes = wave_read_bytes(w, offs, H, C, &ret_rows);
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
    gindex_free(&x);
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    return r;
}

/* Offload passes over the same steps: the policies with misses read in
 * place, then LRU with misses copied (batched, one copy per run). */
enum { OP_LRU, OP_CLOCK, OP_COPY, OP_COPY_EACH, N_OPASS };
static const char *const opass_name[N_OPASS] = {"LRU", "clock", "LRU copy",
                                                "LRU copy-each"};
static const char *const opass_miss[N_OPASS] = {"inplace", "inplace",
                                                "copy_batch", "copy_each"};

typedef struct {
    double step_ms[N_OPASS], p90_ms[N_OPASS], hit[N_OPASS];
    double pcie_mb[N_OPASS], fill_mb[N_OPASS], uncacheable[N_OPASS];
    double copies[N_OPASS], copied_mb[N_OPASS], max_rel[N_OPASS];
    uint32_t same_steps[N_OPASS]; /* outputs bitwise equal to OP_LRU's */
    int same_stats[N_OPASS];      /* cache counters equal to OP_LRU's */
    double stream_ms, rel_med, rel_p95, build_ms, gpu_gb, host_gb;
} ores_t;

/*
 * KV in pinned host memory: builds the wave buffer's index from the first
 * ctx tokens of keys/values (device bf16 [H][stride][D]; ctx + TAIL used),
 * then runs `steps` decode steps per policy (LRU, clock), step s with
 * queries qs[s % n_q] (device [n_q][H][n_group][D]); the first `warm`
 * steps are excluded from times and counts. Accuracy vs our full kernel
 * over the same keys in device memory on steps acc_lo .. acc_hi - 1 of the
 * LRU pass. Baseline: our full kernel streaming all K/V from pinned
 * memory. `part` names the JSON rows.
 */
static ores_t offload_run(const void *dk, const void *dv, uint32_t H,
                          uint32_t ctx, uint32_t stride, const float *qs,
                          uint32_t n_q, uint32_t steps, uint32_t warm,
                          uint32_t acc_lo, uint32_t acc_hi, const char *part) {
    ores_t r = {0};
    const uint32_t n = ctx + TAIL, ns = SINKS + WINDOW + TAIL;
    const size_t rb = D * 2, qrow = (size_t)H * n_group * D;
    kvs_cuda_kmeans_params_t kp = {8192, 16, 10, 1, SINKS, ctx - WINDOW};
    kvs_cuda_kmeans_t *km;
    KV(kvs_cuda_kmeans_new(&kp, KVS_DTYPE_BF16, D, H, ctx, &km));
    const uint32_t C = kvs_cuda_kmeans_clusters_per_head(km);
    kvs_wbuf_params_t bp;
    memset(&bp, 0, sizeof bp);
    bp.dtype = KVS_DTYPE_BF16;
    bp.d = D;
    bp.n_heads = H;
    bp.group = n_group;
    bp.max_clusters = C;
    bp.max_tokens = ctx;
    bp.n_steady = ns;
    bp.slot_tokens = 32;
    bp.slots_per_head = (uint32_t)ceil(0.05 * C);
    bp.policy = KVS_WBUF_LRU;
    bp.wave = wave_params();
    kvs_wbuf_t *wb;
    double t0 = now_s();
    KV(kvs_wbuf_new(&bp, &wb));
    printf("%s ctx %u: buffer allocated in %.2f s\n", part, ctx, now_s() - t0);
    kvs_cuda_layer_t L;
    kvs_cuda_kmeans_out_t o;
    kvs_wbuf_layer(wb, &L, &o);
    CU(cudaEventRecord(e0, st));
    KV(kvs_cuda_kmeans_build(km, dk, dv, stride, 0, &o, st));
    CU(cudaEventRecord(e1, st));
    CU(cudaEventSynchronize(e1));
    float bms;
    CU(cudaEventElapsedTime(&bms, e0, e1));
    r.build_ms = bms;
    kvs_cuda_kmeans_free(km);
    steady_copy((void *)L.steady_keys, (void *)L.steady_values, dk, dv, H, ctx,
                stride);
    CU(cudaStreamSynchronize(st));

    float *out, *of;
    CU(cudaMalloc((void **)&out, qrow * 4));
    CU(cudaMalloc((void **)&of, qrow * 4));
    kvs_cuda_full_t *f, *fs;
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, n_group, stride, &f));
    /* the pinned copy is cluster-ordered with stride ctx (no tail) */
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, n_group, ctx, &fs));
    double *t = malloc(steps * sizeof *t);
    if (acc_hi > steps)
        acc_hi = steps;
    const uint32_t n_acc = acc_hi > acc_lo ? acc_hi - acc_lo : 0;
    double *rel = malloc(((size_t)n_acc * H * n_group + 1) * sizeof *rel);
    float *hw = malloc(qrow * 4), *hf = malloc(qrow * 4);
    float *h_lru = malloc((size_t)steps * qrow * 4); /* OP_LRU's outputs */
    kvs_wbuf_stats_t S0;
    memset(&S0, 0, sizeof S0);
    for (int pass = 0; pass < N_OPASS; pass++) {
        const int pol = pass == OP_CLOCK;
        kvs_wbuf_set_policy(wb, pol ? KVS_WBUF_CLOCK : KVS_WBUF_LRU);
        KV(kvs_wbuf_set_miss(wb, pass == OP_COPY ? KVS_WBUF_MISS_COPY
                                 : pass == OP_COPY_EACH
                                     ? KVS_WBUF_MISS_COPY_EACH
                                     : KVS_WBUF_MISS_INPLACE));
        KV(kvs_wbuf_commit(wb, SINKS, ctx - WINDOW, st));
        kvs_wbuf_reset_stats(wb);
        r.same_steps[pass] = 0;
        r.max_rel[pass] = 0;
        for (uint32_t s = 0; s < steps; s++) {
            const float *q = qs + (size_t)(s % n_q) * qrow;
            if (s == warm)
                kvs_wbuf_reset_stats(wb);
            CU(cudaStreamSynchronize(st));
            const double a = now_s();
            KV(kvs_wbuf_step(wb, q, out, st));
            CU(cudaStreamSynchronize(st));
            t[s] = (now_s() - a) * 1e3;
            if (pass != OP_CLOCK) {
                float *h = h_lru + (size_t)s * qrow;
                if (pass == OP_LRU) {
                    CU(cudaMemcpy(h, out, qrow * 4, cudaMemcpyDeviceToHost));
                } else {
                    CU(cudaMemcpy(hw, out, qrow * 4, cudaMemcpyDeviceToHost));
                    r.same_steps[pass] += memcmp(hw, h, qrow * 4) == 0;
                    double num = 0, den = 0;
                    for (size_t i = 0; i < qrow; i++) {
                        const double e = (double)hw[i] - h[i];
                        num += e * e;
                        den += (double)h[i] * h[i];
                    }
                    const double e = sqrt(num / (den > 0 ? den : 1));
                    if (!(e <= r.max_rel[pass])) /* NaN too */
                        r.max_rel[pass] = e;
                }
            }
            if (pass == OP_LRU && s >= acc_lo && s < acc_hi) {
                KV(kvs_cuda_full_attend(f, dk, dv, n, 0, q, of, st));
                CU(cudaMemcpy(hw, out, qrow * 4, cudaMemcpyDeviceToHost));
                CU(cudaMemcpy(hf, of, qrow * 4, cudaMemcpyDeviceToHost));
                rel_rows(hw, hf, H * n_group,
                         rel + (size_t)(s - acc_lo) * H * n_group);
            }
        }
        kvs_wbuf_stats_t S;
        kvs_wbuf_stats(wb, &S);
        const int p = pass;
        r.step_ms[p] = median(t + warm, steps - warm);
        r.p90_ms[p] = pct(t + warm, steps - warm, 0.9);
        r.hit[p] = S.lookups ? (double)S.hits / S.lookups : 0;
        r.pcie_mb[p] = S.steps ? S.bytes_miss / 1e6 / S.steps : 0;
        r.fill_mb[p] = S.steps ? S.bytes_fill / 1e6 / S.steps : 0;
        r.uncacheable[p] = S.lookups ? (double)S.uncacheable / S.lookups : 0;
        r.copies[p] = S.steps ? (double)S.copies / S.steps : 0;
        r.copied_mb[p] = S.steps ? S.bytes_copied / 1e6 / S.steps : 0;
        r.gpu_gb = S.bytes_gpu / 1e9;
        r.host_gb = S.bytes_host / 1e9;
        if (pass == OP_LRU)
            S0 = S;
        r.same_stats[p] =
            S.lookups == S0.lookups && S.hits == S0.hits &&
            S.misses == S0.misses && S.uncacheable == S0.uncacheable &&
            S.inserted == S0.inserted && S.evicted == S0.evicted &&
            S.bytes_miss == S0.bytes_miss && S.bytes_fill == S0.bytes_fill;
        printf("%s ctx %u %s: step median %.3f ms (p90 %.3f), hit rate "
               "%.3f, over the bus %.1f MB/step, staged->slot %.1f MB/step, "
               "uncacheable %.3f of lookups; GPU %.2f GB, pinned host %.2f "
               "GB\n",
               part, ctx, opass_name[p], r.step_ms[p], r.p90_ms[p], r.hit[p],
               r.pcie_mb[p], r.fill_mb[p], r.uncacheable[p], r.gpu_gb,
               r.host_gb);
        if (pass >= OP_COPY)
            printf("%s ctx %u %s: %.0f copies/step in %.2f batches/step, "
                   "%.1f MB/step by the copy "
                   "engines; outputs bitwise equal to LRU in-place on %u of "
                   "%u steps (max rel L2 %.2e), cache counters %s\n",
                   part, ctx, opass_name[p], r.copies[p],
                   S.steps ? (double)S.batches / S.steps : 0, r.copied_mb[p],
                   r.same_steps[p], steps, r.max_rel[p],
                   r.same_stats[p] ? "equal" : "DIFFERENT");
    }
    free(h_lru);
    if (n_acc) {
        r.rel_med = median(rel, n_acc * H * n_group);
        r.rel_p95 = pct(rel, n_acc * H * n_group, 0.95);
    }
    /* baseline: stream all KV from pinned host memory */
    double ts[3];
    for (int i = 0; i < 3; i++) {
        CU(cudaEventRecord(e0, st));
        KV(kvs_cuda_full_attend(fs, L.keys, L.values, ctx, 0, qs, of, st));
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        ts[i] = ms;
    }
    r.stream_ms = median(ts, 3);
    printf("%s ctx %u: rel L2 vs exact median %.4f p95 %.4f (%u steps); "
           "streaming all KV from pinned memory %.2f ms (%.1f GB/s; copy "
           "model at measured H2D %.2f ms); build %.1f ms\n",
           part, ctx, r.rel_med, r.rel_p95, n_acc, r.stream_ms,
           2.0 * H * ctx * rb / (r.stream_ms * 1e-3) / 1e9,
           2.0 * H * ctx * rb / (h2d_gbs * 1e9) * 1e3, r.build_ms);
    for (int p = 0; p < N_OPASS; p++) {
        char cmp[160] = "";
        if (p >= OP_COPY)
            snprintf(cmp, sizeof cmp,
                     ", \"bitwise_equal_steps_vs_inplace\": %u, "
                     "\"max_rel_l2_vs_inplace\": %.3g, "
                     "\"cache_counters_equal_to_inplace\": %s",
                     r.same_steps[p], r.max_rel[p],
                     r.same_stats[p] ? "true" : "false");
        row_add("{\"part\": \"%s\", \"context\": %u, \"batch\": 1, "
                "\"kv_heads\": %u, \"group\": %u, "
                "\"policy\": \"%s\", \"miss\": \"%s\", "
                "\"cache_clusters_fraction\": 0.05, "
                "\"slot_tokens\": 32, \"steps\": %u, \"warmup_steps\": %u, "
                "\"step_ms_median\": %.4f, \"step_ms_p90\": %.4f, "
                "\"hit_rate\": %.4f, "
                "\"bus_mb_per_step\": %.2f, \"fill_mb_per_step\": %.2f, "
                "\"copy_engine_mb_per_step\": %.2f, "
                "\"copies_per_step\": %.1f, "
                "\"uncacheable_fraction\": %.4f, \"stream_all_kv_ms\": %.3f, "
                "\"rel_l2_median\": %.5f, \"rel_l2_p95\": %.5f, "
                "\"accuracy_steps\": %u, \"build_ms\": %.2f, "
                "\"gpu_gb\": %.3f, \"pinned_host_gb\": %.3f%s}",
                part, ctx, H, n_group, p == OP_CLOCK ? "clock" : "lru",
                opass_miss[p], steps, warm, r.step_ms[p], r.p90_ms[p], r.hit[p],
                r.pcie_mb[p], r.fill_mb[p], r.copied_mb[p], r.copies[p],
                r.uncacheable[p], r.stream_ms, r.rel_med, r.rel_p95, n_acc,
                r.build_ms, r.gpu_gb, r.host_gb, cmp);
    }
    free(t);
    free(rel);
    free(hw);
    free(hf);
    kvs_cuda_full_free(f);
    kvs_cuda_full_free(fs);
    kvs_wbuf_free(wb);
    CU(cudaFree(out));
    CU(cudaFree(of));
    return r;
}

/* Synthetic offload: clustered keys, a focus token per query head that
 * moves with probability 0.05 per step; accuracy on the last 16 steps. */
static ores_t run_offload(uint32_t ctx, uint32_t steps, uint32_t warm) {
    const uint32_t H = 8, n = ctx + TAIL;
    const size_t kvb = (size_t)H * n * D * 2, qrow = (size_t)H * n_group * D;
    void *dk, *dv;
    CU(cudaMalloc(&dk, kvb));
    CU(cudaMalloc(&dv, kvb));
    KV(bench_synth_kv(dk, dv, H, n, n, 256, 99, st));
    float *qs;
    uint32_t *focus = malloc(H * n_group * 4), *dfocus;
    CU(cudaMalloc((void **)&qs, (size_t)steps * qrow * 4));
    CU(cudaMalloc((void **)&dfocus, H * n_group * 4));
    for (uint32_t i = 0; i < H * n_group; i++)
        focus[i] = SINKS + rnd() % (ctx - SINKS);
    for (uint32_t s = 0; s < steps; s++) {
        for (uint32_t i = 0; i < H * n_group; i++)
            if (rnd() % 100 < 5)
                focus[i] = SINKS + rnd() % (ctx - SINKS);
        CU(cudaMemcpy(dfocus, focus, H * n_group * 4, cudaMemcpyHostToDevice));
        KV(bench_synth_q(qs + (size_t)s * qrow, dk, n, H, n_group, dfocus, 99,
                         1000 + s, 12.f, 0.3f, st));
    }
    const uint32_t n_acc = steps < 16 ? steps : 16;
    ores_t r = offload_run(dk, dv, H, ctx, n, qs, steps, steps, warm,
                           steps - n_acc, steps, "offload");
    free(focus);
    CU(cudaFree(qs));
    CU(cudaFree(dfocus));
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    return r;
}

/* ------------------------------------------------------------------------ */
/* Real decode trace (bench/gpu/trace.py): tinycode128 K/V and queries.     */

/* One trace file: the 64-byte KVSTRAC1 header and the array. */
typedef struct {
    uint32_t dtype, ndim;
    uint64_t dims[6];
    size_t bytes;
    void *data; /* malloc'ed */
} tfile_t;

/* Reads DIR/NAME; 0, -ENOENT when it is missing, exits on a bad file. */
static int trace_load(const char *dir, const char *name, tfile_t *t) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        return -ENOENT;
    unsigned char h[64];
    if (fread(h, 1, 64, f) != 64 || memcmp(h, "KVSTRAC1", 8)) {
        fprintf(stderr, "%s: not a KVSTRAC1 trace file\n", path);
        exit(1);
    }
    memcpy(&t->dtype, h + 8, 4);
    memcpy(&t->ndim, h + 12, 4);
    memcpy(t->dims, h + 16, 48);
    size_t n = t->dtype == KVS_DTYPE_F32 ? 4 : 2;
    for (uint32_t i = 0; i < t->ndim && i < 6; i++)
        n *= t->dims[i];
    t->bytes = n;
    t->data = malloc(n);
    if (!t->data || fread(t->data, 1, n, f) != n) {
        fprintf(stderr, "%s: short file or no memory (%zu bytes)\n", path, n);
        exit(1);
    }
    fclose(f);
    return 0;
}

/* Device copy of a query file [S][H][n_group][D] fp32 checked against the
 * trace geometry; NULL when the file is missing. */
static float *trace_queries(const char *dir, const char *name, uint32_t H,
                            uint32_t *n_steps) {
    tfile_t t;
    if (trace_load(dir, name, &t))
        return NULL;
    if (t.dtype != KVS_DTYPE_F32 || t.ndim != 4 || t.dims[1] != H ||
        t.dims[2] != n_group || t.dims[3] != D) {
        fprintf(stderr, "%s: queries must be fp32 [S][%u][%u][%d]\n", name, H,
                n_group, D);
        exit(1);
    }
    float *d;
    CU(cudaMalloc((void **)&d, t.bytes));
    CU(cudaMemcpy(d, t.data, t.bytes, cudaMemcpyHostToDevice));
    free(t.data);
    *n_steps = (uint32_t)t.dims[0];
    return d;
}

typedef struct {
    uint32_t ctx, steps;
    double wave_ms, wave_p90, full_ms, rel_med, rel_p95, exact, mb;
    double build_ms;
} tres_t;

/*
 * KV on the GPU, the first ctx + TAIL tokens of the trace: per real decode
 * step s (queries qs[s]) the wave step (one CUDA graph, L2 flushed) timed,
 * and its output compared with our full kernel over the same tokens;
 * full kernel timed on step 0's queries (median of reps).
 */
static tres_t trace_gpu(const void *dk, const void *dv, uint32_t H,
                        uint32_t stride, uint32_t ctx, const float *qs,
                        uint32_t S, int reps) {
    tres_t r = {0};
    const uint32_t n = ctx + TAIL, ns = SINKS + WINDOW + TAIL;
    const uint32_t HG = H * n_group;
    const size_t qrow = (size_t)HG * D;
    r.ctx = ctx;
    r.steps = S;
    gindex_t x;
    gindex_build(&x, dk, dv, H, ctx, stride, 1);
    r.build_ms = x.build_ms;
    kvs_cuda_wave_params_t wp = wave_params();
    kvs_cuda_wave_t *w;
    KV(kvs_cuda_wave_new(&x.L, &wp, &w));
    kvs_cuda_full_t *f;
    KV(kvs_cuda_full_new(KVS_DTYPE_BF16, D, H, n_group, stride, &f));
    float *q, *ow, *of;
    CU(cudaMalloc((void **)&q, qrow * 4));
    CU(cudaMalloc((void **)&ow, qrow * 4));
    CU(cudaMalloc((void **)&of, qrow * 4));
    CU(cudaMemcpyAsync(q, qs, qrow * 4, cudaMemcpyDeviceToDevice, st));
    KV(kvs_cuda_wave_select(w, &x.L, q, st));
    KV(kvs_cuda_wave_attend(w, &x.L, NULL, q, ow, st));
    KV(kvs_cuda_full_attend(f, dk, dv, n, 0, q, of, st));
    CU(cudaStreamSynchronize(st));
    cudaGraph_t g;
    cudaGraphExec_t gw, gf;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    KV(kvs_cuda_wave_select(w, &x.L, q, st));
    KV(kvs_cuda_wave_attend(w, &x.L, NULL, q, ow, st));
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&gw, g, 0));
    CU(cudaGraphDestroy(g));
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    KV(kvs_cuda_full_attend(f, dk, dv, n, 0, q, of, st));
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&gf, g, 0));
    CU(cudaGraphDestroy(g));

    uint32_t *offs = malloc((size_t)H * (x.C + 1) * 4);
    CU(cudaMemcpy(offs, x.o.offsets, (size_t)H * (x.C + 1) * 4,
                  cudaMemcpyDeviceToHost));
    double *tw = malloc(S * sizeof *tw);
    double *rel = malloc((size_t)S * HG * sizeof *rel);
    double *per = malloc((size_t)S * n_group * sizeof *per);
    float *hw = malloc(qrow * 4), *hf = malloc(qrow * 4);
    double exact = 0, bytes = 0;
    for (uint32_t s = 0; s < S; s++) {
        CU(cudaMemcpyAsync(q, qs + s * qrow, qrow * 4, cudaMemcpyDeviceToDevice,
                           st));
        tw[s] = time_graph(gw, 1);
        double ret_rows;
        bytes += wave_read_bytes(w, offs, H, x.C, &ret_rows);
        exact += (ret_rows + (double)H * ns) / ((double)H * n);
        CU(cudaGraphLaunch(gf, st));
        CU(cudaMemcpy(hw, ow, qrow * 4, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(hf, of, qrow * 4, cudaMemcpyDeviceToHost));
        rel_rows(hw, hf, HG, rel + (size_t)s * HG);
    }
    /* per (layer, KV head) pair: median over its query heads and steps */
    char pairs[1024];
    size_t pl = 0;
    pairs[0] = 0;
    for (uint32_t h = 0; h < H; h++) {
        for (uint32_t s = 0; s < S; s++)
            for (uint32_t i = 0; i < n_group; i++)
                per[s * n_group + i] = rel[((size_t)s * H + h) * n_group + i];
        pl += snprintf(pairs + pl, sizeof pairs - pl, "%s%.4f", h ? ", " : "",
                       median(per, S * n_group));
    }
    r.rel_med = median(rel, S * HG);
    r.rel_p95 = pct(rel, S * HG, 0.95);
    r.exact = exact / S;
    r.mb = bytes / S / 1e6;
    r.wave_ms = median(tw, S);
    r.wave_p90 = pct(tw, S, 0.9);
    CU(cudaMemcpyAsync(q, qs, qrow * 4, cudaMemcpyDeviceToDevice, st));
    r.full_ms = time_graph(gf, reps);
    printf("trace ctx %7u (+%d) on GPU: wave %.4f ms (p90 %.4f, %.1f MB) | "
           "full %.4f ms | x%.2f | rel L2 median %.4f p95 %.4f over %u "
           "steps x %u query heads | exact keys %.2f%% | per pair median "
           "[%s] | build %.1f ms\n",
           ctx, TAIL, r.wave_ms, r.wave_p90, r.mb, r.full_ms,
           r.full_ms / r.wave_ms, r.rel_med, r.rel_p95, S, HG, 100 * r.exact,
           pairs, r.build_ms);
    row_add("{\"part\": \"trace_gpu_kv\", \"context\": %u, \"tail\": %d, "
            "\"kv_heads\": %u, \"group\": %u, \"steps\": %u, "
            "\"wave_ms_median\": %.5f, \"wave_ms_p90\": %.5f, "
            "\"full_kernel_ms\": %.5f, \"speedup_vs_full_kernel\": %.3f, "
            "\"wave_mb_per_step\": %.2f, \"exact_key_fraction\": %.5f, "
            "\"rel_l2_median\": %.5f, \"rel_l2_p95\": %.5f, "
            "\"rel_l2_median_per_pair\": [%s], \"build_ms\": %.2f}",
            ctx, TAIL, H, n_group, S, r.wave_ms, r.wave_p90, r.full_ms,
            r.full_ms / r.wave_ms, r.mb, r.exact, r.rel_med, r.rel_p95, pairs,
            r.build_ms);
    free(offs);
    free(tw);
    free(rel);
    free(per);
    free(hw);
    free(hf);
    CU(cudaGraphExecDestroy(gw));
    CU(cudaGraphExecDestroy(gf));
    kvs_cuda_wave_free(w);
    kvs_cuda_full_free(f);
    CU(cudaFree(q));
    CU(cudaFree(ow));
    CU(cudaFree(of));
    gindex_free(&x);
    return r;
}

/*
 * --trace DIR: (a) KV on the GPU at 32K and 128K (prefixes of the trace,
 * queries q_CTX.bin) and at the full context; (b) the full context
 * offloaded (wave buffer, 5% of the clusters cached, LRU and clock) over
 * the trace's decode steps (q_trace.bin, cycled when steps > S).
 */
static int run_trace(const char *dir, uint32_t steps, uint32_t warm, int quick,
                     const char *json, const char *device) {
    tfile_t k, v;
    if (trace_load(dir, "k.bin", &k) || trace_load(dir, "v.bin", &v)) {
        fprintf(stderr, "%s: no k.bin/v.bin (run bench/gpu/trace.py)\n", dir);
        return 1;
    }
    if (k.dtype != KVS_DTYPE_BF16 || k.ndim != 3 || k.dims[2] != D ||
        memcmp(k.dims, v.dims, sizeof k.dims) || k.dtype != v.dtype) {
        fprintf(stderr, "%s: k/v must be bf16 [H][N][%d], the same\n", dir, D);
        return 1;
    }
    const uint32_t H = (uint32_t)k.dims[0], N = (uint32_t)k.dims[1];
    {
        tfile_t q;
        if (trace_load(dir, "q_trace.bin", &q) || q.ndim != 4) {
            fprintf(stderr, "%s: no q_trace.bin\n", dir);
            return 1;
        }
        n_group = (uint32_t)q.dims[2];
        free(q.data);
    }
    void *dk, *dv;
    CU(cudaMalloc(&dk, k.bytes));
    CU(cudaMalloc(&dv, v.bytes));
    CU(cudaMemcpy(dk, k.data, k.bytes, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dv, v.data, v.bytes, cudaMemcpyHostToDevice));
    free(k.data);
    free(v.data);
    printf("trace %s: %u (layer, KV head) pairs x %u tokens, GQA group %u\n",
           dir, H, N, n_group);

    tres_t tr[3];
    int nt = 0;
    const uint32_t ctxs[2] = {32768, 131072};
    for (int i = 0; i < 2; i++) {
        char name[64];
        uint32_t S;
        snprintf(name, sizeof name, "q_%u.bin", ctxs[i]);
        if (ctxs[i] + TAIL > N)
            continue;
        float *qs = trace_queries(dir, name, H, &S);
        if (!qs)
            continue;
        if (quick && S > 20)
            S = 20;
        tr[nt++] = trace_gpu(dk, dv, H, N, ctxs[i], qs, S, quick ? 10 : 30);
        CU(cudaFree(qs));
    }
    uint32_t S;
    float *qs = trace_queries(dir, "q_trace.bin", H, &S);
    const uint32_t ctx = N - TAIL;
    if (ctx % 8192) {
        fprintf(stderr, "trace context %u + %d: not whole segments\n", ctx,
                TAIL);
        return 1;
    }
    tr[nt++] = trace_gpu(dk, dv, H, N, ctx, qs, quick && S > 20 ? 20 : S,
                         quick ? 10 : 30);
    if (!steps)
        steps = S;
    if (warm >= steps)
        warm = steps / 6;
    ores_t o = offload_run(dk, dv, H, ctx, N, qs, S, steps, warm, 0, S,
                           "trace_offload");
    const double speed = o.stream_ms / o.step_ms[0];
    const char *by_hit = o.hit[1] > o.hit[0] ? "clock" : "lru";
    const char *by_time = o.step_ms[1] < o.step_ms[0] ? "clock" : "lru";
    const char *by_miss =
        o.step_ms[OP_COPY] < o.step_ms[OP_LRU] ||
                o.step_ms[OP_COPY_EACH] < o.step_ms[OP_LRU]
            ? (o.step_ms[OP_COPY] <= o.step_ms[OP_COPY_EACH] ? "copy_batch"
                                                             : "copy_each")
            : "inplace";
    printf("trace offload: LRU %.3f ms hit %.4f | clock %.3f ms hit %.4f | "
           "higher hit rate: %s, faster median: %s | streaming %.2f ms = "
           "x%.1f slower than the buffer (LRU)\n",
           o.step_ms[0], o.hit[0], o.step_ms[1], o.hit[1], by_hit, by_time,
           o.stream_ms, speed);
    printf("trace offload misses (LRU): in place %.3f ms (p90 %.3f) | copy "
           "batch %.3f ms (p90 %.3f) | copy each %.3f ms (p90 %.3f) | "
           "faster: %s\n",
           o.step_ms[OP_LRU], o.p90_ms[OP_LRU], o.step_ms[OP_COPY],
           o.p90_ms[OP_COPY], o.step_ms[OP_COPY_EACH], o.p90_ms[OP_COPY_EACH],
           by_miss);
    CU(cudaFree(qs));
    CU(cudaFree(dk));
    CU(cudaFree(dv));
    if (!json)
        return 0;
    FILE *f =
        json_begin(json, "gpu_trace", "bench/gpu/run_trace.sh", quick, device);
    if (!f)
        return 1;
    fprintf(f,
            "  \"data\": \"tinycode128 real decode trace (bench/gpu/"
            "trace.py): %u (layer, KV head) pairs, GQA %u, %u tokens\",\n",
            H, n_group, N);
    fprintf(f,
            "  \"better_policy_by_hit_rate\": \"%s\",\n"
            "  \"faster_policy_by_median\": \"%s\",\n"
            "  \"faster_miss_mode_by_median\": \"%s\",\n",
            by_hit, by_time, by_miss);
    fprintf(f, "  \"copy_gb_s\": %.1f,\n  \"h2d_pinned_gb_s\": %.1f,\n",
            copy_gbs, h2d_gbs);
    fprintf(f, "  \"metrics\": {");
    for (int i = 0; i < nt; i++) {
        char tag[16];
        if (tr[i].ctx == ctx)
            snprintf(tag, sizeof tag, "1m");
        else
            snprintf(tag, sizeof tag, "%uk", tr[i].ctx / 1024);
        fprintf(f,
                "%s\n    \"trace_speedup_vs_full_%s\": %.3f,"
                "\n    \"trace_rel_l2_median_%s\": %.5f,"
                "\n    \"trace_rel_l2_p95_%s\": %.5f,"
                "\n    \"trace_exact_fraction_%s\": %.5f",
                i ? "," : "", tag, tr[i].full_ms / tr[i].wave_ms, tag,
                tr[i].rel_med, tag, tr[i].rel_p95, tag, tr[i].exact);
    }
    fprintf(f,
            ",\n    \"offload_ms_per_layer_1m\": %.4f,"
            "\n    \"offload_ms_per_layer_1m_p90\": %.4f,"
            "\n    \"offload_ms_per_layer_1m_clock\": %.4f,"
            "\n    \"cache_hit_rate_1m\": %.4f,"
            "\n    \"cache_hit_rate_1m_clock\": %.4f,"
            "\n    \"bus_mb_per_step_1m\": %.2f,"
            "\n    \"uncacheable_fraction_1m\": %.4f,"
            "\n    \"stream_all_kv_ms_1m\": %.3f,"
            "\n    \"offload_speedup_vs_streaming\": %.1f,"
            "\n    \"gpu_rel_l2_median\": %.5f,"
            "\n    \"gpu_rel_l2_p95\": %.5f,"
            "\n    \"offload_ms_per_layer_1m_copy\": %.4f,"
            "\n    \"offload_ms_per_layer_1m_copy_p90\": %.4f,"
            "\n    \"offload_ms_per_layer_1m_copy_each\": %.4f,"
            "\n    \"copy_mode_max_rel_l2_vs_inplace\": %.3g,"
            "\n    \"copy_mode_cache_counters_equal\": %s",
            o.step_ms[0], o.p90_ms[0], o.step_ms[1], o.hit[0], o.hit[1],
            o.pcie_mb[0], o.uncacheable[0], o.stream_ms, speed, o.rel_med,
            o.rel_p95, o.step_ms[OP_COPY], o.p90_ms[OP_COPY],
            o.step_ms[OP_COPY_EACH],
            fmax(o.max_rel[OP_COPY], o.max_rel[OP_COPY_EACH]),
            o.same_stats[OP_COPY] && o.same_stats[OP_COPY_EACH] ? "true"
                                                                : "false");
    fprintf(f, "\n  },\n  \"rows\": [\n    %s\n  ]\n}\n", rows);
    fclose(f);
    printf("wrote %s\n", json);
    return 0;
}

/* A crash on the GPU machine (no debugger there) leaves a backtrace. */
static void on_fault(int sig) {
    void *pc[32];
    const int n = backtrace(pc, 32);
    backtrace_symbols_fd(pc, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

int main(int argc, char **argv) {
    signal(SIGSEGV, on_fault);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int quick = 0;
    const char *sdpa = NULL, *json = NULL;
    uint32_t only_ctx = 0, only_b = 0;
    const char *trace = NULL;
    uint32_t steps = 0, warm = 50;
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
        else if (!strcmp(argv[i], "--trace") && i + 1 < argc)
            trace = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--warm") && i + 1 < argc)
            warm = (uint32_t)strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
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
            "\"%s\"}",
            prop.name, prop.multiProcessorCount, copy_gbs, h2d_gbs,
            trace ? "tinycode128 real decode trace"
                  : "synthetic clustered keys, focus-token queries");
    if (trace)
        return run_trace(trace, steps, warm, quick, json, prop.name);

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
        FILE *f = json_begin(json, "gpu", "bench/run.sh gpu", quick, prop.name);
        if (!f)
            return 1;
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
