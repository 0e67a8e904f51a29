/*
 * client.c: libkvsclient. Plain non-blocking sockets and poll(2), one
 * connection per daemon, no threads: the library only does work inside
 * kvs_client_submit(), kvs_client_poll() and the synchronous calls, so an
 * inference engine can drive it from its own loop.
 *
 * Per node, ops in flight are kept twice: in an id -> op hash table to match
 * answers (which arrive in completion order), and in a list in submission
 * order, whose head has the earliest deadline because every op gets the same
 * timeout. Completed ops wait in the client's done list until polled.
 *
 * C API values become messages and back only through proto/kvs_wire.h, the
 * same conversion the daemon uses.
 *
 * With an etcd:// address the node list is etcd's (proto/kvs_etcd.h): read
 * with a range over `<prefix>/nodes/` at open, then again inside submit
 * once membership_refresh_ms has passed or a connection failed. A periodic
 * range rather than a watch: the library has no thread and no loop of its
 * own to keep a watch stream read, and a range of a few nodes costs one
 * loopback-sized round trip per refresh period. Nodes live in fixed slots
 * (an op in flight names its slot); a node that leaves keeps its slot, not
 * live, until it is idle and the slot is reused by a newcomer.
 */
#include "kvs_client.h"
#include "kvs_etcd.h"
#include "kvs_frame.h"
#include "kvs_wire.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 256
#define MAX_REPLICAS 8
/* Nodes asked, in rendezvous order, before a sequence is declared absent:
 * a bound on the round trips one op may cost after membership changes. */
#define MAX_PROBE 8
/* Sequences whose holders are not their rendezvous top R (they were
 * created before a node joined), remembered so that only their first op
 * after a change pays for the probing: options.location_cache entries,
 * by default 4096 (~180 KiB). */
#define LOC_DEFAULT_CAP 4096
#define LOC_MAX_CAP (1u << 24)

typedef struct node_s {
    char addr[256];
    bool is_unix;
    char host[256];
    char port[16];
    uint64_t hash; /* of addr, for rendezvous hashing */
    int fd;        /* -1 when not connected */
    kvs_frame_reader_t rd;
    /* Frames not yet sent, back to back: submits append, flushes send from
     * woff. One buffer means one send() for a whole pipeline batch. */
    uint8_t *wbuf;
    size_t wlen, woff, wcap;
    /* In flight: table for lookup, list for deadlines. */
    kvs_client_op_t **tab;
    size_t tab_cap, tab_n;
    kvs_client_op_t *fifo_head, *fifo_tail;
    uint64_t hello_id;
    bool live; /* placed on: always, for a static list */
    /* now_ms() until which reads ask this node after the other replicas:
     * a connect to it failed. A dead node stays registered until its lease
     * lapses; without this every read paid a refused connect (and an etcd
     * range) before failing over. 0: healthy. */
    uint64_t down_until;
    kvs_node_record_t rec; /* etcd's record of the node (etcd:// only) */
} node_t;

/* Where a displaced sequence lives: an LRU of loc_cap entries, chained
 * hash on seq, entries linked most-recent-first; indexes, -1 for none. */
typedef struct loc_entry_s {
    uint64_t seq;
    uint16_t node[MAX_REPLICAS];
    uint8_t n;          /* 0: free */
    int32_t hnext;      /* next in its bucket */
    int32_t prev, next; /* LRU */
} loc_entry_t;

typedef struct loc_cache_s {
    int32_t *bucket; /* n_buckets, a power of two */
    uint32_t n_buckets;
    loc_entry_t *e; /* cap */
    int32_t cap;
    int32_t head, tail; /* most and least recently used */
    int32_t used;       /* entries handed out so far (then reuse the tail) */
} loc_cache_t;

struct kvs_client_s {
    node_t *nodes;
    size_t n_nodes;
    char *auth_token;
    char *client_name;
    uint32_t connect_timeout_ms, request_timeout_ms, max_frame_bytes;
    uint64_t next_id;
    size_t pending; /* submitted, not yet returned by poll */
    kvs_client_op_t *done_head, *done_tail;
    /* etcd:// only (etcd NULL otherwise). */
    kvs_etcd_t *etcd;
    char node_prefix[512]; /* "<prefix>/nodes/" */
    uint32_t refresh_ms;
    uint64_t down_ms;      /* node_t.down_until after a failed connect */
    uint64_t next_refresh; /* now_ms() of the next range; 0: at once */
    uint32_t replicas;     /* R: nodes that hold each sequence */
    kvs_client_counters_t counters;
    /* Ops passed on (a node lacked the sequence or, R > 1, could not be
     * reached), to be sent to the next one by pump(); linked by next_, in
     * arrival order, still counted in pending. */
    kvs_client_op_t *retry_head, *retry_tail;
    uint32_t last_acked, last_wanted; /* the last synchronous write */
    loc_cache_t *loc;                 /* allocated on first use */
    uint32_t loc_cap;                 /* its entries */
    char errmsg[512];
};

static int cfail(kvs_client_t *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int cfail(kvs_client_t *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof(c->errmsg), fmt, ap);
    va_end(ap);
    return code;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t mix64(uint64_t x) { /* splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* ------------------------------------------------------ location cache */

static int32_t *loc_slot(loc_cache_t *l, uint64_t seq) {
    int32_t *p = &l->bucket[mix64(seq) & (l->n_buckets - 1)];
    while (*p >= 0 && l->e[*p].seq != seq)
        p = &l->e[*p].hnext;
    return p;
}

static void loc_unlink(loc_cache_t *l, int32_t i) {
    loc_entry_t *e = &l->e[i];
    if (e->prev >= 0)
        l->e[e->prev].next = e->next;
    else
        l->head = e->next;
    if (e->next >= 0)
        l->e[e->next].prev = e->prev;
    else
        l->tail = e->prev;
    e->prev = e->next = -1;
}

static void loc_push_front(loc_cache_t *l, int32_t i) {
    loc_entry_t *e = &l->e[i];
    e->prev = -1;
    e->next = l->head;
    if (l->head >= 0)
        l->e[l->head].prev = i;
    else
        l->tail = i;
    l->head = i;
}

/* The cached holders of seq (touching it), or 0. */
static size_t loc_get(kvs_client_t *c, uint64_t seq, size_t *out) {
    loc_cache_t *l = c->loc;
    if (!l)
        return 0;
    int32_t i = *loc_slot(l, seq);
    if (i < 0)
        return 0;
    loc_unlink(l, i);
    loc_push_front(l, i);
    for (size_t k = 0; k < l->e[i].n; k++)
        out[k] = l->e[i].node[k];
    return l->e[i].n;
}

static void loc_del(kvs_client_t *c, uint64_t seq) {
    loc_cache_t *l = c->loc;
    if (!l)
        return;
    int32_t *p = loc_slot(l, seq);
    int32_t i = *p;
    if (i < 0)
        return;
    *p = l->e[i].hnext;
    loc_unlink(l, i);
    l->e[i].n = 0;
    /* A free entry goes to the back, to be taken first. */
    l->e[i].prev = l->tail;
    l->e[i].next = -1;
    if (l->tail >= 0)
        l->e[l->tail].next = i;
    else
        l->head = i;
    l->tail = i;
}

/* Remember that seq lives on node[0..n) (n >= 1). Out of memory just
 * means no cache: the next op probes again. */
static void loc_put(kvs_client_t *c, uint64_t seq, const size_t *node,
                    size_t n) {
    if (!c->loc) {
        uint32_t nb = 1;
        while (nb < c->loc_cap)
            nb <<= 1;
        loc_cache_t *l = calloc(1, sizeof(*l));
        if (!l)
            return;
        l->bucket = malloc(nb * sizeof(*l->bucket));
        l->e = calloc(c->loc_cap, sizeof(*l->e));
        if (!l->bucket || !l->e) {
            free(l->bucket);
            free(l->e);
            free(l);
            return;
        }
        for (size_t b = 0; b < nb; b++)
            l->bucket[b] = -1;
        l->n_buckets = nb;
        l->cap = (int32_t)c->loc_cap;
        l->head = l->tail = -1;
        c->loc = l;
    }
    loc_cache_t *l = c->loc;
    int32_t i = *loc_slot(l, seq);
    if (i < 0) {
        if (l->used < l->cap) {
            i = l->used++;
            l->e[i].prev = l->e[i].next = -1;
        } else {
            i = l->tail; /* least recently used, or a free one */
            if (l->e[i].n)
                loc_del(c, l->e[i].seq);
            loc_unlink(l, i);
        }
        l->e[i].seq = seq;
        int32_t *b = &l->bucket[mix64(seq) & (l->n_buckets - 1)];
        l->e[i].hnext = *b;
        *b = i;
    } else {
        loc_unlink(l, i);
    }
    loc_push_front(l, i);
    l->e[i].n = (uint8_t)(n > MAX_REPLICAS ? MAX_REPLICAS : n);
    for (size_t k = 0; k < l->e[i].n; k++)
        l->e[i].node[k] = (uint16_t)node[k];
}

/* A node left: forget it as a holder (its slot may go to a newcomer). */
static void loc_forget_node(kvs_client_t *c, size_t node) {
    loc_cache_t *l = c->loc;
    if (!l)
        return;
    for (int32_t i = 0; i < l->used; i++) {
        loc_entry_t *e = &l->e[i];
        size_t w = 0;
        for (size_t k = 0; k < e->n; k++)
            if (e->node[k] != node)
                e->node[w++] = e->node[k];
        if (e->n && !w)
            loc_del(c, e->seq);
        else
            e->n = (uint8_t)w;
    }
}

/* --------------------------------------------------------- id hash table */

static size_t slot_of(uint64_t id, size_t cap) {
    return (size_t)(mix64(id) & (cap - 1));
}

static int tab_put(node_t *n, kvs_client_op_t *op) {
    if ((n->tab_n + 1) * 2 > n->tab_cap) {
        size_t cap = n->tab_cap ? n->tab_cap * 2 : 64;
        kvs_client_op_t **t = calloc(cap, sizeof(*t));
        if (!t)
            return KVS_ENOMEM;
        for (size_t i = 0; i < n->tab_cap; i++) {
            kvs_client_op_t *o = n->tab[i];
            if (!o)
                continue;
            size_t s = slot_of(o->id_, cap);
            while (t[s])
                s = (s + 1) & (cap - 1);
            t[s] = o;
        }
        free(n->tab);
        n->tab = t;
        n->tab_cap = cap;
    }
    size_t s = slot_of(op->id_, n->tab_cap);
    while (n->tab[s])
        s = (s + 1) & (n->tab_cap - 1);
    n->tab[s] = op;
    n->tab_n++;
    return 0;
}

/* Remove and return the op with `id`, or NULL. Backward-shift deletion keeps
 * probe chains intact without tombstones. */
static kvs_client_op_t *tab_take(node_t *n, uint64_t id) {
    if (!n->tab_cap)
        return NULL;
    size_t mask = n->tab_cap - 1, s = slot_of(id, n->tab_cap);
    while (n->tab[s] && n->tab[s]->id_ != id)
        s = (s + 1) & mask;
    kvs_client_op_t *op = n->tab[s];
    if (!op)
        return NULL;
    n->tab[s] = NULL;
    n->tab_n--;
    size_t j = s;
    for (;;) {
        j = (j + 1) & mask;
        kvs_client_op_t *o = n->tab[j];
        if (!o)
            break;
        size_t home = slot_of(o->id_, n->tab_cap);
        /* Move o back to the hole if its home is not in (s, j]. */
        bool between =
            s <= j ? (home > s && home <= j) : (home > s || home <= j);
        if (!between) {
            n->tab[s] = o;
            n->tab[j] = NULL;
            s = j;
        }
    }
    return op;
}

/* ---------------------------------------------------------- completion */

static void fifo_remove(node_t *n, kvs_client_op_t *op) {
    if (op->prev_)
        op->prev_->next_ = op->next_;
    else
        n->fifo_head = op->next_;
    if (op->next_)
        op->next_->prev_ = op->prev_;
    else
        n->fifo_tail = op->prev_;
    op->prev_ = op->next_ = NULL;
}

static void fan_sub_done(kvs_client_t *c, kvs_client_op_t *sub);
static bool fan_moves_on(kvs_client_t *c, kvs_client_op_t *sub);
static bool walks_on(const kvs_client_t *c, const kvs_client_op_t *op);
static void walk_done(kvs_client_t *c, kvs_client_op_t *op);

/* Passed on, to be sent by retry_reads(), in the order answers came:
 * two writes to one sequence that both found no sequence keep theirs. */
static void retry_push(kvs_client_t *c, kvs_client_op_t *op) {
    op->next_ = NULL;
    if (c->retry_tail)
        c->retry_tail->next_ = op;
    else
        c->retry_head = op;
    c->retry_tail = op;
}

static void done_push(kvs_client_t *c, kvs_client_op_t *op) {
    op->done_ = true;
    op->prev_ = c->done_tail;
    op->next_ = NULL;
    if (c->done_tail)
        c->done_tail->next_ = op;
    else
        c->done_head = op;
    c->done_tail = op;
}

/* An op in flight is answered (or failed). A replica's copy of a write
 * (fan_ set) reports to its write instead of the done list; `op` may be
 * freed by then, so nothing touches it after this call. */
static void complete(kvs_client_t *c, kvs_client_op_t *op, int status,
                     const char *msg) {
    node_t *n = &c->nodes[op->node_];
    fifo_remove(n, op);
    op->status = status;
    if (status)
        snprintf(op->message, sizeof(op->message), "%s",
                 msg && *msg ? msg : kvs_strerror(status));
    if (op->fan_) {
        if (fan_moves_on(c, op))
            return;
        op->done_ = true;
        fan_sub_done(c, op);
        return;
    }
    if (walks_on(c, op)) {
        /* Not from here: complete() runs inside node_fail() and friends,
         * which a submit could re-enter. */
        op->moved_ |= status == KVS_ENOSEQ;
        op->try_++;
        retry_push(c, op);
        return;
    }
    walk_done(c, op);
    done_push(c, op);
}

static void done_remove(kvs_client_t *c, kvs_client_op_t *op) {
    if (op->prev_)
        op->prev_->next_ = op->next_;
    else
        c->done_head = op->next_;
    if (op->next_)
        op->next_->prev_ = op->prev_;
    else
        c->done_tail = op->prev_;
    op->prev_ = op->next_ = NULL;
    c->pending--;
}

/* Drop the connection; every op in flight on it completes with `status`. */
static void node_fail(kvs_client_t *c, node_t *n, int status, const char *msg) {
    if (n->fd >= 0)
        close(n->fd);
    n->fd = -1;
    kvs_frame_reader_destroy(&n->rd);
    n->wlen = n->woff = 0;
    if (n->wcap > (4u << 20)) { /* do not keep a huge append's buffer */
        free(n->wbuf);
        n->wbuf = NULL;
        n->wcap = 0;
    }
    while (n->fifo_head) {
        kvs_client_op_t *op = n->fifo_head;
        tab_take(n, op->id_);
        complete(c, op, status, msg);
    }
    n->hello_id = 0;
}

/* ------------------------------------------------------------ addresses */

static int parse_addr(node_t *n, const char *a) {
    n->is_unix = false; /* a reused slot may have held a unix: node */
    if (strlen(a) >= sizeof(n->addr))
        return KVS_EINVAL;
    snprintf(n->addr, sizeof(n->addr), "%s", a);
    n->hash = kvs_rendezvous_node_hash(a);
    if (!strncmp(a, "unix:", 5)) {
        const char *p = a + 5;
        if (!strncmp(p, "//", 2))
            p += 2;
        if (!*p || strlen(p) >= sizeof(((struct sockaddr_un *)0)->sun_path))
            return KVS_EINVAL;
        n->is_unix = true;
        snprintf(n->host, sizeof(n->host), "%s", p);
        return 0;
    }
    if (!strncmp(a, "tcp://", 6))
        a += 6;
    const char *colon;
    if (a[0] == '[') {
        const char *e = strchr(a, ']');
        if (!e || e[1] != ':')
            return KVS_EINVAL;
        snprintf(n->host, sizeof(n->host), "%.*s", (int)(e - a - 1), a + 1);
        colon = e + 1;
    } else {
        colon = strrchr(a, ':');
        if (!colon || strchr(a, ':') != colon)
            return KVS_EINVAL;
        snprintf(n->host, sizeof(n->host), "%.*s", (int)(colon - a), a);
    }
    const char *port = colon + 1;
    char *end;
    long pv = strtol(port, &end, 10);
    if (!*port || *end || pv <= 0 || pv > 65535 || !n->host[0])
        return KVS_EINVAL;
    snprintf(n->port, sizeof(n->port), "%ld", pv);
    return 0;
}

/* ----------------------------------------------------------- membership */

/* Re-read the node list from etcd. Nodes still listed stay where they are
 * (connections and ops in flight untouched); gone ones stop being live and
 * lose an idle connection; new ones take a free slot. On failure the last
 * list stays in use. */
static int members_refresh(kvs_client_t *c) {
    kvs_etcd_kv_t *kvs = NULL;
    size_t nk = 0;
    c->next_refresh = now_ms() + c->refresh_ms;
    int rc = kvs_etcd_range_prefix(c->etcd, c->node_prefix, &kvs, &nk, NULL);
    if (rc)
        return cfail(c, rc, "membership: %s", kvs_etcd_errmsg(c->etcd));
    bool seen[MAX_NODES] = {false};
    for (size_t k = 0; k < nk; k++) {
        kvs_node_record_t r;
        if (kvs_node_record_decode(kvs[k].value, kvs[k].value_len, &r))
            continue; /* not a record we can read: not a node for us */
        size_t i = 0, fresh = SIZE_MAX;
        for (; i < c->n_nodes; i++) {
            node_t *n = &c->nodes[i];
            if (!strcmp(n->addr, r.addr))
                break;
            /* Free: not live before, not taken in this round, idle. */
            if (fresh == SIZE_MAX && !n->live && !seen[i] && n->fd < 0 &&
                !n->fifo_head)
                fresh = i;
        }
        if (i == c->n_nodes) {
            if (fresh == SIZE_MAX && c->n_nodes == MAX_NODES)
                continue;
            i = fresh != SIZE_MAX ? fresh : c->n_nodes++;
            node_t *n = &c->nodes[i];
            n->fd = -1;
            n->down_until = 0;
            if (parse_addr(n, r.addr)) {
                n->addr[0] = 0; /* unusable; the slot stays free */
                continue;
            }
        }
        c->nodes[i].rec = r;
        seen[i] = true;
    }
    kvs_etcd_kvs_free(kvs, nk);
    for (size_t i = 0; i < c->n_nodes; i++) {
        node_t *n = &c->nodes[i];
        if (n->live && !seen[i])
            loc_forget_node(c, i);
        n->live = seen[i];
        if (!n->live && n->fd >= 0 && !n->fifo_head)
            node_fail(c, n, KVS_ECONN, "node left the cluster");
    }
    return 0;
}

/* "etcd://host:port[,host:port...]/prefix" (prefix "/kvstore" if none). */
static int etcd_open(kvs_client_t *c, const char *url) {
    const char *hosts = url + 7;
    const char *slash = strchr(hosts, '/');
    size_t hl = slash ? (size_t)(slash - hosts) : strlen(hosts);
    char eps[512], err[256];
    if (!hl || hl >= sizeof(eps))
        return cfail(c, KVS_EINVAL, "%s: no etcd host", url);
    memcpy(eps, hosts, hl);
    eps[hl] = 0;
    const char *prefix = slash && slash[1] ? slash : "/kvstore";
    int rc =
        kvs_etcd_new(eps, c->connect_timeout_ms ? c->connect_timeout_ms : 2000,
                     &c->etcd, err, sizeof(err));
    if (rc)
        return cfail(c, rc, "%s: %s", url, err);
    if (kvs_node_key_prefix(prefix, c->node_prefix, sizeof(c->node_prefix)))
        return cfail(c, KVS_EINVAL, "%s: prefix too long", url);
    return members_refresh(c);
}

/* Time for a refresh (etcd:// only)? A failed refresh keeps the old list:
 * the nodes themselves may well be fine while etcd is away. */
static void members_maybe_refresh(kvs_client_t *c) {
    if (c->etcd && now_ms() >= c->next_refresh)
        members_refresh(c);
}

bool kvs_client_node_live(const kvs_client_t *c, size_t node) {
    return node < c->n_nodes && c->nodes[node].live;
}

int kvs_client_members(kvs_client_t *c, kvs_client_member_t *out, size_t cap,
                       size_t *n_out) {
    *n_out = 0;
    if (c->etcd) {
        int rc = members_refresh(c);
        if (rc)
            return rc;
    }
    for (size_t i = 0; i < c->n_nodes && *n_out < cap; i++) {
        const node_t *n = &c->nodes[i];
        if (!n->live)
            continue;
        kvs_client_member_t *m = &out[(*n_out)++];
        memset(m, 0, sizeof(*m));
        m->node = i;
        snprintf(m->addr, sizeof(m->addr), "%s", n->addr);
        snprintf(m->node_id, sizeof(m->node_id), "%s", n->rec.node_id);
        snprintf(m->version, sizeof(m->version), "%s", n->rec.version);
        m->memory_limit = n->rec.memory_limit;
        m->memory_used = n->rec.memory_used;
        m->sequences = n->rec.sequences;
        m->start_time = n->rec.start_time;
        m->protocol = n->rec.protocol;
        m->http_port = n->rec.http_port;
    }
    return 0;
}

void kvs_client_options_default(kvs_client_options_t *o) {
    memset(o, 0, sizeof(*o));
    o->connect_timeout_ms = 2000;
    o->request_timeout_ms = 30000;
    o->max_frame_bytes = KVS_FRAME_DEFAULT_MAX_BODY;
}

int kvs_client_open(const kvs_client_options_t *o, kvs_client_t **out) {
    *out = NULL;
    if (!o || !o->addrs || o->n_addrs == 0 || o->n_addrs > MAX_NODES)
        return KVS_EINVAL;
    if (o->max_frame_bytes > KVS_FRAME_MAX_BODY_LIMIT)
        return KVS_EINVAL;
    bool etcd = o->addrs[0] && !strncmp(o->addrs[0], "etcd://", 7);
    if (etcd && o->n_addrs != 1)
        return KVS_EINVAL; /* one etcd:// address names the whole cluster */
    kvs_client_t *c = calloc(1, sizeof(*c));
    if (!c)
        return KVS_ENOMEM;
    c->nodes = calloc(etcd ? MAX_NODES : o->n_addrs, sizeof(node_t));
    c->auth_token = strdup(o->auth_token ? o->auth_token : "");
    c->client_name = strdup(o->client_name ? o->client_name : "libkvsclient");
    if (!c->nodes || !c->auth_token || !c->client_name) {
        kvs_client_close(c);
        return KVS_ENOMEM;
    }
    c->n_nodes = etcd ? 0 : o->n_addrs;
    /* Zero fields are defaults (a zero-filled struct must work); inside,
     * 0 means "no timeout", as the rest of this file expects. */
    kvs_client_options_t def;
    kvs_client_options_default(&def);
    c->connect_timeout_ms = o->connect_timeout_ms == KVS_CLIENT_TIMEOUT_NONE ? 0
                            : o->connect_timeout_ms ? o->connect_timeout_ms
                                                    : def.connect_timeout_ms;
    c->request_timeout_ms = o->request_timeout_ms == KVS_CLIENT_TIMEOUT_NONE ? 0
                            : o->request_timeout_ms ? o->request_timeout_ms
                                                    : def.request_timeout_ms;
    c->max_frame_bytes =
        o->max_frame_bytes ? o->max_frame_bytes : def.max_frame_bytes;
    c->next_id = 1;
    c->refresh_ms = o->membership_refresh_ms ? o->membership_refresh_ms : 1000;
    /* Two membership periods: long enough to cover the reads until the
     * list is read again, short enough that a restarted node is asked
     * again soon. */
    c->down_ms = 2 * (uint64_t)c->refresh_ms;
    if (o->replicas > MAX_REPLICAS) {
        kvs_client_close(c);
        return KVS_EINVAL;
    }
    c->replicas = o->replicas ? o->replicas : 1;
    if (o->location_cache > LOC_MAX_CAP) {
        kvs_client_close(c);
        return KVS_EINVAL;
    }
    c->loc_cap = o->location_cache ? o->location_cache : LOC_DEFAULT_CAP;
    if (etcd) {
        int rc = etcd_open(c, o->addrs[0]);
        if (rc) {
            kvs_client_close(c);
            return rc;
        }
        *out = c;
        return 0;
    }
    for (size_t i = 0; i < o->n_addrs; i++) {
        c->nodes[i].fd = -1;
        c->nodes[i].live = true;
        if (!o->addrs[i] || parse_addr(&c->nodes[i], o->addrs[i])) {
            kvs_client_close(c);
            return KVS_EINVAL;
        }
    }
    *out = c;
    return 0;
}

void kvs_client_close(kvs_client_t *c) {
    if (!c)
        return;
    for (size_t i = 0; c->nodes && i < c->n_nodes; i++) {
        node_t *n = &c->nodes[i];
        node_fail(c, n, KVS_ECONN, "client closed");
        free(n->tab);
        free(n->wbuf);
    }
    /* Replica copies waiting to move on: their write owns memory. */
    while (c->nodes && c->retry_head) {
        kvs_client_op_t *op = c->retry_head;
        c->retry_head = op->next_;
        if (!c->retry_head)
            c->retry_tail = NULL;
        op->next_ = NULL;
        if (op->fan_) {
            op->status = KVS_ECONN;
            op->done_ = true;
            fan_sub_done(c, op);
        }
    }
    free(c->nodes);
    if (c->loc) {
        free(c->loc->bucket);
        free(c->loc->e);
        free(c->loc);
    }
    kvs_etcd_free(c->etcd);
    free(c->auth_token);
    free(c->client_name);
    free(c);
}

const char *kvs_client_errmsg(const kvs_client_t *c) {
    return c->errmsg;
}
size_t kvs_client_n_nodes(const kvs_client_t *c) {
    return c->n_nodes;
}
const char *kvs_client_node_addr(const kvs_client_t *c, size_t node) {
    return node < c->n_nodes ? c->nodes[node].addr : NULL;
}
size_t kvs_client_pending(const kvs_client_t *c) {
    return c->pending;
}

size_t kvs_client_node_for(const kvs_client_t *c, uint64_t seq) {
    size_t best = SIZE_MAX;
    uint64_t best_w = 0;
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (!c->nodes[i].live)
            continue;
        uint64_t w = kvs_rendezvous_weight(seq, c->nodes[i].hash);
        if (best == SIZE_MAX || w > best_w) {
            best_w = w;
            best = i;
        }
    }
    return best;
}

/* The `want` live nodes of highest rendezvous weight for `seq`, best
 * first (the first is kvs_client_node_for's). */
static size_t ranked(const kvs_client_t *c, uint64_t seq, size_t want,
                     size_t *out) {
    size_t n = 0;
    uint64_t w_out[MAX_PROBE];
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (!c->nodes[i].live)
            continue;
        uint64_t w = kvs_rendezvous_weight(seq, c->nodes[i].hash);
        size_t at = n;
        while (at > 0 && w_out[at - 1] < w)
            at--;
        if (at >= want)
            continue;
        if (n < want)
            n++;
        for (size_t k = n - 1; k > at; k--) {
            out[k] = out[k - 1];
            w_out[k] = w_out[k - 1];
        }
        out[at] = i;
        w_out[at] = w;
    }
    return n;
}

/* Where a new sequence goes: the top R. */
static size_t replicas_of(const kvs_client_t *c, uint64_t seq, size_t *out) {
    return ranked(c, seq, c->replicas, out);
}

/* The nodes an op on an existing `seq` tries, in order: its cached
 * holders, then every live node by rendezvous rank, at most MAX_PROBE.
 * A sequence stays where it was created (no repair moves it), so after a
 * node joined its holders may rank below the newcomer. */
static size_t candidates(kvs_client_t *c, uint64_t seq, size_t *out) {
    size_t hold[MAX_REPLICAS], nh = loc_get(c, seq, hold), n = 0;
    for (size_t k = 0; k < nh; k++)
        if (hold[k] < c->n_nodes && c->nodes[hold[k]].live)
            out[n++] = hold[k];
    size_t nc = n, r[MAX_PROBE], nr = ranked(c, seq, MAX_PROBE, r);
    for (size_t k = 0; k < nr && n < MAX_PROBE; k++) {
        bool dup = false;
        for (size_t j = 0; j < nc && !dup; j++)
            dup = r[k] == out[j];
        if (!dup)
            out[n++] = r[k];
    }
    return n;
}

/* candidates() for a read: within the first R (the replicas a read may
 * ask), nodes whose connect failed lately go after the others, in their
 * order otherwise. Writes keep candidates(): they go to every replica. */
static size_t read_candidates(kvs_client_t *c, uint64_t seq, size_t *out) {
    size_t nc = candidates(c, seq, out);
    size_t m = c->replicas < nc ? c->replicas : nc, up = 0;
    size_t down[MAX_REPLICAS], nd = 0;
    uint64_t now = now_ms();
    for (size_t k = 0; k < m; k++) {
        if (c->nodes[out[k]].down_until > now && nd < MAX_REPLICAS)
            down[nd++] = out[k];
        else
            out[up++] = out[k];
    }
    for (size_t k = 0; k < nd; k++)
        out[up + k] = down[k];
    return nc;
}

/* An op on `seq` was answered by the nodes hold[0..n): remember them when
 * they are not where hashing puts it, forget it when they are. */
static void note_holders(kvs_client_t *c, uint64_t seq, const size_t *hold,
                         size_t n) {
    size_t top[MAX_REPLICAS], nt = replicas_of(c, seq, top);
    bool same = n == nt;
    for (size_t k = 0; same && k < n; k++) {
        bool in = false;
        for (size_t j = 0; j < nt && !in; j++)
            in = hold[k] == top[j];
        same = in;
    }
    if (same)
        loc_del(c, seq);
    else
        loc_put(c, seq, hold, n);
}

/* ------------------------------------------------------------ transport */

/* Room for `need` more bytes at the end of the output buffer. */
static int wbuf_reserve(node_t *n, size_t need) {
    if (n->woff == n->wlen)
        n->woff = n->wlen = 0;
    if (n->wcap - n->wlen >= need)
        return 0;
    if (n->woff) { /* reclaim what was sent before growing */
        memmove(n->wbuf, n->wbuf + n->woff, n->wlen - n->woff);
        n->wlen -= n->woff;
        n->woff = 0;
        if (n->wcap - n->wlen >= need)
            return 0;
    }
    size_t cap = n->wcap ? n->wcap : 16384;
    while (cap - n->wlen < need)
        cap *= 2;
    uint8_t *b = realloc(n->wbuf, cap);
    if (!b)
        return KVS_ENOMEM;
    n->wbuf = b;
    n->wcap = cap;
    return 0;
}

/* Append one frame for `msg` to the node's output buffer. */
static int queue_msg(kvs_client_t *c, node_t *n, uint64_t id,
                     const ProtobufCMessage *msg) {
    size_t body = protobuf_c_message_get_packed_size(msg);
    if (body > c->max_frame_bytes)
        return cfail(c, KVS_ETOOBIG,
                     "request of %zu bytes exceeds max_frame_bytes %u", body,
                     c->max_frame_bytes);
    if (wbuf_reserve(n, KVS_FRAME_HEADER_SIZE + body))
        return cfail(c, KVS_ENOMEM, "out of memory for a %zu-byte request",
                     body);
    kvs_frame_encode_to(id, 0, msg, body, n->wbuf + n->wlen);
    n->wlen += KVS_FRAME_HEADER_SIZE + body;
    return 0;
}

/* Write what the socket takes now. Returns 0, or -errno on a dead socket. */
static int node_flush(node_t *n) {
    while (n->woff < n->wlen) {
        ssize_t r = send(n->fd, n->wbuf + n->woff, n->wlen - n->woff,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -errno;
        }
        n->woff += (size_t)r;
    }
    n->woff = n->wlen = 0;
    return 0;
}

static int connect_one(kvs_client_t *c, node_t *n, const struct sockaddr *sa,
                       socklen_t salen) {
    int fd =
        socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, sa, salen) < 0) {
        if (errno != EINPROGRESS && errno != EAGAIN) {
            int e = errno;
            close(fd);
            return -e;
        }
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int r;
        do
            r = poll(&p, 1,
                     c->connect_timeout_ms ? (int)c->connect_timeout_ms : -1);
        while (r < 0 && errno == EINTR);
        if (r == 0) {
            close(fd);
            return -ETIMEDOUT;
        }
        int soerr = 0;
        socklen_t sl = sizeof(soerr);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr) {
            close(fd);
            return -soerr;
        }
    }
    if (sa->sa_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    n->fd = fd;
    return 0;
}

static int send_hello(kvs_client_t *c, node_t *n) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest h = KVS__V1__HELLO_REQUEST__INIT;
    h.protocol_version = KVS_PROTOCOL_VERSION;
    h.auth_token = c->auth_token;
    h.client_name = c->client_name;
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &h;
    n->hello_id = c->next_id++;
    return queue_msg(c, n, n->hello_id, &req.base);
}

static int node_connect(kvs_client_t *c, node_t *n) {
    if (n->fd >= 0)
        return 0;
    int rc = kvs_frame_reader_init(&n->rd, c->max_frame_bytes);
    if (rc)
        return rc;
    int err = -ECONNREFUSED;
    if (n->is_unix) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%.107s", n->host);
        err = connect_one(c, n, (struct sockaddr *)&sa, sizeof(sa));
    } else {
        struct addrinfo hints = {.ai_family = AF_UNSPEC,
                                 .ai_socktype = SOCK_STREAM,
                                 .ai_flags = AI_NUMERICSERV};
        struct addrinfo *res = NULL;
        int g = getaddrinfo(n->host, n->port, &hints, &res);
        if (g) {
            kvs_frame_reader_destroy(&n->rd);
            return cfail(c, KVS_ECONN, "%s: cannot resolve host: %s", n->addr,
                         gai_strerror(g));
        }
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
            err = connect_one(c, n, ai->ai_addr, ai->ai_addrlen);
            if (!err)
                break;
        }
        freeaddrinfo(res);
    }
    if (err) {
        kvs_frame_reader_destroy(&n->rd);
        n->down_until = now_ms() + c->down_ms;
        return cfail(c, err == -ETIMEDOUT ? KVS_ETIMEDOUT : KVS_ECONN,
                     "%s: cannot connect: %s", n->addr, strerror(-err));
    }
    n->down_until = 0;
    /* Hello goes first, pipelined with the requests behind it: the server
     * handles frames of a connection in order, so no round trip is lost. */
    if ((rc = send_hello(c, n))) {
        node_fail(c, n, rc, "cannot send hello");
        return cfail(c, rc, "%s: cannot send hello", n->addr);
    }
    return 0;
}

/* ---------------------------------------------------------------- decode */

static void fill_result(kvs_client_op_t *op, const Kvs__V1__Response *r,
                        int *status, char *msg, size_t msglen) {
    *status = 0;
    switch (op->type) {
    case KVS_CLIENT_SEARCH: {
        const Kvs__V1__SearchResponse *s = r->search;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_SEARCH || !s)
            goto wrong;
        size_t n = (size_t)s->n_q_heads * s->k;
        if (n > op->result_cap) {
            *status = KVS_ERANGE;
            snprintf(msg, msglen,
                     "search result has %zu entries (%u heads x k %u); "
                     "result_cap is %zu",
                     n, s->n_q_heads, s->k, op->result_cap);
            return;
        }
        if (n) {
            memcpy(op->positions, s->positions.data, n * sizeof(int64_t));
            memcpy(op->scores, s->scores.data, n * sizeof(float));
        }
        op->result_heads = s->n_q_heads;
        op->result_k = s->k;
        return;
    }
    case KVS_CLIENT_ATTEND: {
        const Kvs__V1__AttendResponse *a = r->attend;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_ATTEND || !a)
            goto wrong;
        if (a->output.len != op->n_query_floats * sizeof(float)) {
            *status = KVS_EPROTO;
            snprintf(msg, msglen, "attend output has %zu bytes, expected %zu",
                     a->output.len, op->n_query_floats * sizeof(float));
            return;
        }
        memcpy(op->output, a->output.data, a->output.len);
        if (op->attend_stats)
            kvs_wire_attend_stats_from_pb(a->stats, op->attend_stats);
        return;
    }
    case KVS_CLIENT_INFO: {
        const Kvs__V1__InfoResponse *i = r->info;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_INFO || !i)
            goto wrong;
        char why[160];
        if (kvs_wire_seq_info_from_pb(i, op->info, why, sizeof(why))) {
            /* A daemon that sends what this client cannot represent. */
            *status = KVS_EPROTO;
            snprintf(msg, msglen, "info: %s", why);
        }
        return;
    }
    case KVS_CLIENT_STATS: {
        const Kvs__V1__StatsResponse *s = r->stats;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_STATS || !s)
            goto wrong;
        kvs_client_stats_t *o = op->stats;
        memset(o, 0, sizeof(*o));
        kvs_wire_store_stats_from_pb(s, &o->store);
        snprintf(o->attend_path, sizeof(o->attend_path), "%s",
                 s->attend_path ? s->attend_path : "");
        snprintf(o->server_version, sizeof(o->server_version), "%s",
                 s->server_version ? s->server_version : "");
        snprintf(o->node_id, sizeof(o->node_id), "%s",
                 s->node_id ? s->node_id : "");
        o->uptime_seconds = s->uptime_seconds;
        o->connections = s->connections;
        o->requests_total = s->requests_total;
        o->inflight = s->inflight;
        o->bytes_in = s->bytes_in;
        o->bytes_out = s->bytes_out;
        return;
    }
    case KVS_CLIENT_LIST: {
        const Kvs__V1__ListSequencesResponse *l = r->list;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_LIST || !l)
            goto wrong;
        size_t n = l->n_ids < op->ids_cap ? l->n_ids : op->ids_cap;
        if (n)
            memcpy(op->ids, l->ids, n * sizeof(uint64_t));
        op->n_ids = n;
        op->ids_total = l->total;
        return;
    }
    case KVS_CLIENT_FLUSH: {
        const Kvs__V1__FlushResponse *f = r->flush;
        if (r->result_case != KVS__V1__RESPONSE__RESULT_FLUSH || !f)
            goto wrong;
        op->persisted_seqno = f->persisted_seqno;
        return;
    }
    default:
        return; /* no result beyond the status */
    }
wrong:
    *status = KVS_EPROTO;
    snprintf(msg, msglen, "server answered with the wrong result type (%d)",
             (int)r->result_case);
}

/* Handle one frame. Returns non-zero when the connection must be dropped;
 * *why then says with which status. */
static int handle_frame(kvs_client_t *c, node_t *n, const kvs_frame_header_t *h,
                        const uint8_t *body, int *fail_status, char *fail_msg,
                        size_t fail_len) {
    Kvs__V1__Response *r = NULL;
    char why[256];
    if (!(h->flags & KVS_FRAME_F_RESPONSE)) {
        *fail_status = KVS_EPROTO;
        snprintf(fail_msg, fail_len, "%s: server sent a non-response frame",
                 n->addr);
        return 1;
    }
    if (kvs_frame_decode_response(body, h->body_len, &r, why, sizeof(why))) {
        *fail_status = KVS_EPROTO;
        snprintf(fail_msg, fail_len, "%s: %.200s", n->addr, why);
        return 1;
    }
    int drop = 0;
    if (h->request_id == n->hello_id && n->hello_id) {
        n->hello_id = 0;
        if (r->status) {
            /* Auth or version refused: every op queued behind it fails
             * with the server's reason. */
            *fail_status = kvs_wire_status_from_pb(r->status);
            snprintf(fail_msg, fail_len, "%s: %s", n->addr,
                     r->message && *r->message ? r->message
                                               : kvs_strerror(r->status));
            drop = 1;
        }
    } else {
        kvs_client_op_t *op = tab_take(n, h->request_id);
        if (op) {
            int st = kvs_wire_status_from_pb(r->status);
            char msg[256] = "";
            if (st)
                snprintf(msg, sizeof(msg), "%s", r->message ? r->message : "");
            else
                fill_result(op, r, &st, msg, sizeof(msg));
            complete(c, op, st, msg);
        }
        /* Unknown ids are answers to ops that timed out: dropped. */
    }
    if (!drop && (h->flags & KVS_FRAME_F_CLOSE)) {
        /* The server is closing (refusal, protocol error): the rest of the
         * ops cannot be answered. */
        *fail_status =
            r->status ? kvs_wire_status_from_pb(r->status) : KVS_ECONN;
        snprintf(fail_msg, fail_len, "%s: server closed the connection: %s",
                 n->addr,
                 r->message && *r->message ? r->message
                                           : kvs_strerror(*fail_status));
        drop = 1;
    }
    kvs__v1__response__free_unpacked(r, NULL);
    return drop;
}

static void node_read(kvs_client_t *c, node_t *n) {
    for (;;) {
        void *p;
        size_t room;
        if (kvs_frame_reader_prepare(&n->rd, 64 << 10, &p, &room)) {
            node_fail(c, n, KVS_ENOMEM, "out of memory reading an answer");
            return;
        }
        ssize_t r = recv(n->fd, p, room, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (r <= 0) {
            char msg[640];
            snprintf(msg, sizeof(msg),
                     "%s: connection lost (%s) with the request in flight; "
                     "it may or may not have been applied",
                     n->addr, r == 0 ? "closed by server" : strerror(errno));
            /* Frames already buffered are still valid answers. */
            kvs_frame_header_t h;
            const uint8_t *body;
            int fs = 0;
            char fm[640];
            while (kvs_frame_reader_next(&n->rd, &h, &body, NULL, 0) == 1) {
                if (handle_frame(c, n, &h, body, &fs, fm, sizeof(fm))) {
                    node_fail(c, n, fs, fm);
                    return;
                }
            }
            node_fail(c, n, KVS_ECONN, msg);
            return;
        }
        kvs_frame_reader_commit(&n->rd, (size_t)r);
        kvs_frame_header_t h;
        const uint8_t *body;
        char why[256];
        int rc;
        while ((rc = kvs_frame_reader_next(&n->rd, &h, &body, why,
                                           sizeof(why))) == 1) {
            int fs = 0;
            char fm[640];
            if (handle_frame(c, n, &h, body, &fs, fm, sizeof(fm))) {
                node_fail(c, n, fs, fm);
                return;
            }
        }
        if (rc < 0) {
            char fm[640];
            snprintf(fm, sizeof(fm), "%s: bad frame from server: %s", n->addr,
                     why);
            node_fail(c, n, KVS_EPROTO, fm);
            return;
        }
        if ((size_t)r < room)
            break; /* drained the socket */
    }
}

static void expire(kvs_client_t *c, uint64_t now) {
    if (!c->request_timeout_ms)
        return;
    for (size_t i = 0; i < c->n_nodes; i++) {
        node_t *n = &c->nodes[i];
        while (n->fifo_head && n->fifo_head->deadline_ms_ <= now) {
            kvs_client_op_t *op = n->fifo_head;
            tab_take(n, op->id_);
            char msg[640];
            snprintf(msg, sizeof(msg),
                     "%s: no answer within %u ms; the request may or may "
                     "not have been applied",
                     n->addr, c->request_timeout_ms);
            complete(c, op, KVS_ETIMEDOUT, msg);
        }
    }
}

/* One round of I/O: wait up to timeout_ms (-1 forever) for any socket,
 * then read, write and expire. */
static void retry_reads(kvs_client_t *c);

static void pump(kvs_client_t *c, int timeout_ms) {
    retry_reads(c);
    if (c->done_head && timeout_ms)
        timeout_ms = 0; /* a retry finished something: do not sleep */
    struct pollfd pfd[MAX_NODES];
    size_t idx[MAX_NODES];
    nfds_t np = 0;
    uint64_t now = now_ms();
    for (size_t i = 0; i < c->n_nodes; i++) {
        node_t *n = &c->nodes[i];
        if (n->fd < 0)
            continue;
        pfd[np].fd = n->fd;
        if (n->woff < n->wlen) { /* batched by submit: send before waiting */
            int e = node_flush(n);
            if (e) {
                char msg[640];
                snprintf(msg, sizeof(msg),
                         "%s: connection lost (%s) with the request in "
                         "flight; it may or may not have been applied",
                         n->addr, strerror(-e));
                node_fail(c, n, KVS_ECONN, msg);
                continue;
            }
        }
        pfd[np].events = POLLIN | (n->woff < n->wlen ? POLLOUT : 0);
        pfd[np].revents = 0;
        idx[np++] = i;
        if (n->fifo_head && c->request_timeout_ms) {
            uint64_t d = n->fifo_head->deadline_ms_;
            int left = d > now ? (int)(d - now) : 0;
            if (timeout_ms < 0 || left < timeout_ms)
                timeout_ms = left;
        }
    }
    if (np == 0) {
        expire(c, now);
        return;
    }
    int r = poll(pfd, np, timeout_ms);
    if (r > 0) {
        for (nfds_t k = 0; k < np; k++) {
            node_t *n = &c->nodes[idx[k]];
            if (n->fd < 0 || !pfd[k].revents)
                continue;
            if (pfd[k].revents & POLLOUT) {
                int e = node_flush(n);
                if (e) {
                    char msg[640];
                    snprintf(msg, sizeof(msg),
                             "%s: connection lost (%s) with the request in "
                             "flight; it may or may not have been applied",
                             n->addr, strerror(-e));
                    node_fail(c, n, KVS_ECONN, msg);
                    continue;
                }
            }
            if (pfd[k].revents & (POLLIN | POLLHUP | POLLERR))
                node_read(c, n);
        }
    }
    expire(c, now_ms());
}

/* ---------------------------------------------------------------- submit */

static int encode_op(kvs_client_t *c, node_t *n, kvs_client_op_t *op) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__PingRequest ping = KVS__V1__PING_REQUEST__INIT;
    Kvs__V1__CreateSequenceRequest cr = KVS__V1__CREATE_SEQUENCE_REQUEST__INIT;
    Kvs__V1__Geometry geo = KVS__V1__GEOMETRY__INIT;
    Kvs__V1__AppendRequest ap = KVS__V1__APPEND_REQUEST__INIT;
    Kvs__V1__SearchRequest se = KVS__V1__SEARCH_REQUEST__INIT;
    Kvs__V1__AttendRequest at = KVS__V1__ATTEND_REQUEST__INIT;
    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    Kvs__V1__ForkRequest fk = KVS__V1__FORK_REQUEST__INIT;
    Kvs__V1__DropRequest dr = KVS__V1__DROP_REQUEST__INIT;
    Kvs__V1__SetTtlRequest tt = KVS__V1__SET_TTL_REQUEST__INIT;
    Kvs__V1__InfoRequest in = KVS__V1__INFO_REQUEST__INIT;
    Kvs__V1__StatsRequest st = KVS__V1__STATS_REQUEST__INIT;
    Kvs__V1__ListSequencesRequest ls = KVS__V1__LIST_SEQUENCES_REQUEST__INIT;
    Kvs__V1__FlushRequest fl = KVS__V1__FLUSH_REQUEST__INIT;
    Kvs__V1__ObserveQueriesRequest ob = KVS__V1__OBSERVE_QUERIES_REQUEST__INIT;
    char why[160];
    if (op->params && kvs_wire_params_to_pb(op->params, &qp, why, sizeof(why)))
        return cfail(c, KVS_EINVAL, "params: %s", why);

    switch (op->type) {
    case KVS_CLIENT_PING:
        ping.payload.data = (uint8_t *)op->payload;
        ping.payload.len = op->payload ? op->payload_len : 0;
        req.op_case = KVS__V1__REQUEST__OP_PING;
        req.ping = &ping;
        break;
    case KVS_CLIENT_CREATE:
        if (kvs_wire_geometry_to_pb(&op->geometry, &geo, why, sizeof(why)))
            return cfail(c, KVS_EINVAL, "create: %s", why);
        cr.seq = op->seq;
        cr.geometry = &geo;
        cr.ttl_seconds = op->ttl_seconds;
        req.op_case = KVS__V1__REQUEST__OP_CREATE;
        req.create = &cr;
        break;
    case KVS_CLIENT_APPEND:
        if (!op->keys || !op->values || !op->n_tokens || !op->kv_bytes)
            return cfail(c, KVS_EINVAL, "append needs tokens, keys, values");
        ap.seq = op->seq;
        ap.layer = op->layer;
        ap.n_tokens = op->n_tokens;
        ap.keys.data = (uint8_t *)op->keys;
        ap.keys.len = op->kv_bytes;
        ap.values.data = (uint8_t *)op->values;
        ap.values.len = op->kv_bytes;
        req.op_case = KVS__V1__REQUEST__OP_APPEND;
        req.append = &ap;
        break;
    case KVS_CLIENT_SEARCH:
        if (!op->queries || !op->n_query_floats || !op->positions ||
            !op->scores)
            return cfail(c, KVS_EINVAL, "search needs queries and outputs");
        se.seq = op->seq;
        se.layer = op->layer;
        se.k = op->k;
        se.queries.data = (uint8_t *)op->queries;
        se.queries.len = op->n_query_floats * sizeof(float);
        se.query_dtype = KVS__V1__DTYPE__DTYPE_F32;
        se.params = op->params ? &qp : NULL;
        req.op_case = KVS__V1__REQUEST__OP_SEARCH;
        req.search = &se;
        break;
    case KVS_CLIENT_ATTEND:
        if (!op->queries || !op->n_query_floats || !op->output)
            return cfail(c, KVS_EINVAL, "attend needs queries and output");
        at.seq = op->seq;
        at.layer = op->layer;
        at.queries.data = (uint8_t *)op->queries;
        at.queries.len = op->n_query_floats * sizeof(float);
        at.query_dtype = KVS__V1__DTYPE__DTYPE_F32;
        at.params = op->params ? &qp : NULL;
        req.op_case = KVS__V1__REQUEST__OP_ATTEND;
        req.attend = &at;
        break;
    case KVS_CLIENT_OBSERVE:
        if (!op->queries || !op->n_query_floats || !op->n_tokens)
            return cfail(c, KVS_EINVAL, "observe needs tokens and queries");
        ob.seq = op->seq;
        ob.layer = op->layer;
        ob.n = op->n_tokens;
        ob.queries.data = (uint8_t *)op->queries;
        ob.queries.len = op->n_query_floats * sizeof(float);
        ob.query_dtype = KVS__V1__DTYPE__DTYPE_F32;
        req.op_case = KVS__V1__REQUEST__OP_OBSERVE;
        req.observe = &ob;
        break;
    case KVS_CLIENT_FORK:
        fk.src = op->seq;
        fk.dst = op->dst;
        fk.whole = op->at_token == KVS_CLIENT_FORK_ALL;
        fk.at_token = fk.whole ? 0 : op->at_token;
        req.op_case = KVS__V1__REQUEST__OP_FORK;
        req.fork = &fk;
        break;
    case KVS_CLIENT_SET_TTL:
        tt.seq = op->seq;
        tt.ttl_seconds = op->ttl_seconds;
        req.op_case = KVS__V1__REQUEST__OP_SET_TTL;
        req.set_ttl = &tt;
        break;
    case KVS_CLIENT_FLUSH:
        fl.seq = op->seq;
        req.op_case = KVS__V1__REQUEST__OP_FLUSH;
        req.flush = &fl;
        break;
    case KVS_CLIENT_DROP:
        dr.seq = op->seq;
        req.op_case = KVS__V1__REQUEST__OP_DROP;
        req.drop = &dr;
        break;
    case KVS_CLIENT_INFO:
        if (!op->info)
            return cfail(c, KVS_EINVAL, "info needs an output");
        in.seq = op->seq;
        req.op_case = KVS__V1__REQUEST__OP_INFO;
        req.info = &in;
        break;
    case KVS_CLIENT_STATS:
        if (!op->stats)
            return cfail(c, KVS_EINVAL, "stats needs an output");
        req.op_case = KVS__V1__REQUEST__OP_STATS;
        req.stats = &st;
        break;
    case KVS_CLIENT_LIST:
        if (op->ids_cap && !op->ids)
            return cfail(c, KVS_EINVAL, "list needs an ids array");
        ls.limit =
            op->ids_cap > UINT32_MAX ? UINT32_MAX : (uint32_t)op->ids_cap;
        if (ls.limit == 0)
            ls.limit = 1; /* 0 would mean the server's maximum */
        req.op_case = KVS__V1__REQUEST__OP_LIST;
        req.list = &ls;
        break;
    default:
        return cfail(c, KVS_EINVAL, "unknown op type %d", (int)op->type);
    }
    return queue_msg(c, n, op->id_, &req.base);
}

static bool op_is_seq(kvs_client_op_type_t t) {
    return t != KVS_CLIENT_PING && t != KVS_CLIENT_STATS &&
           t != KVS_CLIENT_LIST;
}

/* Writes go to every replica; the rest to one. */
static bool op_is_write(kvs_client_op_type_t t) {
    return t == KVS_CLIENT_CREATE || t == KVS_CLIENT_APPEND ||
           t == KVS_CLIENT_FORK || t == KVS_CLIENT_DROP ||
           t == KVS_CLIENT_SET_TTL || t == KVS_CLIENT_FLUSH;
}

/* Submit op to `at` (a node index), or, at SIZE_MAX, to the node its
 * sequence hashes to (or op->node for store-wide ops). */
static int submit_at(kvs_client_t *c, kvs_client_op_t *op, size_t at) {
    c->errmsg[0] = 0;
    op->status = 0;
    op->message[0] = 0;
    op->done_ = false;
    op->prev_ = op->next_ = NULL;
    size_t node;
    if (at != SIZE_MAX) {
        node = at;
    } else if (op_is_seq(op->type)) {
        node = kvs_client_node_for(c, op->seq);
        if (node == SIZE_MAX)
            return cfail(c, KVS_ECONN, "no live node%s",
                         c->etcd ? " registered in etcd" : "");
        if (op->type == KVS_CLIENT_FORK &&
            kvs_client_node_for(c, op->dst) != node)
            return cfail(c, KVS_EINVAL,
                         "fork: sequences %llu and %llu live on different "
                         "nodes",
                         (unsigned long long)op->seq,
                         (unsigned long long)op->dst);
    } else {
        if (op->node >= c->n_nodes)
            return cfail(c, KVS_EINVAL, "node %u out of range (%zu nodes)",
                         op->node, c->n_nodes);
        node = op->node;
    }
    node_t *n = &c->nodes[node];
    if (n->fd >= 0 && !n->fifo_head) {
        /* An idle connection may have been closed by the server (idle
         * timeout, restart): notice it now and reconnect, rather than lose
         * this request on a dead socket. */
        struct pollfd p = {.fd = n->fd, .events = POLLIN};
        if (poll(&p, 1, 0) > 0)
            node_read(c, n);
    }
    op->node_ = node;
    op->id_ = c->next_id++;
    int rc = node_connect(c, n);
    if (rc) {
        /* It may have left the cluster: look again on the next submit. */
        c->next_refresh = 0;
        return rc;
    }
    size_t mark = n->wlen;
    if ((rc = encode_op(c, n, op)))
        return rc;
    if ((rc = tab_put(n, op))) {
        n->wlen = mark; /* unqueue the frame */
        return cfail(c, rc, "out of memory");
    }
    bool was_idle = n->fifo_head == NULL;
    op->deadline_ms_ =
        c->request_timeout_ms ? now_ms() + c->request_timeout_ms : UINT64_MAX;
    op->prev_ = n->fifo_tail;
    if (n->fifo_tail)
        n->fifo_tail->next_ = op;
    else
        n->fifo_head = op;
    n->fifo_tail = op;
    c->pending++;
    /* An op alone on its connection goes out now (latency). Behind others,
     * it waits for kvs_client_poll() or for enough bytes to batch, so that a
     * pipeline costs one send() per batch rather than one per op. */
    if (!was_idle && n->wlen - n->woff < (256u << 10))
        return 0;
    int e = node_flush(n);
    if (e) {
        char msg[640];
        snprintf(msg, sizeof(msg),
                 "%s: connection lost (%s) with the request in flight; it "
                 "may or may not have been applied",
                 n->addr, strerror(-e));
        node_fail(c, n, KVS_ECONN, msg);
    }
    return 0;
}

static int write_targets(kvs_client_t *c, const kvs_client_op_t *op,
                         size_t *cand, size_t *nc);
static int submit_walk(kvs_client_t *c, kvs_client_op_t *op);
static int submit_fan(kvs_client_t *c, kvs_client_op_t *op, const size_t *cand,
                      size_t nc);

int kvs_client_submit(kvs_client_t *c, kvs_client_op_t *op) {
    members_maybe_refresh(c);
    op->fan_ = NULL;
    op->try_ = 0;
    op->moved_ = false;
    op->pinned_ = false;
    if (!op_is_seq(op->type))
        return submit_at(c, op, SIZE_MAX);
    if (c->replicas > 1 && op_is_write(op->type)) {
        size_t cand[MAX_PROBE], nc;
        int rc = write_targets(c, op, cand, &nc);
        return rc ? rc : submit_fan(c, op, cand, nc);
    }
    if (op->type == KVS_CLIENT_CREATE)
        return submit_at(c, op, SIZE_MAX);
    return submit_walk(c, op);
}

int kvs_client_poll(kvs_client_t *c, kvs_client_op_t **done, size_t cap,
                    size_t *n_done, int timeout_ms) {
    *n_done = 0;
    if (!c->done_head && c->pending == 0)
        return KVS_EINVAL;
    if (!c->done_head) {
        uint64_t start = now_ms();
        for (;;) {
            int left = timeout_ms;
            if (timeout_ms > 0) {
                uint64_t el = now_ms() - start;
                left = el >= (uint64_t)timeout_ms ? 0 : timeout_ms - (int)el;
            }
            pump(c, left);
            if (c->done_head || left == 0)
                break;
        }
    } else {
        pump(c, 0); /* pick up whatever else is ready, without waiting */
    }
    while (c->done_head && *n_done < cap) {
        kvs_client_op_t *op = c->done_head;
        done_remove(c, op);
        done[(*n_done)++] = op;
    }
    return 0;
}

/* ----------------------------------------------------------------- sync */

static int run_one(kvs_client_t *c, kvs_client_op_t *op, size_t at) {
    op->fan_ = NULL;
    op->pinned_ = at != SIZE_MAX;
    int rc = submit_at(c, op, at);
    if (rc)
        return op->status = rc;
    while (!op->done_)
        pump(c, -1);
    done_remove(c, op);
    if (op->status)
        snprintf(c->errmsg, sizeof(c->errmsg), "%s", op->message);
    return op->status;
}

/* The node did not answer (down, or gone since the list was read). */
static bool unreachable(int status) {
    return status == KVS_ECONN || status == KVS_ETIMEDOUT;
}

/* ------------------------------------------------------------- replicas
 *
 * A write with R > 1 becomes R copies ("subs"), one per replica, each an
 * ordinary op in its node's table and deadline list; the caller's op is in
 * no node's list and completes (onto the done list, counted once in
 * c->pending) when the last sub does. Acknowledged when every replica that
 * answered applied it; unreachable ones are left out and reported (the
 * op's message, kvs_client_last_write_acks, degraded_writes); an error
 * answer from any replica is the write's error.
 */
typedef struct fan_s {
    kvs_client_op_t *parent;
    size_t n;
    size_t left; /* subs not finished, + 1 while the submit loop runs */
    size_t node[MAX_REPLICAS];
    kvs_client_op_t sub[MAX_REPLICAS];
    /* Where subs answered KVS_ENOSEQ move on to: cand[next..n_cand). */
    size_t cand[MAX_PROBE];
    size_t n_cand, next;
    bool moved; /* some replica did not have the sequence */
} fan_t;

static void fan_finish(kvs_client_t *c, fan_t *f) {
    kvs_client_op_t *op = f->parent;
    size_t acked = 0, ok = SIZE_MAX, err = SIZE_MAX, down = SIZE_MAX;
    size_t noseq = SIZE_MAX, hold[MAX_REPLICAS];
    for (size_t i = 0; i < f->n; i++) {
        int st = f->sub[i].status;
        if (!st) {
            ok = ok == SIZE_MAX ? i : ok;
            hold[acked++] = f->node[i];
        } else if (unreachable(st)) {
            down = down == SIZE_MAX ? i : down;
        } else if (st == KVS_ENOSEQ) {
            /* Not a holder (it joined after the sequence was created) and
             * no further node had it: not the write's error while another
             * replica applied it. */
            noseq = noseq == SIZE_MAX ? i : noseq;
        } else if (err == SIZE_MAX) {
            err = i;
        }
    }
    size_t pick = err != SIZE_MAX    ? err
                  : ok != SIZE_MAX   ? ok
                  : down != SIZE_MAX ? down
                                     : noseq;
    op->status = f->sub[pick].status;
    memcpy(op->message, f->sub[pick].message, sizeof(op->message));
    op->persisted_seqno = f->sub[pick].persisted_seqno;
    c->counters.replicated_writes++;
    c->last_acked = (uint32_t)acked;
    /* Counted against R, not the nodes there were: with fewer live nodes
     * than R the data has fewer copies than asked for, which is news. */
    c->last_wanted = c->replicas;
    if (op->type == KVS_CLIENT_DROP && acked)
        loc_del(c, op->seq);
    else if (acked && f->moved)
        note_holders(c, op->seq, hold, acked);
    else if (op->status == KVS_ENOSEQ)
        loc_del(c, op->seq);
    if (op->type == KVS_CLIENT_FORK && !op->status && f->moved)
        note_holders(c, op->dst, hold, acked);
    if (!op->status && acked < c->replicas) {
        c->counters.degraded_writes++;
        if (down != SIZE_MAX)
            snprintf(op->message, sizeof(op->message),
                     "acknowledged by %zu of %u replicas (%.80s: %.100s)",
                     acked, c->replicas, c->nodes[f->node[down]].addr,
                     f->sub[down].message);
        else if (noseq != SIZE_MAX)
            snprintf(op->message, sizeof(op->message),
                     "acknowledged by %zu of %u replicas (no other of the "
                     "%zu nodes asked has the sequence)",
                     acked, c->replicas, f->n_cand);
        else
            snprintf(op->message, sizeof(op->message),
                     "acknowledged by %zu of %u replicas (only %zu live "
                     "nodes)",
                     acked, c->replicas, f->n);
    }
    free(f);
    done_push(c, op);
}

static void fan_sub_done(kvs_client_t *c, kvs_client_op_t *sub) {
    fan_t *f = sub->fan_;
    if (--f->left == 0)
        fan_finish(c, f);
}

/* A replica's copy answered KVS_ENOSEQ: that node joined after the
 * sequence was created. Send the copy on to the next node in rendezvous
 * order the write has not tried (by retry_ops(), not from inside
 * complete()). False when there is none left. */
static bool fan_moves_on(kvs_client_t *c, kvs_client_op_t *sub) {
    fan_t *f = sub->fan_;
    if (sub->status != KVS_ENOSEQ || sub->type == KVS_CLIENT_CREATE ||
        f->next >= f->n_cand)
        return false;
    f->node[sub - f->sub] = f->cand[f->next++];
    f->moved = true;
    c->counters.relocated++;
    retry_push(c, sub);
    return true;
}

/* Submit a write to the nodes cand[0..min(R, nc)), the rest of cand being
 * where copies that find no sequence move on to. Errors (nothing in
 * flight): the first replica's, when none of them could be sent to. */
static int submit_fan(kvs_client_t *c, kvs_client_op_t *op, const size_t *cand,
                      size_t nc) {
    fan_t *f = calloc(1, sizeof(*f));
    if (!f)
        return cfail(c, KVS_ENOMEM, "out of memory");
    size_t nr = nc < c->replicas ? nc : c->replicas;
    op->status = 0;
    op->message[0] = 0;
    op->done_ = false;
    op->prev_ = op->next_ = NULL;
    f->parent = op;
    f->n = nr;
    f->left = nr + 1;
    memcpy(f->cand, cand, nc * sizeof(*cand));
    f->n_cand = nc;
    f->next = nr;
    size_t sent = 0;
    for (size_t i = 0; i < nr; i++) {
        kvs_client_op_t *sub = &f->sub[i];
        *sub = *op;
        sub->fan_ = f;
        sub->data = NULL;
        f->node[i] = cand[i];
        int rc = submit_at(c, sub, cand[i]);
        if (rc) {
            sub->status = rc;
            snprintf(sub->message, sizeof(sub->message), "%.255s", c->errmsg);
            f->left--;
        } else {
            sent++;
        }
    }
    /* Subs are not counted as pending: their write is, once. */
    c->pending -= sent;
    if (!sent) {
        int rc = f->sub[0].status;
        cfail(c, rc, "%s", f->sub[0].message);
        free(f);
        return rc;
    }
    c->pending++;
    if (--f->left == 0) /* every sub already answered (or failed) */
        fan_finish(c, f);
    return 0;
}

static int run_write(kvs_client_t *c, kvs_client_op_t *op, const size_t *cand,
                     size_t nc) {
    int rc = submit_fan(c, op, cand, nc);
    if (rc)
        return rc;
    while (!op->done_)
        pump(c, -1);
    done_remove(c, op);
    /* Also on success: "acknowledged by 1 of 2 replicas (...)". */
    snprintf(c->errmsg, sizeof(c->errmsg), "%s", op->message);
    return op->status;
}

/* Ops sent to one node (every op on an existing sequence with R = 1, reads
 * with R > 1) walk its candidates(): a node that does not have the
 * sequence passes the op to the next (at most MAX_PROBE nodes); with
 * R > 1 one that cannot be reached passes it on within the R replicas. */
static bool walks_on(const kvs_client_t *c, const kvs_client_op_t *op) {
    if (op->fan_ || op->pinned_ || !op_is_seq(op->type) ||
        op->type == KVS_CLIENT_CREATE)
        return false;
    return op->status == KVS_ENOSEQ ||
           (c->replicas > 1 && unreachable(op->status) &&
            op->try_ + 1u < c->replicas);
}

/* A walked op is finished: remember where its sequence was found. */
static void walk_done(kvs_client_t *c, kvs_client_op_t *op) {
    if (op->fan_ || op->pinned_ || !op_is_seq(op->type) ||
        op->type == KVS_CLIENT_CREATE)
        return;
    if (op->status == KVS_ENOSEQ ||
        (!op->status && op->type == KVS_CLIENT_DROP)) {
        loc_del(c, op->seq);
        return;
    }
    if (op->status || !op->moved_)
        return;
    size_t hold = op->node_;
    note_holders(c, op->seq, &hold, 1);
    if (op->type == KVS_CLIENT_FORK)
        note_holders(c, op->dst, &hold, 1);
}

/* Submit a walked op to its candidates from op->try_ on, passing over
 * those that cannot be reached at once (R > 1). */
static int submit_walk(kvs_client_t *c, kvs_client_op_t *op) {
    size_t cand[MAX_PROBE], nc = read_candidates(c, op->seq, cand);
    if (!nc)
        return cfail(c, KVS_ECONN, "no live node%s",
                     c->etcd ? " registered in etcd" : "");
    if (op->try_ == 0 && op->type == KVS_CLIENT_FORK &&
        kvs_client_node_for(c, op->dst) != kvs_client_node_for(c, op->seq))
        return cfail(c, KVS_EINVAL,
                     "fork: sequences %llu and %llu live on different "
                     "nodes",
                     (unsigned long long)op->seq, (unsigned long long)op->dst);
    int rc = KVS_ECONN;
    for (; op->try_ < nc; op->try_++) {
        rc = submit_at(c, op, cand[op->try_]);
        if (!rc || !unreachable(rc) || op->try_ + 1u >= c->replicas ||
            op->try_ + 1u >= nc)
            return rc;
        c->counters.read_failovers++;
    }
    return rc;
}

/* Ops that complete() passed on (walked ops and replica copies), sent to
 * their next node. */
static void retry_reads(kvs_client_t *c) {
    while (c->retry_head) {
        kvs_client_op_t *op = c->retry_head;
        c->retry_head = op->next_;
        if (!c->retry_head)
            c->retry_tail = NULL;
        op->next_ = NULL;
        if (op->fan_) {
            fan_t *f = op->fan_;
            int rc = submit_at(c, op, f->node[op - f->sub]);
            if (!rc) {
                c->pending--; /* counted once, as its write */
                continue;
            }
            op->status = rc;
            snprintf(op->message, sizeof(op->message), "%.255s", c->errmsg);
            op->done_ = true;
            fan_sub_done(c, op);
            continue;
        }
        size_t cand[MAX_PROBE];
        if (op->try_ >= read_candidates(c, op->seq, cand)) {
            /* No node left to ask: the last answer stands. */
            walk_done(c, op);
            done_push(c, op);
            continue;
        }
        if (op->moved_ && op->status == KVS_ENOSEQ)
            c->counters.relocated++;
        c->counters.read_failovers += c->replicas > 1;
        c->pending--; /* submit counts it again */
        int rc = submit_walk(c, op);
        if (!rc)
            continue;
        c->pending++;
        op->status = rc;
        snprintf(op->message, sizeof(op->message), "%.255s", c->errmsg);
        done_push(c, op);
    }
}

/* The nodes a write to op->seq goes to (the first R) and moves on to: a
 * create's are the top R; an existing sequence's are its candidates().
 * A fork's child must hash to the same R nodes as its parent. */
static int write_targets(kvs_client_t *c, const kvs_client_op_t *op,
                         size_t *cand, size_t *nc_out) {
    size_t nc = op->type == KVS_CLIENT_CREATE ? replicas_of(c, op->seq, cand)
                                              : candidates(c, op->seq, cand);
    *nc_out = nc;
    if (!nc)
        return cfail(c, KVS_ECONN, "no live node%s",
                     c->etcd ? " registered in etcd" : "");
    if (op->type == KVS_CLIENT_FORK) {
        size_t src[MAX_REPLICAS], dst[MAX_REPLICAS];
        size_t nr = replicas_of(c, op->seq, src);
        bool same = replicas_of(c, op->dst, dst) == nr;
        for (size_t i = 0; same && i < nr; i++)
            same = dst[i] == src[i];
        if (!same)
            return cfail(c, KVS_EINVAL,
                         "fork: sequences %llu and %llu live on different "
                         "nodes",
                         (unsigned long long)op->seq,
                         (unsigned long long)op->dst);
    }
    return 0;
}

static int run_sync(kvs_client_t *c, kvs_client_op_t *op) {
    members_maybe_refresh(c);
    op->fan_ = NULL;
    op->try_ = 0;
    op->moved_ = false;
    op->pinned_ = false;
    if (!op_is_seq(op->type) ||
        (c->replicas <= 1 && op->type == KVS_CLIENT_CREATE))
        return run_one(c, op, SIZE_MAX);
    int rc;
    if (c->replicas > 1 && op_is_write(op->type)) {
        size_t cand[MAX_PROBE], nc;
        if ((rc = write_targets(c, op, cand, &nc)))
            return rc;
        return run_write(c, op, cand, nc);
    }
    if ((rc = submit_walk(c, op)))
        return rc;
    while (!op->done_)
        pump(c, -1);
    done_remove(c, op);
    if (op->status)
        snprintf(c->errmsg, sizeof(c->errmsg), "%s", op->message);
    return op->status;
}

void kvs_client_counters(const kvs_client_t *c, kvs_client_counters_t *out) {
    *out = c->counters;
}

void kvs_client_last_write_acks(const kvs_client_t *c, uint32_t *acked,
                                uint32_t *replicas) {
    *acked = c->last_acked;
    *replicas = c->last_wanted;
}

int kvs_client_ping(kvs_client_t *c, size_t node) {
    kvs_client_op_t op = {.type = KVS_CLIENT_PING, .node = (uint32_t)node};
    if (node >= c->n_nodes)
        return cfail(c, KVS_EINVAL, "node %zu out of range", node);
    return run_sync(c, &op);
}

int kvs_client_seq_create(kvs_client_t *c, uint64_t seq,
                          const kvs_geometry_t *geo) {
    if (!geo)
        return cfail(c, KVS_EINVAL, "create needs a geometry");
    kvs_client_op_t op = {
        .type = KVS_CLIENT_CREATE, .seq = seq, .geometry = *geo};
    return run_sync(c, &op);
}

int kvs_client_seq_append(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          uint32_t n_tokens, const void *keys,
                          const void *values, size_t kv_bytes) {
    kvs_client_op_t op = {.type = KVS_CLIENT_APPEND,
                          .seq = seq,
                          .layer = layer,
                          .n_tokens = n_tokens,
                          .keys = keys,
                          .values = values,
                          .kv_bytes = kv_bytes};
    return run_sync(c, &op);
}

int kvs_client_seq_search(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          const float *queries, size_t n_query_floats,
                          uint32_t k, const kvs_query_params_t *params,
                          int64_t *positions, float *scores,
                          size_t result_cap) {
    kvs_client_op_t op = {.type = KVS_CLIENT_SEARCH,
                          .seq = seq,
                          .layer = layer,
                          .queries = queries,
                          .n_query_floats = n_query_floats,
                          .k = k,
                          .params = params,
                          .positions = positions,
                          .scores = scores,
                          .result_cap = result_cap};
    return run_sync(c, &op);
}

int kvs_client_seq_attend(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          const float *queries, size_t n_query_floats,
                          const kvs_query_params_t *params, float *out,
                          kvs_attend_stats_t *stats) {
    kvs_client_op_t op = {.type = KVS_CLIENT_ATTEND,
                          .seq = seq,
                          .layer = layer,
                          .queries = queries,
                          .n_query_floats = n_query_floats,
                          .params = params,
                          .output = out,
                          .attend_stats = stats};
    return run_sync(c, &op);
}

int kvs_client_seq_observe_queries(kvs_client_t *c, uint64_t seq,
                                   uint32_t layer, uint32_t n_tokens,
                                   const float *queries,
                                   size_t n_query_floats) {
    kvs_client_op_t op = {.type = KVS_CLIENT_OBSERVE,
                          .seq = seq,
                          .layer = layer,
                          .n_tokens = n_tokens,
                          .queries = queries,
                          .n_query_floats = n_query_floats};
    return run_sync(c, &op);
}

int kvs_client_seq_fork(kvs_client_t *c, uint64_t parent, uint64_t at_token,
                        uint64_t child) {
    kvs_client_op_t op = {.type = KVS_CLIENT_FORK,
                          .seq = parent,
                          .dst = child,
                          .at_token = at_token};
    return run_sync(c, &op);
}

int kvs_client_seq_drop(kvs_client_t *c, uint64_t seq) {
    kvs_client_op_t op = {.type = KVS_CLIENT_DROP, .seq = seq};
    return run_sync(c, &op);
}

int kvs_client_seq_set_ttl(kvs_client_t *c, uint64_t seq,
                           uint32_t ttl_seconds) {
    kvs_client_op_t op = {
        .type = KVS_CLIENT_SET_TTL, .seq = seq, .ttl_seconds = ttl_seconds};
    return run_sync(c, &op);
}

int kvs_client_seq_flush(kvs_client_t *c, uint64_t seq,
                         uint64_t *persisted_seqno) {
    kvs_client_op_t op = {.type = KVS_CLIENT_FLUSH, .seq = seq};
    int rc = run_sync(c, &op);
    if (!rc && persisted_seqno)
        *persisted_seqno = op.persisted_seqno;
    return rc;
}

int kvs_client_seq_info(kvs_client_t *c, uint64_t seq, kvs_seq_info_t *info) {
    kvs_client_op_t op = {.type = KVS_CLIENT_INFO, .seq = seq, .info = info};
    return run_sync(c, &op);
}

int kvs_client_seq_locate(kvs_client_t *c, uint64_t seq, size_t *nodes,
                          size_t cap, size_t *n_out, size_t *n_asked) {
    *n_out = 0;
    if (n_asked)
        *n_asked = 0;
    members_maybe_refresh(c);
    size_t cand[MAX_PROBE], nc = candidates(c, seq, cand);
    if (!nc)
        return cfail(c, KVS_ECONN, "no live node%s",
                     c->etcd ? " registered in etcd" : "");
    /* Every candidate, not just until R are found: this is for looking,
     * and extra copies (or a missing one) are what one looks for. */
    size_t hold[MAX_PROBE], nh = 0;
    for (size_t i = 0; i < nc; i++) {
        kvs_seq_info_t info;
        kvs_client_op_t op = {
            .type = KVS_CLIENT_INFO, .seq = seq, .info = &info};
        int rc = run_one(c, &op, cand[i]);
        if (!unreachable(rc) && n_asked)
            (*n_asked)++;
        if (rc)
            continue;
        hold[nh++] = cand[i];
        if (*n_out < cap)
            nodes[(*n_out)++] = cand[i];
    }
    c->errmsg[0] = 0;
    if (!nh) {
        loc_del(c, seq);
        return cfail(c, KVS_ENOSEQ,
                     "sequence %llu: on none of the %zu nodes "
                     "asked",
                     (unsigned long long)seq, nc);
    }
    note_holders(c, seq, hold, nh > c->replicas ? c->replicas : nh);
    return 0;
}

int kvs_client_store_stats(kvs_client_t *c, size_t node,
                           kvs_client_stats_t *stats) {
    if (node >= c->n_nodes)
        return cfail(c, KVS_EINVAL, "node %zu out of range", node);
    kvs_client_op_t op = {
        .type = KVS_CLIENT_STATS, .node = (uint32_t)node, .stats = stats};
    return run_sync(c, &op);
}

int kvs_client_store_list(kvs_client_t *c, size_t node, uint64_t *ids,
                          size_t cap, size_t *n_out, uint64_t *total) {
    if (node >= c->n_nodes)
        return cfail(c, KVS_EINVAL, "node %zu out of range", node);
    kvs_client_op_t op = {.type = KVS_CLIENT_LIST,
                          .node = (uint32_t)node,
                          .ids = ids,
                          .ids_cap = cap};
    int rc = run_sync(c, &op);
    if (!rc) {
        *n_out = op.n_ids;
        if (total)
            *total = op.ids_total;
    }
    return rc;
}
