/*
 * persist_int.h: private to engine/. The RocksDB store under a data directory.
 *
 * Column families (keys big-endian so that iteration is in id/position
 * order):
 *   seqs   id(8)                          -> crc | version | geometry | ttl
 *   kv     id(8) layer(4) head(4) pos(8)  -> crc | n | keys[n][d] | vals[n][d]
 *   index  id(8) layer(4) head(4) pos(8)  -> crc | segment metadata
 *   blocks id(8) layer(4) head(4) pos(8) slot(4) -> crc | K/V block
 * The kv family holds exactly the unindexed rows: appends are written per
 * KV head and split at multiples of segment_tokens, so a built segment
 * covers whole records, and its WriteBatch puts the segment's metadata
 * record and K/V blocks and deletes the covered rows at once: a segment is
 * either wholly indexed or still rows. The metadata record is what ranking
 * needs (index/segment_io.c, version 3); its keys and values are blocks of
 * consecutive slots under its key plus the first slot (format 2; a format-1
 * store's index records hold their K/V inside and are read as they are).
 * Every value starts with a CRC-32C of the rest, checked on load.
 */
#ifndef KVS_ENGINE_PERSIST_H
#define KVS_ENGINE_PERSIST_H

#include "kvs_index.h"
#include "kvstore.h"

#include <stdatomic.h>

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
 * batch; returns once durable as the sync mode says (ASYNC: once queued,
 * the rows copied). *ticket (may be NULL) gets the write's number, for
 * kvs__db_wait. */
int kvs__db_append(kvs__db_t *db, uint64_t id, uint32_t layer,
                   const kvs_geometry_t *g, uint64_t pos0, uint32_t n,
                   const void *keys, const void *values,
                   uint32_t segment_tokens, uint64_t *ticket, char *err,
                   size_t errlen);

/* KVS_SYNC_ASYNC: start the writer thread (after the load at open, whose
 * own writes are direct). In every mode, `log` (may be NULL) is where a
 * lost queue is reported. max_unpersisted: the lag bound in bytes. */
int kvs__db_start_writer(kvs__db_t *db, uint64_t max_unpersisted,
                         kvs_log_fn log, void *log_ctx);
/* Wait until write `ticket` is durable: 0, or the write error that lost
 * it. Immediate outside ASYNC. Takes only persist.c's leaf lock. */
int kvs__db_wait(kvs__db_t *db, uint64_t ticket);
/* Barrier over every write made before the call (NONE: fsync the WAL). */
int kvs__db_flush(kvs__db_t *db, char *err, size_t errlen);

typedef struct kvs__db_progress_s {
    uint64_t queued, persisted, unpersisted_bytes;
    uint64_t groups;    /* batches the writer wrote */
    uint64_t lag_waits; /* times a write waited for the lag bound */
} kvs__db_progress_t;
void kvs__db_progress(kvs__db_t *db, kvs__db_progress_t *p);

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
    int (*seq)(void *ctx, uint64_t id, const kvs_geometry_t *g, uint32_t ttl_s);
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
    /* Lazy open (kvs__db_load only; NULL: every record is read). Instead
     * of a sequence's records, each layer's token count per KV head
     * (ends[n_kv_heads]) is given, found from the last record of each
     * (layer, head): one seek per family, the last kv record read and
     * checked, no segment decoded. The records stay on disk for a later
     * kvs__db_load_seq. Where that seek meets an unreadable block or a
     * record that fails its checksum, the sequence is read in full
     * instead (segment, rows, damaged and loaded as above), so damage
     * seen at open is charged exactly as an eager load charges it. */
    int (*extent)(void *ctx, uint64_t id, uint32_t layer, const uint64_t *ends);
    uint32_t segment_tokens; /* with extent: tokens of a stored segment */
    /* May be NULL. Read between records: once non-zero the load stops and
     * returns KVS_ECLOSED, charging nothing as damaged (a close does not
     * wait for a whole sequence to be read). */
    const atomic_int *cancel;
    /* kvs__db_load_seq only: read only layer `layer` (one_layer), or only
     * KV head `head` of it (one_head too). The walk is bounded to those
     * keys, so another part's damage is not seen. */
    int one_layer, one_head;
    uint32_t layer, head;
    /* Bytes each iterator of the walk reads ahead (0: RocksDB's own,
     * adaptive). For long ranges read by several walks at once, so that
     * each is a sequential stream; on a short range it would read far
     * more than the range. */
    size_t readahead;
} kvs__db_loader_t;

int kvs__db_load(kvs__db_t *db, const kvs__db_loader_t *loader, char *err,
                 size_t errlen);

/* Load the segments and rows of one sequence only (paging an evicted
 * sequence back in), or of the part of it the loader names (one_layer);
 * the seq callback is not called. Segments are handed over whole (with
 * their K/V blocks read and checked). In ASYNC it first
 * waits for every queued write, so it reads what the engine wrote. */
int kvs__db_load_seq(kvs__db_t *db, uint64_t id, const kvs__db_loader_t *L,
                     char *err, size_t errlen);

/* Compact every column family now (drops deleted rows' space). */
void kvs__db_compact(kvs__db_t *db);

/* Bytes of live SST and WAL files (RocksDB's own estimate). */
uint64_t kvs__db_disk_bytes(kvs__db_t *db);

#endif
