/*
 * test_index_segment.c: the wave-index segment builder (index/segment.c) and
 * the FAISS C API shim (faiss_c/faiss_c.cpp).
 *
 * Segments are built from structured synthetic keys: a few random unit
 * directions plus noise, all shifted by one large common offset, which is
 * what real attention keys look like and what makes centring matter. Every
 * property is checked by brute force against the inputs: the permutation,
 * bit-exact cluster-ordered rows, centroids and value means, the adjustment
 * tables and kvs_segment_cluster_view(). The clustering itself is checked to
 * be deterministic and to beat a random assignment of the same cluster
 * sizes by a wide margin, and to be about as good as FAISS's own spherical
 * k-means on the same data.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/Clustering_c.h>
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/IndexIVFFlat_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>

#include "kvs_rng.h"
#include "kvs_index.h"
#include "kvs_kernels.h"

/* ---- data -------------------------------------------------------------- */

static kvs_rng_t rng;

static uint64_t rng_next(void) {
    return kvs_rng_next(&rng);
}
static float rng_gauss(void) {
    return kvs_rng_normal(&rng);
}

/* Keys and values of n tokens, [n][d] fp32 and in `dtype`. */
typedef struct data_s {
    kvs_dtype_t dtype;
    uint32_t n, d;
    float *kf, *vf; /* fp32 copies of what is stored (after rounding) */
    void *keys, *vals;
    int *truth; /* generating direction of each key */
} data_t;

static void data_make(data_t *t, kvs_dtype_t dtype, uint32_t n, uint32_t d,
                      uint32_t ndir, uint64_t seed) {
    size_t esz = kvs_dtype_size(dtype);
    float *dir = malloc(sizeof(float) * ndir * d);
    float *off = malloc(sizeof(float) * d);
    assert_non_null(dir);
    assert_non_null(off);
    rng.s = seed;
    t->dtype = dtype;
    t->n = n;
    t->d = d;
    t->kf = malloc(sizeof(float) * n * d);
    t->vf = malloc(sizeof(float) * n * d);
    t->keys = malloc(esz * n * d);
    t->vals = malloc(esz * n * d);
    t->truth = malloc(sizeof(int) * n);
    assert_non_null(t->kf);
    assert_non_null(t->vf);
    assert_non_null(t->keys);
    assert_non_null(t->vals);
    assert_non_null(t->truth);
    for (uint32_t j = 0; j < d; j++)
        off[j] = 4.0f + rng_gauss(); /* the common component */
    for (uint32_t i = 0; i < ndir * d; i++)
        dir[i] = 2.0f * rng_gauss() / sqrtf((float)d) * 3.0f;
    for (uint32_t i = 0; i < n; i++) {
        int c = (int)(rng_next() % ndir);
        t->truth[i] = c;
        for (uint32_t j = 0; j < d; j++) {
            t->kf[i * d + j] = off[j] + dir[c * d + j] + 0.3f * rng_gauss();
            t->vf[i * d + j] = rng_gauss() + (float)c;
        }
    }
    /* Store in dtype, then read back so the fp32 copies are exact. */
    kvs_from_f32(dtype, t->kf, t->keys, (size_t)n * d);
    kvs_from_f32(dtype, t->vf, t->vals, (size_t)n * d);
    kvs_to_f32(dtype, t->keys, t->kf, (size_t)n * d);
    kvs_to_f32(dtype, t->vals, t->vf, (size_t)n * d);
    free(dir);
    free(off);
}

static void data_free(data_t *t) {
    free(t->kf);
    free(t->vf);
    free(t->keys);
    free(t->vals);
    free(t->truth);
}

static kvs_build_params_t params(uint32_t ct, uint32_t sinks, uint32_t win) {
    kvs_build_params_t p = {.cluster_tokens = ct,
                            .kmeans_iters = 10,
                            .sink_tokens = sinks,
                            .window_tokens = win,
                            .seed = 42};
    return p;
}

static kvs_segment_t *build(const kvs_build_params_t *p, const data_t *t,
                            uint64_t first_pos) {
    kvs_segment_t *seg = NULL;
    char err[256];
    int rc = kvs_segment_build(p, t->dtype, t->d, first_pos, t->n, t->keys,
                               t->vals, &seg, err, sizeof(err));
    if (rc != 0)
        fail_msg("kvs_segment_build: %d %s", rc, err);
    assert_non_null(seg);
    return seg;
}

/* ---- brute-force checks -------------------------------------------------- */

/* Tolerance of a mean stored in dtype, relative to the magnitudes summed. */
static double rel_tol(kvs_dtype_t dtype) {
    switch (dtype) {
    case KVS_DTYPE_F32:
        return 1e-5;
    case KVS_DTYPE_F16:
        return 1e-3;
    default:
        return 8e-3;
    }
}

/* `got` (a [d] row in dtype) is the mean of src rows [pos[i]] for the i in
 * [lo, hi) whose position is not `skip`ped; count is the number of those. */
static void check_mean(const data_t *t, const float *src, const void *got,
                       const uint32_t *pos, uint32_t lo, uint32_t hi,
                       const uint8_t *skip, uint32_t count) {
    uint32_t d = t->d, m = 0;
    double *sum = calloc(d, sizeof(double));
    double *mag = calloc(d, sizeof(double));
    float *g = malloc(sizeof(float) * d);
    assert_non_null(sum);
    assert_non_null(mag);
    assert_non_null(g);
    for (uint32_t s = lo; s < hi; s++) {
        if (skip && skip[pos[s]])
            continue;
        for (uint32_t j = 0; j < d; j++) {
            sum[j] += src[(size_t)pos[s] * d + j];
            mag[j] += fabs(src[(size_t)pos[s] * d + j]);
        }
        m++;
    }
    assert_int_equal(m, count);
    kvs_to_f32(t->dtype, got, g, d);
    for (uint32_t j = 0; j < d; j++) {
        if (m == 0) {
            assert_true(g[j] == 0.0f);
            continue;
        }
        /* mean x count against the members' sum */
        double diff = fabs((double)g[j] * m - sum[j]);
        double tol = rel_tol(t->dtype) * (mag[j] + 1e-3);
        if (diff > tol)
            fail_msg("mean[%u] x %u = %g, sum %g (tol %g)", j, m,
                     (double)g[j] * m, sum[j], tol);
    }
    free(sum);
    free(mag);
    free(g);
}

/* Checks one adjustment table against the steady set `steady` (by
 * position); flag is its bit in adj_flags. */
static void check_adj(const data_t *t, const kvs_segment_t *seg,
                      const kvs_cluster_adj_t *a, const uint8_t *steady,
                      uint8_t flag) {
    size_t row = kvs_dtype_size(t->dtype) * t->d;
    uint32_t i = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        uint32_t n_steady = 0;
        for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++)
            n_steady += steady[seg->positions[s]];
        int listed = n_steady > 0;
        assert_int_equal(!!(seg->adj_flags[c] & flag), listed);
        if (!listed)
            continue;
        assert_true(i < a->n);
        if (i > 0)
            assert_true(a->cluster[i - 1] < a->cluster[i]);
        assert_int_equal(a->cluster[i], c);
        assert_int_equal(a->count[i], seg->counts[c] - n_steady);
        check_mean(t, t->vf, (const char *)a->value_means + row * i,
                   seg->positions, seg->offsets[c], seg->offsets[c + 1], steady,
                   a->count[i]);
        i++;
    }
    assert_int_equal(i, a->n);
}

/* Every documented property of seg, built from t with p at first_pos. */
static void check_segment(const data_t *t, const kvs_build_params_t *p,
                          uint64_t first_pos, const kvs_segment_t *seg) {
    uint32_t n = t->n, d = t->d;
    size_t esz = kvs_dtype_size(t->dtype), row = esz * d;
    uint32_t k_max = (n + p->cluster_tokens / 2) / p->cluster_tokens;
    if (k_max == 0)
        k_max = 1;

    assert_int_equal(seg->dtype, t->dtype);
    assert_int_equal(seg->d, d);
    assert_int_equal(seg->n_tokens, n);
    assert_true(seg->first_pos == first_pos);
    assert_true(seg->n_clusters >= 1);
    assert_true(seg->n_clusters <= k_max);

    /* offsets/counts: contiguous, non-empty, summing to n */
    assert_int_equal(seg->offsets[0], 0);
    uint64_t total = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        assert_true(seg->counts[c] > 0);
        assert_int_equal(seg->offsets[c + 1] - seg->offsets[c], seg->counts[c]);
        total += seg->counts[c];
    }
    assert_true(total == n);
    assert_int_equal(seg->offsets[seg->n_clusters], n);

    /* positions: a permutation, in token order inside a cluster */
    uint8_t *seen = calloc(n, 1);
    assert_non_null(seen);
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++) {
            uint32_t q = seg->positions[s];
            assert_true(q < n);
            assert_int_equal(seen[q], 0);
            seen[q] = 1;
            if (s > seg->offsets[c])
                assert_true(seg->positions[s - 1] < q);
        }
    }
    free(seen);

    /* rows bit-equal to the inputs at their positions */
    for (uint32_t s = 0; s < n; s++) {
        size_t q = seg->positions[s];
        assert_memory_equal((const char *)seg->keys + row * s,
                            (const char *)t->keys + row * q, row);
        assert_memory_equal((const char *)seg->values + row * s,
                            (const char *)t->vals + row * q, row);
    }

    /* centroids = member means of raw keys; value means likewise */
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        check_mean(t, t->kf, (const char *)seg->centroids + row * c,
                   seg->positions, seg->offsets[c], seg->offsets[c + 1], NULL,
                   seg->counts[c]);
        check_mean(t, t->vf, (const char *)seg->value_means + row * c,
                   seg->positions, seg->offsets[c], seg->offsets[c + 1], NULL,
                   seg->counts[c]);
    }

    /* adjustment tables, by brute force over positions */
    uint8_t *always = calloc(n, 1), *last = calloc(n, 1);
    assert_non_null(always);
    assert_non_null(last);
    for (uint32_t q = 0; q < n; q++) {
        always[q] = first_pos + q < p->sink_tokens;
        last[q] = always[q] || q >= n - p->window_tokens;
    }
    for (uint32_t c = 0; c < seg->n_clusters; c++)
        assert_int_equal(seg->adj_flags[c] & ~3u, 0);
    check_adj(t, seg, &seg->adj_always, always, 1);
    check_adj(t, seg, &seg->adj_last, last, 2);

    /* cluster view: last table when newest and listed, else always table
     * when listed, else the plain cluster */
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        for (int is_last = 0; is_last <= 1; is_last++) {
            const uint8_t *st = NULL;
            const kvs_cluster_adj_t *a = NULL;
            if (is_last && (seg->adj_flags[c] & 2)) {
                st = last;
                a = &seg->adj_last;
            } else if (seg->adj_flags[c] & 1) {
                st = always;
                a = &seg->adj_always;
            }
            const void *vm = NULL;
            uint32_t cnt = kvs_segment_cluster_view(seg, c, is_last, &vm);
            assert_non_null(vm);
            if (!a) {
                assert_int_equal(cnt, seg->counts[c]);
                assert_ptr_equal(vm, (const char *)seg->value_means + row * c);
                continue;
            }
            uint32_t expect = 0;
            for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++)
                expect += !st[seg->positions[s]];
            assert_int_equal(cnt, expect);
            check_mean(t, t->vf, vm, seg->positions, seg->offsets[c],
                       seg->offsets[c + 1], st, cnt);
            /* NULL value_mean is allowed */
            assert_int_equal(kvs_segment_cluster_view(seg, c, is_last, NULL),
                             cnt);
            (void)a;
        }
    }
    free(always);
    free(last);

    /* sizes */
    size_t nc = seg->n_clusters;
    size_t raw = 2 * row * n;
    assert_true(kvs_segment_bytes(seg) == kvs_segment_index_bytes(seg) + raw);
    assert_true(kvs_segment_index_bytes(seg) >=
                2 * row * nc + sizeof(uint32_t) * (n + 2 * nc + 1) + nc);
}

/* Spherical k-means objective of an assignment (cluster of each position):
 * sum over clusters of |sum of centred member keys|, i.e. sum_i x_i.c_i with
 * each c the best unit vector for its members. */
static double objective(const data_t *t, const uint32_t *cluster_of,
                        uint32_t k) {
    uint32_t n = t->n, d = t->d;
    double *mean = calloc(d, sizeof(double));
    double *sum = calloc((size_t)k * d, sizeof(double));
    assert_non_null(mean);
    assert_non_null(sum);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            mean[j] += t->kf[(size_t)i * d + j] / n;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            sum[(size_t)cluster_of[i] * d + j] +=
                t->kf[(size_t)i * d + j] - mean[j];
    double obj = 0;
    for (uint32_t c = 0; c < k; c++) {
        double s = 0;
        for (uint32_t j = 0; j < d; j++)
            s += sum[(size_t)c * d + j] * sum[(size_t)c * d + j];
        obj += sqrt(s);
    }
    free(mean);
    free(sum);
    return obj;
}

static uint32_t *cluster_of_positions(const kvs_segment_t *seg) {
    uint32_t *co = malloc(sizeof(uint32_t) * seg->n_tokens);
    assert_non_null(co);
    for (uint32_t c = 0; c < seg->n_clusters; c++)
        for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++)
            co[seg->positions[s]] = c;
    return co;
}

/* ---- tests -------------------------------------------------------------- */

static void test_index_segment_f32_invariants(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_F32, 2048, 64, 24, 1);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *seg = build(&p, &t, 0);
    check_segment(&t, &p, 0, seg);
    assert_true(seg->adj_always.n >= 1 && seg->adj_always.n <= 4);
    assert_true(seg->adj_last.n >= seg->adj_always.n);
    kvs_segment_free(seg);
    data_free(&t);
}

static void test_index_segment_f16_bf16(void **state) {
    (void)state;
    kvs_dtype_t types[2] = {KVS_DTYPE_F16, KVS_DTYPE_BF16};
    for (int i = 0; i < 2; i++) {
        data_t t;
        data_make(&t, types[i], 1500, 128, 16, 2 + i);
        kvs_build_params_t p = params(16, 4, 64);
        kvs_segment_t *seg = build(&p, &t, 0);
        check_segment(&t, &p, 0, seg);
        kvs_segment_free(seg);
        data_free(&t);
    }
}

/* n not a multiple of cluster_tokens, a segment past the sinks, and one that
 * starts inside them. */
static void test_index_segment_shapes(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_F32, 1000, 32, 12, 4);
    struct {
        uint32_t ct, sinks, win;
        uint64_t first_pos;
    } cases[] = {
        {16, 4, 64, 0},    /* k = round(62.5) = 63 */
        {16, 4, 64, 8192}, /* no sinks in this segment */
        {16, 4, 64, 2},    /* positions 0 and 1 are sinks */
        {7, 0, 0, 100},    /* no steady zone at all */
        {1, 4, 10, 0},     /* k = n */
        {5000, 4, 64, 0},  /* k = 1 */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        kvs_build_params_t p =
            params(cases[i].ct, cases[i].sinks, cases[i].win);
        kvs_segment_t *seg = build(&p, &t, cases[i].first_pos);
        check_segment(&t, &p, cases[i].first_pos, seg);
        if (cases[i].first_pos >= cases[i].sinks)
            assert_int_equal(seg->adj_always.n, 0);
        if (cases[i].win == 0 && cases[i].first_pos >= cases[i].sinks)
            assert_int_equal(seg->adj_last.n, 0);
        if (cases[i].ct == 5000)
            assert_int_equal(seg->n_clusters, 1);
        kvs_segment_free(seg);
    }
    data_free(&t);
}

static void test_index_segment_tiny(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_F32, 70, 16, 3, 5);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *seg = build(&p, &t, 0);
    check_segment(&t, &p, 0, seg);
    /* 4 clusters at most; only positions 4, 5 are outside the steady zone
     * of the newest segment */
    assert_true(seg->n_clusters <= 4);
    uint32_t left = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++)
        left += kvs_segment_cluster_view(seg, c, 1, NULL);
    assert_int_equal(left, 2);
    left = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++)
        left += kvs_segment_cluster_view(seg, c, 0, NULL);
    assert_int_equal(left, 66);
    kvs_segment_free(seg);
    data_free(&t);
}

static void test_index_segment_deterministic(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_BF16, 1200, 64, 10, 6);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *a = build(&p, &t, 0), *b = build(&p, &t, 0);
    size_t row = kvs_dtype_size(t.dtype) * t.d;
    assert_int_equal(a->n_clusters, b->n_clusters);
    assert_memory_equal(a->offsets, b->offsets,
                        sizeof(uint32_t) * (a->n_clusters + 1));
    assert_memory_equal(a->positions, b->positions, sizeof(uint32_t) * t.n);
    assert_memory_equal(a->centroids, b->centroids, row * a->n_clusters);
    assert_memory_equal(a->value_means, b->value_means, row * a->n_clusters);
    assert_memory_equal(a->adj_flags, b->adj_flags, a->n_clusters);

    /* another seed gives another clustering */
    p.seed = 43;
    kvs_segment_t *c = build(&p, &t, 0);
    check_segment(&t, &p, 0, c);
    assert_true(c->n_clusters != a->n_clusters ||
                memcmp(c->positions, a->positions, sizeof(uint32_t) * t.n) !=
                    0);
    kvs_segment_free(a);
    kvs_segment_free(b);
    kvs_segment_free(c);
    data_free(&t);
}

/*
 * kvs_segment_from_labels (the GPU build's second half): the labels of a
 * built segment, with a few empty cluster ids mixed in, give the same
 * segment byte for byte; labels out of range are refused.
 */
static void test_index_segment_from_labels(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_BF16, 1500, 128, 12, 9);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *a = build(&p, &t, 8192);
    uint32_t *label = malloc(sizeof(uint32_t) * t.n);
    const uint32_t k = 2 * a->n_clusters + 1; /* odd ids stay empty */
    for (uint32_t c = 0; c < a->n_clusters; c++)
        for (uint32_t s = a->offsets[c]; s < a->offsets[c + 1]; s++)
            label[a->positions[s]] = 2 * c;
    kvs_segment_t *b = NULL;
    char err[256];
    assert_int_equal(kvs_segment_from_labels(&p, t.dtype, t.d, 8192, t.n,
                                             t.keys, t.vals, k, label, &b, err,
                                             sizeof err),
                     0);
    size_t ea = kvs_segment_encoded_size(a), eb = kvs_segment_encoded_size(b);
    assert_int_equal(ea, eb);
    void *xa = malloc(ea), *xb = malloc(eb);
    kvs_segment_encode(a, xa);
    kvs_segment_encode(b, xb);
    assert_memory_equal(xa, xb, ea);
    check_segment(&t, &p, 8192, b);
    kvs_segment_free(b);
    b = NULL;
    label[7] = k;
    assert_int_equal(kvs_segment_from_labels(&p, t.dtype, t.d, 8192, t.n,
                                             t.keys, t.vals, k, label, &b, err,
                                             sizeof err),
                     KVS_EINVAL);
    assert_null(b);
    assert_non_null(strstr(err, "out of range"));
    assert_int_equal(kvs_segment_clusters(&p, t.n), (t.n + 8) / 16);
    free(xa);
    free(xb);
    free(label);
    kvs_segment_free(a);
    data_free(&t);
}

/* k-means must beat a random assignment with the same cluster sizes by far,
 * and match FAISS's spherical k-means (through the C API) on the same data. */
static void test_index_segment_kmeans_quality(void **state) {
    (void)state;
    data_t t;
    uint32_t n = 2048, d = 64;
    data_make(&t, KVS_DTYPE_F32, n, d, 64, 7);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *seg = build(&p, &t, 0);
    uint32_t *co = cluster_of_positions(seg);
    double ours = objective(&t, co, seg->n_clusters);

    /* random: shuffle the positions over the same cluster sizes */
    uint32_t *perm = malloc(sizeof(uint32_t) * n);
    uint32_t *rnd = malloc(sizeof(uint32_t) * n);
    assert_non_null(perm);
    assert_non_null(rnd);
    for (uint32_t i = 0; i < n; i++)
        perm[i] = i;
    rng.s = 99;
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(rng_next() % (i + 1));
        uint32_t x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    for (uint32_t i = 0; i < n; i++)
        rnd[perm[i]] = co[i];
    double random = objective(&t, rnd, seg->n_clusters);
    assert_true(ours > 2.0 * random);

    /* FAISS, same algorithm: centred keys, spherical, 10 iterations, then
     * the final assignment against its normalised centroids */
    float *xc = malloc(sizeof(float) * n * d);
    double *mean = calloc(d, sizeof(double));
    assert_non_null(xc);
    assert_non_null(mean);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            mean[j] += t.kf[i * d + j] / n;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < d; j++)
            xc[i * d + j] = t.kf[i * d + j] - (float)mean[j];
    uint32_t k = (n + 8) / 16;
    FaissClusteringParameters cp;
    faiss_ClusteringParameters_init(&cp);
    cp.niter = 10;
    cp.spherical = 1;
    cp.verbose = 0;
    cp.min_points_per_centroid = 1;
    cp.max_points_per_centroid = (int)n;
    cp.seed = 42;
    FaissClustering *clus = NULL;
    FaissIndexFlatIP *index = NULL;
    assert_int_equal(faiss_IndexFlatIP_new_with(&index, d), 0);
    assert_int_equal(
        faiss_Clustering_new_with_params(&clus, (int)d, (int)k, &cp), 0);
    assert_int_equal(faiss_Clustering_train(clus, n, xc, index), 0);
    float *cent = NULL;
    size_t cent_size = 0;
    faiss_Clustering_centroids(clus, &cent, &cent_size);
    assert_int_equal(cent_size, (size_t)k * d);
    assert_int_equal(faiss_Index_ntotal(index), k);
    idx_t *lab = malloc(sizeof(idx_t) * n);
    float *dis = malloc(sizeof(float) * n);
    assert_non_null(lab);
    assert_non_null(dis);
    assert_int_equal(faiss_Index_search(index, n, xc, 1, dis, lab), 0);
    for (uint32_t i = 0; i < n; i++) {
        assert_true(lab[i] >= 0 && lab[i] < (idx_t)k);
        rnd[i] = (uint32_t)lab[i];
    }
    double faiss = objective(&t, rnd, k);
    print_message("spherical objective: ours %.1f, faiss %.1f, random %.1f\n",
                  ours, faiss, random);
    assert_true(ours > 0.97 * faiss);

    faiss_Clustering_free(clus);
    faiss_Index_free(index);
    free(lab);
    free(dis);
    free(xc);
    free(mean);
    free(perm);
    free(rnd);
    free(co);
    kvs_segment_free(seg);
    data_free(&t);
}

/*
 * The sample k-means (KVS_KMEANS=sample: a sample, then one pass over
 * every key) against the default (every key until nothing changes): valid
 * segments, deterministic, and a spherical objective within 2% of it (on
 * real keys it indexes a little worse: docs/index.md, "Build cost").
 */
static void test_index_segment_kmeans_methods(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_BF16, 2048, 128, 48, 12);
    kvs_build_params_t p = params(16, 4, 64);
    const char *old = getenv("KVS_KMEANS");
    char *saved = old ? strdup(old) : NULL;
    setenv("KVS_KMEANS", "sample", 1);
    kvs_segment_t *fast = build(&p, &t, 0), *again = build(&p, &t, 0);
    unsetenv("KVS_KMEANS");
    kvs_segment_t *full = build(&p, &t, 0);
    if (saved)
        setenv("KVS_KMEANS", saved, 1);
    else
        unsetenv("KVS_KMEANS");
    free(saved);
    check_segment(&t, &p, 0, fast);
    check_segment(&t, &p, 0, full);
    assert_int_equal(fast->n_clusters, again->n_clusters);
    assert_memory_equal(fast->positions, again->positions,
                        sizeof(uint32_t) * t.n);
    uint32_t *cf = cluster_of_positions(fast), *cu = cluster_of_positions(full);
    double of = objective(&t, cf, fast->n_clusters);
    double ou = objective(&t, cu, full->n_clusters);
    print_message("spherical objective: sample %.1f, full (default) %.1f\n", of,
                  ou);
    assert_true(of > 0.98 * ou);
    free(cf);
    free(cu);
    kvs_segment_free(fast);
    kvs_segment_free(again);
    kvs_segment_free(full);
    data_free(&t);
}

/* Centring matters: a large common offset must not decide the clusters.
 * With it, the recovered clusters should follow the generating directions. */
static void test_index_segment_recovers_directions(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_F32, 1024, 64, 8, 8);
    kvs_build_params_t p = params(64, 0, 0); /* 16 clusters for 8 groups */
    kvs_segment_t *seg = build(&p, &t, 0);
    /* purity: most members of each cluster share one direction */
    uint32_t agree = 0;
    for (uint32_t c = 0; c < seg->n_clusters; c++) {
        uint32_t hist[8] = {0}, best = 0;
        for (uint32_t s = seg->offsets[c]; s < seg->offsets[c + 1]; s++)
            hist[t.truth[seg->positions[s]]]++;
        for (int i = 0; i < 8; i++)
            best = hist[i] > best ? hist[i] : best;
        agree += best;
    }
    assert_true(agree >= 0.95 * t.n);
    kvs_segment_free(seg);
    data_free(&t);
}

static void test_index_segment_errors(void **state) {
    (void)state;
    data_t t;
    data_make(&t, KVS_DTYPE_F32, 100, 8, 2, 9);
    kvs_build_params_t p = params(16, 4, 64);
    kvs_segment_t *seg = (kvs_segment_t *)&p; /* must be reset to NULL */
    char err[128];

#define BUILD(pp, dt, d, n, k, v, out)                                         \
    kvs_segment_build(pp, dt, d, 0, n, k, v, out, err, sizeof(err))
    assert_int_equal(BUILD(&p, t.dtype, t.d, 0, t.keys, t.vals, &seg),
                     KVS_EINVAL);
    assert_null(seg);
    assert_true(err[0] != '\0');
    assert_int_equal(BUILD(&p, t.dtype, 0, t.n, t.keys, t.vals, &seg),
                     KVS_EINVAL);
    assert_int_equal(BUILD(&p, t.dtype, t.d, 64, t.keys, t.vals, &seg),
                     KVS_EINVAL); /* n <= window */
    assert_int_equal(BUILD(NULL, t.dtype, t.d, t.n, t.keys, t.vals, &seg),
                     KVS_EINVAL);
    assert_int_equal(BUILD(&p, t.dtype, t.d, t.n, NULL, t.vals, &seg),
                     KVS_EINVAL);
    assert_int_equal(BUILD(&p, t.dtype, t.d, t.n, t.keys, NULL, &seg),
                     KVS_EINVAL);
    assert_int_equal(BUILD(&p, t.dtype, t.d, t.n, t.keys, t.vals, NULL),
                     KVS_EINVAL);
    assert_int_equal(BUILD(&p, (kvs_dtype_t)7, t.d, t.n, t.keys, t.vals, &seg),
                     KVS_EINVAL);
    kvs_build_params_t p0 = p;
    p0.cluster_tokens = 0;
    assert_int_equal(BUILD(&p0, t.dtype, t.d, t.n, t.keys, t.vals, &seg),
                     KVS_EINVAL);
    ((float *)t.keys)[17] = NAN;
    assert_int_equal(BUILD(&p, t.dtype, t.d, t.n, t.keys, t.vals, &seg),
                     KVS_ENOTFINITE);
    assert_null(seg);
    /* err may be NULL */
    assert_int_equal(kvs_segment_build(&p, t.dtype, t.d, 0, 0, t.keys, t.vals,
                                       &seg, NULL, 0),
                     KVS_EINVAL);
#undef BUILD
    kvs_segment_free(NULL);
    assert_true(kvs_segment_bytes(NULL) == 0);
    data_free(&t);
}

/* The shim: errors come back as upstream codes with a message, and the
 * calls the benchmarks use work (IVF-Flat with nprobe, factory + HNSW
 * efSearch through the parameter space, flat L2). */
static void test_index_faiss_c_api(void **state) {
    (void)state;
    const uint32_t d = 16, n = 400;
    float *x = malloc(sizeof(float) * n * d);
    assert_non_null(x);
    rng.s = 11;
    for (uint32_t i = 0; i < n * d; i++)
        x[i] = rng_gauss();

    /* fewer points than clusters: FAISS throws, we get -2 and a message */
    FaissClustering *clus = NULL;
    FaissIndexFlatL2 *l2 = NULL;
    assert_int_equal(faiss_Clustering_new(&clus, (int)d, 1000), 0);
    assert_int_equal(faiss_IndexFlatL2_new_with(&l2, d), 0);
    assert_int_equal(faiss_Clustering_train(clus, n, x, l2), FAISS_EXCEPT);
    assert_non_null(faiss_get_last_error());
    assert_true(strlen(faiss_get_last_error()) > 0);
    faiss_Clustering_free(clus);

    /* flat L2: a point is its own nearest neighbour */
    assert_int_equal(faiss_Index_add(l2, n, x), 0);
    assert_int_equal(faiss_Index_ntotal(l2), n);
    assert_true(faiss_Index_is_trained(l2));
    idx_t lab[2];
    float dis[2];
    assert_int_equal(faiss_Index_search(l2, 1, x + 5 * d, 2, dis, lab), 0);
    assert_int_equal(lab[0], 5);
    assert_int_equal(faiss_Index_assign(l2, 1, x + 9 * d, lab, 1), 0);
    assert_int_equal(lab[0], 9);
    assert_int_equal(faiss_Index_reset(l2), 0);
    assert_int_equal(faiss_Index_ntotal(l2), 0);
    faiss_Index_free(l2);

    /* IVF-Flat, inner product, own quantizer */
    FaissIndexFlatIP *q = NULL;
    FaissIndexIVFFlat *ivf = NULL;
    assert_int_equal(faiss_IndexFlatIP_new_with(&q, d), 0);
    assert_int_equal(
        faiss_IndexIVFFlat_new_with_metric(&ivf, q, d, 8, METRIC_INNER_PRODUCT),
        0);
    faiss_IndexIVFFlat_set_own_fields(ivf, 1);
    assert_false(faiss_Index_is_trained(ivf));
    assert_int_equal(faiss_Index_add(ivf, n, x), FAISS_EXCEPT); /* untrained */
    assert_int_equal(faiss_Index_train(ivf, n, x), 0);
    assert_true(faiss_Index_is_trained(ivf));
    assert_int_equal(faiss_Index_add(ivf, n, x), 0);
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(ivf), 8);
    assert_int_equal(faiss_IndexIVF_nprobe(faiss_IndexIVF_cast(ivf)), 8);
    assert_int_equal(faiss_Index_search(ivf, 1, x + 3 * d, 1, dis, lab), 0);
    assert_true(lab[0] >= 0);
    faiss_Index_free(ivf);

    /* factory + parameter space */
    FaissIndex *h = NULL;
    FaissParameterSpace *ps = NULL;
    assert_int_equal(faiss_index_factory(&h, (int)d, "HNSW16", METRIC_L2), 0);
    assert_int_equal(faiss_Index_add(h, n, x), 0);
    assert_int_equal(faiss_ParameterSpace_new(&ps), 0);
    assert_int_equal(
        faiss_ParameterSpace_set_index_parameter(ps, h, "efSearch", 64), 0);
    assert_int_equal(faiss_Index_search(h, 1, x + 7 * d, 1, dis, lab), 0);
    assert_int_equal(lab[0], 7);
    assert_int_equal(
        faiss_ParameterSpace_set_index_parameter(ps, h, "bogus", 1),
        FAISS_EXCEPT);
    faiss_ParameterSpace_free(ps);
    faiss_Index_free(h);
    assert_int_equal(faiss_index_factory(&h, (int)d, "NoSuchIndex", METRIC_L2),
                     FAISS_EXCEPT);
    free(x);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_segment_f32_invariants),
        cmocka_unit_test(test_index_segment_f16_bf16),
        cmocka_unit_test(test_index_segment_shapes),
        cmocka_unit_test(test_index_segment_tiny),
        cmocka_unit_test(test_index_segment_deterministic),
        cmocka_unit_test(test_index_segment_from_labels),
        cmocka_unit_test(test_index_segment_kmeans_quality),
        cmocka_unit_test(test_index_segment_kmeans_methods),
        cmocka_unit_test(test_index_segment_recovers_directions),
        cmocka_unit_test(test_index_segment_errors),
        cmocka_unit_test(test_index_faiss_c_api),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
