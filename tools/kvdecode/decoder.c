/*
 * decoder.c: the Llama forward pass of kvs_decoder, in the order of
 * llama2.c's run.c and model.py, over chunks of tokens so that every weight
 * matrix is applied with one sgemm per chunk (prefill of 32K tokens is then
 * bound by attention, not by re-reading weights per token).
 *
 * The decoder keeps its own fp32 K/V per (layer, KV head) as [token][head_dim]
 * in all modes: full mode attends over them, and batched prefill needs them in
 * store modes too (see kvs_decoder.h for why prefill never attends through
 * the store). Its softmax uses its own exp (exp8 below), not the kernels of
 * the store, and its decode steps attend in double (attend_own_step): full
 * mode is the reference that store-exact is tested against, so the two must
 * not share the code under test, and the reference should be the more exact.
 */
#include "decoder_int.h"
#include "kvs_kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_CHUNK 256
/* Query tokens per block of causal attention: the score block is
 * group x QBLOCK x context floats (32 MiB for tinycode128 at 32K), the
 * wasted upper triangle QBLOCK^2 / 2 per head; bigger blocks amortise
 * sgemm's packing of the keys. */
#define QBLOCK 128
#define RMS_EPS 1e-5
#define ROPE_THETA 10000.0

struct kvs_decoder_s {
    const kvs_model_t *m;
    kvs_decoder_options_t opt;
    uint32_t chunk;
    uint32_t pos;
    bool seq_created;
    /* Own K/V: [layer * n_kv_heads + kv_head] -> [cap][head_dim]. */
    float **kc, **vc;
    uint32_t cap;
    /* Scratch for one chunk. */
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2;
    float *kv_conv; /* store dtype conversion, [chunk][kv_dim] x 2 */
    float *qg;      /* [group * QBLOCK][head_dim]: stacked queries, outputs */
    float *scores;  /* [group * QBLOCK][scores_cap] */
    size_t scores_cap;
    float *rope_c, *rope_s; /* [head_dim / 2] for positions >= seq_len */
    kvs_decoder_stats_t stats;
    char err[512];
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int fail(kvs_decoder_t *d, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(kvs_decoder_t *d, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err, sizeof(d->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* The in-process backend: opt.store, used when no backend is given. */
static int ip_create(void *ctx, uint64_t seq, const kvs_geometry_t *geo) {
    return kvs_seq_create(ctx, seq, geo);
}
static int ip_append(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                     const void *k, const void *v, size_t kv_bytes) {
    (void)kv_bytes;
    return kvs_seq_append(ctx, seq, layer, n, k, v);
}
static int ip_attend(void *ctx, uint64_t seq, uint32_t layer, const float *q,
                     const kvs_query_params_t *qp, float *out,
                     kvs_attend_stats_t *st) {
    return kvs_seq_attend(ctx, seq, layer, q, qp, out, st);
}
static int ip_drop(void *ctx, uint64_t seq) {
    return kvs_seq_drop(ctx, seq);
}
static const char *ip_errmsg(void *ctx) {
    return kvs_store_errmsg(ctx);
}
static int ip_observe(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                      const float *q) {
    return kvs_seq_observe_queries(ctx, seq, layer, n, q);
}
static const kvs_decoder_backend_t inproc_backend = {
    ip_create, ip_append, ip_attend, ip_drop, ip_errmsg, ip_observe};

static const char *backend_errmsg(const kvs_decoder_options_t *o) {
    const char *m =
        o->backend->errmsg ? o->backend->errmsg(o->backend_ctx) : NULL;
    return m ? m : "";
}

const char *kvs_attn_name(kvs_attn_t attn) {
    switch (attn) {
    case KVS_ATTN_FULL:
        return "full";
    case KVS_ATTN_STORE_EXACT:
        return "store-exact";
    case KVS_ATTN_STORE_WAVE:
        return "store-wave";
    }
    return "?";
}

int kvs_attn_parse(const char *name, kvs_attn_t *out) {
    static const kvs_attn_t all[] = {KVS_ATTN_FULL, KVS_ATTN_STORE_EXACT,
                                     KVS_ATTN_STORE_WAVE};
    for (size_t i = 0; name && i < sizeof(all) / sizeof(all[0]); i++) {
        if (strcmp(name, kvs_attn_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return KVS_EINVAL;
}

void kvs_decoder_options_default(kvs_decoder_options_t *opts) {
    memset(opts, 0, sizeof(*opts));
    opts->attn = KVS_ATTN_FULL;
    opts->kv_dtype = KVS_DTYPE_F32;
    kvs_query_params_default(&opts->query);
    opts->prefill_chunk = DEFAULT_CHUNK;
}

/* ---- numerics ---------------------------------------------------------- */

/*
 * Softmax is the prefill's second hot spot after sgemm (n^2/2 exps per head
 * and layer). GCC does not vectorise the scalar form (the clamp and the
 * float-to-int bit trick stop it), so it is written with GCC vector
 * extensions: eight lanes, lowered to two SSE halves on the baseline ISA and
 * to one AVX2 register in the avx2 clone below (no FMA in either, so both
 * clones give the same bits).
 */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

/*
 * x = exp(x) for x <= 0, to about 1 ulp: Cephes' expf polynomial. (By
 * pointer: passing 32-byte vectors by value changes the ABI without AVX.)
 * Rounding uses the 1.5 * 2^23 trick, valid in the default rounding mode
 * without -ffast-math. Below -87 the result is 0 (e^-87 < FLT_MIN).
 */
static inline void exp8(f8 *xp) {
    f8 x = *xp;
    const float big = 12582912.0f; /* 1.5 * 2^23 */
    i8 under = x < -87.0f;
    f8 xc = (f8)(((i8)x & ~under) | ((i8)(x * 0.0f - 87.0f) & under));
    f8 n = (xc * 1.44269504088896341f + big) - big;
    f8 r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    f8 z = r * r;
    f8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    i8 e = (__builtin_convertvector(n, i8) + 127) << 23;
    f8 y = p * (f8)e;
    *xp = (f8)((i8)y & ~under);
}

/* In-place softmax of s[0..len), len >= 1. */
__attribute__((target_clones("avx2", "default"))) static void
softmax(float *s, uint32_t len) {
    uint32_t nv = len / 8, tail = len % 8;
    f8 pad = {0};
    for (uint32_t t = 0; t < 8; t++)
        pad[t] = t < tail ? s[8 * nv + t] : -INFINITY;
    f8 mv = pad, v;
    for (uint32_t i = 0; i < nv; i++) {
        memcpy(&v, s + 8 * i, sizeof(v));
        i8 gt = v > mv;
        mv = (f8)(((i8)v & gt) | ((i8)mv & ~gt));
    }
    float m = mv[0];
    for (int t = 1; t < 8; t++)
        m = mv[t] > m ? mv[t] : m;
    f8 acc = {0};
    for (uint32_t i = 0; i < nv; i++) {
        memcpy(&v, s + 8 * i, sizeof(v));
        v -= m;
        exp8(&v);
        acc += v;
        memcpy(s + 8 * i, &v, sizeof(v));
    }
    pad -= m;
    exp8(&pad); /* -inf lanes give 0 */
    acc += pad;
    double sum = 0;
    for (int t = 0; t < 8; t++)
        sum += acc[t];
    f8 inv = (f8){0} + (float)(1.0 / sum);
    for (uint32_t i = 0; i < nv; i++) {
        memcpy(&v, s + 8 * i, sizeof(v));
        v *= inv;
        memcpy(s + 8 * i, &v, sizeof(v));
    }
    for (uint32_t t = 0; t < tail; t++)
        s[8 * nv + t] = pad[t] * inv[0];
}

static void rmsnorm(float *o, const float *x, const float *w, uint32_t d) {
    double ss = 0;
    for (uint32_t j = 0; j < d; j++)
        ss += (double)x[j] * x[j];
    float inv = (float)(1.0 / sqrt(ss / d + RMS_EPS));
    for (uint32_t j = 0; j < d; j++)
        o[j] = w[j] * (inv * x[j]);
}

/* y[n][out] (+)= x[n][in] . W[out][in]^T. One row goes to sgemv: sgemm
 * would pack the whole weight matrix for a single row (2.5x slower decode). */
static void linear(const float *x, uint32_t n, uint32_t in, const float *w,
                   uint32_t out, float *y, float beta) {
    if (n == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)out, (int)in, 1.0f, w,
                    (int)in, x, 1, beta, y, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out,
                (int)in, 1.0f, x, (int)in, w, (int)in, beta, y, (int)out);
}

/*
 * Rotate `n_heads` heads of `vec` for position `pos`. Positions inside the
 * trained context use the file's tables (what the model was trained with;
 * for tinycode128 they are correctly rounded, and fp32 recomputation drifts).
 * Beyond it there is no table: angles are computed in double, then rounded.
 */
static void rope(kvs_decoder_t *d, uint32_t pos, float *vec, uint32_t n_heads) {
    const kvs_model_t *m = d->m;
    uint32_t hd = m->cfg.head_dim, half = hd / 2;
    const float *c, *s;
    if (pos < m->cfg.seq_len) {
        c = m->rope_cos + (size_t)pos * half;
        s = m->rope_sin + (size_t)pos * half;
    } else {
        for (uint32_t i = 0; i < half; i++) {
            double freq = pow(ROPE_THETA, -(double)(2 * i) / (double)hd);
            double a = (double)pos * freq;
            d->rope_c[i] = (float)cos(a);
            d->rope_s[i] = (float)sin(a);
        }
        c = d->rope_c;
        s = d->rope_s;
    }
    for (uint32_t h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * hd;
        for (uint32_t i = 0; i < half; i++) {
            float v0 = v[2 * i], v1 = v[2 * i + 1];
            v[2 * i] = v0 * c[i] - v1 * s[i];
            v[2 * i + 1] = v0 * s[i] + v1 * c[i];
        }
    }
}

/* ---- lifecycle --------------------------------------------------------- */

static int grow_kv(kvs_decoder_t *d, uint32_t need) {
    if (need <= d->cap)
        return 0;
    uint64_t cap = d->cap ? 2ull * d->cap : 1024;
    if (cap < need)
        cap = need;
    if (cap > UINT32_MAX)
        cap = UINT32_MAX;
    const kvs_model_config_t *c = &d->m->cfg;
    size_t bytes = (size_t)cap * c->head_dim * sizeof(float);
    for (uint32_t i = 0; i < c->n_layers * c->n_kv_heads; i++) {
        float *k = realloc(d->kc[i], bytes);
        if (!k)
            return KVS_ENOMEM;
        d->kc[i] = k;
        float *v = realloc(d->vc[i], bytes);
        if (!v)
            return KVS_ENOMEM;
        d->vc[i] = v;
    }
    d->cap = (uint32_t)cap;
    return 0;
}

static int grow_scores(kvs_decoder_t *d, size_t ctx) {
    if (ctx <= d->scores_cap)
        return 0;
    size_t cap = d->scores_cap ? 2 * d->scores_cap : 4096;
    while (cap < ctx)
        cap *= 2;
    size_t rows = (size_t)QBLOCK * (d->m->cfg.n_heads / d->m->cfg.n_kv_heads);
    float *s = realloc(d->scores, rows * cap * sizeof(float));
    if (!s)
        return KVS_ENOMEM;
    d->scores = s;
    d->scores_cap = cap;
    return 0;
}

int kvs_decoder_new(const kvs_model_t *model, const kvs_decoder_options_t *opts,
                    kvs_decoder_t **out, char *errbuf, size_t errlen) {
    kvs__dec_fmt(errbuf, errlen, "%s", "");
    if (!model || !out) {
        kvs__dec_fmt(errbuf, errlen, "NULL model or out");
        return KVS_EINVAL;
    }
    *out = NULL;
    kvs_decoder_options_t o;
    if (opts)
        o = *opts;
    else
        kvs_decoder_options_default(&o);
    if (o.attn != KVS_ATTN_FULL && o.attn != KVS_ATTN_STORE_EXACT &&
        o.attn != KVS_ATTN_STORE_WAVE) {
        kvs__dec_fmt(errbuf, errlen, "unknown attention mode %d", (int)o.attn);
        return KVS_EINVAL;
    }
    if (o.attn != KVS_ATTN_FULL && !o.store && !o.backend) {
        kvs__dec_fmt(errbuf, errlen, "%s needs a store", kvs_attn_name(o.attn));
        return KVS_EINVAL;
    }
    if (o.backend && (!o.backend->create || !o.backend->append ||
                      !o.backend->attend || !o.backend->drop)) {
        kvs__dec_fmt(errbuf, errlen, "incomplete store backend");
        return KVS_EINVAL;
    }
    if (!o.backend) {
        o.backend = &inproc_backend;
        o.backend_ctx = o.store;
    }
    if (kvs_dtype_size(o.kv_dtype) == 0) {
        kvs__dec_fmt(errbuf, errlen, "unknown kv dtype %d", (int)o.kv_dtype);
        return KVS_EINVAL;
    }
    if (o.prefill_chunk == 0)
        o.prefill_chunk = DEFAULT_CHUNK;
    if (o.prefill_chunk > 65536) {
        kvs__dec_fmt(errbuf, errlen, "prefill chunk %u > 65536",
                     o.prefill_chunk);
        return KVS_EINVAL;
    }
    const kvs_model_config_t *c = &model->cfg;
    kvs_decoder_t *d = calloc(1, sizeof(*d));
    if (!d) {
        kvs__dec_fmt(errbuf, errlen, "out of memory");
        return KVS_ENOMEM;
    }
    d->m = model;
    d->opt = o;
    d->chunk = o.prefill_chunk;
    size_t n = d->chunk, nkv = (size_t)c->n_layers * c->n_kv_heads;
    d->kc = calloc(nkv, sizeof(float *));
    d->vc = calloc(nkv, sizeof(float *));
    d->x = malloc(n * c->dim * sizeof(float));
    d->xb = malloc(n * c->dim * sizeof(float));
    d->q = malloc(n * c->dim * sizeof(float));
    d->att = malloc(n * c->dim * sizeof(float));
    d->k = malloc(n * c->kv_dim * sizeof(float));
    d->v = malloc(n * c->kv_dim * sizeof(float));
    d->kv_conv = malloc(2 * n * c->kv_dim * sizeof(float));
    d->hb = malloc(n * c->hidden_dim * sizeof(float));
    d->hb2 = malloc(n * c->hidden_dim * sizeof(float));
    d->qg = malloc((size_t)QBLOCK * c->n_heads / c->n_kv_heads * c->head_dim *
                   sizeof(float));
    d->rope_c = malloc(c->head_dim / 2 * sizeof(float));
    d->rope_s = malloc(c->head_dim / 2 * sizeof(float));
    int rc = KVS_ENOMEM;
    if (!d->kc || !d->vc || !d->x || !d->xb || !d->q || !d->att || !d->k ||
        !d->v || !d->kv_conv || !d->hb || !d->hb2 || !d->qg || !d->rope_c ||
        !d->rope_s || grow_scores(d, 4096) != 0) {
        kvs__dec_fmt(errbuf, errlen, "out of memory");
        goto err;
    }
    if (o.attn != KVS_ATTN_FULL) {
        kvs_geometry_t geo = {.n_layers = c->n_layers,
                              .n_q_heads = c->n_heads,
                              .n_kv_heads = c->n_kv_heads,
                              .head_dim = c->head_dim,
                              .dtype = o.kv_dtype};
        rc = o.backend->create(o.backend_ctx, o.seq_id, &geo);
        if (rc != 0) {
            kvs__dec_fmt(errbuf, errlen, "create sequence %llu: %s: %s",
                         (unsigned long long)o.seq_id, kvs_strerror(rc),
                         backend_errmsg(&o));
            goto err;
        }
        d->seq_created = true;
    }
    *out = d;
    return 0;
err:
    kvs_decoder_free(d);
    return rc;
}

void kvs_decoder_free(kvs_decoder_t *d) {
    if (!d)
        return;
    if (d->seq_created && !d->opt.keep_seq)
        (void)d->opt.backend->drop(d->opt.backend_ctx, d->opt.seq_id);
    const kvs_model_config_t *c = &d->m->cfg;
    for (uint32_t i = 0; i < c->n_layers * c->n_kv_heads; i++) {
        if (d->kc)
            free(d->kc[i]);
        if (d->vc)
            free(d->vc[i]);
    }
    free(d->kc);
    free(d->vc);
    free(d->x);
    free(d->xb);
    free(d->q);
    free(d->att);
    free(d->k);
    free(d->v);
    free(d->kv_conv);
    free(d->hb);
    free(d->hb2);
    free(d->qg);
    free(d->rope_c);
    free(d->rope_s);
    free(d->scores);
    free(d);
}

const char *kvs_decoder_errmsg(const kvs_decoder_t *dec) {
    return dec->err;
}

uint32_t kvs_decoder_pos(const kvs_decoder_t *dec) {
    return dec->pos;
}

void kvs_decoder_stats(const kvs_decoder_t *dec, kvs_decoder_stats_t *stats) {
    *stats = dec->stats;
}

/* ---- forward ----------------------------------------------------------- */

/*
 * Exact causal attention of the n chunk queries (positions p0..p0+n-1) over
 * the own K/V of layer l, which already hold the chunk's keys. Per KV head,
 * the query rows of all its query heads (GQA group) are stacked so that one
 * sgemm packs each key block once for the whole group.
 */
static int attend_own(kvs_decoder_t *d, uint32_t l, uint32_t p0, uint32_t n) {
    const kvs_model_config_t *c = &d->m->cfg;
    uint32_t hd = c->head_dim, dim = c->dim, group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
    int rc = grow_scores(d, (size_t)p0 + n);
    if (rc != 0)
        return fail(d, rc, "out of memory for attention scores");
    for (uint32_t g = 0; g < c->n_kv_heads; g++) {
        const float *K = d->kc[l * c->n_kv_heads + g];
        const float *V = d->vc[l * c->n_kv_heads + g];
        for (uint32_t i0 = 0; i0 < n; i0 += QBLOCK) {
            uint32_t nb = n - i0 < QBLOCK ? n - i0 : QBLOCK;
            uint32_t rows = group * nb;
            uint32_t T = p0 + i0 + nb; /* keys the block's last row sees */
            /* Row r * nb + i: query head g * group + r, chunk token i0 + i. */
            for (uint32_t r = 0; r < group; r++)
                for (uint32_t i = 0; i < nb; i++)
                    memcpy(d->qg + ((size_t)r * nb + i) * hd,
                           d->q + (size_t)(i0 + i) * dim +
                               (size_t)(g * group + r) * hd,
                           hd * sizeof(float));
            float *S = d->scores;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows,
                        (int)T, (int)hd, scale, d->qg, (int)hd, K, (int)hd,
                        0.0f, S, (int)T);
            for (uint32_t r = 0; r < rows; r++) {
                float *row = S + (size_t)r * T;
                uint32_t len = p0 + i0 + r % nb + 1;
                softmax(row, len);
                memset(row + len, 0, (size_t)(T - len) * sizeof(float));
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows,
                        (int)hd, (int)T, 1.0f, S, (int)T, V, (int)hd, 0.0f,
                        d->qg, (int)hd);
            for (uint32_t r = 0; r < group; r++)
                for (uint32_t i = 0; i < nb; i++)
                    memcpy(d->att + (size_t)(i0 + i) * dim +
                               (size_t)(g * group + r) * hd,
                           d->qg + ((size_t)r * nb + i) * hd,
                           hd * sizeof(float));
        }
    }
    return 0;
}

/*
 * Attention of the single query of a decode step at position p (keys
 * 0..p), accumulated in double and rounded once: products of two floats are
 * exact in double, so the result is within an ulp of exact. Decode steps of
 * `full` are the reference that store attention is compared with, and a
 * float reference would differ from any other float implementation by its
 * own summation-order noise (a few ulps, which stories260K turns into 4e-5
 * logit differences).
 */
typedef float f4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));
/* Decode-step accumulators: one head of head_dim KVS_MAX_HEAD_DIM. */
#define ACC_D4 (KVS_MAX_HEAD_DIM / 4)

/* sum_j a[j] * b[j] in double over n floats; four independent chains so
 * that the adds do not wait on each other. */
static inline double dot_f64(const float *a, const float *b, uint32_t n) {
    d4 acc[4] = {{0}, {0}, {0}, {0}};
    uint32_t j = 0;
    for (; j + 16 <= n; j += 16) {
        for (int u = 0; u < 4; u++) {
            f4 x, y;
            memcpy(&x, a + j + 4 * u, sizeof(x));
            memcpy(&y, b + j + 4 * u, sizeof(y));
            acc[u] +=
                __builtin_convertvector(x, d4) * __builtin_convertvector(y, d4);
        }
    }
    d4 v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    double s = (v[0] + v[1]) + (v[2] + v[3]);
    for (; j < n; j++)
        s += (double)a[j] * (double)b[j];
    return s;
}

__attribute__((target_clones("avx2", "default"))) static void
attend_own_step(kvs_decoder_t *d, uint32_t l, uint32_t p) {
    const kvs_model_config_t *c = &d->m->cfg;
    uint32_t hd = c->head_dim, group = c->n_heads / c->n_kv_heads;
    uint32_t T = p + 1, n4 = hd / 4;
    double scale = 1.0 / sqrt((double)hd);
    /* [group][T] doubles: scores has group * QBLOCK * T floats. */
    double *sc = (double *)d->scores;
    d4 acc[ACC_D4];
    double tail[ACC_D4][2]; /* head_dim % 4 is 0 or 2 */
    /* One pass over K and one over V per KV head serve its whole query
     * group: at 32K tokens a decode step streams the cache from memory, so
     * passes, not flops, set the time. Rows are read whole and in order
     * (the accumulators live in L1), which the prefetcher follows. */
    for (uint32_t g = 0; g < c->n_kv_heads; g++) {
        const float *K = d->kc[l * c->n_kv_heads + g];
        const float *V = d->vc[l * c->n_kv_heads + g];
        const float *q0 = d->q + (size_t)g * group * hd;
        for (uint32_t t = 0; t < T; t++)
            for (uint32_t r = 0; r < group; r++)
                sc[(size_t)r * T + t] =
                    dot_f64(q0 + (size_t)r * hd, K + (size_t)t * hd, hd) *
                    scale;
        for (uint32_t r = 0; r < group; r++) {
            double *s = sc + (size_t)r * T;
            double mx = -INFINITY;
            for (uint32_t t = 0; t < T; t++)
                mx = s[t] > mx ? s[t] : mx;
            /* Weights below e^-200 are set to 0: they cannot move a float
             * output (the largest weight is 1), and their products with
             * values could be subnormal, which costs ~100 cycles an add. */
            double sum = 0;
            for (uint32_t t = 0; t < T; t++) {
                double x = s[t] - mx;
                s[t] = x < -200.0 ? 0.0 : exp(x);
                sum += s[t];
            }
            double inv = 1.0 / sum;
            for (uint32_t t = 0; t < T; t++)
                s[t] *= inv;
        }
        /* Query heads in batches whose accumulators fit acc (8 KiB). */
        uint32_t per = ACC_D4 / (n4 ? n4 : 1);
        for (uint32_t r0 = 0; r0 < group; r0 += per) {
            uint32_t r1 = group - r0 < per ? group : r0 + per;
            memset(acc, 0, sizeof(acc));
            memset(tail, 0, sizeof(tail));
            for (uint32_t t = 0; t < T; t++) {
                const float *v = V + (size_t)t * hd;
                for (uint32_t r = r0; r < r1; r++) {
                    double w = sc[(size_t)r * T + t];
                    d4 *a = acc + (size_t)(r - r0) * n4;
                    for (uint32_t j = 0; j < n4; j++) {
                        f4 x;
                        memcpy(&x, v + 4 * j, sizeof(x));
                        a[j] += w * __builtin_convertvector(x, d4);
                    }
                    for (uint32_t j = 4 * n4; j < hd; j++)
                        tail[r - r0][j - 4 * n4] += w * (double)v[j];
                }
            }
            for (uint32_t r = r0; r < r1; r++) {
                const d4 *a = acc + (size_t)(r - r0) * n4;
                float *o = d->att + (size_t)(g * group + r) * hd;
                for (uint32_t j = 0; j < 4 * n4; j++)
                    o[j] = (float)a[j / 4][j % 4];
                for (uint32_t j = 4 * n4; j < hd; j++)
                    o[j] = (float)tail[r - r0][j - 4 * n4];
            }
        }
    }
}

static int store_append(kvs_decoder_t *d, uint32_t l, uint32_t n) {
    const kvs_model_config_t *c = &d->m->cfg;
    const void *k = d->k, *v = d->v;
    if (d->opt.kv_dtype != KVS_DTYPE_F32) {
        size_t cnt = (size_t)n * c->kv_dim;
        char *kb = (char *)d->kv_conv;
        char *vb = kb + cnt * kvs_dtype_size(d->opt.kv_dtype);
        kvs_from_f32(d->opt.kv_dtype, d->k, kb, cnt);
        kvs_from_f32(d->opt.kv_dtype, d->v, vb, cnt);
        k = kb;
        v = vb;
    }
    size_t bytes = (size_t)n * c->kv_dim * kvs_dtype_size(d->opt.kv_dtype);
    int rc = d->opt.backend->append(d->opt.backend_ctx, d->opt.seq_id, l, n, k,
                                    v, bytes);
    if (rc != 0)
        return fail(d, rc, "append(layer %u, %u tokens): %s: %s", l, n,
                    kvs_strerror(rc), backend_errmsg(&d->opt));
    return 0;
}

/* Show the store the prefill's queries of every observe_every-th position
 * of this chunk (rows of d->q; one call per row, as they are not
 * contiguous: at k = 64, 6 layers, an 8K prefill makes 768 calls). */
static int store_observe(kvs_decoder_t *d, uint32_t l, uint32_t p0,
                         uint32_t n) {
    const uint32_t k = d->opt.observe_every, dim = d->m->cfg.dim;
    if (!k || !d->opt.backend->observe_queries)
        return 0;
    for (uint32_t i = (k - p0 % k) % k; i < n; i += k) {
        int rc = d->opt.backend->observe_queries(
            d->opt.backend_ctx, d->opt.seq_id, l, 1, d->q + (size_t)i * dim);
        if (rc != 0)
            return fail(d, rc, "observe_queries(layer %u, position %u): %s: %s",
                        l, p0 + i, kvs_strerror(rc), backend_errmsg(&d->opt));
    }
    return 0;
}

static int attend_store(kvs_decoder_t *d, uint32_t l) {
    kvs_query_params_t qp = d->opt.query;
    qp.mode =
        d->opt.attn == KVS_ATTN_STORE_WAVE ? KVS_MODE_WAVE : KVS_MODE_EXACT;
    kvs_attend_stats_t st;
    memset(&st, 0, sizeof(st));
    double t0 = now_s();
    int rc = d->opt.backend->attend(d->opt.backend_ctx, d->opt.seq_id, l, d->q,
                                    &qp, d->att, &st);
    d->stats.attend_seconds += now_s() - t0;
    if (rc != 0)
        return fail(d, rc, "attend(layer %u): %s: %s", l, kvs_strerror(rc),
                    backend_errmsg(&d->opt));
    kvs_attend_stats_t *a = &d->stats.attend;
    a->keys_total += st.keys_total;
    a->keys_exact += st.keys_exact;
    a->keys_steady += st.keys_steady;
    a->clusters_total += st.clusters_total;
    a->clusters_retrieved += st.clusters_retrieved;
    a->clusters_estimated += st.clusters_estimated;
    a->clusters_skipped += st.clusters_skipped;
    a->seconds += st.seconds;
    d->stats.attend_calls++;
    return 0;
}

/*
 * Run n <= chunk tokens through every layer. via_store marks a decode step
 * (n is 1): attention from kvs_seq_attend in store modes, from the double
 * precision attend_own_step in full mode. logits: [n][vocab] when all, else the
 * last row's [vocab]; NULL skips the classifier.
 */
static int forward(kvs_decoder_t *d, const int32_t *tokens, uint32_t n,
                   bool via_store, float *logits, bool all) {
    const kvs_model_t *m = d->m;
    const kvs_model_config_t *c = &m->cfg;
    uint32_t dim = c->dim, kvd = c->kv_dim, hid = c->hidden_dim;
    uint32_t hd = c->head_dim, p0 = d->pos;
    bool store = d->opt.attn != KVS_ATTN_FULL;
    int rc = grow_kv(d, p0 + n);
    if (rc != 0)
        return fail(d, rc, "out of memory for %u cached tokens", p0 + n);
    for (uint32_t i = 0; i < n; i++)
        memcpy(d->x + (size_t)i * dim, m->tok_emb + (size_t)tokens[i] * dim,
               dim * sizeof(float));
    for (uint32_t l = 0; l < c->n_layers; l++) {
        for (uint32_t i = 0; i < n; i++)
            rmsnorm(d->xb + (size_t)i * dim, d->x + (size_t)i * dim,
                    m->rms_att + (size_t)l * dim, dim);
        linear(d->xb, n, dim, m->wq + (size_t)l * dim * dim, dim, d->q, 0);
        linear(d->xb, n, dim, m->wk + (size_t)l * kvd * dim, kvd, d->k, 0);
        linear(d->xb, n, dim, m->wv + (size_t)l * kvd * dim, kvd, d->v, 0);
        for (uint32_t i = 0; i < n; i++) {
            rope(d, p0 + i, d->q + (size_t)i * dim, c->n_heads);
            rope(d, p0 + i, d->k + (size_t)i * kvd, c->n_kv_heads);
        }
        /* Own cache: [token][kv_dim] rows scattered to per-head arrays. */
        for (uint32_t g = 0; g < c->n_kv_heads; g++) {
            float *K = d->kc[l * c->n_kv_heads + g];
            float *V = d->vc[l * c->n_kv_heads + g];
            for (uint32_t i = 0; i < n; i++) {
                memcpy(K + (size_t)(p0 + i) * hd,
                       d->k + (size_t)i * kvd + g * hd, hd * sizeof(float));
                memcpy(V + (size_t)(p0 + i) * hd,
                       d->v + (size_t)i * kvd + g * hd, hd * sizeof(float));
            }
        }
        if (d->opt.observe) {
            rc = d->opt.observe(d->opt.observe_ctx, l, p0, n, d->q, d->k, d->v);
            if (rc != 0)
                return fail(d, rc, "observer failed at layer %u: %s", l,
                            kvs_strerror(rc));
        }
        if (store && (rc = store_append(d, l, n)) != 0)
            return rc;
        if (store && !via_store && (rc = store_observe(d, l, p0, n)) != 0)
            return rc;
        if (via_store && store) {
            rc = attend_store(d, l);
        } else if (via_store) {
            if ((rc = grow_scores(d, (size_t)p0 + 1)) != 0)
                return fail(d, rc, "out of memory for attention scores");
            attend_own_step(d, l, p0);
        } else {
            rc = attend_own(d, l, p0, n);
        }
        if (rc != 0)
            return rc;
        /* x += att . Wo^T */
        linear(d->att, n, dim, m->wo + (size_t)l * dim * dim, dim, d->x, 1.0f);
        for (uint32_t i = 0; i < n; i++)
            rmsnorm(d->xb + (size_t)i * dim, d->x + (size_t)i * dim,
                    m->rms_ffn + (size_t)l * dim, dim);
        linear(d->xb, n, dim, m->w1 + (size_t)l * hid * dim, hid, d->hb, 0);
        linear(d->xb, n, dim, m->w3 + (size_t)l * hid * dim, hid, d->hb2, 0);
        size_t nh = (size_t)n * hid;
        for (size_t j = 0; j < nh; j++) {
            float a = d->hb[j];
            d->hb[j] = a / (1.0f + expf(-a)) * d->hb2[j]; /* SwiGLU */
        }
        linear(d->hb, n, hid, m->w2 + (size_t)l * dim * hid, dim, d->x, 1.0f);
    }
    d->pos = p0 + n;
    if (logits) {
        uint32_t first = all ? 0 : n - 1, rows = n - first;
        for (uint32_t i = first; i < n; i++)
            rmsnorm(d->xb + (size_t)(i - first) * dim, d->x + (size_t)i * dim,
                    m->rms_final, dim);
        linear(d->xb, rows, dim, m->wcls, c->vocab_size, logits, 0);
    }
    return 0;
}

static int check_tokens(kvs_decoder_t *d, const int32_t *tokens, uint32_t n) {
    if (!tokens || n == 0)
        return fail(d, KVS_EINVAL, "no tokens");
    if ((uint64_t)d->pos + n > UINT32_MAX)
        return fail(d, KVS_EINVAL, "position overflow");
    for (uint32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= d->m->cfg.vocab_size)
            return fail(d, KVS_EINVAL,
                        "token %d at index %u outside the vocabulary (%u)",
                        tokens[i], i, d->m->cfg.vocab_size);
    return 0;
}

int kvs_decoder_prefill(kvs_decoder_t *d, const int32_t *tokens, uint32_t n,
                        float *logits, bool all_logits) {
    d->err[0] = '\0';
    int rc = check_tokens(d, tokens, n);
    if (rc != 0)
        return rc;
    double t0 = now_s();
    uint32_t V = d->m->cfg.vocab_size;
    for (uint32_t i = 0; i < n && rc == 0; i += d->chunk) {
        uint32_t cn = n - i < d->chunk ? n - i : d->chunk;
        bool last = i + cn == n;
        float *lg = NULL;
        if (logits && all_logits)
            lg = logits + (size_t)i * V;
        else if (logits && last)
            lg = logits;
        rc = forward(d, tokens + i, cn, false, lg, all_logits);
    }
    d->stats.prefill_seconds += now_s() - t0;
    if (rc == 0)
        d->stats.prefill_tokens += n;
    return rc;
}

int kvs_decoder_step(kvs_decoder_t *d, int32_t token, float *logits) {
    d->err[0] = '\0';
    int rc = check_tokens(d, &token, 1);
    if (rc != 0)
        return rc;
    double t0 = now_s();
    rc = forward(d, &token, 1, true, logits, false);
    d->stats.step_seconds += now_s() - t0;
    if (rc == 0)
        d->stats.step_tokens++;
    return rc;
}

int32_t kvs_sample(const float *logits, uint32_t n, float temperature,
                   uint64_t *rng) {
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    if (temperature <= 0.0f || n == 0)
        return (int32_t)best;
    /* xorshift64* */
    uint64_t x = *rng ? *rng : 0x9E3779B97F4A7C15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *rng = x;
    double u = (double)((x * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
    double sum = 0, mx = logits[best];
    for (uint32_t i = 0; i < n; i++)
        sum += exp(((double)logits[i] - mx) / temperature);
    double target = u * sum, cdf = 0;
    for (uint32_t i = 0; i < n; i++) {
        cdf += exp(((double)logits[i] - mx) / temperature);
        if (cdf > target)
            return (int32_t)i;
    }
    return (int32_t)best; /* rounding left target just above cdf */
}
