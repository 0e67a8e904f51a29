/*
 * test_gpu.c: every GPU kernel of kernels/cuda against a plain-C reference
 * computed in double from the same (rounded) inputs.
 *
 *   select      scores vs reference (rel 1e-4); list sizes exact; every
 *               selected cluster's reference score within 1e-5 of the
 *               threshold or above (ties are legal either way); bf16 and
 *               fp16; select keys in shared and in global memory
 *   zones       tripartite attention over the GPU's lists vs reference:
 *               relative L2 error <= 1e-4 (fp32 accumulation only)
 *   full        full attention vs reference, rel L2 <= 1e-4; also with K/V
 *               in mapped pinned host memory
 *   cache       retrieval through the slot pool with K/V in pinned host
 *               memory equals the device path (rel L2 <= 1e-5); staged
 *               misses equal the cluster rows bit for bit
 *   wbuf        the wave buffer (buffer/) filled through its incremental
 *               API, many steps with revisited and fresh queries: misses
 *               copied by the copy engines (batched and one copy per run)
 *               give the in-place mode's outputs (rel L2 <= 1e-6) and the
 *               same cache counters; K/V on the device within 1e-5
 *   kmeans      layout invariants exact; centroids / value means equal the
 *               mean of the members (bf16/fp16 rounding: rel 1e-2 + 1e-3);
 *               objective within 1% of a C reference of the same algorithm;
 *               two builds bitwise identical
 *
 * `test_gpu wave` runs the wave tests only, `test_gpu wbuf` the wave
 * buffer's (KVS_WBUF_STEPS=n: n steps each, for the sanitizers).
 * Prints "SKIP: no CUDA device" and exits 77 (CTest SKIP_RETURN_CODE)
 * where no GPU is usable. Inputs are fresh random each run; the seed is
 * printed and KVS_SEED=n repeats a run.
 */
#include "kvs_buffer.h"
#include "kvs_rng.h"
#include "kvs_cuda.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The wave kernels' parameters: the default fractions, and the launch
 * variants from this program's environment (KVS_CUDA_PDL 0..3,
 * KVS_CUDA_SELECT=block, KVS_CUDA_SEL_THREADS=256|512), which the library
 * itself no longer reads (kvs_cuda_wave_params_t). */
static kvs_cuda_wave_params_t wave_params(void) {
    kvs_cuda_wave_params_t wp = {.retrieval_fraction = 0.018f,
                                 .estimation_fraction = 0.232f};
    const char *e = getenv("KVS_CUDA_PDL");
    wp.pdl = e && *e ? (uint32_t)atoi(e) & 3u : 0u;
    e = getenv("KVS_CUDA_SELECT");
    wp.select_block = e && !strcmp(e, "block");
    e = getenv("KVS_CUDA_SEL_THREADS");
    wp.select_threads = e && *e ? (uint32_t)atoi(e) : 0u;
    return wp;
}

#define D KVS_CUDA_HEAD_DIM

static int failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
        }                                                                      \
    } while (0)

#define CU(call)                                                               \
    do {                                                                       \
        cudaError_t e_ = (call);                                               \
        if (e_ != cudaSuccess) {                                               \
            printf("CUDA error %s at %s:%d: %s\n", #call, __FILE__, __LINE__,  \
                   cudaGetErrorString(e_));                                    \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define KV(call)                                                               \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_) {                                                             \
            printf("%s failed: %d (%s)\n", #call, rc_, kvs_cuda_last_error()); \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

/* ---------------- random numbers and half-precision conversions ------- */

static kvs_rng_t rng;
static uint32_t rnd(void) {
    return (uint32_t)(kvs_rng_next(&rng) >> 32);
}
static double urand(void) {
    return (rnd() + 0.5) / 2097152.0 / 2048.0;
}
static double nrand(void) {
    return sqrt(-2 * log(urand())) * cos(6.283185307179586 * urand());
}

static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}
static float bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7fffff;
    int e = (int)((x >> 23) & 0xff) - 127 + 15;
    if (((x >> 23) & 0xff) == 0xff)
        return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10)
            return (uint16_t)sign;
        mant |= 0x800000;
        int shift = 14 - e;
        uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1),
                 half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        h++;
    return (uint16_t)(sign | h);
}
static float f16_to_f32(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0)
        v = ldexpf((float)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexpf((float)(1024 + m), e - 25);
    return (h & 0x8000) ? -v : v;
}

static kvs_dtype_t g_dt;
static uint16_t to_t(double x) {
    return g_dt == KVS_DTYPE_BF16 ? f32_to_bf16((float)x)
                                  : f32_to_f16((float)x);
}
static double from_t(uint16_t h) {
    return g_dt == KVS_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static void *dcopy(const void *src, size_t bytes) {
    void *p;
    CU(cudaMalloc(&p, bytes ? bytes : 1));
    if (bytes)
        CU(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
    return p;
}
static void hcopy(void *dst, const void *src, size_t bytes) {
    CU(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

static double rel_l2(const float *a, const double *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = a[i] - ref[i];
        if (!isfinite(a[i]))
            return INFINITY;
        num += d * d;
        den += ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* ---------------- a synthetic layer on the host ----------------------- */

typedef struct {
    uint32_t H, G, C, N, ntok, tail, n_steady, lo, hi;
    uint32_t *nc, *counts, *offs, *pos;
    uint8_t *flags;
    uint16_t *cent, *vmean, *keys, *vals, *sk, *sv;
    float *q;
} hlayer_t;

static void hlayer_make(hlayer_t *L, uint32_t H, uint32_t G, uint32_t C,
                        const uint32_t *nc, uint32_t ntok, uint32_t tail) {
    memset(L, 0, sizeof *L);
    L->H = H;
    L->G = G;
    L->C = C;
    L->N = ntok + 7; /* stride larger than used */
    L->ntok = ntok;
    L->tail = tail;
    L->lo = 4;
    L->hi = ntok - 64;
    L->n_steady = L->lo + (ntok - L->hi) + tail;
    L->nc = calloc(H, 4);
    L->counts = calloc((size_t)H * C, 4);
    L->offs = calloc((size_t)H * (C + 1), 4);
    L->pos = calloc((size_t)H * L->N, 4);
    L->flags = calloc((size_t)H * C, 1);
    L->cent = calloc((size_t)H * C * D, 2);
    L->vmean = calloc((size_t)H * C * D, 2);
    L->keys = calloc((size_t)H * L->N * D, 2);
    L->vals = calloc((size_t)H * L->N * D, 2);
    L->sk = calloc((size_t)H * L->n_steady * D, 2);
    L->sv = calloc((size_t)H * L->n_steady * D, 2);
    L->q = calloc((size_t)H * G * D, 4);
    uint32_t *size = calloc(C, 4), *perm = calloc(ntok, 4);
    double *center = calloc(D, 8), *acc = calloc(D, 8), *vacc = calloc(D, 8);
    for (uint32_t h = 0; h < H; h++) {
        const uint32_t n = nc[h];
        L->nc[h] = n;
        for (uint32_t c = 0; c < n; c++)
            size[c] = 1;
        for (uint32_t c = 0; c < 5 && c < n; c++) /* some big clusters */
            size[(c * 7 + 3) % n] += 40;
        uint32_t used = 0;
        for (uint32_t c = 0; c < n; c++)
            used += size[c];
        for (; used < ntok; used++)
            size[rnd() % n]++;
        for (uint32_t i = 0; i < ntok; i++)
            perm[i] = i;
        for (uint32_t i = ntok - 1; i > 0; i--) {
            uint32_t j = rnd() % (i + 1), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        uint32_t *offs = L->offs + (size_t)h * (C + 1);
        uint32_t o = 0;
        for (uint32_t c = 0; c < n; c++) {
            offs[c] = o;
            for (int k = 0; k < D; k++)
                center[k] = nrand();
            memset(acc, 0, D * 8);
            memset(vacc, 0, D * 8);
            uint32_t cnt = 0;
            for (uint32_t m = 0; m < size[c]; m++, o++) {
                const size_t row = (size_t)h * L->N + o;
                L->pos[row] = perm[o];
                for (int k = 0; k < D; k++) {
                    uint16_t kk = to_t(center[k] + 0.6 * nrand());
                    uint16_t vv = to_t(nrand());
                    L->keys[row * D + k] = kk;
                    L->vals[row * D + k] = vv;
                    acc[k] += from_t(kk);
                }
                const uint32_t p = perm[o];
                if (p < L->lo || p >= L->hi) {
                    L->flags[(size_t)h * C + c] = 1;
                } else {
                    cnt++;
                    for (int k = 0; k < D; k++)
                        vacc[k] += from_t(L->vals[row * D + k]);
                }
            }
            for (int k = 0; k < D; k++) {
                L->cent[((size_t)h * C + c) * D + k] = to_t(acc[k] / size[c]);
                L->vmean[((size_t)h * C + c) * D + k] =
                    to_t(cnt ? vacc[k] / cnt : 0);
            }
            L->counts[(size_t)h * C + c] = cnt;
        }
        for (uint32_t c = n; c <= C; c++)
            offs[c] = o;
        /* ties: clusters 1..4 share cluster 0's centroid and count */
        for (uint32_t c = 1; c < 5 && c < n; c++) {
            memcpy(L->cent + ((size_t)h * C + c) * D,
                   L->cent + (size_t)h * C * D, D * 2);
            L->counts[(size_t)h * C + c] = L->counts[(size_t)h * C] + 1;
        }
        /* clusters that can never be selected */
        for (uint32_t c = 6; c < 8 && c < n; c++)
            L->counts[(size_t)h * C + c] = 0;
        /* steady rows: sinks and window in position order, then the tail */
        uint32_t s = 0;
        for (uint32_t p = 0; p < ntok; p++) {
            if (p >= L->lo && p < L->hi)
                continue;
            for (uint32_t r = 0; r < ntok; r++) {
                if (L->pos[(size_t)h * L->N + r] != p)
                    continue;
                memcpy(L->sk + ((size_t)h * L->n_steady + s) * D,
                       L->keys + ((size_t)h * L->N + r) * D, D * 2);
                memcpy(L->sv + ((size_t)h * L->n_steady + s) * D,
                       L->vals + ((size_t)h * L->N + r) * D, D * 2);
                break;
            }
            s++;
        }
        for (; s < L->n_steady; s++)
            for (int k = 0; k < D; k++) {
                L->sk[((size_t)h * L->n_steady + s) * D + k] =
                    to_t(nrand() + 0.3);
                L->sv[((size_t)h * L->n_steady + s) * D + k] = to_t(nrand());
            }
        for (uint32_t i = 0; i < G * D; i++)
            L->q[(size_t)h * G * D + i] = (float)(0.7 * nrand());
    }
    free(size);
    free(perm);
    free(center);
    free(acc);
    free(vacc);
}

static void hlayer_free(hlayer_t *L) {
    free(L->nc);
    free(L->counts);
    free(L->offs);
    free(L->pos);
    free(L->flags);
    free(L->cent);
    free(L->vmean);
    free(L->keys);
    free(L->vals);
    free(L->sk);
    free(L->sv);
    free(L->q);
}

/* Device copy; keys/values in mapped pinned memory when `pinned`. */
static kvs_cuda_layer_t dlayer_make(const hlayer_t *L, int pinned) {
    kvs_cuda_layer_t d;
    memset(&d, 0, sizeof d);
    const size_t H = L->H, C = L->C, N = L->N;
    d.dtype = g_dt;
    d.d = D;
    d.n_heads = L->H;
    d.group = L->G;
    d.max_clusters = L->C;
    d.max_tokens = L->N;
    d.n_clusters = dcopy(L->nc, H * 4);
    d.centroids = dcopy(L->cent, H * C * D * 2);
    d.value_means = dcopy(L->vmean, H * C * D * 2);
    d.counts = dcopy(L->counts, H * C * 4);
    d.offsets = dcopy(L->offs, H * (C + 1) * 4);
    d.steady_flags = dcopy(L->flags, H * C);
    d.positions = dcopy(L->pos, H * N * 4);
    if (pinned) {
        void *k, *v;
        CU(cudaHostAlloc(&k, H * N * D * 2, cudaHostAllocMapped));
        CU(cudaHostAlloc(&v, H * N * D * 2, cudaHostAllocMapped));
        memcpy(k, L->keys, H * N * D * 2);
        memcpy(v, L->vals, H * N * D * 2);
        d.keys = k;
        d.values = v;
    } else {
        d.keys = dcopy(L->keys, H * N * D * 2);
        d.values = dcopy(L->vals, H * N * D * 2);
    }
    d.steady_lo = L->lo;
    d.steady_hi = L->hi;
    d.n_steady = L->n_steady;
    d.steady_keys = dcopy(L->sk, H * L->n_steady * D * 2);
    d.steady_values = dcopy(L->sv, H * L->n_steady * D * 2);
    return d;
}

static void dlayer_free(kvs_cuda_layer_t *d, int pinned) {
    cudaFree((void *)d->n_clusters);
    cudaFree((void *)d->centroids);
    cudaFree((void *)d->value_means);
    cudaFree((void *)d->counts);
    cudaFree((void *)d->offsets);
    cudaFree((void *)d->steady_flags);
    cudaFree((void *)d->positions);
    if (pinned) {
        cudaFreeHost((void *)d->keys);
        cudaFreeHost((void *)d->values);
    } else {
        cudaFree((void *)d->keys);
        cudaFree((void *)d->values);
    }
    cudaFree((void *)d->steady_keys);
    cudaFree((void *)d->steady_values);
}

static double dot_qt(const float *q, const uint16_t *k) {
    double s = 0;
    for (int i = 0; i < D; i++)
        s += (double)q[i] * from_t(k[i]);
    return s;
}

/* Softmax-weighted sum over n logits/values rows (values as dtype). */
typedef struct {
    double *lg;
    const uint16_t **v;
    size_t n, cap;
} rows_t;
static void rows_add(rows_t *r, double lg, const uint16_t *v) {
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 1024;
        r->lg = realloc(r->lg, r->cap * sizeof *r->lg);
        r->v = realloc(r->v, r->cap * sizeof *r->v);
    }
    r->lg[r->n] = lg;
    r->v[r->n++] = v;
}
static void rows_softmax(const rows_t *r, double *out) {
    double m = -INFINITY, l = 0;
    for (size_t i = 0; i < r->n; i++)
        m = r->lg[i] > m ? r->lg[i] : m;
    memset(out, 0, D * sizeof *out);
    for (size_t i = 0; i < r->n; i++) {
        double p = exp(r->lg[i] - m);
        l += p;
        for (int k = 0; k < D; k++)
            out[k] += p * from_t(r->v[i][k]);
    }
    for (int k = 0; k < D; k++)
        out[k] /= l;
}

/* ---------------- select + zones (+ cache) ---------------------------- */

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void test_wave(kvs_dtype_t dt, uint32_t H, uint32_t G, uint32_t C,
                      const uint32_t *nc, uint32_t ntok, int with_cache) {
    g_dt = dt;
    printf("wave %s H=%u G=%u C=%u tokens=%u%s\n", kvs_dtype_name(dt), H, G, C,
           ntok, with_cache ? " +cache" : "");
    hlayer_t L;
    hlayer_make(&L, H, G, C, nc, ntok, 100);
    kvs_cuda_layer_t dl = dlayer_make(&L, 0);
    kvs_cuda_wave_params_t wp = wave_params();
    kvs_cuda_wave_t *w;
    KV(kvs_cuda_wave_new(&dl, &wp, &w));
    const uint32_t rcap = kvs_cuda_wave_retrieval_cap(w);
    const uint32_t ecap = kvs_cuda_wave_estimation_cap(w);
    float *dq = dcopy(L.q, (size_t)H * G * D * 4), *dout;
    CU(cudaMalloc((void **)&dout, (size_t)H * G * D * 4));
    CU(cudaMemset(dout, 0xff, (size_t)H * G * D * 4)); /* poison: NaN */
    KV(kvs_cuda_wave_select(w, &dl, dq, 0));
    CU(cudaDeviceSynchronize());

    const uint32_t *dnr, *dne;
    const uint32_t *dret = kvs_cuda_wave_retrieved(w, &dnr);
    const uint32_t *dest = kvs_cuda_wave_estimated(w, &dne);
    uint32_t *ret = malloc((size_t)H * rcap * 4),
             *est = malloc((size_t)H * ecap * 4);
    uint32_t *nr = malloc(H * 4), *ne = malloc(H * 4);
    float *sc = malloc((size_t)H * C * 4), *out = malloc((size_t)H * G * D * 4);
    hcopy(ret, dret, (size_t)H * rcap * 4);
    hcopy(est, dest, (size_t)H * ecap * 4);
    hcopy(nr, dnr, H * 4);
    hcopy(ne, dne, H * 4);
    hcopy(sc, kvs_cuda_wave_scores(w), (size_t)H * C * 4);
    /* lists must be sane before attention reads through them */
    for (uint32_t h = 0; h < H; h++) {
        int sane = nr[h] <= rcap && ne[h] <= ecap;
        for (uint32_t j = 0; sane && j < nr[h]; j++)
            sane = ret[(size_t)h * rcap + j] < L.nc[h];
        for (uint32_t j = 0; sane && j < ne[h]; j++)
            sane = est[(size_t)h * ecap + j] < L.nc[h];
        CHECK(sane, "head %u: lists out of range (n_ret %u n_est %u)", h, nr[h],
              ne[h]);
        if (!sane) {
            printf("FAILED: %d checks\n", failures);
            exit(1);
        }
    }
    KV(kvs_cuda_wave_attend(w, &dl, NULL, dq, dout, 0));
    CU(cudaDeviceSynchronize());
    hcopy(out, dout, (size_t)H * G * D * 4);

    const double scale = 1.0 / sqrt((double)D);
    double *ref = calloc((size_t)H * G * D, 8),
           *exact = calloc((size_t)H * G * D, 8);
    double *rs = malloc((size_t)C * 8), *sorted = malloc((size_t)C * 8);
    double *lg = malloc((size_t)C * 8);
    uint8_t *mark = malloc(C);
    rows_t rows = {0}, all = {0};
    double max_sc_err = 0;
    for (uint32_t h = 0; h < H; h++) {
        const uint32_t n = L.nc[h];
        /* reference scores */
        for (uint32_t c = 0; c < n; c++)
            rs[c] = 0;
        for (uint32_t i = 0; i < G; i++) {
            const float *q = L.q + ((size_t)h * G + i) * D;
            double m = -INFINITY, z = 0;
            for (uint32_t c = 0; c < n; c++) {
                lg[c] = dot_qt(q, L.cent + ((size_t)h * C + c) * D) * scale;
                m = lg[c] > m ? lg[c] : m;
            }
            for (uint32_t c = 0; c < n; c++)
                z += exp(lg[c] - m);
            for (uint32_t c = 0; c < n; c++)
                rs[c] += exp(lg[c] - m) / z;
        }
        uint32_t nvalid = 0;
        for (uint32_t c = 0; c < n; c++) {
            const int valid = L.counts[(size_t)h * C + c] > 0;
            const double g = sc[(size_t)h * C + c];
            if (valid) {
                double e = fabs(g - rs[c]) / (rs[c] + 1e-30);
                max_sc_err = e > max_sc_err ? e : max_sc_err;
                CHECK(fabs(g - rs[c]) <= 1e-4 * rs[c] + 1e-9,
                      "score h=%u c=%u gpu %.9g ref %.9g", h, c, g, rs[c]);
                sorted[nvalid++] = rs[c];
            } else {
                CHECK(g == -1.0, "score of unselectable cluster %u: %g", c, g);
            }
        }
        qsort(sorted, nvalid, 8, cmp_desc);
        uint32_t kr = (uint32_t)ceil((double)0.018f * n);
        kr = kr > nvalid ? nvalid : kr;
        uint32_t ke = (uint32_t)ceil((double)0.232f * n);
        uint32_t kre = kr + ke > nvalid ? nvalid : kr + ke;
        CHECK(nr[h] == kr, "head %u retrieved %u want %u", h, nr[h], kr);
        CHECK(ne[h] == kre - kr, "head %u estimated %u want %u", h, ne[h],
              kre - kr);
        memset(mark, 0, C);
        const double tr = kr ? sorted[kr - 1] : 0,
                     te = kre ? sorted[kre - 1] : 0;
        for (uint32_t j = 0; j < nr[h] && j < rcap; j++) {
            uint32_t c = ret[(size_t)h * rcap + j];
            CHECK(c < n && !mark[c], "retrieved cluster %u bad/dup", c);
            if (c >= n || mark[c])
                continue;
            mark[c] = 1;
            CHECK(rs[c] >= tr * (1 - 1e-5), "retrieved %u score %g < thr %g", c,
                  rs[c], tr);
        }
        for (uint32_t j = 0; j < ne[h] && j < ecap; j++) {
            uint32_t c = est[(size_t)h * ecap + j];
            CHECK(c < n && !mark[c], "estimated cluster %u bad/dup", c);
            if (c >= n || mark[c])
                continue;
            mark[c] = 2;
            CHECK(rs[c] >= te * (1 - 1e-5), "estimated %u score %g < thr %g", c,
                  rs[c], te);
            CHECK(rs[c] <= tr * (1 + 1e-5), "estimated %u above retrieval", c);
        }
        /* reference attention over the GPU's zones, and exact attention */
        const uint32_t *offs = L.offs + (size_t)h * (C + 1);
        for (uint32_t i = 0; i < G; i++) {
            const float *q = L.q + ((size_t)h * G + i) * D;
            rows.n = all.n = 0;
            for (uint32_t s = 0; s < L.n_steady; s++) {
                const size_t r = (size_t)h * L.n_steady + s;
                double l = dot_qt(q, L.sk + r * D) * scale;
                rows_add(&rows, l, L.sv + r * D);
            }
            for (uint32_t s = L.lo + (L.ntok - L.hi); s < L.n_steady; s++) {
                const size_t r = (size_t)h * L.n_steady + s;
                rows_add(&all, dot_qt(q, L.sk + r * D) * scale, L.sv + r * D);
            }
            for (uint32_t r = 0; r < L.ntok; r++) {
                const size_t row = (size_t)h * L.N + r;
                rows_add(&all, dot_qt(q, L.keys + row * D) * scale,
                         L.vals + row * D);
            }
            for (uint32_t c = 0; c < n; c++) {
                if (mark[c] == 1) {
                    for (uint32_t r = offs[c]; r < offs[c + 1]; r++) {
                        const size_t row = (size_t)h * L.N + r;
                        const uint32_t p = L.pos[row];
                        if (L.flags[(size_t)h * C + c] &&
                            (p < L.lo || p >= L.hi))
                            continue;
                        rows_add(&rows, dot_qt(q, L.keys + row * D) * scale,
                                 L.vals + row * D);
                    }
                } else if (mark[c] == 2) {
                    const size_t cc = (size_t)h * C + c;
                    rows_add(&rows,
                             dot_qt(q, L.cent + cc * D) * scale +
                                 log((double)L.counts[cc]),
                             L.vmean + cc * D);
                }
            }
            rows_softmax(&rows, ref + ((size_t)h * G + i) * D);
            rows_softmax(&all, exact + ((size_t)h * G + i) * D);
        }
    }
    const double err = rel_l2(out, ref, (size_t)H * G * D);
    const double werr = rel_l2(out, exact, (size_t)H * G * D);
    printf("  scores max rel err %.2e; zones vs reference rel L2 %.2e "
           "(tol 1e-4); wave vs exact %.3f (information only)\n",
           max_sc_err, err, werr);
    CHECK(err <= 1e-4, "zone attention rel L2 %g", err);

    if (with_cache) {
        /* same layer, K/V in mapped pinned host memory, a third of the
         * clusters that fit a slot cached */
        const uint32_t st = 32;
        kvs_cuda_layer_t hl = dlayer_make(&L, 1);
        int32_t *slot_of = malloc((size_t)H * C * 4);
        uint32_t n_slots = 0;
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t c = 0; c < C; c++) {
                const uint32_t *o = L.offs + (size_t)h * (C + 1);
                int cache = c < L.nc[h] && o[c + 1] - o[c] <= st && c % 3 == 0;
                slot_of[(size_t)h * C + c] = cache ? (int32_t)n_slots++ : -1;
            }
        uint16_t *pk = calloc((size_t)n_slots * st * D, 2);
        uint16_t *pv = calloc((size_t)n_slots * st * D, 2);
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t c = 0; c < C; c++) {
                const int32_t s = slot_of[(size_t)h * C + c];
                if (s < 0)
                    continue;
                const uint32_t *o = L.offs + (size_t)h * (C + 1);
                const size_t src = ((size_t)h * L.N + o[c]) * D;
                const size_t n = (size_t)(o[c + 1] - o[c]) * D;
                memcpy(pk + (size_t)s * st * D, L.keys + src, n * 2);
                memcpy(pv + (size_t)s * st * D, L.vals + src, n * 2);
            }
        kvs_cuda_cache_t cache;
        cache.slot_of = dcopy(slot_of, (size_t)H * C * 4);
        cache.slot_keys = dcopy(pk, (size_t)n_slots * st * D * 2);
        cache.slot_values = dcopy(pv, (size_t)n_slots * st * D * 2);
        cache.slot_tokens = st;
        const size_t sbytes = (size_t)H * rcap * st * D * 2;
        CU(cudaMalloc(&cache.stage_keys, sbytes));
        CU(cudaMalloc(&cache.stage_values, sbytes));
        CU(cudaMemset(cache.stage_keys, 0, sbytes));
        CU(cudaMemset(cache.stage_values, 0, sbytes));
        CU(cudaMemset(dout, 0xff, (size_t)H * G * D * 4));
        KV(kvs_cuda_wave_select(w, &hl, dq, 0));
        KV(kvs_cuda_wave_attend(w, &hl, &cache, dq, dout, 0));
        CU(cudaDeviceSynchronize());
        float *out2 = malloc((size_t)H * G * D * 4);
        hcopy(out2, dout, (size_t)H * G * D * 4);
        double *o1 = malloc((size_t)H * G * D * 8);
        for (size_t i = 0; i < (size_t)H * G * D; i++)
            o1[i] = out[i];
        const double cerr = rel_l2(out2, o1, (size_t)H * G * D);
        printf("  cache path (pinned host K/V, %u slots) vs device path rel "
               "L2 %.2e (tol 1e-5)\n",
               n_slots, cerr);
        CHECK(cerr <= 1e-5, "cache path rel L2 %g", cerr);
        uint16_t *sk = malloc(sbytes), *sv = malloc(sbytes);
        hcopy(sk, cache.stage_keys, sbytes);
        hcopy(sv, cache.stage_values, sbytes);
        hcopy(ret, dret, (size_t)H * rcap * 4);
        hcopy(nr, dnr, H * 4);
        uint32_t staged = 0, bad = 0;
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t j = 0; j < nr[h]; j++) {
                const uint32_t c = ret[(size_t)h * rcap + j];
                const uint32_t *o = L.offs + (size_t)h * (C + 1);
                const uint32_t n = o[c + 1] - o[c];
                if (slot_of[(size_t)h * C + c] >= 0 || n > st)
                    continue;
                const size_t so = ((size_t)h * rcap + j) * st * D;
                const size_t src = ((size_t)h * L.N + o[c]) * D;
                bad += memcmp(sk + so, L.keys + src, (size_t)n * D * 2) != 0;
                bad += memcmp(sv + so, L.vals + src, (size_t)n * D * 2) != 0;
                staged++;
            }
        printf("  staged misses %u, mismatches %u\n", staged, bad);
        CHECK(bad == 0 && staged > 0, "staging: %u bad of %u", bad, staged);
        free(sk);
        free(sv);
        free(out2);
        free(o1);
        free(pk);
        free(pv);
        free(slot_of);
        cudaFree((void *)cache.slot_of);
        cudaFree((void *)cache.slot_keys);
        cudaFree((void *)cache.slot_values);
        cudaFree(cache.stage_keys);
        cudaFree(cache.stage_values);
        dlayer_free(&hl, 1);
    }
    free(rows.lg);
    free(rows.v);
    free(all.lg);
    free(all.v);
    free(ret);
    free(est);
    free(nr);
    free(ne);
    free(sc);
    free(out);
    free(ref);
    free(exact);
    free(rs);
    free(sorted);
    free(lg);
    free(mark);
    cudaFree(dq);
    cudaFree(dout);
    kvs_cuda_wave_free(w);
    dlayer_free(&dl, 0);
    hlayer_free(&L);
}

/* ---------------- wave buffer: miss modes ----------------------------- */

/*
 * One layer in four wave buffers, filled as the engine fills them: K/V in
 * GPU memory, and pinned with misses read in place, copied in one batch,
 * copied one run at a time; a cache of 5% of the clusters (slots of 32
 * rows, so the big clusters are uncacheable). Step s uses one of 6
 * revisited query sets (70%) or a fresh one, so pages are hit, admitted
 * and evicted. The copy modes must give the in-place mode's outputs, step
 * by step (rel L2 <= 1e-6: bit for bit where select leaves its lists in
 * the same order, which it does not guarantee), and the same cache
 * counters.
 */
static void test_wbuf(kvs_dtype_t dt, uint32_t H, uint32_t G, uint32_t C,
                      const uint32_t *nc, uint32_t ntok, kvs_wbuf_policy_t pol,
                      uint32_t steps) {
    g_dt = dt;
    const char *env = getenv("KVS_WBUF_STEPS"); /* fewer under sanitizers */
    if (env && strtoul(env, NULL, 10) > 0)
        steps = (uint32_t)strtoul(env, NULL, 10);
    printf("wbuf %s H=%u G=%u C=%u tokens=%u %s, %u steps\n",
           kvs_dtype_name(dt), H, G, C, ntok,
           pol == KVS_WBUF_LRU ? "LRU" : "clock", steps);
    hlayer_t L;
    hlayer_make(&L, H, G, C, nc, ntok, 100);
    /* no tied centroids here: ties at the retrieval threshold are broken
     * by select in no fixed order, and the buffers must retrieve the same
     * sets to keep the same cache counters */
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t c = 1; c < 5; c++) {
            uint16_t *x = L.cent + ((size_t)h * C + c) * D;
            x[c] = to_t(from_t(x[c]) + 0.05 * c);
        }
    const size_t qn = (size_t)H * G * D, ns = L.n_steady;
    enum { NB = 4 };
    const char *name[NB] = {"device", "in-place", "copy batch", "copy each"};
    kvs_wbuf_t *wb[NB];
    float *dout[NB], *hout[NB];
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    for (int b = 0; b < NB; b++) {
        kvs_wbuf_params_t bp;
        memset(&bp, 0, sizeof bp);
        bp.dtype = dt;
        bp.d = D;
        bp.n_heads = H;
        bp.group = G;
        bp.max_clusters = C;
        bp.max_tokens = L.N;
        bp.n_steady = L.n_steady;
        bp.slot_tokens = 32;
        bp.slots_per_head = (C + 19) / 20;
        bp.policy = pol;
        bp.kv_on_device = b == 0;
        bp.miss = b == 2   ? KVS_WBUF_MISS_COPY
                  : b == 3 ? KVS_WBUF_MISS_COPY_EACH
                           : KVS_WBUF_MISS_INPLACE;
        bp.wave = wave_params();
        KV(kvs_wbuf_new(&bp, &wb[b]));
        for (uint32_t h = 0; h < H; h++) {
            KV(kvs_wbuf_put_clusters(
                wb[b], h, 0, C, L.cent + (size_t)h * C * D,
                L.vmean + (size_t)h * C * D, L.counts + (size_t)h * C,
                L.flags + (size_t)h * C, L.offs + (size_t)h * (C + 1), s));
            KV(kvs_wbuf_put_tokens(wb[b], h, 0, ntok, L.pos + (size_t)h * L.N,
                                   L.keys + (size_t)h * L.N * D,
                                   L.vals + (size_t)h * L.N * D, s));
            KV(kvs_wbuf_put_steady(wb[b], h, 0, L.n_steady,
                                   L.sk + (size_t)h * ns * D,
                                   L.sv + (size_t)h * ns * D, s));
        }
        KV(kvs_wbuf_set_extent(wb[b], L.nc, L.lo, L.hi, L.n_steady, s));
        CU(cudaMalloc((void **)&dout[b], qn * 4));
        hout[b] = malloc(qn * 4);
    }
    CU(cudaStreamSynchronize(s));
    enum { NQ = 6 };
    float *pool = malloc(NQ * qn * 4), *hq = malloc(qn * 4), *dq;
    for (size_t i = 0; i < NQ * qn; i++)
        pool[i] = (float)(0.7 * nrand());
    CU(cudaMalloc((void **)&dq, qn * 4));
    double *ref = malloc(qn * 8);
    double dev_err = 0, copy_err = 0;
    uint32_t same[NB] = {0};
    for (uint32_t t = 0; t < steps; t++) {
        if (rnd() % 10 < 7) {
            memcpy(hq, pool + (size_t)(rnd() % NQ) * qn, qn * 4);
        } else {
            for (size_t i = 0; i < qn; i++)
                hq[i] = (float)(0.7 * nrand());
        }
        CU(cudaMemcpy(dq, hq, qn * 4, cudaMemcpyHostToDevice));
        for (int b = 0; b < NB; b++) {
            CU(cudaMemsetAsync(dout[b], 0xff, qn * 4, s)); /* NaN */
            KV(kvs_wbuf_step(wb[b], dq, dout[b], s));
        }
        CU(cudaStreamSynchronize(s));
        for (int b = 0; b < NB; b++)
            hcopy(hout[b], dout[b], qn * 4);
        for (size_t i = 0; i < qn; i++)
            ref[i] = hout[1][i];
        const double e0 = rel_l2(hout[0], ref, qn);
        dev_err = e0 > dev_err ? e0 : dev_err;
        for (int b = 2; b < NB; b++) {
            const double e = rel_l2(hout[b], ref, qn);
            copy_err = e > copy_err ? e : copy_err;
            same[b] += memcmp(hout[b], hout[1], qn * 4) == 0;
        }
    }
    kvs_wbuf_stats_t S[NB];
    for (int b = 0; b < NB; b++)
        kvs_wbuf_stats(wb[b], &S[b]);
    printf("  in-place: hit rate %.3f, %llu inserted, %llu evicted, %.3f "
           "uncacheable; device K/V vs in-place max rel L2 %.2e (tol "
           "1e-5)\n",
           S[1].lookups ? (double)S[1].hits / S[1].lookups : 0,
           (unsigned long long)S[1].inserted, (unsigned long long)S[1].evicted,
           S[1].lookups ? (double)S[1].uncacheable / S[1].lookups : 0, dev_err);
    CHECK(dev_err <= 1e-5, "wbuf device vs in-place rel L2 %g", dev_err);
    CHECK(S[1].hits > 0 && S[1].evicted > 0 && S[1].uncacheable > 0,
          "wbuf: the trace must hit, evict and meet uncacheable clusters");
    for (int b = 2; b < NB; b++) {
        printf(
            "  %s: %u of %u steps bit-identical to in-place (max rel L2 "
            "%.2e), %.1f copies per step (%llu batched calls), %.1f KB copied "
            "per step\n",
            name[b], same[b], steps, copy_err, (double)S[b].copies / steps,
            (unsigned long long)S[b].batches, S[b].bytes_copied / 1e3 / steps);
        /* bit for bit only where select left the lists in the same
         * order: its compaction order varies run to run */
        CHECK(copy_err <= 1e-6, "wbuf %s: rel L2 %g vs in-place", name[b],
              copy_err);
        const int eq = S[b].lookups == S[1].lookups && S[b].hits == S[1].hits &&
                       S[b].misses == S[1].misses &&
                       S[b].uncacheable == S[1].uncacheable &&
                       S[b].inserted == S[1].inserted &&
                       S[b].evicted == S[1].evicted &&
                       S[b].bytes_hit == S[1].bytes_hit &&
                       S[b].bytes_miss == S[1].bytes_miss &&
                       S[b].bytes_fill == S[1].bytes_fill;
        CHECK(eq, "wbuf %s: cache counters differ from in-place", name[b]);
        CHECK(S[b].copies > 0 && S[b].bytes_copied > 0 &&
                  S[b].bytes_copied < S[b].bytes_miss,
              "wbuf %s: copies %llu, bytes %llu of %llu missed", name[b],
              (unsigned long long)S[b].copies,
              (unsigned long long)S[b].bytes_copied,
              (unsigned long long)S[b].bytes_miss);
    }
    CHECK(S[2].batches > 0 && S[3].batches == 0,
          "wbuf: batched copies %llu / %llu", (unsigned long long)S[2].batches,
          (unsigned long long)S[3].batches);
    CHECK(S[1].copies == 0 && S[1].bytes_copied == 0,
          "wbuf in-place mode queued copies");
    CHECK(kvs_wbuf_set_miss(wb[1], (kvs_wbuf_miss_t)7) == KVS_EINVAL,
          "set_miss accepts an unknown mode");
    for (int b = 0; b < NB; b++) {
        kvs_wbuf_free(wb[b]);
        cudaFree(dout[b]);
        free(hout[b]);
    }
    cudaFree(dq);
    cudaStreamDestroy(s);
    free(pool);
    free(hq);
    free(ref);
    hlayer_free(&L);
}

/* ---------------- full attention -------------------------------------- */

static void test_full(kvs_dtype_t dt, uint32_t H, uint32_t G, uint32_t n,
                      int pinned) {
    g_dt = dt;
    const uint32_t N = n + 33;
    const size_t kvn = (size_t)H * N * D;
    uint16_t *k = malloc(kvn * 2), *v = malloc(kvn * 2);
    float *q = malloc((size_t)H * G * D * 4);
    for (size_t i = 0; i < kvn; i++) {
        k[i] = to_t(nrand() + ((i / D) % 97 == 0 ? 2.0 : 0.0));
        v[i] = to_t(nrand());
    }
    for (size_t i = 0; i < (size_t)H * G * D; i++)
        q[i] = (float)nrand();
    void *dk, *dv;
    if (pinned) {
        CU(cudaHostAlloc(&dk, kvn * 2, cudaHostAllocMapped));
        CU(cudaHostAlloc(&dv, kvn * 2, cudaHostAllocMapped));
        memcpy(dk, k, kvn * 2);
        memcpy(dv, v, kvn * 2);
    } else {
        dk = dcopy(k, kvn * 2);
        dv = dcopy(v, kvn * 2);
    }
    float *dq = dcopy(q, (size_t)H * G * D * 4), *dout;
    CU(cudaMalloc((void **)&dout, (size_t)H * G * D * 4));
    CU(cudaMemset(dout, 0xff, (size_t)H * G * D * 4));
    kvs_cuda_full_t *f;
    KV(kvs_cuda_full_new(dt, D, H, G, N, &f));
    KV(kvs_cuda_full_attend(f, dk, dv, n, 0, dq, dout, 0));
    CU(cudaDeviceSynchronize());
    float *out = malloc((size_t)H * G * D * 4);
    hcopy(out, dout, (size_t)H * G * D * 4);
    double *ref = malloc((size_t)H * G * D * 8);
    rows_t rows = {0};
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t i = 0; i < G; i++) {
            rows.n = 0;
            for (uint32_t r = 0; r < n; r++) {
                const size_t row = (size_t)h * N + r;
                rows_add(&rows,
                         dot_qt(q + ((size_t)h * G + i) * D, k + row * D) /
                             sqrt((double)D),
                         v + row * D);
            }
            rows_softmax(&rows, ref + ((size_t)h * G + i) * D);
        }
    const double err = rel_l2(out, ref, (size_t)H * G * D);
    printf("full %s H=%u G=%u n=%u%s: rel L2 %.2e (tol 1e-4)\n",
           kvs_dtype_name(dt), H, G, n, pinned ? " (pinned host K/V)" : "",
           err);
    CHECK(err <= 1e-4, "full attention rel L2 %g", err);
    kvs_cuda_full_free(f);
    free(rows.lg);
    free(rows.v);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ref);
    if (pinned) {
        cudaFreeHost(dk);
        cudaFreeHost(dv);
    } else {
        cudaFree(dk);
        cudaFree(dv);
    }
    cudaFree(dq);
    cudaFree(dout);
}

/* ---------------- k-means --------------------------------------------- */

static uint32_t hash32(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x;
}

static double bfr(double x) {
    return bf16_to_f32(f32_to_bf16((float)x));
}

/* The same algorithm in C; returns the objective, fills assign [n]. */
static double ref_kmeans_segment(const uint16_t *keys, uint32_t n, uint32_t K,
                                 uint32_t iters, uint64_t seed, uint32_t gc0,
                                 uint32_t *assign) {
    double *mu = calloc(D, 8), *x = malloc((size_t)n * D * 8);
    double *c = malloc((size_t)K * D * 8), *s = malloc((size_t)K * D * 8);
    uint32_t *cnt = malloc(K * 4);
    for (uint32_t t = 0; t < n; t++)
        for (int k = 0; k < D; k++)
            mu[k] += from_t(keys[(size_t)t * D + k]);
    for (int k = 0; k < D; k++)
        mu[k] = (float)(mu[k] / n);
    for (uint32_t t = 0; t < n; t++)
        for (int k = 0; k < D; k++)
            x[(size_t)t * D + k] = bfr(from_t(keys[(size_t)t * D + k]) - mu[k]);
    const uint32_t stride = n / K > 0 ? n / K : 1;
    for (uint32_t j = 0; j < K; j++) {
        uint32_t idx = (uint32_t)((uint64_t)j * n / K) +
                       hash32(seed * 0x9e3779b97f4a7c15ULL + gc0 + j) % stride;
        idx = idx < n ? idx : n - 1;
        double n2 = 0;
        for (int k = 0; k < D; k++) {
            double v = from_t(keys[(size_t)idx * D + k]) - mu[k];
            c[(size_t)j * D + k] = v;
            n2 += v * v;
        }
        for (int k = 0; k < D; k++)
            c[(size_t)j * D + k] =
                bfr(n2 > 0 ? c[(size_t)j * D + k] / sqrt(n2) : 0);
    }
    double obj = 0;
    for (uint32_t it = 0; it <= iters; it++) {
        obj = 0;
        for (uint32_t t = 0; t < n; t++) {
            double best = -INFINITY;
            uint32_t bi = 0;
            for (uint32_t j = 0; j < K; j++) {
                double d = 0;
                for (int k = 0; k < D; k++)
                    d += x[(size_t)t * D + k] * c[(size_t)j * D + k];
                if (d > best) {
                    best = d;
                    bi = j;
                }
            }
            assign[t] = bi;
            obj += best;
        }
        if (it == iters)
            break;
        memset(s, 0, (size_t)K * D * 8);
        memset(cnt, 0, K * 4);
        for (uint32_t t = 0; t < n; t++) {
            cnt[assign[t]]++;
            for (int k = 0; k < D; k++)
                s[(size_t)assign[t] * D + k] +=
                    from_t(keys[(size_t)t * D + k]) - mu[k];
        }
        for (uint32_t j = 0; j < K; j++) {
            if (!cnt[j])
                continue;
            double n2 = 0;
            for (int k = 0; k < D; k++)
                n2 += s[(size_t)j * D + k] * s[(size_t)j * D + k];
            if (n2 <= 0)
                continue;
            for (int k = 0; k < D; k++)
                c[(size_t)j * D + k] = bfr(s[(size_t)j * D + k] / sqrt(n2));
        }
    }
    free(mu);
    free(x);
    free(c);
    free(s);
    free(cnt);
    return obj / n;
}

static void test_kmeans(kvs_dtype_t dt) {
    g_dt = dt;
    const uint32_t H = 2, seg = 2048, n_seg = 2, tail = 100;
    const uint32_t ntok = seg * n_seg + tail, stride = ntok + 5;
    kvs_cuda_kmeans_params_t p = {seg, 16, 10, rnd(), 4, seg * n_seg - 64};
    printf("kmeans %s H=%u segments=%u x %u seed=%llu\n", kvs_dtype_name(dt), H,
           n_seg, seg, (unsigned long long)p.seed);
    const size_t kvn = (size_t)H * stride * D;
    uint16_t *k = malloc(kvn * 2), *v = malloc(kvn * 2);
    double *centers = malloc((size_t)64 * D * 8);
    for (uint32_t h = 0; h < H; h++) {
        for (size_t i = 0; i < (size_t)64 * D; i++)
            centers[i] = nrand();
        for (uint32_t t = 0; t < stride; t++) {
            const uint32_t cl = rnd() % 64;
            for (int j = 0; j < D; j++) {
                const size_t e = ((size_t)h * stride + t) * D + j;
                k[e] = to_t(1.5 + centers[(size_t)cl * D + j] + 0.4 * nrand());
                v[e] = to_t(nrand());
            }
        }
    }
    void *dk = dcopy(k, kvn * 2), *dv = dcopy(v, kvn * 2);
    kvs_cuda_kmeans_t *km;
    KV(kvs_cuda_kmeans_new(&p, dt, D, H, ntok, &km));
    const uint32_t C = kvs_cuda_kmeans_clusters_per_head(km);
    const uint32_t Np = kvs_cuda_kmeans_indexed_tokens(km);
    const uint32_t K = C / n_seg;
    CHECK(C == n_seg * 128 && Np == seg * n_seg, "geometry C=%u Np=%u", C, Np);
    kvs_cuda_kmeans_out_t o;
    o.cluster_stride = C + 3;
    o.token_stride = Np + 9;
    const size_t cs = o.cluster_stride, ts = o.token_stride;
    CU(cudaMalloc((void **)&o.n_clusters, H * 4));
    CU(cudaMalloc(&o.centroids, H * cs * D * 2));
    CU(cudaMalloc(&o.value_means, H * cs * D * 2));
    CU(cudaMalloc((void **)&o.counts, H * cs * 4));
    CU(cudaMalloc((void **)&o.offsets, H * (cs + 1) * 4));
    CU(cudaMalloc((void **)&o.steady_flags, H * cs));
    CU(cudaMalloc((void **)&o.positions, H * ts * 4));
    CU(cudaMalloc(&o.keys, H * ts * D * 2));
    CU(cudaMalloc(&o.values, H * ts * D * 2));
    KV(kvs_cuda_kmeans_build(km, dk, dv, stride, 0, &o, 0));
    CU(cudaDeviceSynchronize());
    uint32_t *nc = malloc(H * 4), *cnt = malloc(H * cs * 4);
    uint32_t *off = malloc(H * (cs + 1) * 4), *pos = malloc(H * ts * 4);
    uint8_t *fl = malloc(H * cs);
    uint16_t *cen = malloc(H * cs * D * 2), *vm = malloc(H * cs * D * 2);
    uint16_t *ok = malloc(H * ts * D * 2), *ov = malloc(H * ts * D * 2);
    hcopy(nc, o.n_clusters, H * 4);
    hcopy(cnt, o.counts, H * cs * 4);
    hcopy(off, o.offsets, H * (cs + 1) * 4);
    hcopy(pos, o.positions, H * ts * 4);
    hcopy(fl, o.steady_flags, H * cs);
    hcopy(cen, o.centroids, H * cs * D * 2);
    hcopy(vm, o.value_means, H * cs * D * 2);
    hcopy(ok, o.keys, H * ts * D * 2);
    hcopy(ov, o.values, H * ts * D * 2);
    uint8_t *seen = malloc(Np);
    double max_cerr = 0;
    uint32_t layout_bad = 0, mean_bad = 0, empty = 0;
    for (uint32_t h = 0; h < H; h++) {
        CHECK(nc[h] == C, "n_clusters %u", nc[h]);
        const uint32_t *of = off + (size_t)h * (cs + 1);
        layout_bad += of[0] != 0 || of[C] != Np;
        memset(seen, 0, Np);
        for (uint32_t c = 0; c < C; c++) {
            const uint32_t sgi = c / K;
            layout_bad += of[c + 1] < of[c];
            if (c % K == 0)
                layout_bad += of[c] != sgi * seg;
            empty += of[c + 1] == of[c];
            double kacc[D] = {0}, vacc[D] = {0};
            uint32_t nst = 0, flag = 0;
            for (uint32_t s = of[c]; s < of[c + 1]; s++) {
                const uint32_t pp = pos[(size_t)h * ts + s];
                layout_bad += pp >= Np || seen[pp] || pp / seg != sgi;
                if (pp >= Np)
                    continue;
                seen[pp] = 1;
                if (s > of[c])
                    layout_bad += pos[(size_t)h * ts + s - 1] >= pp;
                const size_t src = ((size_t)h * stride + pp) * D;
                const size_t dst = ((size_t)h * ts + s) * D;
                layout_bad += memcmp(ok + dst, k + src, D * 2) != 0;
                layout_bad += memcmp(ov + dst, v + src, D * 2) != 0;
                const int steady = pp < p.steady_lo || pp >= p.steady_hi;
                for (int j = 0; j < D; j++) {
                    kacc[j] += from_t(k[src + j]);
                    if (!steady)
                        vacc[j] += from_t(v[src + j]);
                }
                if (steady)
                    flag = 1;
                else
                    nst++;
            }
            const uint32_t n = of[c + 1] - of[c];
            const size_t cc = (size_t)h * cs + c;
            mean_bad += cnt[cc] != nst || fl[cc] != flag;
            for (int j = 0; j < D; j++) {
                const double rk = n ? kacc[j] / n : 0;
                const double rv = nst ? vacc[j] / nst : 0;
                const double gk = from_t(cen[cc * D + j]);
                const double gv = from_t(vm[cc * D + j]);
                const double e = fabs(gk - rk) / (fabs(rk) + 1e-3);
                max_cerr = e > max_cerr ? e : max_cerr;
                mean_bad += fabs(gk - rk) > 1e-2 * fabs(rk) + 1e-3;
                mean_bad += fabs(gv - rv) > 1e-2 * fabs(rv) + 1e-3;
            }
        }
        for (uint32_t t = 0; t < Np; t++)
            layout_bad += !seen[t];
    }
    printf("  layout errors %u, mean/count errors %u (max centroid rel err "
           "%.1e), empty clusters %u of %u\n",
           layout_bad, mean_bad, max_cerr, empty, H * C);
    CHECK(layout_bad == 0, "layout errors %u", layout_bad);
    CHECK(mean_bad == 0, "mean/count errors %u", mean_bad);

    /* objective vs the C reference of the same algorithm */
    double gobj;
    KV(kvs_cuda_kmeans_objective(km, &gobj));
    uint32_t *gas = malloc((size_t)H * Np * 4), *ras = malloc(seg * 4);
    hcopy(gas, kvs_cuda_kmeans_assignment(km), (size_t)H * Np * 4);
    double robj = 0;
    uint32_t agree = 0;
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t s = 0; s < n_seg; s++) {
            const uint32_t sg = h * n_seg + s;
            robj += ref_kmeans_segment(k + ((size_t)h * stride + s * seg) * D,
                                       seg, K, p.iters, p.seed, sg * K, ras) /
                    (H * n_seg);
            for (uint32_t t = 0; t < seg; t++)
                agree += gas[(size_t)h * Np + s * seg + t] == sg * K + ras[t];
        }
    const double rel = fabs(gobj - robj) / fabs(robj);
    printf("  objective gpu %.5f ref %.5f (rel %.1e, tol 1e-2); same final "
           "assignment for %.1f%% of keys\n",
           gobj, robj, rel, 100.0 * agree / (H * Np));
    CHECK(rel <= 1e-2, "objective gpu %g ref %g", gobj, robj);

    /* determinism */
    uint16_t *cen2 = malloc(H * cs * D * 2);
    uint32_t *pos2 = malloc(H * ts * 4);
    KV(kvs_cuda_kmeans_build(km, dk, dv, stride, 0, &o, 0));
    CU(cudaDeviceSynchronize());
    hcopy(cen2, o.centroids, H * cs * D * 2);
    hcopy(pos2, o.positions, H * ts * 4);
    int same = 1;
    for (uint32_t h = 0; h < H; h++) {
        same &= memcmp(cen + (size_t)h * cs * D, cen2 + (size_t)h * cs * D,
                       (size_t)C * D * 2) == 0;
        same &= memcmp(pos + (size_t)h * ts, pos2 + (size_t)h * ts,
                       (size_t)Np * 4) == 0;
    }
    printf("  second build identical: %s\n", same ? "yes" : "no");
    CHECK(same, "builds differ");

    free(cen2);
    free(pos2);
    free(gas);
    free(ras);
    free(seen);
    free(nc);
    free(cnt);
    free(off);
    free(pos);
    free(fl);
    free(cen);
    free(vm);
    free(ok);
    free(ov);
    free(k);
    free(v);
    free(centers);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(o.n_clusters);
    cudaFree(o.centroids);
    cudaFree(o.value_means);
    cudaFree(o.counts);
    cudaFree(o.offsets);
    cudaFree(o.steady_flags);
    cudaFree(o.positions);
    cudaFree(o.keys);
    cudaFree(o.values);
    kvs_cuda_kmeans_free(km);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress survives a timeout */
    /* "wave": only the wave tests (select, zones, merge, cache path);
     * "wbuf": only the wave buffer's */
    const int only_wave = argc > 1 && !strcmp(argv[1], "wave");
    const int only_wbuf = argc > 1 && !strcmp(argv[1], "wbuf");
    if (kvs_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    const char *s = getenv("KVS_SEED");
    rng.s = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL);
    printf("seed %llu (KVS_SEED to repeat)\n", (unsigned long long)rng.s);
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s\n", prop.name);

    const uint32_t nc3[3] = {700, 650, 513};
    /* 16 rows per cluster on average, as built; 5% cached */
    const uint32_t ncb[8] = {2048, 2048, 2048, 2000, 2048, 1900, 2048, 2048};
    test_wbuf(KVS_DTYPE_BF16, 3, 4, 700, nc3, 12000, KVS_WBUF_LRU, 60);
    test_wbuf(KVS_DTYPE_BF16, 8, 2, 2048, ncb, 32768, KVS_WBUF_LRU, 120);
    test_wbuf(KVS_DTYPE_F16, 8, 2, 2048, ncb, 32768, KVS_WBUF_CLOCK, 60);
    if (only_wbuf)
        goto done;
    test_wave(KVS_DTYPE_BF16, 3, 4, 700, nc3, 12000, 1);
    test_wave(KVS_DTYPE_F16, 3, 2, 700, nc3, 12000, 0);
    const uint32_t nc1[1] = {45000};
    test_wave(KVS_DTYPE_BF16, 1, 8, 45000, nc1, 90000, 0);
    /* the benchmark's batch-1 shape at 128K: 8 KV heads x 8192 clusters
     * (select: 1024 clusters per block; 19 retrieval splits per head) */
    const uint32_t nc8[8] = {8192, 8192, 8192, 8192, 8192, 8192, 8000, 8191};
    test_wave(KVS_DTYPE_BF16, 8, 4, 8192, nc8, 20000, 0);
    /* select keys in global memory (12500 per block > 48 KB), G = 1 */
    const uint32_t ncg[1] = {100000};
    test_wave(KVS_DTYPE_F16, 1, 1, 100000, ncg, 110000, 0);
    if (!only_wave) {
        test_full(KVS_DTYPE_BF16, 3, 4, 5000, 0);
        test_full(KVS_DTYPE_F16, 2, 8, 777, 0);
        test_full(KVS_DTYPE_BF16, 2, 4, 3000, 1);
        test_kmeans(KVS_DTYPE_BF16);
        test_kmeans(KVS_DTYPE_F16);
    }
done:
    if (failures) {
        printf("FAILED: %d checks\n", failures);
        return 1;
    }
    printf("OK: all GPU kernels match the CPU reference\n");
    return 0;
}
