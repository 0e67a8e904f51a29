/*
 * acc_bench.c: accuracy of store-wave attention on a real model, for
 * bench/accuracy/run.sh. One invocation is one (model, context) point:
 *
 *   1. `full` decoder (the reference): prefill the first CTX tokens of the
 *      input, then feed the next SCORE tokens as decode steps and sum the
 *      bits of each next-token prediction (bpb_full for a byte model), then
 *      generate GEN tokens greedily (the reference tokens).
 *   2. store-wave decoder over an in-process store, with a measuring backend
 *      (kvs_decoder_backend_t): the same prefill, the index built
 *      (kvs_seq_wait_indexed), the same SCORE steps (bpb_wave), then the GEN
 *      reference tokens teacher-forced: greedy agreement is how often its
 *      own argmax equals the reference token. At every decode step and layer
 *      the backend computes the exact attention output (KVS_MODE_EXACT, the
 *      double-precision reference) and the wave output of every variant
 *      (fixed-budget defaults, then the bounded budget at each --eps), and
 *      records per (variant, layer, query head) the relative L2 error
 *      ||o_wave - o_exact|| / ||o_exact||, keys attended exactly and clusters
 *      retrieved/estimated. The variant --drive (default 0, fixed) is the
 *      output handed back to the decoder, so bpb_wave and the agreement are
 *      those of that variant; the errors of the others are measured on the
 *      same queries.
 *
 * --per-head K adds the variant "fixed per-head": a second store gets the
 * same appends and, from the decoder, the prefill's queries of every K-th
 * position (kvs_seq_observe_queries; its decode attends feed it too), and
 * its wave attends with the fixed budget run there (per-head budgets); the
 * first store is never observed, so "fixed" is the uniform budget. Both in
 * the same run, on the same queries.
 *
 * Each variant gives one JSON line appended to --rows FILE (bench/accuracy/
 * run.sh assembles the result file). Relative errors are first averaged per
 * (layer, head) over the decode steps; median and p95 are over the
 * layer x head pairs.
 */
#include "kvs_decoder.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void openblas_set_num_threads(int num_threads);

#define MAX_VARIANTS 8

typedef struct variant_s {
    char name[48];
    kvs_query_params_t qp;
    double *err_sum; /* [layer][q_head] */
    uint64_t steps;  /* attend calls measured */
    kvs_attend_stats_t st;
    bool per_head; /* runs on store2 */
} variant_t;

typedef struct meter_s {
    kvs_store_t *store;
    kvs_store_t *store2; /* --per-head: the observed store, or NULL */
    uint32_t n_layers, n_heads, head_dim;
    variant_t v[MAX_VARIANTS];
    int n_v, drive;
    float *exact, *out;
    bool measure; /* off during the prefill (no attend calls then anyway) */
} meter_t;

static int m_create(void *ctx, uint64_t seq, const kvs_geometry_t *geo) {
    meter_t *m = ctx;
    int rc = kvs_seq_create(m->store, seq, geo);
    return rc || !m->store2 ? rc : kvs_seq_create(m->store2, seq, geo);
}
static int m_append(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                    const void *k, const void *v, size_t bytes) {
    (void)bytes;
    meter_t *m = ctx;
    int rc = kvs_seq_append(m->store, seq, layer, n, k, v);
    return rc || !m->store2 ? rc
                            : kvs_seq_append(m->store2, seq, layer, n, k, v);
}
static int m_drop(void *ctx, uint64_t seq) {
    meter_t *m = ctx;
    int rc = kvs_seq_drop(m->store, seq);
    return rc || !m->store2 ? rc : kvs_seq_drop(m->store2, seq);
}
static int m_observe(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                     const float *q) {
    meter_t *m = ctx;
    return m->store2 ? kvs_seq_observe_queries(m->store2, seq, layer, n, q) : 0;
}
static const char *m_errmsg(void *ctx) {
    return kvs_store_errmsg(((meter_t *)ctx)->store);
}

static int m_attend(void *ctx, uint64_t seq, uint32_t layer, const float *q,
                    const kvs_query_params_t *unused, float *out,
                    kvs_attend_stats_t *stats) {
    (void)unused;
    meter_t *m = ctx;
    size_t nf = (size_t)m->n_heads * m->head_dim;
    kvs_query_params_t eq = m->v[0].qp;
    eq.mode = KVS_MODE_EXACT;
    int rc = kvs_seq_attend(m->store, seq, layer, q, &eq, m->exact, NULL);
    if (rc != 0)
        return rc;
    for (int i = 0; i < m->n_v; i++) {
        variant_t *v = &m->v[i];
        kvs_attend_stats_t st;
        rc = kvs_seq_attend(v->per_head ? m->store2 : m->store, seq, layer, q,
                            &v->qp, m->out, &st);
        if (rc != 0)
            return rc;
        for (uint32_t h = 0; h < m->n_heads; h++) {
            const float *a = m->out + (size_t)h * m->head_dim;
            const float *e = m->exact + (size_t)h * m->head_dim;
            double num = 0, den = 0;
            for (uint32_t j = 0; j < m->head_dim; j++) {
                double d = (double)a[j] - e[j];
                num += d * d;
                den += (double)e[j] * e[j];
            }
            v->err_sum[(size_t)layer * m->n_heads + h] +=
                den > 0 ? sqrt(num / den) : sqrt(num);
        }
        if (layer == 0)
            v->steps++;
        v->st.keys_total += st.keys_total;
        v->st.keys_exact += st.keys_exact;
        v->st.keys_steady += st.keys_steady;
        v->st.clusters_total += st.clusters_total;
        v->st.clusters_retrieved += st.clusters_retrieved;
        v->st.clusters_estimated += st.clusters_estimated;
        if (i == m->drive) {
            memcpy(out, m->out, nf * sizeof(float));
            if (stats)
                *stats = st;
        }
    }
    return 0;
}

static const kvs_decoder_backend_t meter_backend = {
    m_create, m_append, m_attend, m_drop, m_errmsg, m_observe};

static double bits_of(const float *l, uint32_t V, int32_t target) {
    double mx = l[0], z = 0;
    for (uint32_t j = 1; j < V; j++)
        mx = l[j] > mx ? l[j] : mx;
    for (uint32_t j = 0; j < V; j++)
        z += exp((double)l[j] - mx);
    return (log(z) + mx - l[target]) / log(2.0);
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Quantile q of sorted x[n] (linear interpolation). */
static double quant(const double *x, size_t n, double q) {
    if (n == 0)
        return NAN;
    double p = q * (double)(n - 1);
    size_t i = (size_t)p;
    if (i + 1 >= n)
        return x[n - 1];
    return x[i] + (p - (double)i) * (x[i + 1] - x[i]);
}

/* One decoder pass; see the file comment. ref: [gen] (filled when
 * follow is false). Returns 0 or an error. */
static int pass(const kvs_model_t *model, kvs_decoder_options_t *o,
                kvs_store_t *store, kvs_store_t *store2, const int32_t *tok,
                uint32_t ctx, uint32_t score, uint32_t gen, int32_t *ref,
                bool follow, double *bits, uint64_t *agree, double *step_s) {
    char err[512];
    kvs_decoder_t *d = NULL;
    uint32_t V = kvs_model_config(model)->vocab_size;
    float *lg = malloc((size_t)V * sizeof(float));
    int rc = lg ? kvs_decoder_new(model, o, &d, err, sizeof(err)) : KVS_ENOMEM;
    if (rc != 0) {
        fprintf(stderr, "acc_bench: %s\n", lg ? err : "out of memory");
        free(lg);
        return rc;
    }
    rc = kvs_decoder_prefill(d, tok, ctx, lg, false);
    if (rc == 0 && store)
        rc = kvs_seq_wait_indexed(store, o->seq_id);
    if (rc == 0 && store2)
        rc = kvs_seq_wait_indexed(store2, o->seq_id);
    *bits = 0;
    *agree = 0;
    for (uint32_t i = 0; rc == 0 && i < score; i++) {
        *bits += bits_of(lg, V, tok[ctx + i]);
        rc = kvs_decoder_step(d, tok[ctx + i], lg);
    }
    uint64_t rng = 1;
    for (uint32_t g = 0; rc == 0 && g < gen; g++) {
        int32_t next = kvs_sample(lg, V, 0, &rng);
        if (follow) {
            *agree += next == ref[g];
            next = ref[g];
        } else {
            ref[g] = next;
        }
        rc = kvs_decoder_step(d, next, lg);
    }
    if (rc != 0)
        fprintf(stderr, "acc_bench: %s (%s)\n", kvs_decoder_errmsg(d),
                kvs_err_name(rc));
    kvs_decoder_stats_t st;
    kvs_decoder_stats(d, &st);
    *step_s = st.step_tokens ? st.step_seconds / st.step_tokens : 0;
    kvs_decoder_free(d);
    free(lg);
    return rc;
}

static void usage(void) {
    fprintf(stderr,
            "usage: acc_bench MODEL --rows FILE --label NAME --ctx N "
            "[--score N] [--gen N]\n"
            "  input: --text FILE (byte models) | --token-file FILE (int32)\n"
            "  --eps E (repeatable: bounded variants)  --drive I\n"
            "  --per-head K (variant on a store observing every K-th "
            "prefill query)\n"
            "  --segment-tokens N  --cluster-tokens N  --threads N (OpenBLAS "
            "and store)\n");
}

int main(int argc, char **argv) {
    enum {
        O_ROWS = 256,
        O_LABEL,
        O_CTX,
        O_SCORE,
        O_GEN,
        O_TEXT,
        O_TOKF,
        O_EPS,
        O_DRIVE,
        O_SEG,
        O_THR,
        O_PERHEAD,
        O_CLU
    };
    static const struct option lo[] = {{"rows", 1, 0, O_ROWS},
                                       {"label", 1, 0, O_LABEL},
                                       {"ctx", 1, 0, O_CTX},
                                       {"score", 1, 0, O_SCORE},
                                       {"gen", 1, 0, O_GEN},
                                       {"text", 1, 0, O_TEXT},
                                       {"token-file", 1, 0, O_TOKF},
                                       {"eps", 1, 0, O_EPS},
                                       {"drive", 1, 0, O_DRIVE},
                                       {"segment-tokens", 1, 0, O_SEG},
                                       {"cluster-tokens", 1, 0, O_CLU},
                                       {"threads", 1, 0, O_THR},
                                       {"per-head", 1, 0, O_PERHEAD},
                                       {0, 0, 0, 0}};
    const char *rows = NULL, *label = "?", *text = NULL, *tokf = NULL;
    uint32_t ctx = 0, score = 256, gen = 1000, seg = 0, threads = 2;
    uint32_t per_head = 0, clu = 0;
    float eps[MAX_VARIANTS];
    int n_eps = 0, drive = 0, c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case O_ROWS:
            rows = optarg;
            break;
        case O_LABEL:
            label = optarg;
            break;
        case O_CTX:
            ctx = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_SCORE:
            score = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_GEN:
            gen = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_TEXT:
            text = optarg;
            break;
        case O_TOKF:
            tokf = optarg;
            break;
        case O_EPS:
            if (n_eps < MAX_VARIANTS - 1)
                eps[n_eps++] = strtof(optarg, NULL);
            break;
        case O_DRIVE:
            drive = atoi(optarg);
            break;
        case O_SEG:
            seg = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_CLU:
            clu = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_THR:
            threads = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case O_PERHEAD:
            per_head = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        default:
            usage();
            return 2;
        }
    }
    if (optind != argc - 1 || !rows || ctx < 2 || (!text == !tokf) ||
        drive < 0 || drive > n_eps + (per_head > 0)) {
        usage();
        return 2;
    }
    openblas_set_num_threads((int)threads);
    char err[512];
    kvs_model_t *model = NULL;
    if (kvs_model_open(argv[optind], &model, err, sizeof(err)) != 0) {
        fprintf(stderr, "acc_bench: %s\n", err);
        return 1;
    }
    const kvs_model_config_t *cfg = kvs_model_config(model);
    uint32_t V = cfg->vocab_size, need = ctx + score;

    /* Input: BOS + bytes of --text, or the int32 ids of --token-file. */
    int32_t *tok = malloc((size_t)need * sizeof(int32_t));
    FILE *f = fopen(text ? text : tokf, "rb");
    if (!tok || !f) {
        fprintf(stderr, "acc_bench: %s: %s\n", text ? text : tokf,
                strerror(errno));
        return 1;
    }
    uint32_t n = 0;
    if (text) {
        tok[n++] = KVS_TOKEN_BOS;
        int ch;
        while (n < need && (ch = fgetc(f)) != EOF)
            tok[n++] = ch;
    } else {
        while (n < need && fread(&tok[n], 4, 1, f) == 1)
            n++;
    }
    fclose(f);
    if (n < need) {
        fprintf(stderr, "acc_bench: input has %u tokens, need %u\n", n, need);
        return 1;
    }
    for (uint32_t i = 0; i < n; i++)
        if (tok[i] < 0 || (uint32_t)tok[i] >= V) {
            fprintf(stderr, "acc_bench: token %d outside vocab\n", tok[i]);
            return 1;
        }

    /* 1. full */
    int32_t *ref = malloc((size_t)(gen ? gen : 1) * sizeof(int32_t));
    kvs_decoder_options_t o;
    kvs_decoder_options_default(&o);
    double bits_full, bits_wave, full_step_s, wave_step_s;
    uint64_t agree;
    if (!ref || pass(model, &o, NULL, NULL, tok, ctx, score, gen, ref, false,
                     &bits_full, &agree, &full_step_s) != 0)
        return 1;

    /* 2. store-wave with the meter */
    kvs_options_t so;
    kvs_options_default(&so);
    so.n_threads = threads;
    if (seg)
        so.segment_tokens = seg;
    if (clu)
        so.cluster_tokens = clu;
    meter_t m = {.n_layers = cfg->n_layers,
                 .n_heads = cfg->n_heads,
                 .head_dim = cfg->head_dim,
                 .drive = drive};
    if (kvs_store_open(&so, &m.store) != 0 ||
        (per_head && kvs_store_open(&so, &m.store2) != 0)) {
        fprintf(stderr, "acc_bench: %s\n", kvs_store_open_error());
        return 1;
    }
    m.n_v = 1 + n_eps + (per_head > 0);
    for (int i = 0; i < m.n_v; i++) {
        variant_t *v = &m.v[i];
        kvs_query_params_default(&v->qp);
        v->qp.mode = KVS_MODE_WAVE;
        if (i == 0) {
            snprintf(v->name, sizeof(v->name), "fixed");
        } else if (per_head && i == m.n_v - 1) {
            v->per_head = true;
            snprintf(v->name, sizeof(v->name), "fixed per-head");
        } else {
            v->qp.budget = KVS_BUDGET_BOUNDED;
            v->qp.epsilon = eps[i - 1];
            snprintf(v->name, sizeof(v->name), "bounded eps=%g", eps[i - 1]);
        }
        v->err_sum = calloc((size_t)m.n_layers * m.n_heads, sizeof(double));
        if (!v->err_sum)
            return 1;
    }
    size_t nf = (size_t)m.n_heads * m.head_dim;
    m.exact = malloc(nf * sizeof(float));
    m.out = malloc(nf * sizeof(float));
    o.attn = KVS_ATTN_STORE_WAVE;
    o.backend = &meter_backend;
    o.backend_ctx = &m;
    o.seq_id = 1;
    o.observe_every = per_head;
    if (pass(model, &o, m.store, m.store2, tok, ctx, score, gen, ref, true,
             &bits_wave, &agree, &wave_step_s) != 0)
        return 1;

    /* Rows. */
    FILE *out = fopen(rows, "a");
    if (!out) {
        fprintf(stderr, "acc_bench: %s: %s\n", rows, strerror(errno));
        return 1;
    }
    size_t nlh = (size_t)m.n_layers * m.n_heads;
    double *e = malloc(nlh * sizeof(double));
    double *el = malloc(m.n_heads * sizeof(double));
    bool byte_model = V == 256;
    for (int i = 0; i < m.n_v; i++) {
        variant_t *v = &m.v[i];
        for (size_t j = 0; j < nlh; j++)
            e[j] = v->steps ? v->err_sum[j] / (double)v->steps : NAN;
        fprintf(out,
                "{\"model\": \"%s\", \"context\": %u, \"segment_tokens\": %u, "
                "\"variant\": \"%s\", \"budget\": \"%s\", \"epsilon\": %g, "
                "\"decode_steps\": %llu, \"rel_l2_by_layer_median\": [",
                label, ctx, so.segment_tokens, v->name,
                i && !v->per_head ? "bounded" : "fixed",
                i && !v->per_head ? (double)eps[i - 1] : 0.0,
                (unsigned long long)v->steps);
        for (uint32_t l = 0; l < m.n_layers; l++) {
            memcpy(el, e + (size_t)l * m.n_heads, m.n_heads * sizeof(double));
            qsort(el, m.n_heads, sizeof(double), cmp_d);
            fprintf(out, "%s%.6g", l ? ", " : "", quant(el, m.n_heads, 0.5));
        }
        qsort(e, nlh, sizeof(double), cmp_d);
        const kvs_attend_stats_t *s = &v->st;
        fprintf(out,
                "], \"rel_l2_median\": %.6g, \"rel_l2_p95\": %.6g, "
                "\"rel_l2_max\": %.6g, \"exact_fraction\": %.6g, "
                "\"steady_fraction\": %.6g, "
                "\"clusters_retrieved_fraction\": %.6g, "
                "\"clusters_estimated_fraction\": %.6g, "
                "\"clusters_estimated_per_call\": %.2f",
                quant(e, nlh, 0.5), quant(e, nlh, 0.95), e[nlh - 1],
                s->keys_total ? (double)s->keys_exact / s->keys_total : NAN,
                s->keys_total ? (double)s->keys_steady / s->keys_total : NAN,
                s->clusters_total
                    ? (double)s->clusters_retrieved / s->clusters_total
                    : 0.0,
                s->clusters_total
                    ? (double)s->clusters_estimated / s->clusters_total
                    : 0.0,
                v->steps ? (double)s->clusters_estimated /
                               ((double)v->steps * m.n_layers)
                         : 0.0);
        if (i == drive)
            fprintf(out,
                    ", \"drives_decoder\": true, \"score_tokens\": %u, "
                    "\"%s_full\": %.6g, \"%s_wave\": %.6g, "
                    "\"gen_tokens\": %u, \"greedy_agreement\": %.6g, "
                    "\"full_step_ms\": %.3f, \"wave_step_ms\": %.3f",
                    score, byte_model ? "bpb" : "bits_per_token",
                    score ? bits_full / score : NAN,
                    byte_model ? "bpb" : "bits_per_token",
                    score ? bits_wave / score : NAN, gen,
                    gen ? (double)agree / gen : NAN, 1e3 * full_step_s,
                    1e3 * wave_step_s);
        fprintf(out, "}\n");
        fprintf(stderr,
                "acc_bench: %s ctx %u %s: rel_l2 median %.4g p95 %.4g, "
                "%.2f%% keys exact",
                label, ctx, v->name, quant(e, nlh, 0.5), quant(e, nlh, 0.95),
                s->keys_total ? 100.0 * s->keys_exact / s->keys_total : NAN);
        if (i == drive)
            fprintf(stderr,
                    ", agreement %.4f over %u, bits full %.4f wave "
                    "%.4f",
                    gen ? (double)agree / gen : NAN, gen,
                    score ? bits_full / score : NAN,
                    score ? bits_wave / score : NAN);
        fprintf(stderr, "\n");
    }
    int bad = fclose(out) != 0;
    kvs_store_close(m.store);
    kvs_store_close(m.store2);
    for (int i = 0; i < m.n_v; i++)
        free(m.v[i].err_sum);
    free(m.exact);
    free(m.out);
    free(e);
    free(el);
    free(ref);
    free(tok);
    kvs_model_close(model);
    return bad;
}
