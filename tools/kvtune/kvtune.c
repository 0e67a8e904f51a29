/*
 * kvtune.c: tunes the wave index on a sample of real queries and keys, and
 * writes a profile (docs/kvtune.md) that kvs_options_load_profile,
 * `kvstored --profile` and `kvdecode --profile` apply.
 *
 * The sample is a `kvdecode --dump` file. Every point of the sweep (segment
 * size, cluster size, ranking and its code ratio, fixed budget fractions or
 * bounded epsilon) is measured as a decode step sees it: the query at
 * position t sees every key 0 .. t-1, of which a store with segment size S
 * has indexed the first floor(t / S) x S (segments of exactly S, cut from
 * position 0, built with the store's parameters and seeds) and attends the
 * rest, its tail, exactly. In a causal model the query at t is the same
 * whether t was prefilled or decoded, so the N queries are taken at
 * positions spread over the last `span` positions of the sample (span =
 * the largest segment size, at most half the sample) by a golden-ratio
 * sequence: the tail at the queries then covers the segment cycle for
 * every S, as it does over a long decode, instead of sitting wherever the
 * sample happens to end (at 32K - 8 every power-of-two S has its tail
 * nearly full, the worst phase).
 * Per (layer, query head, query) pair it records
 *   - recall@100 of the index's search against the exact top-100 by q.k,
 *     the full keys it read and every byte it read (kvs_zone_stats_t), over
 *     the context's keys and key bytes;
 *   - the relative L2 error of the index's attention output against exact
 *     attention (double accumulation), the share of keys it attended
 *     exactly, and the time of the attend call (one call per KV head and
 *     query, as the engine makes it).
 * Statistics are over pairs, never over heads: a point's recall is the mean
 * over pairs, the costs and errors their medians (p90 beside).
 *
 * The profile is the cheapest point (median bytes read, then attend time)
 * that meets the targets among the points a store can run: the store takes
 * one budget for all layers and heads and ranks as KVS_RANK_DEFAULT, so the
 * per-layer and per-KV-head choices and the other rankings are reported,
 * not applied.
 */
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvstore.h"
#include "sample.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TOPK 100
#define MAX_LIST 16

enum { R_DEFAULT = 0, R_CENTROID = 1, R_CODES = 2 };
static const char *const rank_name[] = {"default", "centroid", "codes"};

typedef struct cfg_s {
    const char *dump, *profile, *json, *plot;
    uint32_t layers, queries;
    uint32_t seg[MAX_LIST], n_seg, cl[MAX_LIST], n_cl;
    double target_recall, target_error;
    int quick, progress_tty;
} cfg_t;

/* One point of the sweep and what was measured there, per pair. */
typedef struct point_s {
    uint32_t seg, cl;
    int rank;
    float code_ratio; /* codes ranking only; 0: the index's default */
    int bounded;
    float rf, ef, eps;
    int skip; /* cannot run on this sample (segment too large, no codes) */
    float *recall, *scan, *bytes, *err, *exact; /* [pairs] */
    double t_attend;
    uint64_t n_attend;
    /* Aggregates over pairs. */
    double recall_mean, scan_med, scan_p90, bytes_med, err_med, err_p90,
        exact_med, time_us;
    int front;
} point_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("kvtune: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvtune --dump FILE [options]\n"
            "  --dump FILE         Q/K/V sample from `kvdecode --dump` "
            "(required)\n"
            "  --profile FILE      profile to write (default kvtune.profile)\n"
            "  --target-recall R   mean recall@100 the profile must reach "
            "(default 0.95)\n"
            "  --target-error E    median attention rel. L2 error it must "
            "stay under\n"
            "                      (default: none; with both, both hold)\n"
            "  --layers N          tune on the first N layers (default all)\n"
            "  --queries N         decode queries per head at the end of the "
            "sample\n"
            "                      (default 16; 8 with --quick)\n"
            "  --segments LIST     segment sizes (default "
            "2048,4096,8192,16384; the\n"
            "                      sizes larger than the prefill are "
            "dropped)\n"
            "  --clusters LIST     mean keys per cluster (default 8,16,32)\n"
            "  --quick             coarse sweep: segments 4096,8192 "
            "(or one fitting\n"
            "                      size), clusters 16,32, fewer fractions\n"
            "  --plot FILE.png     draw the Pareto front with gnuplot "
            "(default\n"
            "                      PROFILE.png; 'none' skips it)\n"
            "  --json FILE         write the BENCH.md result object "
            "(bench/kvtune)\n");
}

static int parse_list(const char *s, uint32_t *out, uint32_t *n) {
    *n = 0;
    while (*s) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno || end == s || !v || v > (1u << 24) || *n == MAX_LIST)
            return -1;
        out[(*n)++] = (uint32_t)v;
        s = end;
        if (*s == ',')
            s++;
        else if (*s)
            return -1;
    }
    return *n ? 0 : -1;
}

static double parse_num(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        die("%s: '%s' is not a number", what, s);
    return v;
}

/* ---- progress ------------------------------------------------------------
 * A bar redrawn in place when stderr is a terminal; plain lines otherwise
 * (logs, CI), one per unit of work. */

static double prog_t0;

static void progress(const cfg_t *c, uint32_t done, uint32_t total,
                     const char *what) {
    double el = now_s() - prog_t0;
    double eta = done ? el * (total - done) / done : 0;
    if (c->progress_tty) {
        char bar[31];
        uint32_t w = total ? done * 30 / total : 30;
        for (uint32_t i = 0; i < 30; i++)
            bar[i] = i < w ? '#' : '.';
        bar[30] = '\0';
        fprintf(stderr, "\r[%s] %3u%% %-34s %5.0fs left ", bar,
                total ? done * 100 / total : 100, what, eta);
        if (done == total)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "kvtune: %u/%u %s (%.0fs, ~%.0fs left)\n", done, total,
                what, el, eta);
    }
    fflush(stderr);
}

/* ---- the sweep grid ------------------------------------------------------ */

static point_t *pts;
static uint32_t n_pts, cap_pts;

static void add_point(uint32_t seg, uint32_t cl, int rank, float ratio,
                      int bounded, float rf, float ef, float eps) {
    if (n_pts == cap_pts) {
        cap_pts = cap_pts ? 2 * cap_pts : 256;
        pts = realloc(pts, cap_pts * sizeof *pts);
        if (!pts)
            die("out of memory");
    }
    point_t *p = &pts[n_pts++];
    memset(p, 0, sizeof *p);
    p->seg = seg;
    p->cl = cl;
    p->rank = rank;
    p->code_ratio = ratio;
    p->bounded = bounded;
    p->rf = rf;
    p->ef = ef;
    p->eps = eps;
}

static void make_points(const cfg_t *c) {
    /* Past 0.1 every head seen so far is at recall 1 (bench/recall), and
     * such points cost the most to measure. */
    static const float rf_full[] = {0.003f, 0.006f, 0.01f, 0.018f,
                                    0.03f,  0.06f,  0.1f};
    static const float rf_quick[] = {0.002f, 0.005f, 0.018f, 0.05f, 0.15f};
    /* 0.5 is the store's default (docs/index.md: with the spread-corrected
     * cluster mass, estimating more clusters costs less error). */
    static const float ef_full[] = {0.232f, 0.5f};
    static const float ef_quick[] = {0.5f};
    static const float eps_full[] = {0.1f, 0.05f, 0.02f, 0.01f, 0.005f};
    static const float eps_quick[] = {0.05f, 0.01f};
    static const float ratio_full[] = {8, 16};
    static const float ratio_quick[] = {16};
    const float *rf = c->quick ? rf_quick : rf_full;
    const float *ef = c->quick ? ef_quick : ef_full;
    const float *eps = c->quick ? eps_quick : eps_full;
    const float *ratio = c->quick ? ratio_quick : ratio_full;
    uint32_t nrf = c->quick ? 5 : 7, nef = c->quick ? 1 : 2,
             neps = c->quick ? 2 : 5, nratio = c->quick ? 1 : 2;
    for (uint32_t s = 0; s < c->n_seg; s++)
        for (uint32_t k = 0; k < c->n_cl; k++) {
            for (int r = R_DEFAULT; r <= R_CODES; r++) {
                uint32_t nr = r == R_CODES ? nratio : 1;
                for (uint32_t x = 0; x < nr; x++)
                    for (uint32_t i = 0; i < nrf; i++)
                        for (uint32_t j = 0; j < nef; j++)
                            add_point(c->seg[s], c->cl[k], r,
                                      r == R_CODES ? ratio[x] : 0, 0, rf[i],
                                      ef[j], 0);
            }
            /* The bounded budget ranks by centroid mass (docs/index.md):
             * one ranking, swept over epsilon. */
            for (uint32_t i = 0; i < neps; i++)
                add_point(c->seg[s], c->cl[k], R_DEFAULT, 0, 1, 0, 0.5f,
                          eps[i]);
        }
}

/* Points that differ only in the estimation fraction search alike. */
static int same_search(const point_t *a, const point_t *b) {
    return a->seg == b->seg && a->cl == b->cl && a->rank == b->rank &&
           a->code_ratio == b->code_ratio && a->bounded == b->bounded &&
           a->rf == b->rf && a->eps == b->eps;
}

/* ---- measuring ----------------------------------------------------------- */

typedef struct head_data_s {
    uint32_t d, G, nq, ctx;
    const uint32_t *pos;      /* [nq] query positions */
    const float *keys, *vals; /* [ctx][d] */
    const float *q;           /* [nq][G][d] */
    const int64_t *truth;     /* [nq][G][TOPK] */
    const float *ref;         /* [nq][G][d] exact attention */
} head_data_t;

static kvs_head_view_t make_view(const head_data_t *h, kvs_segment_t **segs,
                                 uint32_t nseg, uint32_t seg_tokens, uint32_t t,
                                 const kvs_options_t *o) {
    uint64_t indexed = (uint64_t)nseg * seg_tokens;
    kvs_head_view_t v = {
        .dtype = KVS_DTYPE_F32,
        .d = h->d,
        .segments = segs,
        .n_segments = nseg,
        .indexed_tokens = indexed,
        .tail_keys = h->keys + indexed * h->d,
        .tail_values = h->vals + indexed * h->d,
        .tail_tokens = (uint32_t)(t - indexed),
        .sink_tokens = o->sink_tokens,
        .window_tokens = o->window_tokens,
    };
    return v;
}

/* Measure every point of one build configuration on one KV head. pair0 is
 * the index of (layer, first query head of the group, query 0). */
static void measure_build(const head_data_t *h, kvs_segment_t **segs,
                          uint32_t nseg, uint32_t seg_tokens, uint32_t cl,
                          const kvs_options_t *o, size_t pair0,
                          kvs_scratch_t *scr) {
    const uint32_t d = h->d, G = h->G;
    int64_t pos[TOPK];
    float sc[TOPK];
    float *out = xcalloc((size_t)G * d, sizeof(float));
    int have_codes = nseg > 0;
    for (uint32_t s = 0; s < nseg; s++)
        if (!segs[s]->codes)
            have_codes = 0;
    /* Search results per (query, head) of the previous point, reused by
     * points that search alike. */
    float *prev_r = xcalloc((size_t)h->nq * G, sizeof(float));
    float *prev_s = xcalloc((size_t)h->nq * G, sizeof(float));
    float *prev_b = xcalloc((size_t)h->nq * G, sizeof(float));
    const point_t *prev = NULL;
    for (uint32_t pi = 0; pi < n_pts; pi++) {
        point_t *p = &pts[pi];
        if (p->seg != seg_tokens || p->cl != cl || p->skip)
            continue;
        if (p->rank == R_CODES && !have_codes) {
            p->skip = 1;
            continue;
        }
        int reuse = prev && same_search(prev, p);
        kvs_zone_params_t zp = {0};
        zp.scale = 1.0f / sqrtf((float)d);
        if (p->bounded) {
            zp.bounded = 1;
            zp.epsilon = p->eps;
        } else {
            zp.retrieval_fraction = p->rf;
        }
        zp.estimation_fraction = p->ef;
        kvs_rank_params_t rp = {0};
        rp.rank = p->rank == R_CODES      ? KVS_RANK_CODES
                  : p->rank == R_CENTROID ? KVS_RANK_CENTROID
                                          : KVS_RANK_DEFAULT;
        rp.code_ratio = p->code_ratio;
        for (uint32_t i = 0; i < h->nq; i++) {
            uint32_t t = h->pos[i];
            /* The segments the store has by position t: a prefix. */
            uint32_t ns = t / seg_tokens < nseg ? t / seg_tokens : nseg;
            kvs_head_view_t v = make_view(h, segs, ns, seg_tokens, t, o);
            const float *q = h->q + (size_t)i * G * d;
            for (uint32_t j = 0; j < G; j++) {
                size_t pair = pair0 + (size_t)j * h->nq + i;
                size_t k = (size_t)i * G + j;
                if (!reuse) {
                    kvs_zone_stats_t zs = {0};
                    int rc = kvs_head_search_group_ranked(&v, q + (size_t)j * d,
                                                          1, TOPK, &zp, &rp,
                                                          scr, pos, sc, &zs);
                    if (rc)
                        die("search: %s", kvs_strerror(rc));
                    prev_r[k] =
                        (float)kvt_recall(h->truth + k * TOPK, pos, TOPK);
                    prev_s[k] = (float)((double)zs.keys_exact / t);
                    prev_b[k] = (float)((double)zs.bytes_read /
                                        ((double)t * d * sizeof(float)));
                }
                p->recall[pair] = prev_r[k];
                p->scan[pair] = prev_s[k];
                p->bytes[pair] = prev_b[k];
            }
            kvs_zone_stats_t as = {0};
            double t0 = now_s();
            int rc = kvs_head_attend_ranked(&v, q, G, &zp, &rp, scr, out, &as);
            p->t_attend += now_s() - t0;
            p->n_attend++;
            if (rc)
                die("attend: %s", kvs_strerror(rc));
            for (uint32_t j = 0; j < G; j++) {
                size_t pair = pair0 + (size_t)j * h->nq + i;
                const float *r = h->ref + ((size_t)i * G + j) * d;
                double e = 0, n = 0;
                for (uint32_t x = 0; x < d; x++) {
                    double df = (double)out[(size_t)j * d + x] - r[x];
                    e += df * df;
                    n += (double)r[x] * r[x];
                }
                p->err[pair] = (float)(n > 0 ? sqrt(e / n) : sqrt(e));
                p->exact[pair] =
                    as.keys_total
                        ? (float)((double)as.keys_exact / (double)as.keys_total)
                        : 1.0f;
            }
        }
        prev = p;
    }
    free(prev_r);
    free(prev_s);
    free(prev_b);
    free(out);
}

/* ---- aggregation and choice ---------------------------------------------- */

/* Pair filter: a layer (or all: -1) and a KV head (or all: -1). */
typedef struct subset_s {
    int layer, kv;
    uint32_t HQ, G, nq;
} subset_t;

static int in_subset(const subset_t *s, size_t pair) {
    uint32_t i_lh = (uint32_t)(pair / s->nq);
    uint32_t l = i_lh / s->HQ, h = i_lh % s->HQ;
    return (s->layer < 0 || (uint32_t)s->layer == l) &&
           (s->kv < 0 || (uint32_t)s->kv == h / s->G);
}

typedef struct agg_s {
    double recall_mean, scan_med, scan_p90, bytes_med, err_med, err_p90,
        exact_med;
} agg_t;

static agg_t aggregate(const point_t *p, size_t n_pairs, const subset_t *s,
                       double *tmp) {
    agg_t a;
    size_t n = 0;
    double rs = 0;
    for (size_t i = 0; i < n_pairs; i++)
        if (in_subset(s, i)) {
            rs += p->recall[i];
            n++;
        }
    a.recall_mean = n ? rs / n : NAN;
#define PCT(field, q, dst)                                                     \
    do {                                                                       \
        size_t m = 0;                                                          \
        for (size_t i = 0; i < n_pairs; i++)                                   \
            if (in_subset(s, i))                                               \
                tmp[m++] = p->field[i];                                        \
        dst = kvt_pct(tmp, m, q);                                              \
    } while (0)
    PCT(scan, 0.5, a.scan_med);
    PCT(scan, 0.9, a.scan_p90);
    PCT(bytes, 0.5, a.bytes_med);
    PCT(err, 0.5, a.err_med);
    PCT(err, 0.9, a.err_p90);
    PCT(exact, 0.5, a.exact_med);
#undef PCT
    return a;
}

/* The store ranks as KVS_RANK_DEFAULT and has no code-ratio option: only
 * those points can be written into a profile. */
static int deployable(const point_t *p) {
    return p->rank == R_DEFAULT;
}

static int meets(const cfg_t *c, double recall, double err) {
    if (c->target_recall > 0 && !(recall + 1e-9 >= c->target_recall))
        return 0;
    if (c->target_error > 0 && !(err <= c->target_error))
        return 0;
    return 1;
}

/* The profile's order: fewer bytes read; at equal bytes (points that
 * differ only in what search does not read, such as the estimation
 * fraction), the faster attend when it is clearly faster, else the lower
 * error: attend times on a shared machine are noisy, and a 10% time
 * difference should not buy a higher error. */
static int better_tie(const point_t *a, const point_t *b) {
    if (a->bytes_med != b->bytes_med)
        return a->bytes_med < b->bytes_med;
    if (a->time_us < 0.8 * b->time_us || b->time_us < 0.8 * a->time_us)
        return a->time_us < b->time_us;
    return a->err_med < b->err_med;
}

/* a no worse than b in every objective and better in one. */
static int dominates(const point_t *a, const point_t *b) {
    int le = a->bytes_med <= b->bytes_med && a->time_us <= b->time_us &&
             a->recall_mean >= b->recall_mean && a->err_med <= b->err_med;
    int lt = a->bytes_med < b->bytes_med || a->time_us < b->time_us ||
             a->recall_mean > b->recall_mean || a->err_med < b->err_med;
    return le && lt;
}

static void point_label(const point_t *p, char *buf, size_t len) {
    if (p->bounded)
        snprintf(buf, len, "%6u %4u %-8s %5s bounded eps=%-6g ef=%-5g", p->seg,
                 p->cl, rank_name[p->rank], "-", p->eps, p->ef);
    else if (p->rank == R_CODES)
        snprintf(buf, len, "%6u %4u %-8s %5g fixed   rf=%-6g ef=%-5g", p->seg,
                 p->cl, rank_name[p->rank],
                 p->code_ratio ? p->code_ratio : KVS_CODE_RATIO_DEFAULT, p->rf,
                 p->ef);
    else
        snprintf(buf, len, "%6u %4u %-8s %5s fixed   rf=%-6g ef=%-5g", p->seg,
                 p->cl, rank_name[p->rank], "-", p->rf, p->ef);
}

static void print_row(FILE *f, const point_t *p, const char *mark) {
    char lab[128];
    point_label(p, lab, sizeof lab);
    fprintf(f,
            "%s %s %7.4f %7.3f%% %7.3f%% %7.3f%% %8.5f %8.5f %7.3f%% %9.1f\n",
            mark, lab, p->recall_mean, 100 * p->scan_med, 100 * p->scan_p90,
            100 * p->bytes_med, p->err_med, p->err_p90, 100 * p->exact_med,
            p->time_us);
}

static void print_header(FILE *f) {
    fprintf(f,
            "  %6s %4s %-8s %5s %-7s %-16s %7s %8s %8s %8s %8s %8s %8s "
            "%9s\n",
            "seg", "cl", "rank", "ratio", "budget", "fractions", "recall",
            "keys", "keys90", "bytes", "relL2", "relL2_90", "exact",
            "attend_us");
}

/* ---- outputs ------------------------------------------------------------- */

static int have_gnuplot(void) {
    const char *path = getenv("PATH");
    if (!path)
        return 0;
    char *dup = strdup(path), *save = NULL;
    int found = 0;
    for (char *dir = strtok_r(dup, ":", &save); dir && !found;
         dir = strtok_r(NULL, ":", &save)) {
        char full[4096];
        snprintf(full, sizeof full, "%s/gnuplot", dir);
        found = access(full, X_OK) == 0;
    }
    free(dup);
    return found;
}

static void draw_plot(const char *png, uint32_t chosen) {
    if (!have_gnuplot()) {
        fprintf(stderr, "kvtune: gnuplot not found: no plot drawn (the "
                        "table above has the front)\n");
        return;
    }
    size_t dl = strlen(png) + 5;
    char *data = malloc(dl);
    if (!data)
        die("out of memory");
    snprintf(data, dl, "%s.dat", png);
    FILE *f = fopen(data, "w");
    if (!f) {
        fprintf(stderr, "kvtune: %s: %s: no plot drawn\n", data,
                strerror(errno));
        free(data);
        return;
    }
    /* Columns: bytes%, recall, attend us, rel L2, set (0 all, 1 front,
     * 2 the profile's point). */
    for (uint32_t i = 0; i < n_pts; i++) {
        const point_t *p = &pts[i];
        if (p->skip)
            continue;
        fprintf(f, "%g %g %g %g %d\n", 100 * p->bytes_med, p->recall_mean,
                p->time_us, p->err_med, i == chosen ? 2 : p->front);
    }
    fclose(f);
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        fprintf(stderr, "kvtune: cannot run gnuplot: no plot drawn\n");
        unlink(data);
        free(data);
        return;
    }
    fprintf(g,
            "set terminal png size 1280,520 noenhanced\n"
            "set output '%s'\n"
            "set multiplot layout 1,2 title 'kvtune: every point (grey), "
            "the Pareto front (blue), the profile (red)'\n"
            "set grid\nset key bottom right\n"
            "set logscale x\n"
            "set xlabel 'bytes read, %% of the context key bytes (median)'\n"
            "set ylabel 'recall@100 (mean over pairs)'\n"
            "plot '%s' u 1:($5==0?$2:1/0) w p pt 7 ps 0.5 lc rgb '#bbbbbb' "
            "t 'points', '' u 1:($5>=1?$2:1/0) w p pt 7 ps 0.9 lc rgb "
            "'#1f77b4' t 'front', '' u 1:($5==2?$2:1/0) w p pt 9 ps 2 lc rgb "
            "'#d62728' t 'profile'\n"
            "set logscale y\n"
            "set xlabel 'attend time, us per call (mean)'\n"
            "set ylabel 'attention rel. L2 error (median)'\n"
            "set key top right\n"
            "plot '%s' u 3:($5==0?$4:1/0) w p pt 7 ps 0.5 lc rgb '#bbbbbb' "
            "t 'points', '' u 3:($5>=1?$4:1/0) w p pt 7 ps 0.9 lc rgb "
            "'#1f77b4' t 'front', '' u 3:($5==2?$4:1/0) w p pt 9 ps 2 lc rgb "
            "'#d62728' t 'profile'\n"
            "unset multiplot\n",
            png, data, data);
    int rc = pclose(g);
    unlink(data);
    free(data);
    if (rc)
        fprintf(stderr, "kvtune: gnuplot failed (status %d): no plot\n", rc);
    else
        fprintf(stderr, "kvtune: plot: %s\n", png);
}

static void write_profile(const cfg_t *c, const point_t *p,
                          const kvs_options_t *o, int reached,
                          const char *per_layer) {
    FILE *f = fopen(c->profile, "w");
    if (!f)
        die("%s: %s", c->profile, strerror(errno));
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(f, "# kvtune profile (docs/kvtune.md), %s\n# sample: %s\n", date,
            c->dump);
    fprintf(f, "# target:");
    if (c->target_recall > 0)
        fprintf(f, " mean recall@100 >= %g", c->target_recall);
    if (c->target_error > 0)
        fprintf(f, " median attention rel. L2 <= %g", c->target_error);
    fprintf(f, "%s\n", reached ? "" : " -- NOT REACHED: closest point");
    fprintf(f,
            "# measured here: recall %.4f, full keys read %.3f%% median "
            "(%.3f%% p90), bytes read %.3f%% of key bytes, rel. L2 %.5f "
            "median (%.5f p90), attended exactly %.3f%%, attend %.1f us\n",
            p->recall_mean, 100 * p->scan_med, 100 * p->scan_p90,
            100 * p->bytes_med, p->err_med, p->err_p90, 100 * p->exact_med,
            p->time_us);
    fprintf(f, "kvs_profile 1\n");
    fprintf(f, "segment_tokens %u\ncluster_tokens %u\nkmeans_iters %u\n",
            p->seg, p->cl, o->kmeans_iters);
    fprintf(f, "sink_tokens %u\nwindow_tokens %u\n", o->sink_tokens,
            o->window_tokens);
    fprintf(f, "mode wave\nbudget %s\n", p->bounded ? "bounded" : "fixed");
    if (p->bounded)
        fprintf(f, "epsilon %g\nestimation_fraction %g\n", p->eps, p->ef);
    else
        fprintf(f, "retrieval_fraction %g\nestimation_fraction %g\n", p->rf,
                p->ef);
    fprintf(f, "rank default\n");
    fputs(per_layer, f);
    if (fclose(f))
        die("%s: write failed", c->profile);
}

/* ---- main ---------------------------------------------------------------- */

int main(int argc, char **argv) {
    cfg_t c = {.profile = "kvtune.profile", .target_recall = 0.95};
    int seg_given = 0, cl_given = 0, trecall_given = 0;
    enum { O_TR = 256, O_TE, O_SEG, O_CL, O_PLOT, O_JSON };
    static const struct option lo[] = {
        {"dump", required_argument, 0, 'd'},
        {"profile", required_argument, 0, 'p'},
        {"target-recall", required_argument, 0, O_TR},
        {"target-error", required_argument, 0, O_TE},
        {"layers", required_argument, 0, 'l'},
        {"queries", required_argument, 0, 'q'},
        {"segments", required_argument, 0, O_SEG},
        {"clusters", required_argument, 0, O_CL},
        {"quick", no_argument, 0, 'Q'},
        {"plot", required_argument, 0, O_PLOT},
        {"json", required_argument, 0, O_JSON},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (ch) {
        case 'd':
            c.dump = optarg;
            break;
        case 'p':
            c.profile = optarg;
            break;
        case O_TR:
            c.target_recall = parse_num(optarg, "--target-recall");
            trecall_given = 1;
            break;
        case O_TE:
            c.target_error = parse_num(optarg, "--target-error");
            break;
        case 'l':
            c.layers = (uint32_t)parse_num(optarg, "--layers");
            break;
        case 'q':
            c.queries = (uint32_t)parse_num(optarg, "--queries");
            break;
        case O_SEG:
            if (parse_list(optarg, c.seg, &c.n_seg))
                die("--segments: '%s' is not a list of sizes", optarg);
            seg_given = 1;
            break;
        case O_CL:
            if (parse_list(optarg, c.cl, &c.n_cl))
                die("--clusters: '%s' is not a list of sizes", optarg);
            cl_given = 1;
            break;
        case 'Q':
            c.quick = 1;
            break;
        case O_PLOT:
            c.plot = optarg;
            break;
        case O_JSON:
            c.json = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!c.dump || optind != argc) {
        usage(stderr);
        return 2;
    }
    /* An error target alone replaces the default recall target. */
    if (c.target_error > 0 && !trecall_given)
        c.target_recall = 0;
    if (c.target_recall < 0 || c.target_recall > 1 || c.target_error < 0)
        die("targets: recall in [0, 1], error >= 0");
    c.progress_tty = isatty(2);
    double t_start = now_s();

    kvt_dump_t dp;
    int rc = kvt_dump_open(c.dump, &dp);
    if (rc)
        die("%s: %s", c.dump,
            rc == KVS_ECORRUPT ? "not a kvdecode --dump file (or truncated)"
                               : kvs_strerror(rc));
    kvs_options_t o;
    kvs_options_default(&o);
    const uint32_t HQ = dp.n_q, HKV = dp.n_kv, d = dp.d, G = HQ / HKV;
    const uint32_t L =
        c.layers && c.layers < dp.n_layers ? c.layers : dp.n_layers;
    if (!c.queries)
        c.queries = c.quick ? 8 : 16;
    const uint32_t ctx = dp.n_tokens, nq = c.queries;
    if (nq >= ctx || G == 0)
        die("sample too small: %u tokens for %u decode queries", ctx, nq);
    /* The query positions (see the top of the file). */
    if (nq * 4 > ctx)
        die("sample too small: %u tokens for %u queries", ctx, nq);
    const uint32_t steady = o.sink_tokens + o.window_tokens;
    if (!seg_given) {
        static const uint32_t full[] = {2048, 4096, 8192, 16384};
        static const uint32_t quick[] = {4096, 8192};
        const uint32_t *s = c.quick ? quick : full;
        uint32_t n = c.quick ? 2 : 4;
        c.n_seg = 0;
        for (uint32_t i = 0; i < n; i++)
            if (s[i] <= ctx / 2)
                c.seg[c.n_seg++] = s[i];
        /* A short sample: the largest power of two that leaves room for
         * the steady zone, so something is indexed at all. */
        if (!c.n_seg) {
            uint32_t x = 64;
            while (x * 2 <= ctx / 2)
                x *= 2;
            c.seg[c.n_seg++] = x;
        }
    }
    if (!cl_given) {
        static const uint32_t full[] = {8, 16, 32};
        static const uint32_t quick[] = {16, 32};
        c.n_cl = c.quick ? 2 : 3;
        memcpy(c.cl, c.quick ? quick : full, c.n_cl * sizeof(uint32_t));
    }
    for (uint32_t i = 0; i < c.n_seg; i++)
        if (c.seg[i] <= steady || c.seg[i] > ctx / 2)
            die("segment size %u: must exceed sink + window (%u) and be at "
                "most half the sample (%u tokens)",
                c.seg[i], steady, ctx);
    uint32_t span = 0;
    for (uint32_t i = 0; i < c.n_seg; i++)
        span = c.seg[i] > span ? c.seg[i] : span;
    if (span < nq)
        span = nq;
    uint32_t *qpos = xcalloc(nq, sizeof(uint32_t));
    for (uint32_t i = 0; i < nq; i++) {
        double f = fmod(0.6180339887498949 * i, 1.0);
        qpos[i] = ctx - 1 - (uint32_t)(f * span);
    }
    make_points(&c);
    const size_t n_pairs = (size_t)L * HQ * nq;
    for (uint32_t i = 0; i < n_pts; i++) {
        point_t *p = &pts[i];
        p->recall = xcalloc(n_pairs, sizeof(float));
        p->scan = xcalloc(n_pairs, sizeof(float));
        p->bytes = xcalloc(n_pairs, sizeof(float));
        p->err = xcalloc(n_pairs, sizeof(float));
        p->exact = xcalloc(n_pairs, sizeof(float));
    }
    fprintf(stderr,
            "kvtune: %s: %u layers (of %u), %u query / %u KV heads, d %u, "
            "%u tokens, %u queries per head over its last %u positions; %u "
            "segment x %u cluster sizes, %u points\n",
            c.dump, L, dp.n_layers, HQ, HKV, d, ctx, nq, span, c.n_seg, c.n_cl,
            n_pts);

    float *keys = xcalloc((size_t)ctx * d, sizeof(float));
    float *vals = xcalloc((size_t)ctx * d, sizeof(float));
    float *qg = xcalloc((size_t)nq * G * d, sizeof(float));
    float *ref = xcalloc((size_t)nq * G * d, sizeof(float));
    int64_t *truth = xcalloc((size_t)nq * G * TOPK, sizeof(int64_t));
    float *tsc = xcalloc(TOPK, sizeof(float));
    float *fout = xcalloc((size_t)G * d, sizeof(float));
    kvs_scratch_t *scr = kvs_scratch_new();
    if (!scr)
        die("out of memory");
    double t_full = 0;
    uint64_t n_full = 0;
    uint32_t units = L * HKV * c.n_seg * c.n_cl, done = 0;
    prog_t0 = now_s();
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t g = 0; g < HKV; g++) {
            kvt_dump_rows(&dp, l, HQ + g, 0, ctx, keys);
            kvt_dump_rows(&dp, l, HQ + HKV + g, 0, ctx, vals);
            for (uint32_t j = 0; j < G; j++)
                for (uint32_t i = 0; i < nq; i++)
                    kvt_dump_rows(&dp, l, g * G + j, qpos[i], 1,
                                  qg + ((size_t)i * G + j) * d);
            head_data_t h = {.d = d,
                             .G = G,
                             .nq = nq,
                             .pos = qpos,
                             .ctx = ctx,
                             .keys = keys,
                             .vals = vals,
                             .q = qg,
                             .truth = truth,
                             .ref = ref};
            /* Ground truth over the exact view (everything in the tail):
             * the top-100 by q.k and attention in double; and the fp32
             * full attention a decoder would run, for time. */
            for (uint32_t i = 0; i < nq; i++) {
                kvs_head_view_t v = make_view(&h, NULL, 0, 1, qpos[i], &o);
                kvs_zone_params_t zx = {
                    .exact = 1, .precise = 1, .scale = 1.0f / sqrtf((float)d)};
                const float *q = qg + (size_t)i * G * d;
                for (uint32_t j = 0; j < G; j++)
                    if ((rc = kvs_head_search(
                             &v, q + (size_t)j * d, TOPK, &zx, scr,
                             truth + ((size_t)i * G + j) * TOPK, tsc, NULL)))
                        die("exact search: %s", kvs_strerror(rc));
                if ((rc = kvs_head_attend(&v, q, G, &zx, scr,
                                          ref + (size_t)i * G * d, NULL)))
                    die("exact attend: %s", kvs_strerror(rc));
                zx.precise = 0;
                double t0 = now_s();
                if ((rc = kvs_head_attend(&v, q, G, &zx, scr, fout, NULL)))
                    die("full attend: %s", kvs_strerror(rc));
                t_full += now_s() - t0;
                n_full++;
            }
            for (uint32_t si = 0; si < c.n_seg; si++) {
                /* Every segment some query sees (the last query sits at
                 * ctx - 1). */
                const uint32_t S = c.seg[si], nseg = (ctx - 1) / S;
                for (uint32_t ci = 0; ci < c.n_cl; ci++) {
                    const uint32_t cl = c.cl[ci];
                    kvs_segment_t **segs = xcalloc(nseg, sizeof *segs);
                    /* What the store builds: its parameters and seeds
                     * (engine/build.c: 1234 + first position). */
                    kvs_build_params_t bp = {cl, o.kmeans_iters, o.sink_tokens,
                                             o.window_tokens, 0};
                    for (uint32_t s = 0; s < nseg; s++) {
                        char err[160] = "";
                        bp.seed = 1234 + (uint64_t)s * S;
                        if ((rc = kvs_segment_build(&bp, KVS_DTYPE_F32, d,
                                                    (uint64_t)s * S, S,
                                                    keys + (size_t)s * S * d,
                                                    vals + (size_t)s * S * d,
                                                    &segs[s], err, sizeof err)))
                            die("segment build: %s", err);
                    }
                    measure_build(&h, segs, nseg, S, cl, &o,
                                  ((size_t)l * HQ + g * G) * nq, scr);
                    for (uint32_t s = 0; s < nseg; s++)
                        kvs_segment_free(segs[s]);
                    free(segs);
                    char what[64];
                    snprintf(what, sizeof what,
                             "layer %u/%u kv %u/%u seg %u cl %u", l + 1, L,
                             g + 1, HKV, S, cl);
                    progress(&c, ++done, units, what);
                }
            }
        }
    }
    kvs_scratch_free(scr);
    double tune_s = now_s() - t_start;

    /* Aggregate, mark the front, choose. */
    double *tmp = xcalloc(n_pairs, sizeof(double));
    subset_t all = {-1, -1, HQ, G, nq};
    for (uint32_t i = 0; i < n_pts; i++) {
        point_t *p = &pts[i];
        if (p->skip)
            continue;
        agg_t a = aggregate(p, n_pairs, &all, tmp);
        p->recall_mean = a.recall_mean;
        p->scan_med = a.scan_med;
        p->scan_p90 = a.scan_p90;
        p->bytes_med = a.bytes_med;
        p->err_med = a.err_med;
        p->err_p90 = a.err_p90;
        p->exact_med = a.exact_med;
        p->time_us = p->n_attend ? 1e6 * p->t_attend / p->n_attend : NAN;
    }
    uint32_t n_front = 0;
    for (uint32_t i = 0; i < n_pts; i++) {
        if (pts[i].skip)
            continue;
        int dom = 0;
        for (uint32_t j = 0; j < n_pts && !dom; j++)
            dom = j != i && !pts[j].skip && dominates(&pts[j], &pts[i]);
        pts[i].front = !dom;
        n_front += !dom;
    }
    int64_t best = -1, closest = -1, best95 = -1;
    for (uint32_t i = 0; i < n_pts; i++) {
        const point_t *p = &pts[i];
        if (p->skip || !deployable(p))
            continue;
        if (meets(&c, p->recall_mean, p->err_med) &&
            (best < 0 || better_tie(p, &pts[best])))
            best = i;
        if (p->recall_mean + 1e-9 >= 0.95 &&
            (best95 < 0 || p->scan_med < pts[best95].scan_med))
            best95 = i;
        /* Closest when nothing meets the targets: highest recall, then
         * lowest error; lowest error when only an error was asked for. */
        if (closest < 0)
            closest = i;
        else if (c.target_recall > 0
                     ? (p->recall_mean > pts[closest].recall_mean ||
                        (p->recall_mean == pts[closest].recall_mean &&
                         p->err_med < pts[closest].err_med))
                     : p->err_med < pts[closest].err_med)
            closest = i;
    }
    if (closest < 0)
        die("no point could be measured on this sample");
    int reached = best >= 0;
    uint32_t chosen = (uint32_t)(reached ? best : closest);
    const point_t *cp = &pts[chosen];

    printf("kvtune: %s, %u layers x %u query heads x %u decode queries = "
           "%zu pairs; %u points, %u on the Pareto front (bytes read and "
           "attend time against recall and error); %.1f s\n",
           c.dump, L, HQ, nq, n_pairs, n_pts, n_front, tune_s);
    printf("keys / keys90: full keys read by search, median / p90 over "
           "pairs, of the context; bytes: all bytes search read, median, of "
           "the context's key bytes; relL2: attention output vs exact; "
           "exact: keys attended exactly; full fp32 attention %.1f us per "
           "call\n",
           n_full ? 1e6 * t_full / n_full : NAN);
    printf("\nPareto front (* = the profile):\n");
    print_header(stdout);
    /* Sorted by bytes read: a selection sort over the front keeps the
     * points array in sweep order for the other outputs. */
    unsigned char *shown = xcalloc(n_pts, 1);
    for (uint32_t k = 0; k < n_front; k++) {
        int64_t m = -1;
        for (uint32_t i = 0; i < n_pts; i++)
            if (pts[i].front && !pts[i].skip && !shown[i] &&
                (m < 0 || pts[i].bytes_med < pts[m].bytes_med))
                m = i;
        shown[m] = 1;
        print_row(stdout, &pts[m], (uint32_t)m == chosen ? "*" : " ");
    }
    free(shown);
    if (!pts[chosen].front) {
        printf("the profile's point (dominated by a point of another "
               "ranking the store cannot run):\n");
        print_row(stdout, cp, "*");
    }

    /* Per layer and per KV head: the cheapest point of the profile's build
     * and ranking meeting the target on their own pairs. The store has one
     * budget for all, so these are reported, not applied. */
    char *per = xcalloc(65536, 1);
    size_t pl = 0;
    pl += (size_t)snprintf(per + pl, 65536 - pl,
                           "# per layer / KV head (kvs_options_t takes one "
                           "budget for all: reported, not applied):\n");
    printf("\nper layer and KV head, segments %u, clusters %u, %s budget "
           "(reported only: the store takes one budget for all):\n",
           cp->seg, cp->cl, cp->bounded ? "bounded" : "fixed");
    for (int l = 0; l < (int)L; l++)
        for (int g = -1; g < (int)HKV; g++) {
            subset_t s = {l, g, HQ, G, nq};
            int64_t b = -1;
            agg_t ba = {0};
            for (uint32_t i = 0; i < n_pts; i++) {
                const point_t *p = &pts[i];
                if (p->skip || !deployable(p) || p->seg != cp->seg ||
                    p->cl != cp->cl || p->bounded != cp->bounded)
                    continue;
                agg_t a = aggregate(p, n_pairs, &s, tmp);
                if (meets(&c, a.recall_mean, a.err_med) &&
                    (b < 0 || a.bytes_med < ba.bytes_med)) {
                    b = i;
                    ba = a;
                }
            }
            char who[32];
            if (g < 0)
                snprintf(who, sizeof who, "layer %d", l);
            else
                snprintf(who, sizeof who, "layer %d kv %d", l, g);
            if (b < 0) {
                printf("  %-14s target not reached on this sweep\n", who);
                if (pl < 65000)
                    pl += (size_t)snprintf(per + pl, 65536 - pl,
                                           "# %s: target not reached\n", who);
                continue;
            }
            const point_t *p = &pts[b];
            char knob[48];
            if (p->bounded)
                snprintf(knob, sizeof knob, "epsilon %g", p->eps);
            else
                snprintf(knob, sizeof knob, "retrieval_fraction %g ef %g",
                         p->rf, p->ef);
            printf("  %-14s %-34s recall %.4f keys %.3f%% bytes %.3f%% "
                   "relL2 %.5f\n",
                   who, knob, ba.recall_mean, 100 * ba.scan_med,
                   100 * ba.bytes_med, ba.err_med);
            if (pl < 65000)
                pl += (size_t)snprintf(
                    per + pl, 65536 - pl,
                    "# %s: %s (recall %.4f, keys %.3f%%, bytes %.3f%%, "
                    "relL2 %.5f)\n",
                    who, knob, ba.recall_mean, 100 * ba.scan_med,
                    100 * ba.bytes_med, ba.err_med);
        }
    free(tmp);

    write_profile(&c, cp, &o, reached, per);
    free(per);
    printf("\nprofile %s: segment_tokens %u cluster_tokens %u budget %s "
           "%s %g estimation_fraction %g: recall %.4f, full keys %.3f%% "
           "(p90 %.3f%%), bytes %.3f%%, relL2 %.5f (p90 %.5f), exact "
           "%.3f%%, attend %.1f us%s\n",
           c.profile, cp->seg, cp->cl, cp->bounded ? "bounded" : "fixed",
           cp->bounded ? "epsilon" : "retrieval_fraction",
           cp->bounded ? cp->eps : cp->rf, cp->ef, cp->recall_mean,
           100 * cp->scan_med, 100 * cp->scan_p90, 100 * cp->bytes_med,
           cp->err_med, cp->err_p90, 100 * cp->exact_med, cp->time_us,
           reached ? "" : "  [TARGET NOT REACHED: closest point written]");
    if (!reached)
        fprintf(stderr, "kvtune: no point the store can run meets the "
                        "target; wrote the closest\n");

    char pngbuf[4096];
    const char *png = c.plot;
    if (!png) {
        snprintf(pngbuf, sizeof pngbuf, "%s.png", c.profile);
        png = pngbuf;
    }
    /* The table first when both streams go to one file. */
    fflush(stdout);
    if (strcmp(png, "none"))
        draw_plot(png, chosen);

    if (c.json) {
        FILE *j = fopen(c.json, "w");
        if (!j)
            die("%s: %s", c.json, strerror(errno));
        fprintf(j, "{\"bench\":\"kvtune\",\"metrics\":{\"pareto_points\":%u",
                n_front);
        if (best95 >= 0)
            fprintf(j, ",\"scanned_at_recall95\":%.6g", pts[best95].scan_med);
        fprintf(j,
                ",\"rel_l2_median\":%.6g,\"exact_fraction\":%.6g,"
                "\"tune_s\":%.3f},\n\"rows\":[",
                cp->err_med, cp->exact_med, tune_s);
        int first = 1;
        for (uint32_t i = 0; i < n_pts; i++) {
            const point_t *p = &pts[i];
            if (p->skip || (!p->front && i != chosen))
                continue;
            fprintf(j,
                    "%s\n  {\"segment_tokens\":%u,\"cluster_tokens\":%u,"
                    "\"rank\":\"%s\",\"code_ratio\":%g,\"budget\":\"%s\","
                    "\"retrieval_fraction\":%g,\"estimation_fraction\":%g,"
                    "\"epsilon\":%g,\"recall_at_100\":%.6g,"
                    "\"scanned_fraction\":%.6g,\"scanned_fraction_p90\":%.6g,"
                    "\"bytes_read_fraction\":%.6g,\"rel_l2_median\":%.6g,"
                    "\"rel_l2_p90\":%.6g,\"exact_fraction\":%.6g,"
                    "\"attend_us\":%.3f,\"pareto\":%s,\"profile\":%s}",
                    first ? "" : ",", p->seg, p->cl, rank_name[p->rank],
                    p->code_ratio, p->bounded ? "bounded" : "fixed", p->rf,
                    p->ef, p->eps, p->recall_mean, p->scan_med, p->scan_p90,
                    p->bytes_med, p->err_med, p->err_p90, p->exact_med,
                    p->time_us, p->front ? "true" : "false",
                    i == chosen ? "true" : "false");
            first = 0;
        }
        fprintf(j, "\n]}\n");
        if (fclose(j))
            die("%s: write failed", c.json);
    }

    for (uint32_t i = 0; i < n_pts; i++) {
        free(pts[i].recall);
        free(pts[i].scan);
        free(pts[i].bytes);
        free(pts[i].err);
        free(pts[i].exact);
    }
    free(pts);
    free(keys);
    free(vals);
    free(qg);
    free(ref);
    free(truth);
    free(tsc);
    free(fout);
    free(qpos);
    kvt_dump_close(&dp);
    return 0;
}
