/*
 * server.c: kvstored's I/O loop: listeners (TCP v4/v6, Unix socket),
 * connections, frame dispatch, backpressure, idle timeouts and graceful
 * shutdown, and the worker pool. Engine work runs on the workers (ops.c);
 * the loop thread never calls the engine except to open and close the
 * store.
 *
 * Life of a request: bytes are read straight into the connection's frame
 * reader; each complete frame is decoded and checked here (cheap, and it keeps
 * auth and protocol errors ordered with the stream); Hello and Ping are
 * answered inline, everything else goes to the workers. Answers are appended
 * to the connection's output buffer in completion order (so out of request
 * order) and flushed once per loop iteration by a check handle, which batches
 * pipelined answers into one write.
 *
 * Ordering and fairness: a request that names sequences passes a
 * per-connection gate (changes of a sequence take effect in arrival order,
 * reads wait only for earlier changes they would see), then waits in its
 * connection's ready FIFO; a free worker takes the next request from the
 * connections in round robin. See "ordering and fairness" below.
 *
 * Backpressure: a connection stops being read, and frames already buffered
 * stop being dispatched, while it has max_inflight requests unanswered or
 * more than max_output_bytes of answers unsent; it resumes as they drain.
 * Request bytes buffered over all connections are admitted against
 * max_buffered_bytes (conn_admit); a connection that would exceed it is
 * paused until bytes are released. Before a successful Hello (when a token
 * is set) only frames of PREAUTH_MAX_BODY bytes are accepted. A frame that
 * is started but not completed within frame_timeout_ms closes its
 * connection (slow senders).
 *
 * A protocol error marks the connection `fatal`: it is no longer read, the
 * error is answered (flag CLOSE), requests already running are answered,
 * then it closes. Nothing a peer sends can abort the process.
 */
#include "server_int.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define READ_CHUNK (64u << 10)
/* Largest frame body before authentication: a Hello fits easily. */
#define PREAUTH_MAX_BODY 4096u
/* Frames up to this size (header included) are counted against
 * max_buffered_bytes only once complete (a read chunk is buffered anyway);
 * larger ones as soon as their header is in. */
#define ADMIT_MIN ((uint64_t)READ_CHUNK)

static void conn_process(kvs__conn_t *c);
static void conn_update_reading(kvs__conn_t *c);
static void conn_maybe_close(kvs__conn_t *c);
static void check_drained(kvs_server_t *srv);
static void admit_release(kvs_server_t *srv, uint64_t n);

/* ------------------------------------------------------------ connections */

static void conn_free(kvs__conn_t *c) {
    kvs_frame_reader_destroy(&c->rd);
    free(c->out);
    if (c->seq_qs) {
        /* Empty by now (nothing in flight); free the chains anyway. */
        for (size_t i = 0; i < KVS__SEQ_Q_BUCKETS; i++)
            while (c->seq_qs[i]) {
                kvs__seq_q_t *q = c->seq_qs[i];
                c->seq_qs[i] = q->next;
                free(q);
            }
        free(c->seq_qs);
    }
    free(c);
}

static void on_conn_closed(uv_handle_t *h) {
    kvs__conn_t *c = h->data;
    kvs_server_t *srv = c->srv;
    c->closed = true;
    if (c->prev)
        c->prev->next = c->next;
    else if (srv->conns == c)
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    if (!c->refused)
        srv->n_conns--;
    kvs__log(KVS__LOG_DEBUG, "conn_close", "conn=%llu peer=%s",
             (unsigned long long)c->id, c->peer);
    /* Work items still on the pool hold a pointer to c; the last one frees
     * it (after_work). */
    if (c->inflight == 0)
        conn_free(c);
    check_drained(srv);
}

static void conn_close(kvs__conn_t *c) {
    if (c->closing)
        return;
    c->closing = true;
    c->reading = false;
    /* The frame being read will never complete: give its bytes back. */
    admit_release(c->srv, c->admit);
    c->admit = 0;
    if (c->admit_wait) {
        c->admit_wait = false;
        c->srv->n_admit_wait--;
    }
    uv_close(&c->h.handle, on_conn_closed);
}

/* Close once nothing owed to the peer is left: no requests on the pool, no
 * unflushed answers, no pending writes. */
static void conn_maybe_close(kvs__conn_t *c) {
    if (c->closing || !c->fatal)
        return;
    if (c->inflight == 0 && c->out_len == 0 && c->writes == 0)
        conn_close(c);
}

static void queue_flush(kvs__conn_t *c) {
    if (c->in_flush_list)
        return;
    c->in_flush_list = true;
    c->flush_next = c->srv->flush_list;
    c->srv->flush_list = c;
}

/* Room for `len` more output bytes; false (and the connection closing)
 * when memory runs out. */
static bool conn_reserve(kvs__conn_t *c, size_t len) {
    if (c->out_cap - c->out_len < len) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap - c->out_len < len)
            cap *= 2;
        uint8_t *nb = realloc(c->out, cap);
        if (!nb) {
            kvs__log(KVS__LOG_ERROR, "oom", "conn=%llu what=output_buffer",
                     (unsigned long long)c->id);
            c->fatal = true;
            conn_close(c);
            return false;
        }
        c->out = nb;
        c->out_cap = cap;
    }
    return true;
}

/* Queue a complete frame for the next flush. Takes nothing: copies. */
static void conn_send(kvs__conn_t *c, const uint8_t *frame, size_t len) {
    if (c->closing || !conn_reserve(c, len))
        return;
    memcpy(c->out + c->out_len, frame, len);
    c->out_len += len;
    c->srv->m.bytes_out += len;
    queue_flush(c);
}

/* Answer with an error from the loop thread; `fatal` closes afterwards. */
static void conn_error(kvs__conn_t *c, uint64_t request_id, int op, int status,
                       const char *msg, bool fatal) {
    size_t len;
    uint8_t *f = kvs__error_frame(request_id, fatal ? KVS_FRAME_F_CLOSE : 0,
                                  status, msg, &len);
    if (f) {
        conn_send(c, f, len);
        free(f);
    }
    kvs__metrics_observe(&c->srv->m, op, status, 0);
    if (fatal) {
        char q[600];
        kvs__log(KVS__LOG_WARN, "conn_error",
                 "conn=%llu peer=%s request_id=%llu status=%s msg=%s",
                 (unsigned long long)c->id, c->peer,
                 (unsigned long long)request_id, kvs_err_name(status),
                 kvs__logq(q, sizeof(q), msg));
        if (!c->fatal)
            c->fatal_at = uv_now(&c->srv->loop);
        c->fatal = true;
        conn_update_reading(c);
    }
}

typedef struct write_req_s {
    uv_write_t req;
    uint8_t *buf;
} write_req_t;

static void on_write(uv_write_t *req, int status) {
    write_req_t *wr = (write_req_t *)req;
    kvs__conn_t *c = req->data;
    free(wr->buf);
    free(wr);
    c->writes--;
    c->last_write = uv_now(&c->srv->loop);
    if (status < 0 && !c->closing) {
        kvs__log(KVS__LOG_INFO, "conn_write_error", "conn=%llu peer=%s err=%s",
                 (unsigned long long)c->id, c->peer, uv_err_name(status));
        conn_close(c);
    }
    if (!c->closing) {
        conn_update_reading(c);
        conn_process(c);
        conn_maybe_close(c);
    }
    check_drained(c->srv);
}

static void conn_flush(kvs__conn_t *c) {
    if (c->closing || c->out_len == 0)
        return;
    size_t off = 0;
    /* Try the socket directly: most answers fit the socket buffer and need
     * no write request at all. Only valid when nothing is queued, or bytes
     * would be reordered. */
    if (c->writes == 0) {
        uv_buf_t b = uv_buf_init((char *)c->out, (unsigned)c->out_len);
        int n = uv_try_write(&c->h.stream, &b, 1);
        if (n > 0)
            off = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN) {
            conn_close(c);
            return;
        }
    }
    if (off == c->out_len) {
        c->out_len = 0;
        if (c->out_cap > (1u << 20)) { /* do not keep a big answer's buffer */
            free(c->out);
            c->out = NULL;
            c->out_cap = 0;
        }
        conn_maybe_close(c);
        /* Output that held back reading (max_output_bytes) is gone with
         * no write callback to say so. */
        if (!c->closing) {
            conn_update_reading(c);
            conn_process(c);
        }
        return;
    }
    write_req_t *wr = malloc(sizeof(*wr));
    if (!wr) {
        conn_close(c);
        return;
    }
    /* Hand the whole buffer to the write; start a fresh one for later. */
    wr->buf = c->out;
    wr->req.data = c;
    uv_buf_t b =
        uv_buf_init((char *)c->out + off, (unsigned)(c->out_len - off));
    c->out = NULL;
    c->out_len = c->out_cap = 0;
    int rc = uv_write(&wr->req, &c->h.stream, &b, 1, on_write);
    if (rc) {
        free(wr->buf);
        free(wr);
        conn_close(c);
        return;
    }
    if (c->writes++ == 0) /* the write-stall clock starts now */
        c->last_write = uv_now(&c->srv->loop);
    conn_update_reading(c);
}

static bool conn_admit(kvs__conn_t *c);

static void on_flush_check(uv_check_t *h) {
    kvs_server_t *srv = h->data;
    if (srv->admit_retry) {
        /* Bytes of max_buffered_bytes were released: let paused
         * connections try again, in list order. */
        srv->admit_retry = false;
        for (kvs__conn_t *c = srv->conns; c && srv->n_admit_wait; c = c->next)
            if (c->admit_wait && conn_admit(c))
                conn_process(c); /* its buffered frames, then reading */
    }
    /* Flushing can resume a connection whose frames answer inline and
     * queue more output: loop until nothing is left, so no answer waits for
     * the next wake-up of the loop. Each round consumes buffered frames, so
     * this ends. */
    while (srv->flush_list) {
        kvs__conn_t *c = srv->flush_list;
        srv->flush_list = NULL;
        while (c) {
            kvs__conn_t *next = c->flush_next;
            c->in_flush_list = false;
            c->flush_next = NULL;
            conn_flush(c);
            c = next;
        }
    }
    /* The last answers of a drain usually leave through uv_try_write, with
     * no write callback to notice that the drain is complete. */
    check_drained(srv);
}

/* Answer bytes owed to the peer and not yet taken by the kernel. */
static size_t conn_out_bytes(const kvs__conn_t *c) {
    return c->out_len + uv_stream_get_write_queue_size(&c->h.stream);
}

/* May buffered frames of c be dispatched now? */
static bool conn_may_dispatch(const kvs__conn_t *c) {
    const kvs_server_t *srv = c->srv;
    return !c->closing && !c->fatal && !srv->draining &&
           c->inflight < srv->cfg->max_inflight &&
           conn_out_bytes(c) <= srv->cfg->max_output_bytes;
}

static bool conn_wants_input(const kvs__conn_t *c) {
    return conn_may_dispatch(c) && !c->admit_wait;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    kvs__conn_t *c = h->data;
    (void)suggested;
    void *p;
    size_t len;
    /* Before Hello a frame is at most PREAUTH_MAX_BODY: read no more. */
    size_t want =
        c->authed ? READ_CHUNK : KVS_FRAME_HEADER_SIZE + PREAUTH_MAX_BODY;
    if (kvs_frame_reader_prepare(&c->rd, want, &p, &len)) {
        *buf = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
        return;
    }
    *buf = uv_buf_init(p, (unsigned)(len > UINT32_MAX ? UINT32_MAX : len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    kvs__conn_t *c = s->data;
    (void)buf;
    if (nread < 0) {
        if (nread != UV_EOF)
            kvs__log(KVS__LOG_INFO, "conn_read_error",
                     "conn=%llu peer=%s err=%s", (unsigned long long)c->id,
                     c->peer, uv_err_name((int)nread));
        /* The peer is gone: answers cannot be delivered. Requests on the
         * pool finish (the engine applies them) and are dropped. */
        conn_close(c);
        return;
    }
    if (nread == 0)
        return;
    kvs_frame_reader_commit(&c->rd, (size_t)nread);
    c->srv->m.bytes_in += (uint64_t)nread;
    c->last_active = uv_now(&c->srv->loop);
    if (!c->frame_start)
        c->frame_start = c->last_active;
    conn_process(c);
}

static void conn_update_reading(kvs__conn_t *c) {
    bool want = conn_wants_input(c);
    if (want && !c->reading) {
        if (uv_read_start(&c->h.stream, on_alloc, on_read) == 0)
            c->reading = true;
        /* The frame deadline is the peer's: time spent paused by us does
         * not count. */
        if (c->frame_start)
            c->frame_start = uv_now(&c->srv->loop);
    } else if (!want && c->reading) {
        uv_read_stop(&c->h.stream);
        c->reading = false;
    }
}

/* Constant-time in the content of `given`: no early exit on a mismatch.
 * `gl` is the token's length on the wire: protobuf-c hands over a C string
 * that stops at the first NUL, so "token\0junk" would compare equal to
 * "token" by strlen. protobuf-c copies all gl bytes (plus a NUL), so
 * given[0..gl) is readable. */
static bool token_equal(const char *expect, const char *given, size_t gl) {
    size_t el = strlen(expect);
    volatile unsigned diff = el != gl;
    for (size_t i = 0; i < el; i++) {
        unsigned char g = i < gl ? (unsigned char)given[i] : 0;
        diff |= (unsigned)((unsigned char)expect[i] ^ g);
    }
    return diff == 0;
}

static bool pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return true;
    }
    return false;
}

/* The next field of a protobuf message in [*p, end): its number, and for a
 * length-delimited one its bytes (*val NULL for others). false at the end
 * or on malformed input. */
static bool pb_next(const uint8_t **p, const uint8_t *end, uint64_t *field,
                    const uint8_t **val, size_t *len) {
    uint64_t key, n;
    if (*p >= end || !pb_varint(p, end, &key))
        return false;
    *field = key >> 3;
    *val = NULL;
    *len = 0;
    switch (key & 7) {
    case 0:
        return pb_varint(p, end, &n);
    case 1:
        if (end - *p < 8)
            return false;
        *p += 8;
        return true;
    case 5:
        if (end - *p < 4)
            return false;
        *p += 4;
        return true;
    case 2:
        if (!pb_varint(p, end, &n) || n > (uint64_t)(end - *p))
            return false;
        *val = *p;
        *len = (size_t)n;
        *p += n;
        return true;
    default:
        return false;
    }
}

/* Wire length of Request.hello.auth_token (fields 1 and 2); 0 if absent.
 * Repeated hello fields merge, so the last token seen counts. */
static size_t hello_token_len(const uint8_t *body, size_t len) {
    const uint8_t *p = body, *end = body + len, *hv, *tv;
    uint64_t f, g;
    size_t hl, tl, token = 0;
    while (pb_next(&p, end, &f, &hv, &hl)) {
        if (f != 1 || !hv)
            continue;
        const uint8_t *q = hv;
        while (pb_next(&q, hv + hl, &g, &tv, &tl))
            if (g == 2 && tv)
                token = tl;
    }
    return token;
}

/* Answer from the loop thread, packed straight into the output buffer: a
 * pipelined ping costs no allocation and no copy. */
static void answer_inline(kvs__conn_t *c, uint64_t id, int op,
                          Kvs__V1__Response *resp) {
    resp->request_id = id;
    size_t body = protobuf_c_message_get_packed_size(&resp->base);
    if (body > c->srv->cfg->max_frame_bytes) {
        conn_error(c, id, op, KVS_ETOOBIG, "response exceeds max_frame_bytes",
                   false);
        return;
    }
    size_t len = KVS_FRAME_HEADER_SIZE + body;
    if (c->closing || !conn_reserve(c, len))
        return;
    kvs_frame_encode_to(id, KVS_FRAME_F_RESPONSE, &resp->base, body,
                        c->out + c->out_len);
    c->out_len += len;
    c->srv->m.bytes_out += len;
    queue_flush(c);
    kvs__metrics_observe(&c->srv->m, op, 0, 0);
}

static void handle_hello(kvs__conn_t *c, uint64_t id,
                         const Kvs__V1__HelloRequest *h, size_t token_len) {
    kvs_server_t *srv = c->srv;
    const kvs_server_config_t *cfg = srv->cfg;
    int op = KVS__V1__REQUEST__OP_HELLO;
    if (h->protocol_version != KVS_PROTOCOL_VERSION) {
        char m[128];
        snprintf(m, sizeof(m),
                 "protocol version %u not supported; this server speaks %d",
                 h->protocol_version, KVS_PROTOCOL_VERSION);
        conn_error(c, id, op, KVS_EPROTO, m, true);
        return;
    }
    if (cfg->auth_token[0]) {
        if (!h->auth_token ||
            !token_equal(cfg->auth_token, h->auth_token, token_len)) {
            srv->m.auth_failures++;
            conn_error(c, id, op, KVS_EAUTH,
                       h->auth_token && h->auth_token[0]
                           ? "authentication failed: wrong token"
                           : "authentication required: send the token in "
                             "Hello",
                       true);
            return;
        }
        c->authed = true;
        c->rd.max_body = (uint32_t)cfg->max_frame_bytes;
    }
    char q[200];
    kvs__log(KVS__LOG_DEBUG, "hello", "conn=%llu peer=%s client=%s",
             (unsigned long long)c->id, c->peer,
             kvs__logq(q, sizeof(q), h->client_name ? h->client_name : ""));
    Kvs__V1__Response resp = KVS__V1__RESPONSE__INIT;
    Kvs__V1__HelloResponse hr = KVS__V1__HELLO_RESPONSE__INIT;
    hr.protocol_version = KVS_PROTOCOL_VERSION;
    hr.server_version = (char *)KVS_SERVER_VERSION;
    hr.node_id = srv->node_id;
    hr.max_frame_bytes = (uint32_t)cfg->max_frame_bytes;
    hr.max_head_dim = cfg->max_head_dim;
    hr.max_tokens_per_append = cfg->max_tokens_per_append;
    hr.max_inflight = cfg->max_inflight;
    hr.auth_required = cfg->auth_token[0] != 0;
    resp.result_case = KVS__V1__RESPONSE__RESULT_HELLO;
    resp.hello = &hr;
    answer_inline(c, id, op, &resp);
}

/* ---------------------------------------------- ordering and fairness */

/*
 * Ordering. A request that names a sequence joins that sequence's queue in
 * its connection, in arrival order, and leaves the gate once nothing before
 * it in the queue conflicts with it (gate_free): a whole-sequence change
 * (create, drop, fork, set_ttl) waits for every earlier request; an append
 * waits for earlier appends and reads of its layer, earlier infos and
 * whole-sequence changes; a search or attend waits for earlier appends of
 * its layer and whole-sequence changes; an info for every earlier change.
 * So each request sees exactly the changes of its sequence (layer) sent
 * before it on its connection, changes take effect in the order sent, and
 * reads, and appends to different layers, overlap freely. Fork names both
 * of its sequences and waits in both queues. Stats and list name none and
 * never wait.
 *
 * Fairness. Requests that left the gate wait in their connection's ready
 * FIFO. A worker that becomes free takes the next request from the
 * connections with ready work in round robin (worker_main): a request of
 * another connection waits for the requests already running, not for a
 * whole pipeline queued ahead of it in a FIFO.
 */

static size_t seq_bucket(uint64_t seq) {
    return (size_t)((seq * 0x9E3779B97F4A7C15ull) >> 32) % KVS__SEQ_Q_BUCKETS;
}

static kvs__seq_q_t *seq_q_get(kvs__conn_t *c, uint64_t seq) {
    if (!c->seq_qs) {
        c->seq_qs = calloc(KVS__SEQ_Q_BUCKETS, sizeof(*c->seq_qs));
        if (!c->seq_qs)
            return NULL;
    }
    size_t b = seq_bucket(seq);
    for (kvs__seq_q_t *q = c->seq_qs[b]; q; q = q->next)
        if (q->seq == seq)
            return q;
    kvs__seq_q_t *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->seq = seq;
    q->next = c->seq_qs[b];
    c->seq_qs[b] = q;
    return q;
}

/* Free an empty queue: a connection touching many sequences over its life
 * keeps only those with requests pending. */
static void seq_q_put(kvs__conn_t *c, kvs__seq_q_t *q) {
    if (q->head)
        return;
    kvs__seq_q_t **pp = &c->seq_qs[seq_bucket(q->seq)];
    while (*pp != q)
        pp = &(*pp)->next;
    *pp = q->next;
    free(q);
}

/* What a request does to the sequences it names, for the gate. */
enum {
    GATE_READ,     /* search, attend: reads one layer */
    GATE_READ_ALL, /* info: reads every layer */
    GATE_APPEND,   /* append: changes one layer */
    GATE_WIDE      /* create, drop, fork, set_ttl: the whole sequence */
};

/* The sequences a request names (0, 1 or 2), with w->kind and w->layer. */
static int request_seqs(kvs__work_t *w, uint64_t seqs[2]) {
    const Kvs__V1__Request *m = w->msg;
    w->kind = GATE_WIDE;
    w->layer = 0;
    switch (m->op_case) {
    case KVS__V1__REQUEST__OP_CREATE:
        seqs[0] = m->create->seq;
        return 1;
    case KVS__V1__REQUEST__OP_DROP:
        seqs[0] = m->drop->seq;
        return 1;
    case KVS__V1__REQUEST__OP_SET_TTL:
        seqs[0] = m->set_ttl->seq;
        return 1;
    case KVS__V1__REQUEST__OP_FORK:
        /* A fork reads src (its length, with `whole`) and creates dst:
         * ordered against both, as a change of both for simplicity. */
        seqs[0] = m->fork->src;
        seqs[1] = m->fork->dst;
        return seqs[0] == seqs[1] ? 1 : 2;
    case KVS__V1__REQUEST__OP_APPEND:
        w->kind = GATE_APPEND;
        w->layer = m->append->layer;
        seqs[0] = m->append->seq;
        return 1;
    case KVS__V1__REQUEST__OP_SEARCH:
        w->kind = GATE_READ;
        w->layer = m->search->layer;
        seqs[0] = m->search->seq;
        return 1;
    case KVS__V1__REQUEST__OP_ATTEND:
        w->kind = GATE_READ;
        w->layer = m->attend->layer;
        seqs[0] = m->attend->seq;
        return 1;
    case KVS__V1__REQUEST__OP_OBSERVE:
        /* Ordered as a change of its layer: a later attend sees it. */
        w->kind = GATE_APPEND;
        w->layer = m->observe->layer;
        seqs[0] = m->observe->seq;
        return 1;
    case KVS__V1__REQUEST__OP_SEQ_IMPORT: /* repair: the whole sequence */
        seqs[0] = m->seq_import->seq;
        return 1;
    case KVS__V1__REQUEST__OP_INFO:
        w->kind = GATE_READ_ALL;
        seqs[0] = m->info->seq;
        return 1;
    case KVS__V1__REQUEST__OP_FLUSH:
        /* Waits, as an info, for every earlier change of its sequence on
         * this connection: those appends are queued before it runs. */
        w->kind = GATE_READ_ALL;
        seqs[0] = m->flush->seq;
        return 1;
    default:
        w->kind = GATE_READ_ALL;
        return 0;
    }
}

static int q_slot(const kvs__work_t *w, const kvs__seq_q_t *q) {
    return w->q[0] == q ? 0 : 1;
}

/* What the earlier requests of a queue still hold. Layers are kept modulo
 * 256: two layers that alias are merely ordered when they need not be. */
typedef struct gate_seen_s {
    bool any, wide, append_any, read_all;
    uint64_t app[4], rd[4];
} gate_seen_t;

static bool layer_in(const uint64_t *set, uint32_t layer) {
    layer &= 255;
    return (set[layer >> 6] >> (layer & 63)) & 1;
}

static void layer_add(uint64_t *set, uint32_t layer) {
    layer &= 255;
    set[layer >> 6] |= 1ull << (layer & 63);
}

/* May e run, given the requests before it in one queue? Appends of one
 * layer run one at a time and never overlap a read of that layer sent
 * before or after them; appends of different layers overlap; a whole-
 * sequence change waits for everything before it and holds everything
 * after it. */
static bool gate_free(const gate_seen_t *s, const kvs__work_t *e) {
    switch (e->kind) {
    case GATE_WIDE:
        return !s->any;
    case GATE_APPEND:
        return !s->wide && !s->read_all && !layer_in(s->app, e->layer) &&
               !layer_in(s->rd, e->layer);
    case GATE_READ:
        return !s->wide && !layer_in(s->app, e->layer);
    default:
        return !s->wide && !s->append_any;
    }
}

static void gate_see(gate_seen_t *s, const kvs__work_t *e) {
    s->any = true;
    switch (e->kind) {
    case GATE_WIDE:
        s->wide = true;
        break;
    case GATE_APPEND:
        s->append_any = true;
        layer_add(s->app, e->layer);
        break;
    case GATE_READ:
        layer_add(s->rd, e->layer);
        break;
    default:
        s->read_all = true;
        break;
    }
}

/* May w leave the gate as far as queue slot i is concerned? */
static bool gate_open_at(const kvs__work_t *w, int i) {
    const kvs__seq_q_t *q = w->q[i];
    gate_seen_t s;
    memset(&s, 0, sizeof(s));
    for (const kvs__work_t *e = q->head; e != w; e = e->qnext[q_slot(e, q)])
        gate_see(&s, e);
    return gate_free(&s, w);
}

static bool gate_open(const kvs__work_t *w) {
    for (int i = 0; i < w->n_q; i++)
        if (!gate_open_at(w, i))
            return false;
    return true;
}

/* w may run: queue it for the workers (loop thread). */
static void work_ready(kvs__conn_t *c, kvs__work_t *w) {
    kvs_server_t *srv = c->srv;
    w->started = true;
    if (srv->running++ == 0)
        uv_ref((uv_handle_t *)&srv->done_async); /* keep the loop alive */
    pthread_mutex_lock(&srv->pool_mu);
    w->ready_next = NULL;
    if (c->ready_tail)
        c->ready_tail->ready_next = w;
    else
        c->ready_head = w;
    c->ready_tail = w;
    if (!c->in_rr) {
        c->in_rr = true;
        c->rr_next = NULL;
        if (srv->rr_tail)
            srv->rr_tail->rr_next = c;
        else
            srv->rr_head = c;
        srv->rr_tail = c;
    }
    pthread_cond_signal(&srv->pool_cv);
    pthread_mutex_unlock(&srv->pool_mu);
}

/* Put w at the tail of the queues of the sequences it names. Errors:
 * KVS_ENOMEM (w is in no queue then). */
static int gate_enter(kvs__conn_t *c, kvs__work_t *w) {
    uint64_t seqs[2];
    w->n_q = request_seqs(w, seqs);
    for (int i = 0; i < w->n_q; i++) {
        w->q[i] = seq_q_get(c, seqs[i]);
        if (!w->q[i]) {
            for (int j = 0; j < i; j++)
                seq_q_put(c, w->q[j]);
            w->n_q = 0;
            return KVS_ENOMEM;
        }
    }
    for (int i = 0; i < w->n_q; i++) {
        kvs__seq_q_t *q = w->q[i];
        w->qprev[i] = q->tail;
        w->qnext[i] = NULL;
        if (q->tail)
            q->tail->qnext[q_slot(q->tail, q)] = w;
        else
            q->head = w;
        q->tail = w;
    }
    return 0;
}

/* w is answered: take it out of its queues and open the gate for what
 * waited behind it. */
static void gate_leave(kvs__conn_t *c, kvs__work_t *w) {
    for (int i = 0; i < w->n_q; i++) {
        kvs__seq_q_t *q = w->q[i];
        kvs__work_t *p = w->qprev[i], *n = w->qnext[i];
        if (p)
            p->qnext[q_slot(p, q)] = n;
        else
            q->head = n;
        if (n)
            n->qprev[q_slot(n, q)] = p;
        else
            q->tail = p;
        /* One pass: what each request waits for is what came before it.
         * Nothing behind a whole-sequence change can run. */
        gate_seen_t seen;
        memset(&seen, 0, sizeof(seen));
        for (kvs__work_t *e = q->head; e && !seen.wide;
             e = e->qnext[q_slot(e, q)]) {
            if (!e->started && gate_free(&seen, e) &&
                (e->n_q == 1 || gate_open(e)))
                work_ready(c, e);
            gate_see(&seen, e);
        }
    }
    for (int i = 0; i < w->n_q; i++)
        seq_q_put(c, w->q[i]);
    w->n_q = 0;
}

static void work_done(kvs__work_t *w);

/*
 * The worker pool: `workers` threads that take the next ready request from
 * the connections in round robin, at the moment they become free, so a
 * connection's request waits for at most the requests already running; and
 * that go on to the next request without waiting for the loop thread, which
 * collects finished requests in batches (done_async).
 */
static void *worker_main(void *arg) {
    kvs_server_t *srv = arg;
    pthread_mutex_lock(&srv->pool_mu);
    for (;;) {
        while (!srv->pool_stop && !srv->rr_head)
            pthread_cond_wait(&srv->pool_cv, &srv->pool_mu);
        if (!srv->rr_head) /* stopping, and nothing left */
            break;
        kvs__conn_t *c = srv->rr_head;
        kvs__work_t *w = c->ready_head;
        srv->rr_head = c->rr_next;
        if (!srv->rr_head)
            srv->rr_tail = NULL;
        c->rr_next = NULL;
        c->in_rr = false;
        c->ready_head = w->ready_next;
        if (!c->ready_head)
            c->ready_tail = NULL;
        if (c->ready_head) { /* back of the line */
            c->in_rr = true;
            if (srv->rr_tail)
                srv->rr_tail->rr_next = c;
            else
                srv->rr_head = c;
            srv->rr_tail = c;
        }
        pthread_mutex_unlock(&srv->pool_mu);
        kvs__op_run(w);
        pthread_mutex_lock(&srv->pool_mu);
        w->ready_next = srv->done;
        srv->done = w;
        uv_async_send(&srv->done_async);
    }
    pthread_mutex_unlock(&srv->pool_mu);
    return NULL;
}

static void on_done_async(uv_async_t *a) {
    kvs_server_t *srv = a->data;
    pthread_mutex_lock(&srv->pool_mu);
    kvs__work_t *list = srv->done;
    srv->done = NULL;
    pthread_mutex_unlock(&srv->pool_mu);
    /* The list is newest first: answer in completion order. */
    kvs__work_t *fifo = NULL;
    while (list) {
        kvs__work_t *n = list->ready_next;
        list->ready_next = fifo;
        fifo = list;
        list = n;
    }
    while (fifo) {
        kvs__work_t *n = fifo->ready_next;
        work_done(fifo);
        fifo = n;
    }
}

static int pool_start(kvs_server_t *srv) {
    srv->pool_threads = calloc(srv->cfg->workers, sizeof(pthread_t));
    if (!srv->pool_threads)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < srv->cfg->workers; i++) {
        int rc = pthread_create(&srv->pool_threads[i], NULL, worker_main, srv);
        if (rc)
            return -rc; /* pool_close joins those that started */
        srv->n_pool_threads++;
    }
    return 0;
}

/* Once the loop has run out of work (nothing running: done_async is
 * ref'd while anything is), join the idle workers and close done_async. */
static void pool_close(kvs_server_t *srv) {
    pthread_mutex_lock(&srv->pool_mu);
    srv->pool_stop = true;
    pthread_cond_broadcast(&srv->pool_cv);
    pthread_mutex_unlock(&srv->pool_mu);
    for (uint32_t i = 0; i < srv->n_pool_threads; i++)
        pthread_join(srv->pool_threads[i], NULL);
    srv->n_pool_threads = 0;
    free(srv->pool_threads);
    srv->pool_threads = NULL;
    if (srv->have_async) {
        srv->have_async = false;
        uv_close((uv_handle_t *)&srv->done_async, NULL);
        uv_run(&srv->loop, UV_RUN_DEFAULT);
    }
}

/* ------------------------------------------------------------ admission */

static void admit_release(kvs_server_t *srv, uint64_t n) {
    if (!n)
        return;
    srv->admitted -= n;
    if (n > ADMIT_MIN)
        srv->admitted_large -= n;
    if (srv->n_admit_wait)
        srv->admit_retry = true; /* on_flush_check retries the waiters */
}

/*
 * Count the frame at the front of c's reader against max_buffered_bytes,
 * once: a large frame (over ADMIT_MIN) as soon as its header is in, before
 * its body is buffered; a small one when it is complete, before it is
 * decoded and queued. A frame that does not fit waits (c is not read, its
 * frames not dispatched) until bytes are released, except that one large
 * frame may always be admitted when no other is (a frame larger than the
 * budget cannot starve), and a small one when its connection has nothing
 * in flight (every connection makes progress). Returns false when c must
 * wait.
 */
static bool conn_admit(kvs__conn_t *c) {
    kvs_server_t *srv = c->srv;
    uint64_t cap = srv->cfg->max_buffered_bytes;
    size_t have;
    const uint8_t *front = kvs_frame_reader_front(&c->rd, &have);
    kvs_frame_header_t h;
    bool ok = true;
    if (c->admit || !cap || have < KVS_FRAME_HEADER_SIZE ||
        kvs_frame_header_decode(front, have, c->rd.max_body, &h, NULL, 0))
        goto out; /* nothing to admit; a bad header is reported by next() */
    uint64_t total = KVS_FRAME_HEADER_SIZE + (uint64_t)h.body_len;
    bool large = total > ADMIT_MIN;
    if (!large && have < total)
        goto out; /* a read chunk at most: counted once complete */
    if (srv->admitted + total > cap &&
        (large ? srv->admitted_large != 0 : c->inflight != 0)) {
        ok = false;
        if (!c->admit_wait)
            kvs__log(KVS__LOG_DEBUG, "conn_admit_wait",
                     "conn=%llu frame_bytes=%llu buffered=%llu",
                     (unsigned long long)c->id, (unsigned long long)total,
                     (unsigned long long)srv->admitted);
        goto out;
    }
    c->admit = total;
    srv->admitted += total;
    if (large)
        srv->admitted_large += total;
out:
    if (ok && c->admit_wait) {
        c->admit_wait = false;
        srv->n_admit_wait--;
    } else if (!ok && !c->admit_wait) {
        c->admit_wait = true;
        srv->n_admit_wait++;
    }
    return ok;
}

/* Loop thread: w ran; answer it and let what waited behind it go. */
static void work_done(kvs__work_t *w) {
    kvs__conn_t *c = w->conn;
    kvs_server_t *srv = w->srv;
    double secs = (double)(uv_hrtime() - w->t0) / 1e9;
    kvs__metrics_observe(&srv->m, w->op, w->status, secs);
    if (w->status && w->status != KVS_ENOSEQ)
        kvs__log(KVS__LOG_DEBUG, "request_error", "conn=%llu op=%s status=%s",
                 (unsigned long long)c->id, kvs_frame_op_name(w->op),
                 kvs_err_name(w->status));
    c->inflight--;
    srv->inflight--;
    if (--srv->running == 0)
        uv_unref((uv_handle_t *)&srv->done_async);
    gate_leave(c, w);
    admit_release(srv, w->admit);
    if (w->frame && !c->closing) {
        conn_send(c, w->frame, w->frame_len);
        c->last_active = uv_now(&srv->loop);
    }
    free(w->frame);
    kvs_frame_request_release(&w->req);
    kvs__bufpool_free(&srv->bufpool, w->body_buf);
    free(w);
    if (c->closed) {
        if (c->inflight == 0)
            conn_free(c);
    } else if (!c->closing) {
        conn_update_reading(c);
        conn_process(c);
        conn_maybe_close(c);
    }
    check_drained(srv);
}

/* Ping without payload is the liveness probe and the pipelining benchmark;
 * its request and answer have one encoding each, so skip protobuf for it.
 * The answer is exactly what protobuf-c packs for Response{request_id, ping
 * {}}: field 1 varint (omitted when 0), field 19 empty message. */
static bool try_fast_ping(kvs__conn_t *c, const kvs_frame_header_t *hdr,
                          const uint8_t *body) {
    /* Request{ping: {}}: tag (10 << 3 | 2) = 0x52, length 0. */
    if (hdr->body_len != 2 || body[0] != 0x52 || body[1] != 0 || !c->authed)
        return false;
    uint8_t b[16];
    size_t n = 0;
    uint64_t id = hdr->request_id;
    if (id) {
        b[n++] = 0x08;
        while (id >= 0x80) {
            b[n++] = (uint8_t)(id | 0x80);
            id >>= 7;
        }
        b[n++] = (uint8_t)id;
    }
    b[n++] = 0x9a; /* (19 << 3 | 2) as a varint */
    b[n++] = 0x01;
    b[n++] = 0x00;
    size_t len = KVS_FRAME_HEADER_SIZE + n;
    if (c->closing || !conn_reserve(c, len))
        return true;
    kvs_frame_header_t h = {.magic = KVS_FRAME_MAGIC,
                            .version = KVS_PROTOCOL_VERSION,
                            .flags = KVS_FRAME_F_RESPONSE,
                            .request_id = hdr->request_id,
                            .body_len = (uint32_t)n};
    kvs_frame_header_encode(&h, c->out + c->out_len);
    memcpy(c->out + c->out_len + KVS_FRAME_HEADER_SIZE, b, n);
    c->out_len += len;
    c->srv->m.bytes_out += len;
    queue_flush(c);
    kvs__metrics_observe(&c->srv->m, KVS__V1__REQUEST__OP_PING, 0, 0);
    return true;
}

/* Handle one frame. `*admit` is the max_buffered_bytes share of its bytes:
 * taken (zeroed) when the request is queued, and released when it is
 * answered; the caller releases what is left. `*direct` is the frame's own
 * buffer (a direct frame, else NULL): taken (zeroed) when the queued
 * request borrows from it (an append decoded in place), else the caller
 * frees it. */
static void dispatch(kvs__conn_t *c, const kvs_frame_header_t *hdr,
                     const uint8_t *body, uint64_t *admit, uint8_t **direct) {
    kvs_server_t *srv = c->srv;
    if (try_fast_ping(c, hdr, body))
        return;
    char why[512];
    /* Only a body in its own buffer can outlive this call: one in the
     * shared read buffer is unpacked (copied) as before. */
    kvs_frame_request_t req = {0};
    int rc =
        *direct ? kvs_frame_decode_request_in_place(
                      body, hdr->body_len, &srv->limits, &req, why, sizeof(why))
                : kvs_frame_decode_request(body, hdr->body_len, &srv->limits,
                                           &req.msg, why, sizeof(why));
    Kvs__V1__Request *msg = req.msg;
    if (msg && msg->op_case == KVS__V1__REQUEST__OP_APPEND && msg->append) {
        size_t n = msg->append->keys.len + msg->append->values.len;
        srv->m.append_payload_bytes += n;
        srv->m.copied_decode_bytes += req.borrowed ? 0 : n;
        srv->m.appends_in_place += req.borrowed ? 1 : 0;
    }
    int op = msg ? (int)msg->op_case : 0;
    if (op < 0 || op >= KVS__N_OPS)
        op = 0;
    if (rc == KVS_EPROTO) {
        /* Not a request we can understand: the stream is suspect. */
        srv->m.protocol_errors++;
        conn_error(c, hdr->request_id, op, rc, why, true);
        goto done;
    }
    if (!c->authed && op != KVS__V1__REQUEST__OP_HELLO) {
        srv->m.auth_failures++;
        conn_error(c, hdr->request_id, op, KVS_EAUTH,
                   "authentication required: the first request must be Hello "
                   "with the server's token",
                   true);
        goto done;
    }
    if (rc) { /* well-formed but out of limits: refuse this request only */
        conn_error(c, hdr->request_id, op, rc, why, false);
        goto done;
    }
    if (op == KVS__V1__REQUEST__OP_HELLO) {
        handle_hello(c, hdr->request_id, msg->hello,
                     hello_token_len(body, hdr->body_len));
        goto done;
    }
    if (op == KVS__V1__REQUEST__OP_PING) {
        /* Inline: a ping measures the server's I/O path, not the pool. */
        Kvs__V1__Response resp = KVS__V1__RESPONSE__INIT;
        Kvs__V1__PingResponse pr = KVS__V1__PING_RESPONSE__INIT;
        pr.payload = msg->ping->payload;
        resp.result_case = KVS__V1__RESPONSE__RESULT_PING;
        resp.ping = &pr;
        answer_inline(c, hdr->request_id, op, &resp);
        goto done;
    }
    kvs__work_t *w = calloc(1, sizeof(*w));
    if (!w) {
        conn_error(c, hdr->request_id, op, KVS_ENOMEM,
                   "out of memory queuing the request", false);
        goto done;
    }
    w->conn = c;
    w->srv = srv;
    w->req = req;
    w->msg = msg;
    if (req.borrowed) {
        w->body_buf = *direct;
        *direct = NULL;
    }
    w->request_id = hdr->request_id;
    w->op = op;
    w->t0 = uv_hrtime();
    if (op == KVS__V1__REQUEST__OP_STATS) {
        uint64_t total = 0;
        for (int i = 0; i < KVS__N_OPS; i++)
            total += srv->m.requests[i];
        w->snap_connections = srv->n_conns;
        w->snap_requests = total;
        w->snap_inflight = srv->inflight;
        w->snap_in = srv->m.bytes_in;
        w->snap_out = srv->m.bytes_out;
    }
    if (gate_enter(c, w)) {
        if (w->body_buf) { /* back to the caller, who frees it */
            *direct = w->body_buf;
        }
        free(w);
        conn_error(c, hdr->request_id, op, KVS_ENOMEM,
                   "out of memory queuing the request", false);
        goto done;
    }
    w->admit = *admit;
    *admit = 0;
    c->inflight++;
    srv->inflight++;
    if (gate_open(w))
        work_ready(c, w);
    return; /* w owns msg */
done:
    kvs_frame_request_release(&req);
}

/* Take frames out of the reader while this connection may have more work. */
static void conn_process(kvs__conn_t *c) {
    kvs_server_t *srv = c->srv;
    bool consumed = false;
    while (conn_may_dispatch(c) && conn_admit(c)) {
        kvs_frame_header_t hdr;
        const uint8_t *body;
        char why[256];
        int rc = kvs_frame_reader_next(&c->rd, &hdr, &body, why, sizeof(why));
        if (rc == 0)
            break;
        if (rc < 0) {
            srv->m.protocol_errors++;
            /* Bad magic means the id is garbage too: answer with id 0. */
            uint64_t id = hdr.magic == KVS_FRAME_MAGIC ? hdr.request_id : 0;
            if (rc == KVS_ETOOBIG && !c->authed)
                snprintf(why, sizeof(why),
                         "frame body of %u bytes before authentication "
                         "(limit %u until Hello succeeds)",
                         hdr.body_len, PREAUTH_MAX_BODY);
            conn_error(c, id, 0, rc, why, true);
            break;
        }
        consumed = true;
        uint64_t admit = c->admit;
        c->admit = 0;
        if (hdr.flags & KVS_FRAME_F_RESPONSE) {
            admit_release(srv, admit);
            srv->m.protocol_errors++;
            conn_error(c, hdr.request_id, 0, KVS_EPROTO,
                       "a client sent a frame flagged as a response", true);
            break;
        }
        uint8_t *direct = kvs_frame_reader_take(&c->rd);
        dispatch(c, &hdr, body, &admit, &direct);
        kvs__bufpool_free(&srv->bufpool, direct);
        admit_release(srv, admit);
    }
    srv->m.copied_reader_bytes += c->rd.copied;
    c->rd.copied = 0;
    /* A large frame at the front is counted before more of it is read (a
     * paused connection is retried by on_flush_check). */
    if (!c->closing && !c->fatal)
        conn_admit(c);
    /* The frame deadline runs from the first byte of the frame now at the
     * front; bytes behind a completed frame came with its last read. */
    if (kvs_frame_reader_pending(&c->rd) == 0)
        c->frame_start = 0;
    else if (consumed)
        c->frame_start = uv_now(&srv->loop);
    conn_update_reading(c);
}

/* ------------------------------------------------------------- listeners */

static void set_peer_name(kvs__conn_t *c, bool is_tcp) {
    if (!is_tcp) {
        snprintf(c->peer, sizeof(c->peer), "unix");
        return;
    }
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    char ip[64] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof(ip));
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
            snprintf(c->peer, sizeof(c->peer), "[%s]:%d", ip, port);
            return;
        }
        uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof(ip));
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    snprintf(c->peer, sizeof(c->peer), "%s:%d", ip, port);
}

static void on_connection(uv_stream_t *listener, int status) {
    kvs_server_t *srv = listener->data;
    if (status < 0) {
        kvs__log(KVS__LOG_WARN, "accept_error", "err=%s", uv_err_name(status));
        return;
    }
    bool is_tcp = listener->type == UV_TCP;
    kvs__conn_t *c = calloc(1, sizeof(*c));
    if (!c ||
        kvs_frame_reader_init(&c->rd, (uint32_t)srv->cfg->max_frame_bytes)) {
        free(c);
        kvs__log(KVS__LOG_ERROR, "oom", "what=connection");
        return;
    }
    c->srv = srv;
    c->id = ++srv->next_conn_id;
    kvs_frame_allocator_t fa = {kvs__bufpool_alloc, kvs__bufpool_free,
                                &srv->bufpool};
    kvs_frame_reader_set_allocator(&c->rd, &fa);
    if (is_tcp)
        uv_tcp_init(&srv->loop, &c->h.tcp);
    else
        uv_pipe_init(&srv->loop, &c->h.pipe, 0);
    c->h.handle.data = c;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    if (uv_accept(listener, &c->h.stream)) {
        c->refused = true;
        conn_close(c);
        return;
    }
    set_peer_name(c, is_tcp);
    if (is_tcp && srv->cfg->tcp_nodelay)
        uv_tcp_nodelay(&c->h.tcp, 1);
    c->authed = srv->cfg->auth_token[0] == 0;
    if (!c->authed && c->rd.max_body > PREAUTH_MAX_BODY)
        c->rd.max_body = PREAUTH_MAX_BODY; /* until Hello succeeds */
    c->last_active = c->accepted_at = uv_now(&srv->loop);
    if (srv->n_conns >= srv->cfg->max_connections || srv->draining) {
        /* Refuse visibly: an answer the client can show, not a bare RST. */
        c->refused = true;
        srv->m.connections_refused++;
        char m[128];
        snprintf(m, sizeof(m),
                 srv->draining ? "server is shutting down"
                               : "too many connections (max_connections "
                                 "%u)",
                 srv->cfg->max_connections);
        kvs__log(KVS__LOG_WARN, "conn_refused", "peer=%s reason=%s", c->peer,
                 srv->draining ? "draining" : "max_connections");
        conn_error(c, 0, 0, srv->draining ? KVS_ECLOSED : KVS_EBUSY, m, true);
        conn_maybe_close(c);
        return;
    }
    srv->n_conns++;
    srv->m.connections_total++;
    kvs__log(KVS__LOG_DEBUG, "conn_open", "conn=%llu peer=%s",
             (unsigned long long)c->id, c->peer);
    conn_update_reading(c);
}

static int listen_tcp(kvs_server_t *srv, const char *host, int port,
                      int *bound) {
    struct sockaddr_storage ss;
    unsigned flags = 0;
    if (strchr(host, ':')) {
        if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss))
            return KVS_EINVAL;
        flags = UV_TCP_IPV6ONLY;
    } else if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss)) {
        return KVS_EINVAL;
    }
    if (srv->n_tcp >= (int)(sizeof(srv->tcp) / sizeof(srv->tcp[0])))
        return KVS_ERANGE;
    uv_tcp_t *t = &srv->tcp[srv->n_tcp];
    uv_tcp_init(&srv->loop, t);
    t->data = srv;
    srv->n_tcp++;
    int rc = uv_tcp_bind(t, (struct sockaddr *)&ss, flags);
    if (!rc)
        rc = uv_listen((uv_stream_t *)t, 1024, on_connection);
    if (rc)
        return rc;
    int len = sizeof(ss);
    uv_tcp_getsockname(t, (struct sockaddr *)&ss, &len);
    *bound =
        ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                       : ((struct sockaddr_in *)&ss)->sin_port);
    kvs__log(KVS__LOG_INFO, "listen", "proto=tcp addr=%s port=%d", host,
             *bound);
    return 0;
}

static int listen_all_tcp(kvs_server_t *srv) {
    char *list = strdup(srv->cfg->bind);
    if (!list)
        return KVS_ENOMEM;
    int port = (int)srv->cfg->port, rc = 0;
    char *save = NULL;
    for (char *h = strtok_r(list, ", ", &save); h;
         h = strtok_r(NULL, ", ", &save)) {
        int bound = 0;
        if (h[0] == '[') { /* accept [::1] as well as ::1 */
            h++;
            char *e = strchr(h, ']');
            if (e)
                *e = 0;
        }
        rc = listen_tcp(srv, h, port, &bound);
        if (rc) {
            kvs__log(KVS__LOG_ERROR, "listen_failed",
                     "proto=tcp addr=%s port=%d err=%s", h, port,
                     kvs_err_name(rc));
            break;
        }
        /* With port 0 the first address picks the port; the others share
         * it so that one number reaches the daemon on every address. */
        port = bound;
        srv->port = bound;
    }
    free(list);
    return rc;
}

/* Make room for the Unix socket at `path`. Only a stale socket is removed
 * (a socket file nobody accepts on, left by a crashed run); a live one means
 * another daemon owns it, and anything else (a regular file, a directory, a
 * link) is not ours to delete: the user gave a wrong path. */
static int unix_path_clear(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -errno;
    if (!S_ISSOCK(st.st_mode)) {
        kvs__log(KVS__LOG_ERROR, "unix_socket_path_taken",
                 "path=%s type=%s (not a socket: refusing to remove it; "
                 "choose another --unix-socket)",
                 path,
                 S_ISDIR(st.st_mode)   ? "directory"
                 : S_ISLNK(st.st_mode) ? "symlink"
                 : S_ISREG(st.st_mode) ? "file"
                                       : "other");
        return -EEXIST;
    }
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0)
        return -errno;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    int rc = connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0
                 ? -EADDRINUSE
                 : (errno == ECONNREFUSED ? 0 : -errno);
    close(probe);
    if (rc == -EADDRINUSE) {
        kvs__log(KVS__LOG_ERROR, "unix_socket_in_use",
                 "path=%s (another process accepts on it)", path);
        return rc;
    }
    if (rc)
        return rc;
    kvs__log(KVS__LOG_INFO, "unix_socket_stale", "path=%s (removed)", path);
    return unlink(path) == 0 || errno == ENOENT ? 0 : -errno;
}

static int listen_unix(kvs_server_t *srv) {
    const char *path = srv->cfg->unix_socket;
    mode_t mode = (mode_t)strtoul(srv->cfg->unix_socket_mode, NULL, 8);
    int rc = unix_path_clear(path);
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "listen_failed", "proto=unix path=%s err=%s",
                 path, kvs_err_name(rc));
        return rc;
    }
    uv_pipe_init(&srv->loop, &srv->unix_listener, 0);
    srv->unix_listener.data = srv;
    srv->have_unix = true;
    /* bind creates the file with the umask's mode: narrow the umask for it
     * so the socket is never reachable with wider rights than asked, then
     * set the mode. umask is per process; a file another thread creates
     * meanwhile only ends up narrower. */
    mode_t old = umask(0177);
    rc = uv_pipe_bind(&srv->unix_listener, path);
    umask(old);
    struct stat st;
    if (!rc && chmod(path, mode) != 0)
        rc = -errno;
    if (!rc && lstat(path, &st) == 0) {
        srv->unix_dev = (uint64_t)st.st_dev;
        srv->unix_ino = (uint64_t)st.st_ino;
    }
    if (!rc)
        rc = uv_listen((uv_stream_t *)&srv->unix_listener, 1024, on_connection);
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "listen_failed", "proto=unix path=%s err=%s",
                 path, uv_err_name(rc));
        return rc;
    }
    kvs__log(KVS__LOG_INFO, "listen", "proto=unix path=%s mode=%04o", path,
             (unsigned)mode);
    return 0;
}

/* Unlink the socket only if the file at the path is still the one we
 * bound: never another daemon's socket, or a file put there since. */
static void unix_unlink_ours(kvs_server_t *srv) {
    struct stat st;
    const char *path = srv->cfg->unix_socket;
    if (srv->unix_ino && lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) &&
        (uint64_t)st.st_dev == srv->unix_dev &&
        (uint64_t)st.st_ino == srv->unix_ino)
        unlink(path);
}

static int write_port_file(kvs_server_t *srv) {
    const char *path = srv->cfg->port_file;
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
    /* 0600, like every file kvstored writes itself (not the umask's). */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    FILE *f = fdopen(fd, "w");
    if (!f) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return -e;
    }
    fprintf(f, "port %d\nhttp_port %d\npid %d\n", srv->port, srv->http_port,
            (int)getpid());
    if (srv->cfg->unix_socket[0])
        fprintf(f, "unix %s\n", srv->cfg->unix_socket);
    if (fclose(f))
        return -errno;
    /* rename: a reader never sees a half-written file. */
    if (rename(tmp, path))
        return -errno;
    return 0;
}

/* ------------------------------------------------------ timers and signals */

/* Deadlines of frame_timeout_ms; true when c is being closed. */
static bool conn_deadlines(kvs__conn_t *c, uint64_t now) {
    kvs_server_t *srv = c->srv;
    uint64_t ft = srv->cfg->frame_timeout_ms;
    char m[160];
    if (!ft || c->closing)
        return c->closing;
    if (c->fatal) {
        /* Its answer was queued; a peer that never reads it does not keep
         * the connection. */
        if (now - c->fatal_at >= ft) {
            conn_close(c);
            return true;
        }
        return false;
    }
    if (!c->authed && now - c->accepted_at >= ft) {
        srv->m.auth_failures++;
        snprintf(m, sizeof(m),
                 "authentication required: no Hello with the token within "
                 "frame_timeout_ms (%llu)",
                 (unsigned long long)ft);
        conn_error(c, 0, 0, KVS_EAUTH, m, true);
        conn_maybe_close(c);
        return true;
    }
    /* Only while we are reading: a connection we paused owes us nothing. */
    if (c->reading && c->frame_start && now - c->frame_start >= ft) {
        srv->m.protocol_errors++;
        snprintf(m, sizeof(m),
                 "frame not completed within frame_timeout_ms (%llu): %zu "
                 "bytes received",
                 (unsigned long long)ft, kvs_frame_reader_pending(&c->rd));
        conn_error(c, 0, 0, KVS_ETIMEDOUT, m, true);
        conn_maybe_close(c);
        return true;
    }
    return false;
}

static void on_sweep(uv_timer_t *t) {
    kvs_server_t *srv = t->data;
    uint64_t now = uv_now(&srv->loop);
    kvs__bufpool_trim(&srv->bufpool, true);
    uint64_t idle = srv->cfg->idle_timeout_ms;
    for (kvs__conn_t *c = srv->conns; c; c = c->next) {
        if (conn_deadlines(c, now))
            continue;
        if (idle && c->writes && now - c->last_write >= idle) {
            /* A peer that reads none of its answers would otherwise hold
             * its max_output_bytes for ever. */
            kvs__log(KVS__LOG_INFO, "conn_write_stalled",
                     "conn=%llu peer=%s stalled_ms=%llu queued=%zu",
                     (unsigned long long)c->id, c->peer,
                     (unsigned long long)(now - c->last_write),
                     conn_out_bytes(c));
            srv->m.idle_closed++;
            conn_close(c);
            continue;
        }
        if (!idle || c->inflight || c->writes)
            continue;
        if (now - c->last_active >= idle) {
            kvs__log(KVS__LOG_INFO, "conn_idle_timeout",
                     "conn=%llu peer=%s idle_ms=%llu",
                     (unsigned long long)c->id, c->peer,
                     (unsigned long long)(now - c->last_active));
            srv->m.idle_closed++;
            conn_close(c);
        }
    }
}

static void close_if_open(uv_handle_t *h) {
    if (h->loop && !uv_is_closing(h))
        uv_close(h, NULL);
}

/* Close every remaining handle; the loop then runs out of work and
 * kvs_server_run() returns. */
static void stop_everything(kvs_server_t *srv) {
    if (srv->stopped)
        return;
    srv->stopped = true;
    for (kvs__conn_t *c = srv->conns; c; c = c->next)
        conn_close(c);
    for (int i = 0; i < srv->n_tcp; i++)
        close_if_open((uv_handle_t *)&srv->tcp[i]);
    if (srv->have_unix) {
        close_if_open((uv_handle_t *)&srv->unix_listener);
        unix_unlink_ours(srv);
    }
    kvs__http_stop(srv); /* its connections too: idle ones held the loop */
    close_if_open((uv_handle_t *)&srv->flusher);
    close_if_open((uv_handle_t *)&srv->sweeper);
    close_if_open((uv_handle_t *)&srv->drain_timer);
    close_if_open((uv_handle_t *)&srv->sigterm);
    close_if_open((uv_handle_t *)&srv->sigint);
    close_if_open((uv_handle_t *)&srv->sighup);
}

static void check_drained(kvs_server_t *srv) {
    if (!srv->draining || srv->stopped || srv->inflight)
        return;
    for (kvs__conn_t *c = srv->conns; c; c = c->next)
        if (!c->closing && (c->out_len || c->writes))
            return; /* answers still on their way out */
    kvs__log(KVS__LOG_INFO, "drained", "connections=%u", srv->n_conns);
    stop_everything(srv);
}

static void on_drain_timeout(uv_timer_t *t) {
    kvs_server_t *srv = t->data;
    kvs__log(KVS__LOG_WARN, "drain_timeout",
             "inflight=%llu timeout_ms=%u (closing connections; running "
             "engine calls still finish)",
             (unsigned long long)srv->inflight, srv->cfg->shutdown_timeout_ms);
    stop_everything(srv);
}

void kvs_server_shutdown(kvs_server_t *srv) {
    if (srv->draining)
        return;
    srv->draining = true;
    kvs__log(KVS__LOG_INFO, "shutdown_begin", "inflight=%llu connections=%u",
             (unsigned long long)srv->inflight, srv->n_conns);
    /* Leave the etcd node list first, so that clients stop sending new
     * sequences here while these requests drain. */
    kvs__member_leave(srv);
    /* Stop taking connections at once, so a restarted daemon can bind. */
    for (int i = 0; i < srv->n_tcp; i++)
        close_if_open((uv_handle_t *)&srv->tcp[i]);
    if (srv->have_unix)
        close_if_open((uv_handle_t *)&srv->unix_listener);
    for (kvs__conn_t *c = srv->conns; c; c = c->next)
        conn_update_reading(c);
    if (srv->cfg->shutdown_timeout_ms)
        uv_timer_start(&srv->drain_timer, on_drain_timeout,
                       srv->cfg->shutdown_timeout_ms, 0);
    check_drained(srv);
}

static void on_signal(uv_signal_t *s, int signum) {
    kvs_server_t *srv = s->data;
    kvs__log(KVS__LOG_INFO, "signal", "signal=%s",
             signum == SIGTERM ? "SIGTERM" : "SIGINT");
    kvs_server_shutdown(srv);
}

/* SIGHUP's default action kills the process: a daemon gets it from a
 * closed terminal or from logrotate, and must survive both. */
static void on_sighup(uv_signal_t *s, int signum) {
    (void)s;
    (void)signum;
    if (!kvs__log_path()) {
        kvs__log(KVS__LOG_INFO, "signal",
                 "signal=SIGHUP action=ignored (no log_file to reopen)");
        return;
    }
    int rc = kvs__log_reopen();
    char q[300];
    kvs__log(rc ? KVS__LOG_ERROR : KVS__LOG_INFO, "signal",
             "signal=SIGHUP action=log_reopen path=%s status=%s",
             kvs__logq(q, sizeof(q), kvs__log_path()),
             rc ? kvs_err_name(rc) : "ok");
}

/* systemd readiness without libsystemd: one datagram to $NOTIFY_SOCKET. */
static void sd_notify_send(const char *msg) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !path[0])
        return;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = strlen(path);
    if (n >= sizeof(sa.sun_path))
        return;
    memcpy(sa.sun_path, path, n);
    if (sa.sun_path[0] == '@') /* abstract namespace */
        sa.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa,
               len) < 0)
        kvs__log(KVS__LOG_WARN, "sd_notify_failed", "err=%s", strerror(errno));
    close(fd);
}

/* ------------------------------------------------------------- lifecycle */

/* The store's messages (kvs_options_t.log) as our log lines. */
static void store_log(void *ctx, int level, const char *msg) {
    (void)ctx;
    char q[600];
    kvs__log(level == KVS_LOG_ERROR  ? KVS__LOG_ERROR
             : level == KVS_LOG_WARN ? KVS__LOG_WARN
             : level == KVS_LOG_INFO ? KVS__LOG_INFO
                                     : KVS__LOG_DEBUG,
             "store", "msg=%s", kvs__logq(q, sizeof(q), msg));
}

int kvs_server_new(const kvs_server_config_t *cfg, kvs_server_t **out) {
    kvs_server_t *srv = calloc(1, sizeof(*srv));
    if (!srv)
        return KVS_ENOMEM;
    srv->cfg = cfg;
    srv->start_ns = uv_hrtime();
    srv->limits.max_head_dim = cfg->max_head_dim;
    srv->limits.max_tokens_per_append = cfg->max_tokens_per_append;
    /* Recycled frame buffers: enough for a pipeline of large appends,
     * never more than half of what may be buffered. */
    srv->bufpool.max_bytes = cfg->max_buffered_bytes
                                 ? cfg->max_buffered_bytes / 2
                                 : (size_t)256 << 20;
    if (srv->bufpool.max_bytes > ((size_t)256 << 20))
        srv->bufpool.max_bytes = (size_t)256 << 20;
    for (size_t i = 0; i < 64; i++)
        pthread_rwlock_init(&srv->seq_locks[i], NULL);
    pthread_mutex_init(&srv->pool_mu, NULL);
    pthread_cond_init(&srv->pool_cv, NULL);
    if (cfg->node_id[0])
        snprintf(srv->node_id, sizeof(srv->node_id), "%s", cfg->node_id);
    else if (gethostname(srv->node_id, sizeof(srv->node_id) - 1))
        snprintf(srv->node_id, sizeof(srv->node_id), "kvstored");
    int rc = uv_loop_init(&srv->loop);
    if (rc) {
        free(srv);
        return rc;
    }

    kvs_options_t o;
    kvs_options_default(&o);
    /* The profile first: the explicit options below (segment_tokens,
     * cluster_tokens when non-zero) win over it. */
    if (cfg->profile[0]) {
        char perr[256], q[300];
        rc = kvs_options_load_profile(&o, cfg->profile, perr, sizeof perr);
        if (rc) {
            kvs__log(KVS__LOG_ERROR, "profile_failed", "status=%s msg=%s",
                     kvs_err_name(rc), kvs__logq(q, sizeof(q), perr));
            goto err;
        }
        kvs__log(KVS__LOG_INFO, "profile_loaded",
                 "path=%s segment_tokens=%u "
                 "cluster_tokens=%u retrieval_fraction=%g",
                 cfg->profile, o.segment_tokens, o.cluster_tokens,
                 (double)o.defaults.retrieval_fraction);
    }
    o.log = store_log;
    o.data_dir = cfg->data_dir[0] ? cfg->data_dir : NULL;
    o.n_threads = cfg->engine_threads;
    o.sync = !strcmp(cfg->sync, "always")  ? KVS_SYNC_ALWAYS
             : !strcmp(cfg->sync, "none")  ? KVS_SYNC_NONE
             : !strcmp(cfg->sync, "async") ? KVS_SYNC_ASYNC
                                           : KVS_SYNC_BATCH;
    o.max_unpersisted_bytes = cfg->max_unpersisted_bytes;
    o.sync_interval_ms = cfg->sync_interval_ms;
    o.memory_bytes = cfg->memory_bytes;
    o.load = !strcmp(cfg->load, "lazy")    ? KVS_LOAD_LAZY
             : !strcmp(cfg->load, "eager") ? KVS_LOAD_EAGER
                                           : KVS_LOAD_WARM;
    if (cfg->build_threads)
        o.n_build_threads = cfg->build_threads;
    o.blas_threads = cfg->blas_threads;
    o.deterministic = cfg->deterministic;
    o.max_sequences = cfg->max_sequences;
    if (cfg->segment_tokens)
        o.segment_tokens = cfg->segment_tokens;
    if (cfg->cluster_tokens)
        o.cluster_tokens = cfg->cluster_tokens;
    if (cfg->gpu) {
        o.cuda_device = (int32_t)cfg->cuda_device;
        o.cuda_cache_fraction = cfg->cuda_cache_percent / 100.0f;
        o.cuda_memory_bytes = cfg->cuda_memory_bytes;
        o.cuda_kv = strcmp(cfg->cuda_kv, "host") == 0 ? KVS_CUDA_KV_HOST
                                                      : KVS_CUDA_KV_AUTO;
        o.cuda_build = cfg->cuda_build;
    }
    uint64_t t0 = uv_hrtime();
    rc = kvs_store_open(&o, &srv->store);
    if (rc) {
        char q[300];
        kvs__log(
            KVS__LOG_ERROR, "store_open_failed", "data_dir=%s status=%s msg=%s",
            cfg->data_dir[0] ? cfg->data_dir : "(memory)", kvs_err_name(rc),
            kvs__logq(q, sizeof(q),
                      kvs_store_open_error()[0] ? kvs_store_open_error()
                                                : kvs_strerror(rc)));
        goto err;
    }
    kvs_store_stats_t st;
    memset(&st, 0, sizeof(st));
    kvs_store_stats(srv->store, &st);
    kvs__log(st.quarantined ? KVS__LOG_WARN : KVS__LOG_INFO, "store_open",
             "data_dir=%s sequences=%llu quarantined=%llu seconds=%.3f",
             cfg->data_dir[0] ? cfg->data_dir : "(memory)",
             (unsigned long long)st.sequences,
             (unsigned long long)st.quarantined,
             (double)(uv_hrtime() - t0) / 1e9);
    {
        char q[300];
        kvs__log(cfg->gpu && st.gpu_device < 0 ? KVS__LOG_WARN : KVS__LOG_INFO,
                 "attend_path", "gpu=%s path=%s", cfg->gpu ? "yes" : "no",
                 kvs__logq(q, sizeof(q), kvs_store_gpu_info(srv->store)));
    }

    uv_async_init(&srv->loop, &srv->done_async, on_done_async);
    srv->done_async.data = srv;
    uv_unref((uv_handle_t *)&srv->done_async); /* ref'd while work runs */
    srv->have_async = true;
    if ((rc = pool_start(srv)))
        goto err;
    uv_check_init(&srv->loop, &srv->flusher);
    srv->flusher.data = srv;
    uv_check_start(&srv->flusher, on_flush_check);
    uv_unref((uv_handle_t *)&srv->flusher);
    uv_timer_init(&srv->loop, &srv->sweeper);
    srv->sweeper.data = srv;
    uint64_t tmo = cfg->idle_timeout_ms;
    if (cfg->frame_timeout_ms && (!tmo || cfg->frame_timeout_ms < tmo))
        tmo = cfg->frame_timeout_ms;
    if (tmo) {
        uint64_t every = tmo / 4;
        if (every < 10)
            every = 10;
        if (every > 1000)
            every = 1000;
        uv_timer_start(&srv->sweeper, on_sweep, every, every);
    }
    uv_timer_init(&srv->loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    uv_signal_init(&srv->loop, &srv->sigterm);
    uv_signal_init(&srv->loop, &srv->sigint);
    srv->sigterm.data = srv->sigint.data = srv;
    uv_signal_start(&srv->sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv->sigint, on_signal, SIGINT);
    uv_signal_init(&srv->loop, &srv->sighup);
    uv_signal_start(&srv->sighup, on_sighup, SIGHUP);

    if (cfg->bind[0] && (rc = listen_all_tcp(srv)))
        goto err;
    if (cfg->unix_socket[0] && (rc = listen_unix(srv)))
        goto err;
    if (cfg->http_bind[0] && (rc = kvs__http_start(srv)))
        goto err;
    if (cfg->port_file[0] && (rc = write_port_file(srv))) {
        kvs__log(KVS__LOG_ERROR, "port_file_failed", "path=%s err=%s",
                 cfg->port_file, kvs_err_name(rc));
        goto err;
    }
    if ((rc = kvs__member_start(srv)))
        goto err;
    *out = srv;
    return 0;
err:
    kvs__member_stop(srv);
    stop_everything(srv);
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    pool_close(srv);
    kvs_store_close(srv->store);
    uv_loop_close(&srv->loop);
    pthread_mutex_destroy(&srv->pool_mu);
    pthread_cond_destroy(&srv->pool_cv);
    free(srv);
    return rc;
}

int kvs_server_run(kvs_server_t *srv) {
    kvs__log(KVS__LOG_INFO, "ready",
             "port=%d http_port=%d node=%s version=%s pid=%d", srv->port,
             srv->http_port, srv->node_id, KVS_SERVER_VERSION, (int)getpid());
    sd_notify_send("READY=1\nSTATUS=serving");
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    sd_notify_send("STOPPING=1");
    kvs__member_stop(srv);
    uint64_t t0 = uv_hrtime();
    int rc = kvs_store_close(srv->store);
    srv->store = NULL;
    if (rc) {
        /* Acknowledged data is durable; what failed is a write after it
         * (a full disk, say): say so, and exit non-zero. */
        kvs__log(KVS__LOG_ERROR, "store_close_failed",
                 "status=%s msg=\"%s\" seconds=%.3f", kvs_err_name(rc),
                 kvs_strerror(rc), (double)(uv_hrtime() - t0) / 1e9);
        return rc;
    }
    kvs__log(KVS__LOG_INFO, "store_closed", "seconds=%.3f",
             (double)(uv_hrtime() - t0) / 1e9);
    return 0;
}

void kvs_server_free(kvs_server_t *srv) {
    if (!srv)
        return;
    if (!srv->stopped) {
        stop_everything(srv);
        uv_run(&srv->loop, UV_RUN_DEFAULT);
    }
    /* Every connection is gone and every request answered: all admitted
     * bytes came back (a leak here would shrink the budget for good). */
    assert(srv->inflight == 0 && srv->running == 0);
    assert(srv->admitted == 0 && srv->admitted_large == 0);
    kvs__member_stop(srv);
    pool_close(srv);
    kvs_store_close(srv->store);
    uv_loop_close(&srv->loop);
    for (size_t i = 0; i < 64; i++)
        pthread_rwlock_destroy(&srv->seq_locks[i]);
    pthread_mutex_destroy(&srv->pool_mu);
    pthread_cond_destroy(&srv->pool_cv);
    kvs__bufpool_trim(&srv->bufpool, false);
    free(srv);
}
