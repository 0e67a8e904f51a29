/*
 * persist_bench.c: the `persistence` benchmark (bench/run.sh persistence).
 *
 * At Llama-3-8B layer geometry (8 KV heads, head_dim 128, fp16; 32 query
 * heads for the attend) on a RocksDB data directory:
 * - append throughput (MB/s of K+V) with sync always / batch / none /
 *   async, for decode-style appends (one token per call) and prefill-style
 *   appends (256 tokens per call), and batch mode with 4 appending threads
 *   (group commit shares one fsync among them). Each rate is the bytes
 *   acknowledged over the appending time; `mb_s_flushed` also counts the
 *   kvs_store_flush at the end (what async owes the disk: with the default
 *   256 MiB lag a short run can be mostly queued);
 * - restart: a store holding `--tokens` tokens (1M by default) of one layer,
 *   index built, reopened in each load mode (issue 14): eager (every record
 *   read and checked before the open returns: the behaviour before), lazy
 *   (the open reads the sequence table and each head's last record; the
 *   first call reads the sequence) and warm (the default: lazy plus the
 *   background warm-up). Per mode: time of kvs_store_open, to the first
 *   answered attend, and until the sequence is resident (full warm-up). The
 *   page cache is dropped before each open where the process may
 *   (/proc/sys/vm/drop_caches, root); the JSON says whether it was;
 *   `first_attend_after_restart_ms` is the first attend alone (open
 *   excluded): since storage format 2 a call reads only the layer it needs
 *   (its segments' metadata records and K/V blocks, the KV heads in
 *   parallel), where it read the whole sequence before; `--layers L` makes
 *   a store of L layers of `--tokens` each to show the difference (with
 *   one layer the first attend still reads everything);
 * - space: bytes on disk / raw K/V bytes, after a compaction.
 * Crash rounds are run by bench/run.sh through the persistence test.
 *
 *   persist_bench [--quick] [--tokens N] [--layers L] [--dir DIR]
 *                 [--json FILE] [--restart-only] [--store DIR]
 *                 [--load eager|lazy|warm]
 * --restart-only skips the append rates (their rows are absent); --store
 * keeps the restart store in DIR and reuses one already there (building
 * 1M tokens and their index takes many minutes on 2 cores); --load runs
 * that restart only (the others' numbers are then 0).
 */
#include "kvs_kernels.h"
#include "kvs_rng.h"
#include "kvstore.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { KVH = 8, QH = 32, D = 128 };
static const kvs_geometry_t GEO = {1, QH, KVH, D, KVS_DTYPE_F16};
static kvs_geometry_t restart_geo = {1, QH, KVH, D, KVS_DTYPE_F16};
static const size_t TOKEN_BYTES = 2 * KVH * D * 2; /* K + V, fp16 */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static kvs_rng_t rng = {0x853c49e6748fea9bull};
static float frand(void) {
    return (float)(kvs_rng_uniform(&rng) * 2 - 1);
}

static void rm_rf(const char *d) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    if (system(cmd) != 0)
        fprintf(stderr, "persist_bench: could not remove %s\n", d);
}

static kvs_store_t *open_store_load(const char *dir, kvs_sync_t sync,
                                    kvs_load_t load) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.sync = sync;
    o.load = load;
    kvs_store_t *s = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc) {
        fprintf(stderr, "persist_bench: open %s: %s (%s)\n", dir,
                kvs_strerror(rc), kvs_store_open_error());
        exit(1);
    }
    return s;
}

static kvs_store_t *open_store(const char *dir, kvs_sync_t sync) {
    return open_store_load(dir, sync, KVS_LOAD_DEFAULT);
}

/* Empty the page cache (root only); 1 when done. */
static int drop_caches(void) {
    sync();
    FILE *f = fopen("/proc/sys/vm/drop_caches", "w");
    if (!f)
        return 0;
    int ok = fputs("3\n", f) >= 0;
    return fclose(f) == 0 && ok;
}

typedef struct restart_s {
    const char *mode;
    double open_s, first_s, warm_s;
    double attend_s; /* the first attend alone */
    int cache_dropped;
    uint64_t rebuilt;
} restart_t;

/* Reopen `dir` in one load mode: open, first attend, sequence resident. */
static int restart(const char *dir, kvs_load_t load, restart_t *r) {
    r->cache_dropped = drop_caches();
    double t0 = now_s();
    kvs_store_t *s = open_store_load(dir, KVS_SYNC_NONE, load);
    r->open_s = now_s() - t0;
    float q[QH * D], out[QH * D];
    for (int i = 0; i < QH * D; i++)
        q[i] = frand();
    double ta = now_s();
    if (kvs_seq_attend(s, 1, 0, q, NULL, out, NULL)) {
        fprintf(stderr, "persist_bench: attend after restart: %s\n",
                kvs_store_errmsg(s));
        return 1;
    }
    r->first_s = now_s() - t0;
    r->attend_s = now_s() - ta;
    /* Without a warm-up the other layers are read by calls: one each. */
    for (uint32_t l = 1; l < restart_geo.n_layers && load == KVS_LOAD_LAZY; l++)
        if (kvs_seq_attend(s, 1, l, q, NULL, out, NULL)) {
            fprintf(stderr, "persist_bench: attend after restart: %s\n",
                    kvs_store_errmsg(s));
            return 1;
        }
    for (;;) {
        kvs_seq_info_t info;
        if (kvs_seq_info(s, 1, &info))
            return 1;
        if (info.resident)
            break;
        usleep(1000);
    }
    r->warm_s = now_s() - t0;
    kvs_store_stats_t st;
    kvs_store_stats(s, &st);
    r->rebuilt = st.builds_done;
    kvs_store_close(s);
    fprintf(stderr,
            "  restart (%s): open %.3f s, first attend %.2f s (the attend "
            "itself %.0f ms), resident %.2f s; segments rebuilt %llu; page "
            "cache %s\n",
            r->mode, r->open_s, r->first_s, r->attend_s * 1e3, r->warm_s,
            (unsigned long long)r->rebuilt,
            r->cache_dropped ? "dropped" : "NOT dropped (warm)");
    return 0;
}

/* fp16 K and V for `n` tokens. */
static uint16_t *make_rows(uint32_t n) {
    size_t elems = (size_t)n * KVH * D;
    uint16_t *x = malloc(2 * elems * 2);
    for (size_t i = 0; i < 2 * elems; i++)
        x[i] = kvs_f32_to_f16(frand());
    return x;
}

typedef struct append_job_s {
    kvs_store_t *s;
    uint64_t seq;
    uint32_t chunk;
    double seconds;
    uint64_t tokens;
    const uint16_t *rows;
} append_job_t;

static void *append_loop(void *arg) {
    append_job_t *j = arg;
    size_t elems = (size_t)j->chunk * KVH * D;
    double t0 = now_s();
    while (now_s() - t0 < j->seconds) {
        if (kvs_seq_append(j->s, j->seq, 0, j->chunk, j->rows,
                           j->rows + elems)) {
            fprintf(stderr, "persist_bench: append: %s\n",
                    kvs_store_errmsg(j->s));
            exit(1);
        }
        j->tokens += j->chunk;
    }
    j->seconds = now_s() - t0;
    return NULL;
}

/* MB/s of K+V appended by `threads` threads, each to its own sequence. */
static double append_rate(const char *base, kvs_sync_t sync, uint32_t chunk,
                          int threads, double seconds, double *appends_s,
                          double *mb_flushed) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/append-%d-%u-%d", base, (int)sync, chunk,
             threads);
    rm_rf(dir);
    kvs_store_t *s = open_store(dir, sync);
    uint16_t *rows = make_rows(chunk);
    append_job_t jobs[8];
    pthread_t th[8];
    for (int i = 0; i < threads; i++) {
        jobs[i] = (append_job_t){s, (uint64_t)i + 1, chunk, seconds, 0, rows};
        if (kvs_seq_create(s, jobs[i].seq, &GEO))
            exit(1);
    }
    for (int i = 0; i < threads; i++)
        pthread_create(&th[i], NULL, append_loop, &jobs[i]);
    uint64_t tokens = 0;
    double secs = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        tokens += jobs[i].tokens;
        if (jobs[i].seconds > secs)
            secs = jobs[i].seconds;
    }
    double t0 = now_s();
    if (kvs_store_flush(s)) {
        fprintf(stderr, "persist_bench: flush: %s\n", kvs_store_errmsg(s));
        exit(1);
    }
    double t_flush = now_s() - t0;
    if (mb_flushed)
        *mb_flushed = (double)tokens * TOKEN_BYTES / (secs + t_flush) / 1e6;
    kvs_store_close(s);
    rm_rf(dir);
    free(rows);
    *appends_s = (double)tokens / chunk / secs;
    return (double)tokens * TOKEN_BYTES / secs / 1e6;
}

int main(int argc, char **argv) {
    int quick = 0, restart_only = 0;
    const char *only_load = NULL; /* one restart mode only */
    uint64_t tokens = 0;
    const char *json = NULL, *base = NULL, *store = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--restart-only"))
            restart_only = 1;
        else if (!strcmp(argv[i], "--store") && i + 1 < argc)
            store = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            tokens = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--load") && i + 1 < argc)
            only_load = argv[++i];
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc)
            restart_geo.n_layers = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            base = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else {
            fprintf(stderr, "usage: persist_bench [--quick] [--tokens N] "
                            "[--layers L] [--dir DIR] [--json FILE] "
                            "[--restart-only] [--store DIR] [--load MODE]\n");
            return 2;
        }
    }
    if (!tokens)
        tokens = quick ? 32768 : 1048576;
    char tmpl[] = "/tmp/kvs-persist-bench-XXXXXX";
    if (!base && !(base = mkdtemp(tmpl))) {
        perror("mkdtemp");
        return 1;
    }
    mkdir(base, 0755);
    double secs = quick ? 0.4 : 2.0;

    /* 1. Append throughput. */
    enum { N_MODES = 4 };
    const char *names[N_MODES] = {"batch", "always", "none", "async"};
    const kvs_sync_t modes[N_MODES] = {KVS_SYNC_BATCH, KVS_SYNC_ALWAYS,
                                       KVS_SYNC_NONE, KVS_SYNC_ASYNC};
    double mb[N_MODES][2] = {{0}}, aps[N_MODES][2] = {{0}},
           mbf[N_MODES][2] = {{0}};
    double aps4 = 0, mb_batch4 = 0;
    for (int m = 0; m < N_MODES && !restart_only; m++)
        for (int c = 0; c < 2; c++) {
            uint32_t chunk = c == 0 ? 1 : 256;
            mb[m][c] = append_rate(base, modes[m], chunk, 1, secs, &aps[m][c],
                                   &mbf[m][c]);
            fprintf(stderr,
                    "  sync %-6s %3u token(s)/append: %8.1f MB/s "
                    "(%.0f appends/s; %.1f MB/s with the final flush)\n",
                    names[m], chunk, mb[m][c], aps[m][c], mbf[m][c]);
        }
    if (!restart_only) {
        mb_batch4 = append_rate(base, KVS_SYNC_BATCH, 1, 4, secs, &aps4, NULL);
        fprintf(stderr,
                "  sync batch, 4 threads, 1 token/append: %.1f MB/s "
                "(%.0f appends/s)\n",
                mb_batch4, aps4);
    }

    /* 2. Restart and space. */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/restart", base);
    if (store)
        snprintf(dir, sizeof dir, "%s", store);
    char current[600];
    snprintf(current, sizeof current, "%s/CURRENT", dir);
    struct stat cur_st;
    int reuse = store && stat(current, &cur_st) == 0;
    double t_load = 0, t_indexed = 0;
    uint64_t disk_before = 0, disk_after = 0;
    kvs_store_stats_t st;
    if (!reuse) {
        rm_rf(dir);
        kvs_store_t *s = open_store(dir, KVS_SYNC_NONE);
        if (kvs_seq_create(s, 1, &restart_geo))
            return 1;
        /* A pool of 64K random tokens, cycled: eight segments' worth of
         * distinct keys, so k-means sees real work, without generating 1M
         * tokens. */
        const uint32_t chunk = 1024, pool = 65536;
        uint16_t *rows = make_rows(pool);
        size_t row_elems = (size_t)KVH * D;
        double t0 = now_s();
        for (uint64_t t = 0; t < tokens; t += chunk)
            for (uint32_t l = 0; l < restart_geo.n_layers; l++) {
                /* each layer its own keys: start l segments further */
                uint64_t at = (t + (uint64_t)l * chunk) % pool;
                if (kvs_seq_append(s, 1, l, chunk, rows + at * row_elems,
                                   rows + ((size_t)pool + at) * row_elems)) {
                    fprintf(stderr, "persist_bench: %s\n", kvs_store_errmsg(s));
                    return 1;
                }
            }
        t_load = now_s() - t0;
        kvs_seq_wait_indexed(s, 1);
        t_indexed = now_s() - t0;
        kvs_store_stats(s, &st);
        disk_before = st.disk_bytes;
        kvs_store_compact(s);
        kvs_store_stats(s, &st);
        disk_after = st.disk_bytes;
        kvs_store_close(s);
        free(rows);
        fprintf(stderr,
                "  %llu tokens appended in %.1f s, indexed after %.1f s; "
                "disk %.2f GB before compaction, %.2f GB after (raw K/V "
                "%.2f GB)\n",
                (unsigned long long)tokens, t_load, t_indexed,
                disk_before / 1e9, disk_after / 1e9,
                (double)tokens * TOKEN_BYTES * restart_geo.n_layers / 1e9);
    } else {
        kvs_store_t *s = open_store_load(dir, KVS_SYNC_NONE, KVS_LOAD_LAZY);
        if (kvs_seq_shape(s, 1, 0, &restart_geo, &tokens))
            return 1;
        kvs_store_stats(s, &st);
        disk_after = st.disk_bytes;
        kvs_store_close(s);
        fprintf(stderr, "  reusing the store in %s: %llu tokens, %.2f GB\n",
                dir, (unsigned long long)tokens, disk_after / 1e9);
    }
    double raw = (double)tokens * TOKEN_BYTES * restart_geo.n_layers;

    /* Eager first (the behaviour before issue 14), then the lazy modes:
     * each from a dropped page cache where allowed. */
    enum { N_LOADS = 3 };
    restart_t rs[N_LOADS] = {
        {.mode = "eager"}, {.mode = "lazy"}, {.mode = "warm"}};
    const kvs_load_t loads[N_LOADS] = {KVS_LOAD_EAGER, KVS_LOAD_LAZY,
                                       KVS_LOAD_WARM};
    for (int m = 0; m < N_LOADS; m++)
        if ((!only_load || !strcmp(only_load, rs[m].mode)) &&
            restart(dir, loads[m], &rs[m]))
            return 1;
    if (!store)
        rm_rf(dir);
    if (base == tmpl)
        rmdir(base);

    FILE *f = json ? fopen(json, "w") : stdout;
    if (!f)
        return 1;
    fprintf(f, "{\n  \"bench\": \"persistence\",\n  \"metrics\": {\n");
    if (!restart_only) {
        fprintf(f, "    \"append_mb_s_sync_always\": %.2f,\n", mb[1][1]);
        fprintf(f, "    \"append_mb_s_sync_batch\": %.2f,\n", mb[0][1]);
        fprintf(f, "    \"append_mb_s_sync_none\": %.2f,\n", mb[2][1]);
        fprintf(f, "    \"append_mb_s_async\": %.2f,\n", mb[3][1]);
        fprintf(f, "    \"append_mb_s_async_flushed\": %.2f,\n", mbf[3][1]);
    }
    if (tokens == 1048576 && restart_geo.n_layers == 1) {
        /* Issue 14: the first attend after a restart, alone, in the
         * default mode and without warm-up; the eager open (the whole
         * sequence read, what a first attend waited for before format 2
         * when the sequence was one layer) is beside it. */
        fprintf(f, "    \"first_attend_after_restart_ms\": %.1f,\n",
                rs[2].attend_s * 1e3);
        fprintf(f, "    \"first_attend_after_restart_ms_lazy\": %.1f,\n",
                rs[1].attend_s * 1e3);
        /* The default (warm) mode; _eager: the same store opened as
         * before issue 14, in the same run. */
        fprintf(f, "    \"restart_open_s_1m\": %.3f,\n", rs[2].open_s);
        fprintf(f, "    \"restart_s_1m\": %.3f,\n", rs[2].first_s);
        fprintf(f, "    \"restart_warm_s_1m\": %.3f,\n", rs[2].warm_s);
        fprintf(f, "    \"restart_open_s_1m_eager\": %.3f,\n", rs[0].open_s);
        fprintf(f, "    \"restart_s_1m_eager\": %.3f,\n", rs[0].first_s);
    }
    if (disk_before)
        fprintf(f, "    \"space_amplification\": %.4f,\n", disk_after / raw);
    fprintf(f, "    \"restart_tokens\": %llu\n  },\n",
            (unsigned long long)tokens);
    fprintf(f, "  \"rows\": [\n");
    for (int m = 0; m < N_MODES && !restart_only; m++)
        for (int c = 0; c < 2; c++)
            fprintf(f,
                    "    {\"sync\": \"%s\", \"tokens_per_append\": %d, "
                    "\"threads\": 1, \"mb_s\": %.2f, \"appends_s\": %.0f, "
                    "\"mb_s_flushed\": %.2f},\n",
                    names[m], c ? 256 : 1, mb[m][c], aps[m][c], mbf[m][c]);
    if (!restart_only)
        fprintf(f,
                "    {\"sync\": \"batch\", \"tokens_per_append\": 1, "
                "\"threads\": 4, \"mb_s\": %.2f, \"appends_s\": %.0f},\n",
                mb_batch4, aps4);
    for (int m = 0; m < N_LOADS; m++)
        fprintf(f,
                "    {\"restart_tokens\": %llu, \"geometry\": \"8 kv heads x "
                "128, fp16, %u layer(s)\", \"layers\": %u, \"load\": \"%s\", "
                "\"open_s\": %.3f, \"first_attend_s\": %.3f, "
                "\"first_attend_after_restart_ms\": %.1f, "
                "\"resident_s\": %.3f, "
                "\"page_cache_dropped\": %s, \"segments_rebuilt\": %llu, "
                "\"append_s\": %.2f, \"indexed_s\": %.2f, "
                "\"disk_bytes_before_compaction\": %llu, "
                "\"disk_bytes\": %llu, \"raw_kv_bytes\": %.0f}%s\n",
                (unsigned long long)tokens, restart_geo.n_layers,
                restart_geo.n_layers, rs[m].mode, rs[m].open_s, rs[m].first_s,
                rs[m].attend_s * 1e3, rs[m].warm_s,
                rs[m].cache_dropped ? "true" : "false",
                (unsigned long long)rs[m].rebuilt, t_load, t_indexed,
                (unsigned long long)disk_before, (unsigned long long)disk_after,
                raw, m + 1 < N_LOADS ? "," : "");
    fprintf(f, "  ]\n}\n");
    if (json)
        fclose(f);
    return 0;
}
