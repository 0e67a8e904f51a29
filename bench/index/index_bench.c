/*
 * index_bench.c: the `index` benchmark (bench/run.sh index).
 *
 * At Llama-3-8B layer geometry (32 query heads, 8 KV heads, head_dim 128,
 * bf16) for each context length: stream the context into libkvstore, time
 * the background index build (keys/s), then time full (fp32, every key)
 * and wave attend per
 * layer over the same queries in the same process, and report the index
 * memory beyond raw K/V, and kvs_seq_search (top-100 of every query head)
 * by default against exact search over every key. Wave runs with the
 * default query parameters (keys
 * ranked by their codes where segments have them) and, as an extra row
 * field, ranked by centroid only (KVS_RANK_CENTROID), the default before
 * key codes. It also measures this machine's sgemm rate with
 * OpenBLAS so the k-means rate can be put against it.
 *
 * Keys are synthetic (shared offset + heavy-tailed low-rank mixture +
 * noise); timing does not depend on the data beyond cluster sizes. Accuracy
 * and recall come from real models in the accuracy/recall benchmarks.
 *
 *   index_bench [--quick] [--contexts 32768,131072] [--queries N]
 *               [--segment-tokens N] [--cluster-tokens N] [--profile N]
 *               [--json FILE]
 * --profile N runs N more wave attends, untimed, for `perf record`.
 * Prints one JSON object (BENCH.md format, without command/machine/date,
 * which run.sh adds) to --json or stdout.
 */
#include "kvs_rng.h"
#include "kvs_kernels.h"
#include "kvstore.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static kvs_rng_t rng = {0x2545f4914f6cdd1dull};
static float nrand(void) {
    return kvs_rng_normal(&rng);
}
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

enum { RANK = 16, KVH = 8, QH = 32, D = 128 };

static float mu_k[KVH * D], mu_q[KVH * D], basis[KVH * RANK * D];

static void gen_vec(uint32_t h, const float *mu, float *out) {
    float z[RANK];
    for (int r = 0; r < RANK; r++) {
        float x = nrand();
        z[r] = x * x * x * 0.4f;
    }
    for (uint32_t t = 0; t < D; t++) {
        float s = mu[h * D + t] + 0.3f * nrand();
        for (int r = 0; r < RANK; r++)
            s += z[r] * basis[((size_t)h * RANK + r) * D + t];
        out[t] = s;
    }
}

/* GFLOP/s of a square-ish sgemm shaped like k-means assignment. */
static double sgemm_gflops(void) {
    const int m = 8192, n = 512, k = 128;
    float *a = malloc(sizeof(float) * m * k),
          *b = malloc(sizeof(float) * n * k);
    float *c = malloc(sizeof(float) * m * n);
    for (int i = 0; i < m * k; i++)
        a[i] = nrand();
    for (int i = 0; i < n * k; i++)
        b[i] = nrand();
    double best = 0;
    for (int r = 0; r < 6; r++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a,
                    k, b, k, 0.0f, c, n);
        double t = now_s() - t0;
        double g = 2.0 * m * n * k / t / 1e9;
        if (g > best)
            best = g;
    }
    free(a), free(b), free(c);
    return best;
}

typedef struct row_s {
    uint32_t context;
    double exact_ms, wave_ms, speedup, build_keys_per_s, overhead;
    double exact_fraction;
    /* wave ranked by centroid only (KVS_RANK_CENTROID), same run */
    double centroid_ms, centroid_speedup, centroid_exact_fraction;
    /* kvs_seq_search top-100 of every query head: default (codes) and
     * exact (every key), same queries */
    double search_ms, search_exact_ms;
} row_t;

static uint32_t segment_tokens; /* --segment-tokens (0: the default) */
static uint32_t cluster_tokens; /* --cluster-tokens (0: the default) */
/* --profile N: N more wave attends after the timed ones, untimed, so that
 * `perf record` sees the wave path rather than data generation. */
static uint32_t profile_attends;

static int run_context(uint32_t tokens, uint32_t n_queries, row_t *row) {
    kvs_options_t opts;
    kvs_options_default(&opts);
    if (segment_tokens)
        opts.segment_tokens = segment_tokens;
    if (cluster_tokens)
        opts.cluster_tokens = cluster_tokens;
    /* Two builders with one BLAS thread each: one segment build per core. */
    opts.n_build_threads = 2;
    opts.blas_threads = 1;
    kvs_store_t *s;
    int rc = kvs_store_open(&opts, &s);
    if (rc)
        return rc;
    kvs_geometry_t geo = {1, QH, KVH, D, KVS_DTYPE_BF16};
    if ((rc = kvs_seq_create(s, 1, &geo)))
        goto out;
    /* Generate everything first so the timed part is append + build. */
    size_t elems = (size_t)tokens * KVH * D;
    uint16_t *kc = malloc(2 * elems), *vc = malloc(2 * elems);
    float *kf = malloc(sizeof(float) * KVH * D),
          *vf = malloc(sizeof(float) * KVH * D);
    if (!kc || !vc || !kf || !vf) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < tokens; i++) {
        for (uint32_t h = 0; h < KVH; h++) {
            gen_vec(h, mu_k, kf + (size_t)h * D);
            for (uint32_t t = 0; t < D; t++)
                vf[h * D + t] = nrand();
        }
        kvs_from_f32(KVS_DTYPE_BF16, kf, kc + (size_t)i * KVH * D, KVH * D);
        kvs_from_f32(KVS_DTYPE_BF16, vf, vc + (size_t)i * KVH * D, KVH * D);
    }
    const uint32_t chunk = 1024;
    double t0 = now_s();
    for (uint32_t done = 0; done < tokens && !rc; done += chunk) {
        uint32_t n = tokens - done < chunk ? tokens - done : chunk;
        rc = kvs_seq_append(s, 1, 0, n, kc + (size_t)done * KVH * D,
                            vc + (size_t)done * KVH * D);
    }
    free(kf), free(vf), free(kc), free(vc);
    if (rc)
        goto out;
    kvs_seq_wait_indexed(s, 1);
    double t_build = now_s() - t0;
    kvs_store_stats_t st;
    kvs_store_stats(s, &st);
    /* Wall-clock rate of the whole machine: keys clustered per second from
     * the first append until the index is complete. */
    row->build_keys_per_s = st.build_keys / t_build;
    kvs_seq_info_t info;
    kvs_seq_info(s, 1, &info);
    row->overhead =
        (double)info.index_bytes / (double)(info.bytes - info.index_bytes);

    float *q = malloc(sizeof(float) * QH * D),
          *out = malloc(sizeof(float) * QH * D);
    double *te = malloc(sizeof(double) * n_queries);
    double *tw = malloc(sizeof(double) * n_queries);
    double *tc = malloc(sizeof(double) * n_queries);
    double *ts = malloc(sizeof(double) * n_queries);
    double *tx = malloc(sizeof(double) * n_queries);
    int64_t *pos = malloc(sizeof(int64_t) * QH * 100);
    float *sc = malloc(sizeof(float) * QH * 100);
    kvs_query_params_t exact, wave, wave_c;
    kvs_query_params_default(&exact);
    /* Full attention over every key with the same fp32 SIMD kernels: the
     * speed baseline (KVS_MODE_EXACT accumulates in double, which is the
     * precision reference, not what a decoder runs). */
    exact.mode = KVS_MODE_FULL;
    kvs_query_params_default(&wave);
    /* The same budget ranked by centroid only (no key codes): what the
     * default was before codes, kept beside it so that a change of the
     * default shows as such and not as a slower index. */
    kvs_query_params_default(&wave_c);
    wave_c.rank = KVS_RANK_CENTROID;
    uint64_t touched = 0, total = 0, touched_c = 0;
    for (uint32_t r = 0; r < n_queries && !rc; r++) {
        for (uint32_t h = 0; h < QH; h++)
            gen_vec(h / (QH / KVH), mu_q, q + (size_t)h * D);
        kvs_attend_stats_t a;
        if ((rc = kvs_seq_attend(s, 1, 0, q, &exact, out, &a)))
            break;
        te[r] = a.seconds;
        if ((rc = kvs_seq_attend(s, 1, 0, q, &wave, out, &a)))
            break;
        tw[r] = a.seconds;
        touched += a.keys_exact;
        total += a.keys_total;
        if ((rc = kvs_seq_attend(s, 1, 0, q, &wave_c, out, &a)))
            break;
        tc[r] = a.seconds;
        touched_c += a.keys_exact;
        kvs_query_params_t xs;
        kvs_query_params_default(&xs);
        xs.mode = KVS_MODE_EXACT;
        double t1 = now_s();
        if ((rc = kvs_seq_search(s, 1, 0, q, 100, NULL, pos, sc)))
            break;
        double t2 = now_s();
        if ((rc = kvs_seq_search(s, 1, 0, q, 100, &xs, pos, sc)))
            break;
        ts[r] = t2 - t1;
        tx[r] = now_s() - t2;
    }
    for (uint32_t r = 0; r < profile_attends && !rc; r++) {
        kvs_attend_stats_t a;
        rc = kvs_seq_attend(s, 1, 0, q, &wave, out, &a);
    }
    if (!rc) {
        qsort(te, n_queries, sizeof(double), cmp_double);
        qsort(tw, n_queries, sizeof(double), cmp_double);
        qsort(tc, n_queries, sizeof(double), cmp_double);
        qsort(ts, n_queries, sizeof(double), cmp_double);
        qsort(tx, n_queries, sizeof(double), cmp_double);
        row->search_ms = ts[n_queries / 2] * 1e3;
        row->search_exact_ms = tx[n_queries / 2] * 1e3;
        row->context = tokens;
        row->exact_ms = te[n_queries / 2] * 1e3;
        row->wave_ms = tw[n_queries / 2] * 1e3;
        row->speedup = row->exact_ms / row->wave_ms;
        row->exact_fraction = (double)touched / total;
        row->centroid_ms = tc[n_queries / 2] * 1e3;
        row->centroid_speedup = row->exact_ms / row->centroid_ms;
        row->centroid_exact_fraction = (double)touched_c / total;
    }
    free(q), free(out), free(te), free(tw), free(tc), free(ts), free(tx);
    free(pos), free(sc);
out:
    kvs_store_close(s);
    return rc;
}

int main(int argc, char **argv) {
    int quick = 0;
    uint32_t n_queries = 0;
    uint32_t contexts[8] = {32768, 131072};
    int n_ctx = 2;
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--queries") && i + 1 < argc)
            n_queries = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--segment-tokens") && i + 1 < argc)
            segment_tokens = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--profile") && i + 1 < argc)
            profile_attends = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cluster-tokens") && i + 1 < argc)
            cluster_tokens = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--contexts") && i + 1 < argc) {
            n_ctx = 0;
            for (char *p = strtok(argv[++i], ","); p && n_ctx < 8;
                 p = strtok(NULL, ","))
                contexts[n_ctx++] = (uint32_t)atoi(p);
        } else {
            fprintf(stderr, "usage: index_bench [--quick] [--contexts a,b] "
                            "[--queries N] [--segment-tokens N] "
                            "[--cluster-tokens N] [--profile N] "
                            "[--json FILE]\n");
            return 2;
        }
    }
    if (quick) {
        contexts[0] = 16384;
        n_ctx = 1;
    }
    if (!n_queries)
        n_queries = quick ? 5 : 21;
    for (int i = 0; i < KVH * D; i++) {
        mu_k[i] = nrand() * 1.5f;
        mu_q[i] = nrand() * 0.5f;
    }
    for (int i = 0; i < KVH * RANK * D; i++)
        basis[i] = nrand();

    double gflops = sgemm_gflops();
    /* k-means FLOPs per key: an assignment sgemm (2 * d * clusters) per
     * iteration plus the final assignment. */
    double flop_per_key = 2.0 * D * (8192 / 16) * (10 + 1);
    row_t rows[8];
    for (int i = 0; i < n_ctx; i++) {
        fprintf(stderr, "index_bench: context %u...\n", contexts[i]);
        int rc = run_context(contexts[i], n_queries, &rows[i]);
        if (rc) {
            fprintf(stderr, "index_bench: %s\n", kvs_strerror(rc));
            return 1;
        }
        fprintf(stderr,
                "  exact %.2f ms  wave %.2f ms  (%.1fx)  build %.0f keys/s  "
                "index +%.1f%%  exact keys %.2f%%\n"
                "  wave ranked by centroid %.2f ms  (%.1fx)  exact keys "
                "%.2f%%\n"
                "  search top-100 %.2f ms, exact search %.2f ms (%.1fx)\n",
                rows[i].exact_ms, rows[i].wave_ms, rows[i].speedup,
                rows[i].build_keys_per_s, 100 * rows[i].overhead,
                100 * rows[i].exact_fraction, rows[i].centroid_ms,
                rows[i].centroid_speedup, 100 * rows[i].centroid_exact_fraction,
                rows[i].search_ms, rows[i].search_exact_ms,
                rows[i].search_exact_ms / rows[i].search_ms);
    }
    FILE *f = json ? fopen(json, "w") : stdout;
    if (!f) {
        perror(json);
        return 1;
    }
    const row_t *big = &rows[n_ctx - 1];
    double build = 0, overhead = 0;
    for (int i = 0; i < n_ctx; i++) {
        build += rows[i].build_keys_per_s / n_ctx;
        if (rows[i].overhead > overhead)
            overhead = rows[i].overhead;
    }
    fprintf(f, "{\n  \"bench\": \"index\",\n  \"quick\": %s,\n",
            quick ? "true" : "false");
    fprintf(f, "  \"metrics\": {\n");
    if (big->context == 131072)
        fprintf(f, "    \"wave_speedup_vs_exact_128k\": %.2f,\n", big->speedup);
    fprintf(f, "    \"index_build_keys_per_s\": %.0f,\n", build);
    fprintf(f, "    \"index_memory_overhead\": %.4f,\n", overhead);
    fprintf(f, "    \"sgemm_gflops\": %.1f,\n", gflops);
    fprintf(f, "    \"kmeans_share_of_sgemm\": %.3f\n",
            build * flop_per_key / 1e9 / gflops);
    fprintf(f, "  },\n  \"rows\": [\n");
    for (int i = 0; i < n_ctx; i++)
        fprintf(f,
                "    {\"context\": %u, \"geometry\": \"32q/8kv/128 bf16, 1 "
                "layer\", \"exact_ms\": %.3f, \"wave_ms\": %.3f, "
                "\"speedup\": %.2f, \"exact_fraction\": %.4f, "
                "\"build_keys_per_s\": %.0f, \"index_memory_overhead\": "
                "%.4f, \"wave_centroid_ms\": %.3f, \"speedup_centroid\": "
                "%.2f, \"exact_fraction_centroid\": %.4f, \"search_ms\": "
                "%.3f, \"search_exact_ms\": %.3f}%s\n",
                rows[i].context, rows[i].exact_ms, rows[i].wave_ms,
                rows[i].speedup, rows[i].exact_fraction,
                rows[i].build_keys_per_s, rows[i].overhead, rows[i].centroid_ms,
                rows[i].centroid_speedup, rows[i].centroid_exact_fraction,
                rows[i].search_ms, rows[i].search_exact_ms,
                i + 1 < n_ctx ? "," : "");
    fprintf(f, "  ]\n}\n");
    if (json)
        fclose(f);
    return 0;
}
