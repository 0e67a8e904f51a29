/*
 * kvs_client.h: libkvsclient, a client for one or many kvstored daemons.
 *
 * The operations mirror the engine API (include/kvstore.h) over the wire
 * protocol (docs/protocol.md): create, append, search, attend, fork, drop,
 * info, stats, list, ping. Each exists as
 *   - a synchronous call (kvs_client_seq_append(), ...), and
 *   - an asynchronous, pipelined form: fill a caller-owned kvs_client_op_t,
 *     kvs_client_submit() it, and collect it from kvs_client_poll(). Many
 *     ops may be in flight per daemon; answers arrive in completion order.
 *
 * Many daemons: `addrs` lists them; a sequence is created on the daemon
 * chosen by rendezvous (highest-random-weight) hashing of its id over the
 * address strings, so every client with the same list agrees. It stays
 * there: an op on an existing sequence that its node answers KVS_ENOSEQ
 * passes on to the next node in rendezvous order (at most 8), and where it
 * was found off its hashed place is remembered (an LRU of 4096 sequences),
 * so a list that changed costs one extra round trip per such sequence on
 * its first use. Store-wide ops (ping, stats, list) name a node index.
 *
 * Or one address "etcd://host:port[,host:port]/prefix": the daemons
 * registered in etcd under that prefix (kvstored --etcd-endpoints,
 * docs/cluster.md) are the list, re-read every membership_refresh_ms (and
 * after a failed connect) inside kvs_client_submit(). Hashing is over the
 * live nodes only: a node that joins takes new sequences that hash to it;
 * existing ones stay where they are and are found as above (no repair
 * moves data yet; a node that leaves takes its sequences with it).
 * Node indexes stay valid for the client's life; a node that left is no
 * longer live (kvs_client_node_live) and its index may be reused by a node
 * that joins later.
 *
 * Replicas (options.replicas = R > 1): writes (create, append, fork, drop,
 * set_ttl, flush; synchronous or submitted) go to all R nodes of a sequence
 * and complete once each reachable one answered: success when every
 * replica that answered applied it, even if others could not be reached
 * (then op->message, or kvs_client_errmsg() after a synchronous call, says
 * "acknowledged by 1 of 2 replicas (...)", kvs_client_last_write_acks()
 * gives the counts of the last write to complete, and kvs_client_counters()
 * counts it); an error answer from any replica is the write's error,
 * except KVS_ENOSEQ: that copy moves on to the next node in rendezvous
 * order, so a write lands on the R nodes that hold the sequence.
 * Reads (search, attend, info; synchronous or submitted) go to the first
 * replica and, as part of the same op, to the next when it cannot be
 * reached or does not have the sequence.
 * Replicas are not repaired: a replica that was down misses the writes
 * made meanwhile.
 *
 * Connections are opened on first use (Hello with the auth token goes first)
 * and re-opened on the next submit after a drop. Ops in flight on a dropped
 * connection complete with KVS_ECONN: the server may or may not have applied
 * them. Ops still unanswered after request_timeout_ms complete with
 * KVS_ETIMEDOUT (a late answer is discarded).
 *
 * Conventions as in kvstore.h: int returns, 0 or a KVS_E* code (-errno never
 * escapes: socket errors become KVS_ECONN with the errno in the message);
 * kvs_client_errmsg() holds the detail of the last failed call. Memory
 * passed in ops is borrowed until the op completes.
 *
 * Thread-safety: a kvs_client_t is not thread-safe; use one per thread (or
 * lock around it). Different clients share nothing.
 */
#ifndef KVS_CLIENT_H
#define KVS_CLIENT_H

#include "kvs_common.h"
#include "kvstore.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_client_s kvs_client_t;

/* at_token of a fork that shares every token of the parent. */
#define KVS_CLIENT_FORK_ALL UINT64_MAX
/* A timeout of kvs_client_options_t that never expires (0 is the default,
 * as for every field there). */
#define KVS_CLIENT_TIMEOUT_NONE UINT32_MAX

/* Zero-filled fields take the defaults below (kvs_client_options_default
 * fills them in explicitly). */
typedef struct kvs_client_options_s {
    /* Daemon addresses: "host:port", "[v6addr]:port", "tcp://host:port",
     * "unix:/path" or "unix:///path". At least one; at most 256. */
    const char *const *addrs;
    size_t n_addrs;
    const char *auth_token;         /* NULL or "": send no token */
    const char *client_name;        /* logged by the server; NULL ok */
    uint32_t connect_timeout_ms;    /* 0: 2000; KVS_CLIENT_TIMEOUT_NONE: wait
                                       for the kernel's own timeout */
    uint32_t request_timeout_ms;    /* 0: 30000; KVS_CLIENT_TIMEOUT_NONE: wait
                                       forever */
    uint32_t max_frame_bytes;       /* largest answer accepted; 0: 64 MiB */
    uint32_t membership_refresh_ms; /* etcd:// only: how often the node
                                       list is re-read; 0: 1000 */
    uint32_t replicas;       /* R, nodes that hold each sequence (the top R of
                                the rendezvous order); 0: 1; at most 8. See
                                "Replicas" below */
    uint32_t location_cache; /* sequences whose holders (off their
                                rendezvous place) are remembered, LRU;
                                0: 4096 (~180 KiB); at most 2^24 */
} kvs_client_options_t;

/* Fill opts with the defaults above (no addresses). */
void kvs_client_options_default(kvs_client_options_t *opts);

/* Validate the options and copy them. Does not connect to a daemon; with
 * an etcd:// address, reads the node list once (an empty list is fine).
 * Errors: KVS_EINVAL (no address, an unparsable one, an etcd:// address
 * with others, max_frame_bytes above 1 GiB, replicas above 8,
 * location_cache above 2^24), KVS_ENOMEM; etcd://: KVS_ECONN
 * / KVS_ETIMEDOUT (etcd unreachable), KVS_EIO / KVS_EPROTO (etcd's answer). */
int kvs_client_open(const kvs_client_options_t *opts, kvs_client_t **out);
/* Close every connection; ops still pending are abandoned (never returned).
 * NULL is a no-op. */
void kvs_client_close(kvs_client_t *c);
/* Detail of the last failed call ("" if none); valid until the next call. */
const char *kvs_client_errmsg(const kvs_client_t *c);

/* Node slots (live or not: see above); their addresses ("" for a slot
 * never used); whether a slot is a live node (always, for a static list). */
size_t kvs_client_n_nodes(const kvs_client_t *c);
const char *kvs_client_node_addr(const kvs_client_t *c, size_t node);
bool kvs_client_node_live(const kvs_client_t *c, size_t node);
/* The node index that owns `seq` (rendezvous hashing over live nodes);
 * SIZE_MAX when no node is live. */
size_t kvs_client_node_for(const kvs_client_t *c, uint64_t seq);

/* A live node as etcd lists it (load figures as of its last record
 * update, every third of its lease TTL at most; 0 for a static list). */
typedef struct kvs_client_member_s {
    size_t node; /* index for kvs_client_ping/store_stats/store_list */
    char node_id[128];
    char addr[256];
    char version[32];
    uint32_t protocol;
    uint32_t http_port;    /* 0: none */
    uint64_t memory_limit; /* 0: unlimited */
    uint64_t memory_used;  /* K/V + index bytes resident */
    uint64_t sequences;
    int64_t start_time; /* Unix seconds */
} kvs_client_member_t;

/* The live nodes, re-reading etcd first (etcd://). Up to cap go to out,
 * their count to *n_out. Errors (etcd://): those of kvs_client_open's
 * etcd read; the previous list stays in use. */
int kvs_client_members(kvs_client_t *c, kvs_client_member_t *out, size_t cap,
                       size_t *n_out);

/* Store stats plus the answering daemon's own counters. */
typedef struct kvs_client_stats_s {
    kvs_store_stats_t store; /* gpu_device -1: no GPU (or an older daemon
                                that does not send it) */
    char attend_path[192];   /* "CUDA device N: name" or "CPU (why)" */
    char server_version[32];
    char node_id[128];
    double uptime_seconds;
    uint64_t connections;
    uint64_t requests_total;
    uint64_t inflight;
    uint64_t bytes_in;
    uint64_t bytes_out;
} kvs_client_stats_t;

typedef enum kvs_client_op_type_e {
    KVS_CLIENT_PING = 0,
    KVS_CLIENT_CREATE,
    KVS_CLIENT_APPEND,
    KVS_CLIENT_SEARCH,
    KVS_CLIENT_ATTEND,
    KVS_CLIENT_FORK,
    KVS_CLIENT_DROP,
    KVS_CLIENT_INFO,
    KVS_CLIENT_STATS,
    KVS_CLIENT_LIST,
    KVS_CLIENT_SET_TTL,
    KVS_CLIENT_FLUSH,
    KVS_CLIENT_OBSERVE,
} kvs_client_op_type_t;

/*
 * One asynchronous operation. Zero it, set `type` and the inputs of that
 * type, submit. Every pointer is borrowed until the op comes back from
 * kvs_client_poll(); the op itself must stay valid (and unmoved) as well.
 */
typedef struct kvs_client_op_s {
    kvs_client_op_type_t type;
    void *data; /* for the caller */
    /* Inputs. */
    uint64_t seq;      /* create/append/search/attend/drop/info; fork: src */
    uint64_t dst;      /* fork: the child */
    uint64_t at_token; /* fork: tokens shared; KVS_CLIENT_FORK_ALL = all */
    uint32_t layer;    /* append/search/attend */
    uint32_t node;     /* ping/stats/list: node index */
    kvs_geometry_t geometry; /* create */
    uint32_t ttl_seconds;    /* create (0 = never) and set_ttl */
    uint32_t n_tokens;       /* append, observe */
    const void *keys;        /* append: kv_bytes each, sequence dtype */
    const void *values;
    size_t kv_bytes;
    const float *queries;             /* search/attend: [n_q_heads][head_dim];
                                         observe: [n_tokens][n_q_heads][head_dim] */
    size_t n_query_floats;            /* observe: all n_tokens' */
    uint32_t k;                       /* search */
    const kvs_query_params_t *params; /* NULL: server defaults */
    const void *payload;              /* ping: echoed back; may be NULL */
    size_t payload_len;
    /* Outputs, caller-allocated. */
    int64_t *positions; /* search: result_cap entries */
    float *scores;      /* search: result_cap entries */
    size_t result_cap;
    float *output;                    /* attend: n_query_floats floats */
    kvs_attend_stats_t *attend_stats; /* attend; may be NULL */
    kvs_seq_info_t *info;             /* info */
    kvs_client_stats_t *stats;        /* stats */
    uint64_t *ids;                    /* list: up to ids_cap */
    size_t ids_cap;
    /* Results. */
    int status;               /* 0 or a KVS_E* code */
    char message[256];        /* detail when status != 0 */
    uint32_t result_heads;    /* search: rows filled (n_q_heads) */
    uint32_t result_k;        /* search: columns per row */
    size_t n_ids;             /* list: ids filled */
    uint64_t ids_total;       /* list: sequences on the node */
    uint64_t persisted_seqno; /* flush: the node's, when it answered */
    /* Private to the library. */
    uint64_t id_;
    uint64_t deadline_ms_;
    size_t node_;
    bool done_;
    void *fan_;    /* a replica's copy of a write: the write it belongs to */
    uint32_t try_; /* the candidate node it is at (see candidates()) */
    bool moved_;   /* a node it asked did not have the sequence */
    bool pinned_;  /* sent to one given node, never passed on */
    struct kvs_client_op_s *prev_, *next_;
} kvs_client_op_t;

/*
 * Send `op` (connecting first if needed). On success the op is in flight and
 * will come back from kvs_client_poll() exactly once, with op->status set.
 * Errors (the op is then not in flight): KVS_EINVAL (bad inputs),
 * KVS_ECONN (cannot connect), KVS_ETIMEDOUT (connect timed out),
 * KVS_ETOOBIG (the request exceeds max_frame_bytes), KVS_ENOMEM.
 */
int kvs_client_submit(kvs_client_t *c, kvs_client_op_t *op);

/*
 * Wait up to timeout_ms (-1: until at least one completes, 0: do not wait)
 * for completed ops; up to `cap` of them go into done[], their count into
 * *n_done. Returns 0, or KVS_EINVAL when nothing is pending and nothing has
 * completed (waiting would never end).
 */
int kvs_client_poll(kvs_client_t *c, kvs_client_op_t **done, size_t cap,
                    size_t *n_done, int timeout_ms);
/* Ops submitted and not yet returned by kvs_client_poll(). */
size_t kvs_client_pending(const kvs_client_t *c);

/* Client-side counters of replication (all 0 with replicas 1). */
typedef struct kvs_client_counters_s {
    uint64_t replicated_writes; /* synchronous writes sent to R > 1 nodes */
    uint64_t degraded_writes;   /* of which acknowledged by fewer than R */
    uint64_t read_failovers;    /* reads passed on to a later replica */
    uint64_t relocated; /* ops (or a write's replica copies) passed on to
                           a further node because the one asked did not
                           have the sequence (any R) */
} kvs_client_counters_t;
void kvs_client_counters(const kvs_client_t *c, kvs_client_counters_t *out);
/* Of the last synchronous write with replicas > 1: how many replicas
 * acknowledged it, out of how many it went to. */
void kvs_client_last_write_acks(const kvs_client_t *c, uint32_t *acked,
                                uint32_t *replicas);

/* ------------------------------------------------ synchronous operations
 * Each submits one op and waits for it; async ops completing meanwhile stay
 * queued for kvs_client_poll(). Errors: those of kvs_client_submit(), then
 * the server's status (the engine's errors, see kvstore.h), KVS_ECONN,
 * KVS_ETIMEDOUT. */

int kvs_client_ping(kvs_client_t *c, size_t node);
int kvs_client_seq_create(kvs_client_t *c, uint64_t seq,
                          const kvs_geometry_t *geo);
/* keys/values: kv_bytes each = n_tokens * n_kv_heads * head_dim * dtype
 * size, [token][kv_head][head_dim]; the server checks it against the
 * sequence's geometry (KVS_EGEOMETRY). */
int kvs_client_seq_append(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          uint32_t n_tokens, const void *keys,
                          const void *values, size_t kv_bytes);
/* queries: n_query_floats = n_q_heads * head_dim; positions/scores hold
 * result_cap entries, at least n_q_heads * k (KVS_ERANGE otherwise). */
int kvs_client_seq_search(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          const float *queries, size_t n_query_floats,
                          uint32_t k, const kvs_query_params_t *params,
                          int64_t *positions, float *scores, size_t result_cap);
/* out: n_query_floats floats. stats may be NULL. */
int kvs_client_seq_attend(kvs_client_t *c, uint64_t seq, uint32_t layer,
                          const float *queries, size_t n_query_floats,
                          const kvs_query_params_t *params, float *out,
                          kvs_attend_stats_t *stats);
/* Fork `parent` into `child` holding its first at_token tokens of every
 * layer (KVS_CLIENT_FORK_ALL: up to its shortest layer), copy-on-write on
 * the server. Both must live on the same node (rendezvous hashing of their
 * ids); KVS_EINVAL otherwise. Errors as kvs_seq_fork() in kvstore.h. */
int kvs_client_seq_fork(kvs_client_t *c, uint64_t parent, uint64_t at_token,
                        uint64_t child);
/* kvs_seq_observe_queries() (kvstore.h): queries of n_tokens tokens,
 * n_query_floats = n_tokens * n_q_heads * head_dim, fp32; the server
 * checks it against the sequence's geometry (KVS_EGEOMETRY). */
int kvs_client_seq_observe_queries(kvs_client_t *c, uint64_t seq,
                                   uint32_t layer, uint32_t n_tokens,
                                   const float *queries, size_t n_query_floats);
int kvs_client_seq_drop(kvs_client_t *c, uint64_t seq);
/* Expire `seq` after ttl_seconds without use (0: never); see
 * kvs_seq_set_ttl() in kvstore.h. */
int kvs_client_seq_set_ttl(kvs_client_t *c, uint64_t seq, uint32_t ttl_seconds);
/* Barrier (kvs_seq_flush() in kvstore.h): returns once every append to
 * `seq` sent before it on this client's connection, and every storage
 * write its node had made when the flush ran, is durable. Needed with
 * `kvstored --sync async`; immediate in batch/always. *persisted_seqno
 * (may be NULL) gets the node's persisted write number. Errors: as
 * kvs_seq_flush (KVS_ENOSEQ, KVS_ENOSPC after a write error: then what
 * was queued is lost). */
int kvs_client_seq_flush(kvs_client_t *c, uint64_t seq,
                         uint64_t *persisted_seqno);
int kvs_client_seq_info(kvs_client_t *c, uint64_t seq, kvs_seq_info_t *info);
/* Where `seq` lives: asks (info) each node of its search path (its
 * remembered holders, then the live nodes in rendezvous order; at most 8,
 * docs/cluster.md) and puts the indexes of those that have it in
 * nodes[0..cap), in that order, their count in *n_out; *n_asked (may be
 * NULL) gets how many nodes answered. Remembers what it found for later
 * ops. Costs one round trip per node asked. Errors: KVS_ECONN (no live
 * node), KVS_ENOSEQ (no node asked has it; *n_out = 0). A node that
 * cannot be reached is passed over, not an error. */
int kvs_client_seq_locate(kvs_client_t *c, uint64_t seq, size_t *nodes,
                          size_t cap, size_t *n_out, size_t *n_asked);
int kvs_client_store_stats(kvs_client_t *c, size_t node,
                           kvs_client_stats_t *stats);
/* *n_out: ids filled (<= cap); *total (may be NULL): sequences on node. */
int kvs_client_store_list(kvs_client_t *c, size_t node, uint64_t *ids,
                          size_t cap, size_t *n_out, uint64_t *total);

#ifdef __cplusplus
}
#endif
#endif /* KVS_CLIENT_H */
