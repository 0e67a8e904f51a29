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
#include "kvs_client.h"
#include "kvs_common.h"
#include "kvs_server.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#define TTL 2

/* Nodes appear under their lease; SIGTERM removes one at once (the drain
 * revokes its lease); SIGKILL removes one when the lease runs out. */
static void test_cluster_membership(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *pfx = "/t-membership";
    tc_node_t n[3];
    const char *ids[3] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(tc_node_start(&n[i], &tc_etcd, pfx, ids[i], TTL, NULL),
                         0);
    long ms = tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000);
    if (ms < 0)
        tc_node_dump_log(&n[0]);
    assert_true(ms >= 0);

    /* The record says where to connect and what the node runs. */
    kvs_etcd_t *c = NULL;
    assert_int_equal(kvs_etcd_new(tc_etcd.endpoint, 1000, &c, NULL, 0), 0);
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
    /* An operator (or an etcd that lost its data) revokes the lease: the
     * next keepalive sees it gone and the node registers again. */
    int64_t old_lease = kvs[0].lease;
    assert_int_equal(kvs_etcd_lease_revoke(c, old_lease), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "b,c", 2000) >= 0);
    ms = tc_wait_members(&tc_etcd, pfx, "a,b,c", TTL * 1000 + 2000);
    assert_true(ms >= 0);
    fprintf(stderr, "lease revoked: registered again after %ld ms\n", ms);
    /* the gauges follow the put that made the key visible */
    assert_true(tc_metric_wait(n[0].http_port, "kvstored_etcd_registered", 1,
                               2000) == 1);
    assert_true(tc_metric_wait(n[0].http_port,
                               "kvstored_etcd_registrations_total", 2,
                               2000) == 2);
    assert_true(
        tc_metric(n[1].http_port, "kvstored_etcd_registrations_total") == 1);
    kvs_etcd_kvs_free(kvs, nk);
    assert_int_equal(kvs_etcd_range_prefix(c, key, &kvs, &nk, NULL), 0);
    assert_int_equal(nk, 1);
    assert_true(kvs[0].lease != 0 && kvs[0].lease != old_lease);
    kvs_etcd_kvs_free(kvs, nk);
    kvs_etcd_free(c);

    /* Drain: gone well before any lease could expire. */
    assert_int_equal(tc_node_stop(&n[1]), 0);
    ms = tc_wait_members(&tc_etcd, pfx, "a,c", 1500);
    assert_true(ms >= 0);
    fprintf(stderr, "SIGTERM: deregistered after %ld ms\n", ms);

    /* Crash: gone within the TTL (etcd checks expiry every 500 ms). "a"
     * has been up for longer than its TTL by then: keepalives work. */
    tc_node_kill(&n[2]);
    ms = tc_wait_members(&tc_etcd, pfx, "a", TTL * 1000 + 2000);
    assert_true(ms >= 0);
    fprintf(stderr, "SIGKILL: lease expired after %ld ms (TTL %d s)\n", ms,
            TTL);
    tc_sleep_ms(TTL * 1000);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a", 0) >= 0);

    assert_int_equal(tc_node_stop(&n[0]), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "", 1500) >= 0);
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

static const kvs_geometry_t geo = {.n_layers = 1,
                                   .n_q_heads = 2,
                                   .n_kv_heads = 1,
                                   .head_dim = 8,
                                   .dtype = KVS_DTYPE_F32};

/* Create seq, append 4 tokens, attend: the round trip a decoder makes. */
static int seq_roundtrip(kvs_client_t *c, uint64_t seq, bool create) {
    float kv[4 * 8], q[2 * 8], out[2 * 8];
    for (int i = 0; i < 32; i++)
        kv[i] = (float)((seq * 31 + (uint64_t)i) % 17) / 17.0f - 0.5f;
    for (int i = 0; i < 16; i++)
        q[i] = (float)(i % 5) / 5.0f;
    int rc;
    if (create && (rc = kvs_client_seq_create(c, seq, &geo)))
        return rc;
    if (create &&
        (rc = kvs_client_seq_append(c, seq, 0, 4, kv, kv, sizeof(kv))))
        return rc;
    if ((rc = kvs_client_seq_attend(c, seq, 0, q, 16, NULL, out, NULL)))
        return rc;
    for (int i = 0; i < 16; i++)
        if (!isfinite(out[i]) || fabsf(out[i]) > 1.0f)
            return KVS_ERANGE; /* attention of values in [-0.5, 0.5] */
    return 0;
}

static const char *owner(kvs_client_t *c, uint64_t seq) {
    size_t n = kvs_client_node_for(c, seq);
    return n == SIZE_MAX ? "" : kvs_client_node_addr(c, n);
}

/* A client with an etcd:// address places sequences over the registered
 * nodes; a node that joins gets new sequences; one that leaves is no
 * longer used, and sequences on the others keep working. */
static void test_cluster_client_membership(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *pfx = "/t-client";
    tc_node_t n[3];
    memset(n, 0, sizeof(n));
    assert_int_equal(tc_node_start(&n[0], &tc_etcd, pfx, "a", TTL, NULL), 0);
    assert_int_equal(tc_node_start(&n[1], &tc_etcd, pfx, "b", TTL, NULL), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b", 5000) >= 0);
    char addr[3][64], url[128];
    for (int i = 0; i < 2; i++)
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", n[i].port);
    snprintf(url, sizeof(url), "etcd://127.0.0.1:%d%s", tc_etcd.port, pfx);
    const char *addrs[1] = {url};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 1;
    o.request_timeout_ms = 20000;
    o.membership_refresh_ms = 100;
    kvs_client_t *c = NULL;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    /* The list read at open has both (before any refresh). */
    size_t live = 0;
    for (size_t i = 0; i < kvs_client_n_nodes(c); i++)
        live += kvs_client_node_live(c, i);
    assert_int_equal(live, 2);

    kvs_client_member_t m[8];
    size_t nm = 0;
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 2);
    for (size_t i = 0; i < nm; i++) {
        int k = !strcmp(m[i].node_id, "a") ? 0 : 1;
        assert_string_equal(m[i].node_id, k ? "b" : "a");
        assert_string_equal(m[i].addr, addr[k]);
        assert_string_equal(kvs_client_node_addr(c, m[i].node), addr[k]);
        assert_int_equal(m[i].protocol, 1);
    }

    /* kvctl nodes lists the same members, sorted by node id. */
    char cmd[512], line[4096] = "";
    snprintf(cmd, sizeof(cmd), "%s/client/kvctl --addr %s --json nodes",
             KVS_BINARY_DIR, url);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(line, sizeof(line), p));
    assert_int_equal(pclose(p), 0);
    const char *ja = strstr(line, "\"node_id\":\"a\"");
    const char *jb = strstr(line, "\"node_id\":\"b\"");
    assert_true(ja && jb && ja < jb);
    assert_non_null(strstr(line, addr[0]));
    assert_non_null(strstr(line, addr[1]));

    /* 16 sequences over a and b: both get some (all on one: 2^-15). */
    int on[2] = {0, 0};
    for (uint64_t s = 1; s <= 16; s++) {
        assert_int_equal(seq_roundtrip(c, s, true), 0);
        on[!strcmp(owner(c, s), addr[1])]++;
    }
    assert_true(on[0] > 0 && on[1] > 0);

    /* c joins: within a refresh, new sequences land on it too. */
    assert_int_equal(tc_node_start(&n[2], &tc_etcd, pfx, "c", TTL, NULL), 0);
    snprintf(addr[2], sizeof(addr[2]), "127.0.0.1:%d", n[2].port);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000) >= 0);
    tc_sleep_ms(250);
    int on_c = 0;
    for (uint64_t s = 101; s <= 124; s++) {
        assert_int_equal(seq_roundtrip(c, s, true), 0);
        on_c += !strcmp(owner(c, s), addr[2]);
    }
    assert_true(on_c > 0);
    size_t node_c = SIZE_MAX;
    for (uint64_t s = 101; s <= 124 && node_c == SIZE_MAX; s++)
        if (!strcmp(owner(c, s), addr[2]))
            node_c = kvs_client_node_for(c, s);
    uint64_t ids[64], total = 0;
    size_t nids = 0;
    assert_int_equal(kvs_client_store_list(c, node_c, ids, 64, &nids, &total),
                     0);
    assert_int_equal((int)total, on_c); /* exactly the ones placed there */
    /* Sequences that still hash to a or b are where they were. */
    int kept = 0;
    for (uint64_t s = 1; s <= 16; s++) {
        if (!strcmp(owner(c, s), addr[2]))
            continue; /* moved to c: its data did not (no repair yet) */
        assert_int_equal(seq_roundtrip(c, s, false), 0);
        kept++;
    }
    assert_true(kept > 0);

    /* a drains away: nothing is placed on it any more, and every sequence
     * on b and c keeps working. */
    assert_int_equal(tc_node_stop(&n[0]), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "b,c", 3000) >= 0);
    tc_sleep_ms(250);
    /* kvs_client_node_for does not read etcd; a submit (or this) does. */
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 2);
    for (uint64_t s = 1; s <= 124; s = s == 16 ? 101 : s + 1) {
        const char *ow = owner(c, s);
        assert_string_not_equal(ow, addr[0]);
        if (!strcmp(ow, addr[1]) || !strcmp(ow, addr[2])) {
            int rc = seq_roundtrip(c, s, false);
            /* ENOSEQ: it was on a and now hashes here (no repair yet). */
            assert_true(rc == 0 || rc == KVS_ENOSEQ);
        }
    }
    for (uint64_t s = 201; s <= 208; s++)
        assert_int_equal(seq_roundtrip(c, s, true), 0);
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 2);

    kvs_client_close(c);
    /* Clean exits (under ASan: no leaks, no errors) of those still up. */
    for (int i = 0; i < 3; i++) {
        if (n[i].pid > 0)
            assert_int_equal(tc_node_stop(&n[i]), 0);
        tc_node_cleanup(&n[i]);
    }
}

/* An etcd:// client with etcd down fails to open, saying so; one with an
 * empty prefix opens and reports no live node. */
static void test_cluster_client_errors(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *bad[1] = {"etcd://127.0.0.1:1/x"};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = bad;
    o.n_addrs = 1;
    o.connect_timeout_ms = 500;
    kvs_client_t *c = NULL;
    assert_int_equal(kvs_client_open(&o, &c), KVS_ECONN);
    assert_null(c);
    const char *two[2] = {"etcd://127.0.0.1:1/x", "127.0.0.1:7700"};
    o.addrs = two;
    o.n_addrs = 2;
    assert_int_equal(kvs_client_open(&o, &c), KVS_EINVAL);
    char url[128];
    snprintf(url, sizeof(url), "etcd://127.0.0.1:%d/t-empty", tc_etcd.port);
    const char *empty[1] = {url};
    o.addrs = empty;
    o.n_addrs = 1;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    assert_true(kvs_client_node_for(c, 1) == SIZE_MAX);
    assert_int_equal(kvs_client_seq_create(c, 1, &geo), KVS_ECONN);
    assert_non_null(strstr(kvs_client_errmsg(c), "no live node"));
    kvs_client_close(c);
}

/* R = 2: every write reaches two nodes; with one of them killed, reads are
 * still answered (by the other, within the same call) and appends are
 * acknowledged by the one left, which the client reports. */
static void test_cluster_replicas(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *pfx = "/t-replicas";
    tc_node_t n[3];
    const char *ids[3] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(tc_node_start(&n[i], &tc_etcd, pfx, ids[i], TTL, NULL),
                         0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000) >= 0);
    char url[128], addr_a[64];
    snprintf(url, sizeof(url), "etcd://127.0.0.1:%d%s", tc_etcd.port, pfx);
    snprintf(addr_a, sizeof(addr_a), "127.0.0.1:%d", n[0].port);
    const char *addrs[1] = {url};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 1;
    o.request_timeout_ms = 20000;
    o.membership_refresh_ms = 100;
    o.replicas = 2;
    kvs_client_t *c = NULL;
    assert_int_equal(kvs_client_open(&o, &c), 0);

    enum { N = 24 };
    uint32_t acked, wanted;
    for (uint64_t s = 1; s <= N; s++) {
        assert_int_equal(seq_roundtrip(c, s, true), 0);
        kvs_client_last_write_acks(c, &acked, &wanted);
        if (acked != 2)
            fprintf(stderr, "seq %llu: %s\n", (unsigned long long)s,
                    kvs_client_errmsg(c));
        assert_int_equal(acked, 2);
        assert_int_equal(wanted, 2);
    }
    /* Two copies of each: the nodes hold 2N sequences between them. */
    kvs_client_member_t m[8];
    size_t nm = 0;
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 3);
    uint64_t total = 0, ids_buf[64];
    for (size_t i = 0; i < nm; i++) {
        uint64_t t = 0;
        size_t got = 0;
        assert_int_equal(
            kvs_client_store_list(c, m[i].node, ids_buf, 64, &got, &t), 0);
        total += t;
    }
    assert_int_equal((int)total, 2 * N);
    float kv[4 * 8];
    for (int i = 0; i < 32; i++)
        kv[i] = 0.25f;
    /* Submitted writes are replicated too: a pipelined create + append
     * each complete once, after both replicas applied them. */
    kvs_client_op_t cr = {
        .type = KVS_CLIENT_CREATE, .seq = 500, .geometry = geo};
    kvs_client_op_t ap = {.type = KVS_CLIENT_APPEND,
                          .seq = 500,
                          .n_tokens = 4,
                          .keys = kv,
                          .values = kv,
                          .kv_bytes = sizeof(kv)};
    assert_int_equal(kvs_client_submit(c, &cr), 0);
    assert_int_equal(kvs_client_submit(c, &ap), 0);
    assert_int_equal(kvs_client_pending(c), 2);
    size_t got = 0;
    while (got < 2) {
        kvs_client_op_t *done[2];
        size_t nd = 0;
        assert_int_equal(kvs_client_poll(c, done, 2, &nd, 5000), 0);
        assert_true(nd > 0);
        for (size_t i = 0; i < nd; i++)
            assert_true(done[i] == &cr || done[i] == &ap);
        got += nd;
    }
    assert_int_equal(kvs_client_pending(c), 0);
    assert_int_equal(cr.status, 0);
    assert_int_equal(ap.status, 0);
    kvs_client_last_write_acks(c, &acked, &wanted);
    assert_int_equal(acked, 2);
    kvs_seq_info_t info;
    for (size_t i = 0; i < nm; i++) {
        uint64_t t = 0;
        size_t n_ids = 0;
        assert_int_equal(
            kvs_client_store_list(c, m[i].node, ids_buf, 64, &n_ids, &t), 0);
        total += t;
    }
    assert_int_equal((int)total, 2 * N + 2 * (N + 1));
    assert_int_equal(kvs_client_seq_info(c, 500, &info), 0);
    assert_true(info.tokens_min == 4);

    /* a dies without deregistering: etcd still lists it for up to TTL. */
    tc_node_kill(&n[0]);
    kvs_client_counters_t k0, k1;
    kvs_client_counters(c, &k0);
    int degraded = 0;
    for (uint64_t s = 1; s <= N; s++) {
        assert_int_equal(seq_roundtrip(c, s, false), 0);
        /* Odd: submitted (the op's message reports), even: synchronous
         * (kvs_client_errmsg reports). */
        const char *msg;
        if (s % 2) {
            ap.seq = s;
            assert_int_equal(kvs_client_submit(c, &ap), 0);
            kvs_client_op_t *done[1];
            size_t nd = 0;
            while (!nd)
                assert_int_equal(kvs_client_poll(c, done, 1, &nd, 5000), 0);
            assert_ptr_equal(done[0], &ap);
            assert_int_equal(ap.status, 0);
            msg = ap.message;
        } else {
            assert_int_equal(
                kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv)), 0);
            msg = kvs_client_errmsg(c);
        }
        kvs_client_last_write_acks(c, &acked, &wanted);
        assert_int_equal(wanted, 2);
        if (acked == 1) {
            degraded++;
            assert_non_null(strstr(msg, "acknowledged by 1 of 2"));
        } else {
            assert_int_equal(acked, 2);
        }
        assert_int_equal(kvs_client_seq_info(c, s, &info), 0);
        assert_true(info.tokens_min ==
                    8); /* both appends, on the replica read */
    }
    kvs_client_counters(c, &k1);
    /* a held about 2/3 of the sequences; P(none) = (1/3)^24. */
    assert_true(degraded > 0);
    assert_true(k1.degraded_writes - k0.degraded_writes == (uint64_t)degraded);
    /* Only the first contact with the dead node (a read, or a write whose
     * connect is refused) finds it down; the client then asks it last
     * (node_t.down_until), and the writes to it keep that fresh. */
    assert_true(k1.read_failovers - k0.read_failovers <= 1);
    fprintf(stderr,
            "R=2, one node killed: %d of %d appends acknowledged by "
            "one replica, %llu reads failed over\n",
            degraded, N,
            (unsigned long long)(k1.read_failovers - k0.read_failovers));

    /* Pipelined reads: N attends submitted at once. The client has seen
     * connects to the dead node fail just now (the appends above), so for
     * two membership periods it asks that node after the other replica:
     * no read passes over it (before, each one paid a refused connect and
     * an etcd range first). */
    static kvs_client_op_t at[N];
    static float out[N][16];
    float q[16];
    for (int i = 0; i < 16; i++)
        q[i] = 0.1f * (float)i;
    kvs_client_counters(c, &k0);
    for (int i = 0; i < N; i++) {
        memset(&at[i], 0, sizeof(at[i]));
        at[i].type = KVS_CLIENT_ATTEND;
        at[i].seq = (uint64_t)i + 1;
        at[i].queries = q;
        at[i].n_query_floats = 16;
        at[i].output = out[i];
        assert_int_equal(kvs_client_submit(c, &at[i]), 0);
    }
    for (size_t got = 0; got < N;) {
        kvs_client_op_t *done[N];
        size_t nd = 0;
        assert_int_equal(kvs_client_poll(c, done, N, &nd, 5000), 0);
        assert_true(nd > 0);
        for (size_t i = 0; i < nd; i++) {
            assert_int_equal(done[i]->status, 0);
            assert_true(isfinite(((float *)done[i]->output)[0]));
        }
        got += nd;
    }
    kvs_client_counters(c, &k1);
    assert_true(k1.read_failovers == k0.read_failovers);

    /* Once its lease is gone, a is no longer placed on; every sequence is
     * still read, from its first replica: a sequence that was on a and x
     * now has {x, y} with y ranked below x (rendezvous: a leaving node
     * only promotes the next one), so no read needs to pass on. */
    assert_true(tc_wait_members(&tc_etcd, pfx, "b,c", TTL * 1000 + 2000) >= 0);
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 2);
    kvs_client_counters(c, &k0);
    for (uint64_t s = 1; s <= N; s++) {
        assert_string_not_equal(
            kvs_client_node_addr(c, kvs_client_node_for(c, s)), addr_a);
        assert_int_equal(seq_roundtrip(c, s, false), 0);
    }
    kvs_client_counters(c, &k1);
    assert_true(k1.read_failovers == k0.read_failovers);

    /* d joins and ranks first for about a third of the sequences, with no
     * copy of them (no repair yet): it answers KVS_ENOSEQ and the read
     * passes on to the old first replica. P(d first for none) = (2/3)^24. */
    tc_node_t d;
    assert_int_equal(tc_node_start(&d, &tc_etcd, pfx, "d", TTL, NULL), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "b,c,d", 5000) >= 0);
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    assert_int_equal(nm, 3);
    kvs_client_counters(c, &k0);
    for (uint64_t s = 1; s <= N; s++)
        assert_int_equal(seq_roundtrip(c, s, false), 0);
    kvs_client_counters(c, &k1);
    assert_true(k1.read_failovers > k0.read_failovers);
    fprintf(stderr, "node joined: %llu of %d reads passed over it\n",
            (unsigned long long)(k1.read_failovers - k0.read_failovers), N);
    assert_int_equal(tc_node_stop(&d), 0);
    tc_node_cleanup(&d);

    /* Down to one live node: a write there is one copy where R asked for
     * two, and says so. */
    assert_int_equal(tc_node_stop(&n[2]), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "b", 3000) >= 0);
    assert_int_equal(kvs_client_members(c, m, 8, &nm), 0);
    int on_b = 0;
    for (uint64_t s = 1; s <= N; s++) {
        int rc = kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv));
        if (rc == KVS_ENOSEQ)
            continue; /* its copies were on a and c */
        assert_int_equal(rc, 0);
        kvs_client_last_write_acks(c, &acked, &wanted);
        assert_int_equal(acked, 1);
        assert_int_equal(wanted, 2);
        assert_non_null(strstr(kvs_client_errmsg(c), "only 1 live nodes"));
        on_b++;
    }
    assert_true(on_b > 0);
    kvs_client_close(c);
    /* Clean exits (under ASan: no leaks, no errors) of those still up. */
    for (int i = 0; i < 3; i++) {
        if (n[i].pid > 0)
            assert_int_equal(tc_node_stop(&n[i]), 0);
        tc_node_cleanup(&n[i]);
    }
}

/* ------------------------------------------------ sticky placement (#16)
 * A sequence stays on the node(s) it was created on; clients find it by
 * probing in rendezvous order after the membership changed. */

static kvs_client_t *open_etcd_client(const char *url, uint32_t replicas) {
    kvs_client_t *c = tc_client_open(url, replicas, 20000);
    assert_non_null(c);
    return c;
}

/* Until the client lists `want` live nodes (kvs_client_members re-reads
 * etcd); false after 5 s. */
static bool client_sees(kvs_client_t *c, size_t want) {
    kvs_client_member_t m[8];
    size_t nm = 0;
    for (int i = 0; i < 100; i++) {
        if (!kvs_client_members(c, m, 8, &nm) && nm == want)
            return true;
        tc_sleep_ms(50);
    }
    return false;
}

static size_t node_of(kvs_client_t *c, const char *addr) {
    for (size_t i = 0; i < kvs_client_n_nodes(c); i++)
        if (kvs_client_node_live(c, i) &&
            !strcmp(kvs_client_node_addr(c, i), addr))
            return i;
    return SIZE_MAX;
}

static void seq_kv(uint64_t seq, int round, float *kv) {
    for (int i = 0; i < 32; i++)
        kv[i] = (float)((seq * 31 + (uint64_t)i * 7 + (uint64_t)round) % 17) /
                    17.0f -
                0.5f;
}

static const float sticky_q[16] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f,
                                   0.7f, 0.8f, 0.9f, 1.0f, 0.0f, 0.2f,
                                   0.4f, 0.6f, 0.8f, 1.0f};

/* R = 1: a node joins; every existing sequence still appends, attends
 * (bit-identical to before) and reads back; only its first use pays the
 * probe; a fresh client finds them too; new sequences use all 3 nodes.
 * Then a node is SIGKILLed and restarted on its data: found again. */
static void test_cluster_sticky_join(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *pfx = "/t-sticky";
    tc_node_t n[3];
    memset(n, 0, sizeof(n));
    assert_int_equal(tc_node_start(&n[0], &tc_etcd, pfx, "a", TTL, NULL), 0);
    assert_int_equal(tc_node_start(&n[1], &tc_etcd, pfx, "b", TTL, NULL), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b", 5000) >= 0);
    char url[128], addr[3][64];
    snprintf(url, sizeof(url), "etcd://127.0.0.1:%d%s", tc_etcd.port, pfx);
    kvs_client_t *c = open_etcd_client(url, 1);
    assert_true(client_sees(c, 2));

    enum { N = 24 };
    static float out0[N + 1][16], out1[N + 1][16];
    float kv[32], out[16];
    for (uint64_t s = 1; s <= N; s++) {
        seq_kv(s, 0, kv);
        assert_int_equal(kvs_client_seq_create(c, s, &geo), 0);
        assert_int_equal(kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv)),
                         0);
        assert_int_equal(
            kvs_client_seq_attend(c, s, 0, sticky_q, 16, NULL, out0[s], NULL),
            0);
    }

    assert_int_equal(tc_node_start(&n[2], &tc_etcd, pfx, "c", TTL, NULL), 0);
    snprintf(addr[2], sizeof(addr[2]), "127.0.0.1:%d", n[2].port);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000) >= 0);
    assert_true(client_sees(c, 3));
    size_t node_c = node_of(c, addr[2]);
    assert_true(node_c != SIZE_MAX);
    int to_c = 0; /* old sequences that now hash to c: P(none) = (2/3)^24 */
    for (uint64_t s = 1; s <= N; s++)
        to_c += kvs_client_node_for(c, s) == node_c;
    assert_true(to_c > 0);

    kvs_client_counters_t k0, k1;
    kvs_client_counters(c, &k0);
    for (uint64_t s = 1; s <= N; s++) {
        /* Reads first: the same node, the same data, the same answer. */
        assert_int_equal(
            kvs_client_seq_attend(c, s, 0, sticky_q, 16, NULL, out, NULL), 0);
        for (int i = 0; i < 16; i++)
            assert_true(out[i] == out0[s][i]);
        seq_kv(s, 1, kv);
        assert_int_equal(kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv)),
                         0);
        kvs_seq_info_t info;
        assert_int_equal(kvs_client_seq_info(c, s, &info), 0);
        assert_int_equal(info.tokens_max, 8);
        assert_int_equal(info.geometry.head_dim, geo.head_dim);
        assert_int_equal(
            kvs_client_seq_attend(c, s, 0, sticky_q, 16, NULL, out1[s], NULL),
            0);
        assert_int_equal(kvs_client_seq_flush(c, s, NULL), 0);
    }
    kvs_client_counters(c, &k1);
    /* One probe per moved sequence, on its first op only (then cached). */
    assert_int_equal(k1.relocated - k0.relocated, (uint64_t)to_c);
    /* c got none of them. */
    uint64_t ids[64], total = 0;
    size_t nids = 0;
    assert_int_equal(kvs_client_store_list(c, node_c, ids, 64, &nids, &total),
                     0);
    assert_int_equal(total, 0);
    fprintf(stderr,
            "join: %d of %d sequences hash to the newcomer, found "
            "with one probe each\n",
            to_c, N);

    /* kvctl locate: where one of them lives, and where hashing points. */
    uint64_t moved_seq = 0;
    for (uint64_t s = 1; s <= N && !moved_seq; s++)
        if (kvs_client_node_for(c, s) == node_c)
            moved_seq = s;
    char cmd[512], line[1024] = "", want[160];
    snprintf(cmd, sizeof(cmd), "%s/client/kvctl --addr %s --json locate %llu",
             KVS_BINARY_DIR, url, (unsigned long long)moved_seq);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(line, sizeof(line), p));
    assert_int_equal(pclose(p), 0);
    snprintf(want, sizeof(want), "\"hash_owner\":\"%s\"", addr[2]);
    assert_non_null(strstr(line, want));
    assert_non_null(strstr(line, "\"asked\":3"));
    /* One holder, and not the newcomer: "nodes":["ADDR"] */
    const char *nl = strstr(line, "\"nodes\":[\"127.0.0.1:");
    assert_non_null(nl);
    const char *end = strchr(nl, ']');
    assert_non_null(end);
    char holders[128];
    snprintf(holders, sizeof(holders), "%.*s", (int)(end - nl), nl);
    if (strchr(holders, ','))
        fprintf(stderr, "locate: %s", line);
    assert_null(strchr(holders, ','));
    assert_null(strstr(holders, addr[2]));
    size_t where[4], nw = 0, asked = 0;
    assert_int_equal(kvs_client_seq_locate(c, moved_seq, where, 4, &nw, &asked),
                     0);
    assert_int_equal(nw, 1);
    assert_int_equal(asked, 3);
    assert_true(where[0] != node_c);
    assert_int_equal(kvs_client_seq_locate(c, 999999, where, 4, &nw, NULL),
                     KVS_ENOSEQ);
    assert_int_equal(nw, 0);

    /* A client without the cache finds them by probing as well. */
    kvs_client_t *c2 = open_etcd_client(url, 1);
    for (uint64_t s = 1; s <= N; s++) {
        assert_int_equal(
            kvs_client_seq_attend(c2, s, 0, sticky_q, 16, NULL, out, NULL), 0);
        for (int i = 0; i < 16; i++)
            assert_true(out[i] == out1[s][i]);
    }
    kvs_client_counters(c2, &k1);
    assert_int_equal(k1.relocated, (uint64_t)to_c);
    /* What the probe costs: the moved sequences' first op (one KVS_ENOSEQ
     * round trip more) against their next one (cached). Printed, not asserted:
     * the machine is shared. */
    kvs_client_t *c3 = open_etcd_client(url, 1);
    /* Connections first, so that only the probe is measured. */
    for (size_t i = 0; i < kvs_client_n_nodes(c3); i++)
        if (kvs_client_node_live(c3, i))
            assert_int_equal(kvs_client_ping(c3, i), 0);
    long t_first = 0, t_next = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t s = 1; s <= N; s++) {
            if (kvs_client_node_for(c3, s) != node_c)
                continue;
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            assert_int_equal(
                kvs_client_seq_attend(c3, s, 0, sticky_q, 16, NULL, out, NULL),
                0);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            long us = (t1.tv_sec - t0.tv_sec) * 1000000L +
                      (t1.tv_nsec - t0.tv_nsec) / 1000L;
            *(pass ? &t_next : &t_first) += us;
        }
    }
    fprintf(stderr,
            "moved sequences: first op %ld us (with the probe), next op "
            "%ld us (cached), mean of %d\n",
            t_first / to_c, t_next / to_c, to_c);
    kvs_client_close(c3);
    kvs_client_close(c2);

    /* A cache of 2 sequences: evicted least recently used first, so a
     * second pass in the same order over more than 2 moved sequences
     * probes every one of them again; the answers stay right. */
    {
        const char *addrs[1] = {url};
        kvs_client_options_t o;
        kvs_client_options_default(&o);
        o.addrs = addrs;
        o.n_addrs = 1;
        o.location_cache = (1u << 24) + 1;
        kvs_client_t *bad = NULL;
        assert_int_equal(kvs_client_open(&o, &bad), KVS_EINVAL);
        o.location_cache = 2;
        kvs_client_t *c4 = NULL;
        assert_int_equal(kvs_client_open(&o, &c4), 0);
        uint64_t per_pass[3];
        for (int pass = 0; pass < 3; pass++) {
            kvs_client_counters(c4, &k0);
            for (uint64_t s = 1; s <= N; s++) {
                assert_int_equal(kvs_client_seq_attend(c4, s, 0, sticky_q, 16,
                                                       NULL, out, NULL),
                                 0);
                for (int i = 0; i < 16; i++)
                    assert_true(out[i] == out1[s][i]);
                /* Just found, so cached: the same op again costs no
                 * probe. */
                kvs_client_counters_t kb, ka;
                kvs_client_counters(c4, &kb);
                assert_int_equal(kvs_client_seq_attend(c4, s, 0, sticky_q, 16,
                                                       NULL, out, NULL),
                                 0);
                kvs_client_counters(c4, &ka);
                assert_int_equal(ka.relocated, kb.relocated);
            }
            kvs_client_counters(c4, &k1);
            per_pass[pass] = k1.relocated - k0.relocated;
        }
        assert_int_equal(per_pass[0], (uint64_t)to_c);
        assert_int_equal(per_pass[1], to_c > 2 ? (uint64_t)to_c : 0);
        assert_int_equal(per_pass[2], per_pass[1]);
        kvs_client_close(c4);
    }

    /* New sequences go to the top of the new order: all three nodes. */
    int on[3] = {0, 0, 0};
    for (uint64_t s = 301; s <= 324; s++) {
        assert_int_equal(seq_roundtrip(c, s, true), 0);
        for (int i = 0; i < 2; i++) {
            snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", n[i].port);
            on[i] += kvs_client_node_for(c, s) == node_of(c, addr[i]);
        }
        on[2] += kvs_client_node_for(c, s) == node_c;
    }
    assert_true(on[0] > 0 && on[1] > 0 && on[2] > 0);
    assert_int_equal(kvs_client_store_list(c, node_c, ids, 64, &nids, &total),
                     0);
    assert_int_equal((int)total, on[2]);

    /* b is SIGKILLed (its appends were flushed) and restarted on its data
     * dir, on a new port: its sequences are found again. */
    tc_node_kill(&n[1]);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,c", 5000) >= 0);
    assert_true(client_sees(c, 2));
    assert_int_equal(tc_node_restart(&n[1], &tc_etcd, pfx, TTL, NULL), 0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000) >= 0);
    assert_true(client_sees(c, 3));
    for (uint64_t s = 1; s <= N; s++) {
        int rc = kvs_client_seq_attend(c, s, 0, sticky_q, 16, NULL, out, NULL);
        if (rc)
            tc_node_dump_log(&n[1]);
        assert_int_equal(rc, 0);
        for (int i = 0; i < 16; i++)
            assert_true(out[i] == out1[s][i]);
        seq_kv(s, 2, kv);
        assert_int_equal(kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv)),
                         0);
    }
    kvs_client_close(c);
    for (int i = 0; i < 3; i++) {
        if (n[i].pid > 0)
            assert_int_equal(tc_node_stop(&n[i]), 0);
        tc_node_cleanup(&n[i]);
    }
}

/* R = 2 over three nodes, a fourth joins: appends to the old sequences go
 * to their two holders (both acknowledge), never to the newcomer. */
static void test_cluster_sticky_replicas(void **state) {
    (void)state;
    TC_NEED_ETCD();
    const char *pfx = "/t-sticky-r2";
    tc_node_t n[4];
    memset(n, 0, sizeof(n));
    const char *ids[4] = {"a", "b", "c", "d"};
    for (int i = 0; i < 3; i++)
        assert_int_equal(tc_node_start(&n[i], &tc_etcd, pfx, ids[i], TTL, NULL),
                         0);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c", 5000) >= 0);
    char url[128], addr_d[64];
    snprintf(url, sizeof(url), "etcd://127.0.0.1:%d%s", tc_etcd.port, pfx);
    kvs_client_t *c = open_etcd_client(url, 2);
    assert_true(client_sees(c, 3));
    enum { N = 24 };
    uint32_t acked, wanted;
    for (uint64_t s = 1; s <= N; s++) {
        assert_int_equal(seq_roundtrip(c, s, true), 0);
        kvs_client_last_write_acks(c, &acked, &wanted);
        assert_int_equal(acked, 2);
    }
    assert_int_equal(tc_node_start(&n[3], &tc_etcd, pfx, "d", TTL, NULL), 0);
    snprintf(addr_d, sizeof(addr_d), "127.0.0.1:%d", n[3].port);
    assert_true(tc_wait_members(&tc_etcd, pfx, "a,b,c,d", 5000) >= 0);
    assert_true(client_sees(c, 4));
    size_t node_d = node_of(c, addr_d);
    assert_true(node_d != SIZE_MAX);

    kvs_client_counters_t k0, k1;
    kvs_client_counters(c, &k0);
    float kv[32];
    for (int round = 0; round < 2; round++) {
        for (uint64_t s = 1; s <= N; s++) {
            seq_kv(s, 1 + round, kv);
            int rc = kvs_client_seq_append(c, s, 0, 4, kv, kv, sizeof(kv));
            if (rc)
                fprintf(stderr, "seq %llu: %s\n", (unsigned long long)s,
                        kvs_client_errmsg(c));
            assert_int_equal(rc, 0);
            kvs_client_last_write_acks(c, &acked, &wanted);
            assert_int_equal(acked, 2);
            assert_int_equal(wanted, 2);
            assert_null(strstr(kvs_client_errmsg(c), "of 2 replicas"));
            kvs_seq_info_t info;
            assert_int_equal(kvs_client_seq_info(c, s, &info), 0);
            assert_int_equal(info.tokens_max, 8 + 4 * round);
        }
    }
    kvs_client_counters(c, &k1);
    /* d ranks in the top two of about half of them (P(none) = 2^-24);
     * each costs one extra copy, once: the second round is cached. */
    uint64_t moved = k1.relocated - k0.relocated;
    assert_true(moved > 0 && moved <= N);
    assert_int_equal(k1.degraded_writes, k0.degraded_writes);
    uint64_t idl[64], total = 0;
    size_t nids = 0;
    assert_int_equal(kvs_client_store_list(c, node_d, idl, 64, &nids, &total),
                     0);
    assert_int_equal(total, 0);
    fprintf(stderr,
            "R=2 join: %llu of %d sequences' writes moved past the "
            "newcomer\n",
            (unsigned long long)moved, N);

    /* Submitted (pipelined) appends take the same path. */
    kvs_client_op_t ops[N];
    memset(ops, 0, sizeof(ops));
    seq_kv(99, 3, kv);
    kvs_client_t *c2 = open_etcd_client(url, 2); /* no cache: probes */
    for (int i = 0; i < N; i++) {
        ops[i].type = KVS_CLIENT_APPEND;
        ops[i].seq = (uint64_t)i + 1;
        ops[i].n_tokens = 4;
        ops[i].keys = kv;
        ops[i].values = kv;
        ops[i].kv_bytes = sizeof(kv);
        assert_int_equal(kvs_client_submit(c2, &ops[i]), 0);
    }
    size_t got = 0;
    while (got < N) {
        kvs_client_op_t *done[N];
        size_t nd = 0;
        assert_int_equal(kvs_client_poll(c2, done, N, &nd, 5000), 0);
        for (size_t i = 0; i < nd; i++) {
            assert_int_equal(done[i]->status, 0);
            assert_null(strstr(done[i]->message, "of 2 replicas"));
        }
        got += nd;
    }
    kvs_client_counters(c2, &k1);
    assert_int_equal(k1.relocated, moved);
    assert_int_equal(kvs_client_store_list(c, node_d, idl, 64, &nids, &total),
                     0);
    assert_int_equal(total, 0);
    kvs_client_close(c2);
    kvs_client_close(c);
    for (int i = 0; i < 4; i++) {
        if (n[i].pid > 0)
            assert_int_equal(tc_node_stop(&n[i]), 0);
        tc_node_cleanup(&n[i]);
    }
}

/* The etcd options go through the same layers as every kvstored option,
 * and validation refuses what would make a bad key or address. */
static void test_cluster_config(void **state) {
    (void)state;
    kvs_server_config_t cfg;
    char err[256];
    assert_int_equal(kvs_server_config_init(&cfg), 0);
    assert_string_equal(cfg.etcd_endpoints, "");
    assert_string_equal(cfg.etcd_prefix, "/kvstore");
    assert_int_equal(cfg.etcd_lease_ttl, 10);
    char *env[] = {"KVSTORED_ETCD_ENDPOINTS=http://127.0.0.1:2379",
                   "KVSTORED_ETCD_LEASE_TTL=3", NULL};
    assert_int_equal(kvs_server_config_load_env(&cfg, env, err, sizeof(err)),
                     0);
    assert_string_equal(cfg.etcd_endpoints, "http://127.0.0.1:2379");
    assert_int_equal(cfg.etcd_lease_ttl, 3);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    static const char *bad_ep[] = {"https://h:1", "h", "http://h",
                                   "http://a:1,b"};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(kvs_server_config_set(&cfg, "etcd_endpoints",
                                               bad_ep[i], err, sizeof(err)),
                         0);
        assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                         KVS_EINVAL);
        assert_non_null(strstr(err, "etcd_endpoints"));
    }
    assert_int_equal(kvs_server_config_set(&cfg, "etcd_endpoints",
                                           "http://[::1]:2379,10.0.0.2:2379",
                                           err, sizeof(err)),
                     0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    assert_int_equal(
        kvs_server_config_set(&cfg, "etcd-lease-ttl", "1", err, sizeof(err)),
        KVS_EINVAL);
    assert_int_equal(
        kvs_server_config_set(&cfg, "etcd_prefix", "kv", err, sizeof(err)), 0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                     KVS_EINVAL);
    assert_non_null(strstr(err, "etcd_prefix"));
    assert_int_equal(
        kvs_server_config_set(&cfg, "etcd_prefix", "/kv", err, sizeof(err)), 0);
    assert_int_equal(
        kvs_server_config_set(&cfg, "node_id", "a/b", err, sizeof(err)), 0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                     KVS_EINVAL);
    assert_int_equal(
        kvs_server_config_set(&cfg, "node_id", "a", err, sizeof(err)), 0);
    assert_int_equal(
        kvs_server_config_set(&cfg, "advertise_addr", "host", err, sizeof(err)),
        0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)),
                     KVS_EINVAL);
    assert_int_equal(kvs_server_config_set(&cfg, "advertise_addr",
                                           "10.0.0.5:7700", err, sizeof(err)),
                     0);
    assert_int_equal(kvs_server_config_validate(&cfg, err, sizeof(err)), 0);
    kvs_server_config_destroy(&cfg);
}

/* etcd down: the daemon starts and serves all the same (etcd is how
 * clients find it, not the data path), says so in its log, and still
 * stops cleanly. */
static void test_cluster_etcd_down(void **state) {
    (void)state;
    tc_etcd_t none;
    memset(&none, 0, sizeof(none));
    snprintf(none.endpoint, sizeof(none.endpoint), "http://127.0.0.1:1");
    tc_node_t n;
    assert_int_equal(tc_node_start(&n, &none, "/t-down", "a", TTL, NULL), 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", n.port);
    const char *addrs[1] = {addr};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 1;
    kvs_client_t *c = NULL;
    assert_int_equal(kvs_client_open(&o, &c), 0);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    assert_int_equal(seq_roundtrip(c, 7, true), 0);
    kvs_client_close(c);
    bool logged = false;
    for (int i = 0; i < 50 && !logged; i++) {
        FILE *f = fopen(n.log, "r");
        char line[1024];
        while (f && fgets(line, sizeof(line), f))
            logged |= strstr(line, "event=etcd_unreachable") != NULL;
        if (f)
            fclose(f);
        if (!logged)
            tc_sleep_ms(100);
    }
    assert_true(logged);
    assert_true(tc_metric(n.http_port, "kvstored_etcd_registered") == 0);
    assert_true(tc_metric(n.http_port, "kvstored_etcd_failures_total") >= 1);
    long t0 = tc_now_ms();
    assert_int_equal(tc_node_stop(&n), 0);
    assert_true(tc_now_ms() - t0 < 5000);
    tc_node_cleanup(&n);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_cluster_record_codec, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_config, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_etcd_down, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_membership, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_client_membership,
                                  tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_client_errors, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_replicas, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_sticky_join, tc_test_teardown),
        cmocka_unit_test_teardown(test_cluster_sticky_replicas,
                                  tc_test_teardown),
    };
    return cmocka_run_group_tests(tests, tc_group_setup, tc_group_teardown);
}
