/*
 * http.c: kvstored's operations endpoint: GET /metrics (Prometheus text
 * format 0.0.4) and GET /healthz, on their own port so that scrapers and
 * probes never share a connection limit or a protocol with clients.
 *
 * It is deliberately a minimal HTTP/1.0-style server: one request per
 * connection, headers capped at 8 KiB, the answer written and the connection
 * closed. Metrics are counters owned by the loop thread, which also runs this
 * code, so reading them needs no locks.
 *
 * The port is open to anything that can reach it, so it is bounded like the
 * RPC port: at most http_max_connections at once (more are answered 503 and
 * closed at once, so idle sockets cannot use up the descriptors the RPC
 * listener needs), each closed http_timeout_ms after it was accepted whether
 * or not its request came in or its answer went out, and all of them closed
 * when the server stops (an idle one used to keep the loop, and so the
 * process, alive forever after SIGTERM).
 */
#include "server_int.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double bucket_le[KVS__N_BUCKETS] = {
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3, 5e-3,
    10e-3, 25e-3,  50e-3,  100e-3, 250e-3, 1.0,    5.0};

static int status_index(int status) {
    if (status <= -1001 && status > -1001 - (KVS__N_STATUS - 1))
        return -status - 1000;
    return 0;
}

void kvs__metrics_observe(kvs__metrics_t *m, int op, int status,
                          double seconds) {
    if (op < 0 || op >= KVS__N_OPS)
        op = 0;
    m->requests[op]++;
    if (status)
        m->errors[op][status_index(status)]++;
    int b = 0;
    while (b < KVS__N_BUCKETS && seconds > bucket_le[b])
        b++;
    m->hist[op][b]++;
    m->seconds_sum[op] += seconds;
}

/* The HTTP endpoint's own state; srv->http.data points here. It outlives
 * the listener: freed when the sweep timer and the last connection have
 * closed (refs). */
typedef struct http_conn_s http_conn_t;
typedef struct kvs__http_s {
    kvs_server_t *srv;
    uv_timer_t sweeper;
    http_conn_t *conns;
    uint32_t n_conns; /* counted connections not yet closing */
    unsigned refs;    /* sweeper + every connection handle */
    bool stopped;
    uint64_t accepted, refused, timed_out;
} kvs__http_t;

/* ------------------------------------------------------- metric writer */

/* A growable text buffer; on allocation failure it stops growing and the
 * scrape is truncated rather than crashing the daemon. */
typedef struct sbuf_s {
    char *p;
    size_t len, cap;
    bool failed;
} sbuf_t;

static void sb_printf(sbuf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf_t *b, const char *fmt, ...) {
    if (b->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = true;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 16384;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->failed = true;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
}

typedef enum { MT_COUNTER, MT_GAUGE, MT_HISTOGRAM } mtype_t;

typedef struct mlabel_s {
    const char *name, *value;
} mlabel_t;

/* Every sample goes through metric() or metric_hist(), which write a
 * family's # HELP and # TYPE lines before its first sample, so that no
 * metric can go out undocumented (13 did). A family's samples must be
 * written one after the other: a family seen again later would get a
 * second, invalid, HELP line. */
typedef struct mwriter_s {
    sbuf_t b;
    const char *family;
} mwriter_t;

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static void mw_family(mwriter_t *w, const char *name, mtype_t type,
                      const char *help) {
    static const char *names[] = {"counter", "gauge", "histogram"};
    /* Prometheus conventions, checked where the names are written. */
    assert(type != MT_COUNTER || ends_with(name, "_total"));
    assert(type == MT_COUNTER || !ends_with(name, "_total"));
    assert(help && help[0]);
    if (w->family && !strcmp(w->family, name))
        return;
    w->family = name;
    /* HELP text escapes only backslash and newline. */
    sb_printf(&w->b, "# HELP %s ", name);
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            sb_printf(&w->b, "\\\\");
        else if (*p == '\n')
            sb_printf(&w->b, "\\n");
        else
            sb_printf(&w->b, "%c", *p);
    }
    sb_printf(&w->b, "\n# TYPE %s %s\n", name, names[type]);
}

static void mw_sample(mwriter_t *w, const char *name, const char *suffix,
                      const mlabel_t *labels, size_t n_labels, const char *le,
                      double value) {
    sb_printf(&w->b, "%s%s", name, suffix);
    if (n_labels || le) {
        sb_printf(&w->b, "{");
        for (size_t i = 0; i < n_labels + (le ? 1 : 0); i++) {
            const char *k = i < n_labels ? labels[i].name : "le";
            const char *v = i < n_labels ? labels[i].value : le;
            sb_printf(&w->b, "%s%s=\"", i ? "," : "", k);
            for (const char *p = v; *p; p++) {
                if (*p == '\\' || *p == '"')
                    sb_printf(&w->b, "\\%c", *p);
                else if (*p == '\n')
                    sb_printf(&w->b, "\\n");
                else
                    sb_printf(&w->b, "%c", *p);
            }
            sb_printf(&w->b, "\"");
        }
        sb_printf(&w->b, "}");
    }
    /* 15 significant digits: integers stay exact up to 1e15, and a value
     * is a float64 to Prometheus anyway. */
    sb_printf(&w->b, " %.15g\n", value);
}

/* One sample of a counter or gauge, with its family's HELP and TYPE. */
static void metric(mwriter_t *w, const char *name, mtype_t type,
                   const char *help, const mlabel_t *labels, size_t n_labels,
                   double value) {
    assert(type != MT_HISTOGRAM);
    mw_family(w, name, type, help);
    mw_sample(w, name, "", labels, n_labels, NULL, value);
}

/* One histogram: cumulative _bucket lines (counts has n_le + 1 entries, the
 * last for +Inf), then _sum and _count. */
static void metric_hist(mwriter_t *w, const char *name, const char *help,
                        const mlabel_t *labels, size_t n_labels,
                        const double *le, const uint64_t *counts, size_t n_le,
                        double sum) {
    mw_family(w, name, MT_HISTOGRAM, help);
    uint64_t cum = 0;
    for (size_t i = 0; i <= n_le; i++) {
        char bound[32];
        if (i < n_le)
            snprintf(bound, sizeof(bound), "%g", le[i]);
        else
            snprintf(bound, sizeof(bound), "+Inf");
        cum += counts[i];
        mw_sample(w, name, "_bucket", labels, n_labels, bound, (double)cum);
    }
    mw_sample(w, name, "_sum", labels, n_labels, NULL, sum);
    mw_sample(w, name, "_count", labels, n_labels, NULL, (double)cum);
}

static const char *op_label(int op) {
    return op == 0 ? "invalid"
                   : kvs_frame_op_name((Kvs__V1__Request__OpCase)op);
}

static const char *status_label(int idx) {
    return idx == 0 ? "errno" : kvs_err_name(-1000 - idx);
}

#define C MT_COUNTER
#define G MT_GAUGE

void kvs__http_render_metrics(kvs_server_t *srv, char **out, size_t *len) {
    mwriter_t w = {0};
    const kvs__metrics_t *m = &srv->m;

    for (int op = 0; op < KVS__N_OPS; op++) {
        mlabel_t l[] = {{"op", op_label(op)}};
        metric(&w, "kvstored_requests_total", C, "Requests answered, by op.", l,
               1, (double)m->requests[op]);
    }
    for (int op = 0; op < KVS__N_OPS; op++)
        for (int s = 0; s < KVS__N_STATUS; s++)
            if (m->errors[op][s]) {
                mlabel_t l[] = {{"op", op_label(op)},
                                {"status", status_label(s)}};
                metric(&w, "kvstored_errors_total", C,
                       "Requests answered with an error, by op and status.", l,
                       2, (double)m->errors[op][s]);
            }
    for (int op = 1; op < KVS__N_OPS; op++) {
        mlabel_t l[] = {{"op", op_label(op)}};
        metric_hist(&w, "kvstored_request_duration_seconds",
                    "Time from a request's decode to its answer being "
                    "queued, by op.",
                    l, 1, bucket_le, m->hist[op], KVS__N_BUCKETS,
                    m->seconds_sum[op]);
    }
    metric(&w, "kvstored_received_bytes_total", C,
           "Bytes read from client connections.", NULL, 0, (double)m->bytes_in);
    metric(&w, "kvstored_append_payload_bytes_total", C,
           "Key and value bytes of the appends received.", NULL, 0,
           (double)m->append_payload_bytes);
    {
        mlabel_t lr[] = {{"stage", "reader"}}, ld[] = {{"stage", "decode"}};
        const char *h = "Bytes the append path copied after the socket "
                        "read, by stage (reader: frame buffer compaction "
                        "and growth; decode: appends not decoded in place); "
                        "over kvstored_append_payload_bytes_total, the "
                        "copies per byte.";
        metric(&w, "kvstored_append_copied_bytes_total", C, h, lr, 1,
               (double)m->copied_reader_bytes);
        metric(&w, "kvstored_append_copied_bytes_total", C, h, ld, 1,
               (double)m->copied_decode_bytes);
    }
    metric(&w, "kvstored_appends_in_place_total", C,
           "Appends whose keys and values went to the engine from the "
           "frame buffer, uncopied.",
           NULL, 0, (double)m->appends_in_place);
    metric(&w, "kvstored_sent_bytes_total", C,
           "Bytes of answers queued to client connections.", NULL, 0,
           (double)m->bytes_out);
    metric(&w, "kvstored_connections", G,
           "Client connections open (refused ones not counted).", NULL, 0,
           srv->n_conns);
    metric(&w, "kvstored_connections_total", C,
           "Client connections accepted since start.", NULL, 0,
           (double)m->connections_total);
    metric(&w, "kvstored_connections_refused_total", C,
           "Client connections refused (max_connections or draining).", NULL, 0,
           (double)m->connections_refused);
    metric(&w, "kvstored_protocol_errors_total", C,
           "Connections closed for a frame that broke the protocol.", NULL, 0,
           (double)m->protocol_errors);
    metric(&w, "kvstored_auth_failures_total", C,
           "Requests refused for want of a valid Hello token.", NULL, 0,
           (double)m->auth_failures);
    metric(&w, "kvstored_idle_closed_total", C,
           "Client connections closed by idle_timeout_ms.", NULL, 0,
           (double)m->idle_closed);
    metric(&w, "kvstored_inflight_requests", G, "Requests on the worker pool.",
           NULL, 0, (double)srv->inflight);
    metric(&w, "kvstored_uptime_seconds", G,
           "Seconds since the server started.", NULL, 0,
           (double)(uv_hrtime() - srv->start_ns) / 1e9);
    bool reg;
    uint64_t regs, fails;
    if (kvs__member_metrics(srv, &reg, &regs, &fails)) {
        metric(&w, "kvstored_etcd_registered", G,
               "1 while this node's key is registered in etcd (cluster.md).",
               NULL, 0, reg);
        metric(&w, "kvstored_etcd_registrations_total", C,
               "etcd leases granted and node records written (1 unless a "
               "lease was lost).",
               NULL, 0, (double)regs);
        metric(&w, "kvstored_etcd_failures_total", C,
               "etcd calls that failed (unreachable, timeout, error answer).",
               NULL, 0, (double)fails);
    }
    kvs__repair_stats_t rs;
    if (kvs__repair_metrics(srv, &rs)) {
        metric(&w, "kvstored_repair_sequences_total", C,
               "Sequences this node copied to a node that lacked them or "
               "held an older copy (cluster.md).",
               NULL, 0, (double)rs.pushed);
        metric(&w, "kvstored_repair_bytes_total", C,
               "Bytes of sequence streams this node pushed.", NULL, 0,
               (double)rs.bytes);
        metric(&w, "kvstored_repair_dropped_total", C,
               "Copies dropped here once the nodes that keep them held "
               "them.",
               NULL, 0, (double)rs.dropped);
        metric(&w, "kvstored_repair_conflicts_total", C,
               "Pushes refused because the other copy holds tokens this "
               "one lacks (both kept).",
               NULL, 0, (double)rs.conflicts);
        metric(&w, "kvstored_repair_errors_total", C,
               "Pushes and probes that failed (retried on the next pass).",
               NULL, 0, (double)rs.errors);
        metric(&w, "kvstored_repair_passes_total", C,
               "Passes over the sequences held here.", NULL, 0,
               (double)rs.passes);
        metric(&w, "kvstored_repair_pending", G,
               "Sequences the last pass left unfinished.", NULL, 0,
               (double)rs.pending);
    }
    const kvs__http_t *h = srv->http.data;
    if (srv->have_http && h) {
        metric(&w, "kvstored_http_connections", G,
               "Connections open on the HTTP port.", NULL, 0, h->n_conns);
        metric(&w, "kvstored_http_connections_total", C,
               "Connections accepted on the HTTP port.", NULL, 0,
               (double)h->accepted);
        metric(&w, "kvstored_http_connections_refused_total", C,
               "HTTP connections refused with 503 over "
               "http_max_connections.",
               NULL, 0, (double)h->refused);
        metric(&w, "kvstored_http_timeouts_total", C,
               "HTTP connections closed by http_timeout_ms.", NULL, 0,
               (double)h->timed_out);
    }

    kvs_store_stats_t st;
    memset(&st, 0, sizeof(st));
    st.gpu_device = -1;
    if (srv->store && kvs_store_stats(srv->store, &st) == 0) {
        metric(&w, "kvstore_sequences", G, "Sequences in the store.", NULL, 0,
               (double)st.sequences);
        metric(&w, "kvstore_ram_bytes", G,
               "RAM held by sequences (raw K/V plus index).", NULL, 0,
               (double)st.bytes);
        metric(&w, "kvstore_index_bytes", G,
               "Part of kvstore_ram_bytes held by the wave index.", NULL, 0,
               (double)st.index_bytes);
        metric(&w, "kvstore_build_backlog", G,
               "Index segment builds queued or running.", NULL, 0,
               (double)st.builds_pending);
        metric(&w, "kvstore_builds_total", C, "Index segment builds finished.",
               NULL, 0, (double)st.builds_done);
        metric(&w, "kvstore_build_seconds_total", C,
               "Seconds spent in index segment builds.", NULL, 0,
               st.build_seconds);
        metric(&w, "kvstore_disk_bytes", G,
               "Bytes of the data directory (0 in memory mode).", NULL, 0,
               (double)st.disk_bytes);
        metric(&w, "kvstore_quarantined_sequences", G,
               "Sequences refused after damage was found.", NULL, 0,
               (double)st.quarantined);
    }
    if (srv->store) {
        metric(&w, "kvstore_resident_bytes", G,
               "K/V, index and sequence bookkeeping bytes counted against "
               "memory-bytes.",
               NULL, 0, (double)st.resident_bytes);
        metric(&w, "kvstore_unpersisted_bytes", G,
               "Acknowledged append bytes queued for the disk (sync async).",
               NULL, 0, (double)st.unpersisted_bytes);
        metric(&w, "kvstore_unpersisted_waits_total", C,
               "Writes that waited for max-unpersisted-bytes.", NULL, 0,
               (double)st.unpersisted_waits);
        metric(&w, "kvstore_storage_writes_queued_total", C,
               "Storage writes queued since open (their last sequence "
               "number).",
               NULL, 0, (double)st.queued_seqno);
        metric(&w, "kvstore_storage_writes_persisted_total", C,
               "Storage writes durable on disk since open.", NULL, 0,
               (double)st.persisted_seqno);
        metric(&w, "kvstore_evictions_total", C,
               "Sequences evicted to the data directory by the memory "
               "budget.",
               NULL, 0, (double)st.evictions);
        metric(&w, "kvstore_page_ins_total", C,
               "Evicted sequences paged back in.", NULL, 0,
               (double)st.page_ins);
        metric(&w, "kvstore_expired_total", C,
               "Sequences dropped by their idle TTL.", NULL, 0,
               (double)st.expired);
    }
    if (srv->store && st.gpu_device >= 0) {
        metric(&w, "kvstore_gpu_attends_total", C,
               "Attend calls served on the GPU.", NULL, 0,
               (double)st.gpu_attends);
        metric(&w, "kvstore_gpu_fallbacks_total", C,
               "Wave attends the GPU path did not take (served on the CPU).",
               NULL, 0, (double)st.gpu_fallbacks);
        metric(&w, "kvstore_gpu_errors_total", C,
               "GPU failures, redone on the CPU.", NULL, 0,
               (double)st.gpu_errors);
        metric(&w, "kvstore_gpu_bytes", G, "GPU memory held by wave buffers.",
               NULL, 0, (double)st.gpu_bytes);
        metric(&w, "kvstore_gpu_pinned_bytes", G,
               "Pinned host memory held by wave buffers.", NULL, 0,
               (double)st.gpu_pinned_bytes);
        metric(&w, "kvstore_gpu_cache_lookups_total", C,
               "Retrieved clusters looked up in the GPU cache.", NULL, 0,
               (double)st.gpu_cache_lookups);
        metric(&w, "kvstore_gpu_cache_hits_total", C,
               "Retrieved clusters found in the GPU cache.", NULL, 0,
               (double)st.gpu_cache_hits);
        metric(&w, "kvstore_gpu_bus_bytes_total", C,
               "K/V bytes read from host memory by cache misses.", NULL, 0,
               (double)st.gpu_bus_bytes);
        metric(&w, "kvstore_gpu_mirrors_evicted_total", C,
               "Layer wave buffers given back, least recently used first, "
               "to make room under cuda_memory_bytes.",
               NULL, 0, (double)st.gpu_mirrors_evicted);
    }
    *out = w.b.p;
    *len = w.b.failed ? 0 : w.b.len;
}

#undef C
#undef G

/* ------------------------------------------------------------------ http */

#define HTTP_MAX_REQUEST 8192

struct http_conn_s {
    uv_tcp_t tcp;
    kvs__http_t *h;
    http_conn_t *prev, *next; /* h->conns */
    uint64_t deadline;        /* uv_now: closed then, whatever its state */
    char buf[HTTP_MAX_REQUEST];
    size_t len;
    bool answered;
    bool counted; /* in n_conns: accepted within the limit, not closing */
    bool closing;
    uv_write_t wreq;
    char *resp;
};

static void http_unref(kvs__http_t *h) {
    assert(h->refs > 0);
    if (--h->refs == 0)
        free(h);
}

static void http_closed(uv_handle_t *handle) {
    http_conn_t *hc = handle->data;
    kvs__http_t *h = hc->h;
    if (hc->prev)
        hc->prev->next = hc->next;
    else
        h->conns = hc->next;
    if (hc->next)
        hc->next->prev = hc->prev;
    free(hc->resp);
    free(hc);
    http_unref(h);
}

static void http_close(http_conn_t *hc) {
    if (hc->closing)
        return;
    hc->closing = true;
    /* Uncounted now, not in the close callback: uv_close has closed the
     * socket already, and a client that saw it go may connect again
     * before the callback runs (later in this loop iteration); it must
     * find the slot free. */
    if (hc->counted) {
        hc->counted = false;
        hc->h->n_conns--;
    }
    uv_close((uv_handle_t *)&hc->tcp, http_closed);
}

static void http_written(uv_write_t *req, int status) {
    (void)status; /* closed either way; UV_ECANCELED when closed first */
    http_close(req->data);
}

static void http_answer(http_conn_t *hc, int code, const char *reason,
                        const char *ctype, const char *body, size_t blen) {
    hc->answered = true;
    uv_read_stop((uv_stream_t *)&hc->tcp);
    size_t cap = blen + 256;
    hc->resp = malloc(cap);
    if (!hc->resp) {
        http_close(hc);
        return;
    }
    int n = snprintf(hc->resp, cap,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                     code, reason, ctype, blen);
    memcpy(hc->resp + n, body, blen);
    uv_buf_t b = uv_buf_init(hc->resp, (unsigned)(n + blen));
    hc->wreq.data = hc;
    if (uv_write(&hc->wreq, (uv_stream_t *)&hc->tcp, &b, 1, http_written))
        http_close(hc);
}

static void http_alloc(uv_handle_t *handle, size_t sz, uv_buf_t *buf) {
    http_conn_t *hc = handle->data;
    (void)sz;
    *buf = uv_buf_init(hc->buf + hc->len,
                       (unsigned)(sizeof(hc->buf) - 1 - hc->len));
}

static void http_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    http_conn_t *hc = s->data;
    (void)buf;
    if (hc->answered || hc->closing)
        return;
    if (n < 0) {
        http_close(hc);
        return;
    }
    hc->len += (size_t)n;
    hc->buf[hc->len] = 0;
    if (!strstr(hc->buf, "\r\n\r\n") && !strstr(hc->buf, "\n\n")) {
        if (hc->len >= sizeof(hc->buf) - 1)
            http_answer(hc, 431, "Request Header Fields Too Large",
                        "text/plain", "too large\n", 10);
        return;
    }
    kvs_server_t *srv = hc->h->srv;
    char method[8] = "", path[256] = "";
    if (sscanf(hc->buf, "%7s %255s", method, path) != 2) {
        http_answer(hc, 400, "Bad Request", "text/plain", "bad request\n", 12);
        return;
    }
    char *qm = strchr(path, '?');
    if (qm)
        *qm = 0;
    if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
        http_answer(hc, 405, "Method Not Allowed", "text/plain", "GET only\n",
                    9);
    } else if (!strcmp(path, "/metrics")) {
        char *body = NULL;
        size_t blen = 0;
        kvs__http_render_metrics(srv, &body, &blen);
        http_answer(hc, 200, "OK", "text/plain; version=0.0.4",
                    body ? body : "", blen);
        free(body);
    } else if (!strcmp(path, "/healthz")) {
        if (srv->draining)
            http_answer(hc, 503, "Service Unavailable", "text/plain",
                        "draining\n", 9);
        else
            http_answer(hc, 200, "OK", "text/plain", "ok\n", 3);
    } else {
        http_answer(hc, 404, "Not Found", "text/plain", "not found\n", 10);
    }
}

static void http_on_connection(uv_stream_t *l, int status) {
    kvs__http_t *h = l->data;
    kvs_server_t *srv = h->srv;
    if (status < 0) {
        kvs__log(KVS__LOG_WARN, "accept_error", "proto=http err=%s",
                 uv_err_name(status));
        return;
    }
    http_conn_t *hc = calloc(1, sizeof(*hc));
    if (!hc) {
        kvs__log(KVS__LOG_ERROR, "oom", "what=http_connection");
        return;
    }
    hc->h = h;
    uv_tcp_init(l->loop, &hc->tcp);
    hc->tcp.data = hc;
    hc->next = h->conns;
    if (h->conns)
        h->conns->prev = hc;
    h->conns = hc;
    h->refs++;
    if (uv_accept(l, (uv_stream_t *)&hc->tcp)) {
        http_close(hc);
        return;
    }
    if (h->n_conns >= srv->cfg->http_max_connections) {
        /* A short answer the socket buffer always takes, then close at
         * once: the descriptor is back before the next accept. */
        static const char busy[] =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            "Content-Length: 22\r\nConnection: close\r\n\r\n"
            "too many connections\r\n";
        uv_buf_t b = uv_buf_init((char *)busy, sizeof(busy) - 1);
        (void)uv_try_write((uv_stream_t *)&hc->tcp, &b, 1);
        if (h->refused++ == 0 || h->refused % 1000 == 0)
            kvs__log(KVS__LOG_WARN, "http_refused",
                     "reason=http_max_connections max=%u refused=%llu",
                     srv->cfg->http_max_connections,
                     (unsigned long long)h->refused);
        http_close(hc);
        return;
    }
    hc->counted = true;
    h->n_conns++;
    h->accepted++;
    hc->deadline = uv_now(l->loop) + srv->cfg->http_timeout_ms;
    if (uv_read_start((uv_stream_t *)&hc->tcp, http_alloc, http_read))
        http_close(hc);
}

static void http_sweep(uv_timer_t *t) {
    kvs__http_t *h = t->data;
    uint64_t now = uv_now(t->loop);
    for (http_conn_t *hc = h->conns; hc; hc = hc->next) {
        if (hc->closing || !hc->counted || now < hc->deadline)
            continue;
        h->timed_out++;
        kvs__log(KVS__LOG_DEBUG, "http_timeout", "answered=%s",
                 hc->answered ? "yes" : "no");
        http_close(hc);
    }
}

static void http_sweeper_closed(uv_handle_t *handle) {
    http_unref(handle->data);
}

int kvs__http_start(kvs_server_t *srv) {
    const char *host = srv->cfg->http_bind;
    struct sockaddr_storage ss;
    unsigned flags = 0;
    int port = (int)srv->cfg->http_port;
    if (strchr(host, ':')) {
        if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss))
            return KVS_EINVAL;
        flags = UV_TCP_IPV6ONLY;
    } else if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss)) {
        return KVS_EINVAL;
    }
    kvs__http_t *h = calloc(1, sizeof(*h));
    if (!h)
        return KVS_ENOMEM;
    h->srv = srv;
    h->refs = 1; /* the sweeper */
    uv_timer_init(&srv->loop, &h->sweeper);
    h->sweeper.data = h;
    uint64_t timeout = srv->cfg->http_timeout_ms;
    if (timeout) {
        /* A quarter of the timeout, so a connection lives at most 1.25x
         * it; at least 10 ms, at most 1 s. */
        uint64_t every = timeout / 4 < 10 ? 10 : timeout / 4;
        if (every > 1000)
            every = 1000;
        uv_timer_start(&h->sweeper, http_sweep, every, every);
    }
    uv_tcp_init(&srv->loop, &srv->http);
    srv->http.data = h;
    srv->have_http = true;
    int rc = uv_tcp_bind(&srv->http, (struct sockaddr *)&ss, flags);
    if (!rc)
        rc = uv_listen((uv_stream_t *)&srv->http, 128, http_on_connection);
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "listen_failed",
                 "proto=http addr=%s port=%d "
                 "err=%s",
                 host, port, uv_err_name(rc));
        return rc; /* kvs__http_stop (from the server's cleanup) frees h */
    }
    int len = sizeof(ss);
    uv_tcp_getsockname(&srv->http, (struct sockaddr *)&ss, &len);
    srv->http_port =
        ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                       : ((struct sockaddr_in *)&ss)->sin_port);
    kvs__log(KVS__LOG_INFO, "listen",
             "proto=http addr=%s port=%d max_connections=%u timeout_ms=%u",
             host, srv->http_port, srv->cfg->http_max_connections,
             srv->cfg->http_timeout_ms);
    return 0;
}

void kvs__http_stop(kvs_server_t *srv) {
    if (!srv->have_http)
        return;
    kvs__http_t *h = srv->http.data;
    if (!uv_is_closing((uv_handle_t *)&srv->http))
        uv_close((uv_handle_t *)&srv->http, NULL);
    if (!h || h->stopped)
        return;
    h->stopped = true;
    uint32_t open = h->n_conns;
    for (http_conn_t *hc = h->conns; hc; hc = hc->next)
        http_close(hc);
    if (open)
        kvs__log(KVS__LOG_INFO, "http_closed", "connections=%u", open);
    /* The metrics page reads srv->http.data; it is about to go away. */
    srv->http.data = NULL;
    uv_close((uv_handle_t *)&h->sweeper, http_sweeper_closed);
}
