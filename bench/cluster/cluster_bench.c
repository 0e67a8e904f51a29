/*
 * cluster_bench.c: the `cluster` benchmark (issue #16), driven by
 * bench/cluster/run.sh. A real etcd and real kvstored daemons on loopback,
 * spawned with the helpers of tests/cluster (cluster.c, compiled in here so
 * that the bench and the tests start processes one way), loaded through
 * libkvsclient with etcd:// addresses. Prints one JSON object per line (the
 * rows); run.sh derives the headline metrics from them.
 *
 *   throughput  1, 2, 3 nodes at R = 1 and R = 2: aggregate append GB/s,
 *               search and attend calls/s from T client threads (one
 *               connection per node each), with every daemon's CPU seconds
 *               (/proc/PID/stat) and the bench's own, because client and
 *               daemons share the machine's cores;
 *   failover    3 nodes, R = 2: a reader attends one sequence in a loop and
 *               a writer appends to all of them; the node serving the reader
 *               is SIGKILLed; how long until a read succeeds again, the
 *               longest pause between successful reads, how long until
 *               repair holds every sequence on two live nodes again, and
 *               acknowledged tokens missing from any holder once settled;
 *   repair      one loaded node at R = 2, a second joins: the bytes repair
 *               pushed over the time from the join until the newcomer holds
 *               every sequence, unthrottled and at the default
 *               --repair-rate-bytes;
 *   join        120 small sequences on 3 nodes, a 4th joins (R = 1 and 2):
 *               the fraction whose holders changed once repair settled.
 *
 * Daemons run as tests/cluster starts them: one worker, one engine thread
 * and one build thread each, a 2 s lease.
 */
#include "cluster.h"
#include "kvs_client.h"
#include "kvs_common.h"
#include "kvs_etcd.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define TTL 2
#define MAX_NODES 4
#define MAX_THREADS 16

/* The service bench's shape: one layer of a Llama-3-8B-like model, bf16:
 * 4096 bytes of K+V per token. */
#define Q_HEADS 32
#define KV_HEADS 8
#define HEAD_DIM 128
#define TOKEN_BYTES (2u * KV_HEADS * HEAD_DIM * 2u)
#define CHUNK 512 /* tokens per append */
#define TOP_K 100

typedef struct cfg_s {
    bool quick;
    int threads;           /* client threads of the throughput phase */
    int seqs_per_thread;   /* sequences each of them owns */
    uint32_t ctx;          /* tokens appended to each */
    double op_s;           /* seconds of search, then of attend */
    int failover_rounds;   /* kill -9 rounds */
    int failover_seqs;     /* sequences held while nodes die */
    uint32_t failover_ctx; /* their tokens at the start */
    int repair_seqs;       /* sequences copied to a node that joins */
    uint32_t repair_ctx;
    int join_seqs; /* small sequences spread before a node joins */
} cfg_t;

static tc_etcd_t etcd;
static const kvs_geometry_t geo = {.n_layers = 1,
                                   .n_q_heads = Q_HEADS,
                                   .n_kv_heads = KV_HEADS,
                                   .head_dim = HEAD_DIM,
                                   .dtype = KVS_DTYPE_BF16};
/* Shared read-only inputs: CHUNK tokens of keys (values are the same
 * bytes) and one decode step's queries. */
static uint16_t *kv_chunk;
static float queries[Q_HEADS * HEAD_DIM];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fill_inputs(void) {
    uint64_t s = 42;
    size_t n = (size_t)CHUNK * KV_HEADS * HEAD_DIM;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        float f = (float)((int32_t)(s >> 33) % 2000) / 1000.0f;
        uint32_t bits;
        memcpy(&bits, &f, 4);
        kv_chunk[i] = (uint16_t)(bits >> 16); /* bf16: the top half */
    }
    for (size_t i = 0; i < Q_HEADS * HEAD_DIM; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        queries[i] = (float)((int32_t)(s >> 33) % 2000) / 1000.0f;
    }
}

/* User + system CPU seconds of a process so far (fields 14 and 15 of
 * /proc/PID/stat, after the parenthesised command name); -1 if gone. */
static double proc_cpu_s(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    /* state ppid pgrp session tty tpgid flags minflt cminflt majflt
     * cmajflt utime stime */
    if (!p ||
        sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
               &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* The machine's 1-minute load average: it is shared, so every row says
 * how busy it was. */
static double loadavg(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f && fscanf(f, "%lf", &l) != 1)
        l = -1;
    if (f)
        fclose(f);
    return l;
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* ------------------------------------------------------------- cluster */

typedef struct cl_s {
    tc_node_t node[MAX_NODES];
    int n;
    char prefix[64];
    char members[64]; /* "n1,n2,..." as tc_members lists them */
    const char *const *flags;
} cl_t;

static void node_addr(const tc_node_t *n, char *out, size_t cap) {
    snprintf(out, cap, "127.0.0.1:%d", n->port);
}

static int cl_add(cl_t *cl) {
    if (cl->n >= MAX_NODES)
        return -EINVAL;
    char id[16];
    snprintf(id, sizeof(id), "n%d", cl->n + 1);
    int rc =
        tc_node_start(&cl->node[cl->n], &etcd, cl->prefix, id, TTL, cl->flags);
    if (rc)
        return rc;
    cl->n++;
    size_t o = strlen(cl->members);
    snprintf(cl->members + o, sizeof(cl->members) - o, "%s%s", o ? "," : "",
             id);
    /* Registered: the clients' and the other daemons' view includes it. */
    return tc_wait_members(&etcd, cl->prefix, cl->members, 10000) < 0
               ? -ETIMEDOUT
               : 0;
}

static int cl_start(cl_t *cl, const char *prefix, int n,
                    const char *const *flags) {
    memset(cl, 0, sizeof(*cl));
    snprintf(cl->prefix, sizeof(cl->prefix), "%s", prefix);
    cl->flags = flags;
    for (int i = 0; i < n; i++) {
        int rc = cl_add(cl);
        if (rc)
            return rc;
    }
    return 0;
}

static void cl_stop(cl_t *cl) {
    for (int i = 0; i < cl->n; i++)
        tc_node_cleanup(&cl->node[i]);
    cl->n = 0;
}

static kvs_client_t *open_cluster_client(const cl_t *cl, uint32_t replicas) {
    char a[128];
    snprintf(a, sizeof(a), "etcd://127.0.0.1:%d%s", etcd.port, cl->prefix);
    return tc_client_open(a, replicas, 60000);
}

/* Sorted, comma-joined addresses of the nodes holding seq (kvs_client_seq
 * _locate: nodes that cannot be reached are passed over); the count, or -1
 * when the cluster cannot be asked. */
static int holders(kvs_client_t *c, uint64_t seq, char *out, size_t cap) {
    size_t idx[8], n = 0;
    int rc = kvs_client_seq_locate(c, seq, idx, 8, &n, NULL);
    out[0] = 0;
    if (rc)
        return rc == KVS_ENOSEQ ? 0 : -1;
    const char *a[8];
    for (size_t i = 0; i < n; i++)
        a[i] = kvs_client_node_addr(c, idx[i]);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            if (strcmp(a[j], a[i]) < 0) {
                const char *t = a[i];
                a[i] = a[j];
                a[j] = t;
            }
    for (size_t i = 0; i < n; i++)
        snprintf(out + strlen(out), cap - strlen(out), "%s%s", i ? "," : "",
                 a[i]);
    return (int)n;
}

/* The top r of seq's rendezvous order over the cluster's live nodes,
 * sorted and comma-joined: where repair must put it (the daemons' and
 * clients' own function). `skip` (or -1) is a node that is down. */
static void top_r(const cl_t *cl, int skip, uint64_t seq, int r, char *out,
                  size_t cap) {
    char addr[MAX_NODES][64];
    uint64_t w[MAX_NODES];
    int ord[MAX_NODES], n = 0;
    for (int i = 0; i < cl->n; i++) {
        if (i == skip || cl->node[i].pid <= 0)
            continue;
        node_addr(&cl->node[i], addr[n], sizeof(addr[n]));
        w[n] = kvs_rendezvous_weight(seq, kvs_rendezvous_node_hash(addr[n]));
        ord[n] = n;
        n++;
    }
    for (int i = 0; i < n; i++) /* by weight, highest first */
        for (int j = i + 1; j < n; j++)
            if (w[ord[j]] > w[ord[i]]) {
                int t = ord[i];
                ord[i] = ord[j];
                ord[j] = t;
            }
    if (r > n)
        r = n;
    const char *a[MAX_NODES];
    for (int i = 0; i < r; i++)
        a[i] = addr[ord[i]];
    for (int i = 0; i < r; i++)
        for (int j = i + 1; j < r; j++)
            if (strcmp(a[j], a[i]) < 0) {
                const char *t = a[i];
                a[i] = a[j];
                a[j] = t;
            }
    out[0] = 0;
    for (int i = 0; i < r; i++)
        snprintf(out + strlen(out), cap - strlen(out), "%s%s", i ? "," : "",
                 a[i]);
}

/* Polls until every sequence in [first, first + n) is held by exactly its
 * top r over the live nodes; the seconds it took, -1 after timeout_s. */
static double wait_settled(kvs_client_t *c, const cl_t *cl, uint64_t first,
                           int n, int r, double timeout_s) {
    double t0 = now_s();
    while (now_s() - t0 < timeout_s) {
        bool ok = true;
        for (int i = 0; i < n && ok; i++) {
            char got[256], want[256];
            top_r(cl, -1, first + (uint64_t)i, r, want, sizeof(want));
            ok = holders(c, first + (uint64_t)i, got, sizeof(got)) == r &&
                 !strcmp(got, want);
        }
        if (ok)
            return now_s() - t0;
        /* A poll asks nodes about every sequence (an info walks its
         * layers): often enough for the resolution wanted, rarely enough
         * not to load the daemons it measures. */
        tc_sleep_ms(50);
    }
    return -1;
}

/* Polls until no sequence in [first, first + n) has segment builds queued,
 * so that a measurement is not k-means competing for the cores. */
static int wait_built(kvs_client_t *c, uint64_t first, int n,
                      double timeout_s) {
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        kvs_seq_info_t in;
        for (;;) {
            int rc = kvs_client_seq_info(c, first + (uint64_t)i, &in);
            if (rc)
                return rc;
            if (in.builds_pending == 0)
                break;
            if (now_s() - t0 > timeout_s)
                return -ETIMEDOUT;
            tc_sleep_ms(50);
        }
    }
    return 0;
}

static int fill_seq(kvs_client_t *c, uint64_t seq, uint32_t tokens) {
    int rc = kvs_client_seq_create(c, seq, &geo);
    for (uint32_t t = 0; !rc && t < tokens; t += CHUNK) {
        uint32_t n = tokens - t < CHUNK ? tokens - t : CHUNK;
        rc = kvs_client_seq_append(c, seq, 0, n, kv_chunk, kv_chunk,
                                   (size_t)n * TOKEN_BYTES / 2);
    }
    return rc;
}

static void json_cpu(const char *key, const double *v, int n) {
    printf(",\"%s\":[", key);
    for (int i = 0; i < n; i++)
        printf("%s%.3f", i ? "," : "", v[i]);
    printf("]");
}

/* ---------------------------------------------------------- throughput */

typedef struct tp_s {
    const cfg_t *cfg;
    const cl_t *cl;
    uint32_t replicas;
    int node_threads; /* workers, engine and build threads per daemon */
    uint64_t first_seq;
    pthread_barrier_t bar;
    atomic_bool failed;
} tp_t;

typedef struct tp_thread_s {
    tp_t *tp;
    int id;
    pthread_t th;
    uint64_t appends, searches, attends, errors;
    int first_err;
} tp_thread_t;

static void tp_err(tp_thread_t *t, int rc) {
    if (t->errors++ == 0)
        t->first_err = rc;
}

/* One client thread: creates its sequences, then appends, searches and
 * attends between the barriers that the main thread times. */
static void *tp_main(void *arg) {
    tp_thread_t *t = arg;
    tp_t *tp = t->tp;
    const cfg_t *cfg = tp->cfg;
    int S = cfg->seqs_per_thread;
    uint64_t first = tp->first_seq + (uint64_t)t->id * (uint64_t)S;
    kvs_client_t *c = open_cluster_client(tp->cl, tp->replicas);
    int64_t *pos = malloc(sizeof(int64_t) * Q_HEADS * TOP_K);
    float *sc = malloc(sizeof(float) * Q_HEADS * TOP_K);
    float *out = malloc(sizeof(float) * Q_HEADS * HEAD_DIM);
    if (!c || !pos || !sc || !out)
        atomic_store(&tp->failed, true);
    for (int i = 0; c && i < S; i++) {
        int rc = kvs_client_seq_create(c, first + (uint64_t)i, &geo);
        if (rc)
            tp_err(t, rc);
    }
    pthread_barrier_wait(&tp->bar); /* 1: append starts */
    /* Round robin over the sequences, CHUNK tokens at a time, so that
     * every node has work from the start. */
    for (uint32_t done = 0; c && done < cfg->ctx; done += CHUNK)
        for (int i = 0; i < S; i++) {
            int rc = kvs_client_seq_append(c, first + (uint64_t)i, 0, CHUNK,
                                           kv_chunk, kv_chunk,
                                           (size_t)CHUNK * TOKEN_BYTES / 2);
            if (rc)
                tp_err(t, rc);
            else
                t->appends++;
        }
    pthread_barrier_wait(&tp->bar); /* 2: append done */
    if (c) {
        int rc = wait_built(c, first, S, 300);
        if (rc)
            tp_err(t, rc);
    }
    pthread_barrier_wait(&tp->bar); /* 3: search starts */
    double t0 = now_s();
    for (int i = 0; c && now_s() - t0 < cfg->op_s; i = (i + 1) % S) {
        int rc = kvs_client_seq_search(c, first + (uint64_t)i, 0, queries,
                                       Q_HEADS * HEAD_DIM, TOP_K, NULL, pos, sc,
                                       (size_t)Q_HEADS * TOP_K);
        if (rc)
            tp_err(t, rc);
        else
            t->searches++;
    }
    pthread_barrier_wait(&tp->bar); /* 4: attend starts */
    t0 = now_s();
    for (int i = 0; c && now_s() - t0 < cfg->op_s; i = (i + 1) % S) {
        int rc = kvs_client_seq_attend(c, first + (uint64_t)i, 0, queries,
                                       Q_HEADS * HEAD_DIM, NULL, out, NULL);
        if (rc)
            tp_err(t, rc);
        else
            t->attends++;
    }
    pthread_barrier_wait(&tp->bar); /* 5: done */
    kvs_client_close(c);
    free(pos);
    free(sc);
    free(out);
    return NULL;
}

typedef struct tp_mark_s {
    double t, self, load;
    double node[MAX_NODES];
} tp_mark_t;

static void tp_mark(const cl_t *cl, tp_mark_t *m) {
    m->t = now_s();
    m->self = self_cpu_s();
    m->load = loadavg();
    for (int i = 0; i < cl->n; i++)
        m->node[i] = proc_cpu_s(cl->node[i].pid);
}

static void tp_row(const cfg_t *cfg, const cl_t *cl, uint32_t r,
                   int node_threads, const char *op, const tp_mark_t *a,
                   const tp_mark_t *b, uint64_t ops, uint64_t errors,
                   int first_err) {
    double secs = b->t - a->t, node[MAX_NODES], sum = 0;
    for (int i = 0; i < cl->n; i++) {
        node[i] = b->node[i] - a->node[i];
        sum += node[i];
    }
    double self = b->self - a->self;
    printf("{\"phase\":\"throughput\",\"op\":\"%s\",\"nodes\":%d,"
           "\"replicas\":%u,\"node_threads\":%d,\"client_threads\":%d,"
           "\"sequences\":%d,\"seconds\":%.3f,\"calls\":%" PRIu64
           ",\"calls_per_s\":%.1f,\"loadavg\":%.2f",
           op, cl->n, r, node_threads, cfg->threads,
           cfg->threads * cfg->seqs_per_thread, secs, ops, (double)ops / secs,
           a->load);
    if (!strcmp(op, "append")) {
        double bytes = (double)ops * CHUNK * TOKEN_BYTES;
        printf(",\"tokens_per_call\":%d,\"gb_per_s\":%.4f,"
               "\"stored_gb_per_s\":%.4f",
               CHUNK, bytes / secs / 1e9, bytes * r / secs / 1e9);
    } else {
        printf(",\"context\":%u", cfg->ctx);
        if (!strcmp(op, "search"))
            printf(",\"k\":%d", TOP_K);
    }
    json_cpu("node_cpu_s", node, cl->n);
    /* Busy cores over the phase: daemons plus this client process, which
     * shares the same cores (etcd is idle here). */
    printf(",\"client_cpu_s\":%.3f,\"cores_busy\":%.2f,\"cores\":%ld,"
           "\"errors\":%" PRIu64 ",\"first_error\":\"%s\"}\n",
           self, (sum + self) / secs, sysconf(_SC_NPROCESSORS_ONLN), errors,
           first_err ? kvs_err_name(first_err) : "");
    fflush(stdout);
}

/* node_threads 1: the daemons as tests/cluster starts them; 2: one
 * daemon given both cores (--workers, --engine-threads, --build-threads),
 * the baseline the cluster shapes are compared with. */
static int bench_throughput(const cfg_t *cfg, int nodes, uint32_t r,
                            int node_threads) {
    static const char *const two[] = {
        "--workers", "2", "--engine-threads", "2", "--build-threads",
        "2",         NULL};
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "/bench-tp-%d-%u-%d", nodes, r,
             node_threads);
    cl_t cl;
    tp_t tp = {.cfg = cfg,
               .cl = &cl,
               .replicas = r,
               .node_threads = node_threads,
               .first_seq = 1000000u * (uint64_t)(nodes * 100 + (int)r * 10 +
                                                  node_threads)};
    tp_thread_t th[MAX_THREADS];
    int T = cfg->threads, started = 0,
        rc = cl_start(&cl, prefix, nodes, node_threads > 1 ? two : NULL);
    if (rc) {
        fprintf(stderr, "cluster_bench: %d nodes did not start (%d)\n", nodes,
                rc);
        goto out;
    }
    pthread_barrier_init(&tp.bar, NULL, (unsigned)T + 1);
    memset(th, 0, sizeof(th));
    for (int i = 0; i < T; i++) {
        th[i].tp = &tp;
        th[i].id = i;
        if (pthread_create(&th[i].th, NULL, tp_main, &th[i]))
            abort(); /* the barrier would wait forever */
        started++;
    }
    tp_mark_t m[5];
    for (int b = 0; b < 5; b++) {
        pthread_barrier_wait(&tp.bar);
        tp_mark(&cl, &m[b]);
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i].th, NULL);
    pthread_barrier_destroy(&tp.bar);
    uint64_t ap = 0, se = 0, at = 0, er = 0;
    int fe = 0;
    for (int i = 0; i < T; i++) {
        ap += th[i].appends;
        se += th[i].searches;
        at += th[i].attends;
        er += th[i].errors;
        if (!fe)
            fe = th[i].first_err;
    }
    if (atomic_load(&tp.failed)) {
        rc = -EIO;
        goto out;
    }
    /* Errors are per phase only in total: any error makes the run fail. */
    tp_row(cfg, &cl, r, node_threads, "append", &m[0], &m[1], ap, er, fe);
    tp_row(cfg, &cl, r, node_threads, "search", &m[2], &m[3], se, er, fe);
    tp_row(cfg, &cl, r, node_threads, "attend", &m[3], &m[4], at, er, fe);
    fprintf(stderr,
            "cluster_bench: throughput %d nodes R=%u (%d threads each): "
            "%.3f GB/s append, %.0f search/s, %.0f attend/s\n",
            nodes, r, node_threads,
            (double)ap * CHUNK * TOKEN_BYTES / (m[1].t - m[0].t) / 1e9,
            (double)se / (m[3].t - m[2].t), (double)at / (m[4].t - m[3].t));
    rc = er ? -EIO : 0;
out:
    cl_stop(&cl);
    return rc;
}

/* ------------------------------------------------------------ failover */

typedef struct fo_read_s {
    double t0, t1;
    int rc;
} fo_read_t;

typedef struct fo_s {
    const cl_t *cl;
    uint64_t first, seq; /* the sequences; the one read */
    int n_seqs;
    atomic_bool stop;
    /* reader */
    fo_read_t *reads;
    size_t n_reads, cap_reads;
    /* writer */
    uint64_t *acked; /* tokens acknowledged per sequence */
    uint64_t degraded, write_errors;
    int write_first_err;
} fo_t;

static void *fo_reader(void *arg) {
    fo_t *f = arg;
    kvs_client_t *c = open_cluster_client(f->cl, 2);
    float *out = malloc(sizeof(float) * Q_HEADS * HEAD_DIM);
    while (c && out && !atomic_load(&f->stop) && f->n_reads < f->cap_reads) {
        fo_read_t *r = &f->reads[f->n_reads];
        r->t0 = now_s();
        r->rc = kvs_client_seq_attend(c, f->seq, 0, queries, Q_HEADS * HEAD_DIM,
                                      NULL, out, NULL);
        r->t1 = now_s();
        f->n_reads++;
    }
    kvs_client_close(c);
    free(out);
    return NULL;
}

/* Appends 16 tokens to every sequence in turn; what is acknowledged (by
 * at least one replica) is counted per sequence. */
static void *fo_writer(void *arg) {
    fo_t *f = arg;
    kvs_client_t *c = open_cluster_client(f->cl, 2);
    const uint32_t n = 16;
    for (int i = 0; c && !atomic_load(&f->stop); i = (i + 1) % f->n_seqs) {
        int rc =
            kvs_client_seq_append(c, f->first + (uint64_t)i, 0, n, kv_chunk,
                                  kv_chunk, (size_t)n * TOKEN_BYTES / 2);
        if (rc) {
            if (f->write_errors++ == 0)
                f->write_first_err = rc;
            continue;
        }
        f->acked[i] += n;
        uint32_t acked = 0, wanted = 0;
        kvs_client_last_write_acks(c, &acked, &wanted);
        if (acked < wanted)
            f->degraded++;
        tc_sleep_ms(2); /* a steady trickle, not a saturating load */
    }
    kvs_client_close(c);
    return NULL;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* Tokens of seq on the node at addr alone (-1: it has none). */
static long tokens_on(const tc_node_t *n, uint64_t seq) {
    char a[64];
    node_addr(n, a, sizeof(a));
    kvs_client_t *c = tc_client_open(a, 1, 60000);
    kvs_seq_info_t in;
    long t =
        c && kvs_client_seq_info(c, seq, &in) == 0 ? (long)in.tokens_max : -1;
    kvs_client_close(c);
    return t;
}

static int bench_failover(const cfg_t *cfg) {
    static const char *const flags[] = {"--replicas", "2",
                                        "--repair-interval-ms", "200", NULL};
    const int M = cfg->failover_seqs;
    const uint64_t first = 7000000;
    fo_t f = {.first = first, .n_seqs = M, .cap_reads = 2000000};
    cl_t cl;
    kvs_client_t *c = NULL;
    int rc = cl_start(&cl, "/bench-failover", 3, flags);
    f.cl = &cl;
    f.reads = malloc(sizeof(*f.reads) * f.cap_reads);
    f.acked = calloc((size_t)M, sizeof(*f.acked));
    if (rc || !f.reads || !f.acked || !(c = open_cluster_client(&cl, 2))) {
        fprintf(stderr, "cluster_bench: failover setup failed (%d)\n", rc);
        rc = rc ? rc : -ENOMEM;
        goto out;
    }
    for (int i = 0; i < M; i++) {
        if ((rc = fill_seq(c, first + (uint64_t)i, cfg->failover_ctx)))
            goto out;
        f.acked[i] = cfg->failover_ctx;
    }
    for (int round = 0; round < cfg->failover_rounds; round++) {
        /* The sequence read this round, and the node serving its reads:
         * the first holder on its search path. */
        f.seq = first + (uint64_t)(round % M);
        size_t idx[8], nh = 0;
        if ((rc = kvs_client_seq_locate(c, f.seq, idx, 8, &nh, NULL)))
            goto out;
        const char *serving = kvs_client_node_addr(c, idx[0]);
        int victim = -1;
        for (int i = 0; i < cl.n; i++) {
            char a[64];
            node_addr(&cl.node[i], a, sizeof(a));
            if (!strcmp(a, serving))
                victim = i;
        }
        if (victim < 0) {
            rc = -ENOENT;
            goto out;
        }
        f.n_reads = 0;
        atomic_store(&f.stop, false);
        pthread_t rd, wr;
        pthread_create(&rd, NULL, fo_reader, &f);
        pthread_create(&wr, NULL, fo_writer, &f);
        tc_sleep_ms(500); /* reads and writes under way */
        double t_kill = now_s();
        tc_node_kill(&cl.node[victim]);
        /* R = 2 again: every sequence on two live nodes (the lease must
         * lapse first, then repair copies). */
        double restored = -1;
        while (now_s() - t_kill < 60) {
            bool ok = true;
            for (int i = 0; i < M && ok; i++) {
                char got[256];
                ok = holders(c, first + (uint64_t)i, got, sizeof(got)) >= 2;
            }
            if (ok) {
                restored = now_s() - t_kill;
                break;
            }
            tc_sleep_ms(50); /* as in wait_settled */
        }
        atomic_store(&f.stop, true);
        pthread_join(rd, NULL);
        pthread_join(wr, NULL);
        /* Reads: the first success among those started after the kill, the
         * longest pause between successful completions from just before the
         * kill on, and the failures. */
        double first_ok = -1, gap = 0, gap_at = 0, last_ok = -1, worst = 0,
               worst_at = 0, inflight = -1, median_before = 0,
               median_window = 0;
        uint64_t failed = 0, after = 0, before = 0, in_window = 0;
        double *lat = malloc(sizeof(double) * (f.n_reads + 1));
        double *wlat = malloc(sizeof(double) * (f.n_reads + 1));
        for (size_t i = 0; i < f.n_reads; i++) {
            const fo_read_t *r = &f.reads[i];
            if (r->t1 < t_kill) {
                if (!r->rc)
                    last_ok = r->t1;
                if (lat)
                    lat[before] = r->t1 - r->t0;
                before++;
                continue;
            }
            after++;
            /* Started while the dead node is still listed (its lease not
             * yet lapsed): what each read costs until etcd drops it. */
            if (r->t0 >= t_kill && r->t0 < t_kill + TTL - 0.2 && wlat)
                wlat[in_window++] = r->t1 - r->t0;
            if (r->t0 < t_kill) /* in flight when the node died */
                inflight = r->rc ? -(r->t1 - r->t0) : r->t1 - r->t0;
            if (r->t1 - r->t0 > worst) {
                worst = r->t1 - r->t0;
                worst_at = r->t1 - t_kill;
            }
            if (r->rc) {
                failed++;
                continue;
            }
            if (first_ok < 0 && r->t0 >= t_kill)
                first_ok = r->t1 - t_kill;
            if (last_ok >= 0 && r->t1 - last_ok > gap) {
                gap = r->t1 - last_ok;
                gap_at = r->t1 - t_kill;
            }
            last_ok = r->t1;
        }
        if (lat && before) {
            qsort(lat, before, sizeof(double), cmp_double);
            median_before = lat[before / 2];
        }
        if (wlat && in_window) {
            qsort(wlat, in_window, sizeof(double), cmp_double);
            median_window = wlat[in_window / 2];
        }
        free(lat);
        free(wlat);
        /* Acknowledged tokens missing from a holder, once the copies made
         * while the writer ran have caught up (bounded wait). */
        double t_settle = now_s();
        uint64_t lost = 0;
        for (;;) {
            lost = 0;
            for (int i = 0; i < M; i++)
                for (int k = 0; k < cl.n; k++) {
                    if (k == victim)
                        continue;
                    char want[256], a[64];
                    top_r(&cl, victim, first + (uint64_t)i, 2, want,
                          sizeof(want));
                    node_addr(&cl.node[k], a, sizeof(a));
                    if (!strstr(want, a))
                        continue;
                    long t = tokens_on(&cl.node[k], first + (uint64_t)i);
                    if (t < (long)f.acked[i])
                        lost += f.acked[i] - (uint64_t)(t < 0 ? 0 : t);
                }
            if (!lost || now_s() - t_settle > 15)
                break;
            tc_sleep_ms(100);
        }
        double settle = now_s() - t_settle;
        uint64_t acked = 0;
        for (int i = 0; i < M; i++)
            acked += f.acked[i];
        printf("{\"phase\":\"failover\",\"round\":%d,\"loadavg\":%.2f,"
               "\"nodes\":3,"
               "\"replicas\":2,\"lease_ttl_s\":%d,\"repair_interval_ms\":200,"
               "\"sequences\":%d,\"killed\":\"%s\",\"failover_ms\":%.3f,"
               "\"read_ms_before_kill\":%.3f,\"inflight_read_ms\":%.3f,"
               "\"read_ms_until_lease_lapse\":%.3f,"
               "\"reads_until_lease_lapse\":%" PRIu64 ","
               "\"max_gap_ms\":%.3f,\"max_gap_end_ms\":%.1f,"
               "\"worst_read_ms\":%.3f,\"worst_read_end_ms\":%.1f,"
               "\"reads_after_kill\":%" PRIu64 ",\"failed_reads\":%" PRIu64
               ",\"restore_r2_ms\":%.1f,\"acked_tokens\":%" PRIu64
               ",\"lost_acknowledged\":%" PRIu64 ",\"catch_up_ms\":%.1f,"
               "\"degraded_writes\":%" PRIu64 ",\"write_errors\":%" PRIu64
               ",\"first_write_error\":\"%s\"}\n",
               round, loadavg(), TTL, M, cl.node[victim].node_id,
               first_ok < 0 ? -1 : first_ok * 1e3, median_before * 1e3,
               inflight * 1e3, median_window * 1e3, in_window, gap * 1e3,
               gap_at * 1e3, worst * 1e3, worst_at * 1e3, after, failed,
               restored < 0 ? -1 : restored * 1e3, acked, lost, settle * 1e3,
               f.degraded, f.write_errors,
               f.write_first_err ? kvs_err_name(f.write_first_err) : "");
        fflush(stdout);
        fprintf(stderr,
                "cluster_bench: failover round %d: reads back after %.2f ms "
                "(max gap %.2f ms, %" PRIu64 " failed), R=2 after %.0f ms, "
                "%" PRIu64 " lost\n",
                round, first_ok * 1e3, gap * 1e3, failed, restored * 1e3, lost);
        if (restored < 0 || first_ok < 0) {
            rc = -ETIMEDOUT;
            goto out;
        }
        /* The node comes back on its data (a new port, so a new rank) and
         * repair settles before the next round kills again. */
        if ((rc = tc_node_restart(&cl.node[victim], &etcd, cl.prefix, TTL,
                                  flags)))
            goto out;
        if (tc_wait_members(&etcd, cl.prefix, cl.members, 10000) < 0 ||
            wait_settled(c, &cl, first, M, 2, 60) < 0) {
            rc = -ETIMEDOUT;
            goto out;
        }
        f.degraded = f.write_errors = 0;
        f.write_first_err = 0;
    }
out:
    kvs_client_close(c);
    cl_stop(&cl);
    free(f.reads);
    free(f.acked);
    return rc;
}

/* -------------------------------------------------------------- repair */

/* Sum of bytes= and ms= over the repair_pushed lines of a daemon's log
 * that finished with status=ok. */
static void pushed_from_log(const tc_node_t *n, double *bytes, double *ms,
                            int *pushes) {
    FILE *f = fopen(n->log, "r");
    char line[2048];
    while (f && fgets(line, sizeof(line), f)) {
        if (!strstr(line, "event=repair_pushed") || !strstr(line, "status=ok"))
            continue;
        const char *b = strstr(line, " bytes="), *m = strstr(line, " ms=");
        if (!b || !m)
            continue;
        *bytes += atof(b + 7);
        *ms += atof(m + 4);
        (*pushes)++;
    }
    if (f)
        fclose(f);
}

/* One node holds S sequences at R = 2 (so one copy each, writes degraded);
 * a second joins and repair copies every sequence to it: all bytes move,
 * however the rendezvous weights fall, and nothing is dropped. */
static int bench_repair(const cfg_t *cfg, const char *rate) {
    const char *const flags[] = {
        "--replicas", "2", "--repair-interval-ms", "200", "--repair-rate-bytes",
        rate,         NULL};
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "/bench-repair-%s", rate);
    const int S = cfg->repair_seqs;
    const uint64_t first = 8000000;
    cl_t cl;
    kvs_client_t *c = NULL;
    const char *step = "start";
    int rc = cl_start(&cl, prefix, 1, flags);
    if (rc || !(c = open_cluster_client(&cl, 2))) {
        rc = rc ? rc : -ECONNREFUSED;
        goto out;
    }
    step = "fill";
    for (int i = 0; i < S && !rc; i++)
        rc = fill_seq(c, first + (uint64_t)i, cfg->repair_ctx);
    if (rc || (step = "build", rc = wait_built(c, first, S, 300)))
        goto out;
    double b0 = tc_metric(cl.node[0].http_port, "kvstored_repair_bytes_total");
    double cpu0 = proc_cpu_s(cl.node[0].pid);
    step = "join";
    if ((rc = cl_add(&cl))) /* returns once etcd lists the newcomer */
        goto out;
    double cpu1_0 = proc_cpu_s(cl.node[1].pid);
    double settle = wait_settled(c, &cl, first, S, 2, 120);
    if (settle < 0) {
        step = "settle";
        rc = -ETIMEDOUT;
        goto out;
    }
    double b1 = tc_metric(cl.node[0].http_port, "kvstored_repair_bytes_total");
    double cpu_src = proc_cpu_s(cl.node[0].pid) - cpu0;
    double cpu_dst = proc_cpu_s(cl.node[1].pid) - cpu1_0;
    double pb = 0, pms = 0;
    int pushes = 0;
    pushed_from_log(&cl.node[0], &pb, &pms, &pushes);
    double bytes = b1 - b0;
    printf("{\"phase\":\"repair\",\"loadavg\":%.2f,"
           "\"repair_rate_bytes\":\"%s\",\"nodes\":"
           "\"1+1\",\"replicas\":2,\"sequences\":%d,\"tokens_each\":%u,"
           "\"raw_kv_bytes\":%.0f,\"bytes\":%.0f,\"seconds\":%.3f,"
           "\"mb_per_s\":%.1f,\"pushes\":%d,\"push_seconds\":%.3f,"
           "\"push_mb_per_s\":%.1f,\"source_cpu_s\":%.3f,"
           "\"target_cpu_s\":%.3f}\n",
           loadavg(), rate, S, cfg->repair_ctx,
           (double)S * cfg->repair_ctx * TOKEN_BYTES, bytes, settle,
           bytes / 1e6 / settle, pushes, pms / 1e3,
           pms > 0 ? pb / 1e6 / (pms / 1e3) : 0, cpu_src, cpu_dst);
    fflush(stdout);
    fprintf(stderr,
            "cluster_bench: repair at %s: %.1f MB in %.2f s = %.1f MB/s\n",
            rate, bytes / 1e6, settle, bytes / 1e6 / settle);
    if (bytes <= 0)
        rc = -EIO;
out:
    if (rc) {
        fprintf(stderr, "cluster_bench: repair at %s failed at %s (%d)\n", rate,
                step, rc);
        for (int i = 0; i < cl.n; i++)
            tc_node_dump_log(&cl.node[i]);
    }
    kvs_client_close(c);
    cl_stop(&cl);
    return rc;
}

/* ---------------------------------------------------------------- join */

static int bench_join(const cfg_t *cfg, uint32_t r) {
    char rs[8], prefix[64];
    snprintf(rs, sizeof(rs), "%u", r);
    snprintf(prefix, sizeof(prefix), "/bench-join-%u", r);
    const char *const flags[] = {"--replicas", rs, "--repair-interval-ms",
                                 "200", NULL};
    /* Small sequences: what is measured is where they go, not bytes. */
    const kvs_geometry_t small = {.n_layers = 1,
                                  .n_q_heads = 2,
                                  .n_kv_heads = 1,
                                  .head_dim = 8,
                                  .dtype = KVS_DTYPE_F32};
    const int S = cfg->join_seqs;
    const uint64_t first = 9000000;
    char(*before)[256] = calloc((size_t)S, sizeof(*before));
    cl_t cl;
    kvs_client_t *c = NULL;
    int rc = cl_start(&cl, prefix, 3, flags);
    if (rc || !before || !(c = open_cluster_client(&cl, r))) {
        rc = rc ? rc : -ENOMEM;
        goto out;
    }
    float kv[16 * 8];
    for (int i = 0; i < 16 * 8; i++)
        kv[i] = (float)(i % 7) * 0.1f;
    for (int i = 0; i < S && !rc; i++) {
        rc = kvs_client_seq_create(c, first + (uint64_t)i, &small);
        if (!rc)
            rc = kvs_client_seq_append(c, first + (uint64_t)i, 0, 16, kv, kv,
                                       sizeof(kv));
    }
    if (rc || wait_settled(c, &cl, first, S, (int)r, 30) < 0) {
        rc = rc ? rc : -ETIMEDOUT;
        goto out;
    }
    for (int i = 0; i < S; i++)
        holders(c, first + (uint64_t)i, before[i], sizeof(before[i]));
    double t0 = now_s();
    if ((rc = cl_add(&cl)))
        goto out;
    double settle = wait_settled(c, &cl, first, S, (int)r, 60);
    if (settle < 0) {
        rc = -ETIMEDOUT;
        goto out;
    }
    int changed = 0, copies_new = 0;
    for (int i = 0; i < S; i++) {
        char after[256];
        holders(c, first + (uint64_t)i, after, sizeof(after));
        changed += strcmp(after, before[i]) != 0;
        /* Copies in `after` that `before` did not have. */
        char *save = NULL, *tok = strtok_r(after, ",", &save);
        for (; tok; tok = strtok_r(NULL, ",", &save))
            copies_new += strstr(before[i], tok) == NULL;
    }
    printf("{\"phase\":\"join\",\"loadavg\":%.2f,\"nodes\":\"3+1\","
           "\"replicas\":%u,"
           "\"sequences\":%d,\"changed\":%d,\"moved_fraction\":%.4f,"
           "\"theory\":%.4f,\"copies_moved_fraction\":%.4f,"
           "\"copies_theory\":0.25,\"settle_ms\":%.1f,"
           "\"join_to_settled_ms\":%.1f}\n",
           loadavg(), r, S, changed, (double)changed / S, r == 1 ? 0.25 : 0.5,
           (double)copies_new / ((double)S * r), settle * 1e3,
           (now_s() - t0) * 1e3);
    fflush(stdout);
    fprintf(stderr, "cluster_bench: join R=%u: %d of %d sequences moved\n", r,
            changed, S);
out:
    if (rc)
        fprintf(stderr, "cluster_bench: join R=%u failed (%d)\n", r, rc);
    kvs_client_close(c);
    cl_stop(&cl);
    free(before);
    return rc;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv) {
    cfg_t cfg = {.threads = 4,
                 .seqs_per_thread = 3,
                 .ctx = 2048,
                 .op_s = 3,
                 .failover_rounds = 5,
                 .failover_seqs = 12,
                 .failover_ctx = 1024,
                 .repair_seqs = 12,
                 .repair_ctx = 2048,
                 .join_seqs = 1000};
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            cfg.quick = true;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        } else {
            fprintf(stderr, "usage: cluster_bench [--quick] "
                            "[--only throughput|failover|repair|join]\n");
            return 2;
        }
    }
    if (cfg.quick) {
        cfg.threads = 2;
        cfg.seqs_per_thread = 2;
        cfg.ctx = 1024;
        cfg.op_s = 0.5;
        cfg.failover_rounds = 2;
        cfg.failover_seqs = 6;
        cfg.failover_ctx = 512;
        cfg.repair_seqs = 4;
        cfg.repair_ctx = 1024;
        cfg.join_seqs = 120;
    }
    if (!tc_etcd_binary()) {
        fprintf(stderr, "cluster_bench: etcd is not installed "
                        "(scripts/install-deps.sh)\n");
        return 1;
    }
    kv_chunk = malloc((size_t)CHUNK * TOKEN_BYTES / 2);
    if (!kv_chunk)
        return 1;
    fill_inputs();
    int rc = tc_etcd_start(&etcd);
    if (rc) {
        fprintf(stderr, "cluster_bench: etcd did not start (%d)\n", rc);
        free(kv_chunk);
        return 1;
    }
    int fails = 0;
    if (!only || !strcmp(only, "throughput")) {
        static const int shapes[][3] = {{1, 1, 2}, {1, 1, 1}, {2, 1, 1},
                                        {3, 1, 1}, {2, 2, 1}, {3, 2, 1}};
        for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
            fails +=
                bench_throughput(&cfg, shapes[i][0], (uint32_t)shapes[i][1],
                                 shapes[i][2]) != 0;
    }
    if (!only || !strcmp(only, "failover"))
        fails += bench_failover(&cfg) != 0;
    if (!only || !strcmp(only, "repair")) {
        fails += bench_repair(&cfg, "0") != 0;
        fails += bench_repair(&cfg, "64M") != 0;
    }
    if (!only || !strcmp(only, "join")) {
        fails += bench_join(&cfg, 1) != 0;
        fails += bench_join(&cfg, 2) != 0;
    }
    tc_reap_all();
    tc_etcd_stop(&etcd);
    free(kv_chunk);
    return fails ? 1 : 0;
}
