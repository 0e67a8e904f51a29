/*
 * http.c: kvstored's operations endpoint: GET /metrics (Prometheus text
 * format 0.0.4) and GET /healthz, on their own port so that scrapers and
 * probes never share a connection limit or a protocol with clients.
 *
 * It is deliberately a minimal HTTP/1.0-style server: one request per
 * connection, headers capped at 8 KiB, the answer written and the connection
 * closed. Metrics are counters owned by the loop thread, which also runs this
 * code, so reading them needs no locks.
 */
#include "server_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double bucket_le[KVS__N_BUCKETS] = {
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
    10e-3, 25e-3,  50e-3,  100e-3, 250e-3, 1.0, 5.0};

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

static const char *op_label(int op) {
    return op == 0 ? "invalid" : kvs_frame_op_name((Kvs__V1__Request__OpCase)op);
}

static const char *status_label(int idx) {
    return idx == 0 ? "errno" : kvs_err_name(-1000 - idx);
}

void kvs__http_render_metrics(kvs_server_t *srv, char **out, size_t *len) {
    sbuf_t b = {0};
    const kvs__metrics_t *m = &srv->m;

    sb_printf(&b, "# HELP kvstored_requests_total Requests answered, by "
                  "op.\n# TYPE kvstored_requests_total counter\n");
    for (int op = 0; op < KVS__N_OPS; op++)
        sb_printf(&b, "kvstored_requests_total{op=\"%s\"} %llu\n",
                  op_label(op), (unsigned long long)m->requests[op]);

    sb_printf(&b, "# HELP kvstored_errors_total Requests answered with an "
                  "error, by op and status.\n# TYPE kvstored_errors_total "
                  "counter\n");
    for (int op = 0; op < KVS__N_OPS; op++)
        for (int s = 0; s < KVS__N_STATUS; s++)
            if (m->errors[op][s])
                sb_printf(&b,
                          "kvstored_errors_total{op=\"%s\",status=\"%s\"} "
                          "%llu\n",
                          op_label(op), status_label(s),
                          (unsigned long long)m->errors[op][s]);

    sb_printf(&b, "# HELP kvstored_request_duration_seconds Time from a "
                  "request's decode to its answer being queued, by op.\n"
                  "# TYPE kvstored_request_duration_seconds histogram\n");
    for (int op = 1; op < KVS__N_OPS; op++) {
        uint64_t cum = 0;
        for (int i = 0; i <= KVS__N_BUCKETS; i++) {
            cum += m->hist[op][i];
            if (i < KVS__N_BUCKETS)
                sb_printf(&b,
                          "kvstored_request_duration_seconds_bucket{op=\"%s\","
                          "le=\"%g\"} %llu\n",
                          op_label(op), bucket_le[i], (unsigned long long)cum);
            else
                sb_printf(&b,
                          "kvstored_request_duration_seconds_bucket{op=\"%s\","
                          "le=\"+Inf\"} %llu\n",
                          op_label(op), (unsigned long long)cum);
        }
        sb_printf(&b,
                  "kvstored_request_duration_seconds_sum{op=\"%s\"} %.9f\n"
                  "kvstored_request_duration_seconds_count{op=\"%s\"} %llu\n",
                  op_label(op), m->seconds_sum[op], op_label(op),
                  (unsigned long long)cum);
    }

    sb_printf(&b,
              "# TYPE kvstored_received_bytes_total counter\n"
              "kvstored_received_bytes_total %llu\n"
              "# TYPE kvstored_sent_bytes_total counter\n"
              "kvstored_sent_bytes_total %llu\n"
              "# TYPE kvstored_connections gauge\n"
              "kvstored_connections %u\n"
              "# TYPE kvstored_connections_total counter\n"
              "kvstored_connections_total %llu\n"
              "# TYPE kvstored_connections_refused_total counter\n"
              "kvstored_connections_refused_total %llu\n"
              "# TYPE kvstored_protocol_errors_total counter\n"
              "kvstored_protocol_errors_total %llu\n"
              "# TYPE kvstored_auth_failures_total counter\n"
              "kvstored_auth_failures_total %llu\n"
              "# TYPE kvstored_idle_closed_total counter\n"
              "kvstored_idle_closed_total %llu\n"
              "# TYPE kvstored_inflight_requests gauge\n"
              "kvstored_inflight_requests %llu\n"
              "# TYPE kvstored_uptime_seconds gauge\n"
              "kvstored_uptime_seconds %.3f\n",
              (unsigned long long)m->bytes_in,
              (unsigned long long)m->bytes_out, srv->n_conns,
              (unsigned long long)m->connections_total,
              (unsigned long long)m->connections_refused,
              (unsigned long long)m->protocol_errors,
              (unsigned long long)m->auth_failures,
              (unsigned long long)m->idle_closed,
              (unsigned long long)srv->inflight,
              (double)(uv_hrtime() - srv->start_ns) / 1e9);

    kvs_store_stats_t st;
    memset(&st, 0, sizeof(st));
    st.gpu_device = -1;
    if (srv->store && kvs_store_stats(srv->store, &st) == 0)
        sb_printf(&b,
                  "# HELP kvstore_sequences Sequences in the store.\n"
                  "# TYPE kvstore_sequences gauge\n"
                  "kvstore_sequences %llu\n"
                  "# HELP kvstore_ram_bytes RAM held by sequences (raw K/V "
                  "plus index).\n# TYPE kvstore_ram_bytes gauge\n"
                  "kvstore_ram_bytes %llu\n"
                  "# TYPE kvstore_index_bytes gauge\n"
                  "kvstore_index_bytes %llu\n"
                  "# HELP kvstore_build_backlog Index segment builds queued "
                  "or running.\n# TYPE kvstore_build_backlog gauge\n"
                  "kvstore_build_backlog %llu\n"
                  "# TYPE kvstore_builds_total counter\n"
                  "kvstore_builds_total %llu\n"
                  "# TYPE kvstore_build_seconds_total counter\n"
                  "kvstore_build_seconds_total %.6f\n"
                  "# HELP kvstore_disk_bytes Bytes of the data directory "
                  "(0 in memory mode).\n# TYPE kvstore_disk_bytes gauge\n"
                  "kvstore_disk_bytes %llu\n"
                  "# HELP kvstore_quarantined_sequences Sequences refused "
                  "after damage was found.\n"
                  "# TYPE kvstore_quarantined_sequences gauge\n"
                  "kvstore_quarantined_sequences %llu\n",
                  (unsigned long long)st.sequences,
                  (unsigned long long)st.bytes,
                  (unsigned long long)st.index_bytes,
                  (unsigned long long)st.builds_pending,
                  (unsigned long long)st.builds_done, st.build_seconds,
                  (unsigned long long)st.disk_bytes,
                  (unsigned long long)st.quarantined);
    if (srv->store)
        sb_printf(&b,
                  "# HELP kvstore_resident_bytes K/V and index bytes counted "
                  "against memory-bytes.\n"
                  "# TYPE kvstore_resident_bytes gauge\n"
                  "kvstore_resident_bytes %llu\n"
                  "# HELP kvstore_evictions_total Sequences evicted to the "
                  "data directory by the memory budget.\n"
                  "# TYPE kvstore_evictions_total counter\n"
                  "kvstore_evictions_total %llu\n"
                  "# HELP kvstore_page_ins_total Evicted sequences paged "
                  "back in.\n# TYPE kvstore_page_ins_total counter\n"
                  "kvstore_page_ins_total %llu\n"
                  "# HELP kvstore_expired_total Sequences dropped by their "
                  "idle TTL.\n# TYPE kvstore_expired_total counter\n"
                  "kvstore_expired_total %llu\n",
                  (unsigned long long)st.resident_bytes,
                  (unsigned long long)st.evictions,
                  (unsigned long long)st.page_ins,
                  (unsigned long long)st.expired);
    if (srv->store && st.gpu_device >= 0)
        sb_printf(&b,
                  "# HELP kvstore_gpu_attends_total Attend calls served on "
                  "the GPU.\n# TYPE kvstore_gpu_attends_total counter\n"
                  "kvstore_gpu_attends_total %llu\n"
                  "# HELP kvstore_gpu_fallbacks_total Wave attends the GPU "
                  "path did not take (served on the CPU).\n"
                  "# TYPE kvstore_gpu_fallbacks_total counter\n"
                  "kvstore_gpu_fallbacks_total %llu\n"
                  "# HELP kvstore_gpu_errors_total GPU failures, redone on "
                  "the CPU.\n# TYPE kvstore_gpu_errors_total counter\n"
                  "kvstore_gpu_errors_total %llu\n"
                  "# HELP kvstore_gpu_bytes GPU memory held by wave "
                  "buffers.\n# TYPE kvstore_gpu_bytes gauge\n"
                  "kvstore_gpu_bytes %llu\n"
                  "# HELP kvstore_gpu_pinned_bytes Pinned host memory held "
                  "by wave buffers.\n# TYPE kvstore_gpu_pinned_bytes gauge\n"
                  "kvstore_gpu_pinned_bytes %llu\n"
                  "# HELP kvstore_gpu_cache_lookups_total Retrieved clusters "
                  "looked up in the GPU cache.\n"
                  "# TYPE kvstore_gpu_cache_lookups_total counter\n"
                  "kvstore_gpu_cache_lookups_total %llu\n"
                  "# TYPE kvstore_gpu_cache_hits_total counter\n"
                  "kvstore_gpu_cache_hits_total %llu\n"
                  "# HELP kvstore_gpu_bus_bytes_total K/V bytes read from "
                  "host memory by cache misses.\n"
                  "# TYPE kvstore_gpu_bus_bytes_total counter\n"
                  "kvstore_gpu_bus_bytes_total %llu\n",
                  (unsigned long long)st.gpu_attends,
                  (unsigned long long)st.gpu_fallbacks,
                  (unsigned long long)st.gpu_errors,
                  (unsigned long long)st.gpu_bytes,
                  (unsigned long long)st.gpu_pinned_bytes,
                  (unsigned long long)st.gpu_cache_lookups,
                  (unsigned long long)st.gpu_cache_hits,
                  (unsigned long long)st.gpu_bus_bytes);
    *out = b.p;
    *len = b.failed ? 0 : b.len;
}

/* ------------------------------------------------------------------ http */

#define HTTP_MAX_REQUEST 8192

typedef struct http_conn_s {
    uv_tcp_t tcp;
    kvs_server_t *srv;
    char buf[HTTP_MAX_REQUEST];
    size_t len;
    bool answered;
    uv_write_t wreq;
    char *resp;
} http_conn_t;

static void http_closed(uv_handle_t *h) {
    http_conn_t *hc = h->data;
    free(hc->resp);
    free(hc);
}

static void http_written(uv_write_t *req, int status) {
    (void)status;
    http_conn_t *hc = req->data;
    uv_close((uv_handle_t *)&hc->tcp, http_closed);
}

static void http_answer(http_conn_t *hc, int code, const char *reason,
                        const char *ctype, const char *body, size_t blen) {
    hc->answered = true;
    uv_read_stop((uv_stream_t *)&hc->tcp);
    size_t cap = blen + 256;
    hc->resp = malloc(cap);
    if (!hc->resp) {
        uv_close((uv_handle_t *)&hc->tcp, http_closed);
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
        uv_close((uv_handle_t *)&hc->tcp, http_closed);
}

static void http_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf) {
    http_conn_t *hc = h->data;
    (void)sz;
    *buf = uv_buf_init(hc->buf + hc->len,
                       (unsigned)(sizeof(hc->buf) - 1 - hc->len));
}

static void http_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    http_conn_t *hc = s->data;
    (void)buf;
    if (hc->answered)
        return;
    if (n < 0) {
        uv_close((uv_handle_t *)&hc->tcp, http_closed);
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
    char method[8] = "", path[256] = "";
    if (sscanf(hc->buf, "%7s %255s", method, path) != 2) {
        http_answer(hc, 400, "Bad Request", "text/plain", "bad request\n", 12);
        return;
    }
    char *qm = strchr(path, '?');
    if (qm)
        *qm = 0;
    if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
        http_answer(hc, 405, "Method Not Allowed", "text/plain",
                    "GET only\n", 9);
    } else if (!strcmp(path, "/metrics")) {
        char *body = NULL;
        size_t blen = 0;
        kvs__http_render_metrics(hc->srv, &body, &blen);
        http_answer(hc, 200, "OK", "text/plain; version=0.0.4",
                    body ? body : "", blen);
        free(body);
    } else if (!strcmp(path, "/healthz")) {
        if (hc->srv->draining)
            http_answer(hc, 503, "Service Unavailable", "text/plain",
                        "draining\n", 9);
        else
            http_answer(hc, 200, "OK", "text/plain", "ok\n", 3);
    } else {
        http_answer(hc, 404, "Not Found", "text/plain", "not found\n", 10);
    }
}

static void http_on_connection(uv_stream_t *l, int status) {
    kvs_server_t *srv = l->data;
    if (status < 0)
        return;
    http_conn_t *hc = calloc(1, sizeof(*hc));
    if (!hc)
        return;
    hc->srv = srv;
    uv_tcp_init(l->loop, &hc->tcp);
    hc->tcp.data = hc;
    if (uv_accept(l, (uv_stream_t *)&hc->tcp) ||
        uv_read_start((uv_stream_t *)&hc->tcp, http_alloc, http_read))
        uv_close((uv_handle_t *)&hc->tcp, http_closed);
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
    uv_tcp_init(&srv->loop, &srv->http);
    srv->http.data = srv;
    srv->have_http = true;
    int rc = uv_tcp_bind(&srv->http, (struct sockaddr *)&ss, flags);
    if (!rc)
        rc = uv_listen((uv_stream_t *)&srv->http, 128, http_on_connection);
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "listen_failed", "proto=http addr=%s port=%d "
                 "err=%s", host, port, uv_err_name(rc));
        return rc;
    }
    int len = sizeof(ss);
    uv_tcp_getsockname(&srv->http, (struct sockaddr *)&ss, &len);
    srv->http_port = ntohs(ss.ss_family == AF_INET6
                               ? ((struct sockaddr_in6 *)&ss)->sin6_port
                               : ((struct sockaddr_in *)&ss)->sin_port);
    kvs__log(KVS__LOG_INFO, "listen", "proto=http addr=%s port=%d", host,
             srv->http_port);
    return 0;
}
