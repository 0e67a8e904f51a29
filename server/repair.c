/*
 * repair.c: kvstored's side of repair (docs/cluster.md, issue #16).
 *
 * Receiving: ImportRequest pieces of a kvs_seq_export stream go into one
 * kvs_import_t per sequence, held here between requests (workers run the
 * pieces; the per-connection gate keeps one connection's pieces in order).
 * One push per sequence at a time: another connection's push of the same
 * sequence is refused with KVS_EBUSY (its sender retries later), unless the
 * one in progress has been idle for IMPORT_IDLE_MS (its sender died).
 *
 * Pushing: with etcd and `replicas` R > 0, a thread of its own reads the
 * node list every repair_interval_ms. After a change (and while earlier
 * work is unfinished, and every STEADY_PASSES intervals), it goes over the
 * sequences this node holds: each one's desired holders are the first R
 * live nodes of its rendezvous order (kvs_rendezvous_*, the clients'
 * function). A desired node that lacks the sequence, or holds fewer tokens,
 * gets a push: the stream sent as ImportRequest pieces over an ordinary
 * authenticated connection, throttled to repair_rate_bytes. A node that is
 * not among the desired holders pushes to all of them, and once every one
 * has accepted (installed, replaced, or already current: the import checks
 * that their copy extends ours) drops its own copy with
 * kvs_seq_drop_if_covered at the fewest tokens they report, so that an
 * append that reached this copy meanwhile keeps it here for the next pass.
 *
 * The thread blocks on sockets with timeouts and on etcd; it never touches
 * the loop. It shares with the rest of the server the store (thread-safe),
 * the config (fixed) and `mu`/`cv` (stop) and the counters (atomics).
 */
#include "server_int.h"

#include "kvs_etcd.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IMPORT_IDLE_MS 30000
#define STEADY_PASSES 30
#define MAX_NODES 64
#define PEER_TIMEOUT_MS 10000
#define PIECE_MAX (1u << 20)
#define MISSING_SLOTS 4096
#define MISSING_PROBES 8

static uint64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------------ receiving */

typedef struct import_s {
    const kvs_server_t *srv;
    uint64_t seq, conn;
    kvs_import_t *im;
    uint64_t next_off, last_ms;
    bool busy; /* a worker is feeding it (outside imports_mu) */
    struct import_s *next;
} import_t;

/* Imports in progress of every server of the process (one, but tests may
 * run several); a leaf lock, never held across an engine call. */
static pthread_mutex_t imports_mu = PTHREAD_MUTEX_INITIALIZER;
static import_t *imports;

static import_t **import_find(const kvs_server_t *srv, uint64_t seq) {
    import_t **pp = &imports;
    while (*pp && ((*pp)->srv != srv || (*pp)->seq != seq))
        pp = &(*pp)->next;
    return pp;
}

static int imsg(char *msg, size_t len, int rc, const char *fmt, uint64_t seq) {
    snprintf(msg, len, fmt, (unsigned long long)seq);
    return rc;
}

int kvs__import_piece(kvs_server_t *srv, uint64_t conn,
                      const Kvs__V1__ImportRequest *r, uint32_t *result,
                      char *msg, size_t msglen) {
    *result = 0;
    uint64_t now = mono_ms();
    pthread_mutex_lock(&imports_mu);
    /* Pushes whose sender went away hold a staged sequence in memory: free
     * those idle for IMPORT_IDLE_MS (any sequence; the list is short). */
    for (import_t **qq = &imports; *qq;) {
        import_t *x = *qq;
        if (x->srv == srv && x->seq != r->seq && !x->busy &&
            now - x->last_ms > IMPORT_IDLE_MS) {
            *qq = x->next;
            kvs_seq_import_abort(x->im);
            free(x);
        } else {
            qq = &x->next;
        }
    }
    import_t **pp = import_find(srv, r->seq), *e = *pp;
    /* Aborting an import only frees memory: done under the leaf lock. */
    if (e && !e->busy &&
        (e->conn == conn
             ? r->abort || r->offset == 0
             : r->offset == 0 && now - e->last_ms > IMPORT_IDLE_MS)) {
        /* An abort, a sender starting over, or a push taking over from a
         * sender that went away. */
        *pp = e->next;
        kvs_seq_import_abort(e->im);
        free(e);
        e = NULL;
    }
    int rc = 0;
    if (r->abort) {
        pthread_mutex_unlock(&imports_mu);
        return 0;
    }
    if (e && (e->conn != conn || e->busy)) {
        pthread_mutex_unlock(&imports_mu);
        return imsg(msg, msglen, KVS_EBUSY,
                    "another push of sequence %llu is in progress", r->seq);
    }
    if (!e) {
        if (r->offset != 0) {
            pthread_mutex_unlock(&imports_mu);
            return imsg(msg, msglen, KVS_EPROTO,
                        "no push of sequence %llu in progress", r->seq);
        }
        e = calloc(1, sizeof *e);
        if (e && (rc = kvs_seq_import_begin(srv->store, r->seq, &e->im))) {
            free(e);
            e = NULL;
        }
        if (!e) {
            pthread_mutex_unlock(&imports_mu);
            return imsg(msg, msglen, rc ? rc : KVS_ENOMEM,
                        "import of %llu: out of memory", r->seq);
        }
        e->srv = srv;
        e->seq = r->seq;
        e->conn = conn;
        e->next = imports;
        imports = e;
    }
    if (r->offset != e->next_off) {
        *import_find(srv, r->seq) = e->next;
        kvs_seq_import_abort(e->im);
        free(e);
        pthread_mutex_unlock(&imports_mu);
        return imsg(msg, msglen, KVS_EPROTO,
                    "push of sequence %llu: a piece out of order", r->seq);
    }
    e->busy = true;
    pthread_mutex_unlock(&imports_mu);

    rc = r->data.len ? kvs_seq_import_chunk(e->im, r->data.data, r->data.len)
                     : 0;
    pthread_mutex_lock(&imports_mu);
    e->busy = false;
    e->next_off += r->data.len;
    e->last_ms = mono_ms();
    bool finish = rc || r->last;
    if (finish)
        *import_find(srv, r->seq) = e->next;
    pthread_mutex_unlock(&imports_mu);
    if (!finish)
        return 0;
    if (rc) {
        snprintf(msg, msglen, "%s", kvs_store_errmsg(srv->store));
        kvs_seq_import_abort(e->im);
    } else {
        kvs_import_result_t res = KVS_IMPORT_NONE;
        rc = kvs_seq_import_end(e->im, &res);
        if (rc)
            snprintf(msg, msglen, "%s", kvs_store_errmsg(srv->store));
        *result = (uint32_t)res;
        kvs__log(rc ? KVS__LOG_WARN : KVS__LOG_INFO, "repair_imported",
                 "seq=%llu bytes=%llu result=%u status=%s",
                 (unsigned long long)r->seq, (unsigned long long)e->next_off,
                 (unsigned)res, rc ? kvs_err_name(rc) : "ok");
    }
    free(e);
    return rc;
}

/* Abort every import of `srv` in progress (none is running: the pool has
 * stopped). */
static void imports_drop(const kvs_server_t *srv) {
    pthread_mutex_lock(&imports_mu);
    for (import_t **pp = &imports; *pp;) {
        import_t *e = *pp;
        if (e->srv != srv) {
            pp = &e->next;
            continue;
        }
        *pp = e->next;
        kvs_seq_import_abort(e->im);
        free(e);
    }
    pthread_mutex_unlock(&imports_mu);
}

/* -------------------------------------------------------------- pushing */

struct kvs__repair_s {
    kvs_server_t *srv;
    char self[256];
    kvs_etcd_t *etcd;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu; /* guards stop; a leaf lock */
    pthread_cond_t cv;
    bool stop;
    /* Rate limit: bytes sent since t0. */
    uint64_t t0_ms, sent;
    /* (sequence, node) pairs found without the copy, by the last pass
     * that found so: a node that lacks a sequence gets it only when the
     * next pass finds it still missing, so that a push does not race a
     * client's create that is on its way there (the create would fail
     * KVS_EEXIST). Open addressing over MISSING_PROBES slots; an entry
     * not seen in the current or the previous pass is free again. */
    uint64_t pass_no;
    struct missing_s {
        uint64_t seq, node, pass;
    } missing[MISSING_SLOTS];
    atomic_uint_fast64_t pushed, bytes, dropped, conflicts, errors, passes;
    atomic_uint_fast64_t pending;
};

static bool wait_stop(kvs__repair_t *r, uint64_t ms) {
    return kvs__wait_stop(&r->mu, &r->cv, &r->stop, ms);
}

static bool stopping(kvs__repair_t *r) {
    return kvs__stopping(&r->mu, &r->stop);
}

/* A blocking connection to another kvstored. */
typedef struct peer_s {
    char addr[256];
    int fd;
    uint64_t next_id;
    uint32_t max_body; /* the peer's max_frame_bytes */
    char why[256];
} peer_t;

/* All n bytes of p sent (`out`) or received on a blocking socket with a
 * send/receive timeout: KVS_ETIMEDOUT when it ran out, KVS_ECONN when the
 * peer closed or failed. */
static int sock_all(int fd, uint8_t *p, size_t n, bool out) {
    while (n) {
        ssize_t k = out ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)
                       ? KVS_ETIMEDOUT
                       : KVS_ECONN;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One request, its answer. *out (freed by the caller with
 * kvs__v1__response__free_unpacked) only on success. */
static int peer_rpc(peer_t *p, Kvs__V1__Request *req, Kvs__V1__Response **out) {
    *out = NULL;
    uint64_t id = ++p->next_id;
    uint8_t *f = NULL, hb[KVS_FRAME_HEADER_SIZE];
    size_t len = 0;
    int rc = kvs_frame_encode(id, 0, &req->base, p->max_body, &f, &len);
    if (rc) {
        snprintf(p->why, sizeof p->why, "encoding: %s", kvs_strerror(rc));
        return rc;
    }
    rc = sock_all(p->fd, f, len, true);
    free(f);
    if (!rc)
        rc = sock_all(p->fd, hb, sizeof hb, false);
    if (rc) {
        snprintf(p->why, sizeof p->why, "%s", kvs_strerror(rc));
        return rc;
    }
    kvs_frame_header_t h;
    if ((rc = kvs_frame_header_decode(hb, sizeof hb, KVS_FRAME_MAX_BODY_LIMIT,
                                      &h, p->why, sizeof p->why)))
        return rc;
    uint8_t *body = malloc(h.body_len ? h.body_len : 1);
    if (!body)
        return KVS_ENOMEM;
    if ((rc = sock_all(p->fd, body, h.body_len, false))) {
        free(body);
        snprintf(p->why, sizeof p->why, "%s", kvs_strerror(rc));
        return rc;
    }
    Kvs__V1__Response *resp = NULL;
    rc = kvs_frame_decode_response(body, h.body_len, &resp, p->why,
                                   sizeof p->why);
    free(body);
    if (rc)
        return rc;
    if (h.request_id != id) {
        kvs__v1__response__free_unpacked(resp, NULL);
        snprintf(p->why, sizeof p->why, "answer to another request");
        return KVS_EPROTO;
    }
    if (resp->status) {
        rc = resp->status;
        snprintf(p->why, sizeof p->why, "%s",
                 resp->message && *resp->message ? resp->message
                                                 : kvs_strerror(rc));
        kvs__v1__response__free_unpacked(resp, NULL);
        return rc;
    }
    *out = resp;
    return 0;
}

static void peer_close(peer_t *p) {
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
}

/* Connect to "host:port" ("[v6]:port") and say Hello with our token. */
static int peer_open(kvs__repair_t *r, const char *addr, peer_t *p) {
    memset(p, 0, sizeof *p);
    p->fd = -1;
    p->max_body = KVS_FRAME_DEFAULT_MAX_BODY;
    snprintf(p->addr, sizeof p->addr, "%s", addr);
    char host[256], port[16];
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || strlen(colon + 1) >= sizeof port) {
        snprintf(p->why, sizeof p->why, "not host:port");
        return KVS_EINVAL;
    }
    size_t hl = (size_t)(colon - addr);
    if (addr[0] == '[' && hl >= 2 && addr[hl - 1] == ']') {
        addr++;
        hl -= 2;
    }
    if (hl >= sizeof host) {
        snprintf(p->why, sizeof p->why, "host too long");
        return KVS_EINVAL;
    }
    memcpy(host, addr, hl);
    host[hl] = 0;
    snprintf(port, sizeof port, "%s", colon + 1);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        snprintf(p->why, sizeof p->why, "%s", gai_strerror(g));
        return KVS_ECONN;
    }
    int rc = KVS_ECONN;
    for (struct addrinfo *a = ai; a && p->fd < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        /* Timeouts bound every blocking call, connect included (Linux). */
        struct timeval tv = {.tv_sec = PEER_TIMEOUT_MS / 1000};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            p->fd = fd;
        else {
            snprintf(p->why, sizeof p->why, "connect: %s", strerror(errno));
            close(fd);
        }
    }
    freeaddrinfo(ai);
    if (p->fd < 0)
        return rc;
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest hr = KVS__V1__HELLO_REQUEST__INIT;
    hr.protocol_version = KVS_PROTOCOL_VERSION;
    hr.auth_token = r->srv->cfg->auth_token;
    hr.client_name = (char *)"kvstored-repair";
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &hr;
    Kvs__V1__Response *resp;
    if ((rc = peer_rpc(p, &req, &resp))) {
        peer_close(p);
        return rc;
    }
    if (resp->result_case == KVS__V1__RESPONSE__RESULT_HELLO && resp->hello &&
        resp->hello->max_frame_bytes >= 4096)
        p->max_body = resp->hello->max_frame_bytes;
    kvs__v1__response__free_unpacked(resp, NULL);
    return 0;
}

/* Tokens of `seq` on the peer: KVS_ENOSEQ when it has none. */
static int peer_info(peer_t *p, uint64_t seq, uint64_t *tmin, uint64_t *tmax) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__InfoRequest ir = KVS__V1__INFO_REQUEST__INIT;
    ir.seq = seq;
    req.op_case = KVS__V1__REQUEST__OP_INFO;
    req.info = &ir;
    Kvs__V1__Response *resp;
    int rc = peer_rpc(p, &req, &resp);
    if (rc)
        return rc;
    if (resp->result_case != KVS__V1__RESPONSE__RESULT_INFO || !resp->info) {
        kvs__v1__response__free_unpacked(resp, NULL);
        return KVS_EPROTO;
    }
    *tmin = resp->info->tokens_min;
    *tmax = resp->info->tokens_max;
    kvs__v1__response__free_unpacked(resp, NULL);
    return 0;
}

typedef struct push_s {
    kvs__repair_t *r;
    peer_t *p;
    uint64_t seq, off;
    uint32_t result;
} push_t;

/* Hold the pushes to repair_rate_bytes per second. */
static int throttle(kvs__repair_t *r, size_t n) {
    uint64_t rate = r->srv->cfg->repair_rate_bytes;
    if (!rate)
        return 0;
    for (;;) {
        uint64_t now = mono_ms();
        if (now - r->t0_ms > 10000) { /* forget old idle time */
            r->t0_ms = now;
            r->sent = 0;
        }
        uint64_t allowed = (now - r->t0_ms) * rate / 1000 + rate / 10;
        if (r->sent + n <= allowed)
            break;
        uint64_t ms = (r->sent + n - allowed) * 1000 / rate + 1;
        if (wait_stop(r, ms < 100 ? ms : 100))
            return KVS_ECLOSED;
    }
    r->sent += n;
    return 0;
}

static int send_piece(push_t *ps, const void *data, size_t len, bool last,
                      bool abort) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__ImportRequest ir = KVS__V1__IMPORT_REQUEST__INIT;
    ir.seq = ps->seq;
    ir.offset = abort ? 0 : ps->off;
    ir.data.data = (uint8_t *)data;
    ir.data.len = len;
    ir.last = last;
    ir.abort = abort;
    req.op_case = KVS__V1__REQUEST__OP_SEQ_IMPORT;
    req.seq_import = &ir;
    Kvs__V1__Response *resp;
    int rc = peer_rpc(ps->p, &req, &resp);
    if (rc)
        return rc;
    if (resp->result_case == KVS__V1__RESPONSE__RESULT_SEQ_IMPORT &&
        resp->seq_import)
        ps->result = resp->seq_import->result;
    kvs__v1__response__free_unpacked(resp, NULL);
    ps->off += len;
    atomic_fetch_add(&ps->r->bytes, len);
    return 0;
}

static int push_chunk(void *ctx, const void *data, size_t len) {
    push_t *ps = ctx;
    if (stopping(ps->r)) /* a drain does not wait for a long push */
        return KVS_ECLOSED;
    int rc = throttle(ps->r, len);
    return rc ? rc : send_piece(ps, data, len, false, false);
}

/* Push `seq` to peer p; *result: kvs_import_result_t. */
static int push(kvs__repair_t *r, peer_t *p, uint64_t seq, uint32_t *result) {
    push_t ps = {.r = r, .p = p, .seq = seq};
    size_t piece = p->max_body > 8192 ? p->max_body - 4096 : 4096;
    if (piece > PIECE_MAX)
        piece = PIECE_MAX;
    uint64_t t0 = mono_ms();
    int rc = kvs_seq_export(r->srv->store, seq, piece, push_chunk, &ps);
    if (rc && ps.off && p->fd >= 0 && rc != KVS_ECONN && rc != KVS_ETIMEDOUT)
        send_piece(&ps, NULL, 0, false, true); /* best effort */
    if (!rc)
        rc = send_piece(&ps, NULL, 0, true, false);
    *result = ps.result;
    kvs__log(rc ? KVS__LOG_WARN : KVS__LOG_INFO, "repair_pushed",
             "seq=%llu to=%s bytes=%llu ms=%llu result=%u status=%s",
             (unsigned long long)seq, p->addr, (unsigned long long)ps.off,
             (unsigned long long)(mono_ms() - t0), ps.result,
             rc ? kvs_err_name(rc) : "ok");
    return rc;
}

typedef struct node_s {
    char addr[256];
    uint64_t hash;
    peer_t peer;
    bool tried, up;
} node_t;

static peer_t *node_peer(kvs__repair_t *r, node_t *n) {
    if (!n->tried) {
        n->tried = true;
        int rc = peer_open(r, n->addr, &n->peer);
        n->up = rc == 0;
        if (rc)
            kvs__log(KVS__LOG_WARN, "repair_peer_unreachable",
                     "addr=%s status=%s why=\"%s\"", n->addr, kvs_err_name(rc),
                     n->peer.why);
    }
    return n->up ? &n->peer : NULL;
}

/* A peer that failed mid-call is not asked again in this pass. */
static void peer_failed(node_t *n, int rc) {
    if (rc == KVS_ECONN || rc == KVS_ETIMEDOUT || rc == KVS_EPROTO) {
        peer_close(&n->peer);
        n->up = false;
    }
}

/* Indexes of the first `want` nodes of seq's rendezvous order. */
static size_t rank_nodes(const node_t *nodes, size_t n, uint64_t seq,
                         size_t want, size_t *out) {
    uint64_t w_out[8];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t w = kvs_rendezvous_weight(seq, nodes[i].hash);
        size_t at = k;
        while (at > 0 && w_out[at - 1] < w)
            at--;
        if (at >= want)
            continue;
        if (k < want)
            k++;
        for (size_t j = k - 1; j > at; j--) {
            out[j] = out[j - 1];
            w_out[j] = w_out[j - 1];
        }
        out[at] = i;
        w_out[at] = w;
    }
    return k;
}

/* Was seq found missing on node by the previous pass too? Remembers this
 * pass either way. One slot per hash, as before, let two pairs of one
 * slot evict each other on every pass, so that neither was ever pushed
 * (bench/cluster found it: 2 of 12 sequences never copied to a node that
 * joined); with probing, a pair is only forgotten when all its slots hold
 * pairs seen in this pass or the last, and waits for a pass with room. */
static bool missing_before(kvs__repair_t *r, uint64_t seq, uint64_t node) {
    uint64_t h = kvs_rendezvous_weight(seq, node);
    struct missing_s *room = NULL;
    for (unsigned i = 0; i < MISSING_PROBES; i++) {
        struct missing_s *m = &r->missing[(h + i) % MISSING_SLOTS];
        if (m->pass && m->seq == seq && m->node == node) {
            bool before = m->pass + 1 == r->pass_no;
            m->pass = r->pass_no;
            return before;
        }
        if (!room && (!m->pass || m->pass + 1 < r->pass_no))
            room = m;
    }
    if (room) {
        room->seq = seq;
        room->node = node;
        room->pass = r->pass_no;
    }
    return false;
}

/* Bring one sequence to its desired holders; true when nothing is left to
 * do for it. */
static bool repair_seq(kvs__repair_t *r, node_t *nodes, size_t n, size_t self,
                       uint64_t seq) {
    kvs_store_t *st = r->srv->store;
    size_t want = r->srv->cfg->replicas, d[8];
    size_t nd = rank_nodes(nodes, n, seq, want < 8 ? want : 8, d);
    bool keep = false;
    for (size_t k = 0; k < nd; k++)
        keep |= d[k] == self;
    kvs_seq_info_t mine;
    if (kvs_seq_info(st, seq, &mine))
        return true; /* dropped meanwhile */
    bool done = true;
    uint64_t cover = UINT64_MAX;
    size_t others = 0;
    for (size_t k = 0; k < nd && !stopping(r); k++) {
        if (d[k] == self)
            continue;
        others++;
        node_t *nd_ = &nodes[d[k]];
        peer_t *p = node_peer(r, nd_);
        if (!p) {
            done = false;
            continue;
        }
        uint64_t tmin = 0, tmax = 0;
        int rc = peer_info(p, seq, &tmin, &tmax);
        if (rc && rc != KVS_ENOSEQ) {
            peer_failed(nd_, rc);
            atomic_fetch_add(&r->errors, 1);
            done = false;
            continue;
        }
        if (rc == KVS_ENOSEQ && !missing_before(r, seq, nd_->hash)) {
            done = false; /* pushed on the next pass if still missing */
            continue;
        }
        /* A leaving holder always pushes: the import is what checks that
         * the copy there extends ours before ours goes. */
        if (rc == KVS_ENOSEQ || tmin < mine.tokens_max || !keep) {
            uint32_t res = 0;
            rc = push(r, p, seq, &res);
            if (rc == KVS_ECONFLICT) {
                atomic_fetch_add(&r->conflicts, 1);
                kvs__log(KVS__LOG_WARN, "repair_conflict",
                         "seq=%llu node=%s msg=\"%s\" (both copies kept)",
                         (unsigned long long)seq, nd_->addr, p->why);
            } else if (rc) {
                peer_failed(nd_, rc);
                if (rc != KVS_EBUSY)
                    atomic_fetch_add(&r->errors, 1);
            } else if (res == KVS_IMPORT_INSTALLED ||
                       res == KVS_IMPORT_REPLACED) {
                atomic_fetch_add(&r->pushed, 1);
            }
            if (rc) {
                done = false;
                continue;
            }
            if ((rc = peer_info(p, seq, &tmin, &tmax))) {
                peer_failed(nd_, rc);
                done = false;
                continue;
            }
        }
        if (tmin < cover)
            cover = tmin;
        /* Appends went on during the push: the next pass catches up. */
        kvs_seq_info_t now;
        if (kvs_seq_info(st, seq, &now) == 0 && tmin < now.tokens_max)
            done = false;
    }
    if (!keep && done && others) {
        int rc = kvs_seq_drop_if_covered(st, seq, cover);
        if (rc == 0) {
            atomic_fetch_add(&r->dropped, 1);
            kvs__log(KVS__LOG_INFO, "repair_dropped",
                     "seq=%llu tokens=%llu (held by its top %zu)",
                     (unsigned long long)seq, (unsigned long long)cover,
                     others);
        } else if (rc != KVS_ENOSEQ) {
            done = false;
        }
    }
    return done;
}

/* Read the live nodes; false when etcd cannot be read. */
static bool read_nodes(kvs__repair_t *r, node_t *nodes, size_t *n,
                       uint64_t *sig) {
    char prefix[600];
    if (kvs_node_key_prefix(r->srv->cfg->etcd_prefix, prefix, sizeof prefix))
        return false;
    kvs_etcd_kv_t *kvs = NULL;
    size_t nk = 0;
    if (kvs_etcd_range_prefix(r->etcd, prefix, &kvs, &nk, NULL))
        return false;
    *n = 0;
    *sig = 0;
    for (size_t i = 0; i < nk && *n < MAX_NODES; i++) {
        kvs_node_record_t rec;
        if (kvs_node_record_decode(kvs[i].value, kvs[i].value_len, &rec))
            continue;
        node_t *nd = &nodes[(*n)++];
        memset(nd, 0, sizeof *nd);
        nd->peer.fd = -1;
        snprintf(nd->addr, sizeof nd->addr, "%s", rec.addr);
        nd->hash = kvs_rendezvous_node_hash(nd->addr);
        *sig += nd->hash * 0x9e3779b97f4a7c15ull + 1; /* order-free */
    }
    kvs_etcd_kvs_free(kvs, nk);
    return true;
}

static void *repair_main(void *arg) {
    kvs__repair_t *r = arg;
    const kvs_server_config_t *cfg = r->srv->cfg;
    node_t *nodes = calloc(MAX_NODES, sizeof *nodes);
    uint64_t last_sig = 0;
    unsigned idle = 0;
    bool pending = false;
    while (nodes && !wait_stop(r, cfg->repair_interval_ms)) {
        size_t n = 0, self = SIZE_MAX;
        uint64_t sig;
        if (!read_nodes(r, nodes, &n, &sig))
            continue;
        for (size_t i = 0; i < n; i++)
            if (!strcmp(nodes[i].addr, r->self))
                self = i;
        /* Not listed (yet, or our lease lapsed): we cannot tell our own
         * rank, and must not give sequences away. */
        if (self == SIZE_MAX)
            continue;
        if (sig == last_sig && !pending && ++idle < STEADY_PASSES)
            continue;
        idle = 0;
        last_sig = sig;
        r->pass_no++;
        size_t cap = 0, total = 0;
        uint64_t *ids = NULL;
        kvs_store_list(r->srv->store, NULL, 0, &total);
        if (total && (ids = malloc(total * sizeof *ids)))
            kvs_store_list(r->srv->store, ids, total, &cap);
        if (cap > total)
            cap = total;
        uint64_t left = 0;
        for (size_t i = 0; i < cap && !stopping(r); i++)
            if (!repair_seq(r, nodes, n, self, ids[i]))
                left++;
        free(ids);
        for (size_t i = 0; i < n; i++)
            peer_close(&nodes[i].peer);
        pending = left > 0 || total != cap;
        atomic_store(&r->pending, left);
        atomic_fetch_add(&r->passes, 1);
    }
    free(nodes);
    return NULL;
}

int kvs__repair_start(kvs_server_t *srv, const char *self_addr) {
    const kvs_server_config_t *cfg = srv->cfg;
    if (!cfg->replicas || !cfg->etcd_endpoints[0] || srv->repair)
        return 0;
    kvs__repair_t *r = calloc(1, sizeof *r);
    if (!r)
        return KVS_ENOMEM;
    r->srv = srv;
    snprintf(r->self, sizeof r->self, "%s", self_addr);
    r->t0_ms = mono_ms();
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    char err[256];
    int rc = kvs_etcd_new(cfg->etcd_endpoints, 2000, &r->etcd, err, sizeof err);
    if (!rc && (rc = -pthread_create(&r->thread, NULL, repair_main, r)))
        kvs_etcd_free(r->etcd);
    if (rc) {
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return rc;
    }
    r->started = true;
    srv->repair = r;
    kvs__log(KVS__LOG_INFO, "repair_started",
             "replicas=%u rate_bytes=%llu interval_ms=%u self=%s",
             cfg->replicas, (unsigned long long)cfg->repair_rate_bytes,
             cfg->repair_interval_ms, r->self);
    return 0;
}

void kvs__repair_leave(kvs_server_t *srv) {
    kvs__repair_t *r = srv->repair;
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

void kvs__repair_stop(kvs_server_t *srv) {
    kvs__repair_t *r = srv->repair;
    if (r) {
        kvs__repair_leave(srv);
        if (r->started)
            pthread_join(r->thread, NULL);
        kvs_etcd_free(r->etcd);
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
        free(r);
        srv->repair = NULL;
    }
    imports_drop(srv);
}

bool kvs__repair_metrics(const kvs_server_t *srv, kvs__repair_stats_t *st) {
    const kvs__repair_t *r = srv->repair;
    if (!r)
        return false;
    st->pushed = atomic_load(&r->pushed);
    st->bytes = atomic_load(&r->bytes);
    st->dropped = atomic_load(&r->dropped);
    st->conflicts = atomic_load(&r->conflicts);
    st->errors = atomic_load(&r->errors);
    st->passes = atomic_load(&r->passes);
    st->pending = atomic_load(&r->pending);
    return true;
}
