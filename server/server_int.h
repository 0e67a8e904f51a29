/*
 * server_int.h: private to server/. The server and connection structs, the
 * logger, metrics, the worker-side op execution and the HTTP endpoint, shared
 * between the files of the daemon and nothing else.
 *
 * Threading model: everything in kvs_server_t and kvs__conn_t is owned by the
 * loop thread, except the worker pool's queues (pool_mu, below). Workers
 * (server.c, worker_main) only see a kvs__work_t: the decoded request, the
 * store, a read-only copy of the limits, and write their encoded response
 * frame into it; done_async hands it back to the loop thread.
 */
#ifndef KVS_SERVER_INT_H
#define KVS_SERVER_INT_H

#include "kvs_frame.h"
#include "kvs_server.h"
#include "kvstore.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#define KVS_SERVER_VERSION "0.1.0"

/* ---------------------------------------------------------------- logging */

enum { KVS__LOG_DEBUG, KVS__LOG_INFO, KVS__LOG_WARN, KVS__LOG_ERROR };

void kvs__log_set_level(const char *level);
/* Send log lines to `path` (opened O_APPEND, created 0600) instead of
 * stderr; NULL or "" keeps stderr. kvs__log_reopen() opens the same path
 * again, for log rotation (SIGHUP): lines written meanwhile by other threads
 * go to the old or the new file, never nowhere. Errors: -errno (the old
 * file stays in use). */
int kvs__log_open(const char *path);
int kvs__log_reopen(void);
/* The file being logged to, or NULL for stderr. */
const char *kvs__log_path(void);
/* One line: `ts=... level=... event=EVENT ` + fields formatted by fmt
 * (logfmt `key=value` pairs; use kvs__logq() for values with spaces). */
void kvs__log(int level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Quote `s` for a logfmt value into buf (always NUL-terminated). */
const char *kvs__logq(char *buf, size_t len, const char *s);

/* ---------------------------------------------------------------- metrics */

/* Ops as counted by metrics: the request op case (1..15), 0 for frames that
 * never became a request. */
#define KVS__N_OPS 16
/* Histogram bucket upper bounds in seconds; the +Inf bucket is implicit. */
#define KVS__N_BUCKETS 14
/* Error statuses: index 1..N for KVS_E* codes, 0 for -errno and others. */
#define KVS__N_STATUS 32

typedef struct kvs__metrics_s {
    uint64_t requests[KVS__N_OPS];
    uint64_t errors[KVS__N_OPS][KVS__N_STATUS];
    uint64_t hist[KVS__N_OPS][KVS__N_BUCKETS + 1];
    double seconds_sum[KVS__N_OPS];
    uint64_t bytes_in, bytes_out;
    uint64_t connections_total, connections_refused, protocol_errors;
    uint64_t auth_failures, idle_closed;
    /* The append path's copies (copies per byte = copied / payload): the
     * frame reader's (compaction, growth, the start of a direct frame) and
     * the decode's (an append unpacked by protobuf-c instead of in place).
     * The receive from the socket is not counted. */
    uint64_t append_payload_bytes, copied_reader_bytes, copied_decode_bytes;
    uint64_t appends_in_place;
} kvs__metrics_t;

void kvs__metrics_observe(kvs__metrics_t *m, int op, int status,
                          double seconds);

/* ----------------------------------------------------------------- server */

/* Recycled buffers of direct frames (bufpool.c); loop thread only. */
#define KVS__BUFPOOL_SLOTS 16
typedef struct kvs__bufpool_s {
    void *buf[KVS__BUFPOOL_SLOTS];
    int n;
    size_t bytes, max_bytes; /* kept, and the most kept */
    bool used;               /* since the last idle trim */
    uint64_t fresh, reused;  /* allocations: malloc'ed, recycled */
} kvs__bufpool_t;
/* kvs_frame_allocator_t functions; ctx is the pool. */
void *kvs__bufpool_alloc(void *ctx, size_t size);
void kvs__bufpool_free(void *ctx, void *ptr);
/* Free the kept buffers (if_idle: only when unused since the last call). */
void kvs__bufpool_trim(kvs__bufpool_t *bp, bool if_idle);

typedef struct kvs__conn_s kvs__conn_t;
typedef struct kvs__work_s kvs__work_t;
typedef struct kvs__member_s kvs__member_t;
typedef struct kvs__repair_s kvs__repair_t;

/* stop.c: the stop flag of a background thread, guarded by `mu` (a leaf
 * lock); `cv` runs on CLOCK_MONOTONIC. Sleep until `ms` from now or a stop
 * request (true when stopping); read the flag. */
bool kvs__wait_stop(pthread_mutex_t *mu, pthread_cond_t *cv, const bool *stop,
                    uint64_t ms);
bool kvs__stopping(pthread_mutex_t *mu, const bool *stop);

/* Requests of one connection that name one sequence and are not answered
 * yet, in arrival order (the per-connection ordering gate, server.c). */
typedef struct kvs__seq_q_s kvs__seq_q_t;
struct kvs__seq_q_s {
    uint64_t seq;
    kvs__seq_q_t *next; /* hash chain in conn->seq_qs */
    kvs__work_t *head, *tail;
};
#define KVS__SEQ_Q_BUCKETS 64

struct kvs__conn_s {
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } h;
    kvs_server_t *srv;
    kvs__conn_t *prev, *next; /* srv->conns */
    kvs__conn_t *flush_next;  /* srv->flush_list */
    kvs_frame_reader_t rd;
    uint64_t id;
    char peer[80];
    uint32_t inflight;     /* requests read, not yet answered */
    kvs__seq_q_t **seq_qs; /* KVS__SEQ_Q_BUCKETS; NULL until used */
    /* Under srv->pool_mu: requests that may run, waiting for a worker, and
     * this connection's place in the round robin. */
    kvs__work_t *ready_head, *ready_tail;
    kvs__conn_t *rr_next;
    bool in_rr;
    uint64_t accepted_at; /* uv_now() at accept */
    uint64_t frame_start; /* uv_now() of the first byte of the
                             frame being read; 0: none */
    uint64_t admit;       /* bytes of srv->admitted held by the
                             frame being read */
    bool admit_wait;      /* paused: over max_buffered_bytes */
    uint64_t fatal_at;    /* uv_now() when marked fatal */
    uint64_t last_write;  /* uv_now() a write last completed, or
                             was queued with none pending */
    uint32_t writes;      /* uv_write requests pending */
    uint64_t last_active; /* uv_now() of the last byte or answer */
    uint8_t *out;         /* responses waiting for the next flush */
    size_t out_len, out_cap;
    bool reading;
    bool in_flush_list;
    bool authed;
    bool fatal;   /* answer what is in flight, then close */
    bool refused; /* over max_connections: not counted */
    bool closing; /* uv_close called */
    bool closed;  /* close callback ran */
};

struct kvs_server_s {
    const kvs_server_config_t *cfg;
    uv_loop_t loop;
    kvs_store_t *store;
    uv_tcp_t tcp[8];
    int n_tcp;
    uv_pipe_t unix_listener;
    bool have_unix;
    uint64_t unix_dev, unix_ino; /* our socket file: only it is unlinked */
    uv_tcp_t http;
    bool have_http;
    int port, http_port;
    uv_signal_t sigterm, sigint, sighup;
    uv_check_t flusher;
    uv_timer_t sweeper; /* idle timeouts */
    uv_timer_t drain_timer;
    kvs__conn_t *conns;
    kvs__conn_t *flush_list;
    uint32_t n_conns; /* accepted and counted (not refused) */
    uint64_t next_conn_id;
    uint64_t inflight; /* across connections */
    uint32_t running;  /* requests handed to the pool, not yet done */
    /* The worker pool. pool_mu guards rr_*, done, pool_stop and every
     * connection's ready_* / rr_next / in_rr; nothing else is shared. It is
     * a leaf lock: nothing else is taken while it is held (workers drop it
     * before the engine call, which takes seq_locks). */
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    pthread_t *pool_threads;
    uint32_t n_pool_threads;
    bool pool_stop;
    kvs__conn_t *rr_head, *rr_tail; /* round robin over ready connections */
    kvs__work_t *done;              /* finished, newest first */
    uv_async_t done_async;          /* ref'd while running > 0 */
    bool have_async;
    uint64_t admitted;       /* request bytes admitted (max_buffered_bytes) */
    uint64_t admitted_large; /* of which frames over ADMIT_MIN */
    uint32_t n_admit_wait;
    bool admit_retry; /* admitted bytes were released: retry waiters */
    bool draining;
    bool stopped; /* handles closed */
    uint64_t start_ns;
    kvs_frame_limits_t limits;
    char node_id[128];
    kvs__metrics_t m;
    kvs__bufpool_t bufpool;
    kvs__member_t *member; /* etcd membership (etcd.c); NULL without etcd */
    kvs__repair_t *repair; /* repair.c; NULL without etcd and replicas */
    /* Create/drop take a stripe for writing; ops that size buffers from a
     * sequence's geometry take it for reading, so that geometry cannot
     * change between the info call and the engine call. */
    pthread_rwlock_t seq_locks[64];
};

/* Work item for one request on the worker pool. */
struct kvs__work_s {
    kvs__conn_t *conn;
    kvs_server_t *srv;
    Kvs__V1__Request *msg; /* req.msg */
    kvs_frame_request_t req;
    uint8_t *body_buf; /* the direct frame req borrows from, or NULL */
    uint64_t request_id;
    int op;
    uint64_t t0; /* uv_hrtime at dispatch */
    int status;
    uint8_t *frame; /* encoded response */
    size_t frame_len;
    /* Server-side fields of a Stats answer, snapshot on the loop thread. */
    uint64_t snap_connections, snap_requests, snap_inflight, snap_in, snap_out;
    uint64_t admit; /* srv->admitted bytes released when answered */
    /* Ordering gate (loop thread only): the sequences the request names,
     * what it does to them, its links in each sequence's queue. */
    kvs__seq_q_t *q[2];
    kvs__work_t *qprev[2], *qnext[2];
    int n_q;
    int kind;                /* GATE_* (server.c) */
    uint32_t layer;          /* of an append, search or attend */
    bool started;            /* left the gate (ready or running) */
    kvs__work_t *ready_next; /* under pool_mu: ready FIFO, then done list */
};

/* Worker side: run w->msg against the store and encode w->frame. */
void kvs__op_run(kvs__work_t *w);

/* Encode an error-only response frame; NULL on ENOMEM. */
uint8_t *kvs__error_frame(uint64_t request_id, uint16_t flags, int status,
                          const char *message, size_t *len);

/* Membership in etcd (etcd.c). start: when etcd_endpoints is set, begin
 * registering on a thread of its own (ports must be bound); 0 or a config
 * error (logged). leave: ask that thread to deregister and end, without
 * waiting (the drain's first step). stop: leave, then join and free; before
 * the store closes, since the thread reads its stats. Both no-ops without
 * etcd; loop thread only. */
int kvs__member_start(kvs_server_t *srv);
void kvs__member_leave(kvs_server_t *srv);
void kvs__member_stop(kvs_server_t *srv);
/* For /metrics: false without etcd. registered: the node key is there as
 * far as this daemon knows; registrations: leases granted and written;
 * failures: etcd calls that failed. Any thread. */
bool kvs__member_metrics(const kvs_server_t *srv, bool *registered,
                         uint64_t *registrations, uint64_t *failures);

/* Repair (repair.c, docs/cluster.md). import_piece: one ImportRequest, on
 * a worker, from connection `conn`; *result is the kvs_import_result_t once
 * the last piece is in (0 before); msg receives the reason of an error.
 * start (etcd.c, once registered): the repair thread, when `replicas` and
 * etcd are set; self_addr is the address this node advertises. leave: ask
 * it to stop pushing (the drain); stop: leave, join, and abort the imports
 * in progress (after the pool has stopped). */
int kvs__import_piece(kvs_server_t *srv, uint64_t conn,
                      const Kvs__V1__ImportRequest *r, uint32_t *result,
                      char *msg, size_t msglen);
int kvs__repair_start(kvs_server_t *srv, const char *self_addr);
void kvs__repair_leave(kvs_server_t *srv);
void kvs__repair_stop(kvs_server_t *srv);
typedef struct kvs__repair_stats_s {
    uint64_t pushed;    /* pushes that installed or replaced a copy */
    uint64_t bytes;     /* stream bytes pushed */
    uint64_t dropped;   /* copies past R dropped here */
    uint64_t conflicts; /* pushes refused with KVS_ECONFLICT */
    uint64_t errors;    /* failed pushes and probes */
    uint64_t passes;    /* passes over the sequences held here */
    uint64_t pending;   /* sequences left unfinished by the last pass */
} kvs__repair_stats_t;
/* For /metrics: false when repair is off. Any thread. */
bool kvs__repair_metrics(const kvs_server_t *srv, kvs__repair_stats_t *st);

/* HTTP endpoint (http.c). */
int kvs__http_start(kvs_server_t *srv);
/* Close the listener and every HTTP connection (server stop). */
void kvs__http_stop(kvs_server_t *srv);
void kvs__http_render_metrics(kvs_server_t *srv, char **out, size_t *len);

#endif /* KVS_SERVER_INT_H */
