/*
 * segment.c: builds one wave-index segment from a run of keys and values.
 *
 * The keys are converted to fp32 and centred on the segment's mean key:
 * attention keys share a large common component, and without centring every
 * key's inner product with every centroid is dominated by it, so spherical
 * k-means would cluster on noise. Centring is used for the assignment only;
 * what the segment stores (keys, centroids) is raw. Spherical
 * maximum-inner-product k-means (normalised centroids, assignment by largest
 * inner product; the algorithm of faiss::Clustering with spherical = 1, run
 * here on sgemm, see seg_kmeans) runs for up to `kmeans_iters` iterations
 * over every key (KVS_KMEANS=sample: on a sample of the keys, then once over
 * all of them; SEG_SAMPLE_PER_CLUSTER below); then every centred key is
 * assigned once more to its best normalised centroid, and each centroid
 * becomes the plain mean of its members' raw keys, which is what q.c must
 * estimate at query time.
 * Empty clusters are dropped, slots are counting-sorted by cluster (token
 * order inside a cluster), and the adjustment tables described in
 * kvs_index.h are filled by brute force over the members.
 *
 * Every array of a segment is its own malloc() block and kvs_segment_free()
 * frees each with free(), so a loader can assemble a segment from storage
 * with plain malloc() and release it the same way. docs/index.md has the
 * details.
 */
#include "codes_int.h"
#include "kvs_index.h"

#include "kvs_errf.h"
#include "kvs_rng.h"

#include "kvs_kernels.h"

#include <cblas.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include <assert.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Flags in kvs_segment_t.adj_flags. */
#define SEG_ADJ_ALWAYS KVS_ADJ_ALWAYS
#define SEG_ADJ_LAST KVS_ADJ_LAST

/* L2-normalise rows in place; zero rows stay zero (they score 0 against
 * every key, which is harmless and avoids a division by zero). */
static void seg_normalize_rows(float *x, size_t rows, uint32_t d) {
    for (size_t i = 0; i < rows; i++) {
        float *r = x + i * d;
        double s = 0;
        for (uint32_t j = 0; j < d; j++)
            s += (double)r[j] * r[j];
        if (s > 0) {
            float inv = (float)(1.0 / sqrt(s));
            for (uint32_t j = 0; j < d; j++)
                r[j] *= inv;
        }
    }
}

/* acc[j] += x[j] for j < d, in double: the same sums as the scalar loop
 * (each element is one exact conversion and one rounding add), two at a
 * time. */
static inline void seg_acc_row(double *acc, const float *x, uint32_t d) {
    uint32_t j = 0;
#ifdef __SSE2__
    for (; j + 4 <= d; j += 4) {
        __m128 v = _mm_loadu_ps(x + j);
        _mm_storeu_pd(acc + j,
                      _mm_add_pd(_mm_loadu_pd(acc + j), _mm_cvtps_pd(v)));
        _mm_storeu_pd(acc + j + 2,
                      _mm_add_pd(_mm_loadu_pd(acc + j + 2),
                                 _mm_cvtps_pd(_mm_movehl_ps(v, v))));
    }
#endif
    for (; j < d; j++)
        acc[j] += x[j];
}

/* Index of the largest of x[0..n), the first one on ties. */
static uint32_t seg_argmax(const float *x, uint32_t n, float *best) {
#ifdef __SSE2__
    if (n >= 8) {
        __m128 m0 = _mm_loadu_ps(x), m1 = _mm_loadu_ps(x + 4);
        uint32_t i = 8;
        for (; i + 8 <= n; i += 8) {
            m0 = _mm_max_ps(m0, _mm_loadu_ps(x + i));
            m1 = _mm_max_ps(m1, _mm_loadu_ps(x + i + 4));
        }
        float l[4];
        _mm_storeu_ps(l, _mm_max_ps(m0, m1));
        float m = l[0];
        for (int j = 1; j < 4; j++)
            m = l[j] > m ? l[j] : m;
        for (; i < n; i++)
            m = x[i] > m ? x[i] : m;
        __m128 mv = _mm_set1_ps(m);
        uint32_t j = 0;
        for (; j + 4 <= n; j += 4) {
            int mask = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + j), mv));
            if (mask) {
                *best = m;
                return j + (uint32_t)__builtin_ctz((unsigned)mask);
            }
        }
        for (; j < n; j++)
            if (x[j] == m)
                break;
        *best = m;
        return j < n ? j : 0;
    }
#endif
    uint32_t bi = 0;
    for (uint32_t i = 1; i < n; i++)
        if (x[i] > x[bi])
            bi = i;
    *best = x[bi];
    return bi;
}

/*
 * label[i] = the centroid with the largest inner product with xc[i], score[i]
 * that product. One sgemm per block of rows, sized so the block of scores
 * stays in cache while it is reduced.
 */
static void seg_assign(const float *xc, uint32_t n, uint32_t d,
                       const float *cent, uint32_t k, float *buf,
                       uint32_t brows, uint32_t *label, float *score) {
    for (uint32_t i0 = 0; i0 < n; i0 += brows) {
        uint32_t b = n - i0 < brows ? n - i0 : brows;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)b, (int)k,
                    (int)d, 1.0f, xc + (size_t)i0 * d, (int)d, cent, (int)d,
                    0.0f, buf, (int)k);
        for (uint32_t i = 0; i < b; i++)
            label[i0 + i] = seg_argmax(buf + (size_t)i * k, k, &score[i0 + i]);
    }
}

/* Rows per sgemm block: about 2 MiB of scores, at least 64 rows. */
static uint32_t seg_block_rows(uint32_t n, uint32_t k) {
    uint32_t b = (1u << 19) / k;
    if (b < 64)
        b = 64;
    return b < n ? b : n;
}

typedef struct seg_gain_s {
    float gain;
    uint32_t i;
} seg_gain_t;

/* Largest gain first; index breaks ties so the order is deterministic. */
static int seg_gain_cmp(const void *a, const void *b) {
    const seg_gain_t *x = a, *y = b;
    if (x->gain != y->gain)
        return x->gain > y->gain ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/*
 * The sample k-means (KVS_KMEANS=sample; the default from #14 until 32K
 * measurements showed ~3% more attention error and ~15% more keys read at
 * p90 than the full k-means, for 1.3-1.5x less build time with segments of
 * 256: docs/index.md, "Build cost"). It iterates on an
 * evenly spaced sample of SEG_SAMPLE_PER_CLUSTER keys per cluster, and
 * stops once at most SEG_EPS of the sample's labels change instead of
 * waiting for none: the sample only has to get the centroids close. Then
 * SEG_REFINE_ITERS iterations over every key fit them to the whole segment
 * before the final assignment (two such passes scored no better on the
 * recall and accuracy benchmarks). Keys of a segment are a run of tokens
 * whose neighbours look alike, so an evenly spaced sample covers the
 * segment's clusters as well as a random one, and needs no random draws.
 */
#define SEG_SAMPLE_PER_CLUSTER 4
#define SEG_EPS 0.01
#define SEG_REFINE_ITERS 1

typedef struct seg_km_cfg_s {
    uint32_t iters;  /* iteration cap */
    double eps;      /* stop when at most eps * rows labels change */
    uint32_t sample; /* rows to iterate on (0: all) */
    uint32_t refine; /* iterations over all rows after the sample's */
} seg_km_cfg_t;

/* The default is the full k-means (every key, kmeans_iters iterations or
 * until no label changes). KVS_KMEANS=sample in the environment selects
 * the sample-then-refine k-means (the default from #14 until the 32K
 * measurements of docs/index.md, "Build cost", showed it indexes worse), so
 * that benchmarks can measure both in one process, as KVS_FORCE_SCALAR does
 * for the kernels. */
static seg_km_cfg_t seg_km_cfg(const kvs_build_params_t *p, uint32_t k) {
    seg_km_cfg_t c = {p->kmeans_iters, 0, 0, 0};
    const char *m = getenv("KVS_KMEANS");
    if (!m || strcmp(m, "sample"))
        return c;
    c.eps = SEG_EPS;
    /* 0 (every row) where 4 k would not fit: no sample is smaller. */
    c.sample = k <= UINT32_MAX / SEG_SAMPLE_PER_CLUSTER
                   ? SEG_SAMPLE_PER_CLUSTER * k
                   : 0;
    c.refine = SEG_REFINE_ITERS;
    return c;
}

/*
 * Spherical maximum-inner-product k-means of the rows xs [ns][d] into k
 * clusters, at most `iters` iterations: cent [k][d] receives the last
 * normalised centroids; label/score [ns] are the last assignment's (the
 * caller assigns once more). With `init`, centroids start as k distinct
 * rows picked by the seed; without, from cent as given.
 *
 * Each iteration assigns every row to its best centroid (by inner
 * product), sets each centroid to the normalised sum of its members and
 * re-seeds every empty cluster with a row that gains most from a centroid
 * of its own (|x| - x.c, distinct rows for distinct clusters). It stops
 * early once at most cfg->eps of the labels changed (none, for eps = 0:
 * then the centroids would come out unchanged and every later assignment
 * would repeat this one, so stopping is exact).
 *
 * Written on cblas_sgemm rather than faiss::Clustering (which is the same
 * algorithm): FAISS's OpenMP loops and OpenBLAS's own threads spin against
 * each other on a small machine, and FAISS reduces a whole block of scores
 * after writing it; see docs/index.md for the measurements.
 */
static int seg_kmeans(const kvs_build_params_t *p, const seg_km_cfg_t *cfg,
                      uint32_t iters, int init, uint32_t d, uint32_t ns,
                      uint32_t k, const float *xs, float *cent, uint32_t *label,
                      float *score) {
    uint32_t brows = seg_block_rows(ns, k);
    double *sum = malloc(sizeof(*sum) * (size_t)k * d);
    float *buf = malloc(sizeof(*buf) * (size_t)brows * k);
    uint32_t *perm = malloc(sizeof(*perm) * ns);
    uint32_t *cnt = malloc(sizeof(*cnt) * k);
    float *norm = malloc(sizeof(*norm) * ns);
    uint32_t *prev = malloc(sizeof(*prev) * ns);
    seg_gain_t *gain = malloc(sizeof(*gain) * ns);
    int reseeded = 0;
    int rc = 0;

    if (!sum || !buf || !perm || !cnt || !norm || !prev || !gain) {
        rc = KVS_ENOMEM;
        goto out;
    }
    /* Norms only matter when a cluster empties: computed then, once. */
    int have_norm = 0;

    /* Partial Fisher-Yates: k distinct keys. */
    kvs_rng_t st = {p->seed};
    for (uint32_t i = 0; i < ns; i++)
        perm[i] = i;
    for (uint32_t i = 0; i < k && init; i++) {
        uint32_t j = i + (uint32_t)(kvs_rng_next(&st) % (ns - i));
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        memcpy(cent + (size_t)i * d, xs + (size_t)perm[i] * d,
               sizeof(*cent) * d);
    }
    if (init)
        seg_normalize_rows(cent, k, d);

    for (uint32_t it = 0; it < iters; it++) {
        seg_assign(xs, ns, d, cent, k, buf, brows, label, score);
        if (it > 0 && !reseeded) {
            uint32_t changed = 0;
            for (uint32_t i = 0; i < ns; i++)
                changed += label[i] != prev[i];
            if (changed <= cfg->eps * ns)
                goto out;
        }
        memcpy(prev, label, sizeof(*prev) * ns);
        reseeded = 0;
        memset(sum, 0, sizeof(*sum) * (size_t)k * d);
        memset(cnt, 0, sizeof(*cnt) * k);
        for (uint32_t i = 0; i < ns; i++) {
            seg_acc_row(sum + (size_t)label[i] * d, xs + (size_t)i * d, d);
            cnt[label[i]]++;
        }
        uint32_t n_empty = 0;
        for (uint32_t c = 0; c < k; c++)
            n_empty += cnt[c] == 0;
        if (n_empty) {
            for (uint32_t i = 0; i < ns && !have_norm; i++) {
                double s = 0;
                for (uint32_t j = 0; j < d; j++)
                    s += (double)xs[(size_t)i * d + j] * xs[(size_t)i * d + j];
                norm[i] = (float)sqrt(s);
            }
            have_norm = 1;
            for (uint32_t i = 0; i < ns; i++) {
                gain[i].gain = norm[i] - score[i];
                gain[i].i = i;
            }
            qsort(gain, ns, sizeof(*gain), seg_gain_cmp);
            reseeded = 1;
        }
        for (uint32_t c = 0, e = 0; c < k; c++) {
            float *cc = cent + (size_t)c * d;
            if (cnt[c] == 0) {
                memcpy(cc, xs + (size_t)gain[e++].i * d, sizeof(*cc) * d);
                continue;
            }
            for (uint32_t j = 0; j < d; j++)
                cc[j] = (float)sum[(size_t)c * d + j];
        }
        seg_normalize_rows(cent, k, d);
    }
out:
    free(sum);
    free(buf);
    free(perm);
    free(cnt);
    free(norm);
    free(prev);
    free(gain);
    return rc;
}

/*
 * k-means of the centred keys xc [n][d] into k clusters, then the final
 * assignment: label[i] receives key i's cluster in [0, k) against the last
 * normalised centroids. Clusters can end up empty; the caller drops them.
 */
static int seg_cluster(const kvs_build_params_t *p, uint32_t d, uint32_t n,
                       uint32_t k, const float *xc, uint32_t *label,
                       float *score, char *err, size_t errlen) {
    seg_km_cfg_t cfg = seg_km_cfg(p, k);
    uint32_t ns = cfg.sample && cfg.sample < n ? cfg.sample : n;
    float *cent = malloc(sizeof(*cent) * (size_t)k * d);
    float *xs = ns < n ? malloc(sizeof(*xs) * (size_t)ns * d) : NULL;
    float *buf = malloc(sizeof(*buf) * (size_t)seg_block_rows(n, k) * k);
    int rc = 0;
    if (!cent || !buf || (ns < n && !xs)) {
        rc = kvs__errf(err, errlen, KVS_ENOMEM, "out of memory");
        goto out;
    }
    if (ns < n) {
        /* Evenly spaced rows: the segment is a run of tokens. */
        for (uint32_t i = 0; i < ns; i++)
            memcpy(xs + (size_t)i * d, xc + (size_t)((uint64_t)i * n / ns) * d,
                   sizeof(*xs) * d);
    }
    rc = seg_kmeans(p, &cfg, cfg.iters, 1, d, ns, k, ns < n ? xs : xc, cent,
                    label, score);
    if (!rc && ns < n && cfg.refine)
        rc =
            seg_kmeans(p, &cfg, cfg.refine, 0, d, n, k, xc, cent, label, score);
    if (rc) {
        rc = kvs__errf(err, errlen, rc, "out of memory");
        goto out;
    }
    seg_assign(xc, n, d, cent, k, buf, seg_block_rows(n, k), label, score);
out:
    free(cent);
    free(xs);
    free(buf);
    return rc;
}

/* Mean (in double) of rows src[slot] for slots in [lo, hi) whose `skip`
 * entry is 0 (all when skip is NULL), stored to dst [d] in `dtype`. Returns
 * the number of rows averaged; zeros are stored when it is 0. */
static uint32_t seg_mean_rows(kvs_dtype_t dtype, uint32_t d, const float *src,
                              uint32_t lo, uint32_t hi, const uint8_t *skip,
                              double *acc, float *tmp, void *dst) {
    uint32_t cnt = 0;
    memset(acc, 0, sizeof(*acc) * d);
    for (uint32_t s = lo; s < hi; s++) {
        if (skip && skip[s])
            continue;
        seg_acc_row(acc, src + (size_t)s * d, d);
        cnt++;
    }
    for (uint32_t j = 0; j < d; j++)
        tmp[j] = cnt ? (float)(acc[j] / cnt) : 0.0f;
    kvs_from_f32(dtype, tmp, dst, d);
    return cnt;
}

static void seg_adj_free(kvs_cluster_adj_t *a) {
    free(a->cluster);
    free(a->count);
    free(a->value_means);
    memset(a, 0, sizeof(*a));
}

/*
 * Fill one adjustment table: every cluster with a member whose `steady`
 * entry (indexed by slot) is set, with the count and value mean of its
 * other members. vals is the fp32 values in slot order.
 */
static int seg_adj_build(kvs_segment_t *seg, const uint8_t *steady,
                         const float *vals, uint8_t flag, kvs_cluster_adj_t *a,
                         double *acc, float *tmp) {
    size_t row = kvs_dtype_size(seg->dtype) * seg->d;
    uint32_t m = 0;

    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++) {
            if (steady[s]) {
                seg->adj_flags[c] |= flag;
                m++;
                break;
            }
        }
    }
    a->n = m;
    if (m == 0)
        return 0;
    a->cluster = malloc(sizeof(*a->cluster) * m);
    a->count = malloc(sizeof(*a->count) * m);
    a->value_means = malloc(row * m);
    if (!a->cluster || !a->count || !a->value_means)
        return KVS_ENOMEM;
    uint32_t i = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        if (!(seg->adj_flags[c] & flag))
            continue;
        a->cluster[i] = c;
        a->count[i] = seg_mean_rows(seg->dtype, seg->d, vals, seg->offsets[c],
                                    seg->offsets[c + 1], steady, acc, tmp,
                                    (char *)a->value_means + row * i);
        i++;
    }
    assert(i == m);
    return 0;
}

void kvs_segment_free(kvs_segment_t *seg) {
    if (!seg)
        return;
    free(seg->offsets);
    free(seg->positions);
    free(seg->keys);
    free(seg->values);
    free(seg->centroids);
    free(seg->value_means);
    free(seg->counts);
    free(seg->adj_flags);
    seg_adj_free(&seg->adj_always);
    seg_adj_free(&seg->adj_last);
    kvs_codes_free(seg->codes);
    free(seg);
}

/* The checks both builders share. */
static int seg_check(const kvs_build_params_t *params, kvs_dtype_t dtype,
                     uint32_t d, uint32_t n, const void *keys,
                     const void *values, kvs_segment_t **out, char *err,
                     size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    if (!params || !keys || !values || !out)
        return kvs__errf(err, errlen, KVS_EINVAL, "NULL argument");
    *out = NULL;
    if (kvs_dtype_size(dtype) == 0)
        return kvs__errf(err, errlen, KVS_EINVAL, "unknown dtype %d",
                         (int)dtype);
    if (n == 0 || d == 0)
        return kvs__errf(err, errlen, KVS_EINVAL, "empty segment (n=%u d=%u)",
                         n, d);
    if (n <= params->window_tokens)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "segment of %u tokens does not exceed the window "
                         "of %u",
                         n, params->window_tokens);
    if (params->cluster_tokens == 0)
        return kvs__errf(err, errlen, KVS_EINVAL, "cluster_tokens is 0");
    /* cblas takes int dimensions. */
    if (d > INT_MAX || n > INT_MAX)
        return kvs__errf(err, errlen, KVS_EINVAL, "segment too large");
    return 0;
}

uint32_t kvs_segment_clusters(const kvs_build_params_t *params, uint32_t n) {
    uint32_t k = (uint32_t)(((uint64_t)n + params->cluster_tokens / 2) /
                            params->cluster_tokens);
    return k ? k : 1;
}

static int seg_from_labels(const kvs_build_params_t *params, kvs_dtype_t dtype,
                           uint32_t d, uint64_t first_pos, uint32_t n,
                           const void *keys, const void *values, uint32_t k,
                           const uint32_t *label, const float *kf, float *xc,
                           kvs_segment_t **out, char *err, size_t errlen);

int kvs_segment_build(const kvs_build_params_t *params, kvs_dtype_t dtype,
                      uint32_t d, uint64_t first_pos, uint32_t n,
                      const void *keys, const void *values, kvs_segment_t **out,
                      char *err, size_t errlen) {
    int rc = seg_check(params, dtype, d, n, keys, values, out, err, errlen);
    if (rc)
        return rc;
    const size_t nd = (size_t)n * d;
    const uint32_t k = kvs_segment_clusters(params, n);
    assert(k <= n);
    float *kf = malloc(sizeof(*kf) * nd);
    float *xc = malloc(sizeof(*xc) * nd);
    double *acc = malloc(sizeof(*acc) * d);
    float *mean = malloc(sizeof(*mean) * d);
    uint32_t *label = malloc(sizeof(*label) * n);
    float *score = malloc(sizeof(*score) * n);
    if (!kf || !xc || !acc || !mean || !label || !score) {
        rc = kvs__errf(err, errlen, KVS_ENOMEM, "out of memory");
        goto out;
    }
    /* Centre the keys (for the assignment only). */
    kvs_to_f32(dtype, keys, kf, nd);
    if (!kvs_all_finite(KVS_DTYPE_F32, kf, nd)) {
        rc = kvs__errf(err, errlen, KVS_ENOTFINITE, "keys contain NaN or Inf");
        goto out;
    }
    memset(acc, 0, sizeof(*acc) * d);
    for (uint32_t i = 0; i < n; i++)
        seg_acc_row(acc, kf + (size_t)i * d, d);
    for (uint32_t j = 0; j < d; j++)
        mean[j] = (float)(acc[j] / n);
    for (uint32_t i = 0; i < n; i++) {
        const float *r = kf + (size_t)i * d;
        float *o = xc + (size_t)i * d;
        uint32_t j = 0;
#ifdef __SSE2__
        for (; j + 4 <= d; j += 4)
            _mm_storeu_ps(
                o + j, _mm_sub_ps(_mm_loadu_ps(r + j), _mm_loadu_ps(mean + j)));
#endif
        for (; j < d; j++)
            o[j] = r[j] - mean[j];
    }
    if (k == 1) {
        memset(label, 0, sizeof(*label) * n);
    } else if ((rc = seg_cluster(params, d, n, k, xc, label, score, err,
                                 errlen))) {
        goto out;
    }
    rc = seg_from_labels(params, dtype, d, first_pos, n, keys, values, k, label,
                         kf, xc, out, err, errlen);
out:
    free(kf);
    free(xc);
    free(acc);
    free(mean);
    free(label);
    free(score);
    return rc;
}

int kvs_segment_from_labels(const kvs_build_params_t *params, kvs_dtype_t dtype,
                            uint32_t d, uint64_t first_pos, uint32_t n,
                            const void *keys, const void *values, uint32_t k,
                            const uint32_t *label, kvs_segment_t **out,
                            char *err, size_t errlen) {
    int rc = seg_check(params, dtype, d, n, keys, values, out, err, errlen);
    if (rc)
        return rc;
    if (!label || k == 0 || k > n)
        return kvs__errf(err, errlen, KVS_EINVAL, "bad labels (k=%u, n=%u)", k,
                         n);
    for (uint32_t i = 0; i < n; i++)
        if (label[i] >= k)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "label %u of token %u out of range (k=%u)",
                             label[i], i, k);
    const size_t nd = (size_t)n * d;
    float *kf = malloc(sizeof(*kf) * nd);
    float *xc = malloc(sizeof(*xc) * nd);
    if (!kf || !xc) {
        rc = kvs__errf(err, errlen, KVS_ENOMEM, "out of memory");
        goto out;
    }
    kvs_to_f32(dtype, keys, kf, nd);
    if (!kvs_all_finite(KVS_DTYPE_F32, kf, nd)) {
        rc = kvs__errf(err, errlen, KVS_ENOTFINITE, "keys contain NaN or Inf");
        goto out;
    }
    rc = seg_from_labels(params, dtype, d, first_pos, n, keys, values, k, label,
                         kf, xc, out, err, errlen);
out:
    free(kf);
    free(xc);
    return rc;
}

/*
 * kvs_segment_from_labels on checked arguments: kf [n][d] is the keys in
 * fp32 (token order, finite), xc [n][d] scratch.
 */
static int seg_from_labels(const kvs_build_params_t *params, kvs_dtype_t dtype,
                           uint32_t d, uint64_t first_pos, uint32_t n,
                           const void *keys, const void *values, uint32_t k,
                           const uint32_t *label, const float *kf, float *xc,
                           kvs_segment_t **out, char *err, size_t errlen) {
    const size_t esz = kvs_dtype_size(dtype);
    const size_t nd = (size_t)n * d;
    double *acc = malloc(sizeof(*acc) * d);
    float *tmp = malloc(sizeof(*tmp) * d);
    uint32_t *cnt = calloc(k, sizeof(*cnt));
    uint32_t *remap = malloc(sizeof(*remap) * k);
    uint32_t *fill = malloc(sizeof(*fill) * (k + 1));
    uint8_t *steady = calloc(n, 1);
    kvs_segment_t *seg = calloc(1, sizeof(*seg));
    int rc;
    if (!acc || !tmp || !cnt || !remap || !fill || !steady || !seg) {
        rc = kvs__errf(err, errlen, KVS_ENOMEM, "out of memory");
        goto fail;
    }

    /* Drop empty clusters, keeping the survivors in label order. */
    for (uint32_t i = 0; i < n; i++)
        cnt[label[i]]++;
    uint32_t nc = 0;
    for (uint32_t c = 0; c < k; c++)
        remap[c] = cnt[c] ? nc++ : UINT32_MAX;

    seg->dtype = dtype;
    seg->d = d;
    seg->first_pos = first_pos;
    seg->n_tokens = n;
    seg->n_clusters = nc;
    seg->offsets = malloc(sizeof(*seg->offsets) * (nc + 1));
    seg->positions = malloc(sizeof(*seg->positions) * n);
    seg->keys = malloc(esz * nd);
    seg->values = malloc(esz * nd);
    seg->centroids = malloc(esz * d * nc);
    seg->value_means = malloc(esz * d * nc);
    seg->counts = malloc(sizeof(*seg->counts) * nc);
    seg->adj_flags = calloc(nc, 1);
    if (!seg->offsets || !seg->positions || !seg->keys || !seg->values ||
        !seg->centroids || !seg->value_means || !seg->counts ||
        !seg->adj_flags) {
        rc = kvs__errf(err, errlen, KVS_ENOMEM, "out of memory");
        goto fail;
    }

    /* Counting sort; a stable one, so members stay in token order. */
    seg->offsets[0] = 0;
    for (uint32_t c = 0; c < k; c++) {
        if (remap[c] == UINT32_MAX)
            continue;
        seg->counts[remap[c]] = cnt[c];
        seg->offsets[remap[c] + 1] = seg->offsets[remap[c]] + cnt[c];
    }
    assert(seg->offsets[nc] == n);
    memcpy(fill, seg->offsets, sizeof(*fill) * nc);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t s = fill[remap[label[i]]]++;
        seg->positions[s] = i;
        memcpy((char *)seg->keys + (size_t)s * d * esz,
               (const char *)keys + (size_t)i * d * esz, d * esz);
        memcpy((char *)seg->values + (size_t)s * d * esz,
               (const char *)values + (size_t)i * d * esz, d * esz);
    }

    /* Centroids: raw key means (xc: the raw keys in slot order). */
    for (uint32_t s = 0; s < n; s++)
        memcpy(xc + (size_t)s * d, kf + (size_t)seg->positions[s] * d,
               sizeof(*xc) * d);
    for (uint32_t c = 0; c < nc; c++)
        seg_mean_rows(dtype, d, xc, seg->offsets[c], seg->offsets[c + 1], NULL,
                      acc, tmp, (char *)seg->centroids + esz * d * c);
    /* Codes from the fp32 keys in hand (which they rotate in place). One
     * rotation for every segment (not the per-segment k-means seed), so a
     * query is rotated once per call, not once per segment. */
    if (kvs_codes_dim(d) &&
        (rc = kvs__segment_build_codes_f32(seg, KVS_CODES_SEED, xc))) {
        rc = kvs__errf(err, errlen, rc, "out of memory");
        goto fail;
    }

    /* Value means, from fp32 values in slot order (xc again). */
    kvs_to_f32(dtype, seg->values, xc, nd);
    for (uint32_t c = 0; c < nc; c++)
        seg_mean_rows(dtype, d, xc, seg->offsets[c], seg->offsets[c + 1], NULL,
                      acc, tmp, (char *)seg->value_means + esz * d * c);

    /* Adjustment tables: sinks, then sinks plus the segment's last window. */
    for (uint32_t s = 0; s < n; s++)
        steady[s] = first_pos + seg->positions[s] < params->sink_tokens;
    rc = seg_adj_build(seg, steady, xc, SEG_ADJ_ALWAYS, &seg->adj_always, acc,
                       tmp);
    if (rc == 0) {
        uint32_t win_lo = n - params->window_tokens;
        for (uint32_t s = 0; s < n; s++)
            steady[s] |= seg->positions[s] >= win_lo;
        rc = seg_adj_build(seg, steady, xc, SEG_ADJ_LAST, &seg->adj_last, acc,
                           tmp);
    }
    if (rc) {
        rc = kvs__errf(err, errlen, rc, "out of memory");
        goto fail;
    }

    *out = seg;
    seg = NULL;
    rc = 0;
fail:
    kvs_segment_free(seg);
    free(acc);
    free(tmp);
    free(cnt);
    free(remap);
    free(fill);
    free(steady);
    return rc;
}

static size_t seg_adj_bytes(const kvs_cluster_adj_t *a, size_t row) {
    return (size_t)a->n * (sizeof(*a->cluster) + sizeof(*a->count) + row);
}

size_t kvs_segment_index_bytes(const kvs_segment_t *seg) {
    if (!seg)
        return 0;
    size_t row = kvs_dtype_size(seg->dtype) * seg->d;
    size_t nc = seg->n_clusters;
    return sizeof(*seg) + sizeof(*seg->offsets) * (nc + 1) +
           sizeof(*seg->positions) * seg->n_tokens + 2 * row * nc +
           sizeof(*seg->counts) * nc + sizeof(*seg->adj_flags) * nc +
           seg_adj_bytes(&seg->adj_always, row) +
           seg_adj_bytes(&seg->adj_last, row) +
           (seg->codes ? kvs_codes_bytes(seg->n_tokens, nc, seg->d) : 0);
}

size_t kvs_segment_bytes(const kvs_segment_t *seg) {
    if (!seg)
        return 0;
    size_t row = kvs_dtype_size(seg->dtype) * seg->d;
    return kvs_segment_index_bytes(seg) + 2 * row * seg->n_tokens;
}

/* Index of cluster c in a (which lists it: the caller checked the flag). */
static uint32_t seg_adj_find(const kvs_cluster_adj_t *a, uint32_t c) {
    uint32_t lo = 0, hi = a->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (a->cluster[mid] < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    assert(lo < a->n && a->cluster[lo] == c);
    return lo;
}

uint32_t kvs_segment_cluster_view(const kvs_segment_t *seg, uint32_t c,
                                  int is_last, const void **value_mean) {
    assert(seg && c < seg->n_clusters);
    size_t row = kvs_dtype_size(seg->dtype) * seg->d;
    const kvs_cluster_adj_t *a = NULL;

    if (is_last && (seg->adj_flags[c] & SEG_ADJ_LAST))
        a = &seg->adj_last;
    else if (seg->adj_flags[c] & SEG_ADJ_ALWAYS)
        a = &seg->adj_always;
    if (a) {
        uint32_t i = seg_adj_find(a, c);
        if (value_mean)
            *value_mean = (const char *)a->value_means + row * i;
        return a->count[i];
    }
    if (value_mean)
        *value_mean = (const char *)seg->value_means + row * c;
    return seg->counts[c];
}
