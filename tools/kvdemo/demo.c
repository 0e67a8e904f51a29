/*
 * demo.c: kvdemo, the engine's end-to-end demonstration. Streams a long
 * synthetic context (Llama-3-8B layer geometry by default: 32 query heads,
 * 8 KV heads, head_dim 128, bf16) into libkvstore in prefill-sized chunks,
 * waits for the background index, then runs decode-like queries and prints,
 * for wave vs exact: recall@100 of search, relative L2 error of attend, the
 * share of keys attended exactly, and time per attend.
 *
 * The synthetic keys share a large mean offset and a low-rank structure and
 * the queries come from a different offset, so queries are out of
 * distribution with respect to keys as in real models; real-model numbers
 * come from the decoder benchmarks (bench/).
 *
 *   kvdemo [--tokens N] [--queries N] [--threads N] [--dtype f32|f16|bf16]
 */
#include "kvs_rng.h"
#include "kvs_kernels.h"
#include "kvstore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static kvs_rng_t rng = {0x9e3779b97f4a7c15ull};
static float nrand(void) {
    return kvs_rng_normal(&rng);
}

/* The store's messages (kvs_options_t.log): this program owns stderr. */
static void log_stderr(void *ctx, int level, const char *msg) {
    (void)ctx, (void)level;
    fprintf(stderr, "kvstore: %s\n", msg);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

enum { RANK = 16 };

typedef struct gen_s {
    uint32_t kvh, d;
    float *mu_k, *mu_q; /* [kvh][d] */
    float *basis;       /* [kvh][RANK][d] */
} gen_t;

static void gen_init(gen_t *g, uint32_t kvh, uint32_t d) {
    g->kvh = kvh;
    g->d = d;
    g->mu_k = malloc(sizeof(float) * kvh * d);
    g->mu_q = malloc(sizeof(float) * kvh * d);
    g->basis = malloc(sizeof(float) * kvh * RANK * d);
    for (uint32_t i = 0; i < kvh * d; i++) {
        g->mu_k[i] = nrand() * 1.5f;
        g->mu_q[i] = nrand() * 0.5f;
    }
    for (uint32_t i = 0; i < kvh * RANK * d; i++)
        g->basis[i] = nrand();
}

/* One vector: offset + latent mixture (heavy-tailed loadings) + noise. */
static void gen_vec(const gen_t *g, uint32_t h, const float *mu, float *out,
                    float noise) {
    float z[RANK];
    for (int r = 0; r < RANK; r++) {
        float x = nrand();
        z[r] = x * x * x * 0.4f;
    }
    for (uint32_t t = 0; t < g->d; t++) {
        float s = mu[h * g->d + t] + noise * nrand();
        for (int r = 0; r < RANK; r++)
            s += z[r] * g->basis[((size_t)h * RANK + r) * g->d + t];
        out[t] = s;
    }
}

int main(int argc, char **argv) {
    uint32_t tokens = 32768, n_queries = 16, threads = 0;
    kvs_dtype_t dtype = KVS_DTYPE_BF16;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--queries") && i + 1 < argc)
            n_queries = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            const char *t = argv[++i];
            dtype = !strcmp(t, "f32")   ? KVS_DTYPE_F32
                    : !strcmp(t, "f16") ? KVS_DTYPE_F16
                                        : KVS_DTYPE_BF16;
        } else {
            fprintf(stderr, "usage: kvdemo [--tokens N] [--queries N] "
                            "[--threads N] [--dtype f32|f16|bf16]\n");
            return 2;
        }
    }
    if (tokens < 1024 || n_queries == 0) {
        fprintf(stderr, "kvdemo: need --tokens >= 1024 and --queries >= 1\n");
        return 2;
    }
    const kvs_geometry_t geo = {1, 32, 8, 128, dtype};
    const uint32_t d = geo.head_dim, kvh = geo.n_kv_heads, qh = geo.n_q_heads;
    kvs_options_t opts;
    kvs_options_default(&opts);
    opts.n_threads = threads;
    opts.log = log_stderr;
    opts.n_build_threads = 2;
    opts.blas_threads = 1; /* one segment build per core */
    kvs_store_t *store;
    int rc = kvs_store_open(&opts, &store);
    if (rc) {
        fprintf(stderr, "kvdemo: open: %s\n", kvs_strerror(rc));
        return 1;
    }
    if ((rc = kvs_seq_create(store, 1, &geo))) {
        fprintf(stderr, "kvdemo: create: %s\n", kvs_store_errmsg(store));
        return 1;
    }
    printf("kvdemo: %u tokens, %u q heads / %u kv heads, head_dim %u, %s, "
           "kernels %s\n",
           tokens, qh, kvh, d, kvs_dtype_name(dtype), kvs_kernels_isa());

    gen_t g;
    gen_init(&g, kvh, d);
    const uint32_t chunk = 512;
    size_t esz = kvs_dtype_size(dtype);
    float *kf = malloc(sizeof(float) * chunk * kvh * d);
    float *vf = malloc(sizeof(float) * chunk * kvh * d);
    void *kc = malloc(esz * chunk * kvh * d),
         *vc = malloc(esz * chunk * kvh * d);
    double t0 = now_s();
    for (uint32_t done = 0; done < tokens; done += chunk) {
        uint32_t n = tokens - done < chunk ? tokens - done : chunk;
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t h = 0; h < kvh; h++) {
                gen_vec(&g, h, g.mu_k, kf + ((size_t)i * kvh + h) * d, 0.3f);
                for (uint32_t t = 0; t < d; t++)
                    vf[((size_t)i * kvh + h) * d + t] = nrand();
            }
        kvs_from_f32(dtype, kf, kc, (size_t)n * kvh * d);
        kvs_from_f32(dtype, vf, vc, (size_t)n * kvh * d);
        if ((rc = kvs_seq_append(store, 1, 0, n, kc, vc))) {
            fprintf(stderr, "kvdemo: append: %s\n", kvs_store_errmsg(store));
            return 1;
        }
    }
    double t_append = now_s() - t0;
    kvs_seq_wait_indexed(store, 1);
    double t_index = now_s() - t0;
    kvs_seq_info_t info;
    kvs_seq_info(store, 1, &info);
    printf("appended in %.2f s; index built in background, done after %.2f s "
           "(%.0f keys/s); %llu segments; index memory %.1f%% of K/V\n",
           t_append, t_index, (double)tokens * kvh / t_index,
           (unsigned long long)info.segments,
           100.0 * info.index_bytes / (double)(info.bytes - info.index_bytes));

    float *q = malloc(sizeof(float) * qh * d);
    float *out_w = malloc(sizeof(float) * qh * d);
    float *out_e = malloc(sizeof(float) * qh * d);
    enum { K = 100 };
    int64_t *pe = malloc(sizeof(int64_t) * qh * K);
    int64_t *pw = malloc(sizeof(int64_t) * qh * K);
    float *se = malloc(sizeof(float) * qh * K),
          *sw = malloc(sizeof(float) * qh * K);
    /* Errors against the double-precision reference; time against full
     * fp32 attention over every key (what a decoder would otherwise run). */
    kvs_query_params_t exact, full, wave;
    kvs_query_params_default(&exact);
    exact.mode = KVS_MODE_EXACT;
    kvs_query_params_default(&full);
    full.mode = KVS_MODE_FULL;
    kvs_query_params_default(&wave);
    double recall = 0, err_sum = 0, err_max = 0, t_exact = 0, t_wave = 0;
    uint64_t touched = 0, total = 0;
    for (uint32_t r = 0; r < n_queries; r++) {
        for (uint32_t h = 0; h < qh; h++)
            gen_vec(&g, h / (qh / kvh), g.mu_q, q + (size_t)h * d, 0.3f);
        kvs_attend_stats_t st;
        if ((rc = kvs_seq_attend(store, 1, 0, q, &full, out_e, &st)))
            goto fail;
        t_exact += st.seconds;
        if ((rc = kvs_seq_attend(store, 1, 0, q, &exact, out_e, &st)))
            goto fail;
        if ((rc = kvs_seq_attend(store, 1, 0, q, &wave, out_w, &st)))
            goto fail;
        t_wave += st.seconds;
        touched += st.keys_exact;
        total += st.keys_total;
        for (uint32_t h = 0; h < qh; h++) {
            double num = 0, den = 0;
            for (uint32_t t = 0; t < d; t++) {
                double e = out_w[h * d + t] - out_e[h * d + t];
                num += e * e;
                den += (double)out_e[h * d + t] * out_e[h * d + t];
            }
            double rel = sqrt(num / (den > 0 ? den : 1));
            err_sum += rel;
            if (rel > err_max)
                err_max = rel;
        }
        if ((rc = kvs_seq_search(store, 1, 0, q, K, &exact, pe, se)) ||
            (rc = kvs_seq_search(store, 1, 0, q, K, &wave, pw, sw)))
            goto fail;
        for (uint32_t h = 0; h < qh; h++) {
            int hit = 0;
            for (int a = 0; a < K; a++)
                for (int b = 0; b < K; b++)
                    if (pw[h * K + a] == pe[h * K + b]) {
                        hit++;
                        break;
                    }
            recall += hit / (double)K;
        }
    }
    printf("wave vs exact over %u queries x %u heads (default budgets: "
           "retrieval %.1f%%, estimation %.1f%% of clusters):\n",
           n_queries, qh, wave.retrieval_fraction * 100,
           wave.estimation_fraction * 100);
    printf("  recall@100 (search)        %.3f\n", recall / (n_queries * qh));
    printf("  attend rel. L2 error       mean %.4f  max %.4f\n",
           err_sum / (n_queries * qh), err_max);
    printf("  keys attended exactly      %.2f%%\n", 100.0 * touched / total);
    printf("  time per attend (1 layer)  full %.2f ms  wave %.2f ms  "
           "(%.1fx)\n",
           1e3 * t_exact / n_queries, 1e3 * t_wave / n_queries,
           t_exact / t_wave);
    kvs_store_close(store);
    return 0;
fail:
    fprintf(stderr, "kvdemo: %s: %s\n", kvs_strerror(rc),
            kvs_store_errmsg(store));
    kvs_store_close(store);
    return 1;
}
