/*
 * kvs_etcd.h: membership in etcd, shared by kvstored (which registers
 * itself) and libkvsclient (which reads the node list). Internal to kvstore:
 * libkvsclient.so does not export it.
 *
 * Two things live here so that server and client cannot drift apart:
 *   - a small client of etcd's v3 JSON gateway (POST /v3/kv/range, ...,
 *     base64 keys and values, int64 fields as decimal strings), and
 *   - the node record: the JSON value of `<prefix>/nodes/<node-id>`, its one
 *     encoder and its one decoder.
 *
 * Why the JSON gateway over plain sockets rather than gRPC or libcurl: there
 * is no gRPC C library in Debian that fits a C11 tree, and the gateway needs
 * nothing but HTTP/1.0 POSTs of a few hundred bytes (the answer ends when
 * the connection closes: no chunked decoding). libcurl would pull a TLS stack
 * into every client process (libkvsclient.so, the Python binding) for that.
 * The price: plain http:// endpoints only (no TLS, no etcd auth yet).
 *
 * Every call blocks for at most the handle's timeout per endpoint tried;
 * endpoints are tried in turn starting with the last one that answered.
 * Errors: KVS_ECONN (no endpoint reachable), KVS_ETIMEDOUT, KVS_EPROTO (an
 * answer we cannot read), KVS_EIO (etcd answered with an error; the message
 * says which), KVS_EINVAL, KVS_ENOMEM. kvs_etcd_errmsg() has the detail.
 *
 * Thread-safety: one kvs_etcd_t per thread (or a lock around it).
 */
#ifndef KVS_ETCD_H
#define KVS_ETCD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_ETCD_MAX_ENDPOINTS 16

typedef struct kvs_etcd_s kvs_etcd_t;

/* endpoints: comma-separated "host:port" or "http://host:port" ("[v6]:port"
 * for IPv6 literals). timeout_ms: per request and endpoint (0: 2000).
 * Errors: KVS_EINVAL with the reason in err (https://, no port, too many),
 * KVS_ENOMEM. */
int kvs_etcd_new(const char *endpoints, uint32_t timeout_ms, kvs_etcd_t **out,
                 char *err, size_t errlen);
void kvs_etcd_free(kvs_etcd_t *e);
/* Detail of the last failed call; valid until the next call. */
const char *kvs_etcd_errmsg(const kvs_etcd_t *e);

/* A lease of ttl_seconds (etcd may raise a very short one). */
int kvs_etcd_lease_grant(kvs_etcd_t *e, uint32_t ttl_seconds, int64_t *id);
/* One keepalive. *ttl_left: seconds the lease now has, 0 when etcd no longer
 * knows it (expired or revoked: grant a new one). */
int kvs_etcd_lease_keepalive(kvs_etcd_t *e, int64_t id, int64_t *ttl_left);
/* Revoke the lease, deleting every key attached to it. */
int kvs_etcd_lease_revoke(kvs_etcd_t *e, int64_t id);
/* Put key = value, attached to `lease` (0: none). */
int kvs_etcd_put(kvs_etcd_t *e, const char *key, const void *value,
                 size_t value_len, int64_t lease);

typedef struct kvs_etcd_kv_s {
    char *key;   /* NUL-terminated */
    char *value; /* value_len bytes, NUL-terminated as well */
    size_t value_len;
    int64_t mod_revision;
    int64_t lease;
} kvs_etcd_kv_t;

/* Every key starting with `prefix`, in key order. *kvs is malloc'ed (free
 * with kvs_etcd_kvs_free), *revision (may be NULL) is the store's revision
 * the answer reflects. */
int kvs_etcd_range_prefix(kvs_etcd_t *e, const char *prefix,
                          kvs_etcd_kv_t **kvs, size_t *n, int64_t *revision);
void kvs_etcd_kvs_free(kvs_etcd_kv_t *kvs, size_t n);

/* ------------------------------------------------------------ node record */

/* The value of `<prefix>/nodes/<node_id>` (JSON, one object; unknown fields
 * are ignored by the decoder, so records may grow). */
typedef struct kvs_node_record_s {
    char node_id[128];
    char addr[256];           /* what clients dial: "host:port" */
    uint32_t port, http_port; /* bound ports (http 0: none) */
    uint64_t memory_limit;    /* the daemon's memory_bytes; 0: unlimited */
    uint64_t memory_used;     /* K/V + index bytes resident */
    uint64_t sequences;
    int64_t start_time; /* Unix seconds */
    uint32_t protocol;  /* KVS_PROTOCOL_VERSION */
    char version[32];   /* kvstored's */
} kvs_node_record_t;

/* Key of a node: prefix (trailing '/' ignored) + "/nodes/" + node_id.
 * Errors: KVS_ETOOBIG when it does not fit in cap. */
int kvs_node_key(const char *prefix, const char *node_id, char *buf,
                 size_t cap);
/* The prefix every node key starts with (prefix + "/nodes/"). */
int kvs_node_key_prefix(const char *prefix, char *buf, size_t cap);
/* JSON of r into buf (NUL-terminated). Errors: KVS_ETOOBIG. */
int kvs_node_record_encode(const kvs_node_record_t *r, char *buf, size_t cap,
                           size_t *len);
/* Parse a record (zero-fills r first). Errors: KVS_EPROTO (not an object,
 * no addr). */
int kvs_node_record_decode(const char *json, size_t len, kvs_node_record_t *r);

/* ------------------------------------------------------ rendezvous order */

/* Where sequences live, shared by libkvsclient (placement, probing) and
 * kvstored (repair) so that both rank nodes alike: a node's hash is of the
 * address clients dial (the record's addr, or a static address as given);
 * a sequence ranks nodes by weight, highest first, and lives on the first
 * R live ones. */
uint64_t kvs_rendezvous_node_hash(const char *addr);
uint64_t kvs_rendezvous_weight(uint64_t seq, uint64_t node_hash);

#ifdef __cplusplus
}
#endif
#endif /* KVS_ETCD_H */
