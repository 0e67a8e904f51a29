/*
 * test_async_server.c: write-behind through kvstored (`--sync async`,
 * issue 14). Appends over loopback with a Flush RPC every few; the daemon
 * is SIGKILLed while appends are still queued; after a restart on the same
 * data directory every token appended before the last completed Flush is
 * there (and no more than was appended). kvctl flush answers 0 for a
 * sequence and 1 for an unknown one; stats report the persisted write.
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
#include <unistd.h>

#include "daemon.h"
#include "kvs_client.h"

enum { KVH = 2, D = 64, CH = 256, ROUNDS = 3 };
static const kvs_geometry_t GEO = {1, 4, KVH, D, KVS_DTYPE_F32};

static const char *const ASYNC[] = {"--sync", "async",
                                    "--max-unpersisted-bytes", "8M", NULL};

static void fill(float *k, float *v, uint64_t t0, uint32_t n) {
    for (size_t i = 0; i < (size_t)n * KVH * D; i++) {
        uint64_t x = (t0 * KVH * D + i) * 0x9e3779b97f4a7c15ull;
        k[i] = (float)((x >> 40) & 0xffff) / 65536.0f - 0.5f;
        v[i] = (float)((x >> 20) & 0xffff) / 65536.0f - 0.5f;
    }
}

static int kvctl(const test_daemon_t *d, const char *args) {
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "%s/client/kvctl --addr 127.0.0.1:%d %s > /dev/null 2>&1",
             KVS_BINARY_DIR, d->port, args);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_async_server_flush_and_kill9(void **state) {
    (void)state;
    test_daemon_t d;
    memset(&d, 0, sizeof d);
    assert_int_equal(td_start(&d, ASYNC), 0);
    kvs_client_t *c = td_client(&d, 0, NULL);
    assert_non_null(c);
    assert_int_equal(kvs_client_seq_create(c, 1, &GEO), 0);
    size_t kvb = (size_t)CH * KVH * D * sizeof(float);
    float *k = malloc(kvb), *v = malloc(kvb);
    uint64_t appended = 0, flushed = 0, persisted = 0;
    for (int r = 0; r < ROUNDS; r++) {
        /* Five appends, a flush, then five more left queued. */
        for (int i = 0; i < 10; i++) {
            fill(k, v, appended, CH);
            assert_int_equal(kvs_client_seq_append(c, 1, 0, CH, k, v, kvb), 0);
            appended += CH;
            if (i == 4) {
                uint64_t p = 0;
                assert_int_equal(kvs_client_seq_flush(c, 1, &p), 0);
                assert_true(p > persisted);
                persisted = p;
                flushed = appended;
            }
        }
        if (r == 0) {
            assert_int_equal(kvs_client_seq_flush(c, 99, NULL), KVS_ENOSEQ);
            assert_int_equal(kvctl(&d, "flush 1"), 0);
            assert_int_equal(kvctl(&d, "flush 99"), 1);
            kvs_client_stats_t st;
            assert_int_equal(kvs_client_store_stats(c, 0, &st), 0);
            assert_true(st.store.persisted_seqno >= persisted);
            assert_true(st.store.queued_seqno >= st.store.persisted_seqno);
        }
        kvs_client_close(c);
        /* Kill with the last five appends possibly still queued. */
        assert_int_equal(kill(d.pid, SIGKILL), 0);
        int status;
        assert_int_equal(waitpid(d.pid, &status, 0), d.pid);
        assert_true(WIFSIGNALED(status));
        d.pid = 0;
        assert_int_equal(td_start(&d, ASYNC), 0);
        c = td_client(&d, 0, NULL);
        assert_non_null(c);
        kvs_seq_info_t info;
        assert_int_equal(kvs_client_seq_info(c, 1, &info), 0);
        print_message("round %d: %llu appended, %llu flushed, %llu after "
                      "SIGKILL\n",
                      r, (unsigned long long)appended,
                      (unsigned long long)flushed,
                      (unsigned long long)info.tokens_max);
        assert_true(info.tokens_max >= flushed);
        assert_true(info.tokens_max <= appended);
        assert_int_equal(info.tokens_max % CH, 0);
        /* Go on from what survived: tokens are a function of position. */
        appended = info.tokens_max;
        persisted = 0; /* write numbers restart with the daemon */
    }
    kvs_client_close(c);
    assert_int_equal(td_stop(&d), 0);
    td_cleanup(&d);
    free(k);
    free(v);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_async_server_flush_and_kill9),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
