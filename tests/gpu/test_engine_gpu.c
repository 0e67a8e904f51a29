/*
 * test_engine_gpu.c: the engine's GPU attend path against its CPU path.
 *
 * Two stores with the same options, one opened with cuda_device 0, get the
 * same appends; after each append both wait for their index builds, then
 * attend the same queries in wave mode. Decode-like growth crosses segment
 * boundaries, so the mirror's incremental paths all run: new segments, the
 * previous newest segment's views rewritten, the tail growing into the
 * steady zone and restarting after a build, the buffer regrown.
 *
 * Tolerance (both paths read the same bf16/fp16 rows and accumulate in
 * fp32, choosing clusters by the same rule): relative L2 error of the
 * output per call <= 1e-4 for all but 2% of the calls (a near-tie between
 * two clusters' summed softmax scores may select differently) and
 * <= 5e-2 for every call. All of it twice: K/V of the GPU layers in
 * pinned host memory behind the GPU cache (KVS_CUDA_KV_HOST), and in GPU
 * memory (KVS_CUDA_KV_AUTO, everything fits). Wave calls here rank by
 * centroid (KVS_RANK_CENTROID), the GPU's ranking. Also: exact/bounded/F32
 * and codes-ranked calls fall back to the CPU (counted, equal bit for
 * bit), stats report cache hits, a dropped and recreated sequence is
 * served from a fresh mirror. Then index builds on the GPU
 * (gpu_build_check).
 *
 * A plain program (the GPU machine has no cmocka); exits 77 = skipped when
 * the store reports no usable GPU (no CUDA in the build, no device).
 */
#include "kv_synth.h"
#include "kvstore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define D 128

static int failures;
#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);               \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            failures++;                                                        \
        }                                                                      \
    } while (0)
#define OK(call)                                                               \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ != 0) {                                                        \
            fprintf(stderr, "FAIL %s:%d: %s = %d (%s)\n", __FILE__, __LINE__,  \
                    #call, rc_, kvs_strerror(rc_));                            \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

typedef struct run_s {
    double *err;
    size_t n, cap;
} run_t;

static void push_err(run_t *r, double e) {
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 1024;
        r->err = realloc(r->err, r->cap * sizeof *r->err);
    }
    r->err[r->n++] = e;
}

/*
 * One sequence grown in both stores: a prefill of `prefill` tokens, then
 * `steps` single-token appends, attending `layers` layers after each.
 */
static void decode_compare(kvs_store_t *cpu, kvs_store_t *gpu, uint64_t id,
                           kvs_dtype_t dt, uint32_t qh, uint32_t kvh,
                           uint32_t layers, uint32_t prefill, uint32_t steps,
                           uint32_t attend_every, run_t *errs) {
    kvs_geometry_t geo = {.n_layers = layers,
                          .n_q_heads = qh,
                          .n_kv_heads = kvh,
                          .head_dim = D,
                          .dtype = dt};
    OK(kvs_seq_create(cpu, id, &geo));
    OK(kvs_seq_create(gpu, id, &geo));
    kv_synth_t g;
    const uint64_t seed = 0x9e3779b97f4a7c15ull ^ (id * 0x100000001b3ull);
    OK(kv_synth_init(&g, kvh, 64, seed) ? KVS_ENOMEM : 0);
    const size_t es = kvs_dtype_size(dt);
    const size_t big = (size_t)prefill * kvh * D * es;
    void *k = malloc(big), *v = malloc(big);
    float *q = malloc((size_t)qh * D * sizeof(float));
    float *oc = malloc((size_t)qh * D * sizeof(float));
    float *og = malloc((size_t)qh * D * sizeof(float));
    for (uint32_t l = 0; l < layers; l++) {
        kv_synth_rows(&g, dt, prefill, k, v);
        OK(kvs_seq_append(cpu, id, l, prefill, k, v));
        OK(kvs_seq_append(gpu, id, l, prefill, k, v));
    }
    kvs_query_params_t qp;
    kvs_query_params_default(&qp);
    /* The GPU's ranking; codes-ranked calls run on the CPU (checked in
     * engine_check). */
    qp.rank = KVS_RANK_CENTROID;
    for (uint32_t s = 0; s <= steps; s++) {
        if (s > 0)
            for (uint32_t l = 0; l < layers; l++) {
                kv_synth_rows(&g, dt, 1, k, v);
                OK(kvs_seq_append(cpu, id, l, 1, k, v));
                OK(kvs_seq_append(gpu, id, l, 1, k, v));
            }
        if (s % attend_every)
            continue;
        OK(kvs_seq_wait_indexed(cpu, id));
        OK(kvs_seq_wait_indexed(gpu, id));
        for (uint32_t l = 0; l < layers; l++) {
            kv_synth_queries(&g, qh, q);
            kvs_attend_stats_t sc, sg;
            OK(kvs_seq_attend(cpu, id, l, q, &qp, oc, &sc));
            OK(kvs_seq_attend(gpu, id, l, q, &qp, og, &sg));
            const double e = kv_synth_rel_l2(og, oc, (size_t)qh * D);
            push_err(errs, e);
            CHECK(sc.clusters_total == sg.clusters_total &&
                      sc.clusters_retrieved == sg.clusters_retrieved &&
                      sc.clusters_estimated == sg.clusters_estimated &&
                      sc.keys_steady == sg.keys_steady,
                  "seq %llu layer %u step %u: zone counts cpu %llu/%llu/%llu "
                  "steady %llu, gpu %llu/%llu/%llu steady %llu",
                  (unsigned long long)id, l, s,
                  (unsigned long long)sc.clusters_total,
                  (unsigned long long)sc.clusters_retrieved,
                  (unsigned long long)sc.clusters_estimated,
                  (unsigned long long)sc.keys_steady,
                  (unsigned long long)sg.clusters_total,
                  (unsigned long long)sg.clusters_retrieved,
                  (unsigned long long)sg.clusters_estimated,
                  (unsigned long long)sg.keys_steady);
        }
    }
    free(k);
    free(v);
    free(q);
    free(oc);
    free(og);
    kv_synth_free(&g);
}

static void open_pair(kvs_store_t **cpu, kvs_store_t **gpu, uint32_t seg,
                      int32_t cuda_kv) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = seg;
    o.n_build_threads = 2;
    OK(kvs_store_open(&o, cpu));
    o.cuda_device = 0;
    o.cuda_cache_fraction = 0.1f;
    o.cuda_kv = cuda_kv;
    o.cuda_build = 0; /* same index as the CPU store: same answers */
    OK(kvs_store_open(&o, gpu));
}

/*
 * Index builds on the GPU (cuda_build, the default): the k-means runs
 * there, so the clusters differ from the CPU build's in detail; the
 * segments must be whole and the wave answers as close to exact as the
 * CPU-built index's (median rel L2 within 1.25x + 0.005 over 48 calls).
 */
static void gpu_build_check(void) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 2048;
    o.n_build_threads = 2;
    kvs_store_t *cpu, *gpu;
    OK(kvs_store_open(&o, &cpu));
    o.cuda_device = 0;
    OK(kvs_store_open(&o, &gpu));
    const uint32_t qh = 32, kvh = 8, n = 4 * 2048 + 300;
    kvs_geometry_t geo = {1, qh, kvh, D, KVS_DTYPE_BF16};
    OK(kvs_seq_create(cpu, 1, &geo));
    OK(kvs_seq_create(gpu, 1, &geo));
    kv_synth_t g;
    OK(kv_synth_init(&g, kvh, 64, 4242) ? KVS_ENOMEM : 0);
    void *k = malloc((size_t)n * kvh * D * 2),
         *v = malloc((size_t)n * kvh * D * 2);
    kv_synth_rows(&g, KVS_DTYPE_BF16, n, k, v);
    OK(kvs_seq_append(cpu, 1, 0, n, k, v));
    OK(kvs_seq_append(gpu, 1, 0, n, k, v));
    OK(kvs_seq_wait_indexed(cpu, 1));
    OK(kvs_seq_wait_indexed(gpu, 1));
    kvs_seq_info_t ic, ig;
    OK(kvs_seq_info(cpu, 1, &ic));
    OK(kvs_seq_info(gpu, 1, &ig));
    CHECK(
        ic.indexed_tokens == ig.indexed_tokens && ic.segments == ig.segments,
        "GPU build: indexed %llu segments %llu, CPU %llu / %llu",
        (unsigned long long)ig.indexed_tokens, (unsigned long long)ig.segments,
        (unsigned long long)ic.indexed_tokens, (unsigned long long)ic.segments);
    kvs_store_stats_t st;
    OK(kvs_store_stats(gpu, &st));
    CHECK(st.gpu_builds == 4ull * kvh && st.gpu_build_errors == 0,
          "GPU builds %llu (want %u), errors %llu",
          (unsigned long long)st.gpu_builds, 4 * kvh,
          (unsigned long long)st.gpu_build_errors);
    enum { CALLS = 48 };
    double ec[CALLS], eg[CALLS];
    float *q = malloc((size_t)qh * D * 4), *ex = malloc((size_t)qh * D * 4),
          *oc = malloc((size_t)qh * D * 4), *og = malloc((size_t)qh * D * 4);
    kvs_query_params_t wave, exact;
    kvs_query_params_default(&wave);
    wave.rank = KVS_RANK_CENTROID;
    exact = wave;
    exact.mode = KVS_MODE_EXACT;
    for (int i = 0; i < CALLS; i++) {
        kv_synth_queries(&g, qh, q);
        OK(kvs_seq_attend(cpu, 1, 0, q, &exact, ex, NULL));
        OK(kvs_seq_attend(cpu, 1, 0, q, &wave, oc, NULL));
        OK(kvs_seq_attend(gpu, 1, 0, q, &wave, og, NULL));
        ec[i] = kv_synth_rel_l2(oc, ex, (size_t)qh * D);
        eg[i] = kv_synth_rel_l2(og, ex, (size_t)qh * D);
    }
    qsort(ec, CALLS, sizeof(double), kv_synth_cmp_double);
    qsort(eg, CALLS, sizeof(double), kv_synth_cmp_double);
    printf("GPU-built index: %llu segments clustered on the GPU; wave vs exact "
           "rel L2 median %.4f (CPU-built %.4f), max %.4f (%.4f)\n",
           (unsigned long long)st.gpu_builds, eg[CALLS / 2], ec[CALLS / 2],
           eg[CALLS - 1], ec[CALLS - 1]);
    CHECK(eg[CALLS / 2] <= 1.25 * ec[CALLS / 2] + 0.005,
          "GPU-built median rel L2 %.4f vs CPU-built %.4f", eg[CALLS / 2],
          ec[CALLS / 2]);
    free(k);
    free(v);
    free(q);
    free(ex);
    free(oc);
    free(og);
    kv_synth_free(&g);
    kvs_store_close(cpu);
    kvs_store_close(gpu);
}

/* Everything below for one placement of the GPU layers' K/V. */
static int run_all(int32_t cuda_kv) {
    kvs_store_t *cpu, *gpu;
    open_pair(&cpu, &gpu, 1024, cuda_kv);
    const char *info = kvs_store_gpu_info(gpu);
    if (strncmp(info, "CPU", 3) == 0) {
        printf("SKIP test_engine_gpu: no usable GPU: %s\n", info);
        kvs_store_close(cpu);
        kvs_store_close(gpu);
        return 77;
    }
    const int host = cuda_kv == KVS_CUDA_KV_HOST;
    printf("GPU store: %s; K/V in %s\n", info,
           host ? "pinned host memory + GPU cache" : "GPU memory");

    /* KVS_TEST_QUICK: a short run (under compute-sanitizer) */
    const int quick = getenv("KVS_TEST_QUICK") != NULL;
    run_t errs = {0};
    /* GQA 4 bf16: prefill 3.5 segments, decode across two more builds */
    decode_compare(cpu, gpu, 1, KVS_DTYPE_BF16, 32, 8, 2, 3584,
                   quick ? 600 : 1400, 25, &errs);
    /* GQA 2 fp16 (tinycode128's shape), GQA 1 and 8 */
    decode_compare(cpu, gpu, 2, KVS_DTYPE_F16, 4, 2, 1, 2048,
                   quick ? 100 : 1100, 20, &errs);
    decode_compare(cpu, gpu, 3, KVS_DTYPE_BF16, 8, 8, 1, 1500, quick ? 60 : 600,
                   30, &errs);
    decode_compare(cpu, gpu, 4, KVS_DTYPE_F16, 16, 2, 1, 5000, 200, 50, &errs);
    /* a long one: the buffer grows several times */
    decode_compare(cpu, gpu, 5, KVS_DTYPE_BF16, 8, 2, 1, quick ? 3000 : 20000,
                   quick ? 100 : 2100, 100, &errs);

    qsort(errs.err, errs.n, sizeof(double), kv_synth_cmp_double);
    size_t over = 0;
    for (size_t i = 0; i < errs.n; i++)
        over += errs.err[i] > 1e-4;
    const double med = errs.err[errs.n / 2], mx = errs.err[errs.n - 1];
    const double p99 = errs.err[(size_t)(0.99 * (errs.n - 1))];
    printf("GPU vs CPU wave attend: %zu calls, rel L2 median %.3g, p99 %.3g, "
           "max %.3g, %zu above 1e-4\n",
           errs.n, med, p99, mx, over);
    CHECK(over <= errs.n / 50, "%zu of %zu calls above 1e-4", over, errs.n);
    CHECK(mx <= 5e-2, "max rel L2 %.3g", mx);

    kvs_store_stats_t st;
    OK(kvs_store_stats(gpu, &st));
    printf("stats: device %d, attends %llu, fallbacks %llu, errors %llu, "
           "cache %llu/%llu hits, bus %.1f MB, uploaded %.1f MB, GPU %.1f MB "
           "(K/V %.1f MB), pinned %.1f MB\n",
           st.gpu_device, (unsigned long long)st.gpu_attends,
           (unsigned long long)st.gpu_fallbacks,
           (unsigned long long)st.gpu_errors,
           (unsigned long long)st.gpu_cache_hits,
           (unsigned long long)st.gpu_cache_lookups, st.gpu_bus_bytes / 1e6,
           st.gpu_upload_bytes / 1e6, st.gpu_bytes / 1e6, st.gpu_kv_bytes / 1e6,
           st.gpu_pinned_bytes / 1e6);
    CHECK(st.gpu_device == 0, "gpu_device %d", st.gpu_device);
    CHECK(st.gpu_attends == errs.n, "gpu attends %llu of %zu",
          (unsigned long long)st.gpu_attends, errs.n);
    CHECK(st.gpu_errors == 0, "gpu errors %llu",
          (unsigned long long)st.gpu_errors);
    if (host) {
        CHECK(st.gpu_cache_hits > 0 && st.gpu_cache_hits < st.gpu_cache_lookups,
              "cache hits %llu of %llu", (unsigned long long)st.gpu_cache_hits,
              (unsigned long long)st.gpu_cache_lookups);
        CHECK(st.gpu_kv_bytes == 0, "K/V on the GPU: %llu bytes",
              (unsigned long long)st.gpu_kv_bytes);
    } else {
        CHECK(st.gpu_kv_bytes > 0 && st.gpu_bus_bytes == 0,
              "K/V on the GPU %llu bytes, bus %llu",
              (unsigned long long)st.gpu_kv_bytes,
              (unsigned long long)st.gpu_bus_bytes);
    }

    /* Not for the GPU: exact, bounded, F32 keys: counted, served by the
     * CPU, equal to the CPU store's answer bit for bit. */
    {
        const uint32_t qh = 8;
        float q[8 * D], oc[8 * D], og[8 * D];
        kvs_query_params_t qp;
        kvs_query_params_default(&qp);
        qp.rank = KVS_RANK_CENTROID;
        kv_synth_t g;
        OK(kv_synth_init(&g, 2, 64, 77) ? KVS_ENOMEM : 0);
        kv_synth_queries(&g, qh, q);
        const uint64_t fb0 = st.gpu_fallbacks;
        qp.mode = KVS_MODE_EXACT;
        OK(kvs_seq_attend(cpu, 5, 0, q, &qp, oc, NULL));
        OK(kvs_seq_attend(gpu, 5, 0, q, &qp, og, NULL));
        CHECK(memcmp(oc, og, sizeof oc) == 0, "exact mode differs");
        qp.mode = KVS_MODE_WAVE;
        qp.budget = KVS_BUDGET_BOUNDED;
        OK(kvs_seq_attend(cpu, 5, 0, q, &qp, oc, NULL));
        OK(kvs_seq_attend(gpu, 5, 0, q, &qp, og, NULL));
        CHECK(memcmp(oc, og, sizeof oc) == 0, "bounded mode differs");
        kvs_geometry_t geo = {1, qh, 2, D, KVS_DTYPE_F32};
        OK(kvs_seq_create(cpu, 9, &geo));
        OK(kvs_seq_create(gpu, 9, &geo));
        const uint32_t n = 3000;
        float *k = malloc((size_t)n * 2 * D * 4),
              *v = malloc((size_t)n * 2 * D * 4);
        kv_synth_rows(&g, KVS_DTYPE_F32, n, k, v);
        OK(kvs_seq_append(cpu, 9, 0, n, k, v));
        OK(kvs_seq_append(gpu, 9, 0, n, k, v));
        OK(kvs_seq_wait_indexed(cpu, 9));
        OK(kvs_seq_wait_indexed(gpu, 9));
        kvs_query_params_default(&qp);
        qp.rank = KVS_RANK_CENTROID;
        OK(kvs_seq_attend(cpu, 9, 0, q, &qp, oc, NULL));
        OK(kvs_seq_attend(gpu, 9, 0, q, &qp, og, NULL));
        CHECK(memcmp(oc, og, sizeof oc) == 0, "f32 sequence differs");
        /* The default on a GPU store ranks by centroid (what the GPU
         * serves, include/kvstore.h): served there, equal to the CPU
         * store's centroid answer within float rounding. */
        kvs_query_params_default(&qp);
        OK(kvs_seq_attend(gpu, 5, 0, q, &qp, og, NULL));
        qp.rank = KVS_RANK_CENTROID;
        OK(kvs_seq_attend(cpu, 5, 0, q, &qp, oc, NULL));
        const double e_def = kv_synth_rel_l2(og, oc, (size_t)qh * D);
        CHECK(e_def <= 1e-4,
              "default on the GPU store: rel L2 %.3g vs the "
              "CPU's centroid ranking",
              e_def);
        /* Ranked by codes by name: the CPU answers, bit for bit. */
        qp.rank = KVS_RANK_CODES;
        OK(kvs_seq_attend(cpu, 5, 0, q, &qp, oc, NULL));
        OK(kvs_seq_attend(gpu, 5, 0, q, &qp, og, NULL));
        CHECK(memcmp(oc, og, sizeof oc) == 0, "rank codes differs");
        OK(kvs_store_stats(gpu, &st));
        /* exact mode is not a wave call: bounded, F32 and the codes call
         * count */
        CHECK(st.gpu_fallbacks == fb0 + 3, "fallbacks %llu, want %llu",
              (unsigned long long)st.gpu_fallbacks,
              (unsigned long long)fb0 + 3);
        free(k);
        free(v);
        kv_synth_free(&g);
    }

    /* Drop and recreate id 2 with other data: the new sequence must not
     * be served from the old mirror. */
    {
        OK(kvs_seq_drop(cpu, 2));
        OK(kvs_seq_drop(gpu, 2));
        run_t e2 = {0};
        decode_compare(cpu, gpu, 2, KVS_DTYPE_F16, 4, 2, 1, 2500, 10, 10, &e2);
        for (size_t i = 0; i < e2.n; i++)
            CHECK(e2.err[i] <= 5e-2, "recreated sequence: rel L2 %.3g",
                  e2.err[i]);
        free(e2.err);
    }

    free(errs.err);
    kvs_store_close(cpu);
    kvs_store_close(gpu);
    return 0;
}

/*
 * A GPU memory budget too small for any layer: every wave attend falls
 * back to the CPU (counted, never an error), answers equal the CPU store's
 * bit for bit, and the refused layer does not allocate again on each call
 * (no GPU memory held afterwards).
 */
static void budget_check(void) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 1024;
    kvs_store_t *cpu, *gpu;
    OK(kvs_store_open(&o, &cpu));
    o.cuda_device = 0;
    o.cuda_build = 0; /* the CPU store's index: equal answers */
    o.cuda_memory_bytes = 1u << 20;
    OK(kvs_store_open(&o, &gpu));
    run_t e = {0};
    decode_compare(cpu, gpu, 1, KVS_DTYPE_BF16, 8, 2, 1, 3000, 40, 10, &e);
    kvs_store_stats_t st;
    OK(kvs_store_stats(gpu, &st));
    for (size_t i = 0; i < e.n; i++)
        CHECK(e.err[i] == 0, "over the budget: call %zu differs (%.3g)", i,
              e.err[i]);
    CHECK(st.gpu_attends == 0 && st.gpu_fallbacks == e.n &&
              st.gpu_errors == 0 && st.gpu_bytes == 0,
          "over the budget: attends %llu fallbacks %llu (calls %zu) errors "
          "%llu bytes %llu",
          (unsigned long long)st.gpu_attends,
          (unsigned long long)st.gpu_fallbacks, e.n,
          (unsigned long long)st.gpu_errors, (unsigned long long)st.gpu_bytes);
    printf("GPU budget 1 MiB: %zu calls served by the CPU, equal bit for "
           "bit\n",
           e.n);
    free(e.err);
    kvs_store_close(cpu);
    kvs_store_close(gpu);
}

/*
 * A GPU memory budget that holds one layer's buffer but not two: attends
 * alternating between two layers evict each other's buffers (least
 * recently used first) instead of sending the second layer to the CPU;
 * every call is served by the GPU, answers as the CPU store's.
 */
static void eviction_check(void) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 1024;
    o.cuda_device = 0;
    o.cuda_build = 0;
    o.cuda_kv = KVS_CUDA_KV_HOST;
    /* one layer's buffer: measured, with no budget */
    kvs_store_t *cpu, *gpu;
    OK(kvs_store_open(&o, &gpu));
    OK(kvs_store_open(&o, &cpu));
    run_t e = {0};
    decode_compare(cpu, gpu, 1, KVS_DTYPE_BF16, 8, 2, 1, 3000, 0, 1, &e);
    kvs_store_stats_t st;
    OK(kvs_store_stats(gpu, &st));
    const uint64_t one = st.gpu_bytes;
    kvs_store_close(gpu);
    kvs_store_close(cpu);
    free(e.err);
    memset(&e, 0, sizeof e);

    kvs_options_t c;
    kvs_options_default(&c);
    c.segment_tokens = 1024;
    OK(kvs_store_open(&c, &cpu));
    o.cuda_memory_bytes = one + one / 2;
    OK(kvs_store_open(&o, &gpu));
    decode_compare(cpu, gpu, 1, KVS_DTYPE_BF16, 8, 2, 2, 3000, 40, 10, &e);
    OK(kvs_store_stats(gpu, &st));
    size_t over = 0;
    for (size_t i = 0; i < e.n; i++)
        over += e.err[i] > 1e-4;
    printf("GPU budget %.1f MB (1.5 layers): %zu calls over 2 layers, %llu "
           "on the GPU, %llu fallbacks, %llu buffers evicted, %zu above "
           "1e-4\n",
           o.cuda_memory_bytes / 1e6, e.n, (unsigned long long)st.gpu_attends,
           (unsigned long long)st.gpu_fallbacks,
           (unsigned long long)st.gpu_mirrors_evicted, over);
    CHECK(one > 0, "no GPU bytes measured for one layer");
    CHECK(st.gpu_attends == e.n && st.gpu_fallbacks == 0 && st.gpu_errors == 0,
          "eviction: attends %llu of %zu, fallbacks %llu, errors %llu",
          (unsigned long long)st.gpu_attends, e.n,
          (unsigned long long)st.gpu_fallbacks,
          (unsigned long long)st.gpu_errors);
    CHECK(st.gpu_mirrors_evicted + 1 >= e.n,
          "eviction: %llu buffers evicted over %zu alternating calls",
          (unsigned long long)st.gpu_mirrors_evicted, e.n);
    CHECK(st.gpu_bytes <= o.cuda_memory_bytes,
          "eviction: %llu GPU bytes held over the budget %llu",
          (unsigned long long)st.gpu_bytes,
          (unsigned long long)o.cuda_memory_bytes);
    CHECK(over == 0, "eviction: %zu calls differ from the CPU's", over);
    free(e.err);
    kvs_store_close(cpu);
    kvs_store_close(gpu);
}

#ifdef KVS_TEST_CUDART
#include <cuda_runtime.h>

/*
 * kvs_seq_attend_device: queries and out in device memory give the same
 * answers as kvs_seq_attend with host memory, where the GPU step serves
 * the call (centroid ranking: it reads and writes the device arrays in
 * place; within 1e-6) and where the CPU does (codes ranking, exact: copied
 * down and up; bit for bit); arrays not on 16 bytes answer the same; host
 * pointers are refused with KVS_EINVAL, arrays of another size with
 * KVS_EGEOMETRY; the current device is left alone. (A store without a GPU
 * says KVS_ENOTSUP: tests/engine.)
 */
static void device_io_check(void) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 1024;
    o.cuda_device = 0;
    o.cuda_build = 0;
    kvs_store_t *s;
    OK(kvs_store_open(&o, &s));
    const uint32_t qh = 8, kvh = 2, T = 5000;
    kvs_geometry_t geo = {.n_layers = 1,
                          .n_q_heads = qh,
                          .n_kv_heads = kvh,
                          .head_dim = D,
                          .dtype = KVS_DTYPE_BF16};
    OK(kvs_seq_create(s, 7, &geo));
    kv_synth_t g;
    OK(kv_synth_init(&g, kvh, 64, 11) ? KVS_ENOMEM : 0);
    const size_t big = (size_t)T * kvh * D * 2;
    void *kb = malloc(big), *vb = malloc(big);
    kv_synth_rows(&g, KVS_DTYPE_BF16, T, kb, vb);
    OK(kvs_seq_append(s, 7, 0, T, kb, vb));
    OK(kvs_seq_wait_indexed(s, 7));
    free(kb);
    free(vb);
    const size_t n = (size_t)qh * D, bytes = n * sizeof(float);
    float *q = malloc(bytes), *ref = malloc(bytes), *got = malloc(bytes);
    float *dq = NULL, *dout = NULL;
    CHECK(cudaMalloc((void **)&dq, bytes) == cudaSuccess &&
              cudaMalloc((void **)&dout, bytes) == cudaSuccess,
          "cudaMalloc");
    const kvs_rank_t ranks[] = {KVS_RANK_CENTROID, KVS_RANK_CODES};
    const kvs_mode_t modes[] = {KVS_MODE_WAVE, KVS_MODE_EXACT};
    int calls = 0;
    for (int ri = 0; ri < 2; ri++)
        for (int mi = 0; mi < 2; mi++)
            for (int k = 0; k < 4; k++) {
                kv_synth_queries(&g, qh, q);
                kvs_query_params_t p = {.mode = modes[mi], .rank = ranks[ri]};
                kvs_store_stats_t before, after;
                OK(kvs_store_stats(s, &before));
                OK(kvs_seq_attend(s, 7, 0, q, &p, ref, NULL));
                cudaMemcpy(dq, q, bytes, cudaMemcpyHostToDevice);
                cudaMemset(dout, 0xff, bytes);
                kvs_attend_stats_t st;
                OK(kvs_seq_attend_device(s, 7, 0, dq, n, &p, dout, &st));
                OK(kvs_store_stats(s, &after));
                cudaMemcpy(got, dout, bytes, cudaMemcpyDeviceToHost);
                const int on_gpu = ri == 0 && mi == 0;
                /* the CPU path: the same code on the same input; the GPU
                 * step: the same kernels, its cache warmer on the second
                 * call (hits instead of misses, the same rows) */
                const double e = kv_synth_rel_l2(got, ref, n);
                CHECK(on_gpu ? e <= 1e-6 : memcmp(ref, got, bytes) == 0,
                      "device io: rank %d mode %d query %d differs (%.3g)", ri,
                      mi, k, e);
                CHECK(st.keys_total == (uint64_t)T * kvh,
                      "device io: stats keys_total %llu",
                      (unsigned long long)st.keys_total);
                CHECK(after.gpu_attends - before.gpu_attends ==
                          (uint64_t)(on_gpu ? 2 : 0),
                      "device io: rank %d mode %d: %llu GPU attends", ri, mi,
                      (unsigned long long)(after.gpu_attends -
                                           before.gpu_attends));
                calls++;
            }
    /* host memory is not the device's: neither side is touched */
    int rc = kvs_seq_attend_device(s, 7, 0, q, n, NULL, dout, NULL);
    CHECK(rc == KVS_EINVAL, "device io: host queries gave %d (%s)", rc,
          kvs_strerror(rc));
    rc = kvs_seq_attend_device(s, 7, 0, dq, n, NULL, got, NULL);
    CHECK(rc == KVS_EINVAL, "device io: host out gave %d (%s)", rc,
          kvs_strerror(rc));
    rc = kvs_seq_attend_device(s, 8, 0, dq, n, NULL, dout, NULL);
    CHECK(rc == KVS_ENOSEQ, "device io: unknown sequence gave %d", rc);
    /* arrays sized for another geometry are refused before any read */
    rc = kvs_seq_attend_device(s, 7, 0, dq, n - D, NULL, dout, NULL);
    CHECK(rc == KVS_EGEOMETRY, "device io: short arrays gave %d", rc);
    /* a tensor that does not start on 16 bytes (a slice): the step goes
     * through the buffer's own arrays, same answer */
    float *odd_q = NULL, *odd_out = NULL;
    CHECK(cudaMalloc((void **)&odd_q, bytes + 16) == cudaSuccess &&
              cudaMalloc((void **)&odd_out, bytes + 16) == cudaSuccess,
          "cudaMalloc");
    kv_synth_queries(&g, qh, q);
    kvs_query_params_t pc = {.mode = KVS_MODE_WAVE, .rank = KVS_RANK_CENTROID};
    OK(kvs_seq_attend(s, 7, 0, q, &pc, ref, NULL));
    cudaMemcpy(odd_q + 1, q, bytes, cudaMemcpyHostToDevice);
    OK(kvs_seq_attend_device(s, 7, 0, odd_q + 1, n, &pc, odd_out + 1, NULL));
    cudaMemcpy(got, odd_out + 1, bytes, cudaMemcpyDeviceToHost);
    CHECK(kv_synth_rel_l2(got, ref, n) <= 1e-6,
          "device io: unaligned arrays differ (%.3g)",
          kv_synth_rel_l2(got, ref, n));
    /* the caller's current device is left as it was */
    int cur = -1;
    cudaGetDevice(&cur);
    CHECK(cur == 0, "device io: current device %d", cur);
    cudaFree(odd_q);
    cudaFree(odd_out);
    printf("device io: %d calls with device queries/out answer as the host "
           "calls\n",
           calls);
    cudaFree(dq);
    cudaFree(dout);
    free(q);
    free(ref);
    free(got);
    kv_synth_free(&g);
    kvs_store_close(s);
}
#endif

int main(void) {
    if (run_all(KVS_CUDA_KV_HOST) == 77)
        return 77;

    run_all(KVS_CUDA_KV_AUTO);
    gpu_build_check();
    budget_check();
    eviction_check();
#ifdef KVS_TEST_CUDART
    device_io_check(); /* last: a fault here must not hide the others */
#endif
    if (failures) {
        fprintf(stderr, "test_engine_gpu: %d failures\n", failures);
        return 1;
    }
    printf("test_engine_gpu: pass\n");
    return 0;
}
