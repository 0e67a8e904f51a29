/*
 * dump_acc.c: attention error of the engine's wave mode at long contexts on
 * real queries, keys and values, from a `kvdecode --dump` file (format:
 * bench/README.md), for the 32K point of bench/accuracy where two 32K
 * prefills of the model do not fit the machine's time.
 *
 * One in-process store (deterministic mode, default options but
 * --segment-tokens) gets the dump's keys and values of positions 0 .. P-1
 * (P = tokens - span), so it builds the segments a decoder's store would
 * have built by then. Then, like decode steps, every `stride` positions from
 * P to the end: the keys up to and including position t are appended and
 * the query of position t is attended, per layer, exactly (KVS_MODE_EXACT,
 * the double-precision reference) and in wave mode with the default fixed
 * budget (and --rank). The queries cover a whole segment's span of
 * positions, so every tail length a decode meets is sampled, whatever the
 * segment size. Relative L2 error of the output per query head is averaged
 * over the steps, then median and p95 over the (layer, query head) pairs
 * (as acc_bench does). No model runs: no bits per byte, no greedy
 * agreement.
 *
 * Per-head budgets (kvs_seq_observe_queries): --observe-samples N is the
 * store's observe_samples (-1: off, one budget for every head, the engine
 * before them); --observe K shows the store the prefill's queries of every
 * K-th position per layer after the prefill (0: none, only the decode
 * attends feed the reservoirs).
 *
 * --dims N keeps the first N dims of every query, key and value (N <= the
 * dump's head_dim; the store's head_dim is N): real vectors at a head_dim
 * the dumped model lacks, e.g. 80 (phi-2's), whose codes are padded to 96.
 * They are not a model of that head_dim (the model's own scale and
 * training were for all its dims): a stress test of the index, not an
 * accuracy figure for such a model.
 *
 * --search K measures kvs_seq_search instead: recall@K of the search
 * with the same parameters against exact search (KVS_MODE_EXACT), per
 * (layer, query head) pair averaged over the steps, median and p10, and
 * the mean time of a search call against an exact one.
 *
 * usage: dump_acc --dump FILE [--end N] [--span N] [--stride N]
 *                 [--segment-tokens N] [--cluster-tokens N]
 *                 [--retrieval F] [--estimation F] [--rank codes|centroid]
 *                 [--observe-samples N] [--observe K] [--dims N] [--search K]
 *                 [--label NAME] [--rows FILE]
 * (--end: use the first N positions of the dump only.)
 */
#include "kvs_dump.h"
#include "kvstore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Dims kept of every row (--dims; the dump's head_dim by default). */
static uint32_t dims;

/* Row `pos` of one head's queries, keys or values as fp32, its first
 * `dims` dims (tools/kvdecode/kvs_dump.h; fp16 dumps are converted). The
 * positions are this program's own, so a refusal is a bug here. */
static void dump_row(const kvs_dump_t *dp, uint32_t layer,
                     kvs_dump_array_t which, uint32_t head, uint32_t pos,
                     float *out) {
    float row[4096];
    int rc = kvs_dump_rows(dp, layer, which, head, pos, 1, row);
    if (rc) {
        fprintf(stderr, "dump_acc: dump row (layer %u, head %u, %u): %s\n",
                layer, head, pos, kvs_strerror(rc));
        exit(1);
    }
    memcpy(out, row, sizeof(float) * dims);
}

/* Keys and values of positions a .. b of every layer into the store. */
static int append_range(kvs_store_t *s, const kvs_dump_t *dp, uint32_t a,
                        uint32_t b, float *k, float *v) {
    const kvs_dump_info_t *in = kvs_dump_info(dp);
    const uint32_t H = in->n_kv_heads, D = dims, chunk = 1024;
    for (uint32_t l = 0; l < in->n_layers; l++)
        for (uint32_t p = a; p < b; p += chunk) {
            uint32_t n = b - p < chunk ? b - p : chunk;
            for (uint32_t i = 0; i < n; i++)
                for (uint32_t h = 0; h < H; h++) {
                    size_t o = ((size_t)i * H + h) * D;
                    dump_row(dp, l, KVS_DUMP_K, h, p + i, k + o);
                    dump_row(dp, l, KVS_DUMP_V, h, p + i, v + o);
                }
            int rc = kvs_seq_append(s, 1, l, n, k, v);
            if (rc)
                return rc;
        }
    return 0;
}

static int cmp_d(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double quant(const double *v, size_t n, double p) {
    size_t i = (size_t)ceil(p * (double)n);
    return v[i ? i - 1 : 0];
}

int main(int argc, char **argv) {
    const char *path = NULL, *rows = NULL, *label = "tinycode128";
    uint32_t span = 8192, stride = 128, seg = 0, end = 0, cluster = 0;
    float retrieval = 0, estimation = -1;
    int32_t observe_samples = 0;
    uint32_t observe = 0, search_k = 0;
    kvs_rank_t rank = KVS_RANK_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *x = i + 1 < argc ? argv[i + 1] : NULL;
        if (!x)
            goto usage;
        if (!strcmp(a, "--dump"))
            path = x;
        else if (!strcmp(a, "--rows"))
            rows = x;
        else if (!strcmp(a, "--label"))
            label = x;
        else if (!strcmp(a, "--span"))
            span = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--stride"))
            stride = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--end"))
            end = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--retrieval"))
            retrieval = strtof(x, NULL);
        else if (!strcmp(a, "--estimation"))
            estimation = strtof(x, NULL);
        else if (!strcmp(a, "--observe-samples"))
            observe_samples = (int32_t)strtol(x, NULL, 10);
        else if (!strcmp(a, "--observe"))
            observe = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--segment-tokens"))
            seg = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--cluster-tokens"))
            cluster = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--search"))
            search_k = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--dims"))
            dims = (uint32_t)strtoul(x, NULL, 10);
        else if (!strcmp(a, "--rank") && !strcmp(x, "codes"))
            rank = KVS_RANK_CODES;
        else if (!strcmp(a, "--rank") && !strcmp(x, "centroid"))
            rank = KVS_RANK_CENTROID;
        else
            goto usage;
        i++;
    }
    if (!path || !stride || !span)
        goto usage;
    kvs_dump_t *dp = NULL;
    char msg[512];
    int rc = kvs_dump_open(path, &dp, msg, sizeof(msg));
    if (rc) {
        fprintf(stderr, "dump_acc: %s\n", msg);
        return 1;
    }
    const kvs_dump_info_t *in = kvs_dump_info(dp);
    if (in->head_dim > 4096 || dims > in->head_dim) {
        fprintf(stderr, "dump_acc: %s: --dims %u: head_dim is %u\n", path, dims,
                in->head_dim);
        return 1;
    }
    if (!dims)
        dims = in->head_dim;
    /* Positions measured: the first n_used (--end). */
    uint32_t n_used = end && end < in->n_tokens ? end : in->n_tokens;
    if (span >= n_used) {
        fprintf(stderr, "dump_acc: %s: span %u too large for %u positions\n",
                path, span, n_used);
        return 1;
    }
    kvs_options_t o;
    kvs_options_default(&o);
    o.deterministic = 1;
    o.observe_samples = observe_samples;
    if (seg)
        o.segment_tokens = seg;
    if (cluster)
        o.cluster_tokens = cluster;
    kvs_store_t *s = NULL;
    if (kvs_store_open(&o, &s)) {
        fprintf(stderr, "dump_acc: %s\n", kvs_store_open_error());
        return 1;
    }
    const uint32_t L = in->n_layers, HQ = in->n_q_heads, D = dims;
    kvs_geometry_t g = {L, HQ, in->n_kv_heads, D, KVS_DTYPE_F32};
    const uint32_t P = n_used - span;
    float *k = malloc((size_t)1024 * in->n_kv_heads * D * 4);
    float *v = malloc((size_t)1024 * in->n_kv_heads * D * 4);
    float *q = malloc((size_t)HQ * D * 4), *ex = malloc((size_t)HQ * D * 4);
    float *out = malloc((size_t)HQ * D * 4);
    double *err = calloc((size_t)L * HQ, sizeof(double));
    if (!k || !v || !q || !ex || !out || !err)
        return 1;
    double t0 = (double)clock() / CLOCKS_PER_SEC;
    if ((rc = kvs_seq_create(s, 1, &g)) ||
        (rc = append_range(s, dp, 0, P, k, v)))
        goto fail;
    /* The prefill's queries, every `observe`-th position (as kvdecode
     * feeds them). */
    for (uint32_t l = 0; observe && l < L; l++)
        for (uint32_t t = 0; t < P; t += observe) {
            for (uint32_t h = 0; h < HQ; h++)
                dump_row(dp, l, KVS_DUMP_Q, h, t, q + (size_t)h * D);
            if ((rc = kvs_seq_observe_queries(s, 1, l, 1, q)))
                goto fail;
        }
    char method[64];
    if (observe_samples < 0)
        snprintf(method, sizeof method, "uniform");
    else if (observe)
        snprintf(method, sizeof method, "per-head (prefill/%u + decode)",
                 observe);
    else
        snprintf(method, sizeof method, "per-head (decode)");
    kvs_query_params_t wp, xp;
    kvs_query_params_default(&wp);
    wp.rank = rank;
    if (retrieval > 0) /* the zone numbers not given stay the defaults */
        wp.retrieval_fraction = retrieval;
    if (estimation >= 0)
        wp.estimation_fraction = estimation;
    xp = wp;
    xp.mode = KVS_MODE_EXACT;
    uint64_t steps = 0, keys_total = 0, keys_exact = 0, keys_steady = 0;
    uint32_t have = P;
    int64_t *sp = NULL, *xpos = NULL;
    float *ss = NULL;
    double t_search = 0, t_exact = 0;
    if (search_k) {
        sp = malloc(sizeof(int64_t) * HQ * search_k);
        xpos = malloc(sizeof(int64_t) * HQ * search_k);
        ss = malloc(sizeof(float) * HQ * search_k);
        if (!sp || !xpos || !ss)
            return 1;
    }
    for (uint32_t t = P; t < n_used; t += stride, steps++) {
        if ((rc = append_range(s, dp, have, t + 1, k, v)))
            goto fail;
        have = t + 1;
        for (uint32_t l = 0; l < L; l++) {
            for (uint32_t h = 0; h < HQ; h++)
                dump_row(dp, l, KVS_DUMP_Q, h, t, q + (size_t)h * D);
            if (search_k) {
                /* A first call waits for the builds the appends started
                 * (deterministic mode): untimed. */
                struct timespec a0, a1, a2;
                if ((rc = kvs_seq_search(s, 1, l, q, search_k, &xp, xpos, ss)))
                    goto fail;
                clock_gettime(CLOCK_MONOTONIC, &a0);
                if ((rc = kvs_seq_search(s, 1, l, q, search_k, &wp, sp, ss)))
                    goto fail;
                clock_gettime(CLOCK_MONOTONIC, &a1);
                if ((rc = kvs_seq_search(s, 1, l, q, search_k, &xp, xpos, ss)))
                    goto fail;
                clock_gettime(CLOCK_MONOTONIC, &a2);
                t_search += (double)(a1.tv_sec - a0.tv_sec) +
                            1e-9 * (double)(a1.tv_nsec - a0.tv_nsec);
                t_exact += (double)(a2.tv_sec - a1.tv_sec) +
                           1e-9 * (double)(a2.tv_nsec - a1.tv_nsec);
                for (uint32_t h = 0; h < HQ; h++) {
                    uint32_t hit = 0;
                    for (uint32_t i = 0; i < search_k; i++)
                        for (uint32_t j = 0; j < search_k; j++)
                            hit += sp[(size_t)h * search_k + i] >= 0 &&
                                   sp[(size_t)h * search_k + i] ==
                                       xpos[(size_t)h * search_k + j];
                    err[(size_t)l * HQ + h] += (double)hit / search_k;
                }
                continue;
            }
            kvs_attend_stats_t st;
            if ((rc = kvs_seq_attend(s, 1, l, q, &xp, ex, NULL)) ||
                (rc = kvs_seq_attend(s, 1, l, q, &wp, out, &st)))
                goto fail;
            keys_total += st.keys_total;
            keys_exact += st.keys_exact;
            keys_steady += st.keys_steady;
            for (uint32_t h = 0; h < HQ; h++) {
                double num = 0, den = 0;
                for (uint32_t j = 0; j < D; j++) {
                    size_t x = (size_t)h * D + j;
                    num += ((double)out[x] - ex[x]) * ((double)out[x] - ex[x]);
                    den += (double)ex[x] * ex[x];
                }
                err[(size_t)l * HQ + h] += den > 0 ? sqrt(num / den) : 0;
            }
        }
    }
    double secs = (double)clock() / CLOCKS_PER_SEC - t0;
    size_t n = (size_t)L * HQ;
    for (size_t i = 0; i < n; i++)
        err[i] /= (double)steps;
    qsort(err, n, sizeof(double), cmp_d);
    if (search_k) {
        fprintf(stderr,
                "dump_acc: %s positions %u..%u step %u, head_dim %u: search "
                "top-%u (retrieval %g): recall median %.4f p10 %.4f min "
                "%.4f; %.3f ms a call vs exact %.3f ms\n",
                label, P, n_used - 1, stride, D, search_k,
                (double)wp.retrieval_fraction, quant(err, n, 0.5),
                quant(err, n, 0.1), err[0], 1e3 * t_search / (steps * L),
                1e3 * t_exact / (steps * L));
        kvs_store_close(s);
        kvs_dump_close(dp);
        return 0;
    }
    double med = quant(err, n, 0.5), p95 = quant(err, n, 0.95);
    double exf = (double)keys_exact / (double)keys_total;
    double stf = (double)keys_steady / (double)keys_total;
    fprintf(stderr,
            "dump_acc: %s positions %u..%u step %u, head_dim %u, segments of "
            "%u, rank %s, "
            "budget %s: retrieval %g: rel_l2 median %.4g p95 %.4g max %.4g, "
            "%.2f%% keys "
            "exact (steady %.2f%%), %.1f s CPU\n",
            label, P, n_used - 1, stride, D, o.segment_tokens,
            rank == KVS_RANK_CENTROID ? "centroid"
            : rank == KVS_RANK_CODES  ? "codes"
                                      : "default",
            method, (double)wp.retrieval_fraction, med, p95, err[n - 1],
            100 * exf, 100 * stf, secs);
    if (rows) {
        FILE *f = fopen(rows, "a");
        if (!f)
            return 1;
        fprintf(f,
                "{\"model\": \"%s\", \"source\": \"dump\", \"context_first\": "
                "%u, \"context_last\": %u, \"stride\": %u, "
                "\"segment_tokens\": %u, \"rank\": \"%s\", "
                "\"retrieval_fraction\": %g, \"method\": \"%s\", "
                "\"variant\": \"fixed\", \"decode_steps\": %llu, "
                "\"rel_l2_median\": %.6g, \"rel_l2_p95\": %.6g, "
                "\"rel_l2_max\": %.6g, \"exact_fraction\": %.6g, "
                "\"steady_fraction\": %.6g}\n",
                label, P + 1, n_used, stride, o.segment_tokens,
                rank == KVS_RANK_CENTROID ? "centroid"
                : rank == KVS_RANK_CODES  ? "codes"
                                          : "default",
                (double)wp.retrieval_fraction, method,
                (unsigned long long)steps, med, p95, err[n - 1], exf, stf);
        if (fclose(f))
            return 1;
    }
    kvs_store_close(s);
    kvs_dump_close(dp);
    free(k);
    free(v);
    free(q);
    free(ex);
    free(out);
    free(err);
    return 0;
fail:
    fprintf(stderr, "dump_acc: %s: %s\n", kvs_strerror(rc),
            kvs_store_errmsg(s));
    return 1;
usage:
    fprintf(stderr, "usage: dump_acc --dump FILE [--end N] [--span N] "
                    "[--stride N] [--segment-tokens N] [--cluster-tokens N] "
                    "[--retrieval F] [--estimation F] "
                    "[--rank codes|centroid] [--observe-samples N] "
                    "[--observe K] [--dims N] [--label NAME] [--rows FILE]\n");
    return 2;
}
