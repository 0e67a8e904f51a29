/*
 * test_cluster.c: kvstored nodes registered in a real etcd (on loopback,
 * one etcd for the whole file, a key prefix per test), and libkvsclient
 * finding them through an etcd:// address. Skips, saying why, when the etcd
 * binary is not installed (scripts/install-deps.sh installs etcd-server).
 *
 * Leases are 2 s (etcd's least) so that a killed node's expiry fits in a
 * short test.
 */
#include "cluster.h"
#include "kvs_common.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define TTL 2

static tc_etcd_t etcd;
static bool have_etcd;

static int group_setup(void **state) {
    (void)state;
    if (!tc_etcd_binary()) {
        fprintf(stderr, "etcd not installed (apt-get install etcd-server, or "
                        "scripts/install-deps.sh): cluster tests skipped\n");
        return 0;
    }
    int rc = tc_etcd_start(&etcd);
    if (rc) {
        fprintf(stderr, "etcd did not start (%d); log in %s/log\n", rc,
                etcd.dir);
        return -1;
    }
    have_etcd = true;
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (have_etcd)
        tc_etcd_stop(&etcd);
    return 0;
}

#define NEED_ETCD()                                                            \
    do {                                                                       \
        if (!have_etcd) {                                                      \
            fprintf(stderr, "skipped: etcd not installed\n");                  \
            skip();                                                            \
        }                                                                      \
    } while (0)

/* Nodes appear under their lease; SIGTERM removes one at once (the drain
 * revokes its lease); SIGKILL removes one when the lease runs out. */
static void test_cluster_membership(void **state) {
    (void)state;
    NEED_ETCD();
    const char *pfx = "/t-membership";
    tc_node_t n[3];
    const char *ids[3] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(tc_node_start(&n[i], &etcd, pfx, ids[i], TTL, NULL),
                         0);
    long ms = tc_wait_members(&etcd, pfx, "a,b,c", 5000);
    if (ms < 0)
        tc_node_dump_log(&n[0]);
    assert_true(ms >= 0);

    /* The record says where to connect and what the node runs. */
    kvs_etcd_t *c = NULL;
    assert_int_equal(kvs_etcd_new(etcd.endpoint, 1000, &c, NULL, 0), 0);
    char key[256];
    assert_int_equal(kvs_node_key(pfx, "a", key, sizeof(key)), 0);
    kvs_etcd_kv_t *kvs = NULL;
    size_t nk = 0;
    assert_int_equal(kvs_etcd_range_prefix(c, key, &kvs, &nk, NULL), 0);
    assert_int_equal(nk, 1);
    assert_string_equal(kvs[0].key, key);
    assert_true(kvs[0].lease != 0);
    kvs_node_record_t r;
    assert_int_equal(kvs_node_record_decode(kvs[0].value, kvs[0].value_len, &r),
                     0);
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%d", n[0].port);
    assert_string_equal(r.addr, want);
    assert_string_equal(r.node_id, "a");
    assert_int_equal(r.port, n[0].port);
    assert_int_equal(r.protocol, 1);
    assert_true(r.start_time > 1600000000);
    kvs_etcd_kvs_free(kvs, nk);
    kvs_etcd_free(c);

    /* Drain: gone well before any lease could expire. */
    assert_int_equal(tc_node_stop(&n[1]), 0);
    ms = tc_wait_members(&etcd, pfx, "a,c", 1500);
    assert_true(ms >= 0);
    fprintf(stderr, "SIGTERM: deregistered after %ld ms\n", ms);

    /* Crash: gone within the TTL (etcd checks expiry every 500 ms). "a"
     * has been up for longer than its TTL by then: keepalives work. */
    tc_node_kill(&n[2]);
    ms = tc_wait_members(&etcd, pfx, "a", TTL * 1000 + 2000);
    assert_true(ms >= 0);
    fprintf(stderr, "SIGKILL: lease expired after %ld ms (TTL %d s)\n", ms,
            TTL);
    tc_sleep_ms(TTL * 1000);
    assert_true(tc_wait_members(&etcd, pfx, "a", 0) >= 0);

    assert_int_equal(tc_node_stop(&n[0]), 0);
    assert_true(tc_wait_members(&etcd, pfx, "", 1500) >= 0);
    for (int i = 0; i < 3; i++)
        tc_node_cleanup(&n[i]);
}

/* The record codec round-trips, escapes what JSON must escape, and the
 * decoder refuses what is not a record. */
static void test_cluster_record_codec(void **state) {
    (void)state;
    kvs_node_record_t a, b;
    memset(&a, 0, sizeof(a));
    snprintf(a.node_id, sizeof(a.node_id), "n\"1\\x");
    snprintf(a.addr, sizeof(a.addr), "[::1]:7700");
    a.port = 7700;
    a.http_port = 7701;
    a.memory_limit = 8ull << 30;
    a.memory_used = 123456789012ull;
    a.sequences = 42;
    a.start_time = 1796613932;
    a.protocol = 1;
    snprintf(a.version, sizeof(a.version), "0.1.0");
    char buf[1024];
    size_t len;
    assert_int_equal(kvs_node_record_encode(&a, buf, sizeof(buf), &len), 0);
    assert_int_equal(strlen(buf), len);
    assert_int_equal(kvs_node_record_decode(buf, len, &b), 0);
    assert_string_equal(b.node_id, a.node_id);
    assert_string_equal(b.addr, a.addr);
    assert_string_equal(b.version, a.version);
    assert_int_equal(b.port, a.port);
    assert_int_equal(b.http_port, a.http_port);
    assert_true(b.memory_limit == a.memory_limit);
    assert_true(b.memory_used == a.memory_used);
    assert_true(b.sequences == a.sequences);
    assert_true(b.start_time == a.start_time);
    assert_int_equal(b.protocol, a.protocol);
    assert_int_equal(kvs_node_record_encode(&a, buf, 40, &len), KVS_ETOOBIG);
    static const char *bad[] = {
        "", "[]", "{", "{\"port\":1}", "{\"addr\":\"\"}", "{\"addr\":\"x\""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(kvs_node_record_decode(bad[i], strlen(bad[i]), &b),
                         KVS_EPROTO);
    const char *more = "{\"future\":[1,{\"x\":null}],\"addr\":\"h:1\"}";
    assert_int_equal(kvs_node_record_decode(more, strlen(more), &b), 0);
    assert_string_equal(b.addr, "h:1");
    char key[64];
    assert_int_equal(kvs_node_key("/kv/", "n1", key, sizeof(key)), 0);
    assert_string_equal(key, "/kv/nodes/n1");
    assert_int_equal(kvs_node_key("/kv", "n1", key, 8), KVS_ETOOBIG);
    kvs_etcd_t *e = NULL;
    assert_int_equal(kvs_etcd_new("https://x:1", 0, &e, NULL, 0), KVS_EINVAL);
    assert_int_equal(kvs_etcd_new("x", 0, &e, NULL, 0), KVS_EINVAL);
    assert_int_equal(kvs_etcd_new("", 0, &e, NULL, 0), KVS_EINVAL);
    assert_int_equal(kvs_etcd_new("http://[::1]:2379,h:1", 0, &e, NULL, 0), 0);
    kvs_etcd_free(e);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cluster_record_codec),
        cmocka_unit_test(test_cluster_membership),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
