/*
 * persist_int.h: private to engine/. The RocksDB store under a data directory.
 *
 * Column families (keys big-endian so that iteration is in id/position
 * order):
 *   seqs   id(8)                          -> crc | version | geometry | ttl
 *   kv     id(8) layer(4) head(4) pos(8)  -> crc | n | keys[n][d] | vals[n][d]
 *   index  id(8) layer(4) head(4) pos(8)  -> crc | encoded segment
 * The kv family holds exactly the unindexed rows: appends are written per
 * KV head and split at multiples of segment_tokens, so a built segment
 * covers whole records, and its WriteBatch puts the segment and deletes the
 * covered rows at once: a segment is either wholly indexed or still rows.
 * Every value starts with a CRC-32C of the rest, checked on load.
 */
#ifndef KVS_ENGINE_PERSIST_H
#define KVS_ENGINE_PERSIST_H

#include "kvs_index.h"
#include "kvstore.h"

typedef struct kvs__db_s kvs__db_t;

int kvs__db_open(const char *dir, kvs_sync_t sync, uint32_t interval_ms,
                 kvs__db_t **out, char *err, size_t errlen);
int kvs__db_close(kvs__db_t *db);

/* What stored data depends on: rows are split at multiples of the segment
 * size; segments carry adjustment tables for the sink and window sizes. */
typedef struct kvs__db_format_s {
    uint32_t segment_tokens, sink_tokens, window_tokens;
} kvs__db_format_t;

/* The directory's format record: written on first open, checked after; a
 * store opened with different values is refused (KVS_EINVAL). */
int kvs__db_check_format(kvs__db_t *db, const kvs__db_format_t *f, char *err,
                         size_t errlen);

/* Write (or rewrite) a sequence's metadata: geometry and idle TTL. */
int kvs__db_create_seq(kvs__db_t *db, uint64_t id, const kvs_geometry_t *g,
                       uint32_t ttl_s, char *err, size_t errlen);
/* Delete the sequence and everything under it in one batch. */
int kvs__db_drop_seq(kvs__db_t *db, uint64_t id, char *err, size_t errlen);

/* Rows pos0 .. pos0+n of `layer`, all KV heads ([n][kvh][d] layout), in one
 * batch; returns once durable as the sync mode says. */
int kvs__db_append(kvs__db_t *db, uint64_t id, uint32_t layer,
                   const kvs_geometry_t *g, uint64_t pos0, uint32_t n,
                   const void *keys, const void *values,
                   uint32_t segment_tokens, char *err, size_t errlen);

/* A built segment replaces the rows it covers, atomically. */
int kvs__db_put_segment(kvs__db_t *db, uint64_t id, uint32_t layer,
                        uint32_t head, const kvs_segment_t *seg, char *err,
                        size_t errlen);

/* Callbacks of kvs__db_load, each returning 0 or an error (which marks the
 * sequence damaged). All sequences are announced first (seq), then each
 * sequence's records are loaded in turn, in id order: within a (layer,
 * head) segments then rows, in position order; then loaded(). Records of
 * ids without metadata (a crash between a fork's records and its metadata)
 * are deleted. */
typedef struct kvs__db_loader_s {
    void *ctx;
    int (*seq)(void *ctx, uint64_t id, const kvs_geometry_t *g,
               uint32_t ttl_s);
    /* Takes ownership of seg. */
    int (*segment)(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                   kvs_segment_t *seg);
    /* n rows of keys and of values, `half` bytes each. */
    int (*rows)(void *ctx, uint64_t id, uint32_t layer, uint32_t head,
                uint64_t pos, uint32_t n, size_t half, const void *keys,
                const void *values);
    /* The sequence's records are damaged: it must be quarantined. */
    void (*damaged)(void *ctx, uint64_t id, const char *why);
    /* All records of `id` are in (may be NULL). Called per sequence, so a
     * memory budget can evict as the load goes. */
    void (*loaded)(void *ctx, uint64_t id);
} kvs__db_loader_t;

int kvs__db_load(kvs__db_t *db, const kvs__db_loader_t *loader, char *err,
                 size_t errlen);

/* Load the segments and rows of one sequence only (paging an evicted
 * sequence back in); the seq callback is not called. */
int kvs__db_load_seq(kvs__db_t *db, uint64_t id, const kvs__db_loader_t *L,
                     char *err, size_t errlen);

/* Compact every column family now (drops deleted rows' space). */
void kvs__db_compact(kvs__db_t *db);

/* Bytes of live SST and WAL files (RocksDB's own estimate). */
uint64_t kvs__db_disk_bytes(kvs__db_t *db);

#endif
