/*
 * test_lazy_open.c: restart without reading the data (issue 14). A lazy
 * open (KVS_LOAD_LAZY, and the default KVS_LOAD_WARM with its warm-up
 * thread) reads the sequence table and each head's last record only; the
 * records are read on first use or by the warm-up. Checked here:
 * - a lazily opened store answers attend, search and read bit for bit as
 *   an eagerly opened one (deterministic mode), whichever read them first;
 * - warm-up off reads nothing until a call; warm-up on reads every
 *   sequence without counting page-ins or evicting, and a close in the
 *   middle of it returns promptly;
 * - under a memory budget, calls that page sequences in and evict others
 *   while the warm-up runs read back byte-exact, within the budget;
 * - a SIGKILL while the warm-up runs (and appends go on) loses no
 *   acknowledged token.
 * Damage found by a lazy open's first read: test_persist_damage.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kv_store.h"
#include "kvs_kernels.h"
#include "kvstore.h"

enum { KVH = 2, QH = 4, D = 16, SEG = 256, N_LAYERS = 2, TOPK = 16 };
static const kvs_geometry_t GEO = {N_LAYERS, QH, KVH, D, KVS_DTYPE_F16};
static const size_t TOK_BYTES = 2 * KVH * D * 2; /* keys + values, f16 */

/* ThreadSanitizer cannot run a child forked from a process with threads
 * (RocksDB's pool outlives our stores): the fork test skips there. */
#if defined(__SANITIZE_THREAD__)
#define SKIP_FORK_TESTS() skip()
#else
#define SKIP_FORK_TESTS() ((void)0)
#endif

static char *temp_dir(void) {
    char *d = strdup("/tmp/kvs-lazy-XXXXXX");
    assert_non_null(mkdtemp(d));
    return d;
}

static void rm_rf(const char *d) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    assert_int_equal(system(cmd), 0);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static kvs_store_t *open_load(const char *dir, kvs_load_t load,
                              uint64_t memory_bytes) {
    return kv_store_open_load(dir, SEG, load, memory_bytes);
}

static void append_tokens(kvs_store_t *s, uint64_t seq, uint32_t layer,
                          uint64_t t0, uint32_t n) {
    kv_store_append(s, seq, layer, t0, n, KVH * D);
}

/* Whether (seq, layer) holds exactly n tokens, as generated. */
static void check_tokens(kvs_store_t *s, uint64_t seq, uint32_t layer,
                         uint64_t n) {
    kvs_geometry_t g;
    uint64_t have = 0;
    assert_int_equal(kvs_seq_shape(s, seq, layer, &g, &have), 0);
    if (have != n)
        fail_msg("sequence %llu layer %u: %llu tokens, want %llu",
                 (unsigned long long)seq, layer, (unsigned long long)have,
                 (unsigned long long)n);
    size_t bytes = n * KVH * D * 2;
    uint16_t *k = malloc(bytes), *v = malloc(bytes);
    uint16_t *ek = malloc(bytes), *ev = malloc(bytes);
    kv_rows_make(KVH * D, seq, layer, 0, (uint32_t)n, ek, ev);
    int rc = kvs_seq_read(s, seq, layer, 0, (uint32_t)n, k, v);
    if (rc)
        fail_msg("read %llu: %s", (unsigned long long)seq, kvs_store_errmsg(s));
    if (memcmp(k, ek, bytes) || memcmp(v, ev, bytes))
        fail_msg("sequence %llu layer %u reads back wrong",
                 (unsigned long long)seq, layer);
    free(k), free(v), free(ek), free(ev);
}

/* Sequences 1..n, layer l holding seq_tokens(id, l) tokens, every
 * finished segment built. */
static uint64_t seq_tokens(uint64_t id, uint32_t layer, uint64_t base) {
    return base + 37 * id + 11 * layer;
}

static void build_store(const char *dir, uint64_t n, uint64_t base) {
    kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
    for (uint64_t id = 1; id <= n; id++) {
        assert_int_equal(kvs_seq_create(s, id, &GEO), 0);
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            uint64_t want = seq_tokens(id, l, base);
            for (uint64_t t = 0; t < want; t += 200)
                append_tokens(s, id, l, t,
                              (uint32_t)(want - t < 200 ? want - t : 200));
        }
        assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
    }
    assert_int_equal(kvs_store_close(s), 0);
}

static int all_resident(kvs_store_t *s, uint64_t n) {
    for (uint64_t id = 1; id <= n; id++) {
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(s, id, &info), 0);
        if (!info.resident)
            return 0;
    }
    return 1;
}

/* Wait (at most 60 s) until the warm-up has read all n sequences. */
static void wait_warm(kvs_store_t *s, uint64_t n) {
    double t0 = now_s();
    while (!all_resident(s, n)) {
        if (now_s() - t0 > 60)
            fail_msg("warm-up did not finish in 60 s");
        usleep(2000);
    }
}

/* ---------------------------------------------------------------------- */

enum { EQ_SEQS = 5, EQ_BASE = 700 };

typedef struct answers_s {
    float attend[EQ_SEQS + 1][N_LAYERS][QH * D];
    int64_t pos[EQ_SEQS + 1][N_LAYERS][QH * TOPK];
    float score[EQ_SEQS + 1][N_LAYERS][QH * TOPK];
} answers_t;

static void ask(kvs_store_t *s, answers_t *a) {
    float q[QH * D];
    for (uint64_t id = 1; id <= EQ_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            for (int i = 0; i < QH * D; i++)
                q[i] = kv_rows_elem(id + 100, l, 0, (uint32_t)i, 0);
            /* attend first: on a cold sequence it is the call that reads */
            assert_int_equal(
                kvs_seq_attend(s, id, l, q, NULL, a->attend[id][l], NULL), 0);
            assert_int_equal(kvs_seq_search(s, id, l, q, TOPK, NULL,
                                            a->pos[id][l], a->score[id][l]),
                             0);
            check_tokens(s, id, l, seq_tokens(id, l, EQ_BASE));
        }
}

static void test_lazy_open_equals_eager(void **state) {
    (void)state;
    char *dir = temp_dir();
    build_store(dir, EQ_SEQS, EQ_BASE);
    answers_t *eager = calloc(1, sizeof *eager);
    answers_t *other = calloc(1, sizeof *other);
    kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
    assert_true(all_resident(s, EQ_SEQS));
    ask(s, eager);
    assert_int_equal(kvs_store_close(s), 0);
    static const kvs_load_t modes[2] = {KVS_LOAD_LAZY, KVS_LOAD_WARM};
    for (int m = 0; m < 2; m++) {
        s = open_load(dir, modes[m], 0);
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.sequences, EQ_SEQS);
        if (modes[m] == KVS_LOAD_LAZY) {
            /* Nothing read yet, but every count is known. */
            for (uint64_t id = 1; id <= EQ_SEQS; id++) {
                kvs_seq_info_t info;
                assert_int_equal(kvs_seq_info(s, id, &info), 0);
                assert_int_equal(info.resident, 0);
                assert_int_equal(info.tokens_min, seq_tokens(id, 0, EQ_BASE));
                assert_int_equal(info.tokens_max, seq_tokens(id, 1, EQ_BASE));
            }
        }
        memset(other, 0, sizeof *other);
        ask(s, other);
        assert_memory_equal(eager->attend, other->attend, sizeof eager->attend);
        assert_memory_equal(eager->pos, other->pos, sizeof eager->pos);
        assert_memory_equal(eager->score, other->score, sizeof eager->score);
        assert_true(all_resident(s, EQ_SEQS));
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.page_ins, 0); /* first reads are no page-ins */
        assert_int_equal(st.quarantined, 0);
        assert_int_equal(st.builds_done, 0); /* no segment rebuilt */
        for (uint64_t id = 1; id <= EQ_SEQS; id++) {
            kvs_seq_info_t info;
            assert_int_equal(kvs_seq_info(s, id, &info), 0);
            assert_true(info.segments > 0);
        }
        assert_int_equal(kvs_store_close(s), 0);
    }
    free(eager);
    free(other);
    rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

enum { WU_SEQS = 12, WU_BASE = 1500 };

static void test_lazy_open_warmup_off_on(void **state) {
    (void)state;
    char *dir = temp_dir();
    build_store(dir, WU_SEQS, WU_BASE);

    /* Off: nothing is read until a call needs it. */
    kvs_store_t *s = open_load(dir, KVS_LOAD_LAZY, 0);
    kvs_store_stats_t st0, st;
    assert_int_equal(kvs_store_stats(s, &st0), 0);
    usleep(300 * 1000);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.resident_bytes, st0.resident_bytes);
    for (uint64_t id = 1; id <= WU_SEQS; id++) {
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(s, id, &info), 0);
        assert_int_equal(info.resident, 0);
    }
    /* A call reads the layer it needs, not the sequence: resident once
     * every layer is. */
    check_tokens(s, 3, 1, seq_tokens(3, 1, WU_BASE));
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 3, &info), 0);
    assert_int_equal(info.resident, 0);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_true(st.resident_bytes > st0.resident_bytes);
    uint64_t one_layer = st.resident_bytes - st0.resident_bytes;
    check_tokens(s, 3, 0, seq_tokens(3, 0, WU_BASE));
    assert_int_equal(kvs_seq_info(s, 3, &info), 0);
    assert_int_equal(info.resident, 1);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_true(st.resident_bytes - st0.resident_bytes > one_layer);
    assert_int_equal(st.page_ins, 0); /* first reads, layer by layer */
    assert_int_equal(kvs_seq_info(s, 4, &info), 0);
    assert_int_equal(info.resident, 0);
    assert_int_equal(kvs_store_close(s), 0);

    /* On: every sequence read in the background, no page-in counted,
     * nothing evicted; the data is what was written. */
    double t0 = now_s();
    s = open_load(dir, KVS_LOAD_WARM, 0);
    wait_warm(s, WU_SEQS);
    double warm_s = now_s() - t0;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.page_ins, 0);
    assert_int_equal(st.evictions, 0);
    assert_true(st.resident_bytes > st0.resident_bytes);
    for (uint64_t id = 1; id <= WU_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++)
            check_tokens(s, id, l, seq_tokens(id, l, WU_BASE));
    assert_int_equal(kvs_store_close(s), 0);

    /* A close while the warm-up reads: prompt, and the next open whole. */
    s = open_load(dir, KVS_LOAD_WARM, 0);
    t0 = now_s();
    assert_int_equal(kvs_store_close(s), 0);
    double close_s = now_s() - t0;
    print_message("warm-up of %d sequences: %.3f s; close during it: "
                  "%.3f s\n",
                  WU_SEQS, warm_s, close_s);
    assert_true(close_s < 5);
    s = open_load(dir, KVS_LOAD_LAZY, 0);
    for (uint64_t id = 1; id <= WU_SEQS; id++)
        check_tokens(s, id, 0, seq_tokens(id, 0, WU_BASE));
    assert_int_equal(kvs_store_close(s), 0);
    rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

/* A budget of about three sequences out of twelve: the warm-up fills it,
 * calls on the others page them in and evict, while it runs. */
static void test_lazy_open_eviction_during_warmup(void **state) {
    (void)state;
    char *dir = temp_dir();
    build_store(dir, WU_SEQS, WU_BASE);
    const uint64_t per_seq =
        (uint64_t)N_LAYERS * (WU_BASE + 37 * WU_SEQS + 11) * TOK_BYTES;
    const uint64_t budget = 3 * per_seq + per_seq / 2;
    for (int round = 0; round < 3; round++) {
        kvs_store_t *s = open_load(dir, KVS_LOAD_WARM, budget);
        /* Newest first: the warm-up goes in id order, so they meet. */
        for (int pass = 0; pass < 2; pass++)
            for (uint64_t id = WU_SEQS; id >= 1; id--)
                for (uint32_t l = 0; l < N_LAYERS; l++)
                    check_tokens(s, id, l, seq_tokens(id, l, WU_BASE));
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_true(st.evictions > 0);
        assert_int_equal(st.quarantined, 0);
        assert_true(st.resident_bytes <= budget + per_seq + per_seq / 4);
        if (round == 0)
            print_message("budget %.2f MB over %.2f MB: %llu evictions, "
                          "%llu page-ins, resident %.2f MB\n",
                          budget / 1e6, WU_SEQS * per_seq / 1e6,
                          (unsigned long long)st.evictions,
                          (unsigned long long)st.page_ins,
                          st.resident_bytes / 1e6);
        assert_int_equal(kvs_store_close(s), 0);
    }
    /* Alone, the warm-up only fills free budget: it never evicts. */
    kvs_store_t *s = open_load(dir, KVS_LOAD_WARM, budget);
    double t0 = now_s();
    uint64_t resident = 0;
    for (;;) { /* until it stops reading (2 s quiet, at most 30 s) */
        usleep(100 * 1000);
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.evictions, 0);
        assert_true(st.resident_bytes <= budget);
        if (st.resident_bytes != resident)
            resident = st.resident_bytes, t0 = now_s();
        else if (now_s() - t0 > 2)
            break;
        assert_true(now_s() - t0 < 30);
    }
    assert_true(resident > 2 * per_seq);
    assert_int_equal(kvs_store_close(s), 0);
    rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

enum { K9_SEQS = 8, K9_BASE = 3000, K9_ROUNDS = 5, K9_CHUNK = 13 };

/* The child: open with the warm-up, append to every sequence in turn
 * (sync batch: acknowledged means durable), and report each acknowledged
 * append as (id, layer, tokens now) on the pipe. Killed by the parent. */
static void k9_child(const char *dir, int fd, uint64_t (*have)[N_LAYERS]) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.n_threads = 2;
    o.load = KVS_LOAD_WARM;
    kvs_store_t *s = NULL;
    if (kvs_store_open(&o, &s))
        _exit(2);
    uint64_t opened[3] = {0, 0, 0};
    if (write(fd, opened, sizeof opened) != sizeof opened)
        _exit(4);
    uint16_t *k = malloc((size_t)K9_CHUNK * KVH * D * 2);
    uint16_t *v = malloc((size_t)K9_CHUNK * KVH * D * 2);
    for (uint64_t i = 0;; i++) {
        uint64_t id = 1 + i % K9_SEQS;
        uint32_t l = (uint32_t)(i / K9_SEQS % N_LAYERS);
        kv_rows_make(KVH * D, id, l, have[id][l], K9_CHUNK, k, v);
        if (kvs_seq_append(s, id, l, K9_CHUNK, k, v))
            _exit(3);
        have[id][l] += K9_CHUNK;
        uint64_t rec[3] = {id, l, have[id][l]};
        if (write(fd, rec, sizeof rec) != sizeof rec)
            _exit(4);
    }
}

static void test_lazy_open_kill9_during_warmup(void **state) {
    (void)state;
    SKIP_FORK_TESTS();
    char *dir = temp_dir();
    build_store(dir, K9_SEQS, K9_BASE);
    uint64_t have[K9_SEQS + 1][N_LAYERS];
    for (uint64_t id = 1; id <= K9_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++)
            have[id][l] = seq_tokens(id, l, K9_BASE);
    unsigned seed = (unsigned)time(NULL);
    uint64_t acked = 0;
    for (int round = 0; round < K9_ROUNDS; round++) {
        int p[2];
        assert_int_equal(pipe(p), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(p[0]);
            k9_child(dir, p[1], have);
        }
        close(p[1]);
        /* Kill while the warm-up is reading: 0-150 ms after the open
         * returned (the warm-up of this store takes longer). */
        uint64_t rec[3];
        assert_int_equal(read(p[0], rec, sizeof rec), sizeof rec);
        assert_int_equal(rec[0], 0);
        usleep((useconds_t)(rand_r(&seed) % 150000));
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        assert_true(WIFSIGNALED(status));
        while (read(p[0], rec, sizeof rec) == sizeof rec) {
            assert_true(rec[0] >= 1 && rec[0] <= K9_SEQS && rec[1] < N_LAYERS);
            have[rec[0]][rec[1]] = rec[2];
            acked++;
        }
        close(p[0]);
        /* Every acknowledged token is there; an unacknowledged append in
         * flight may be too (it is kept: the next round continues it). */
        kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 0);
        for (uint64_t id = 1; id <= K9_SEQS; id++)
            for (uint32_t l = 0; l < N_LAYERS; l++) {
                kvs_geometry_t g;
                uint64_t n = 0;
                assert_int_equal(kvs_seq_shape(s, id, l, &g, &n), 0);
                if (n < have[id][l])
                    fail_msg("round %d: sequence %llu layer %u lost "
                             "acknowledged tokens: %llu < %llu",
                             round, (unsigned long long)id, l,
                             (unsigned long long)n,
                             (unsigned long long)have[id][l]);
                have[id][l] = n;
                check_tokens(s, id, l, n);
            }
        assert_int_equal(kvs_store_close(s), 0);
    }
    assert_true(acked > 0);
    print_message("kill -9 during warm-up: %d rounds, %llu acknowledged "
                  "appends, none lost\n",
                  K9_ROUNDS, (unsigned long long)acked);
    rm_rf(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lazy_open_equals_eager),
        cmocka_unit_test(test_lazy_open_warmup_off_on),
        cmocka_unit_test(test_lazy_open_eviction_during_warmup),
        cmocka_unit_test(test_lazy_open_kill9_during_warmup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
