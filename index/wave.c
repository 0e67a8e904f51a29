/*
 * wave.c: tripartite attention and top-k search over one KV head.
 *
 * A query group (the query heads that share this KV head) is answered from
 * three zones, each turned into a softmax *partial* (running max m, sum l,
 * weighted value sum acc) and merged by log-sum-exp:
 *   steady     sinks, the last window of indexed tokens, and the unindexed
 *              tail, attended exactly;
 *   retrieval  the best clusters by softmax(q.c * scale) summed over the
 *              group, attended exactly over their members (steady members
 *              are masked there, having been attended already);
 *   estimation the next band of clusters, each as one pseudo-token with key
 *              = centroid, weight = member count, value = value mean.
 * Clusters past those bands are skipped. Exact mode walks every row in
 * chunks through the same partial/merge code.
 *
 * All work happens on rows that are contiguous in memory (a cluster's
 * members, a chunk of the tail), scored by kvs_dot_rows into one scratch
 * matrix so that each zone needs one softmax pass.
 */
#include "kvs_index.h"
#include "kvs_kernels.h"

#include <assert.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MAXQ KVS_KERNEL_MAX_Q
#define EXACT_CHUNK 1024

void kvs_zone_stats_add(kvs_zone_stats_t *acc, const kvs_zone_stats_t *x) {
    acc->keys_total += x->keys_total;
    acc->keys_exact += x->keys_exact;
    acc->keys_steady += x->keys_steady;
    acc->clusters_total += x->clusters_total;
    acc->clusters_retrieved += x->clusters_retrieved;
    acc->clusters_estimated += x->clusters_estimated;
    acc->clusters_skipped += x->clusters_skipped;
    acc->bytes_read += x->bytes_read;
    acc->keys_coded += x->keys_coded;
}
/* A run of rows to score: `n` rows of keys/values, written to scratch
 * columns col .. col+n. `seg` is the owning segment (NULL for the tail) and
 * `slot0` the first slot, for masking and positions. */
typedef struct block_s {
    const void *keys;
    const void *vals;
    uint32_t n;
    uint32_t col;
    const kvs_segment_t *seg;
    uint32_t slot0;
} block_t;

struct kvs_scratch_s {
    float *scores; /* [g][cols] */
    size_t scores_cap;
    float *cscore; /* [g][C] scaled q.c */
    size_t cscore_cap;
    float *rank; /* [C] */
    size_t rank_cap;
    uint32_t *idx; /* [C] */
    size_t idx_cap;
    block_t *blocks;
    size_t blocks_cap;
    uint32_t *cbase; /* [n_segments + 1] */
    size_t cbase_cap;
    float *acc; /* [3][MAXQ][d] partial accumulators */
    size_t acc_cap;
    float *tmpc; /* [C] */
    size_t tmpc_cap;
    char *pbuf; /* precise exact mode: doubles and converted rows */
    size_t pbuf_cap;
    int64_t *hpos; /* [k] heap for search */
    size_t hpos_cap;
    float *hscore;
    size_t hscore_cap;
    float *cq; /* codes search: per segment [w4 dc][w8 dc][b4 b8] */
    size_t cq_cap;
    float *est; /* [cluster members] code scores */
    size_t est_cap;
    int64_t *cpos; /* [R] candidate heap: (segment << 32 | slot) */
    size_t cpos_cap;
    float *cscr;
    size_t cscr_cap;
    uint32_t *ustart; /* codes attend: first member of each scanned cluster */
    size_t ustart_cap;
    uint64_t *rsort; /* [2][C] radix sort of the cluster ranking */
    size_t rsort_cap;
    float *rq; /* [g][dc] rotated queries (code_weights) */
    size_t rq_cap;
    const void **rows; /* row addresses for the gather kernels */
    size_t rows_cap;
    int8_t *cq8; /* codes attend: [nseg][g][dc] int8 code weights */
    size_t cq8_cap;
    uint32_t *cseg; /* codes attend: [C] each cluster's segment */
    size_t cseg_cap;
    int16_t *cq16; /* codes attend: [g][dc] int16 centroid code weights */
    size_t cq16_cap;
    uint32_t *gkey; /* codes search: selection buffer */
    size_t gkey_cap;
};

kvs_scratch_t *kvs_scratch_new(void) {
    return calloc(1, sizeof(kvs_scratch_t));
}

void kvs_scratch_free(kvs_scratch_t *s) {
    if (!s)
        return;
    free(s->scores);
    free(s->cscore);
    free(s->rank);
    free(s->idx);
    free(s->blocks);
    free(s->cbase);
    free(s->acc);
    free(s->pbuf);
    free(s->tmpc);
    free(s->hpos);
    free(s->hscore);
    free(s->cq);
    free(s->est);
    free(s->cpos);
    free(s->cscr);
    free(s->ustart);
    free(s->rsort);
    free(s->rq);
    free(s->rows);
    free(s->cq8);
    free(s->cseg);
    free(s->cq16);
    free(s->gkey);
    free(s);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q)
        return KVS_ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

#define GROW(s, field, capf, need)                                             \
    grow((void **)&(s)->field, &(s)->capf, (need), sizeof(*(s)->field))

/* ---------------------------------------------------------------------- */
/* Softmax partials                                                       */

typedef struct partial_s {
    uint32_t g, d;
    float m[MAXQ];
    float l[MAXQ];
    float *acc; /* [g][d] */
} partial_t;

static void partial_init(partial_t *p, uint32_t g, uint32_t d, float *acc) {
    p->g = g;
    p->d = d;
    p->acc = acc;
    for (uint32_t i = 0; i < g; i++) {
        p->m[i] = -INFINITY;
        p->l[i] = 0;
    }
    memset(acc, 0, (size_t)g * d * sizeof(float));
}

/* Merge `b` into `a` by log-sum-exp: the result is the softmax partial over
 * the union of both row sets. */
static void partial_merge(partial_t *a, const partial_t *b) {
    for (uint32_t i = 0; i < a->g; i++) {
        if (b->l[i] == 0)
            continue;
        float m = a->m[i] > b->m[i] ? a->m[i] : b->m[i];
        float sa = a->l[i] > 0 ? expf(a->m[i] - m) : 0;
        float sb = expf(b->m[i] - m);
        float *x = a->acc + (size_t)i * a->d;
        const float *y = b->acc + (size_t)i * a->d;
        for (uint32_t t = 0; t < a->d; t++)
            x[t] = x[t] * sa + y[t] * sb;
        a->l[i] = a->l[i] * sa + b->l[i] * sb;
        a->m[i] = m;
    }
}

static size_t row_bytes(const kvs_head_view_t *v) {
    return (size_t)v->d * kvs_dtype_size(v->dtype);
}

/* Touch up to 16 KiB of rows so the hardware has them when needed. */
static inline void prefetch_rows(const void *p, uint32_t n, size_t rb) {
    size_t bytes = (size_t)n * rb;
    if (bytes > 16384)
        bytes = 16384;
    for (size_t o = 0; o < bytes; o += 64)
        __builtin_prefetch((const char *)p + o);
}

/*
 * Score every block into s->scores ([g][cols]), mask steady members of
 * cluster blocks when `mask_steady`, then fold the rows into partial `p`
 * (which must be fresh).
 */
static void zone_partial(const kvs_head_view_t *v, const float *q, uint32_t g,
                         float scale, kvs_scratch_t *s, const block_t *blocks,
                         size_t nb, uint32_t cols, int mask_steady,
                         partial_t *p) {
    if (cols == 0)
        return;
    float *S = s->scores;
    size_t rb = row_bytes(v);
    for (size_t b = 0; b < nb; b++) {
        const block_t *bk = &blocks[b];
        /* Cluster blocks are scattered: start the next one's keys on their
         * way while this one is scored. */
        if (b + 1 < nb)
            prefetch_rows(blocks[b + 1].keys, blocks[b + 1].n, rb);
        kvs_dot_rows(v->dtype, q, g, bk->keys, bk->n, v->d, scale, S + bk->col,
                     cols);
        if (mask_steady && bk->seg) {
            for (uint32_t r = 0; r < bk->n; r++) {
                uint64_t pos =
                    bk->seg->first_pos + bk->seg->positions[bk->slot0 + r];
                if (kvs_head_is_steady(v, pos))
                    for (uint32_t i = 0; i < g; i++)
                        S[(size_t)i * cols + bk->col + r] = -INFINITY;
            }
        }
    }
    for (uint32_t i = 0; i < g; i++) {
        float *row = S + (size_t)i * cols;
        p->m[i] = kvs_max(row, cols);
        p->l[i] = kvs_exp_sum(row, cols, p->m[i]);
    }
    if (nb)
        prefetch_rows(blocks[0].vals, blocks[0].n, rb);
    for (size_t b = 0; b < nb; b++) {
        const block_t *bk = &blocks[b];
        if (b + 1 < nb)
            prefetch_rows(blocks[b + 1].vals, blocks[b + 1].n, rb);
        kvs_axpy_rows(v->dtype, S + bk->col, cols, g, bk->vals, bk->n, v->d,
                      p->acc);
    }
}

static void partial_finish(const partial_t *p, float *out) {
    for (uint32_t i = 0; i < p->g; i++) {
        float inv = p->l[i] > 0 ? 1.0f / p->l[i] : 0.0f;
        for (uint32_t t = 0; t < p->d; t++)
            out[(size_t)i * p->d + t] = p->acc[(size_t)i * p->d + t] * inv;
    }
}

static int push_block(kvs_scratch_t *s, size_t *nb, block_t b) {
    if (GROW(s, blocks, blocks_cap, *nb + 1))
        return KVS_ENOMEM;
    s->blocks[(*nb)++] = b;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Exact                                                                  */

/* Walk every row in chunks; fn(ctx, keys, vals, n, seg, slot0, pos0) gets
 * each contiguous run. Returns the first non-zero fn result. */
typedef int (*rows_fn)(void *ctx, const void *keys, const void *vals,
                       uint32_t n, const kvs_segment_t *seg, uint32_t slot0,
                       uint64_t pos0);

static int for_each_chunk(const kvs_head_view_t *v, rows_fn fn, void *ctx) {
    size_t rb = row_bytes(v);
    for (uint32_t si = 0; si < v->n_segments; si++) {
        const kvs_segment_t *seg = v->segments[si];
        for (uint32_t r = 0; r < seg->n_tokens; r += EXACT_CHUNK) {
            uint32_t n = seg->n_tokens - r < EXACT_CHUNK ? seg->n_tokens - r
                                                         : EXACT_CHUNK;
            int rc = fn(ctx, (const char *)seg->keys + r * rb,
                        (const char *)seg->values + r * rb, n, seg, r, 0);
            if (rc)
                return rc;
        }
    }
    for (uint32_t r = 0; r < v->tail_tokens; r += EXACT_CHUNK) {
        uint32_t n =
            v->tail_tokens - r < EXACT_CHUNK ? v->tail_tokens - r : EXACT_CHUNK;
        int rc = fn(ctx, (const char *)v->tail_keys + r * rb,
                    (const char *)v->tail_values + r * rb, n, NULL, 0,
                    v->indexed_tokens + r);
        if (rc)
            return rc;
    }
    return 0;
}

typedef struct exact_ctx_s {
    const kvs_head_view_t *v;
    const float *q;
    uint32_t g;
    float scale;
    kvs_scratch_t *s;
    partial_t *run;
    partial_t *tmp;
} exact_ctx_t;

static int exact_chunk(void *arg, const void *keys, const void *vals,
                       uint32_t n, const kvs_segment_t *seg, uint32_t slot0,
                       uint64_t pos0) {
    (void)seg, (void)slot0, (void)pos0;
    exact_ctx_t *c = arg;
    block_t b = {.keys = keys, .vals = vals, .n = n, .col = 0};
    partial_init(c->tmp, c->g, c->v->d, c->tmp->acc);
    zone_partial(c->v, c->q, c->g, c->scale, c->s, &b, 1, n, 0, c->tmp);
    partial_merge(c->run, c->tmp);
    return 0;
}

/* Precise exact mode: scores, softmax sums and the weighted value sums in
 * double, so the reference differs from true attention by rounding of the
 * final result only (an fp32 pass differs by far more on long contexts). */
typedef struct precise_ctx_s {
    const kvs_head_view_t *v;
    const float *q;
    uint32_t g;
    double scale;
    double m[MAXQ], l[MAXQ];
    double *acc;    /* [g][d] */
    double *sc;     /* [g][EXACT_CHUNK] */
    float *kf, *vf; /* [EXACT_CHUNK][d] */
} precise_ctx_t;

static int precise_chunk(void *arg, const void *keys, const void *vals,
                         uint32_t n, const kvs_segment_t *seg, uint32_t slot0,
                         uint64_t pos0) {
    (void)seg, (void)slot0, (void)pos0;
    precise_ctx_t *c = arg;
    uint32_t d = c->v->d;
    kvs_to_f32(c->v->dtype, keys, c->kf, (size_t)n * d);
    kvs_to_f32(c->v->dtype, vals, c->vf, (size_t)n * d);
    for (uint32_t i = 0; i < c->g; i++) {
        const float *q = c->q + (size_t)i * d;
        double *sc = c->sc + (size_t)i * EXACT_CHUNK, mx = -INFINITY;
        for (uint32_t j = 0; j < n; j++) {
            const float *k = c->kf + (size_t)j * d;
            double x = 0;
            for (uint32_t t = 0; t < d; t++)
                x += (double)q[t] * k[t];
            sc[j] = x * c->scale;
            if (sc[j] > mx)
                mx = sc[j];
        }
        double *acc = c->acc + (size_t)i * d;
        if (mx > c->m[i]) {
            double r = c->l[i] > 0 ? exp(c->m[i] - mx) : 0;
            for (uint32_t t = 0; t < d; t++)
                acc[t] *= r;
            c->l[i] *= r;
            c->m[i] = mx;
        }
        for (uint32_t j = 0; j < n; j++) {
            double w = exp(sc[j] - c->m[i]);
            const float *val = c->vf + (size_t)j * d;
            c->l[i] += w;
            for (uint32_t t = 0; t < d; t++)
                acc[t] += w * val[t];
        }
    }
    return 0;
}

static int precise_attend(const kvs_head_view_t *v, const float *q, uint32_t g,
                          double scale, kvs_scratch_t *s, float *out) {
    uint32_t d = v->d;
    size_t need = sizeof(double) * ((size_t)g * d + (size_t)g * EXACT_CHUNK) +
                  sizeof(float) * 2 * (size_t)EXACT_CHUNK * d;
    if (grow((void **)&s->pbuf, &s->pbuf_cap, need, 1))
        return KVS_ENOMEM;
    precise_ctx_t c = {.v = v, .q = q, .g = g, .scale = scale};
    c.acc = (double *)s->pbuf;
    c.sc = c.acc + (size_t)g * d;
    c.kf = (float *)(c.sc + (size_t)g * EXACT_CHUNK);
    c.vf = c.kf + (size_t)EXACT_CHUNK * d;
    memset(c.acc, 0, sizeof(double) * g * d);
    for (uint32_t i = 0; i < g; i++) {
        c.m[i] = -INFINITY;
        c.l[i] = 0;
    }
    for_each_chunk(v, precise_chunk, &c);
    for (uint32_t i = 0; i < g; i++)
        for (uint32_t t = 0; t < d; t++)
            out[(size_t)i * d + t] =
                c.l[i] > 0 ? (float)(c.acc[(size_t)i * d + t] / c.l[i]) : 0;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Cluster selection                                                      */

/* Reorder idx[0..n) so that its first k entries have the largest key[]
 * (in no particular order). Quickselect, expected O(n). */
static void select_top(const float *key, uint32_t *idx, uint32_t n,
                       uint32_t k) {
    uint32_t lo = 0, hi = n;
    while (k > lo && k < hi && hi - lo > 1) {
        float pivot = key[idx[lo + (hi - lo) / 2]];
        uint32_t i = lo, j = lo, e = hi;
        /* Three-way partition: > pivot | == pivot | < pivot. */
        while (j < e) {
            float x = key[idx[j]];
            if (x > pivot) {
                uint32_t t = idx[i];
                idx[i++] = idx[j];
                idx[j++] = t;
            } else if (x < pivot) {
                uint32_t t = idx[--e];
                idx[e] = idx[j];
                idx[j] = t;
            } else {
                j++;
            }
        }
        if (k <= i)
            hi = i;
        else if (k >= e)
            lo = e;
        else
            return;
    }
}

/* qsort has no context argument in C11; a thread-local key keeps the
 * comparator reentrant across worker threads. */
static _Thread_local const float *tl_sort_key;
static int cmp_desc_tl(const void *a, const void *b) {
    float x = tl_sort_key[*(const uint32_t *)a];
    float y = tl_sort_key[*(const uint32_t *)b];
    return (x < y) - (x > y);
}

static void sort_desc(const float *key, uint32_t *idx, uint32_t n) {
    tl_sort_key = key;
    qsort(idx, n, sizeof(uint32_t), cmp_desc_tl);
}

/* Global cluster index -> (segment, local cluster). */
static uint32_t seg_of(const uint32_t *cbase, uint32_t nseg, uint32_t c) {
    uint32_t lo = 0, hi = nseg;
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (cbase[mid] <= c)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* kvs_segment_cluster_view without the call and the cold flags array for
 * segments that adjust no cluster (all but the few holding steady
 * positions): count and value mean straight from the segment. */
static inline uint32_t cluster_view(const kvs_segment_t *seg, uint32_t c,
                                    int is_last, const void **mean) {
    if (seg->adj_always.n || (is_last && seg->adj_last.n))
        return kvs_segment_cluster_view(seg, c, is_last, mean);
    *mean = (const char *)seg->value_means +
            (size_t)c * seg->d * kvs_dtype_size(seg->dtype);
    return seg->counts[c];
}

/* ln(n) for cluster counts: a table below 256, logf above. */
static float log_table[256];
static pthread_once_t log_table_once = PTHREAD_ONCE_INIT;
static void log_table_init(void) {
    log_table[0] = -INFINITY;
    for (uint32_t i = 1; i < 256; i++)
        log_table[i] = logf((float)i);
}
static float log_count(uint32_t n) {
    if (n >= 256)
        return logf((float)n);
    pthread_once(&log_table_once, log_table_init);
    return log_table[n];
}

/* ---------------------------------------------------------------------- */
/* Steady zone                                                            */

/* Blocks for the steady zone: sink and window slots found in the segments
 * that hold them, then the tail in chunks. */
static int steady_blocks(const kvs_head_view_t *v, kvs_scratch_t *s, size_t *nb,
                         uint32_t *cols) {
    size_t rb = row_bytes(v);
    for (uint32_t si = 0; si < v->n_segments; si++) {
        const kvs_segment_t *seg = v->segments[si];
        uint64_t end = seg->first_pos + seg->n_tokens;
        int has_sink = seg->first_pos < v->sink_tokens;
        int has_window = end + v->window_tokens > v->indexed_tokens;
        if (!has_sink && !has_window)
            continue;
        for (uint32_t slot = 0; slot < seg->n_tokens; slot++) {
            uint64_t pos = seg->first_pos + seg->positions[slot];
            if (!kvs_head_is_steady(v, pos))
                continue;
            block_t b = {.keys = (const char *)seg->keys + slot * rb,
                         .vals = (const char *)seg->values + slot * rb,
                         .n = 1,
                         .col = *cols,
                         .seg = seg,
                         .slot0 = slot};
            if (push_block(s, nb, b))
                return KVS_ENOMEM;
            *cols += 1;
        }
    }
    if (v->tail_tokens) {
        block_t b = {.keys = v->tail_keys,
                     .vals = v->tail_values,
                     .n = v->tail_tokens,
                     .col = *cols};
        if (push_block(s, nb, b))
            return KVS_ENOMEM;
        *cols += v->tail_tokens;
    }
    return 0;
}

/* Score every cluster centroid of every segment: s->cscore [g][C] (with
 * `score` 0 only the room and the cluster bases: the codes path scores
 * the 8-bit centroid codes in code_weights). */
static int score_clusters(const kvs_head_view_t *v, const float *q, uint32_t g,
                          float scale, int score, kvs_scratch_t *s,
                          uint32_t *C_out) {
    if (GROW(s, cbase, cbase_cap, v->n_segments + 1))
        return KVS_ENOMEM;
    uint32_t C = 0;
    for (uint32_t si = 0; si < v->n_segments; si++) {
        s->cbase[si] = C;
        C += v->segments[si]->n_clusters;
    }
    s->cbase[v->n_segments] = C;
    if (GROW(s, cscore, cscore_cap, (size_t)g * C) ||
        GROW(s, rank, rank_cap, C) || GROW(s, idx, idx_cap, C))
        return KVS_ENOMEM;
    const uint32_t nseg = v->n_segments;
    for (uint32_t si = 0; si < nseg && score; si++) {
        if (si + 4 < nseg) /* cold metadata: see code_weights */
            __builtin_prefetch(v->segments[si + 4]);
        if (si + 2 < nseg) {
            const kvs_segment_t *n2 = v->segments[si + 2];
            prefetch_rows(n2->centroids, n2->n_clusters, row_bytes(v) / 4);
        }
        const kvs_segment_t *seg = v->segments[si];
        kvs_dot_rows(v->dtype, q, g, seg->centroids, seg->n_clusters, v->d,
                     scale, s->cscore + s->cbase[si], C);
    }
    *C_out = C;
    return 0;
}

/*
 * rank[c] = sum over the group of softmax_c(cscore[i][c]) (the softmax over
 * all clusters); clusters whose view holds no member (every member steady)
 * rank -1, below all others, and are not counted in *n_valid: retrieving
 * them would attend nothing. The GPU select (kernels/cuda/score.cu) uses
 * the same rule.
 */
static int rank_clusters(const kvs_head_view_t *v, kvs_scratch_t *s, uint32_t g,
                         uint32_t C, int softmax, uint32_t *n_valid) {
    if (GROW(s, tmpc, tmpc_cap, C))
        return KVS_ENOMEM;
    memset(s->rank, 0, C * sizeof(float));
    for (uint32_t i = 0; i < g && softmax; i++) {
        memcpy(s->tmpc, s->cscore + (size_t)i * C, C * sizeof(float));
        float z = kvs_exp_sum(s->tmpc, C, kvs_max(s->tmpc, C));
        float inv = 1.0f / z;
        for (uint32_t c = 0; c < C; c++)
            s->rank[c] += s->tmpc[c] * inv;
    }
    uint32_t valid = C;
    for (uint32_t si = 0; si < v->n_segments; si++) {
        const kvs_segment_t *seg = v->segments[si];
        if (!seg->adj_always.n && !(si + 1 == v->n_segments && seg->adj_last.n))
            continue; /* no adjusted cluster: every count is > 0 */
        for (uint32_t c = 0; c < seg->n_clusters; c++) {
            const void *mean;
            if (kvs_segment_cluster_view(seg, c, si + 1 == v->n_segments,
                                         &mean) == 0) {
                s->rank[s->cbase[si] + c] = -1.0f;
                valid--;
            }
        }
    }
    *n_valid = valid;
    return 0;
}

/*
 * Bounded mode: the smallest retrieval prefix of the clusters (ranked, in
 * s->idx, sorted here) such that for every query head the estimated mass
 * outside steady + retrieval is below epsilon of the estimated total.
 * Cluster mass is estimated as count * exp(q.c * scale).
 */
static uint32_t bounded_count(const kvs_head_view_t *v, kvs_scratch_t *s,
                              uint32_t g, uint32_t C, const partial_t *steady,
                              float epsilon) {
    sort_desc(s->rank, s->idx, C);
    double total[MAXQ], left[MAXQ];
    float ref[MAXQ];
    for (uint32_t i = 0; i < g; i++) {
        const float *row = s->cscore + (size_t)i * C;
        ref[i] = kvs_max(row, C);
        if (steady->l[i] > 0 && steady->m[i] > ref[i])
            ref[i] = steady->m[i];
        total[i] = steady->l[i] > 0
                       ? steady->l[i] * exp((double)steady->m[i] - ref[i])
                       : 0;
        left[i] = 0;
    }
    /* Per-cluster counts: a cluster's view may exclude steady members. */
    for (uint32_t c = 0; c < C; c++) {
        uint32_t si = seg_of(s->cbase, v->n_segments, c);
        const kvs_segment_t *seg = v->segments[si];
        const void *mean;
        uint32_t cnt = kvs_segment_cluster_view(seg, c - s->cbase[si],
                                                si + 1 == v->n_segments, &mean);
        for (uint32_t i = 0; i < g; i++) {
            double w = cnt * exp((double)s->cscore[(size_t)i * C + c] - ref[i]);
            total[i] += w;
            left[i] += w;
        }
    }
    uint32_t r = 0;
    for (;;) {
        int ok = 1;
        for (uint32_t i = 0; i < g; i++)
            if (left[i] > epsilon * total[i])
                ok = 0;
        if (ok || r == C)
            return r;
        uint32_t c = s->idx[r++];
        uint32_t si = seg_of(s->cbase, v->n_segments, c);
        const void *mean;
        uint32_t cnt = kvs_segment_cluster_view(
            v->segments[si], c - s->cbase[si], si + 1 == v->n_segments, &mean);
        for (uint32_t i = 0; i < g; i++)
            left[i] -= cnt * exp((double)s->cscore[(size_t)i * C + c] - ref[i]);
    }
}

/* ---------------------------------------------------------------------- */
/* Attention                                                              */

/* The spread weight alpha of the codes attend's scan order (scan_rank). */
static float scan_alpha(const kvs_rank_params_t *rp) {
    return rp->spread == 0  ? KVS_SPREAD_ATTEND_DEFAULT
           : rp->spread < 0 ? 0.0f
                            : rp->spread;
}

/* The codes paths (defined with search, below). */
static int code_weights(const kvs_head_view_t *v, const float *q, uint32_t g,
                        float scale, kvs_scratch_t *s);
static int use_codes(const kvs_head_view_t *v, const kvs_zone_params_t *zp,
                     const kvs_rank_params_t *rp, int *yes);
/* The order in which codes_attend scans clusters: s->rank[c] = the sum
 * over the group of softmax_c(q.c s + alpha s |q| spread_c), clusters
 * without members left (rank < 0) kept last. The scan stops after M keys,
 * so a key far above its centroid is found only if its cluster is
 * scanned: the spread term moves wide clusters forward, by alpha standard
 * deviations of q.(k - c) (search ranks the same way). By centroid score
 * alone (alpha 0) the one key holding half of a late tinycode128 head's
 * attention sat in a cluster ranked past the scan. */
static int scan_rank(const kvs_head_view_t *v, const float *q, uint32_t g,
                     const kvs_rank_params_t *rp, float scale, kvs_scratch_t *s,
                     uint32_t C) {
    float alpha = scan_alpha(rp);
    if (alpha == 0)
        return 0;
    if (GROW(s, tmpc, tmpc_cap, C))
        return KVS_ENOMEM;
    const uint32_t d = v->d, nseg = v->n_segments;
    for (uint32_t c = 0; c < C; c++)
        if (s->rank[c] >= 0)
            s->rank[c] = 0;
    for (uint32_t i = 0; i < g; i++) {
        const float *qi = q + (size_t)i * d;
        double qq = 0;
        for (uint32_t j = 0; j < d; j++)
            qq += (double)qi[j] * qi[j];
        const float a = alpha * scale * (float)sqrt(qq);
        const float *cs = s->cscore + (size_t)i * C;
        for (uint32_t si = 0; si < nseg; si++) {
            if (i == 0 && si + 4 < nseg) /* cold: see code_weights */
                __builtin_prefetch(v->segments[si + 4]->codes->spread);
            const kvs_segment_t *seg = v->segments[si];
            const float *sp = seg->codes->spread;
            for (uint32_t c = 0, b = s->cbase[si]; c < seg->n_clusters; c++)
                s->tmpc[b + c] = cs[b + c] + a * sp[c];
        }
        float z = kvs_exp_sum(s->tmpc, C, kvs_max(s->tmpc, C));
        float inv = 1.0f / z;
        for (uint32_t c = 0; c < C; c++)
            if (s->rank[c] >= 0)
                s->rank[c] += s->tmpc[c] * inv;
    }
    return 0;
}

static int codes_attend(const kvs_head_view_t *v, const float *q, uint32_t g,
                        const kvs_zone_params_t *zp,
                        const kvs_rank_params_t *rp, kvs_scratch_t *s,
                        uint32_t C, partial_t *run, partial_t *tmp,
                        kvs_zone_stats_t *st);

int kvs_head_attend(const kvs_head_view_t *v, const float *q, uint32_t g,
                    const kvs_zone_params_t *zp, kvs_scratch_t *s, float *out,
                    kvs_zone_stats_t *stats) {
    return kvs_head_attend_ranked(v, q, g, zp, NULL, s, out, stats);
}

int kvs_head_attend_ranked(const kvs_head_view_t *v, const float *q, uint32_t g,
                           const kvs_zone_params_t *zp,
                           const kvs_rank_params_t *rpp, kvs_scratch_t *s,
                           float *out, kvs_zone_stats_t *stats) {
    if (g == 0 || !v || !q || !zp || !s || !out)
        return KVS_EINVAL;
    if (g > MAXQ) {
        /* More query heads than the kernels take at once (multi-query
         * attention: Falcon-7B has 71 per KV head): groups of MAXQ, each
         * ranked for itself, each counted in stats as a head. */
        for (uint32_t i0 = 0; i0 < g; i0 += MAXQ) {
            uint32_t n = g - i0 < MAXQ ? g - i0 : MAXQ;
            size_t off = (size_t)i0 * v->d;
            int rc = kvs_head_attend_ranked(v, q + off, n, zp, rpp, s,
                                            out + off, stats);
            if (rc)
                return rc;
        }
        return 0;
    }
    const kvs_rank_params_t rp0 = {0}, *rp = rpp ? rpp : &rp0;
    uint64_t total = v->indexed_tokens + v->tail_tokens;
    if (total == 0)
        return KVS_EINVAL;
    size_t dd = (size_t)g * v->d;
    if (GROW(s, acc, acc_cap, 3 * dd))
        return KVS_ENOMEM;
    partial_t run, tmp;
    partial_init(&run, g, v->d, s->acc);
    partial_init(&tmp, g, v->d, s->acc + dd);
    kvs_zone_stats_t st = {0};
    st.keys_total = total;

    if (zp->exact || v->n_segments == 0) {
        if (zp->exact && zp->precise) {
            double sc64 = zp->scale_f64 > 0 ? zp->scale_f64 : zp->scale;
            int prc = precise_attend(v, q, g, sc64, s, out);
            if (prc)
                return prc;
        } else {
            if (GROW(s, scores, scores_cap, (size_t)g * EXACT_CHUNK))
                return KVS_ENOMEM;
            exact_ctx_t ctx = {v, q, g, zp->scale, s, &run, &tmp};
            for_each_chunk(v, exact_chunk, &ctx);
            partial_finish(&run, out);
        }
        st.keys_exact = total;
        st.keys_steady = zp->exact ? 0 : total;
        for (uint32_t si = 0; si < v->n_segments; si++)
            st.clusters_total += v->segments[si]->n_clusters;
        st.clusters_retrieved = zp->exact ? st.clusters_total : 0;
        goto done;
    }

    /* Steady zone. */
    size_t nb = 0;
    uint32_t cols = 0;
    int rc = steady_blocks(v, s, &nb, &cols);
    if (rc)
        return rc;
    if (GROW(s, scores, scores_cap, (size_t)g * cols))
        return KVS_ENOMEM;
    zone_partial(v, q, g, zp->scale, s, s->blocks, nb, cols, 0, &run);
    st.keys_steady = cols;

    /* Rank the clusters. */
    uint32_t C, n_valid;
    int codes;
    if ((rc = use_codes(v, zp, rp, &codes)))
        return rc;
    if ((rc = score_clusters(v, q, g, zp->scale, !codes, s, &C)))
        return rc;
    if (codes && (rc = code_weights(v, q, g, zp->scale, s)))
        return rc;
    /* the codes path ranks again with the spread term (scan_rank): only
     * the clusters without members are needed from here */
    if ((rc = rank_clusters(v, s, g, C, !codes || scan_alpha(rp) == 0,
                            &n_valid)))
        return rc;
    if (codes) {
        if ((rc = codes_attend(v, q, g, zp, rp, s, C, &run, &tmp, &st)))
            return rc;
        partial_finish(&run, out);
        goto done;
    }
    for (uint32_t c = 0; c < C; c++)
        s->idx[c] = c;
    uint32_t R, E;
    if (zp->bounded) {
        R = bounded_count(v, s, g, C, &run, zp->epsilon);
        E = kvs_zone_clusters(zp->estimation_fraction, C);
        if (E > C - R)
            E = C - R;
    } else {
        kvs_zone_sizes(zp->retrieval_fraction, zp->estimation_fraction, C,
                       n_valid, &R, &E);
        select_top(s->rank, s->idx, C, R + E);
        select_top(s->rank, s->idx, R + E, R);
    }

    /* Retrieval zone: members of the top R clusters, steady ones masked. */
    size_t rb = row_bytes(v);
    nb = 0;
    cols = 0;
    uint64_t retrieved_rows = 0;
    for (uint32_t r = 0; r < R; r++) {
        uint32_t c = s->idx[r];
        uint32_t si = seg_of(s->cbase, v->n_segments, c);
        const kvs_segment_t *seg = v->segments[si];
        uint32_t lc = c - s->cbase[si];
        uint32_t a = seg->offsets[lc], n = seg->offsets[lc + 1] - a;
        block_t b = {.keys = (const char *)seg->keys + a * rb,
                     .vals = (const char *)seg->values + a * rb,
                     .n = n,
                     .col = cols,
                     .seg = seg,
                     .slot0 = a};
        if (push_block(s, &nb, b))
            return KVS_ENOMEM;
        cols += n;
        const void *mean;
        retrieved_rows += cluster_view(seg, lc, si + 1 == v->n_segments, &mean);
    }
    if (cols) {
        if (GROW(s, scores, scores_cap, (size_t)g * cols))
            return KVS_ENOMEM;
        partial_init(&tmp, g, v->d, tmp.acc);
        zone_partial(v, q, g, zp->scale, s, s->blocks, nb, cols, 1, &tmp);
        partial_merge(&run, &tmp);
    }

    /* Estimation zone: one pseudo-token per cluster, score q.c*scale +
     * log(count), value the cluster's value mean, read where it lies (one
     * weighted-sum pass over the means' addresses). */
    if (GROW(s, rows, rows_cap, E ? E : 1) ||
        GROW(s, scores, scores_cap, (size_t)g * (E ? E : 1)))
        return KVS_ENOMEM;
    cols = 0;
    float *S = s->scores;
    for (uint32_t e = R; e < R + E; e++) {
        uint32_t c = s->idx[e];
        uint32_t si = seg_of(s->cbase, v->n_segments, c);
        const void *mean;
        uint32_t cnt = cluster_view(v->segments[si], c - s->cbase[si],
                                    si + 1 == v->n_segments, &mean);
        if (cnt == 0)
            continue;
        s->rows[cols] = mean;
        float lc = log_count(cnt);
        for (uint32_t i = 0; i < g; i++)
            S[(size_t)i * E + cols] = s->cscore[(size_t)i * C + c] + lc;
        cols++;
    }
    if (cols) {
        partial_init(&tmp, g, v->d, tmp.acc);
        for (uint32_t i = 0; i < g; i++) {
            float *row = S + (size_t)i * E;
            tmp.m[i] = kvs_max(row, cols);
            tmp.l[i] = kvs_exp_sum(row, cols, tmp.m[i]);
        }
        kvs_axpy_gather(v->dtype, S, E, g, s->rows, cols, v->d, tmp.acc);
        partial_merge(&run, &tmp);
    }
    partial_finish(&run, out);

    st.keys_exact = st.keys_steady + retrieved_rows;
    st.clusters_total = C;
    st.clusters_retrieved = R;
    st.clusters_estimated = E;
    st.clusters_skipped = C - R - E;
done:
    if (stats)
        kvs_zone_stats_add(stats, &st);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Search                                                                 */

/* A min-heap of the best k (score, position) pairs seen so far. */
typedef struct topk_s {
    float *score;
    int64_t *pos;
    uint32_t n, k;
} topk_t;

/* Put (sc, pos) at the root's place and sift it down to restore the heap
 * over h->n entries. */
static void sift_down(topk_t *h, float sc, int64_t pos) {
    uint32_t i = 0;
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        float ms = sc;
        if (l < h->n && h->score[l] < ms)
            m = l, ms = h->score[l];
        if (r < h->n && h->score[r] < ms)
            m = r;
        if (m == i)
            break;
        h->score[i] = h->score[m];
        h->pos[i] = h->pos[m];
        i = m;
    }
    h->score[i] = sc;
    h->pos[i] = pos;
}

static void topk_push(topk_t *h, float sc, int64_t pos) {
    if (h->n < h->k) {
        uint32_t i = h->n++;
        while (i > 0) {
            uint32_t p = (i - 1) / 2;
            if (h->score[p] <= sc)
                break;
            h->score[i] = h->score[p];
            h->pos[i] = h->pos[p];
            i = p;
        }
        h->score[i] = sc;
        h->pos[i] = pos;
        return;
    }
    if (sc <= h->score[0])
        return;
    sift_down(h, sc, pos);
}

/* Pop everything out best first into positions/scores[k]. */
static void topk_drain(topk_t *h, int64_t *positions, float *scores) {
    for (uint32_t j = h->n; j < h->k; j++) {
        positions[j] = -1;
        scores[j] = -INFINITY;
    }
    while (h->n > 0) {
        uint32_t last = --h->n;
        positions[last] = h->pos[0];
        scores[last] = h->score[0];
        if (h->n > 0)
            sift_down(h, h->score[last], h->pos[last]);
    }
}

typedef struct search_ctx_s {
    const kvs_head_view_t *v;
    const float *q; /* [nq][d]: the queries scored together */
    uint32_t nq;
    kvs_scratch_t *s;
    topk_t *h; /* [nq] heaps, one per query */
    int mask_steady;
    uint64_t scanned; /* (query, key) pairs scored */
    uint64_t bytes;   /* bytes read, summed over the queries */
} search_ctx_t;

static int search_rows(void *arg, const void *keys, const void *vals,
                       uint32_t n, const kvs_segment_t *seg, uint32_t slot0,
                       uint64_t pos0) {
    (void)vals;
    search_ctx_t *c = arg;
    float *S = c->s->scores;
    kvs_dot_rows(c->v->dtype, c->q, c->nq, keys, n, c->v->d, 1.0f, S, n);
    /* Every row of the block is read, masked or not; a segment row also
     * reads its position. */
    c->bytes += (uint64_t)c->nq * n * (row_bytes(c->v) + (seg ? 4 : 0));
    for (uint32_t r = 0; r < n; r++) {
        uint64_t pos =
            seg ? seg->first_pos + seg->positions[slot0 + r] : pos0 + r;
        if (c->mask_steady && seg && kvs_head_is_steady(c->v, pos))
            continue;
        c->scanned += c->nq;
        for (uint32_t i = 0; i < c->nq; i++)
            topk_push(&c->h[i], S[(size_t)i * n + r], (int64_t)pos);
    }
    return 0;
}

/* s->idx[0 .. C) = 0 .. C - 1 ordered by key descending, ties by index
 * (the same order on every libc). A stable LSD radix sort of (key, index)
 * pairs: C log C comparisons through a thread-local key cost a tenth of a
 * codes attend. Keys are compared as floats (-0 == +0; no NaN). */
static int sort_rank_desc(kvs_scratch_t *s, const float *key, uint32_t C) {
    if (GROW(s, rsort, rsort_cap, 2 * (size_t)(C ? C : 1)))
        return KVS_ENOMEM;
    uint64_t *a = s->rsort, *b = s->rsort + C;
    for (uint32_t c = 0; c < C; c++) {
        float f = key[c] == 0 ? 0.0f : key[c];
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        u = u >> 31 ? ~u : u | 0x80000000u; /* ascending with f */
        a[c] = (uint64_t)~u << 32 | c;      /* ascending: f descending */
    }
    for (uint32_t shift = 32; shift < 64 && C; shift += 8) {
        uint32_t count[257] = {0};
        for (uint32_t c = 0; c < C; c++)
            count[((a[c] >> shift) & 255) + 1]++;
        if (count[((a[0] >> shift) & 255) + 1] == C)
            continue; /* one bucket: the pass would not move anything */
        for (uint32_t i = 0; i < 256; i++)
            count[i + 1] += count[i];
        for (uint32_t c = 0; c < C; c++)
            b[count[(a[c] >> shift) & 255]++] = a[c];
        uint64_t *t = a;
        a = b;
        b = t;
    }
    for (uint32_t c = 0; c < C; c++)
        s->idx[c] = (uint32_t)a[c];
    return 0;
}

/* The codes paths serve a view only when every segment has codes. */
static int view_has_codes(const kvs_head_view_t *v) {
    for (uint32_t si = 0; si < v->n_segments; si++)
        if (!v->segments[si]->codes)
            return 0;
    return v->n_segments > 0;
}

/* Whether a call takes the codes path (KVS_EINVAL: asked for codes the
 * view does not have). By default search and attention both do where they
 * can: at equal keys read in full, codes cut attention error ~3.5x at 8K
 * (bench/accuracy/RESULTS.md). The bounded budget is judged on centroid
 * mass: it keeps the centroid path unless codes are asked for by name. */
static int use_codes(const kvs_head_view_t *v, const kvs_zone_params_t *zp,
                     const kvs_rank_params_t *rp, int *yes) {
    *yes = 0;
    if (rp->rank == KVS_RANK_CODES) {
        if (!view_has_codes(v))
            return KVS_EINVAL;
        *yes = 1;
    } else if (rp->rank == KVS_RANK_DEFAULT && !zp->bounded) {
        *yes = view_has_codes(v);
    }
    return 0;
}

/* R (keys read in full beyond the steady zone) and M (keys scored by code)
 * for a call: R = ceil(retrieval_fraction x budget_scale x indexed),
 * M = code_ratio x R. */
static void codes_budget(const kvs_head_view_t *v, const kvs_zone_params_t *zp,
                         const kvs_rank_params_t *rp, uint32_t *R,
                         uint64_t *M) {
    double f = (double)zp->retrieval_fraction;
    if (rp->budget_scale > 0)
        f *= rp->budget_scale;
    uint64_t r = (uint64_t)ceil(f * (double)v->indexed_tokens);
    float ratio = rp->code_ratio > 0 ? rp->code_ratio : KVS_CODE_RATIO_DEFAULT;
    *M = (uint64_t)ceil((double)ratio * (double)r);
    *R = r > v->indexed_tokens ? (uint32_t)v->indexed_tokens : (uint32_t)r;
}

/* Per segment and query: 4-bit code weights Rq x step x scale rounded to
 * int8 (kvs_code4_weights_q8) into s->cq8 ([nseg][g][dc]), their scales
 * and the biases scale Rq.lo into s->cq ([nseg][2][g]), so a code scan
 * gives scaled scores directly; and every cluster's score, from its 8-bit
 * centroid code (int16 weights Rq x cstep x scale), into s->cscore
 * ([g][C], after score_clusters made the room): half the bytes of bf16
 * centroids, the 32K dump's error unchanged (median 0.5775% vs 0.577%).
 * Rq is computed once per rotation seed met in a row (one for all
 * segments built since KVS_CODES_SEED; older ones each have their own)
 * into s->rq. */
static int code_weights(const kvs_head_view_t *v, const float *q, uint32_t g,
                        float scale, kvs_scratch_t *s) {
    /* d: the codes' dims (kvs_codes_dim), v->d the query's */
    const uint32_t d = kvs_codes_dim(v->d), nseg = v->n_segments,
                   C = s->cbase[nseg];
    if (GROW(s, cq8, cq8_cap, (size_t)nseg * g * d) ||
        GROW(s, cq, cq_cap, (size_t)nseg * 2 * g) ||
        GROW(s, rq, rq_cap, (size_t)g * d) ||
        GROW(s, cq16, cq16_cap, (size_t)g * d))
        return KVS_ENOMEM;
    for (uint32_t si = 0; si < nseg; si++) {
        /* Each segment's metadata is its own few allocations, cold after
         * the last attend's K/V reads: fetch them a few segments ahead. */
        if (si + 8 < nseg)
            __builtin_prefetch(v->segments[si + 8]);
        if (si + 4 < nseg)
            __builtin_prefetch(v->segments[si + 4]->codes);
        if (si + 2 < nseg) {
            const kvs_segment_t *g2 = v->segments[si + 2];
            const kvs_codes_t *n2 = g2->codes;
            for (uint32_t j = 0; j < d; j += 16) {
                __builtin_prefetch(n2->step + j);
                __builtin_prefetch(n2->lo + j);
                __builtin_prefetch(n2->cstep + j);
                __builtin_prefetch(n2->clo + j);
            }
            prefetch_rows(n2->centroids, g2->n_clusters, d);
        }
        const kvs_segment_t *seg = v->segments[si];
        const kvs_codes_t *k = seg->codes;
        int again = si > 0 && v->segments[si - 1]->codes->seed == k->seed;
        for (uint32_t i = 0; i < g && !again; i++)
            kvs_codes_rotate(k, v->d, q + (size_t)i * v->d,
                             s->rq + (size_t)i * d);
        float *sb = s->cq + (size_t)si * 2 * g; /* [scales g][biases g] */
        float csb[2 * MAXQ];                    /* the same for centroids */
        kvs_dot_rows(KVS_DTYPE_F32, s->rq, g, k->lo, 1, d, scale, sb + g, 1);
        kvs_dot_rows(KVS_DTYPE_F32, s->rq, g, k->clo, 1, d, scale, csb + g, 1);
        for (uint32_t i = 0; i < g; i++) {
            kvs_code4_weights_q8(s->rq + (size_t)i * d, k->step, scale, d,
                                 s->cq8 + ((size_t)si * g + i) * d, &sb[i]);
            kvs_code8_weights_q16(s->rq + (size_t)i * d, k->cstep, scale, d,
                                  s->cq16 + (size_t)i * d, &csb[i]);
        }
        kvs_code8_dot_rows_q16(s->cq16, d, g, csb, csb + g, k->centroids,
                               seg->n_clusters, d, s->cscore + s->cbase[si], C);
    }
    return 0;
}

/* Order-preserving map of a float to uint32 (-0 as +0; no NaN). */
static inline uint32_t float_key(float f) {
    if (f == 0)
        f = 0.0f;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u >> 31 ? ~u : u | 0x80000000u;
}

static inline float key_float(uint32_t u) {
    u = u >> 31 ? u & 0x7fffffffu : ~u;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Among keys[0 .. n), the digit (key >> shift) & mask of the k-th largest
 * (1 <= k <= n) of those whose higher bits equal `prefix` (all when
 * shift + width = 32); *k becomes its rank among that digit's keys. */
static uint32_t radix_digit(const uint32_t *keys, uint32_t n, uint32_t shift,
                            uint32_t width, uint32_t prefix, uint32_t *k) {
    uint32_t hist[2048] = {0};
    const uint32_t mask = (1u << width) - 1, top = shift + width;
    for (uint32_t i = 0; i < n; i++)
        if (top == 32 || keys[i] >> top == prefix)
            hist[(keys[i] >> shift) & mask]++;
    uint32_t b = mask;
    for (;; b--) {
        if (hist[b] >= *k || b == 0)
            break;
        *k -= hist[b];
    }
    return b;
}

/* The k-th largest of x[0 .. n) (1 <= k <= n, no NaN), exact: a radix
 * select over the floats' order-preserving bits, 11 + 11 + 10 bits; after
 * the first digit buf ([n]) keeps only that digit's bucket, so the later
 * passes read only it. Linear, without the data-dependent branches of
 * quickselect. */
static float kth_largest(const float *x, uint32_t n, uint32_t k,
                         uint32_t *buf) {
    for (uint32_t i = 0; i < n; i++)
        buf[i] = float_key(x[i]);
    uint32_t b1 = radix_digit(buf, n, 21, 11, 0, &k);
    uint32_t nb = 0;
    for (uint32_t i = 0; i < n; i++) /* in place: nb <= i */
        if (buf[i] >> 21 == b1)
            buf[nb++] = buf[i];
    uint32_t b2 = radix_digit(buf, nb, 10, 11, b1, &k);
    uint32_t b3 = radix_digit(buf, nb, 0, 10, b1 << 11 | b2, &k);
    return key_float(b1 << 21 | b2 << 10 | b3);
}

/* The best k of x[0 .. n) (no NaN), in order: x[m] is one of them when
 * best_k_takes(x[m], thr, &ties), which counts down the ties, those equal
 * to the k-th largest, taken first in order. The k-th largest by
 * selection (kth_largest, buf [n]), linear where a heap costs log k a
 * member. k == 0 takes none, k >= n all. */
static void best_k(const float *x, uint32_t n, uint32_t k, uint32_t *buf,
                   float *thr, uint32_t *ties) {
    if (k == 0) {
        *thr = INFINITY;
        *ties = 0;
        return;
    }
    if (k >= n) {
        *thr = -INFINITY;
        *ties = n;
        return;
    }
    *thr = kth_largest(x, n, k, buf);
    uint32_t above = 0;
    for (uint32_t m = 0; m < n; m++)
        above += x[m] > *thr;
    *ties = k - above;
}

static inline int best_k_takes(float x, float thr, uint32_t *ties) {
    return x > thr || (x == thr && *ties && (*ties)--);
}

/* Room in s->est ([g][*stride] code scores, query-major) for `need`
 * members per query: a larger stride moves each query's row up. */
static int est_reserve(kvs_scratch_t *s, uint32_t g, size_t *stride,
                       size_t used, size_t need) {
    if (need <= *stride)
        return 0;
    size_t ns = *stride * 2 > need ? *stride * 2 : need;
    if (GROW(s, est, est_cap, (size_t)g * ns))
        return KVS_ENOMEM;
    for (uint32_t i = g; i-- > 1;)
        memmove(s->est + i * ns, s->est + i * *stride, used * sizeof(float));
    *stride = ns;
    return 0;
}

/* Whether segment `seg` holds a steady (sink or window) position. */
static int seg_has_steady(const kvs_head_view_t *v, const kvs_segment_t *seg) {
    uint64_t end = seg->first_pos + seg->n_tokens;
    return seg->first_pos < v->sink_tokens ||
           end + v->window_tokens > v->indexed_tokens;
}

/*
 * The retrieval and estimation zones of kvs_head_attend over codes, after
 * the steady zone (in *run) and the cluster ranking (s->rank, s->cscore):
 *   - clusters in rank order have their non-steady members scored by code
 *     for every query of the group until M members are; a member's group
 *     score is max over queries of (code score - that query's best
 *     centroid score), so a key any head wants is kept;
 *   - retrieval: the best R of them, attended exactly;
 *   - the other scanned members, per cluster, one pseudo-token: weight the
 *     sum of exp(code score) (their own estimate, finer than centroid x
 *     count), value the mean of those members' values;
 *   - estimation: the next estimation_fraction of clusters, one
 *     pseudo-token each (centroid score + log count + the spread term
 *     below, value mean); the rest is skipped.
 * Scores live query-major ([g][members]) so that max, exp and the group
 * score run as long vector loops, and rows are read where they lie (the
 * gather kernels) rather than copied together first.
 */
static int codes_attend(const kvs_head_view_t *v, const float *q, uint32_t g,
                        const kvs_zone_params_t *zp,
                        const kvs_rank_params_t *rp, kvs_scratch_t *s,
                        uint32_t C, partial_t *run, partial_t *tmp,
                        kvs_zone_stats_t *st) {
    const uint32_t d = v->d, dc = kvs_codes_dim(d), nseg = v->n_segments;
    const size_t rb = row_bytes(v);
    const float scale = zp->scale;
    uint32_t R;
    uint64_t M;
    codes_budget(v, zp, rp, &R, &M);
    int rc;
    float cmax[MAXQ];
    for (uint32_t i = 0; i < g; i++)
        cmax[i] = kvs_max(s->cscore + (size_t)i * C, C);
    if ((rc = scan_rank(v, q, g, rp, scale, s, C)))
        return rc;
    if ((rc = sort_rank_desc(s, s->rank, C)))
        return rc;

    /* Scan: members (as segment << 32 | slot) and their scaled code
     * scores, est[i stride + m] for query i; scanned cluster u's members
     * are ustart[u] .. ustart[u + 1] - 1. */
    if (GROW(s, cseg, cseg_cap, C))
        return KVS_ENOMEM;
    const uint32_t *cseg = s->cseg;
    for (uint32_t si = 0; si < nseg; si++)
        for (uint32_t c = s->cbase[si]; c < s->cbase[si + 1]; c++)
            s->cseg[c] = si;
    size_t stride =
        M + 64 < v->indexed_tokens + 64 ? M + 64 : v->indexed_tokens + 64;
    if (GROW(s, est, est_cap, (size_t)g * stride) ||
        GROW(s, cpos, cpos_cap, stride) || GROW(s, tmpc, tmpc_cap, nseg))
        return KVS_ENOMEM;
    uint8_t *steady_seg = (uint8_t *)(void *)s->tmpc; /* [nseg], free now */
    for (uint32_t si = 0; si < nseg; si++)
        steady_seg[si] = (uint8_t)seg_has_steady(v, v->segments[si]);
    uint32_t used = 0, nm = 0;
    for (; used < C && nm < M; used++) {
        /* Clusters come in rank order, segments at random: fetch the
         * offsets of the cluster 4 ahead and the codes of the one 2 ahead
         * (whose offsets came 2 rounds ago). */
        if (used + 4 < C) {
            uint32_t c4 = s->idx[used + 4], s4 = cseg[c4];
            __builtin_prefetch(v->segments[s4]->offsets + (c4 - s->cbase[s4]));
        }
        if (used + 2 < C) {
            uint32_t c2 = s->idx[used + 2], s2 = cseg[c2];
            const kvs_segment_t *g2 = v->segments[s2];
            const uint32_t *o2 = g2->offsets + (c2 - s->cbase[s2]);
            prefetch_rows(g2->codes->keys + (size_t)o2[0] * (dc / 2),
                          o2[1] - o2[0], dc / 2);
        }
        uint32_t c = s->idx[used];
        if (s->rank[c] < 0)
            break; /* nothing of it left in the view */
        uint32_t si = cseg[c];
        const kvs_segment_t *seg = v->segments[si];
        uint32_t lc = c - s->cbase[si];
        uint32_t a = seg->offsets[lc], n = seg->offsets[lc + 1] - a;
        if (est_reserve(s, g, &stride, nm, (size_t)nm + n) ||
            GROW(s, cpos, cpos_cap, stride) ||
            GROW(s, ustart, ustart_cap, (size_t)used + 2))
            return KVS_ENOMEM;
        s->ustart[used] = nm;
        const float *sb = s->cq + (size_t)si * 2 * g;
        kvs_code4_dot_rows_q8(s->cq8 + (size_t)si * g * dc, dc, g, sb, sb + g,
                              seg->codes->keys + (size_t)a * (dc / 2), n, dc,
                              s->est + nm, stride);
        uint32_t k = 0;
        if (!steady_seg[si]) {
            for (uint32_t j = 0; j < n; j++)
                s->cpos[nm + j] = (int64_t)((uint64_t)si << 32 | (a + j));
            k = n;
        } else {
            /* compacted in place: a member's k-th lands at or before j */
            for (uint32_t j = 0; j < n; j++) {
                if (kvs_head_is_steady(v,
                                       seg->first_pos + seg->positions[a + j]))
                    continue;
                s->cpos[nm + k] = (int64_t)((uint64_t)si << 32 | (a + j));
                for (uint32_t i = 0; i < g && k != j; i++)
                    s->est[i * stride + nm + k] = s->est[i * stride + nm + j];
                k++;
            }
        }
        nm += k;
    }
    if (GROW(s, ustart, ustart_cap, (size_t)used + 1))
        return KVS_ENOMEM;
    s->ustart[used] = nm;
    uint64_t coded = nm;

    /* Shortlist: the best R members by group score (best_k), read in
     * scan order: members of a cluster hold neighbouring slots. */
    if (R > nm)
        R = nm;
    if (GROW(s, cscr, cscr_cap, 2 * (size_t)(nm ? nm : 1)))
        return KVS_ENOMEM;
    float *gs = s->cscr, *sel = s->cscr + nm;
    for (uint32_t m = 0; m < nm; m++)
        gs[m] = s->est[m] - cmax[0];
    for (uint32_t i = 1; i < g; i++) {
        const float *e = s->est + i * stride;
        for (uint32_t m = 0; m < nm; m++) {
            float x = e[m] - cmax[i];
            gs[m] = x > gs[m] ? x : gs[m];
        }
    }
    for (uint32_t m = 0; m < nm; m++) /* NaN ranks last (kth_largest) */
        gs[m] = gs[m] == gs[m] ? gs[m] : -INFINITY;
    float thr;
    uint32_t ties;
    best_k(gs, nm, R, (uint32_t *)(void *)sel, &thr, &ties);
    /* Row addresses: the R keys, then the R values; the pseudo-tokens'
     * rows after them (below). */
    uint32_t E = kvs_zone_clusters(zp->estimation_fraction, C);
    if (E > C - used)
        E = C - used;
    size_t nrows = 2 * (size_t)R + E + used + 1;
    if (GROW(s, rows, rows_cap, nrows))
        return KVS_ENOMEM;
    const void **keys = s->rows, **vals = s->rows + R;
    uint32_t cols = 0;
    for (uint32_t m = 0; m < nm && cols < R; m++) {
        if (!best_k_takes(gs[m], thr, &ties))
            continue;
        int64_t id = s->cpos[m];
        s->cpos[m] = (int64_t)((uint64_t)id | 1ull << 63); /* retrieved */
        const kvs_segment_t *seg = v->segments[(uint64_t)id >> 32];
        uint32_t slot = (uint32_t)id;
        keys[cols] = (const char *)seg->keys + slot * rb;
        vals[cols] = (const char *)seg->values + slot * rb;
        cols++;
    }
    /* The shortlist's exact scores, [g][cols] (gs and sel are done). */
    if (GROW(s, cscr, cscr_cap, (size_t)g * (cols ? cols : 1)))
        return KVS_ENOMEM;
    float *SR = s->cscr;
    if (cols)
        kvs_dot_gather(v->dtype, q, g, keys, cols, d, scale, SR, cols);

    /* Pseudo-tokens, one weighted row each in W ([g][P], linear weights
     * against m[i]) with its value row at prow[p]:
     *   - estimation: an estimated cluster's mass is count x exp(q.c s +
     *     s^2 |q|^2 spread^2 / 2), the mean of exp(q.k s) over members
     *     whose residuals k - c are isotropic Gaussian with per-dim
     *     variance spread^2. count x exp(q.c s) alone (Jensen)
     *     underestimates every cluster, the wider ones most: on the 32K
     *     tinycode128 dump, at code_ratio 4, median error 2.7% -> 1.7%,
     *     the exact mass of each cluster 1.6%.
     *   - the rest of each scanned cluster: the sum of its members'
     *     exp(code score); its value the mean of those members, i.e. the
     *     view's mean x count/left less each retrieved member's value /
     *     left (on the 32K dump the whole mean would do as well, 0.85% vs
     *     0.87%; where attention is spread, random keys in tests/engine,
     *     it is 13% worse). The retrieved members' share is taken off
     *     their own exact weights, so their values are read once.
     * Retrieval and pseudo-tokens are one softmax partial. */
    const void **prow = s->rows + 2 * (size_t)R;
    size_t P = E + used + 1;
    if (GROW(s, scores, scores_cap, (size_t)g * P))
        return KVS_ENOMEM;
    float *W = s->scores;
    float half_qq[MAXQ];
    for (uint32_t i = 0; i < g; i++) {
        const float *qi = q + (size_t)i * d;
        float x = 0;
        for (uint32_t j = 0; j < d; j++)
            x += qi[j] * qi[j];
        half_qq[i] = 0.5f * scale * scale * x;
    }
    /* The estimation zone in cluster id order (segment by segment, each
     * segment's value means in address order), not rank order: its
     * clusters are half of them, and read in rank order every mean was a
     * cache miss. Log-domain scores first, made weights below. */
    uint8_t *mark = (uint8_t *)(void *)s->rsort; /* 16 C bytes, free now */
    memset(mark, 0, C);
    for (uint32_t u = used; u < used + E; u++) {
        uint32_t c = s->idx[u];
        if (s->rank[c] < 0)
            break;
        mark[c] = 1;
    }
    uint32_t np = 0;
    for (uint32_t c = 0, si = 0; c < C; c++) {
        if (!mark[c])
            continue;
        while (c >= s->cbase[si + 1])
            si++;
        const kvs_segment_t *seg = v->segments[si];
        uint32_t lc = c - s->cbase[si];
        const void *mean;
        uint32_t cnt = cluster_view(seg, lc, si + 1 == nseg, &mean);
        if (cnt == 0)
            continue;
        prow[np] = mean;
        float lcnt = log_count(cnt);
        float sp = seg->codes->spread[lc];
        sp *= sp;
        for (uint32_t i = 0; i < g; i++)
            W[(size_t)i * P + np] =
                s->cscore[(size_t)i * C + c] + lcnt + sp * half_qq[i];
        np++;
    }
    const uint32_t n_est = np;
    float m[MAXQ], l[MAXQ], rescale[MAXQ];
    for (uint32_t i = 0; i < g; i++) {
        float *e = s->est + i * stride, *wi = W + (size_t)i * P;
        float *sr = SR + (size_t)i * cols;
        float em = kvs_max(e, nm), xm = kvs_max(wi, n_est);
        float rm = kvs_max(sr, cols);
        m[i] = em > xm ? em : xm;
        m[i] = rm > m[i] ? rm : m[i];
        l[i] = kvs_exp_sum(wi, n_est, m[i]) + kvs_exp_sum(sr, cols, m[i]);
        /* scanned scores to weights against em, rescaled to m below */
        kvs_exp_sum(e, nm, em);
        rescale[i] = em == -INFINITY ? 0.0f : expf(em - m[i]);
    }
    for (uint32_t j = 0; j < nm; j++) /* retrieved: no share in the rest */
        if (s->cpos[j] < 0)
            for (uint32_t i = 0; i < g; i++)
                s->est[i * stride + j] = 0;
    /* The rest of each scanned cluster, rank order; retrieved members
     * (cpos < 0) are shortlist columns in the same order. */
    uint32_t col = 0;
    for (uint32_t u = 0; u < used; u++) {
        uint32_t c = s->idx[u];
        uint32_t si = cseg[c];
        const kvs_segment_t *seg = v->segments[si];
        const void *mean;
        uint32_t cnt =
            cluster_view(seg, c - s->cbase[si], si + 1 == nseg, &mean);
        uint32_t m0 = s->ustart[u], k = s->ustart[u + 1] - m0;
        uint32_t left = 0, col0 = col;
        for (uint32_t j = m0; j < m0 + k; j++)
            left += s->cpos[j] >= 0;
        col += k - left;
        if (cnt == 0 || left == 0)
            continue;
        float share = (float)cnt / (float)left, x[MAXQ];
        prow[np] = mean;
        for (uint32_t i = 0; i < g; i++) {
            const float *e = s->est + i * stride + m0;
            float sum = 0;
            for (uint32_t j = 0; j < k; j++)
                sum += e[j];
            x[i] = sum * rescale[i];
            l[i] += x[i];
            W[(size_t)i * P + np] = x[i] * share;
        }
        np++;
        /* not all of the view left: the mean x cnt/left over-counts the
         * retrieved members (cnt == left exactly when none was retrieved
         * and none is steady) */
        for (uint32_t r = col0; r < col && left != cnt; r++)
            for (uint32_t i = 0; i < g; i++)
                SR[(size_t)i * cols + r] -= x[i] / (float)left;
    }
    if (np || cols) {
        partial_init(tmp, g, d, tmp->acc);
        for (uint32_t i = 0; i < g; i++) {
            tmp->m[i] = m[i];
            tmp->l[i] = l[i];
        }
        if (cols)
            kvs_axpy_gather(v->dtype, SR, cols, g, vals, cols, d, tmp->acc);
        if (np)
            kvs_axpy_gather(v->dtype, W, P, g, prow, np, d, tmp->acc);
        partial_merge(run, tmp);
    }
    st->keys_exact = st->keys_steady + cols;
    st->keys_coded = coded;
    st->clusters_total = C;
    st->clusters_retrieved = used;
    st->clusters_estimated = E;
    st->clusters_skipped = C - used - E;
    return 0;
}

/*
 * Two-stage search (KVS_RANK_CODES) of the g queries of a group, each into
 * its own heap ctx->h[i], after the steady zone. Per query: (1) every
 * cluster is scored from its 8-bit centroid code plus spread x |q| x s_c:
 * a cluster of wide spread holds keys well above its centroid's score in
 * more directions. (2) In that order, the 4-bit codes of the clusters'
 * non-steady members are scored until M keys are. (3) The best R of them
 * by code score are read in full and scored exactly. R =
 * ceil(retrieval_fraction x indexed), M = code_ratio x R.
 * Each query's answer is what it would get alone (its own ranking, its own
 * clusters); what the group shares is the reading. The scores come from
 * code_weights, as the codes attend's: the group's int16 and int8 weights
 * score a segment's centroid codes, and a scanned cluster's codes, for
 * every query in one pass; the union of the clusters the queries scan is
 * walked once, in address order, each query keeping the members of its
 * own clusters. Query by query (float weights, clusters in rank order, a
 * heap per query for the shortlist) a group of 4 read every code 4 times:
 * 12.8 ms against 6.6 for 32 query heads at 32K on 2 cores, the same
 * recall. Stats count per query, as if each searched alone.
 */
static int codes_search_group(const kvs_head_view_t *v, const float *q,
                              uint32_t g, const kvs_zone_params_t *zp,
                              const kvs_rank_params_t *rp, kvs_scratch_t *s,
                              search_ctx_t *ctx, kvs_zone_stats_t *st) {
    const uint32_t d = v->d, dc = kvs_codes_dim(d), nseg = v->n_segments;
    const size_t rb = row_bytes(v);
    uint32_t C, maxn = 1;
    int rc;
    for (uint32_t si = 0; si < nseg; si++) {
        const kvs_segment_t *seg = v->segments[si];
        for (uint32_t c = 0; c < seg->n_clusters; c++) {
            uint32_t n = seg->offsets[c + 1] - seg->offsets[c];
            maxn = n > maxn ? n : maxn;
        }
    }
    /* cscore: [g][C] ranks (code_weights: centroid scores from their
     * 8-bit codes, the 4-bit weights of every segment for every query in
     * cq8/cq); tmpc: [C] members left in the view; cseg: [C] the queries
     * that scan each cluster, a bit each */
    if ((rc = score_clusters(v, q, g, 1.0f, 0, s, &C)) ||
        (rc = code_weights(v, q, g, 1.0f, s)))
        return rc;
    if (GROW(s, tmpc, tmpc_cap, C) || GROW(s, cseg, cseg_cap, C) ||
        GROW(s, est, est_cap, (size_t)g * maxn))
        return KVS_ENOMEM;
    float alpha = rp->spread == 0  ? KVS_SPREAD_DEFAULT
                  : rp->spread < 0 ? 0.0f
                                   : rp->spread;
    float sq[MAXQ];
    for (uint32_t i = 0; i < g; i++) {
        double qq = 0;
        for (uint32_t j = 0; j < d; j++)
            qq += (double)q[(size_t)i * d + j] * q[(size_t)i * d + j];
        sq[i] = alpha * (float)sqrt(qq);
    }
    uint32_t *left = (uint32_t *)(void *)s->tmpc;
    uint64_t meta_bytes = 0;
    for (uint32_t si = 0; si < nseg; si++) {
        const kvs_segment_t *seg = v->segments[si];
        const kvs_codes_t *k = seg->codes;
        const int steady = seg_has_steady(v, seg);
        for (uint32_t c = 0; c < seg->n_clusters; c++) {
            uint32_t a = seg->offsets[c], n = seg->offsets[c + 1] - a, m = n;
            for (uint32_t j = a; steady && j < a + n; j++)
                m -= kvs_head_is_steady(v, seg->first_pos + seg->positions[j]);
            left[s->cbase[si] + c] = m;
        }
        for (uint32_t i = 0; i < g; i++) {
            float *rk = s->cscore + (size_t)i * C + s->cbase[si];
            for (uint32_t c = 0; c < seg->n_clusters; c++) {
                if (sq[i] > 0)
                    rk[c] += sq[i] * k->spread[c];
                /* NaN (from non-finite stored keys) would break the sort's
                 * ordering: it ranks last. */
                if (rk[c] != rk[c])
                    rk[c] = -INFINITY;
            }
            /* Clusters with no member left in the view sort last. */
            if (seg->adj_always.n || (si + 1 == nseg && seg->adj_last.n))
                for (uint32_t c = 0; c < seg->n_clusters; c++)
                    if (kvs_segment_cluster_view(seg, c, si + 1 == nseg,
                                                 NULL) == 0)
                        rk[c] = -INFINITY;
        }
        /* Centroid codes, offsets, counts, spreads; four ranges. */
        meta_bytes += (uint64_t)seg->n_clusters * (dc + 12) + 16 * (uint64_t)dc;
    }

    uint32_t R;
    uint64_t M;
    codes_budget(v, zp, rp, &R, &M);
    if (R == 0) {
        st->clusters_total += (uint64_t)g * C;
        st->clusters_skipped += (uint64_t)g * C;
        st->bytes_read += g * meta_bytes;
        return 0;
    }
    /* (2) Each query's clusters: its rank order until M members. */
    uint32_t *need = s->cseg;
    memset(need, 0, C * sizeof *need);
    uint32_t used[MAXQ];
    uint64_t coded[MAXQ];
    for (uint32_t i = 0; i < g; i++) {
        if (sort_rank_desc(s, s->cscore + (size_t)i * C, C))
            return KVS_ENOMEM;
        uint64_t want = 0;
        uint32_t u = 0;
        for (; u < C && want < M; u++) {
            uint32_t c = s->idx[u];
            if (s->cscore[(size_t)i * C + c] == -INFINITY)
                break;
            need[c] |= 1u << i;
            want += left[c];
        }
        used[i] = u;
        coded[i] = want;
    }
    /* Each query's scored members: code scores in cscr, ids (segment <<
     * 32 | slot) in cpos, [g][room]; a query's last cluster may take it
     * past M by up to a cluster. */
    uint64_t room = 0;
    for (uint32_t i = 0; i < g; i++)
        room = coded[i] > room ? coded[i] : room;
    room = room ? room : 1;
    if (GROW(s, cpos, cpos_cap, (size_t)g * room) ||
        GROW(s, cscr, cscr_cap, (size_t)g * room))
        return KVS_ENOMEM;
    uint32_t ncand[MAXQ] = {0};
    uint64_t bytes[MAXQ];
    for (uint32_t i = 0; i < g; i++)
        bytes[i] = meta_bytes;
    /* The union of the scanned clusters, address order: each cluster's
     * codes scored for the whole group at once (code_weights' int8
     * weights), each score kept by the queries that scan it. */
    for (uint32_t si = 0; si < nseg; si++) {
        const kvs_segment_t *seg = v->segments[si];
        const kvs_codes_t *k = seg->codes;
        const float *sbias = s->cq + (size_t)si * 2 * g;
        const int steady = seg_has_steady(v, seg);
        for (uint32_t c = s->cbase[si]; c < s->cbase[si + 1]; c++) {
            if (!need[c])
                continue;
            uint32_t lc = c - s->cbase[si];
            uint32_t a = seg->offsets[lc], n = seg->offsets[lc + 1] - a;
            kvs_code4_dot_rows_q8(s->cq8 + (size_t)si * g * dc, dc, g, sbias,
                                  sbias + g, k->keys + (size_t)a * (dc / 2), n,
                                  dc, s->est, n);
            for (uint32_t i = 0; i < g; i++) {
                if (!(need[c] >> i & 1))
                    continue;
                bytes[i] += (uint64_t)n * (dc / 2 + 4);
                const float *e = s->est + (size_t)i * n;
                float *cs = s->cscr + (size_t)i * room;
                int64_t *cp = s->cpos + (size_t)i * room;
                uint32_t m = ncand[i];
                for (uint32_t j = 0; j < n; j++) {
                    if (steady &&
                        kvs_head_is_steady(v, seg->first_pos +
                                                  seg->positions[a + j]))
                        continue;
                    /* NaN (a key so large its rotation overflowed)
                     * ranks last, as the clusters do: kth_largest
                     * takes no NaN */
                    cs[m] = e[j] == e[j] ? e[j] : -INFINITY;
                    cp[m++] = (int64_t)((uint64_t)si << 32 | (a + j));
                }
                ncand[i] = m;
            }
        }
    }

    /* (3) Each query's shortlist, the best R of its scored members by
     * code score (best_k), read in full and scored exactly. */
    if (GROW(s, gkey, gkey_cap, room) || GROW(s, rows, rows_cap, R) ||
        GROW(s, est, est_cap, R))
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < g; i++) {
        const float *qi = q + (size_t)i * d;
        const float *cs = s->cscr + (size_t)i * room;
        const int64_t *cp = s->cpos + (size_t)i * room;
        const uint32_t n = ncand[i];
        float thr;
        uint32_t ties;
        best_k(cs, n, R, s->gkey, &thr, &ties);
        uint32_t taken = 0;
        const void **rows = s->rows;
        float *exact = s->est; /* [R]: free after the scan */
        int64_t *tpos = s->cpos + (size_t)i * room; /* its own ids, read */
        for (uint32_t m = 0; m < n && taken < R; m++) {
            if (!best_k_takes(cs[m], thr, &ties))
                continue;
            uint64_t id = (uint64_t)cp[m];
            const kvs_segment_t *seg = v->segments[id >> 32];
            uint32_t slot = (uint32_t)id;
            rows[taken] = (const char *)seg->keys + slot * rb;
            tpos[taken++] = (int64_t)(seg->first_pos + seg->positions[slot]);
        }
        if (taken)
            kvs_dot_gather(v->dtype, qi, 1, rows, taken, d, 1.0f, exact, taken);
        for (uint32_t m = 0; m < taken; m++)
            topk_push(&ctx->h[i], exact[m], tpos[m]);
        ctx->scanned += taken;
        bytes[i] += (uint64_t)taken * rb;
        st->clusters_total += C;
        st->clusters_retrieved += used[i];
        st->clusters_skipped += C - used[i];
        st->keys_coded += coded[i];
        st->bytes_read += bytes[i];
    }
    return 0;
}

int kvs_head_search_group(const kvs_head_view_t *v, const float *q, uint32_t g,
                          uint32_t k, const kvs_zone_params_t *zp,
                          kvs_scratch_t *s, int64_t *positions, float *scores,
                          kvs_zone_stats_t *stats) {
    return kvs_head_search_group_ranked(v, q, g, k, zp, NULL, s, positions,
                                        scores, stats);
}

int kvs_head_search_group_ranked(const kvs_head_view_t *v, const float *q,
                                 uint32_t g, uint32_t k,
                                 const kvs_zone_params_t *zp,
                                 const kvs_rank_params_t *rpp, kvs_scratch_t *s,
                                 int64_t *positions, float *scores,
                                 kvs_zone_stats_t *stats) {
    if (!v || !q || !zp || !s || !positions || !scores || k == 0 || g == 0)
        return KVS_EINVAL;
    if (g > MAXQ) { /* as kvs_head_attend_ranked: groups of MAXQ */
        for (uint32_t i0 = 0; i0 < g; i0 += MAXQ) {
            uint32_t n = g - i0 < MAXQ ? g - i0 : MAXQ;
            int rc = kvs_head_search_group_ranked(
                v, q + (size_t)i0 * v->d, n, k, zp, rpp, s,
                positions + (size_t)i0 * k, scores + (size_t)i0 * k, stats);
            if (rc)
                return rc;
        }
        return 0;
    }
    const kvs_rank_params_t rp0 = {0}, *rp = rpp ? rpp : &rp0;
    uint64_t total = v->indexed_tokens + v->tail_tokens;
    if (GROW(s, hpos, hpos_cap, (size_t)g * k) ||
        GROW(s, hscore, hscore_cap, (size_t)g * k) ||
        GROW(s, scores, scores_cap, (size_t)g * EXACT_CHUNK))
        return KVS_ENOMEM;
    topk_t h[MAXQ];
    for (uint32_t i = 0; i < g; i++)
        h[i] = (topk_t){.score = s->hscore + (size_t)i * k,
                        .pos = s->hpos + (size_t)i * k,
                        .n = 0,
                        .k = k};
    /* Rows shared by the group (steady zone, or everything in exact mode)
     * are read once and scored for all its queries. */
    search_ctx_t ctx = {v, q, g, s, h, 0, 0, 0};
    kvs_zone_stats_t st = {0};
    st.keys_total = total * g;
    int rc;

    if (zp->exact || v->n_segments == 0) {
        for_each_chunk(v, search_rows, &ctx);
        for (uint32_t si = 0; si < v->n_segments; si++)
            st.clusters_total += (uint64_t)v->segments[si]->n_clusters * g;
        st.clusters_retrieved = st.clusters_total;
        st.keys_steady = zp->exact ? 0 : total * g;
        goto out;
    }

    size_t nb = 0;
    uint32_t cols = 0;
    if ((rc = steady_blocks(v, s, &nb, &cols)))
        return rc;
    for (size_t b = 0; b < nb; b++) {
        const block_t *bk = &s->blocks[b];
        for (uint32_t r = 0; r < bk->n; r += EXACT_CHUNK) {
            uint32_t n = bk->n - r < EXACT_CHUNK ? bk->n - r : EXACT_CHUNK;
            search_rows(&ctx, (const char *)bk->keys + r * row_bytes(v), NULL,
                        n, bk->seg, bk->slot0 + r, v->indexed_tokens + r);
        }
    }
    st.keys_steady = ctx.scanned;

    int codes;
    if ((rc = use_codes(v, zp, rp, &codes)))
        return rc;
    if (codes) {
        if ((rc = codes_search_group(v, q, g, zp, rp, s, &ctx, &st)))
            return rc;
        goto out;
    }

    /* Centroids scored once for the group; each query then takes its own
     * retrieval clusters, ranked by its own q.c. */
    uint32_t C;
    if ((rc = score_clusters(v, q, g, 1.0f, 1, s, &C)))
        return rc;
    if (GROW(s, tmpc, tmpc_cap, C))
        return KVS_ENOMEM;
    size_t rb = row_bytes(v);
    ctx.mask_steady = 1;
    ctx.nq = 1;
    for (uint32_t i = 0; i < g; i++) {
        const float *row = s->cscore + (size_t)i * C;
        memcpy(s->rank, row, C * sizeof(float));
        for (uint32_t c = 0; c < C; c++)
            s->idx[c] = c;
        uint32_t R;
        if (zp->bounded) {
            /* Mass is judged at the softmax scale of attention: give
             * bounded_count this query's scaled scores as a group of one. */
            for (uint32_t c = 0; c < C; c++)
                s->tmpc[c] = row[c] * zp->scale;
            float *saved = s->cscore;
            s->cscore = s->tmpc;
            partial_t none;
            none.g = 1;
            none.m[0] = -INFINITY;
            none.l[0] = 0;
            R = bounded_count(v, s, 1, C, &none, zp->epsilon);
            s->cscore = saved;
        } else {
            R = kvs_zone_clusters(zp->retrieval_fraction, C);
            select_top(s->rank, s->idx, C, R);
        }
        ctx.q = q + (size_t)i * v->d;
        ctx.h = &h[i];
        for (uint32_t r = 0; r < R; r++) {
            uint32_t c = s->idx[r];
            uint32_t si = seg_of(s->cbase, v->n_segments, c);
            const kvs_segment_t *seg = v->segments[si];
            uint32_t lc = c - s->cbase[si];
            uint32_t a = seg->offsets[lc], n = seg->offsets[lc + 1] - a;
            if (GROW(s, scores, scores_cap, n))
                return KVS_ENOMEM;
            search_rows(&ctx, (const char *)seg->keys + a * rb, NULL, n, seg, a,
                        0);
        }
        st.clusters_total += C;
        /* Every centroid with its offset and count. */
        st.bytes_read += (uint64_t)C * (rb + 8);
        st.clusters_retrieved += R;
        st.clusters_skipped += C - R;
    }
out:
    st.keys_exact = ctx.scanned;
    st.bytes_read += ctx.bytes;
    for (uint32_t i = 0; i < g; i++)
        topk_drain(&h[i], positions + (size_t)i * k, scores + (size_t)i * k);
    if (stats)
        kvs_zone_stats_add(stats, &st);
    return 0;
}

int kvs_head_search(const kvs_head_view_t *v, const float *q, uint32_t k,
                    const kvs_zone_params_t *zp, kvs_scratch_t *s,
                    int64_t *positions, float *scores,
                    kvs_zone_stats_t *stats) {
    return kvs_head_search_group(v, q, 1, k, zp, s, positions, scores, stats);
}
