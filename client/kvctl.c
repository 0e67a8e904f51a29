/*
 * kvctl.c: the admin and benchmark CLI for kvstored, built on libkvsclient.
 *
 *   kvctl [--addr HOST:PORT]... [--token T] [--json] [--timeout MS] CMD ...
 *
 * Commands: ping, stats, nodes, list, create, drop, fork, info (alias dump),
 * locate, bench.
 * Output is for humans by default; --json prints one JSON object per command
 * for scripts. Exit status: 0 success, 1 the operation failed, 2 usage.
 */
#include "kvs_client.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct args_s {
    const char *addrs[256];
    size_t n_addrs;
    const char *token;
    bool json;
    uint32_t timeout_ms;
    uint32_t replicas;
} args_t;

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvctl [options] COMMAND [args]\n\n"
            "options:\n"
            "  --addr ADDR      daemon address (repeatable): HOST:PORT, "
            "[V6]:PORT,\n"
            "                   tcp://HOST:PORT, unix:/PATH, or one "
            "etcd://HOST:PORT/PREFIX\n"
            "                   for the nodes registered in etcd "
            "[$KVS_ADDR or 127.0.0.1:7700]\n"
            "  --token TOKEN    auth token [$KVS_AUTH_TOKEN]\n"
            "  --json           machine-readable output\n"
            "  --timeout MS     request timeout, 0 = none [30000]\n"
            "  --replicas R     nodes per sequence: writes go to all R, "
            "reads to the\n"
            "                   first that answers (docs/cluster.md) [1]\n\n"
            "commands:\n"
            "  ping [--count N]                  round trip to every node\n"
            "  stats                             store and server counters "
            "per node\n"
            "  nodes                             live nodes and their load "
            "(from etcd\n"
            "                                    with an etcd:// address)\n"
            "  list [--limit N]                  sequence ids per node\n"
            "  create SEQ --layers L --q-heads Q --kv-heads H --head-dim D\n"
            "         [--dtype f32|f16|bf16]     create a sequence\n"
            "         [--ttl SECONDS]\n"
            "  drop SEQ                          drop a sequence\n"
            "  locate SEQ                        the nodes that hold SEQ "
            "(asked in\n"
            "                                    rendezvous order, at most 8)\n"
            "  flush SEQ                         wait until SEQ's appends "
            "(and all\n"
            "                                    earlier writes) are durable "
            "(sync async)\n"
            "  append SEQ [--layer L] [--tokens N]  append N random tokens "
            "(testing)\n"
            "  ttl SEQ SECONDS                   expire SEQ after SECONDS "
            "idle (0: never)\n"
            "  fork SRC DST [--at TOKENS]        fork a sequence "
            "(copy-on-write;\n"
            "                                    all tokens by default)\n"
            "  info SEQ | dump SEQ               a sequence's metadata\n"
            "  bench [--op ping|append|search|attend] [--requests N]\n"
            "        [--pipeline P] [--tokens T] [--context C] [--k K]\n"
            "        [--q-heads Q] [--kv-heads H] [--head-dim D] "
            "[--dtype f16]\n"
            "        [--wait-indexed yes|no]    search/attend: wait for "
            "index builds [yes]\n"
            "        [--rank codes|centroid]    search/attend: how keys are "
            "ranked\n"
            "                                   [the server's default]\n");
}

static int parse_u64(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || !*s || *end || *s == '-')
        return -1;
    *out = v;
    return 0;
}

static int die_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "kvctl: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (try --help)\n");
    return 2;
}

static int report_error(const args_t *a, kvs_client_t *c, const char *what,
                        int rc) {
    const char *msg = c ? kvs_client_errmsg(c) : "";
    if (a->json) {
        printf("{\"ok\":false,\"op\":\"%s\",\"status\":%d,\"code\":\"%s\","
               "\"message\":\"",
               what, rc, kvs_err_name(rc));
        for (const char *p = msg && *msg ? msg : kvs_strerror(rc); *p; p++) {
            if (*p == '"' || *p == '\\')
                putchar('\\');
            if ((unsigned char)*p >= 0x20)
                putchar(*p);
        }
        printf("\"}\n");
    } else {
        fprintf(stderr, "kvctl: %s: %s (%s)%s%s\n", what, kvs_strerror(rc),
                kvs_err_name(rc), msg && *msg ? ": " : "", msg ? msg : "");
    }
    return 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_dtype(const char *s, kvs_dtype_t *d) {
    if (!strcmp(s, "f32"))
        *d = KVS_DTYPE_F32;
    else if (!strcmp(s, "f16"))
        *d = KVS_DTYPE_F16;
    else if (!strcmp(s, "bf16"))
        *d = KVS_DTYPE_BF16;
    else
        return -1;
    return 0;
}

/* ---------------------------------------------------------------- admin */

static int cmd_ping(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t count = 1;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--count") && i + 1 < argc) {
            if (parse_u64(argv[++i], &count) || !count)
                return die_usage("bad --count %s", argv[i]);
        } else {
            return die_usage("ping: unexpected %s", argv[i]);
        }
    }
    int failed = 0;
    if (a->json)
        printf("{\"ok\":true,\"nodes\":[");
    for (size_t n = 0; n < kvs_client_n_nodes(c); n++) {
        double best = 1e9, t_all = 0;
        int rc = 0;
        for (uint64_t i = 0; i < count && !rc; i++) {
            double t0 = now_s();
            rc = kvs_client_ping(c, n);
            double dt = now_s() - t0;
            t_all += dt;
            if (dt < best)
                best = dt;
        }
        const char *addr = kvs_client_node_addr(c, n);
        if (a->json) {
            printf("%s{\"addr\":\"%s\",\"ok\":%s,\"status\":\"%s\","
                   "\"min_us\":%.1f,\"mean_us\":%.1f}",
                   n ? "," : "", addr, rc ? "false" : "true", kvs_err_name(rc),
                   rc ? 0 : best * 1e6, rc ? 0 : t_all / (double)count * 1e6);
        } else if (rc) {
            printf("%-28s FAILED %s: %s\n", addr, kvs_err_name(rc),
                   kvs_client_errmsg(c));
        } else {
            printf("%-28s ok  min %.1f us  mean %.1f us  (%llu pings)\n", addr,
                   best * 1e6, t_all / (double)count * 1e6,
                   (unsigned long long)count);
        }
        failed |= rc != 0;
    }
    if (a->json)
        printf("]}\n");
    return failed;
}

/* A string for a JSON value: quotes, backslashes and control characters
 * become spaces (server strings are names and messages, not data). */
static const char *json_safe(const char *in) {
    static _Thread_local char buf[256];
    size_t i = 0;
    for (; in[i] && i + 1 < sizeof buf; i++)
        buf[i] = (in[i] == '"' || in[i] == '\\' || (unsigned char)in[i] < 0x20)
                     ? ' '
                     : in[i];
    buf[i] = 0;
    return buf;
}

static int member_cmp(const void *x, const void *y) {
    const kvs_client_member_t *a = x, *b = y;
    int r = strcmp(a->node_id, b->node_id);
    return r ? r : strcmp(a->addr, b->addr);
}

/* The live nodes and the load their records report, by node id. */
static int cmd_nodes(const args_t *a, kvs_client_t *c) {
    static kvs_client_member_t m[256];
    size_t n = 0;
    int rc = kvs_client_members(c, m, 256, &n);
    if (rc)
        return report_error(a, c, "nodes", rc);
    qsort(m, n, sizeof(m[0]), member_cmp);
    time_t now = time(NULL);
    if (a->json)
        printf("{\"ok\":true,\"nodes\":[");
    else
        printf("%-16s %-24s %9s %14s %14s %9s %s\n", "NODE", "ADDR",
               "SEQUENCES", "MEMORY_USED", "MEMORY_LIMIT", "UPTIME_S",
               "VERSION");
    for (size_t i = 0; i < n; i++) {
        long long up = m[i].start_time ? (long long)(now - m[i].start_time) : 0;
        if (a->json) {
            /* json_safe has one buffer: one string per printf. */
            printf("%s{\"node_id\":\"%s\",", i ? "," : "",
                   json_safe(m[i].node_id));
            printf("\"addr\":\"%s\",", json_safe(m[i].addr));
            printf("\"version\":\"%s\",", json_safe(m[i].version));
            printf("\"sequences\":%" PRIu64 ",\"memory_used\":%" PRIu64
                   ",\"memory_limit\":%" PRIu64 ",\"start_time\":%lld,"
                   "\"uptime_seconds\":%lld,\"protocol\":%u}",
                   m[i].sequences, m[i].memory_used, m[i].memory_limit,
                   (long long)m[i].start_time, up, m[i].protocol);
            continue;
        }
        char limit[32] = "unlimited";
        if (m[i].memory_limit)
            snprintf(limit, sizeof(limit), "%" PRIu64, m[i].memory_limit);
        printf("%-16s %-24s %9" PRIu64 " %14" PRIu64 " %14s %9lld %s\n",
               m[i].node_id[0] ? m[i].node_id : "-", m[i].addr, m[i].sequences,
               m[i].memory_used, limit, up,
               m[i].version[0] ? m[i].version : "-");
    }
    if (a->json)
        printf("]}\n");
    return 0;
}

static int cmd_stats(const args_t *a, kvs_client_t *c) {
    int failed = 0;
    if (a->json)
        printf("{\"ok\":true,\"nodes\":[");
    for (size_t n = 0; n < kvs_client_n_nodes(c); n++) {
        kvs_client_stats_t s;
        int rc = kvs_client_store_stats(c, n, &s);
        const char *addr = kvs_client_node_addr(c, n);
        if (a->json) {
            if (rc)
                printf("%s{\"addr\":\"%s\",\"ok\":false,\"status\":\"%s\"}",
                       n ? "," : "", addr, kvs_err_name(rc));
            else
                printf(
                    "%s{\"addr\":\"%s\",\"ok\":true,\"node_id\":\"%s\","
                    "\"version\":\"%s\",\"uptime_seconds\":%.3f,"
                    "\"sequences\":%" PRIu64 ",\"ram_bytes\":%" PRIu64
                    ",\"index_bytes\":%" PRIu64 ",\"disk_bytes\":%" PRIu64
                    ",\"quarantined\":%" PRIu64 ",\"builds_pending\":%" PRIu64
                    ",\"builds_done\":%" PRIu64 ",\"connections\":%" PRIu64
                    ",\"requests_total\":%" PRIu64 ",\"bytes_in\":%" PRIu64
                    ",\"bytes_out\":%" PRIu64 ",\"resident_bytes\":%" PRIu64
                    ",\"evictions\":%" PRIu64 ",\"page_ins\":%" PRIu64
                    ",\"expired\":%" PRIu64 ",\"attend_path\":\"%s\""
                    ",\"gpu_attends\":%" PRIu64 ",\"gpu_fallbacks\":%" PRIu64
                    ",\"gpu_errors\":%" PRIu64 ",\"gpu_bytes\":%" PRIu64
                    ",\"gpu_cache_lookups\":%" PRIu64
                    ",\"gpu_cache_hits\":%" PRIu64 ",\"gpu_builds\":%" PRIu64
                    ",\"queued_seqno\":%" PRIu64 ",\"persisted_seqno\":%" PRIu64
                    ",\"unpersisted_bytes\":%" PRIu64 "}",
                    n ? "," : "", addr, s.node_id, s.server_version,
                    s.uptime_seconds, s.store.sequences, s.store.bytes,
                    s.store.index_bytes, s.store.disk_bytes,
                    s.store.quarantined, s.store.builds_pending,
                    s.store.builds_done, s.connections, s.requests_total,
                    s.bytes_in, s.bytes_out, s.store.resident_bytes,
                    s.store.evictions, s.store.page_ins, s.store.expired,
                    json_safe(s.attend_path), s.store.gpu_attends,
                    s.store.gpu_fallbacks, s.store.gpu_errors,
                    s.store.gpu_bytes, s.store.gpu_cache_lookups,
                    s.store.gpu_cache_hits, s.store.gpu_builds,
                    s.store.queued_seqno, s.store.persisted_seqno,
                    s.store.unpersisted_bytes);
        } else if (rc) {
            printf("%s: FAILED %s: %s\n", addr, kvs_err_name(rc),
                   kvs_client_errmsg(c));
        } else {
            printf("%s (node %s, kvstored %s, up %.0f s)\n"
                   "  sequences       %" PRIu64 "\n"
                   "  ram             %.1f MiB (index %.1f MiB)\n"
                   "  disk            %.1f MiB, %" PRIu64
                   " sequences quarantined\n"
                   "  index builds    %" PRIu64 " pending, %" PRIu64 " done\n"
                   "  connections     %" PRIu64 "\n"
                   "  requests        %" PRIu64 "\n"
                   "  bytes in/out    %" PRIu64 " / %" PRIu64 "\n"
                   "  attend path     %s\n"
                   "  persisted       write %" PRIu64 " of %" PRIu64
                   ", %" PRIu64 " bytes queued\n",
                   addr, s.node_id, s.server_version, s.uptime_seconds,
                   s.store.sequences, (double)s.store.bytes / 1048576.0,
                   (double)s.store.index_bytes / 1048576.0,
                   (double)s.store.disk_bytes / 1048576.0, s.store.quarantined,
                   s.store.builds_pending, s.store.builds_done, s.connections,
                   s.requests_total, s.bytes_in, s.bytes_out,
                   s.attend_path[0] ? s.attend_path : "(not reported)",
                   s.store.persisted_seqno, s.store.queued_seqno,
                   s.store.unpersisted_bytes);
            if (s.store.gpu_attends || s.store.gpu_fallbacks ||
                s.store.gpu_builds)
                printf(
                    "  gpu             %" PRIu64 " attends, %" PRIu64
                    " on the CPU, %" PRIu64 " errors, cache %.1f%% of %" PRIu64
                    ", %.1f MiB, %" PRIu64 " builds\n",
                    s.store.gpu_attends, s.store.gpu_fallbacks,
                    s.store.gpu_errors,
                    s.store.gpu_cache_lookups
                        ? 100.0 * (double)s.store.gpu_cache_hits /
                              (double)s.store.gpu_cache_lookups
                        : 0.0,
                    s.store.gpu_cache_lookups,
                    (double)s.store.gpu_bytes / 1048576.0, s.store.gpu_builds);
        }
        failed |= rc != 0;
    }
    if (a->json)
        printf("]}\n");
    return failed;
}

static int cmd_list(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t limit = 100000;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--limit") && i + 1 < argc) {
            if (parse_u64(argv[++i], &limit) || !limit)
                return die_usage("bad --limit %s", argv[i]);
        } else {
            return die_usage("list: unexpected %s", argv[i]);
        }
    }
    uint64_t *ids = malloc(limit * sizeof(uint64_t));
    if (!ids)
        return report_error(a, c, "list", KVS_ENOMEM);
    int failed = 0;
    if (a->json)
        printf("{\"ok\":true,\"nodes\":[");
    for (size_t n = 0; n < kvs_client_n_nodes(c); n++) {
        size_t got = 0;
        uint64_t total = 0;
        int rc = kvs_client_store_list(c, n, ids, limit, &got, &total);
        const char *addr = kvs_client_node_addr(c, n);
        if (a->json) {
            printf("%s{\"addr\":\"%s\",\"ok\":%s,\"total\":%" PRIu64
                   ",\"ids\":[",
                   n ? "," : "", addr, rc ? "false" : "true", total);
            for (size_t i = 0; !rc && i < got; i++)
                printf("%s%" PRIu64, i ? "," : "", ids[i]);
            printf("]}");
        } else if (rc) {
            printf("%s: FAILED %s: %s\n", addr, kvs_err_name(rc),
                   kvs_client_errmsg(c));
        } else {
            printf("%s: %" PRIu64 " sequences%s\n", addr, total,
                   total > got ? " (truncated)" : "");
            for (size_t i = 0; i < got; i++)
                printf("  %" PRIu64 "\n", ids[i]);
        }
        failed |= rc != 0;
    }
    if (a->json)
        printf("]}\n");
    free(ids);
    return failed;
}

static int cmd_create(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t seq, v;
    if (argc < 1 || parse_u64(argv[0], &seq))
        return die_usage("create needs a sequence id%s", "");
    kvs_geometry_t g = {.n_layers = 1,
                        .n_q_heads = 0,
                        .n_kv_heads = 0,
                        .head_dim = 0,
                        .dtype = KVS_DTYPE_F16};
    uint32_t ttl = 0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (i + 1 >= argc)
            return die_usage("%s needs a value", o);
        const char *val = argv[++i];
        if (!strcmp(o, "--dtype")) {
            if (parse_dtype(val, &g.dtype))
                return die_usage("bad dtype %s", val);
            continue;
        }
        if (parse_u64(val, &v) || v > UINT32_MAX)
            return die_usage("bad number %s", val);
        if (!strcmp(o, "--ttl"))
            ttl = (uint32_t)v;
        else if (!strcmp(o, "--layers"))
            g.n_layers = (uint32_t)v;
        else if (!strcmp(o, "--q-heads"))
            g.n_q_heads = (uint32_t)v;
        else if (!strcmp(o, "--kv-heads"))
            g.n_kv_heads = (uint32_t)v;
        else if (!strcmp(o, "--head-dim"))
            g.head_dim = (uint32_t)v;
        else
            return die_usage("create: unknown option %s", o);
    }
    if (!g.n_kv_heads)
        g.n_kv_heads = g.n_q_heads;
    int rc = kvs_client_seq_create(c, seq, &g);
    if (!rc && ttl)
        rc = kvs_client_seq_set_ttl(c, seq, ttl);
    if (rc)
        return report_error(a, c, "create", rc);
    size_t node = kvs_client_node_for(c, seq);
    if (a->json)
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"node\":\"%s\"}\n", seq,
               kvs_client_node_addr(c, node));
    else
        printf("created sequence %" PRIu64 " on %s\n", seq,
               kvs_client_node_addr(c, node));
    return 0;
}

/* The nodes that hold seq, found the way every op finds them. */
static int cmd_locate(const args_t *a, kvs_client_t *c, uint64_t seq) {
    size_t where[8], nw = 0, asked = 0;
    int rc = kvs_client_seq_locate(c, seq, where, 8, &nw, &asked);
    if (rc)
        return report_error(a, c, "locate", rc);
    const char *home = kvs_client_node_addr(c, kvs_client_node_for(c, seq));
    if (a->json) {
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"nodes\":[", seq);
        for (size_t i = 0; i < nw; i++)
            printf("%s\"%s\"", i ? "," : "", kvs_client_node_addr(c, where[i]));
        printf("],\"asked\":%zu,\"hash_owner\":\"%s\"}\n", asked, home);
        return 0;
    }
    printf("sequence %" PRIu64 " on", seq);
    for (size_t i = 0; i < nw; i++)
        printf("%s %s", i ? "," : "", kvs_client_node_addr(c, where[i]));
    printf(" (%zu nodes asked; a new sequence with this id would go to %s)\n",
           asked, home);
    return 0;
}

static int cmd_seq_simple(const args_t *a, kvs_client_t *c, const char *cmd,
                          int argc, char **argv) {
    uint64_t seq, dst = 0, at = KVS_CLIENT_FORK_ALL;
    bool fork = !strcmp(cmd, "fork");
    if (fork && argc == 4 && !strcmp(argv[2], "--at")) {
        if (parse_u64(argv[3], &at))
            return die_usage("bad --at %s", argv[3]);
        argc = 2;
    }
    if (argc != (fork ? 2 : 1) || parse_u64(argv[0], &seq) ||
        (fork && parse_u64(argv[1], &dst)))
        return die_usage(fork ? "usage: fork SRC DST%s" : "usage: %s SEQ",
                         fork ? "" : cmd);
    int rc;
    if (fork) {
        rc = kvs_client_seq_fork(c, seq, at, dst);
        if (rc)
            return report_error(a, c, "fork", rc);
        if (a->json)
            printf("{\"ok\":true,\"src\":%" PRIu64 ",\"dst\":%" PRIu64 "}\n",
                   seq, dst);
        else
            printf("forked %" PRIu64 " into %" PRIu64 "\n", seq, dst);
        return 0;
    }
    if (!strcmp(cmd, "drop")) {
        rc = kvs_client_seq_drop(c, seq);
        if (rc)
            return report_error(a, c, "drop", rc);
        if (a->json)
            printf("{\"ok\":true,\"seq\":%" PRIu64 "}\n", seq);
        else
            printf("dropped sequence %" PRIu64 "\n", seq);
        return 0;
    }
    if (!strcmp(cmd, "locate"))
        return cmd_locate(a, c, seq);
    /* Where it lives, not where hashing would put it now (they differ
     * after a node joined: docs/cluster.md). */
    size_t where[8], nw = 0;
    rc = kvs_client_seq_locate(c, seq, where, 8, &nw, NULL);
    if (rc)
        return report_error(a, c, cmd, rc);
    kvs_seq_info_t in;
    rc = kvs_client_seq_info(c, seq, &in);
    if (rc)
        return report_error(a, c, cmd, rc);
    const kvs_geometry_t *g = &in.geometry;
    const char *node = kvs_client_node_addr(c, where[0]);
    if (a->json) {
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"node\":\"%s\","
               "\"geometry\":{\"n_layers\":%u,\"n_q_heads\":%u,"
               "\"n_kv_heads\":%u,\"head_dim\":%u,\"dtype\":\"%s\"},"
               "\"tokens_min\":%" PRIu64 ",\"tokens_max\":%" PRIu64
               ",\"indexed_tokens\":%" PRIu64 ",\"segments\":%" PRIu64
               ",\"builds_pending\":%" PRIu64 ",\"bytes\":%" PRIu64
               ",\"index_bytes\":%" PRIu64 "}\n",
               seq, node, g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim,
               kvs_dtype_name(g->dtype), in.tokens_min, in.tokens_max,
               in.indexed_tokens, in.segments, in.builds_pending, in.bytes,
               in.index_bytes);
    } else {
        printf("sequence %" PRIu64 " on %s\n"
               "  geometry        %u layers, %u q heads, %u kv heads, "
               "head_dim %u, %s\n"
               "  tokens          %" PRIu64 " .. %" PRIu64 " per layer\n"
               "  indexed tokens  %" PRIu64 " (%" PRIu64 " segments, %" PRIu64
               " builds pending)\n"
               "  ram             %.2f MiB (index %.2f MiB)\n",
               seq, node, g->n_layers, g->n_q_heads, g->n_kv_heads, g->head_dim,
               kvs_dtype_name(g->dtype), in.tokens_min, in.tokens_max,
               in.indexed_tokens, in.segments, in.builds_pending,
               (double)in.bytes / 1048576.0,
               (double)in.index_bytes / 1048576.0);
    }
    return 0;
}

static void fill_random(void *buf, size_t n, kvs_dtype_t dt, uint64_t *state);

/* Random keys/values of the sequence's own geometry: for smoke tests and
 * demos of a daemon, not for real data. */
static int cmd_append(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t seq, layer = 0, tokens = 16, v;
    if (argc < 1 || parse_u64(argv[0], &seq))
        return die_usage("usage: append SEQ [--layer L] [--tokens N]%s", "");
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc || parse_u64(argv[i + 1], &v) || v > UINT32_MAX)
            return die_usage("append: bad %s", argv[i]);
        if (!strcmp(argv[i], "--layer"))
            layer = v;
        else if (!strcmp(argv[i], "--tokens") && v > 0)
            tokens = v;
        else
            return die_usage("append: unknown option %s", argv[i]);
        i++;
    }
    kvs_seq_info_t in;
    int rc = kvs_client_seq_info(c, seq, &in);
    if (rc)
        return report_error(a, c, "append", rc);
    size_t elems =
        (size_t)tokens * in.geometry.n_kv_heads * in.geometry.head_dim;
    size_t bytes = elems * kvs_dtype_size(in.geometry.dtype);
    void *k = malloc(bytes ? bytes : 1), *val = malloc(bytes ? bytes : 1);
    if (!k || !val) {
        free(k);
        free(val);
        return report_error(a, c, "append", KVS_ENOMEM);
    }
    uint64_t st = seq * 2654435761u + layer + in.tokens_max;
    fill_random(k, elems, in.geometry.dtype, &st);
    fill_random(val, elems, in.geometry.dtype, &st);
    rc = kvs_client_seq_append(c, seq, (uint32_t)layer, (uint32_t)tokens, k,
                               val, bytes);
    free(k);
    free(val);
    if (rc)
        return report_error(a, c, "append", rc);
    if (a->json)
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"layer\":%" PRIu64
               ",\"tokens\":%" PRIu64 ",\"bytes\":%zu}\n",
               seq, layer, tokens, 2 * bytes);
    else
        printf("appended %" PRIu64 " tokens (%zu bytes) to layer %" PRIu64
               " of %" PRIu64 "\n",
               tokens, 2 * bytes, layer, seq);
    return 0;
}

static int cmd_flush(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t seq, persisted = 0;
    if (argc != 1 || parse_u64(argv[0], &seq))
        return die_usage("usage: flush SEQ%s", "");
    int rc = kvs_client_seq_flush(c, seq, &persisted);
    if (rc)
        return report_error(a, c, "flush", rc);
    if (a->json)
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"persisted_seqno\":%" PRIu64
               "}\n",
               seq, persisted);
    else
        printf("sequence %" PRIu64 " flushed (persisted_seqno %" PRIu64 ")\n",
               seq, persisted);
    return 0;
}

static int cmd_ttl(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    uint64_t seq, ttl;
    if (argc != 2 || parse_u64(argv[0], &seq) || parse_u64(argv[1], &ttl) ||
        ttl > UINT32_MAX)
        return die_usage("usage: ttl SEQ SECONDS%s", "");
    int rc = kvs_client_seq_set_ttl(c, seq, (uint32_t)ttl);
    if (rc)
        return report_error(a, c, "ttl", rc);
    if (a->json)
        printf("{\"ok\":true,\"seq\":%" PRIu64 ",\"ttl_seconds\":%" PRIu64
               "}\n",
               seq, ttl);
    else
        printf("sequence %" PRIu64 " expires after %" PRIu64 " s idle\n", seq,
               ttl);
    return 0;
}

/* ---------------------------------------------------------------- bench */

typedef struct bench_s {
    const char *op;
    uint64_t requests, pipeline, tokens, context, k;
    uint32_t q_heads, kv_heads, head_dim;
    kvs_dtype_t dtype;
    bool no_wait; /* measure while index segments are still being built */
    kvs_query_params_t params; /* zero: the server's defaults */
} bench_t;

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* Fill with small random normals-ish values in the given dtype. */
static void fill_random(void *buf, size_t n, kvs_dtype_t dt, uint64_t *state) {
    for (size_t i = 0; i < n; i++) {
        *state = *state * 6364136223846793005ull + 1442695040888963407ull;
        float f = (float)((int32_t)(*state >> 33) % 2000) / 1000.0f;
        if (dt == KVS_DTYPE_F32) {
            ((float *)buf)[i] = f;
        } else {
            uint32_t bits;
            memcpy(&bits, &f, 4);
            uint16_t h;
            if (dt == KVS_DTYPE_BF16) {
                h = (uint16_t)(bits >> 16);
            } else { /* f16 for |f| < 2, normal range: rebias the exponent */
                uint32_t sign = (bits >> 16) & 0x8000;
                int32_t e = (int32_t)((bits >> 23) & 0xff) - 127 + 15;
                uint32_t m = (bits >> 13) & 0x3ff;
                h = e <= 0 ? (uint16_t)sign
                           : (uint16_t)(sign | ((uint32_t)e << 10) | m);
            }
            ((uint16_t *)buf)[i] = h;
        }
    }
}

typedef struct bench_slot_s {
    int type;
    uint64_t seq;
    const bench_t *b;
    const void *keys, *vals;
    size_t kv_bytes;
    const float *queries;
    size_t qf;
    int64_t *positions;
    float *scores;
    float *outs;
} bench_slot_t;

/* Prepare slot `s` of the pipeline: every slot has its own outputs. */
static void bench_fill(const bench_slot_t *sl, kvs_client_op_t *op, size_t s) {
    const bench_t *b = sl->b;
    size_t per = (size_t)b->q_heads * b->k;
    memset(op, 0, sizeof(*op));
    op->type = (kvs_client_op_type_t)sl->type;
    op->data = (void *)(uintptr_t)s;
    op->seq = sl->seq;
    op->n_tokens = (uint32_t)b->tokens;
    op->keys = sl->keys;
    op->values = sl->vals;
    op->kv_bytes = sl->kv_bytes;
    op->queries = sl->queries;
    op->n_query_floats = sl->qf;
    op->k = (uint32_t)b->k;
    op->positions = sl->positions + s * per;
    op->scores = sl->scores + s * per;
    op->result_cap = per;
    op->output = sl->outs + s * sl->qf;
    op->params = &b->params;
}

static int bench_run(const args_t *a, kvs_client_t *c, const bench_t *b) {
    int type = !strcmp(b->op, "ping")     ? KVS_CLIENT_PING
               : !strcmp(b->op, "append") ? KVS_CLIENT_APPEND
               : !strcmp(b->op, "search") ? KVS_CLIENT_SEARCH
               : !strcmp(b->op, "attend") ? KVS_CLIENT_ATTEND
                                          : -1;
    if (type < 0)
        return die_usage("bench: unknown --op %s", b->op);
    uint64_t seq = 0x6b76637462656e63ull ^ (uint64_t)time(NULL) ^
                   ((uint64_t)clock() << 20);
    size_t es = kvs_dtype_size(b->dtype);
    size_t tok_elems = (size_t)b->kv_heads * b->head_dim;
    void *keys = NULL, *vals = NULL;
    float *queries = NULL, *outs = NULL, *scores = NULL;
    int64_t *positions = NULL;
    kvs_client_op_t *ops = NULL;
    double *lat = NULL;
    int rc = 0;
    uint64_t rng = 42;
    bool created = false;

    if (type != KVS_CLIENT_PING) {
        kvs_geometry_t g = {.n_layers = 1,
                            .n_q_heads = b->q_heads,
                            .n_kv_heads = b->kv_heads,
                            .head_dim = b->head_dim,
                            .dtype = b->dtype};
        if ((rc = kvs_client_seq_create(c, seq, &g)))
            return report_error(a, c, "bench create", rc);
        created = true;
        size_t chunk = type == KVS_CLIENT_APPEND ? b->tokens : 4096;
        keys = malloc(chunk * tok_elems * es);
        vals = malloc(chunk * tok_elems * es);
        if (!keys || !vals) {
            rc = KVS_ENOMEM;
            goto out;
        }
        fill_random(keys, chunk * tok_elems, b->dtype, &rng);
        fill_random(vals, chunk * tok_elems, b->dtype, &rng);
        /* Search/attend need a context to run over. */
        for (uint64_t t = 0; type != KVS_CLIENT_APPEND && t < b->context;
             t += chunk) {
            uint32_t n =
                (uint32_t)(b->context - t < chunk ? b->context - t : chunk);
            rc = kvs_client_seq_append(c, seq, 0, n, keys, vals,
                                       n * tok_elems * es);
            if (rc) {
                report_error(a, c, "bench fill", rc);
                goto out;
            }
        }
        /* Steady state: let background segment builds finish so that the
         * numbers are the index's, not k-means' competing for the CPU. */
        for (int w = 0; type != KVS_CLIENT_APPEND && !b->no_wait && w < 1200;
             w++) {
            kvs_seq_info_t in;
            if (kvs_client_seq_info(c, seq, &in) || in.builds_pending == 0)
                break;
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    size_t qf = (size_t)b->q_heads * b->head_dim;
    size_t P = b->pipeline;
    ops = calloc(P, sizeof(*ops));
    lat = calloc(b->requests, sizeof(double));
    queries = malloc(qf * sizeof(float));
    outs = malloc(P * qf * sizeof(float));
    positions = malloc(P * b->q_heads * b->k * sizeof(int64_t));
    scores = malloc(P * b->q_heads * b->k * sizeof(float));
    if (!ops || !lat || !queries || !outs || !positions || !scores) {
        rc = KVS_ENOMEM;
        goto out;
    }
    fill_random(queries, qf, KVS_DTYPE_F32, &rng);
    double *t_sub = calloc(P, sizeof(double));
    kvs_client_op_t **done = calloc(P, sizeof(*done));
    if (!t_sub || !done) {
        free(t_sub);
        free(done);
        rc = KVS_ENOMEM;
        goto out;
    }
    uint64_t submitted = 0, finished = 0, errors = 0;
    int first_err = 0;
    bench_slot_t sl = {.type = type,
                       .seq = seq,
                       .b = b,
                       .keys = keys,
                       .vals = vals,
                       .kv_bytes = b->tokens * tok_elems * es,
                       .queries = queries,
                       .qf = qf,
                       .positions = positions,
                       .scores = scores,
                       .outs = outs};
    double t0 = now_s();
    /* Keep P ops in flight; each slot is refilled as soon as it completes. */
    for (size_t s = 0; s < P && submitted < b->requests; s++) {
        bench_fill(&sl, &ops[s], s);
        t_sub[s] = now_s();
        if ((rc = kvs_client_submit(c, &ops[s])))
            break;
        submitted++;
    }
    while (!rc && finished < submitted) {
        size_t nd = 0;
        kvs_client_poll(c, done, P, &nd, -1);
        double t = now_s();
        for (size_t d = 0; d < nd; d++) {
            size_t s = (size_t)(uintptr_t)done[d]->data;
            if (done[d]->status && errors++ == 0)
                first_err = done[d]->status;
            lat[finished++] = t - t_sub[s];
            if (submitted >= b->requests)
                continue;
            bench_fill(&sl, &ops[s], s);
            t_sub[s] = now_s();
            if ((rc = kvs_client_submit(c, &ops[s])))
                break;
            submitted++;
        }
    }
    if (rc) {
        report_error(a, c, "bench submit", rc);
        rc = 1;
        /* Ops still in flight point into `ops`: collect them first. */
        size_t nd;
        while (kvs_client_pending(c))
            kvs_client_poll(c, done, P, &nd, -1);
        free(t_sub);
        free(done);
        goto out;
    }
    double secs = now_s() - t0;
    /* Appends: how long the daemon then needs to make them durable (the
     * write-behind of --sync async; ~0 in the synchronous modes). */
    double flush_s = 0;
    if (type == KVS_CLIENT_APPEND) {
        double tf = now_s();
        int frc = kvs_client_seq_flush(c, seq, NULL);
        flush_s = now_s() - tf;
        if (frc && errors++ == 0)
            first_err = frc;
    }
    free(t_sub);
    free(done);
    qsort(lat, finished, sizeof(double), cmp_double);
    double p50 = finished ? lat[finished / 2] : 0;
    double p99 = finished ? lat[(size_t)((double)(finished - 1) * 0.99)] : 0;
    double ops_s = (double)finished / secs;
    double bytes = type == KVS_CLIENT_APPEND
                       ? (double)finished * 2.0 * (double)b->tokens *
                             (double)tok_elems * (double)es
                       : 0;
    double gbps = bytes / secs / 1e9;
    double gbps_flushed = bytes / (secs + flush_s) / 1e9;
    if (a->json) {
        printf("{\"ok\":%s,\"op\":\"%s\",\"requests\":%" PRIu64
               ",\"errors\":%" PRIu64 ",\"pipeline\":%" PRIu64
               ",\"seconds\":%.6f,\"ops_per_s\":%.1f,\"p50_us\":%.2f,"
               "\"p99_us\":%.2f,\"gb_per_s\":%.4f,\"flush_s\":%.6f,"
               "\"gb_per_s_flushed\":%.4f,\"first_error\":\"%s\"}\n",
               errors ? "false" : "true", b->op, finished, errors, b->pipeline,
               secs, ops_s, p50 * 1e6, p99 * 1e6, gbps, flush_s, gbps_flushed,
               first_err ? kvs_err_name(first_err) : "");
    } else {
        printf("%s: %" PRIu64 " requests, pipeline %" PRIu64
               ", %.3f s: %.0f ops/s, p50 %.1f us, p99 %.1f us",
               b->op, finished, b->pipeline, secs, ops_s, p50 * 1e6, p99 * 1e6);
        if (gbps > 0)
            printf(", %.3f GB/s (%.3f GB/s with the %.3f s flush)", gbps,
                   gbps_flushed, flush_s);
        printf("\n");
        if (errors)
            printf("  %" PRIu64 " errors, first %s\n", errors,
                   kvs_err_name(first_err));
    }
    rc = errors ? 1 : 0;
out:
    if (created)
        kvs_client_seq_drop(c, seq);
    free(keys);
    free(vals);
    free(queries);
    free(outs);
    free(positions);
    free(scores);
    free(ops);
    free(lat);
    if (rc < 0)
        return report_error(a, c, "bench", rc);
    return rc;
}

static int cmd_bench(const args_t *a, kvs_client_t *c, int argc, char **argv) {
    bench_t b = {.op = "ping",
                 .requests = 100000,
                 .pipeline = 64,
                 .tokens = 256,
                 .context = 32768,
                 .k = 100,
                 .q_heads = 32,
                 .kv_heads = 8,
                 .head_dim = 128,
                 .dtype = KVS_DTYPE_F16};
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i];
        if (i + 1 >= argc)
            return die_usage("%s needs a value", o);
        const char *v = argv[++i];
        uint64_t n = 0;
        if (!strcmp(o, "--op")) {
            b.op = v;
            continue;
        }
        if (!strcmp(o, "--rank")) {
            if (!strcmp(v, "codes"))
                b.params.rank = KVS_RANK_CODES;
            else if (!strcmp(v, "centroid"))
                b.params.rank = KVS_RANK_CENTROID;
            else
                return die_usage("bad --rank %s", v);
            continue;
        }
        if (!strcmp(o, "--wait-indexed")) {
            b.no_wait = strcmp(v, "no") == 0;
            continue;
        }
        if (!strcmp(o, "--dtype")) {
            if (parse_dtype(v, &b.dtype))
                return die_usage("bad dtype %s", v);
            continue;
        }
        if (parse_u64(v, &n) || n == 0 || n > UINT32_MAX)
            return die_usage("bad number %s", v);
        if (!strcmp(o, "--requests"))
            b.requests = n;
        else if (!strcmp(o, "--pipeline"))
            b.pipeline = n;
        else if (!strcmp(o, "--tokens"))
            b.tokens = n;
        else if (!strcmp(o, "--context"))
            b.context = n;
        else if (!strcmp(o, "--k"))
            b.k = n;
        else if (!strcmp(o, "--q-heads"))
            b.q_heads = (uint32_t)n;
        else if (!strcmp(o, "--kv-heads"))
            b.kv_heads = (uint32_t)n;
        else if (!strcmp(o, "--head-dim"))
            b.head_dim = (uint32_t)n;
        else
            return die_usage("bench: unknown option %s", o);
    }
    if (b.pipeline > b.requests)
        b.pipeline = b.requests;
    return bench_run(a, c, &b);
}

int main(int argc, char **argv) {
    args_t a = {.timeout_ms = 30000};
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(o, "--json")) {
            a.json = true;
            continue;
        }
        if (i + 1 >= argc)
            return die_usage("%s needs a value", o);
        const char *v = argv[++i];
        uint64_t n;
        if (!strcmp(o, "--addr")) {
            if (a.n_addrs >= 256)
                return die_usage("too many addresses%s", "");
            a.addrs[a.n_addrs++] = v;
        } else if (!strcmp(o, "--token")) {
            a.token = v;
        } else if (!strcmp(o, "--timeout")) {
            if (parse_u64(v, &n) || n > UINT32_MAX)
                return die_usage("bad --timeout %s", v);
            a.timeout_ms = (uint32_t)n;
        } else if (!strcmp(o, "--replicas")) {
            if (parse_u64(v, &n) || n < 1 || n > 8)
                return die_usage("bad --replicas %s (1..8)", v);
            a.replicas = (uint32_t)n;
        } else {
            return die_usage("unknown option %s", o);
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    if (!a.n_addrs)
        a.addrs[a.n_addrs++] =
            getenv("KVS_ADDR") ? getenv("KVS_ADDR") : "127.0.0.1:7700";
    if (!a.token)
        a.token = getenv("KVS_AUTH_TOKEN");
    const char *cmd = argv[i++];
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = a.addrs;
    o.n_addrs = a.n_addrs;
    o.auth_token = a.token;
    o.client_name = "kvctl";
    /* --timeout 0 has always meant "no timeout"; in the options 0 is the
     * default. */
    o.request_timeout_ms =
        a.timeout_ms ? a.timeout_ms : KVS_CLIENT_TIMEOUT_NONE;
    o.replicas = a.replicas;
    kvs_client_t *c;
    int rc = kvs_client_open(&o, &c);
    if (rc == KVS_EINVAL) {
        fprintf(stderr, "kvctl: bad address list (%s)\n", kvs_strerror(rc));
        return 2;
    }
    if (rc) { /* etcd:// that could not be read */
        fprintf(stderr, "kvctl: cannot read the node list from %s: %s (%s)\n",
                a.addrs[0], kvs_strerror(rc), kvs_err_name(rc));
        return 1;
    }
    int sub_argc = argc - i;
    char **sub_argv = argv + i;
    if (!strcmp(cmd, "ping"))
        rc = cmd_ping(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "stats"))
        rc = sub_argc ? die_usage("stats takes no arguments%s", "")
                      : cmd_stats(&a, c);
    else if (!strcmp(cmd, "nodes"))
        rc = cmd_nodes(&a, c);
    else if (!strcmp(cmd, "list"))
        rc = cmd_list(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "create"))
        rc = cmd_create(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "drop") || !strcmp(cmd, "fork") ||
             !strcmp(cmd, "info") || !strcmp(cmd, "dump") ||
             !strcmp(cmd, "locate"))
        rc = cmd_seq_simple(&a, c, cmd, sub_argc, sub_argv);
    else if (!strcmp(cmd, "append"))
        rc = cmd_append(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "ttl"))
        rc = cmd_ttl(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "flush"))
        rc = cmd_flush(&a, c, sub_argc, sub_argv);
    else if (!strcmp(cmd, "bench"))
        rc = cmd_bench(&a, c, sub_argc, sub_argv);
    else
        rc = die_usage("unknown command %s", cmd);
    kvs_client_close(c);
    return rc;
}
