/*
 * test_stress.c: many threads on one persistent store under a memory budget
 * small enough that sequences are evicted and paged back in all the time,
 * while appends, segment builds, attends, searches, reads, forks and drops
 * run concurrently. Afterwards every sequence must read back byte-exact,
 * also after a reopen. Run under ThreadSanitizer by `make tsan`.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvs_kernels.h"
#include "kvstore.h"

enum { KVH = 2, QH = 4, D = 16, SEG = 256, SEQS = 6, APPENDERS = 2 };
static const kvs_geometry_t GEO = {2, QH, KVH, D, KVS_DTYPE_F16};

#ifdef KVS_SANITIZER_RUN
#define ROUNDS 40
#else
#define ROUNDS 120
#endif

static uint16_t elem(uint64_t seq, uint32_t layer, uint64_t t, uint32_t i,
                     int val) {
    uint64_t x = (seq * 7919u + layer * 104729u + t * 31u + i * 7u +
                  (uint64_t)val * 15485863u) *
                 0x9e3779b97f4a7c15ull;
    x ^= x >> 31;
    float f = (float)((double)(x >> 11) / 9007199254740992.0 * 4 - 2);
    return kvs_f32_to_f16(f + (val ? 0 : (i % 5 == 0 ? 1.0f : 0)));
}

static void rows(uint64_t seq, uint32_t layer, uint64_t t0, uint32_t n,
                 uint16_t *k, uint16_t *v) {
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t i = 0; i < KVH * D; i++) {
            k[(size_t)t * KVH * D + i] = elem(seq, layer, t0 + t, i, 0);
            v[(size_t)t * KVH * D + i] = elem(seq, layer, t0 + t, i, 1);
        }
}

typedef struct shared_s {
    kvs_store_t *s;
    pthread_mutex_t mu;
    uint64_t tokens[SEQS + 1]; /* acknowledged, same for both layers */
    int failures;
    int stop;
} shared_t;

static void failure(shared_t *sh, const char *what, int rc) {
    pthread_mutex_lock(&sh->mu);
    if (sh->failures++ < 5)
        fprintf(stderr, "stress: %s: %s (%s)\n", what, kvs_strerror(rc),
                kvs_store_errmsg(sh->s));
    pthread_mutex_unlock(&sh->mu);
}

/* Appender a: sequences a+1, a+1+APPENDERS, ...: both layers, so that a
 * sequence's layers always hold the same tokens once a round is done. */
static void *appender(void *arg) {
    shared_t *sh = ((void **)arg)[0];
    uintptr_t a = (uintptr_t)((void **)arg)[1];
    uint16_t k[64 * KVH * D], v[64 * KVH * D];
    for (int r = 0; r < ROUNDS; r++)
        for (uint64_t id = a + 1; id <= SEQS; id += APPENDERS) {
            uint32_t n = 1 + (uint32_t)((r * 37 + id * 11) % 64);
            uint64_t t0;
            pthread_mutex_lock(&sh->mu);
            t0 = sh->tokens[id];
            pthread_mutex_unlock(&sh->mu);
            for (uint32_t l = 0; l < 2; l++) {
                rows(id, l, t0, n, k, v);
                int rc = kvs_seq_append(sh->s, id, l, n, k, v);
                if (rc)
                    failure(sh, "append", rc);
            }
            pthread_mutex_lock(&sh->mu);
            sh->tokens[id] = t0 + n;
            pthread_mutex_unlock(&sh->mu);
        }
    return NULL;
}

/* Readers: attend and search everything; read back acknowledged prefixes. */
static void *reader(void *arg) {
    shared_t *sh = arg;
    float q[QH * D], out[QH * D];
    int64_t pos[QH * 4];
    float sc[QH * 4];
    uint16_t k[32 * KVH * D], ek[32 * KVH * D], ev[32 * KVH * D];
    for (int i = 0; i < QH * D; i++)
        q[i] = 0.05f * (float)(i % 7) - 0.1f;
    uint64_t turn = 0;
    while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
        uint64_t id = 1 + turn++ % SEQS;
        uint32_t l = (uint32_t)(turn % 2);
        int rc = kvs_seq_attend(sh->s, id, l, q, NULL, out, NULL);
        if (rc && rc != KVS_ERANGE)
            failure(sh, "attend", rc);
        for (int i = 0; !rc && i < QH * D; i++)
            if (!isfinite(out[i])) {
                failure(sh, "attend output not finite", 0);
                break;
            }
        rc = kvs_seq_search(sh->s, id, l, q, 4, NULL, pos, sc);
        if (rc && rc != KVS_ERANGE)
            failure(sh, "search", rc);
        uint64_t have;
        pthread_mutex_lock(&sh->mu);
        have = sh->tokens[id];
        pthread_mutex_unlock(&sh->mu);
        if (have >= 32) {
            uint64_t t0 = (turn * 13) % (have - 31);
            rc = kvs_seq_read(sh->s, id, l, t0, 32, k, NULL);
            if (rc) {
                failure(sh, "read", rc);
            } else {
                rows(id, l, t0, 32, ek, ev);
                if (memcmp(k, ek, sizeof k))
                    failure(sh, "read returned wrong keys", 0);
            }
        }
    }
    return NULL;
}

/* Forks and drops of scratch sequences (ids above SEQS) on live parents. */
static void *forker(void *arg) {
    shared_t *sh = arg;
    uint64_t next = 1000;
    while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
        uint64_t parent = 1 + next % SEQS, at;
        pthread_mutex_lock(&sh->mu);
        at = sh->tokens[parent] / 2;
        pthread_mutex_unlock(&sh->mu);
        int rc = kvs_seq_fork(sh->s, parent, at, next);
        if (rc == 0) {
            uint16_t k[KVH * D];
            if (at && (rc = kvs_seq_read(sh->s, next, 0, at - 1, 1, k, NULL)))
                failure(sh, "read fork", rc);
            if ((rc = kvs_seq_drop(sh->s, next)))
                failure(sh, "drop fork", rc);
        } else if (rc != KVS_ERANGE) {
            failure(sh, "fork", rc);
        }
        next++;
    }
    return NULL;
}

static kvs_store_t *open_store(const char *dir) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.sync = KVS_SYNC_NONE;
    o.n_threads = 2;
    o.n_build_threads = 2;
    o.memory_bytes = 96 << 10; /* about two sequences' worth */
    kvs_store_t *s = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc)
        fail_msg("open: %s", kvs_store_open_error());
    return s;
}

static void check_all(kvs_store_t *s, const uint64_t *tokens) {
    for (uint64_t id = 1; id <= SEQS; id++)
        for (uint32_t l = 0; l < 2; l++) {
            uint64_t n = tokens[id];
            uint16_t *k = malloc(n * KVH * D * 2), *v = malloc(n * KVH * D * 2);
            uint16_t *ek = malloc(n * KVH * D * 2);
            uint16_t *ev = malloc(n * KVH * D * 2);
            rows(id, l, 0, (uint32_t)n, ek, ev);
            int rc = kvs_seq_read(s, id, l, 0, (uint32_t)n, k, v);
            if (rc)
                fail_msg("read %llu/%u: %s", (unsigned long long)id, l,
                         kvs_store_errmsg(s));
            assert_memory_equal(k, ek, n * KVH * D * 2);
            assert_memory_equal(v, ev, n * KVH * D * 2);
            free(k), free(v), free(ek), free(ev);
        }
}

static void test_stress_eviction_under_load(void **state) {
    (void)state;
    char dir[] = "/tmp/kvs-stress-XXXXXX";
    assert_non_null(mkdtemp(dir));
    shared_t sh = {.s = open_store(dir)};
    pthread_mutex_init(&sh.mu, NULL);
    for (uint64_t id = 1; id <= SEQS; id++)
        assert_int_equal(kvs_seq_create(sh.s, id, &GEO), 0);
    pthread_t ap[APPENDERS], rd[2], fk;
    void *args[APPENDERS][2];
    for (uintptr_t a = 0; a < APPENDERS; a++) {
        args[a][0] = &sh;
        args[a][1] = (void *)a;
        pthread_create(&ap[a], NULL, appender, args[a]);
    }
    for (int i = 0; i < 2; i++)
        pthread_create(&rd[i], NULL, reader, &sh);
    pthread_create(&fk, NULL, forker, &sh);
    for (int a = 0; a < APPENDERS; a++)
        pthread_join(ap[a], NULL);
    __atomic_store_n(&sh.stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++)
        pthread_join(rd[i], NULL);
    pthread_join(fk, NULL);
    assert_int_equal(sh.failures, 0);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(sh.s, &st), 0);
    print_message("stress: %llu evictions, %llu page-ins, %llu builds\n",
                  (unsigned long long)st.evictions,
                  (unsigned long long)st.page_ins,
                  (unsigned long long)st.builds_done);
    assert_true(st.evictions > 0);
    assert_true(st.page_ins > 0);
    for (uint64_t id = 1; id <= SEQS; id++)
        assert_int_equal(kvs_seq_wait_indexed(sh.s, id), 0);
    check_all(sh.s, sh.tokens);
    kvs_store_close(sh.s);
    /* And from storage. */
    kvs_store_t *s = open_store(dir);
    check_all(s, sh.tokens);
    size_t n;
    assert_int_equal(kvs_store_list(s, NULL, 0, &n), 0);
    assert_int_equal(n, SEQS); /* every fork was dropped */
    kvs_store_close(s);
    pthread_mutex_destroy(&sh.mu);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stress_eviction_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
