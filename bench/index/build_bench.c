/*
 * build_bench.c: the CPU segment build on real keys (bench/run.sh index runs
 * it after index_bench when a dump is given; see bench/index/run.sh).
 *
 * Reads a `kvdecode --dump` file (bench/README.md), cuts every (layer, KV
 * head) into segments of the store's size and builds each one with
 * kvs_segment_build on one thread, once per k-means method, in the same
 * process on the same keys. Per method it reports keys/s, the share of the
 * build that is k-means (total minus kvs_segment_from_labels on the same
 * labels) and of the codes, and two quality numbers that need no model:
 *   - objective: mean cosine of each centred key to its cluster's centroid
 *     direction (what spherical k-means maximises; raw-key centroids,
 *     centred with the segment mean);
 *   - keys read: for decode queries at the end of the context, the share
 *     of the indexed keys read, clusters taken in order of q . centroid,
 *     until 95 of the exact top 100 are found (median and p90): the
 *     centroid path of bench/recall in miniature. Recall and attention
 *     error through the store are bench/recall and bench/accuracy.
 *
 *   build_bench --dump FILE [--ctx N] [--segment-tokens 1024]
 *               [--cluster-tokens 16] [--iters 10] [--dtype bf16|f16|f32]
 *               [--queries 16] [--reps 1] [--json FILE]
 */
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvstore.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TOPK 100
#define TARGET 95

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        fprintf(stderr, "build_bench: out of memory\n");
        exit(1);
    }
    return p;
}

static void die(const char *what, int rc) {
    fprintf(stderr, "build_bench: %s: %s\n", what, kvs_strerror(rc));
    exit(1);
}

typedef struct dump_s {
    const uint8_t *map;
    size_t size;
    uint32_t n_layers, n_q, n_kv, d, n_tokens, dtype;
    uint64_t data_off;
} dump_t;

/* Open and validate a kvdecode --dump file (format in bench/README.md). */
static int dump_open(const char *path, dump_t *dp) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) || st.st_size < 64) {
        close(fd);
        return KVS_ECORRUPT;
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return -errno;
    const uint8_t *b = m;
    uint32_t h[16];
    memcpy(h, b, sizeof h);
    memcpy(&dp->data_off, b + 48, 8);
    dp->map = b;
    dp->size = (size_t)st.st_size;
    dp->n_layers = h[4];
    dp->n_q = h[5];
    dp->n_kv = h[6];
    dp->d = h[7];
    dp->n_tokens = h[8];
    dp->dtype = h[9];
    size_t e = dp->dtype == 0 ? 4 : 2;
    if (memcmp(b, "KVSDUMP1", 8) || h[2] != 1 || h[3] != 64 || dp->dtype > 1 ||
        !dp->n_layers || !dp->n_kv || !dp->d || dp->n_q % dp->n_kv ||
        dp->data_off + (uint64_t)dp->n_layers * (dp->n_q + 2 * dp->n_kv) *
                           dp->n_tokens * dp->d * e !=
            (uint64_t)st.st_size) {
        munmap(m, (size_t)st.st_size);
        return KVS_ECORRUPT;
    }
    return 0;
}

/* Rows pos .. pos+n of array `arr` of a layer (query heads, key heads,
 * value heads) as fp32. */
static void dump_rows(const dump_t *dp, uint32_t layer, uint32_t arr,
                      uint32_t pos, uint32_t n, float *out) {
    size_t e = dp->dtype == 0 ? 4 : 2;
    size_t head = (size_t)dp->n_tokens * dp->d * e;
    const uint8_t *p = dp->map + dp->data_off +
                       ((size_t)layer * (dp->n_q + 2 * dp->n_kv) + arr) * head +
                       (size_t)pos * dp->d * e;
    size_t cnt = (size_t)n * dp->d;
    if (e == 4) {
        memcpy(out, p, cnt * 4);
    } else {
        const uint16_t *s = (const uint16_t *)p;
        for (size_t i = 0; i < cnt; i++)
            out[i] = kvs_f16_to_f32(s[i]);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p) {
    if (!n)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    size_t r = (size_t)ceil(p * (double)n);
    return v[r ? r - 1 : 0];
}

typedef struct scored_s {
    float s;
    uint32_t i;
} scored_t;

static int cmp_scored(const void *a, const void *b) {
    const scored_t *x = a, *y = b;
    if (x->s != y->s)
        return x->s > y->s ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

typedef struct method_s {
    const char *name;
    const char *env; /* KVS_KMEANS */
    double t_build, t_labels, t_codes;
    double keys, obj_sum, obj_n;
    double *read; /* [pairs] share of keys read to reach TARGET of TOPK */
    size_t n_read;
    uint64_t clusters;
} method_t;

int main(int argc, char **argv) {
    const char *dump_path = NULL, *json = NULL;
    uint32_t ctx = 0, T = 1024, cl = 16, iters = 10, nq = 16, reps = 1;
    int quality = 1;
    const char *only = NULL;
    kvs_dtype_t dtype = KVS_DTYPE_BF16;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dump") && v)
            dump_path = argv[++i];
        else if (!strcmp(a, "--json") && v)
            json = argv[++i];
        else if (!strcmp(a, "--ctx") && v)
            ctx = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--segment-tokens") && v)
            T = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--cluster-tokens") && v)
            cl = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--iters") && v)
            iters = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--queries") && v)
            nq = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && v)
            reps = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--only") && v)
            only = argv[++i];
        else if (!strcmp(a, "--no-quality"))
            quality = 0;
        else if (!strcmp(a, "--dtype") && v) {
            i++;
            dtype = !strcmp(v, "f32")   ? KVS_DTYPE_F32
                    : !strcmp(v, "f16") ? KVS_DTYPE_F16
                                        : KVS_DTYPE_BF16;
        } else {
            fprintf(stderr, "usage: build_bench --dump FILE [--ctx N] "
                            "[--segment-tokens N] [--cluster-tokens N] "
                            "[--iters N] [--dtype bf16|f16|f32] "
                            "[--queries N] [--reps N] [--json FILE]\n");
            return 2;
        }
    }
    if (!dump_path || !T || !cl || !reps)
        die("--dump, segment, cluster tokens and reps are required",
            KVS_EINVAL);
    dump_t dp;
    int rc = dump_open(dump_path, &dp);
    if (rc)
        die(dump_path, rc);
    if (!ctx || ctx > dp.n_tokens)
        ctx = dp.n_tokens;
    const uint32_t D = dp.d, G = dp.n_q / dp.n_kv;
    if (nq >= ctx)
        die("--queries must be below the context", KVS_EINVAL);
    /* Queries at the last nq positions; segments wholly before them. */
    const uint32_t P = ctx - nq, nseg = P / T, nidx = nseg * T;
    if (!nseg)
        die("context too short for one segment", KVS_EINVAL);

    method_t methods[] = {{.name = "sample", .env = "sample"},
                          {.name = "full", .env = "full"}};
    int nm = sizeof methods / sizeof methods[0];
    if (only) {
        nm = !strcmp(only, "full") ? 2 : 1;
        methods[0] = methods[nm - 1];
        nm = 1;
    }
    size_t pairs = (size_t)dp.n_layers * dp.n_q * nq;
    for (int m = 0; m < nm; m++)
        methods[m].read = xcalloc(pairs, sizeof(double));

    size_t esz = kvs_dtype_size(dtype);
    float *kf = xcalloc((size_t)ctx * D, sizeof(float));
    float *vf = xcalloc((size_t)ctx * D, sizeof(float));
    float *qf = xcalloc((size_t)G * nq * D, sizeof(float));
    void *kc = xcalloc((size_t)nidx * D, esz);
    void *vc = xcalloc((size_t)nidx * D, esz);
    float *cf = xcalloc((size_t)T * D, sizeof(float));
    float *mean = xcalloc(D, sizeof(float));
    uint8_t *hit = xcalloc(nidx, 1);
    uint32_t *label = xcalloc(nidx, sizeof(uint32_t));
    kvs_segment_t **again = xcalloc(nseg, sizeof *again);
    scored_t *rank = xcalloc(nidx, sizeof(scored_t));
    kvs_segment_t **segs = xcalloc(nseg, sizeof *segs);

    for (uint32_t l = 0; l < dp.n_layers; l++) {
        for (uint32_t g = 0; g < dp.n_kv; g++) {
            dump_rows(&dp, l, dp.n_q + g, 0, ctx, kf);
            dump_rows(&dp, l, dp.n_q + dp.n_kv + g, 0, ctx, vf);
            for (uint32_t j = 0; j < G; j++)
                dump_rows(&dp, l, g * G + j, P, nq, qf + (size_t)j * nq * D);
            /* The store keeps keys in its dtype; the truth is on those. */
            kvs_from_f32(dtype, kf, kc, (size_t)nidx * D);
            kvs_from_f32(dtype, vf, vc, (size_t)nidx * D);
            kvs_to_f32(dtype, kc, kf, (size_t)nidx * D);
            /* Alternate which method goes first: the first one after the
             * keys are loaded pays for the cold caches. */
            for (int mm = 0; mm < nm; mm++) {
                method_t *me = &methods[(mm + l * dp.n_kv + g) % nm];
                kvs_build_params_t bp = {.cluster_tokens = cl,
                                         .kmeans_iters = iters,
                                         .sink_tokens = 4,
                                         .window_tokens = 64};
                setenv("KVS_KMEANS", me->env, 1);
                for (uint32_t r = 0; r < reps; r++) {
                    double t0 = now_s();
                    for (uint32_t s = 0; s < nseg; s++) {
                        char err[160] = "";
                        bp.seed = 1234 + (uint64_t)s * T;
                        kvs_segment_free(segs[s]);
                        if ((rc = kvs_segment_build(
                                 &bp, dtype, D, (uint64_t)s * T, T,
                                 (char *)kc + (size_t)s * T * D * esz,
                                 (char *)vc + (size_t)s * T * D * esz, &segs[s],
                                 err, sizeof err)))
                            die(err, rc);
                    }
                    me->t_build += now_s() - t0;
                    me->keys += nidx;
                }
                /* The part that is not k-means: the same labels again,
                 * then the codes alone. */
                for (uint32_t s = 0; s < nseg; s++) {
                    const kvs_segment_t *sg = segs[s];
                    for (uint32_t c = 0; c < sg->n_clusters; c++)
                        for (uint32_t x = sg->offsets[c];
                             x < sg->offsets[c + 1]; x++)
                            label[(size_t)s * T + sg->positions[x]] = c;
                }
                for (uint32_t r = 0; r < reps; r++) {
                    double t0 = now_s();
                    for (uint32_t s = 0; s < nseg; s++) {
                        char err[160] = "";
                        bp.seed = 1234 + (uint64_t)s * T;
                        kvs_segment_free(again[s]);
                        again[s] = NULL;
                        if ((rc = kvs_segment_from_labels(
                                 &bp, dtype, D, (uint64_t)s * T, T,
                                 (char *)kc + (size_t)s * T * D * esz,
                                 (char *)vc + (size_t)s * T * D * esz,
                                 segs[s]->n_clusters, label + (size_t)s * T,
                                 &again[s], err, sizeof err)))
                            die(err, rc);
                    }
                    double t1 = now_s();
                    for (uint32_t s = 0; s < nseg; s++)
                        if ((rc = kvs_segment_build_codes(again[s], 1234)))
                            die("codes", rc);
                    me->t_labels += t1 - t0;
                    me->t_codes += now_s() - t1;
                }
                /* Objective and keys read. */
                for (uint32_t s = 0; s < nseg && quality; s++) {
                    const kvs_segment_t *sg = segs[s];
                    const float *ks = kf + (size_t)s * T * D;
                    memset(mean, 0, sizeof(float) * D);
                    for (uint32_t i = 0; i < T; i++)
                        for (uint32_t j = 0; j < D; j++)
                            mean[j] += ks[(size_t)i * D + j] / (float)T;
                    kvs_to_f32(dtype, sg->centroids, cf,
                               (size_t)sg->n_clusters * D);
                    me->clusters += sg->n_clusters;
                    for (uint32_t c = 0; c < sg->n_clusters; c++) {
                        float *cc = cf + (size_t)c * D;
                        double cn = 0;
                        for (uint32_t j = 0; j < D; j++) {
                            cc[j] -= mean[j];
                            cn += (double)cc[j] * cc[j];
                        }
                        for (uint32_t x = sg->offsets[c];
                             x < sg->offsets[c + 1]; x++) {
                            const float *k = ks + (size_t)sg->positions[x] * D;
                            double dot = 0, kn = 0;
                            for (uint32_t j = 0; j < D; j++) {
                                double e = k[j] - mean[j];
                                dot += e * cc[j];
                                kn += e * e;
                            }
                            me->obj_sum += dot / sqrt(kn * cn + 1e-30);
                            me->obj_n++;
                        }
                    }
                }
                for (uint32_t qi = 0; qi < G * nq * quality; qi++) {
                    const float *q = qf + (size_t)qi * D;
                    for (uint32_t i = 0; i < nidx; i++) {
                        double dot = 0;
                        for (uint32_t j = 0; j < D; j++)
                            dot += (double)q[j] * kf[(size_t)i * D + j];
                        rank[i].s = (float)dot;
                        rank[i].i = i;
                    }
                    qsort(rank, nidx, sizeof *rank, cmp_scored);
                    memset(hit, 0, nidx);
                    for (uint32_t i = 0; i < TOPK && i < nidx; i++)
                        hit[rank[i].i] = 1;
                    /* Clusters of all segments by q . centroid. */
                    uint32_t nc = 0;
                    for (uint32_t s = 0; s < nseg; s++) {
                        const kvs_segment_t *sg = segs[s];
                        kvs_to_f32(dtype, sg->centroids, cf,
                                   (size_t)sg->n_clusters * D);
                        for (uint32_t c = 0; c < sg->n_clusters; c++) {
                            double dot = 0;
                            for (uint32_t j = 0; j < D; j++)
                                dot += (double)q[j] * cf[(size_t)c * D + j];
                            rank[nc].s = (float)dot;
                            rank[nc].i = s << 16 | c;
                            nc++;
                        }
                    }
                    qsort(rank, nc, sizeof *rank, cmp_scored);
                    uint32_t found = 0, read = 0;
                    for (uint32_t r = 0; r < nc && found < TARGET; r++) {
                        const kvs_segment_t *sg = segs[rank[r].i >> 16];
                        uint32_t c = rank[r].i & 0xffff;
                        uint32_t base = (rank[r].i >> 16) * T;
                        for (uint32_t x = sg->offsets[c];
                             x < sg->offsets[c + 1]; x++)
                            found += hit[base + sg->positions[x]];
                        read += sg->counts[c];
                    }
                    me->read[me->n_read++] = (double)read / nidx;
                }
            }
            fprintf(stderr, "build_bench: layer %u head %u done\n", l, g);
        }
    }

    FILE *f = json ? fopen(json, "w") : stdout;
    if (!f) {
        perror(json);
        return 1;
    }
    const method_t *base = &methods[nm - 1];
    double base_rate = base->keys / base->t_build;
    fprintf(f,
            "{\"bench\": \"index_build\", \"segment_tokens\": %u, "
            "\"cluster_tokens\": %u, \"kmeans_iters\": %u, \"keys\": %u, "
            "\"rows\": [\n",
            T, cl, iters, nidx * dp.n_layers * dp.n_kv);
    for (int m = 0; m < nm; m++) {
        method_t *me = &methods[m];
        double rate = me->keys / me->t_build;
        double per_seg = me->t_build / (me->keys / T);
        double lab = me->t_labels / (me->keys / T);
        double cod = me->t_codes / (me->keys / T);
        double med = pct(me->read, me->n_read, 0.5);
        double p90 = pct(me->read, me->n_read, 0.9);
        fprintf(f,
                "  {\"kmeans\": \"%s\", \"build_keys_per_s\": %.0f, "
                "\"speedup_vs_full\": %.2f, \"ms_per_segment\": %.3f, "
                "\"kmeans_ms\": %.3f, \"labels_ms\": %.3f, \"codes_ms\": "
                "%.3f, \"objective\": %.5f, \"clusters_per_segment\": %.2f, "
                "\"keys_read_median\": %.5f, \"keys_read_p90\": %.5f}%s\n",
                me->name, rate, rate / base_rate, 1e3 * per_seg,
                1e3 * (per_seg - lab), 1e3 * (lab - cod), 1e3 * cod,
                me->obj_sum / me->obj_n,
                (double)me->clusters / (dp.n_layers * dp.n_kv * nseg), med, p90,
                m + 1 < nm ? "," : "");
    }
    fprintf(f, "]}\n");
    if (json)
        fclose(f);
    return 0;
}
