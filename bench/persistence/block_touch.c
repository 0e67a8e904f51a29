/*
 * block_touch.c: which parts of the stored K/V a wave attend reads in full,
 * to choose the unit of K/V blocks in storage (docs/persistence.md). One KV
 * head of `--segments` segments of 1024 tokens (head_dim 128, fp16, the
 * persistence bench's random rows), indexed as the engine indexes them; its
 * keys and values are copied into page-aligned memory that is then made
 * unreadable (mprotect), so that each page the attend reads faults once:
 * the handler records it and makes it readable. Per attend (default query
 * params: codes ranking, fixed budget, a GQA group of 4 queries) it reports
 * the share of segments, of 64-token groups, of 16-token groups (about a
 * cluster; a 4 KiB page of keys) and of bytes that a block store of that
 * unit would have to read, against what the attend reads itself.
 *
 *   block_touch [--segments N] [--queries N] [--json FILE]
 *
 * A program (it owns SIGSEGV); not a test. Random keys are the hard case
 * for locality: real keys cluster, and the keys an attend picks with them.
 */
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvs_rng.h"
#include "kvstore.h"

#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { SEG = 1024, D = 128, G = 4, PAGE = 4096 };

static char *region; /* every segment's keys, then values, page-aligned */
static size_t region_len;
static uint8_t *touched; /* per page */

static void on_fault(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    char *a = si->si_addr;
    if (a < region || a >= region + region_len) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    size_t page = (size_t)(a - region) / PAGE;
    touched[page] = 1;
    mprotect(region + page * PAGE, PAGE, PROT_READ);
}

int main(int argc, char **argv) {
    uint32_t n_seg = 64, n_q = 16;
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--segments") && i + 1 < argc)
            n_seg = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--queries") && i + 1 < argc)
            n_q = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else {
            fprintf(stderr, "usage: block_touch [--segments N] [--queries N] "
                            "[--json FILE]\n");
            return 2;
        }
    }
    kvs_options_t o;
    kvs_options_default(&o);
    const size_t rb = D * 2, half = (size_t)SEG * rb; /* keys of a segment */
    region_len = 2 * (size_t)n_seg * half;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    touched = calloc(region_len / PAGE, 1);
    kvs_segment_t **segs = calloc(n_seg, sizeof *segs);
    uint16_t *k = malloc(half), *v = malloc(half);
    if (region == MAP_FAILED || !touched || !segs || !k || !v)
        return 1;
    kvs_rng_t rng = {0x853c49e6748fea9bull};
    for (uint32_t s = 0; s < n_seg; s++) {
        for (size_t i = 0; i < (size_t)SEG * D; i++) {
            k[i] = kvs_f32_to_f16((float)(kvs_rng_uniform(&rng) * 2 - 1));
            v[i] = kvs_f32_to_f16((float)(kvs_rng_uniform(&rng) * 2 - 1));
        }
        kvs_build_params_t bp = {
            .cluster_tokens = o.cluster_tokens,
            .kmeans_iters = o.kmeans_iters,
            .sink_tokens = o.sink_tokens,
            .window_tokens = o.window_tokens,
            .seed = 1234 + (uint64_t)s * SEG,
        };
        char err[160];
        if (kvs_segment_build(&bp, KVS_DTYPE_F16, D, (uint64_t)s * SEG, SEG, k,
                              v, &segs[s], err, sizeof err)) {
            fprintf(stderr, "block_touch: build: %s\n", err);
            return 1;
        }
        /* The segment's K/V move into the watched region. */
        char *kk = region + (size_t)s * half;
        char *vv = region + ((size_t)n_seg + s) * half;
        memcpy(kk, segs[s]->keys, half);
        memcpy(vv, segs[s]->values, half);
        free(segs[s]->keys);
        free(segs[s]->values);
        segs[s]->keys = kk;
        segs[s]->values = vv;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    kvs_head_view_t view = {
        .dtype = KVS_DTYPE_F16,
        .d = D,
        .segments = segs,
        .n_segments = n_seg,
        .indexed_tokens = (uint64_t)n_seg * SEG,
        .sink_tokens = o.sink_tokens,
        .window_tokens = o.window_tokens,
    };
    kvs_zone_params_t zp = {
        .retrieval_fraction = o.defaults.retrieval_fraction,
        .estimation_fraction = o.defaults.estimation_fraction,
        .scale = 1.0f / sqrtf((float)D),
    };
    kvs_rank_params_t rp = {.rank = KVS_RANK_CODES};
    kvs_scratch_t *sc = kvs_scratch_new();
    float q[G * D], out[G * D];
    /* Per unit (tokens per block): blocks needed, summed over queries. */
    static const uint32_t units[4] = {SEG, 256, 64, 16};
    double need[4] = {0}, pages_read = 0;
    const size_t pages = region_len / PAGE, seg_pages = half / PAGE;
    for (uint32_t i = 0; i < n_q; i++) {
        for (size_t j = 0; j < (size_t)G * D; j++)
            q[j] = (float)(kvs_rng_uniform(&rng) * 2 - 1);
        memset(touched, 0, pages);
        mprotect(region, region_len, PROT_NONE);
        kvs_zone_stats_t st = {0};
        int rc = kvs_head_attend_ranked(&view, q, G, &zp, &rp, sc, out, &st);
        mprotect(region, region_len, PROT_READ | PROT_WRITE);
        if (rc) {
            fprintf(stderr, "block_touch: attend: %s\n", kvs_strerror(rc));
            return 1;
        }
        size_t t = 0;
        for (size_t p = 0; p < pages; p++)
            t += touched[p];
        pages_read += (double)t / pages;
        /* A block of u tokens holds the keys and the values of its slots:
         * it is needed when a page of either is read. */
        for (int u = 0; u < 4; u++) {
            size_t per = units[u] * rb / PAGE; /* key pages per block */
            if (per == 0)
                per = 1;
            size_t blocks = (size_t)n_seg * (SEG / units[u]), hit = 0;
            for (size_t b = 0; b < blocks; b++) {
                size_t s = b / (SEG / units[u]);
                size_t first = s * seg_pages + (b % (SEG / units[u])) * per;
                int any = 0;
                for (size_t p = first; p < first + per && !any; p++)
                    any = touched[p] || touched[(size_t)n_seg * seg_pages + p];
                hit += any;
            }
            need[u] += (double)hit / blocks;
        }
    }
    fprintf(stderr,
            "block_touch: %u segments of %u tokens, d %u fp16, %u attends "
            "(codes ranking, retrieval %.3f):\n"
            "  K/V pages read by the attend itself: %.1f%%\n",
            n_seg, SEG, D, n_q, zp.retrieval_fraction, 100 * pages_read / n_q);
    for (int u = 0; u < 4; u++)
        fprintf(stderr,
                "  blocks of %4u tokens (%3zu KiB K+V): %.1f%% needed\n",
                units[u], 2 * units[u] * rb / 1024, 100 * need[u] / n_q);
    FILE *f = json ? fopen(json, "w") : NULL;
    if (f) {
        fprintf(f,
                "{\"segments\": %u, \"segment_tokens\": %u, \"head_dim\": %u, "
                "\"attends\": %u, \"pages_read_pct\": %.2f",
                n_seg, SEG, D, n_q, 100 * pages_read / n_q);
        for (int u = 0; u < 4; u++)
            fprintf(f, ", \"blocks_needed_pct_%u\": %.2f", units[u],
                    100 * need[u] / n_q);
        fprintf(f, "}\n");
        fclose(f);
    }
    for (uint32_t s = 0; s < n_seg; s++) {
        segs[s]->keys = segs[s]->values = NULL; /* the region's */
        kvs_segment_free(segs[s]);
    }
    munmap(region, region_len);
    kvs_scratch_free(sc);
    free(segs), free(touched), free(k), free(v);
    return 0;
}
