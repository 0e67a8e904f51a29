/*
 * kvs_server.h: kvstored, the daemon that serves a libkvstore store over the
 * wire protocol of proto/kvs_frame.h. This header is the server module's one
 * public surface: its configuration (used by main.c, --check-config and the
 * unit tests) and the server's lifecycle.
 *
 * Configuration comes from four layers, each overriding the one before:
 * built-in defaults, a config file of `key value` lines (like redis.conf),
 * KVSTORED_<KEY> environment variables, and --key value flags. Every option
 * is one line in the KVS_SERVER_OPTIONS table below, so --help, parsing and
 * validation cannot drift apart.
 *
 * Thread-safety: a kvs_server_t lives on the thread that runs its loop;
 * only kvs_server_shutdown() may be called from a signal handler context via
 * libuv signal watchers (the server installs them itself).
 */
#ifndef KVS_SERVER_H
#define KVS_SERVER_H

#include "kvs_common.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * X(name, type, default, min, max, help). Types: STR (char *), U32, SIZE
 * (uint64_t, accepts K/M/G suffixes), BOOL. min/max bound numbers.
 */
#define KVS_SERVER_OPTIONS(X)                                                  \
    X(bind, STR, "127.0.0.1,::1", 0, 0,                                        \
      "TCP addresses to listen on, comma-separated (IPv4 or IPv6); empty "     \
      "disables TCP")                                                          \
    X(port, U32, "7700", 0, 65535,                                             \
      "TCP port; 0 picks a free one (shared by all bind addresses)")           \
    X(unix_socket, STR, "", 0, 0, "Unix socket path; empty disables it")       \
    X(unix_socket_mode, STR, "0660", 0, 0,                                     \
      "permissions of the Unix socket (octal); a stale socket is replaced, "   \
      "any other file at the path is an error")                                \
    X(http_bind, STR, "127.0.0.1", 0, 0,                                       \
      "address of the /metrics and /healthz HTTP endpoint; empty disables "    \
      "it")                                                                    \
    X(http_port, U32, "7701", 0, 65535, "HTTP port; 0 picks a free one")       \
    X(http_max_connections, U32, "64", 1, 100000,                              \
      "open HTTP connections; more are answered 503 and closed")               \
    X(http_timeout_ms, U32, "10000", 0, UINT32_MAX,                            \
      "close an HTTP connection this long after it was accepted, answered "    \
      "or not; 0 = never")                                                     \
    X(port_file, STR, "", 0, 0,                                                \
      "once listening, write `port N`, `http_port N` lines to this file")      \
    X(data_dir, STR, "./data", 0, 0,                                           \
      "engine data directory (created 0700); empty keeps everything in "       \
      "memory")                                                                \
    X(sync, STR, "batch", 0, 0,                                                \
      "when appends are acknowledged: batch (group fsync), always (fsync "     \
      "each), none (WAL write only) or async (queued in memory, written "      \
      "behind in order; Flush / kvctl flush is the barrier)")                  \
    X(sync_interval_ms, U32, "2", 0, 10000,                                    \
      "sync batch: least time between two WAL fsyncs (group commit)")          \
    X(max_unpersisted_bytes, SIZE, "256M", 1, UINT64_MAX,                      \
      "sync async: most bytes queued for the disk; appends wait beyond it")    \
    X(load, STR, "warm", 0, 0,                                                 \
      "how a restart reads the data directory: warm (sequence table only; "    \
      "records on first use and by a background warm-up), lazy (first use "    \
      "only) or eager (every record read and checked before serving)")         \
    X(memory_bytes, SIZE, "0", 0, UINT64_MAX,                                  \
      "RAM for K/V and index; least recently used sequences are evicted to "   \
      "the data directory and paged back in on use; 0 = unlimited")            \
    X(workers, U32, "4", 1, 1024,                                              \
      "worker threads running engine calls, shared round robin by the "        \
      "connections")                                                           \
    X(engine_threads, U32, "0", 0, 4096,                                       \
      "engine search/attend threads; 0 = online CPUs")                         \
    X(build_threads, U32, "2", 0, 4096, "engine index build threads")          \
    X(blas_threads, U32, "1", 0, 4096,                                         \
      "OpenBLAS threads for index builds (process-wide); 0 = leave as is")     \
    X(gpu, BOOL, "no", 0, 1,                                                   \
      "serve wave attends on the CUDA device cuda-device when the build has "  \
      "CUDA and the device is usable (else the CPU serves; logged)")           \
    X(cuda_device, U32, "0", 0, 1024, "CUDA device ordinal for --gpu")         \
    X(deterministic, BOOL, "no", 0, 1,                                         \
      "searches and attends wait for their layer's queued index builds, so "   \
      "answers do not depend on build timing")                                 \
    X(cuda_cache_percent, U32, "10", 1, 100,                                   \
      "GPU cache of cluster pages, percent of each head's clusters")           \
    X(cuda_memory_bytes, SIZE, "0", 0, UINT64_MAX,                             \
      "GPU memory for all layers' wave buffers; 0 = no limit")                 \
    X(cuda_build, BOOL, "yes", 0, 1,                                           \
      "with --gpu: cluster index segments on the GPU (else on the CPU)")       \
    X(cuda_kv, STR, "auto", 0, 0,                                              \
      "where GPU-served layers keep K/V: auto (GPU memory while half of it "   \
      "suffices, else pinned host + GPU cache) or host (always pinned host)")  \
    X(segment_tokens, U32, "0", 0, 1u << 24,                                   \
      "engine keys per index segment; 0 = engine default")                     \
    X(cluster_tokens, U32, "0", 0, 1u << 16,                                   \
      "engine mean keys per cluster; 0 = engine default")                      \
    X(profile, STR, "", 0, 0,                                                  \
      "tuning profile from kvtune (docs/kvtune.md) applied to the engine "     \
      "options; segment_tokens and cluster_tokens, when non-zero, win")        \
    X(max_frame_bytes, SIZE, "64M", 1024, 1u << 30,                            \
      "largest frame body accepted or sent")                                   \
    X(max_head_dim, U32, "256", 1, 1024, "largest head_dim of a sequence")     \
    X(max_tokens_per_append, U32, "65536", 1, 1u << 24,                        \
      "most tokens in one Append")                                             \
    X(max_connections, U32, "10000", 1, 1000000,                               \
      "open client connections; more are refused with KVS_EBUSY")              \
    X(max_inflight, U32, "64", 1, 65536,                                       \
      "requests in flight per connection before it stops being read")          \
    X(max_sequences, U32, "100000", 0, UINT32_MAX,                             \
      "most sequences the store holds (each costs bookkeeping RAM even "       \
      "when empty); 0 = no limit but memory_bytes")                            \
    X(max_output_bytes, SIZE, "4M", 4096, 1u << 30,                            \
      "answer bytes queued for one connection before it stops being read "     \
      "(a client that does not read its answers)")                             \
    X(max_buffered_bytes, SIZE, "256M", 0, UINT64_MAX,                         \
      "request bytes buffered over all connections (frames read, not yet "     \
      "answered); a connection over it waits; 0 = unlimited")                  \
    X(frame_timeout_ms, U32, "10000", 0, UINT32_MAX,                           \
      "close a connection that has not completed a started frame, or sent "    \
      "Hello when auth is on, within this time; 0 = never")                    \
    X(max_list_ids, U32, "100000", 1, 1u << 24,                                \
      "most ids returned by one ListSequences")                                \
    X(idle_timeout_ms, U32, "300000", 0, UINT32_MAX,                           \
      "close connections idle this long; 0 = never")                           \
    X(shutdown_timeout_ms, U32, "30000", 0, UINT32_MAX,                        \
      "on SIGTERM, wait this long for in-flight requests")                     \
    X(auth_token, STR, "", 0, 0,                                               \
      "shared secret every connection must send in Hello; empty = no auth. "   \
      "On the command line it shows in ps: prefer auth_token_file or "         \
      "KVSTORED_AUTH_TOKEN")                                                   \
    X(auth_token_file, STR, "", 0, 0,                                          \
      "read auth_token from this file (first line; warned if group or "        \
      "world can read it)")                                                    \
    X(node_id, STR, "", 0, 0, "name reported in Hello/Stats; empty = host")    \
    X(etcd_endpoints, STR, "", 0, 0,                                           \
      "etcd client URLs, comma-separated (http://host:port); when set, the "   \
      "daemon registers <etcd_prefix>/nodes/<node_id> under a lease while it " \
      "serves (docs/cluster.md); empty = no etcd")                             \
    X(etcd_prefix, STR, "/kvstore", 0, 0, "etcd key prefix of this cluster")   \
    X(etcd_lease_ttl, U32, "10", 2, 3600,                                      \
      "seconds a node stays registered after its last keepalive (a crashed "   \
      "daemon disappears within it)")                                          \
    X(advertise_addr, STR, "", 0, 0,                                           \
      "host:port clients should dial, written to etcd; empty = the first "     \
      "bind address and the bound port")                                       \
    X(replicas, U32, "0", 0, 8,                                                \
      "with etcd: copies of each sequence that repair keeps on the top "       \
      "nodes of its rendezvous order (the clients' replicas); 0 = no repair")  \
    X(repair_rate_bytes, SIZE, "64M", 0, UINT64_MAX,                           \
      "bytes per second repair pushes to other nodes; 0 = unlimited")          \
    X(repair_interval_ms, U32, "1000", 100, 600000,                            \
      "how often repair reads the node list (and retries unfinished work)")    \
    X(log_level, STR, "info", 0, 0, "debug, info, warn or error")              \
    X(log_file, STR, "", 0, 0,                                                 \
      "append log lines to this file (created 0600) instead of stderr; "       \
      "reopened on SIGHUP (log rotation)")                                     \
    X(tcp_nodelay, BOOL, "yes", 0, 1, "disable Nagle on client sockets")

#define KVS__OPT_CTYPE_STR char *
#define KVS__OPT_CTYPE_U32 uint32_t
#define KVS__OPT_CTYPE_SIZE uint64_t
#define KVS__OPT_CTYPE_BOOL bool

typedef struct kvs_server_config_s {
#define KVS__OPT_FIELD(name, type, def, min, max, help)                        \
    KVS__OPT_CTYPE_##type name;
    KVS_SERVER_OPTIONS(KVS__OPT_FIELD)
#undef KVS__OPT_FIELD
} kvs_server_config_t;

/* Fill `cfg` with the defaults. Strings are malloc'ed; release with
 * kvs_server_config_destroy(). Errors: KVS_ENOMEM. */
int kvs_server_config_init(kvs_server_config_t *cfg);
void kvs_server_config_destroy(kvs_server_config_t *cfg);

/* Set one option by name (`-` and `_` are equivalent). Errors: KVS_EINVAL
 * with a reason in err (unknown key, bad number, out of range). */
int kvs_server_config_set(kvs_server_config_t *cfg, const char *key,
                          const char *value, char *err, size_t errlen);

/* Apply a config file: `key value` per line, `#` comments, blank lines, and
 * values optionally in double quotes. Errors: -errno (cannot read),
 * KVS_EINVAL (reason names file:line). */
int kvs_server_config_load_file(kvs_server_config_t *cfg, const char *path,
                                char *err, size_t errlen);

/* Apply KVSTORED_<KEY> variables from `envp` (NULL-terminated; NULL means
 * the process environment). Errors: KVS_EINVAL. */
int kvs_server_config_load_env(kvs_server_config_t *cfg, char *const *envp,
                               char *err, size_t errlen);

/* Cross-option checks and derived values (reads auth_token_file).
 * Errors: KVS_EINVAL, -errno. */
int kvs_server_config_validate(kvs_server_config_t *cfg, char *err,
                               size_t errlen);

/* Print every option with its default and help (for --help). */
void kvs_server_config_usage(FILE *out);
/* Print the effective configuration as a config file (secrets masked). */
void kvs_server_config_dump(const kvs_server_config_t *cfg, FILE *out);

/*
 * Parse argv into cfg, in layer order: defaults, the file named by
 * --config (or -c), the environment, then flags. Recognised actions are
 * reported in *action: 0 run, 1 --help, 2 --check-config, 3 --version.
 * Errors: KVS_EINVAL with a reason.
 */
int kvs_server_config_from_args(kvs_server_config_t *cfg, int argc, char **argv,
                                int *action, char *err, size_t errlen);

/* ---------------------------------------------------------------- server */

typedef struct kvs_server_s kvs_server_t;

/*
 * Open the store and bind every listener described by cfg (borrowed until
 * kvs_server_free). On success the ports are bound (port_file written) and
 * kvs_server_run() serves until shutdown.
 * Errors: -errno from binding, KVS_* from the store; a message goes to the
 * log.
 */
int kvs_server_new(const kvs_server_config_t *cfg, kvs_server_t **out);
/* Serve until SIGTERM/SIGINT or kvs_server_shutdown(), then drain and close
 * the store. Returns 0 after a clean shutdown, or the store's close error
 * (KVS_ENOSPC / KVS_EIO after a failed write; logged as store_close_failed):
 * kvstored then exits 1. */
int kvs_server_run(kvs_server_t *srv);
/* Begin a graceful shutdown (loop thread only). */
void kvs_server_shutdown(kvs_server_t *srv);
void kvs_server_free(kvs_server_t *srv);

#ifdef __cplusplus
}
#endif
#endif /* KVS_SERVER_H */
