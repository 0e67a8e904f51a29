/*
 * recall_bench.c: the `recall` benchmark (bench/run.sh recall).
 *
 * How many keys must a KV-cache index scan before it holds the keys a
 * decoder's query actually attends to? On real post-RoPE queries and keys
 * dumped by kvdecode (bench/README.md, "Dump format"), for every layer, KV
 * head, query head and decode query, this measures recall@10 and recall@100
 * of the true top keys by q.k against the fraction of keys scanned, for
 *   - the wave index (kvs_head_search over the segments kvs_segment_build
 *     makes with the store's parameters and seeds), sweeping the retrieval
 *     fraction (fixed budget) and epsilon (bounded);
 *   - FAISS IVF-Flat (inner product, as many lists as wave clusters),
 *     sweeping nprobe;
 *   - FAISS HNSW32 (inner product), sweeping efSearch;
 *   - exact flat search (kvs_head_search exact mode, and FAISS
 *     IndexFlatIP, which is the ground truth).
 * Decoder queries are out of distribution with respect to keys, which is
 * why key-to-key indexes scan so much; to show that effect the same IVF and
 * wave indexes are also queried with held-out keys (key-to-key).
 *
 * Setup, per context length C, as a decode step sees it: the prefill is
 * positions 0 .. P-1 (P = C - N), cut into equal segments of at most
 * --segment-max tokens (what a store with that segment size has built by
 * position P); the N decode queries sit at P .. C-1 and the query at t
 * sees every key 0 .. t-1: the segments plus its own tail P' .. t-1 (the
 * prefill's remainder and the keys decoded since), which is attended
 * exactly, counted as read and never missed. Ground truth is the exact
 * top-100 by q.k over keys 0 .. t-1. IVF and HNSW index the same keys the
 * segments hold and search the tail exactly, as the store does.
 *
 * "Scanned" is the keys whose full vectors a method reads: for the wave
 * index, steady zone (sinks, recent window, tail) plus the members of
 * retrieved clusters (kvs_head_search's keys_exact); for IVF, the sizes of
 * the probed lists plus the tail; for HNSW, every distance computation of
 * the search, upper levels included (hnsw_count.cpp; it can exceed the key
 * count, as upper-level nodes are met again on level 0), plus the tail.
 * "Bytes read" is everything a query reads, over the context's key bytes
 * (t keys of head_dim fp32): for the wave index kvs_head_search's
 * bytes_read (centroids with their offsets and counts, codes, full keys
 * with their positions); for IVF every list centroid with 8 bytes of list
 * metadata, the probed keys with 4-byte ids, the tail; for HNSW each
 * visited node's key and 32 links of 4 bytes, the tail.
 *
 * Per (head, query) pair and method, "scanned at recall R" is the smallest
 * scanned fraction over the sweep's grid points whose recall@100 >= R (the
 * grid is geometric, so this overstates the true figure by at most one grid
 * step, for every method alike); pairs that never reach R are counted as
 * unreached (+inf in medians and percentiles).
 *
 *   recall_bench --dump FILE [--contexts 2048,8192,32768] [--queries N]
 *                [--layers N] [--segment-max N] [--no-hnsw] [--ablations]
 *                [--quick]
 *                [--input-desc TEXT] [--json FILE]
 * Writes one JSON object ({"bench":"recall","metrics":{...},"rows":[...]},
 * BENCH.md format without command/machine/date, which run.sh adds) and
 * prints a one-line summary per context on stderr.
 */
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvs_dump.h"
#include "kvstore.h"

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/IndexIVFFlat_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* hnsw_count.cpp: one HNSW search of `index` (a FaissIndex *) with efSearch
 * `ef`, counting distance computations into *ndis. 0 or -1. */
int kvs__recall_hnsw_search(const void *index, const float *q, int k, int ef,
                            int64_t *labels, uint64_t *ndis);

#define TOPK 100
#define TOP10 10
#define MAX_CTX 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, int rc) {
    fprintf(stderr, "recall_bench: %s: %s\n", what,
            rc < 0 ? kvs_strerror(rc) : "failed");
    exit(1);
}

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "recall_bench: out of memory\n");
        exit(1);
    }
    return p;
}

static void faiss_check(int rc, const char *what) {
    if (rc) {
        const char *m = faiss_get_last_error();
        fprintf(stderr, "recall_bench: FAISS %s: %s\n", what, m ? m : "error");
        exit(1);
    }
}

/* ---- the dump ----------------------------------------------------------- */

/* Rows pos .. pos+n of one head's queries, keys or values as fp32
 * (tools/kvdecode/kvs_dump.h). The ranges are this program's own, so a
 * refusal is a bug here. */
static void dump_rows(const kvs_dump_t *dp, uint32_t layer,
                      kvs_dump_array_t which, uint32_t head, uint32_t pos,
                      uint32_t n, float *out) {
    int rc = kvs_dump_rows(dp, layer, which, head, pos, n, out);
    if (rc) {
        fprintf(stderr,
                "recall_bench: dump rows (layer %u, head %u, %u+%u): %s\n",
                layer, head, pos, n, kvs_strerror(rc));
        exit(1);
    }
}

/* ---- statistics ---------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (p in (0,1]) of v[0..n) (sorted in place). Works
 * with +inf entries (unreached pairs): the result is +inf when the rank
 * falls on them. */
static double pct(double *v, size_t n, double p) {
    if (!n)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    size_t r = (size_t)ceil(p * (double)n);
    if (r < 1)
        r = 1;
    return v[r - 1];
}

static double mean(const double *v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i];
    return n ? s / (double)n : NAN;
}

/* ---- one series: a method swept over a grid, per (head, query) pair ----- */

enum { Q_DECODE = 0, Q_KEY = 1 };

typedef struct series_s {
    const char *name;  /* "wave", "ivf", ... */
    const char *param; /* the swept parameter */
    int queries;       /* Q_DECODE or Q_KEY */
    uint32_t n_grid;
    const double *grid;
    uint32_t n_heads; /* per layer: query heads (decode) or KV heads (key) */
    uint32_t n_layers, nq;
    float *r10, *r100, *scan; /* [pair][grid]; pair = (layer, head, query) */
    float *bytes; /* [pair][grid]: bytes read / the context's key bytes */
    int used;
} series_t;

static void series_init(series_t *s, const char *name, const char *param,
                        int queries, const double *grid, uint32_t n_grid,
                        uint32_t n_layers, uint32_t n_heads, uint32_t nq) {
    memset(s, 0, sizeof *s);
    s->name = name;
    s->param = param;
    s->queries = queries;
    s->grid = grid;
    s->n_grid = n_grid;
    s->n_layers = n_layers;
    s->n_heads = n_heads;
    s->nq = nq;
    size_t n = (size_t)n_layers * n_heads * nq * n_grid;
    s->r10 = xcalloc(n, sizeof(float));
    s->r100 = xcalloc(n, sizeof(float));
    s->scan = xcalloc(n, sizeof(float));
    s->bytes = xcalloc(n, sizeof(float));
}

static void series_free(series_t *s) {
    free(s->r10);
    free(s->r100);
    free(s->scan);
    free(s->bytes);
}

static size_t series_at(const series_t *s, uint32_t layer, uint32_t head,
                        uint32_t query, uint32_t gi) {
    return (((size_t)layer * s->n_heads + head) * s->nq + query) * s->n_grid +
           gi;
}

static void series_put(series_t *s, uint32_t layer, uint32_t head,
                       uint32_t query, uint32_t gi, double r10, double r100,
                       double scan, double bytes) {
    size_t i = series_at(s, layer, head, query, gi);
    s->bytes[i] = (float)bytes;
    s->r10[i] = (float)r10;
    s->r100[i] = (float)r100;
    s->scan[i] = (float)scan;
    s->used = 1;
}

/* Smallest scanned fraction at which the pair reaches `target` (recall@100,
 * or recall@10 when at10); +inf if no grid point does. */
static double pair_scan_at(const series_t *s, size_t p0, double target,
                           int at10) {
    double best = INFINITY;
    for (uint32_t g = 0; g < s->n_grid; g++) {
        double r = at10 ? s->r10[p0 + g] : s->r100[p0 + g];
        /* Recall is a count over k: compare with a tolerance so 0.95
         * means 95 of 100 keys, not 95.0000001. */
        if (r + 1e-6 >= target && s->scan[p0 + g] < best)
            best = s->scan[p0 + g];
    }
    return best;
}

/* Fewest bytes read (over the context's key bytes) at a grid point where
 * the pair reaches recall@100 `target`; +inf if none does. */
static double pair_bytes_at(const series_t *s, size_t p0, double target) {
    double best = INFINITY;
    for (uint32_t g = 0; g < s->n_grid; g++)
        if (s->r100[p0 + g] + 1e-6 >= target && s->bytes[p0 + g] < best)
            best = s->bytes[p0 + g];
    return best;
}

/* Best recall@100 the pair gets while scanning at most `budget`. */
static double pair_recall_within(const series_t *s, size_t p0, double budget) {
    double best = 0;
    for (uint32_t g = 0; g < s->n_grid; g++)
        if (s->scan[p0 + g] <= budget + 1e-9 && s->r100[p0 + g] > best)
            best = s->r100[p0 + g];
    return best;
}

/* ---- JSON output ----------------------------------------------------------
 * Rows are written as they are produced; non-finite numbers become null
 * (BENCH.md: a figure that could not be measured is absent, never made up).
 */

static FILE *jf;
static int jrows;

static void jnum(const char *key, double v) {
    if (isfinite(v))
        fprintf(jf, ",\"%s\":%.6g", key, v);
    else
        fprintf(jf, ",\"%s\":null", key);
}

static void row_begin(const char *kind, uint32_t ctx) {
    fprintf(jf, "%s\n    {\"row\":\"%s\",\"context\":%u", jrows++ ? "," : "",
            kind, ctx);
}

static void row_str(const char *key, const char *v) {
    fprintf(jf, ",\"%s\":\"%s\"", key, v);
}

static void row_end(void) {
    fputc('}', jf);
}

/* ---- recall against the ground truth ----------------------------------- */

typedef struct truth_s {
    uint32_t *stamp; /* [n_keys] == cur: in the true top-100 */
    uint32_t cur;
    const int64_t *top; /* [TOPK] true top keys, best first */
} truth_t;

static void truth_set(truth_t *t, const int64_t *top) {
    t->cur++;
    t->top = top;
    for (int i = 0; i < TOPK; i++)
        if (top[i] >= 0)
            t->stamp[top[i]] = t->cur;
}

/* recall@100 and recall@10 of `got` (best first, -1 for none). */
static void recall_of(const truth_t *t, const int64_t *got, double *r10,
                      double *r100) {
    int hit = 0, hit10 = 0;
    for (int i = 0; i < TOPK; i++)
        if (got[i] >= 0 && t->stamp[got[i]] == t->cur)
            hit++;
    for (int i = 0; i < TOP10; i++) {
        if (got[i] < 0)
            continue;
        for (int j = 0; j < TOP10; j++)
            if (got[i] == t->top[j]) {
                hit10++;
                break;
            }
    }
    *r10 = hit10 / (double)TOP10;
    *r100 = hit / (double)TOPK;
}

/* ---- the benchmark ------------------------------------------------------- */

typedef struct cfg_s {
    const char *dump_path, *json_path, *input_desc;
    uint32_t contexts[MAX_CTX], n_ctx;
    uint32_t nq, n_layers, segment_max;
    int hnsw, quick, ablations;
} cfg_t;

/* Sweep grids. Geometric, so that "smallest grid point reaching R" errs by
 * at most one step (x1.25) the same way for every method. */
static double g_rf[64], g_eps[32], g_nprobe[64], g_ef[32];
static uint32_t n_rf, n_eps, n_nprobe, n_ef;

static void make_grids(int quick) {
    double step = quick ? 2.0 : 1.25;
    n_rf = 0;
    for (double f = 0.001; n_rf < 63; f *= step) {
        g_rf[n_rf++] = f < 1 ? f : 1;
        if (f >= 1)
            break;
    }
    static const double eps_full[] = {0.5,  0.3,  0.2,   0.1,   0.05,
                                      0.02, 0.01, 0.005, 0.002, 0.001,
                                      5e-4, 2e-4, 1e-4,  3e-5,  1e-5};
    static const double eps_quick[] = {0.3, 0.1, 0.03, 0.01, 0.003, 0.001};
    const double *e = quick ? eps_quick : eps_full;
    n_eps = quick ? sizeof eps_quick / sizeof *eps_quick
                  : sizeof eps_full / sizeof *eps_full;
    memcpy(g_eps, e, n_eps * sizeof *e);
    n_nprobe = 0;
    double last = 0;
    for (double p = 1; p <= 65536 && n_nprobe < 63; p *= step) {
        double r = round(p);
        if (r != last)
            g_nprobe[n_nprobe++] = last = r;
    }
    /* efSearch below k (100) is raised to k by FAISS. The top is capped:
     * FAISS's candidate heap costs O(ef) per step, and by 1600 every head
     * seen so far is past recall 0.99. */
    n_ef = 0;
    for (double f = 100; f <= 1600 && n_ef < 31; f *= quick ? 2 : 1.25)
        g_ef[n_ef++] = round(f);
}

/* What one context's run learnt besides the series. */
typedef struct ctx_info_s {
    uint32_t ctx, n_keys, seg_tokens, n_segments, tail;
    double clusters_mean, steady_mean;
    uint64_t agree, compared, exact_hits, exact_total;
    uint64_t hnsw_agree, hnsw_compared;
    double t_wave_build, t_ivf_build, t_hnsw_build;
    /* Codes alone (rebuilt once more, same result), and the index bytes
     * with and without them, over the raw K/V bytes. */
    double t_codes_build;
    double index_bytes, codes_bytes, kv_bytes;
} ctx_info_t;

enum {
    S_WAVE,
    S_WAVE_CENTROID,
    S_WAVE_R8,
    S_WAVE_NOSPREAD,
    S_WAVE_BOUNDED,
    S_IVF,
    S_HNSW,
    S_FLAT,
    S_IVF_K2K,
    S_WAVE_K2K,
    S_WAVE_CENTROID_K2K,
    S_COUNT
};

static const double g_one[1] = {1};

/* Exact top-TOPK of one query over keys 0 .. t-1: FAISS's top TOPK + nq
 * over all `ctx` loaded keys (at most nq of them sit at t or later), those
 * at t or later dropped. */
static void truth_before(const int64_t *lab, uint32_t t, int64_t *out) {
    uint32_t n = 0;
    for (uint32_t j = 0; n < TOPK && lab[j] >= 0; j++)
        if ((uint64_t)lab[j] < t)
            out[n++] = lab[j];
    for (; n < TOPK; n++)
        out[n] = -1;
}

typedef struct cand_s {
    float s;
    int64_t pos;
} cand_t;

static int cmp_cand(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->s != y->s)
        return (x->s < y->s) - (x->s > y->s);
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Top TOPK of an index's answer (lab/dist, TOPK entries, -1 for none)
 * merged with the exact scores of the unindexed keys first .. t-1. */
static void merge_tail(const int64_t *lab, const float *dist, const float *q,
                       const float *keys, uint32_t D, uint32_t first,
                       uint32_t t, int64_t *out) {
    cand_t c[TOPK + 256];
    uint32_t n = 0;
    for (uint32_t j = 0; j < TOPK; j++)
        if (lab[j] >= 0)
            c[n++] = (cand_t){dist[j], lab[j]};
    for (uint32_t p = first; p < t && n < TOPK + 256; p++) {
        double s = 0;
        for (uint32_t j = 0; j < D; j++)
            s += (double)q[j] * keys[(size_t)p * D + j];
        c[n++] = (cand_t){(float)s, p};
    }
    qsort(c, n, sizeof *c, cmp_cand);
    for (uint32_t j = 0; j < TOPK; j++)
        out[j] = j < n ? c[j].pos : -1;
}

/* Bytes a flat list index (IVF) reads for one query: every list centroid
 * with an offset and a size, then the probed keys with their ids, then the
 * unindexed keys in full. */
static double ivf_bytes(uint32_t C, uint64_t probed, uint32_t tail, size_t rb) {
    return (double)C * (rb + 8) + (double)probed * (rb + 4) + (double)tail * rb;
}

static void run_context(const cfg_t *cfg, const kvs_dump_t *dp, uint32_t ctx,
                        series_t *S, ctx_info_t *info, double *qk_cos) {
    const kvs_dump_info_t *di = kvs_dump_info(dp);
    const uint32_t L = cfg->n_layers, HQ = di->n_q_heads, HKV = di->n_kv_heads,
                   D = di->head_dim;
    const uint32_t G = HQ / HKV, nq = cfg->nq;
    /* The prefill: positions 0 .. P-1, cut into equal segments (what a
     * store with that segment size builds by position P). The decode
     * queries sit at P .. ctx-1; query t sees keys 0 .. t-1, of which
     * P .. t-1 are its unindexed tail (exact, counted as read). */
    const uint32_t P = ctx - nq;
    const size_t rb = (size_t)D * sizeof(float);
    memset(info, 0, sizeof *info);
    info->ctx = ctx;
    info->n_keys = P;

    kvs_options_t opts;
    kvs_options_default(&opts);
    uint32_t nseg = (P + cfg->segment_max - 1) / cfg->segment_max;
    const uint32_t T = P / nseg, indexed = nseg * T;
    info->seg_tokens = T;
    info->n_segments = nseg;
    info->tail = P - indexed;

    series_init(&S[S_WAVE], "wave", "retrieval_fraction", Q_DECODE, g_rf, n_rf,
                L, HQ, nq);
    series_init(&S[S_WAVE_CENTROID], "wave-centroid", "retrieval_fraction",
                Q_DECODE, g_rf, n_rf, L, HQ, nq);
    series_init(&S[S_WAVE_R8], "wave-codes-ratio8", "retrieval_fraction",
                Q_DECODE, g_rf, n_rf, L, HQ, nq);
    series_init(&S[S_WAVE_NOSPREAD], "wave-codes-nospread",
                "retrieval_fraction", Q_DECODE, g_rf, n_rf, L, HQ, nq);
    series_init(&S[S_WAVE_BOUNDED], "wave-bounded", "epsilon", Q_DECODE, g_eps,
                n_eps, L, HQ, nq);
    series_init(&S[S_IVF], "ivf-flat", "nprobe", Q_DECODE, g_nprobe, n_nprobe,
                L, HQ, nq);
    series_init(&S[S_HNSW], "hnsw", "efSearch", Q_DECODE, g_ef, n_ef, L, HQ,
                nq);
    series_init(&S[S_FLAT], "exact", "none", Q_DECODE, g_one, 1, L, HQ, nq);
    series_init(&S[S_IVF_K2K], "ivf-flat", "nprobe", Q_KEY, g_nprobe, n_nprobe,
                L, HKV, nq);
    series_init(&S[S_WAVE_K2K], "wave", "retrieval_fraction", Q_KEY, g_rf, n_rf,
                L, HKV, nq);
    series_init(&S[S_WAVE_CENTROID_K2K], "wave-centroid", "retrieval_fraction",
                Q_KEY, g_rf, n_rf, L, HKV, nq);

    /* Mean-query / mean-key cosine per query head over the whole context:
     * how far from the keys' distribution the queries sit. */
    float *row = xcalloc((size_t)ctx * D, sizeof(float));
    for (uint32_t l = 0; l < L; l++) {
        double mk[KVS_MAX_HEAD_DIM];
        for (uint32_t h = 0; h < HQ; h++) {
            double mq[KVS_MAX_HEAD_DIM] = {0};
            if (h % G == 0) {
                memset(mk, 0, sizeof mk);
                dump_rows(dp, l, KVS_DUMP_K, h / G, 0, ctx, row);
                for (size_t t = 0; t < ctx; t++)
                    for (uint32_t j = 0; j < D; j++)
                        mk[j] += row[t * D + j];
            }
            dump_rows(dp, l, KVS_DUMP_Q, h, 0, ctx, row);
            for (size_t t = 0; t < ctx; t++)
                for (uint32_t j = 0; j < D; j++)
                    mq[j] += row[t * D + j];
            double dot = 0, nq2 = 0, nk2 = 0;
            for (uint32_t j = 0; j < D; j++) {
                dot += mq[j] * mk[j];
                nq2 += mq[j] * mq[j];
                nk2 += mk[j] * mk[j];
            }
            qk_cos[l * HQ + h] = dot / sqrt(nq2 * nk2 + 1e-300);
        }
    }
    free(row);

    float *kh = xcalloc((size_t)ctx * D, sizeof(float));
    float *vals = xcalloc((size_t)ctx * D, sizeof(float));
    float *qs = xcalloc((size_t)nq * HQ * D, sizeof(float));
    int64_t *hp = xcalloc(TOPK, sizeof(int64_t));
    float *hs = xcalloc(TOPK, sizeof(float));
    int64_t *tb = xcalloc(TOPK, sizeof(int64_t));
    truth_t tr = {xcalloc(ctx, sizeof(uint32_t)), 0, NULL};
    kvs_scratch_t *scr = kvs_scratch_new();
    if (!scr)
        die("kvs_scratch_new", KVS_ENOMEM);
    double steady_sum = 0, clusters_sum = 0;
    uint64_t steady_n = 0;
    int rc;

    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t h = 0; h < HQ; h++) {
            float *tmp = xcalloc((size_t)nq * D, sizeof(float));
            dump_rows(dp, l, KVS_DUMP_Q, h, P, nq, tmp);
            for (uint32_t i = 0; i < nq; i++)
                memcpy(qs + ((size_t)i * HQ + h) * D, tmp + (size_t)i * D,
                       D * sizeof(float));
            free(tmp);
        }
        for (uint32_t g = 0; g < HKV; g++) {
            dump_rows(dp, l, KVS_DUMP_K, g, 0, ctx, kh);
            dump_rows(dp, l, KVS_DUMP_V, g, 0, ctx, vals);

            /* The segments the store builds (its parameters and seeds). */
            double t0 = now_s();
            kvs_segment_t **segs = xcalloc(nseg, sizeof *segs);
            kvs_build_params_t bp = {opts.cluster_tokens, opts.kmeans_iters,
                                     opts.sink_tokens, opts.window_tokens, 0};
            uint32_t C = 0;
            for (uint32_t s = 0; s < nseg; s++) {
                char err[160] = "";
                bp.seed = 1234 + (uint64_t)s * T;
                if ((rc = kvs_segment_build(
                         &bp, KVS_DTYPE_F32, D, (uint64_t)s * T, T,
                         kh + (size_t)s * T * D, vals + (size_t)s * T * D,
                         &segs[s], err, sizeof err)))
                    die(err, rc);
                C += segs[s]->n_clusters;
            }
            info->t_wave_build += now_s() - t0;
            t0 = now_s();
            for (uint32_t s = 0; s < nseg; s++)
                if ((rc = kvs_segment_build_codes(
                         segs[s], segs[s]->codes->seed ^ 0x636f646573ull)))
                    die("kvs_segment_build_codes", rc);
            info->t_codes_build += now_s() - t0;
            for (uint32_t s = 0; s < nseg; s++) {
                info->index_bytes += (double)kvs_segment_index_bytes(segs[s]);
                info->codes_bytes += (double)kvs_codes_bytes(
                    segs[s]->n_tokens, segs[s]->n_clusters, D);
                info->kv_bytes += 2.0 * segs[s]->n_tokens * rb;
            }
            clusters_sum += C;

            /* Queries: the group's decode queries, then the held-out keys
             * at the same positions (key-to-key). */
            uint32_t nall = G * nq + nq;
            float *qx = xcalloc((size_t)nall * D, sizeof(float));
            for (uint32_t j = 0; j < G; j++)
                for (uint32_t i = 0; i < nq; i++)
                    memcpy(qx + ((size_t)j * nq + i) * D,
                           qs + ((size_t)i * HQ + g * G + j) * D,
                           D * sizeof(float));
            memcpy(qx + (size_t)G * nq * D, kh + (size_t)P * D,
                   (size_t)nq * D * sizeof(float));
            /* Ground truth: exact inner product over keys before t. */
            const uint32_t KT = TOPK + nq;
            int64_t *lab = xcalloc((size_t)nall * KT, sizeof(int64_t));
            float *ld = xcalloc((size_t)nall * KT, sizeof(float));
            int64_t *truth = xcalloc((size_t)nall * TOPK, sizeof(int64_t));
            FaissIndexFlatIP *flat;
            faiss_check(faiss_IndexFlatIP_new_with(&flat, D), "flat");
            faiss_check(faiss_Index_add((FaissIndex *)flat, ctx, kh), "add");
            faiss_check(
                faiss_Index_search((FaissIndex *)flat, nall, qx, KT, ld, lab),
                "flat search");
            faiss_IndexFlatIP_free(flat);
            for (uint32_t a = 0; a < nall; a++) {
                uint32_t i = a >= G * nq ? a - G * nq : a % nq;
                truth_before(lab + (size_t)a * KT, P + i,
                             truth + (size_t)a * TOPK);
            }
            free(lab);
            free(ld);

            /* Wave over the segments plus the query's own tail. */
            for (uint32_t a = 0; a < nall; a++) {
                truth_set(&tr, truth + (size_t)a * TOPK);
                int key = a >= G * nq;
                uint32_t j = key ? 0 : a / nq, i = key ? a - G * nq : a % nq;
                uint32_t h = g * G + j, t = P + i;
                const float *q = qx + (size_t)a * D;
                kvs_head_view_t v = {
                    .dtype = KVS_DTYPE_F32,
                    .d = D,
                    .segments = segs,
                    .n_segments = nseg,
                    .indexed_tokens = indexed,
                    .tail_keys = kh + (size_t)indexed * D,
                    .tail_values = vals + (size_t)indexed * D,
                    .tail_tokens = t - indexed,
                    .sink_tokens = opts.sink_tokens,
                    .window_tokens = opts.window_tokens,
                };
                double r10, r100;
                const double kb = (double)t * rb; /* the context's keys */
                if (!key) {
                    kvs_zone_params_t zp = {.exact = 1, .scale = 1};
                    if ((rc = kvs_head_search(&v, q, TOPK, &zp, scr, hp, hs,
                                              NULL)))
                        die("kvs_head_search", rc);
                    recall_of(&tr, hp, &r10, &r100);
                    series_put(&S[S_FLAT], l, h, i, 0, r10, r100, 1.0, 1.0);
                    info->exact_hits += (uint64_t)llround(r100 * TOPK);
                    info->exact_total += TOPK;
                }
                /* Series per mode: the default (codes), the centroid path
                 * (the index before codes), codes ablations, bounded. */
                static const int mode_series[] = {S_WAVE, S_WAVE_CENTROID,
                                                  S_WAVE_R8, S_WAVE_NOSPREAD,
                                                  S_WAVE_BOUNDED};
                for (int mode = 0; mode < 5; mode++) {
                    if (key && mode >= 2)
                        break;
                    if ((mode == 2 || mode == 3) && !cfg->ablations)
                        continue;
                    int bounded = mode == 4;
                    uint32_t ng = bounded ? n_eps : n_rf;
                    for (uint32_t gi = 0; gi < ng; gi++) {
                        kvs_zone_params_t zp = {0};
                        zp.scale = 1.0f / sqrtf((float)D);
                        if (bounded) {
                            zp.bounded = 1;
                            zp.epsilon = (float)g_eps[gi];
                        } else {
                            zp.retrieval_fraction = (float)g_rf[gi];
                        }
                        kvs_rank_params_t rp = {0};
                        if (mode == 1)
                            rp.rank = KVS_RANK_CENTROID;
                        if (mode == 2)
                            rp.code_ratio = 8;
                        if (mode == 3)
                            rp.spread = -1;
                        kvs_zone_stats_t zs = {0};
                        if ((rc = kvs_head_search_group_ranked(
                                 &v, q, 1, TOPK, &zp, &rp, scr, hp, hs, &zs)))
                            die("kvs_head_search", rc);
                        double scan = (double)zs.keys_exact / t;
                        double bytes = (double)zs.bytes_read / kb;
                        recall_of(&tr, hp, &r10, &r100);
                        if (key) {
                            series_put(
                                &S[mode ? S_WAVE_CENTROID_K2K : S_WAVE_K2K], l,
                                g, i, gi, r10, r100, scan, bytes);
                            continue;
                        }
                        if (!mode) {
                            steady_sum += (double)zs.keys_steady;
                            steady_n++;
                        }
                        series_put(&S[mode_series[mode]], l, h, i, gi, r10,
                                   r100, scan, bytes);
                    }
                }
            }
            for (uint32_t s = 0; s < nseg; s++)
                kvs_segment_free(segs[s]);
            free(segs);

            /* IVF-Flat, inner product, one list per wave cluster, over the
             * same indexed keys; the tail is searched exactly. */
            t0 = now_s();
            FaissIndexFlatIP *quant;
            FaissIndexIVFFlat *ivf;
            faiss_check(faiss_IndexFlatIP_new_with(&quant, D), "quantizer");
            faiss_check(
                faiss_IndexIVFFlat_new_with_metric(&ivf, (FaissIndex *)quant, D,
                                                   C, METRIC_INNER_PRODUCT),
                "ivf");
            faiss_check(faiss_Index_train((FaissIndex *)ivf, indexed, kh),
                        "train");
            faiss_check(faiss_Index_add((FaissIndex *)ivf, indexed, kh), "add");
            info->t_ivf_build += now_s() - t0;
            /* List sizes, and each query's list ranking: the IVF probes
             * the quantizer's top nprobe lists, so the scanned keys are the
             * running sum of their sizes. */
            int64_t *asg = xcalloc(indexed, sizeof(int64_t));
            faiss_check(
                faiss_Index_assign((FaissIndex *)quant, indexed, kh, asg, 1),
                "assign");
            uint64_t *lsize = xcalloc(C, sizeof(uint64_t));
            for (uint32_t t = 0; t < indexed; t++)
                if (asg[t] >= 0 && asg[t] < C)
                    lsize[asg[t]]++;
            int64_t *rank = xcalloc((size_t)nall * C, sizeof(int64_t));
            float *rdist = xcalloc((size_t)nall * C, sizeof(float));
            faiss_check(faiss_Index_search((FaissIndex *)quant, nall, qx, C,
                                           rdist, rank),
                        "quantizer search");
            uint64_t *cum = xcalloc((size_t)nall * C, sizeof(uint64_t));
            for (uint32_t a = 0; a < nall; a++) {
                uint64_t s = 0;
                for (uint32_t c = 0; c < C; c++) {
                    int64_t li = rank[(size_t)a * C + c];
                    s += li >= 0 ? lsize[li] : 0;
                    cum[(size_t)a * C + c] = s;
                }
            }
            int64_t *got = xcalloc((size_t)nall * TOPK, sizeof(int64_t));
            float *dist = xcalloc((size_t)nall * TOPK, sizeof(float));
            for (uint32_t gi = 0; gi < n_nprobe; gi++) {
                size_t np = g_nprobe[gi] < C ? (size_t)g_nprobe[gi] : C;
                faiss_IndexIVF_set_nprobe((FaissIndexIVF *)ivf, np);
                faiss_check(faiss_Index_search((FaissIndex *)ivf, nall, qx,
                                               TOPK, dist, got),
                            "ivf search");
                for (uint32_t a = 0; a < nall; a++) {
                    uint32_t i = a >= G * nq ? a - G * nq : a % nq;
                    uint32_t t = P + i;
                    merge_tail(got + (size_t)a * TOPK, dist + (size_t)a * TOPK,
                               qx + (size_t)a * D, kh, D, indexed, t, tb);
                    truth_set(&tr, truth + (size_t)a * TOPK);
                    double r10, r100;
                    recall_of(&tr, tb, &r10, &r100);
                    uint64_t probed = cum[(size_t)a * C + np - 1];
                    double scan = (double)(probed + t - indexed) / t;
                    double bytes = ivf_bytes(C, probed, t - indexed, rb) /
                                   ((double)t * rb);
                    if (a < G * nq)
                        series_put(&S[S_IVF], l, g * G + a / nq, i, gi, r10,
                                   r100, scan, bytes);
                    else
                        series_put(&S[S_IVF_K2K], l, g, i, gi, r10, r100, scan,
                                   bytes);
                }
            }
            free(asg);
            free(lsize);
            free(rank);
            free(rdist);
            free(cum);
            faiss_IndexIVFFlat_free(ivf);
            faiss_IndexFlatIP_free(quant);

            /* HNSW32 over inner product on the indexed keys, tail exact.
             * Scans come from a counting replica of IndexHNSW::search
             * (hnsw_count.cpp); its labels are checked against FAISS's own
             * search at the same efSearch. */
            if (cfg->hnsw) {
                t0 = now_s();
                FaissIndex *hn;
                FaissParameterSpace *ps;
                faiss_check(faiss_index_factory(&hn, D, "HNSW32,Flat",
                                                METRIC_INNER_PRODUCT),
                            "hnsw");
                faiss_check(faiss_Index_add(hn, indexed, kh), "hnsw add");
                info->t_hnsw_build += now_s() - t0;
                faiss_check(faiss_ParameterSpace_new(&ps), "parameter space");
                int64_t *ref = xcalloc(TOPK, sizeof(int64_t));
                for (uint32_t gi = 0; gi < n_ef; gi++) {
                    faiss_check(faiss_ParameterSpace_set_index_parameter(
                                    ps, hn, "efSearch", g_ef[gi]),
                                "efSearch");
                    for (uint32_t a = 0; a < G * nq; a++) {
                        const float *q = qx + (size_t)a * D;
                        uint64_t ndis = 0;
                        if (kvs__recall_hnsw_search(hn, q, TOPK, (int)g_ef[gi],
                                                    got, &ndis))
                            die("counting HNSW search", -1);
                        /* A few queries per grid point suffice to show the
                         * replica returns what FAISS returns. */
                        if (a < 4) {
                            faiss_check(
                                faiss_Index_search(hn, 1, q, TOPK, dist, ref),
                                "hnsw search");
                            info->hnsw_compared++;
                            if (!memcmp(got, ref, TOPK * sizeof(int64_t)))
                                info->hnsw_agree++;
                        }
                        /* Scores of the returned labels for the merge. */
                        for (uint32_t j = 0; j < TOPK; j++) {
                            double s = 0;
                            if (got[j] >= 0)
                                for (uint32_t x = 0; x < D; x++)
                                    s += (double)q[x] *
                                         kh[(size_t)got[j] * D + x];
                            dist[j] = (float)s;
                        }
                        uint32_t i = a % nq, t = P + i;
                        merge_tail(got, dist, q, kh, D, indexed, t, tb);
                        /* Graph nodes hold a key and 32-64 links. */
                        double scan = (double)(ndis + t - indexed) / t;
                        double bytes = ((double)ndis * (rb + 4 * 32) +
                                        (double)(t - indexed) * rb) /
                                       ((double)t * rb);
                        truth_set(&tr, truth + (size_t)a * TOPK);
                        double r10, r100;
                        recall_of(&tr, tb, &r10, &r100);
                        series_put(&S[S_HNSW], l, g * G + a / nq, i, gi, r10,
                                   r100, scan, bytes);
                    }
                }
                free(ref);
                faiss_ParameterSpace_free(ps);
                faiss_Index_free(hn);
            }
            free(got);
            free(dist);
            free(truth);
            free(qx);
        }
        fprintf(stderr, "recall_bench: ctx %u layer %u done\n", ctx, l);
    }
    info->clusters_mean = clusters_sum / ((double)L * HKV);
    info->steady_mean = steady_n ? steady_sum / (double)steady_n : 0;

    kvs_scratch_free(scr);
    free(tr.stamp);
    free(hp);
    free(hs);
    free(tb);
    free(vals);
    free(qs);
    free(kh);
}

/* Summary of one series at one context: returns the median and p90 of the
 * per-pair scanned fraction at recall@100 = 0.95 through *med / *p90. */
static void report_series(const series_t *s, uint32_t ctx,
                          const kvs_dump_info_t *dp, const double *qk_cos,
                          double *med, double *p90, double *within2,
                          double *bmed, double *bp90) {
    size_t np = (size_t)s->n_layers * s->n_heads * s->nq;
    double *v = xcalloc(np, sizeof(double));
    double *w = xcalloc(np, sizeof(double));
    const char *qn = s->queries == Q_DECODE ? "decode" : "key";

    /* Curve: one row per grid point, means and quantiles over pairs. */
    for (uint32_t gi = 0; gi < s->n_grid; gi++) {
        double *a = xcalloc(np, sizeof(double)),
               *b = xcalloc(np, sizeof(double));
        double *c = xcalloc(np, sizeof(double));
        double *e = xcalloc(np, sizeof(double));
        for (size_t p = 0; p < np; p++) {
            size_t i = p * s->n_grid + gi;
            a[p] = s->scan[i];
            b[p] = s->r100[i];
            c[p] = s->r10[i];
            e[p] = s->bytes[i];
        }
        row_begin("curve", ctx);
        row_str("index", s->name);
        row_str("queries", qn);
        row_str("param", s->param);
        jnum("value", s->grid[gi]);
        jnum("pairs", (double)np);
        jnum("scanned_fraction", mean(a, np));
        jnum("recall_at_10", mean(c, np));
        jnum("recall_at_100", mean(b, np));
        jnum("bytes_read_fraction", mean(e, np));
        jnum("scanned_fraction_median", pct(a, np, 0.5));
        jnum("recall_at_100_median", pct(b, np, 0.5));
        jnum("recall_at_100_p10", pct(b, np, 0.1));
        row_end();
        free(a);
        free(b);
        free(c);
        free(e);
    }

    /* Per head: the scan each query of the head needs (the exact search
     * scans everything everywhere: no rows). */
    for (uint32_t l = 0; l < s->n_layers && strcmp(s->name, "exact"); l++) {
        for (uint32_t h = 0; h < s->n_heads; h++) {
            double *x = xcalloc(s->nq, sizeof(double));
            double *y = xcalloc(s->nq, sizeof(double));
            uint32_t unreached = 0;
            for (uint32_t i = 0; i < s->nq; i++) {
                size_t p0 = series_at(s, l, h, i, 0);
                x[i] = pair_scan_at(s, p0, 0.95, 0);
                y[i] = pair_recall_within(s, p0, 0.02);
                unreached += !isfinite(x[i]);
            }
            row_begin("head", ctx);
            row_str("index", s->name);
            row_str("queries", qn);
            jnum("layer", l);
            if (s->queries == Q_DECODE) {
                jnum("q_head", h);
                jnum("kv_head", h / (dp->n_q_heads / dp->n_kv_heads));
                jnum("q_k_mean_cosine", qk_cos[l * dp->n_q_heads + h]);
            } else {
                jnum("kv_head", h);
            }
            jnum("scanned_at_recall95_median", pct(x, s->nq, 0.5));
            jnum("scanned_at_recall95_p90", pct(x, s->nq, 0.9));
            jnum("unreached_recall95", unreached);
            jnum("recall_at_100_within_2pct_median", pct(y, s->nq, 0.5));
            row_end();
            free(x);
            free(y);
        }
    }

    /* Over all pairs. */
    row_begin("summary", ctx);
    row_str("index", s->name);
    row_str("queries", qn);
    jnum("pairs", (double)np);
    static const double targets[] = {0.9, 0.95, 0.99};
    static const char *tn[] = {"90", "95", "99"};
    for (int t = 0; t < 3; t++) {
        size_t unreached = 0;
        for (size_t p = 0; p < np; p++) {
            v[p] = pair_scan_at(s, p * s->n_grid, targets[t], 0);
            unreached += !isfinite(v[p]);
        }
        char k[64];
        double m = pct(v, np, 0.5), q9 = pct(v, np, 0.9);
        snprintf(k, sizeof k, "scanned_at_recall%s_median", tn[t]);
        jnum(k, m);
        snprintf(k, sizeof k, "scanned_at_recall%s_p90", tn[t]);
        jnum(k, q9);
        snprintf(k, sizeof k, "unreached_recall%s_fraction", tn[t]);
        jnum(k, (double)unreached / np);
        if (t == 1) {
            *med = m;
            *p90 = q9;
        }
    }
    for (size_t p = 0; p < np; p++)
        v[p] = pair_bytes_at(s, p * s->n_grid, 0.95);
    *bmed = pct(v, np, 0.5);
    *bp90 = pct(v, np, 0.9);
    jnum("bytes_read_at_recall95_median", *bmed);
    jnum("bytes_read_at_recall95_p90", *bp90);
    for (size_t p = 0; p < np; p++)
        v[p] = pair_scan_at(s, p * s->n_grid, 0.9, 1);
    jnum("scanned_at_recall10_90_median", pct(v, np, 0.5));
    size_t ok = 0;
    for (size_t p = 0; p < np; p++) {
        w[p] = pair_recall_within(s, p * s->n_grid, 0.02);
        ok += w[p] + 1e-6 >= 0.95;
    }
    jnum("recall_at_100_within_2pct_mean", mean(w, np));
    *within2 = pct(w, np, 0.5);
    jnum("recall_at_100_within_2pct_median", *within2);
    jnum("pairs_recall95_within_2pct", (double)ok / np);
    row_end();
    free(v);
    free(w);
}

/* Median over pairs of the ratio of two series' scans at recall@100 = 0.95
 * (b / a): "x fewer keys than IVF at equal recall" judged pair by pair.
 * A pair only b never brings to 0.95 counts as +inf, one only a never
 * does as 0, one neither does as 1. */
static double pair_ratio_median(const series_t *a, const series_t *b) {
    size_t np = (size_t)a->n_layers * a->n_heads * a->nq;
    double *r = xcalloc(np, sizeof(double));
    for (size_t p = 0; p < np; p++) {
        double x = pair_scan_at(a, p * a->n_grid, 0.95, 0);
        double y = pair_scan_at(b, p * b->n_grid, 0.95, 0);
        if (isfinite(x))
            r[p] = y / x; /* +inf when b never gets there */
        else
            r[p] = isfinite(y) ? 0 : 1;
    }
    double m = pct(r, np, 0.5);
    free(r);
    return m;
}

static int parse_list(const char *s, uint32_t *out, uint32_t cap) {
    uint32_t n = 0;
    while (*s && n < cap) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || v == 0)
            return -1;
        out[n++] = (uint32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return (int)n;
}

static void usage(void) {
    fprintf(stderr,
            "usage: recall_bench --dump FILE [--contexts 2048,8192,32768] "
            "[--queries N]\n"
            "                    [--layers N] [--segment-max N] [--no-hnsw] "
            "[--ablations] [--quick]\n"
            "                    [--input-desc TEXT] [--json FILE]\n");
}

int main(int argc, char **argv) {
    cfg_t cfg = {0};
    cfg.nq = 64;
    cfg.segment_max = 8192;
    cfg.hnsw = 1;
    cfg.n_ctx = 3;
    cfg.contexts[0] = 2048;
    cfg.contexts[1] = 8192;
    cfg.contexts[2] = 32768;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *nx = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dump") && nx) {
            cfg.dump_path = argv[++i];
        } else if (!strcmp(a, "--json") && nx) {
            cfg.json_path = argv[++i];
        } else if (!strcmp(a, "--contexts") && nx) {
            int n = parse_list(argv[++i], cfg.contexts, MAX_CTX);
            if (n <= 0) {
                usage();
                return 2;
            }
            cfg.n_ctx = (uint32_t)n;
        } else if (!strcmp(a, "--queries") && nx) {
            cfg.nq = (uint32_t)atoi(argv[++i]);
        } else if (!strcmp(a, "--layers") && nx) {
            cfg.n_layers = (uint32_t)atoi(argv[++i]);
        } else if (!strcmp(a, "--segment-max") && nx) {
            cfg.segment_max = (uint32_t)atoi(argv[++i]);
        } else if (!strcmp(a, "--input-desc") && nx) {
            cfg.input_desc = argv[++i];
        } else if (!strcmp(a, "--ablations")) {
            cfg.ablations = 1;
        } else if (!strcmp(a, "--no-hnsw")) {
            cfg.hnsw = 0;
        } else if (!strcmp(a, "--quick")) {
            cfg.quick = 1;
        } else {
            usage();
            return 2;
        }
    }
    if (!cfg.dump_path || !cfg.nq) {
        usage();
        return 2;
    }
    kvs_dump_t *dump = NULL;
    char err[512];
    if (kvs_dump_open(cfg.dump_path, &dump, err, sizeof(err)) != 0) {
        fprintf(stderr, "recall_bench: %s\n", err);
        return 1;
    }
    const kvs_dump_info_t *di = kvs_dump_info(dump);
    if (!cfg.n_layers || cfg.n_layers > di->n_layers)
        cfg.n_layers = di->n_layers;
    for (uint32_t c = 0; c < cfg.n_ctx; c++) {
        if (cfg.contexts[c] > di->n_tokens ||
            cfg.contexts[c] < cfg.nq + TOPK + 2 * 68 ||
            (cfg.contexts[c] - cfg.nq) /
                    ((cfg.contexts[c] - cfg.nq + cfg.segment_max - 1) /
                     cfg.segment_max) <=
                68) {
            fprintf(stderr,
                    "recall_bench: context %u does not fit the dump (%u "
                    "tokens) with %u queries\n",
                    cfg.contexts[c], di->n_tokens, cfg.nq);
            return 2;
        }
    }
    make_grids(cfg.quick);

    jf = cfg.json_path ? fopen(cfg.json_path, "w") : stdout;
    if (!jf) {
        perror(cfg.json_path);
        return 1;
    }
    fprintf(jf, "{\"bench\":\"recall\",\"rows\":[");
    /* What was measured on, in the rows (metrics hold numbers only). */
    row_begin("input", di->n_tokens);
    row_str("input", cfg.input_desc ? cfg.input_desc : cfg.dump_path);
    jnum("dump_tokens", di->n_tokens);
    jnum("model_seq_len", di->seq_len);
    jnum("n_layers", di->n_layers);
    jnum("n_q_heads", di->n_q_heads);
    jnum("n_kv_heads", di->n_kv_heads);
    jnum("head_dim", di->head_dim);
    row_str("dump_dtype", di->dtype == KVS_DTYPE_F16 ? "f16" : "f32");
    row_end();

#define N_HEADLINE 17
    double headline[N_HEADLINE];
    for (int i = 0; i < N_HEADLINE; i++)
        headline[i] = NAN;
    double qk_med = NAN;
    uint32_t head_ctx = 0;
    for (uint32_t c = 0; c < cfg.n_ctx; c++) {
        uint32_t ctx = cfg.contexts[c];
        series_t S[S_COUNT];
        ctx_info_t info;
        double *qk_cos =
            xcalloc((size_t)cfg.n_layers * di->n_q_heads, sizeof(double));
        double t0 = now_s();
        run_context(&cfg, dump, ctx, S, &info, qk_cos);
        double secs = now_s() - t0;

        double med[S_COUNT], p90[S_COUNT], w2[S_COUNT], bm[S_COUNT],
            b9[S_COUNT];
        for (int s = 0; s < S_COUNT; s++) {
            med[s] = p90[s] = w2[s] = bm[s] = b9[s] = NAN;
            if (S[s].used)
                report_series(&S[s], ctx, di, qk_cos, &med[s], &p90[s], &w2[s],
                              &bm[s], &b9[s]);
        }
        size_t nh = (size_t)cfg.n_layers * di->n_q_heads;
        double *tmp = xcalloc(nh, sizeof(double));
        memcpy(tmp, qk_cos, nh * sizeof(double));
        double qk = pct(tmp, nh, 0.5);
        free(tmp);

        row_begin("context", ctx);
        jnum("keys", info.n_keys);
        jnum("queries_per_head", cfg.nq);
        jnum("layers", cfg.n_layers);
        jnum("extrapolated", ctx > di->seq_len);
        jnum("segment_tokens", info.seg_tokens);
        jnum("segments", info.n_segments);
        jnum("tail_tokens", info.tail);
        jnum("clusters_per_head_mean", info.clusters_mean);
        jnum("centroid_fraction", info.clusters_mean / info.n_keys);
        jnum("steady_keys_mean", info.steady_mean);
        jnum("steady_fraction", info.steady_mean / info.n_keys);
        jnum("hnsw_counted_search_equals_faiss",
             info.hnsw_compared ? (double)info.hnsw_agree / info.hnsw_compared
                                : NAN);
        jnum("exact_mode_recall_at_100",
             info.exact_total ? (double)info.exact_hits / info.exact_total
                              : NAN);
        jnum("q_k_mean_cosine_median", qk);
        jnum("wave_build_s", info.t_wave_build);
        jnum("codes_build_s", info.t_codes_build);
        jnum("codes_share_of_build", info.t_codes_build / info.t_wave_build);
        jnum("index_memory_overhead", info.index_bytes / info.kv_bytes);
        jnum("codes_memory_overhead", info.codes_bytes / info.kv_bytes);
        jnum("ivf_build_s", info.t_ivf_build);
        jnum("hnsw_build_s", cfg.hnsw ? info.t_hnsw_build : NAN);
        jnum("seconds", secs);
        row_end();

        double ratio = pair_ratio_median(&S[S_WAVE], &S[S_IVF]);
        fprintf(stderr,
                "recall ctx=%u keys=%u: scanned at recall@100=0.95 (median / "
                "p90 over %u x %u x %u pairs): wave %.4f / %.4f, "
                "wave-centroid %.4f / %.4f, wave-bounded %.4f / %.4f, ivf %.4f "
                "/ %.4f, hnsw %.4f / %.4f;"
                " bytes read: wave %.4f / %.4f, wave-centroid %.4f, ivf %.4f / "
                "%.4f;"
                " ivf key-to-key %.4f; ivf/wave %.2fx; q.k mean cosine %.3f\n",
                ctx, info.n_keys, cfg.n_layers, di->n_q_heads, cfg.nq,
                med[S_WAVE], p90[S_WAVE], med[S_WAVE_CENTROID],
                p90[S_WAVE_CENTROID], med[S_WAVE_BOUNDED], p90[S_WAVE_BOUNDED],
                med[S_IVF], p90[S_IVF], med[S_HNSW], p90[S_HNSW], bm[S_WAVE],
                b9[S_WAVE], bm[S_WAVE_CENTROID], bm[S_IVF], b9[S_IVF],
                med[S_IVF_K2K], ratio, qk);

        if (ctx >= head_ctx) {
            head_ctx = ctx;
            headline[0] = med[S_WAVE];
            headline[1] = p90[S_WAVE];
            headline[2] = med[S_IVF];
            headline[3] = p90[S_IVF];
            headline[4] = med[S_HNSW];
            headline[5] = med[S_IVF_K2K];
            headline[6] = ratio;
            headline[7] = med[S_WAVE_BOUNDED];
            headline[8] = w2[S_WAVE];
            headline[9] = bm[S_WAVE];
            headline[10] = b9[S_WAVE];
            headline[11] = bm[S_IVF];
            headline[12] = b9[S_IVF];
            headline[13] = p90[S_IVF] / p90[S_WAVE];
            headline[14] = med[S_WAVE_CENTROID];
            headline[15] = p90[S_WAVE_CENTROID];
            headline[16] = bm[S_WAVE_CENTROID];
            qk_med = qk;
        }
        for (int s = 0; s < S_COUNT; s++)
            series_free(&S[s]);
        free(qk_cos);
    }

    /* Headline metrics (BENCH.md names) at the largest context run. An
     * unreached median is absent, not a number. */
    fprintf(jf, "\n  ],\n  \"metrics\":{\"headline_context\":%u", head_ctx);
    static const char *names[] = {"wave_scanned_at_recall95",
                                  "wave_scanned_at_recall95_p90",
                                  "ivf_scanned_at_recall95",
                                  "ivf_scanned_at_recall95_p90",
                                  "hnsw_scanned_at_recall95",
                                  "ivf_k2k_scanned_at_recall95",
                                  "ivf_over_wave_scan_ratio_at_recall95",
                                  "wave_bounded_scanned_at_recall95",
                                  "wave_recall100_within_2pct",
                                  "wave_bytes_read_fraction",
                                  "wave_bytes_read_fraction_p90",
                                  "ivf_bytes_read_fraction",
                                  "ivf_bytes_read_fraction_p90",
                                  "ivf_over_wave_scan_ratio_at_recall95_p90",
                                  "wave_centroid_scanned_at_recall95",
                                  "wave_centroid_scanned_at_recall95_p90",
                                  "wave_centroid_bytes_read_fraction"};
    for (int i = 0; i < N_HEADLINE; i++)
        if (isfinite(headline[i]))
            fprintf(jf, ",\"%s\":%.6g", names[i], headline[i]);
    if (isfinite(qk_med))
        fprintf(jf, ",\"q_k_mean_cosine\":%.6g", qk_med);
    fprintf(jf, "}}\n");
    if (jf != stdout)
        fclose(jf);
    kvs_dump_close(dump);
    return 0;
}
