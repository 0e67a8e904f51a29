/*
 * persist.c: the RocksDB store of a data directory (see persist.h for the
 * layout). RocksDB is reached through its C API only; every errptr it
 * returns is turned into a KVS_E* code and a message here.
 *
 * Sync modes: ALWAYS writes each batch with WriteOptions.sync; NONE never
 * syncs; BATCH writes without sync and then group-commits: one fsync of the
 * WAL (FlushWAL(sync)) covers every batch written before it (see
 * write_durable).
 */
#include "engine/persist.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <rocksdb/c.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define SEQ_VERSION 1u

enum { CF_DEFAULT, CF_SEQS, CF_KV, CF_INDEX, CF_COUNT };
static const char *const cf_names[CF_COUNT] = {"default", "seqs", "kv",
                                               "index"};

struct kvs__db_s {
    rocksdb_t *db;
    rocksdb_options_t *opts;
    rocksdb_column_family_handle_t *cf[CF_COUNT];
    rocksdb_writeoptions_t *wo; /* per the sync mode */
    rocksdb_writeoptions_t *wo_nosync;
    rocksdb_readoptions_t *ro;
    char *dir;
    kvs_sync_t sync;
    uint32_t interval_ms;
    /* Group commit. */
    pthread_mutex_t mu;
    pthread_cond_t synced_cv;
    uint64_t written, synced;
    int syncing; /* a leader is in rocksdb_flush_wal */
    /* A write failed: RocksDB is read-only from here on, and syncing its
     * WAL again would trip an assertion in some builds. */
    atomic_int failed;
    int sync_err;
    struct timespec last_sync;
};

static int map_err(const char *msg) {
    if (!msg)
        return 0;
    if (strstr(msg, "Corruption") || strstr(msg, "corrupt") ||
        strstr(msg, "checksum mismatch"))
        return KVS_ECORRUPT;
    if (strstr(msg, "No space left") || strstr(msg, "File too large"))
        return KVS_ENOSPC;
    if (strstr(msg, "/LOCK") || strstr(msg, "lock hold"))
        return KVS_ELOCKED;
    return KVS_EIO;
}

/* Consume a RocksDB errptr: code + message, then free it. */
static int take_err(char *rerr, char *err, size_t errlen, const char *what) {
    if (!rerr)
        return 0;
    int rc = map_err(rerr);
    if (err && errlen)
        snprintf(err, errlen, "%s: %s", what, rerr);
    rocksdb_free(rerr);
    return rc;
}

static void put_be64(unsigned char *p, uint64_t x) {
    for (int i = 7; i >= 0; i--, x >>= 8)
        p[i] = (unsigned char)x;
}
static void put_be32(unsigned char *p, uint32_t x) {
    for (int i = 3; i >= 0; i--, x >>= 8)
        p[i] = (unsigned char)x;
}
static uint64_t get_be64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x = x << 8 | p[i];
    return x;
}
static uint32_t get_be32(const unsigned char *p) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++)
        x = x << 8 | p[i];
    return x;
}

/* id(8) layer(4) head(4) pos(8) */
static void rec_key(unsigned char k[24], uint64_t id, uint32_t layer,
                    uint32_t head, uint64_t pos) {
    put_be64(k, id);
    put_be32(k + 8, layer);
    put_be32(k + 12, head);
    put_be64(k + 16, pos);
}

static int db_sync_wal(kvs__db_t *db);

int kvs__db_open(const char *dir, kvs_sync_t sync, uint32_t interval_ms,
                 kvs__db_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (mkdir(dir, 0755) && errno != EEXIST) {
        int e = errno;
        snprintf(err, errlen, "cannot create %s: %s", dir, strerror(e));
        return -e;
    }
    kvs__db_t *db = calloc(1, sizeof *db);
    if (!db)
        return KVS_ENOMEM;
    db->dir = strdup(dir);
    db->sync = sync;
    db->interval_ms = interval_ms;
    pthread_mutex_init(&db->mu, NULL);
    pthread_cond_init(&db->synced_cv, NULL);

    rocksdb_options_t *o = rocksdb_options_create();
    db->opts = o;
    rocksdb_options_set_create_if_missing(o, 1);
    rocksdb_options_set_create_missing_column_families(o, 1);
    /* Float vectors do not compress; don't spend CPU trying. */
    rocksdb_options_set_compression(o, rocksdb_no_compression);
    rocksdb_options_set_write_buffer_size(o, 32 << 20);
    /* Memtables of all families together: RAM on top of memory_bytes. */
    rocksdb_options_set_db_write_buffer_size(o, 64 << 20);
    rocksdb_options_set_target_file_size_base(o, 128 << 20);
    rocksdb_options_set_max_background_jobs(o, 2);
    /* Not paranoid: one damaged table must not keep the whole directory
     * from opening. Every record carries its own CRC and reads verify
     * block checksums, so damage still surfaces, per sequence. */
    rocksdb_options_set_paranoid_checks(o, 0);
    const rocksdb_options_t *cfo[CF_COUNT] = {o, o, o, o};
    char *rerr = NULL;
    db->db = rocksdb_open_column_families(o, dir, CF_COUNT, cf_names, cfo,
                                          db->cf, &rerr);
    int rc = take_err(rerr, err, errlen, "cannot open the database");
    if (rc) {
        db->db = NULL;
        kvs__db_close(db);
        return rc;
    }
    db->wo = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(db->wo, sync == KVS_SYNC_ALWAYS);
    db->wo_nosync = rocksdb_writeoptions_create();
    db->ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(db->ro, 1);
    rocksdb_readoptions_set_fill_cache(db->ro, 0);
    *out = db;
    return 0;
}

void kvs__db_close(kvs__db_t *db) {
    if (!db)
        return;
    if (db->db) {
        /* Make everything acknowledged so far durable before closing. */
        db_sync_wal(db);
        for (int i = 0; i < CF_COUNT; i++)
            rocksdb_column_family_handle_destroy(db->cf[i]);
        rocksdb_close(db->db);
    }
    if (db->wo)
        rocksdb_writeoptions_destroy(db->wo);
    if (db->wo_nosync)
        rocksdb_writeoptions_destroy(db->wo_nosync);
    if (db->ro)
        rocksdb_readoptions_destroy(db->ro);
    if (db->opts)
        rocksdb_options_destroy(db->opts);
    pthread_cond_destroy(&db->synced_cv);
    pthread_mutex_destroy(&db->mu);
    free(db->dir);
    free(db);
}

/* Every write goes through here: after one failure the database refuses
 * writes (RocksDB enters read-only mode) and reads go on serving. */
static int db_write(kvs__db_t *db, const rocksdb_writeoptions_t *wo,
                    rocksdb_writebatch_t *b, char *err, size_t errlen,
                    const char *what) {
    if (atomic_load(&db->failed)) {
        if (err && errlen)
            snprintf(err, errlen,
                     "%s: the store is read-only after an "
                     "earlier write error (free space, then restart)",
                     what);
        return KVS_EIO;
    }
    char *rerr = NULL;
    rocksdb_write(db->db, wo, b, &rerr);
    int rc = take_err(rerr, err, errlen, what);
    if (rc)
        atomic_store(&db->failed, 1);
    return rc;
}

static int db_sync_wal(kvs__db_t *db) {
    if (atomic_load(&db->failed))
        return KVS_EIO;
    char *rerr = NULL;
    rocksdb_flush_wal(db->db, 1, &rerr);
    int rc = take_err(rerr, NULL, 0, "");
    if (rc)
        atomic_store(&db->failed, 1);
    return rc;
}

/* Write `b` and return once it is as durable as the sync mode promises.
 *
 * BATCH is leader/follower group commit: a writer whose batch is not yet
 * covered by an fsync either becomes the leader, fsyncs the WAL once for
 * every batch written so far and wakes the others, or waits for the leader
 * in flight. A leader first lets sync_interval_ms pass since the previous
 * fsync, so that under load one fsync covers many appends; a lone writer
 * pays one fsync and no wait. */
static int write_durable(kvs__db_t *db, rocksdb_writebatch_t *b, char *err,
                         size_t errlen) {
    if (db->sync != KVS_SYNC_BATCH)
        return db_write(db, db->wo, b, err, errlen, "write");
    pthread_mutex_lock(&db->mu);
    /* Written under the mutex so that `written` orders with the WAL. */
    int rc = db_write(db, db->wo_nosync, b, err, errlen, "write");
    if (rc) {
        pthread_mutex_unlock(&db->mu);
        return rc;
    }
    uint64_t mine = ++db->written;
    while (db->synced < mine) {
        if (db->syncing) {
            pthread_cond_wait(&db->synced_cv, &db->mu);
            continue;
        }
        db->syncing = 1;
        pthread_mutex_unlock(&db->mu);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double since = (now.tv_sec - db->last_sync.tv_sec) * 1e3 +
                       (now.tv_nsec - db->last_sync.tv_nsec) / 1e6;
        if (since < db->interval_ms) {
            double wait = db->interval_ms - since;
            struct timespec ts = {(time_t)(wait / 1e3),
                                  (long)(fmod(wait, 1e3) * 1e6)};
            nanosleep(&ts, NULL);
        }
        pthread_mutex_lock(&db->mu);
        uint64_t target = db->written;
        pthread_mutex_unlock(&db->mu);
        int src = db_sync_wal(db);
        pthread_mutex_lock(&db->mu);
        clock_gettime(CLOCK_MONOTONIC, &db->last_sync);
        if (src)
            db->sync_err = src;
        db->synced = target;
        db->syncing = 0;
        pthread_cond_broadcast(&db->synced_cv);
    }
    rc = db->sync_err;
    pthread_mutex_unlock(&db->mu);
    if (rc && err)
        snprintf(err, errlen, "WAL sync failed: %s", kvs_strerror(rc));
    return rc;
}

int kvs__db_create_seq(kvs__db_t *db, uint64_t id, const kvs_geometry_t *g,
                       uint32_t ttl_s, char *err, size_t errlen) {
    unsigned char k[8], v[4 + 28];
    put_be64(k, id);
    uint32_t f[7] = {SEQ_VERSION,   g->n_layers, g->n_q_heads,
                     g->n_kv_heads, g->head_dim, (uint32_t)g->dtype,
                     ttl_s};
    memcpy(v + 4, f, sizeof f);
    uint32_t crc = kvs_crc32c(0, v + 4, sizeof f);
    memcpy(v, &crc, 4);
    rocksdb_writebatch_t *b = rocksdb_writebatch_create();
    rocksdb_writebatch_put_cf(b, db->cf[CF_SEQS], (const char *)k, 8,
                              (const char *)v, sizeof v);
    int rc = write_durable(db, b, err, errlen);
    rocksdb_writebatch_destroy(b);
    return rc;
}

int kvs__db_drop_seq(kvs__db_t *db, uint64_t id, char *err, size_t errlen) {
    unsigned char k[8], lo[24], hi[24];
    put_be64(k, id);
    memset(lo, 0, sizeof lo);
    memset(hi, 0, sizeof hi);
    put_be64(lo, id);
    put_be64(hi, id + 1);
    rocksdb_writebatch_t *b = rocksdb_writebatch_create();
    rocksdb_writebatch_delete_cf(b, db->cf[CF_SEQS], (const char *)k, 8);
    size_t hl = id == UINT64_MAX ? 24 : 8; /* id+1 wraps: end at max key */
    if (id == UINT64_MAX)
        memset(hi, 0xff, sizeof hi);
    for (int cf = CF_KV; cf <= CF_INDEX; cf++)
        rocksdb_writebatch_delete_range_cf(b, db->cf[cf], (const char *)lo, 8,
                                           (const char *)hi, hl);
    int rc = write_durable(db, b, err, errlen);
    rocksdb_writebatch_destroy(b);
    return rc;
}

int kvs__db_append(kvs__db_t *db, uint64_t id, uint32_t layer,
                   const kvs_geometry_t *g, uint64_t pos0, uint32_t n,
                   const void *keys, const void *values,
                   uint32_t segment_tokens, char *err, size_t errlen) {
    size_t rb = (size_t)g->head_dim * kvs_dtype_size(g->dtype);
    size_t stride = rb * g->n_kv_heads;
    /* The largest record: up to segment_tokens rows. */
    size_t max_rows = n < segment_tokens ? n : segment_tokens;
    unsigned char *buf = malloc(8 + 2 * rb * max_rows);
    if (!buf)
        return KVS_ENOMEM;
    rocksdb_writebatch_t *b = rocksdb_writebatch_create();
    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        uint64_t pos = pos0;
        uint32_t done = 0;
        while (done < n) {
            /* Split at segment boundaries: a segment covers whole records. */
            uint64_t boundary = (pos / segment_tokens + 1) * segment_tokens;
            uint32_t m = (uint32_t)(boundary - pos);
            if (m > n - done)
                m = n - done;
            unsigned char *kp = buf + 8, *vp = buf + 8 + rb * m;
            for (uint32_t t = 0; t < m; t++) {
                memcpy(kp + t * rb,
                       (const char *)keys + (size_t)(done + t) * stride +
                           h * rb,
                       rb);
                memcpy(vp + t * rb,
                       (const char *)values + (size_t)(done + t) * stride +
                           h * rb,
                       rb);
            }
            memcpy(buf + 4, &m, 4);
            uint32_t crc = kvs_crc32c(0, buf + 4, 4 + 2 * rb * m);
            memcpy(buf, &crc, 4);
            unsigned char k[24];
            rec_key(k, id, layer, h, pos);
            rocksdb_writebatch_put_cf(b, db->cf[CF_KV], (const char *)k, 24,
                                      (const char *)buf, 8 + 2 * rb * m);
            pos += m;
            done += m;
        }
    }
    free(buf);
    int rc = write_durable(db, b, err, errlen);
    rocksdb_writebatch_destroy(b);
    return rc;
}

int kvs__db_put_segment(kvs__db_t *db, uint64_t id, uint32_t layer,
                        uint32_t head, const kvs_segment_t *seg, char *err,
                        size_t errlen) {
    size_t len = kvs_segment_encoded_size(seg);
    unsigned char *buf = malloc(4 + len);
    if (!buf)
        return KVS_ENOMEM;
    kvs_segment_encode(seg, buf + 4);
    uint32_t crc = kvs_crc32c(0, buf + 4, len);
    memcpy(buf, &crc, 4);
    unsigned char k[24], lo[24], hi[24];
    rec_key(k, id, layer, head, seg->first_pos);
    rec_key(lo, id, layer, head, seg->first_pos);
    rec_key(hi, id, layer, head, seg->first_pos + seg->n_tokens);
    rocksdb_writebatch_t *b = rocksdb_writebatch_create();
    rocksdb_writebatch_put_cf(b, db->cf[CF_INDEX], (const char *)k, 24,
                              (const char *)buf, 4 + len);
    rocksdb_writebatch_delete_range_cf(b, db->cf[CF_KV], (const char *)lo, 24,
                                       (const char *)hi, 24);
    /* No fsync wait: until the WAL is synced the rows are still there, so a
     * crash loses at most this build, never data. */
    int rc = db_write(db, db->wo_nosync, b, err, errlen, "segment write");
    rocksdb_writebatch_destroy(b);
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Loading                                                                */

typedef struct known_s {
    uint64_t *ids;
    uint8_t *damaged;
    size_t n, cap;
} known_t;

static int known_find(const known_t *k, uint64_t id) {
    size_t lo = 0, hi = k->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (k->ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < k->n && k->ids[lo] == id ? (int)lo : -1;
}

static void damage(known_t *k, const kvs__db_loader_t *L, int idx,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void damage(known_t *k, const kvs__db_loader_t *L, int idx,
                   const char *fmt, ...) {
    if (k->damaged[idx])
        return;
    k->damaged[idx] = 1;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    L->damaged(L->ctx, k->ids[idx], msg);
}

/* Walk one of the record families (kv or index). Records of unknown ids
 * (left by a drop racing a build) are deleted. */
static int load_records(kvs__db_t *db, int cf, known_t *known,
                        const kvs__db_loader_t *L, int bounded, char *err,
                        size_t errlen) {
    /* Damage is charged to sequences, never returned: err stays unused. */
    (void)err, (void)errlen;
    rocksdb_writebatch_t *orphans = rocksdb_writebatch_create();
    int n_orphans = 0;
    int cur = -1;
    uint64_t cur_id = 0;
    /* An unreadable block stops an iterator for good: blame the sequence
     * it was in (or the next one, when it fails before yielding a key),
     * then go on from the next known sequence, so that one damaged table
     * block quarantines the sequences it holds and no others. */
    size_t resume = 0; /* index into known->ids to seek to; 0 = first key */
    int rc = 0;
    for (;;) {
        rocksdb_iterator_t *it =
            rocksdb_create_iterator_cf(db->db, db->ro, db->cf[cf]);
        if (resume == 0 && !bounded) {
            rocksdb_iter_seek_to_first(it);
        } else {
            unsigned char seek[8];
            put_be64(seek, known->ids[resume]);
            rocksdb_iter_seek(it, (const char *)seek, 8);
        }
        int got_key = 0;
        for (; rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
            got_key = 1;

            size_t kl, vl;
            const unsigned char *k =
                (const unsigned char *)rocksdb_iter_key(it, &kl);
            const unsigned char *v =
                (const unsigned char *)rocksdb_iter_value(it, &vl);
            if (kl != 24)
                continue;
            uint64_t id = get_be64(k);
            /* Bounded: only the known ids, which are sorted. */
            if (bounded && id > known->ids[known->n - 1])
                break;
            if (cur < 0 || id != cur_id) {
                cur_id = id;
                cur = known_find(known, id);
            }
            if (cur < 0) {
                if (bounded) /* never judge other ids from a partial walk */
                    continue;
                rocksdb_writebatch_delete_cf(orphans, db->cf[cf],
                                             (const char *)k, kl);
                n_orphans++;
                continue;
            }
            if (known->damaged[cur])
                continue;
            uint32_t layer = get_be32(k + 8), head = get_be32(k + 12);
            uint64_t pos = get_be64(k + 16);
            uint32_t crc;
            if (vl < 4 ||
                (memcpy(&crc, v, 4), crc != kvs_crc32c(0, v + 4, vl - 4))) {
                damage(known, L, cur,
                       "%s record at layer %u head %u position "
                       "%llu fails its checksum",
                       cf_names[cf], layer, head, (unsigned long long)pos);
                continue;
            }
            int rc;
            if (cf == CF_INDEX) {
                kvs_segment_t *seg;
                char why[160] = "";
                rc = kvs_segment_decode(v + 4, vl - 4, &seg, why, sizeof why);
                if (rc) {
                    damage(known, L, cur,
                           "index record at layer %u head %u: %s", layer, head,
                           why);
                    continue;
                }
                rc = L->segment(L->ctx, id, layer, head, seg);
            } else {
                uint32_t n;
                if (vl < 8) {
                    damage(known, L, cur, "short kv record");
                    continue;
                }
                memcpy(&n, v + 4, 4);
                if (n == 0 || (vl - 8) % (2 * (size_t)n)) {
                    damage(known, L, cur,
                           "kv record at layer %u head %u has a "
                           "bad length",
                           layer, head);
                    continue;
                }
                size_t half = (vl - 8) / 2;
                rc = L->rows(L->ctx, id, layer, head, pos, n, half, v + 8,
                             v + 8 + half);
            }
            if (rc)
                damage(known, L, cur,
                       "%s record at layer %u head %u position "
                       "%llu does not fit: %s",
                       cf_names[cf], layer, head, (unsigned long long)pos,
                       kvs_strerror(rc));
        }
        char *rerr = NULL;
        rocksdb_iter_get_error(it, &rerr);
        rocksdb_iter_destroy(it);
        if (!rerr)
            break;
        /* The damaged block lies at or after the last key read (or at the
         * resume point): blame the first known sequence from there on. */
        size_t blame = resume;
        if (got_key) {
            size_t lo = 0, hi = known->n;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (known->ids[mid] < cur_id)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo > blame)
                blame = lo;
        }
        if (blame >= known->n) {
            /* Past every known sequence: only orphans are damaged. */
            rocksdb_free(rerr);
            break;
        }
        damage(known, L, (int)blame, "%s family: %s", cf_names[cf], rerr);
        rocksdb_free(rerr);
        /* Strictly forward: each restart passes at least one sequence. */
        resume = blame + 1;
        cur = -1;
        if (resume >= known->n)
            break;
    }
    if (n_orphans) {
        char *e2 = NULL;
        rocksdb_write(db->db, db->wo_nosync, orphans, &e2);
        take_err(e2, NULL, 0, "");
    }
    rocksdb_writebatch_destroy(orphans);
    return rc;
}

/* Delete the records of ids that have no metadata. One seek per distinct
 * id: the walk jumps over each id's records instead of reading them. */
static void sweep_orphans(kvs__db_t *db, int cf, const known_t *known) {
    rocksdb_iterator_t *it =
        rocksdb_create_iterator_cf(db->db, db->ro, db->cf[cf]);
    rocksdb_writebatch_t *b = rocksdb_writebatch_create();
    int n = 0;
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it);) {
        size_t kl;
        const unsigned char *k =
            (const unsigned char *)rocksdb_iter_key(it, &kl);
        if (kl < 8)
            break;
        uint64_t id = get_be64(k);
        unsigned char lo[8], hi[24];
        put_be64(lo, id);
        if (known_find(known, id) < 0) {
            size_t hl = 8;
            memset(hi, 0xff, sizeof hi);
            if (id != UINT64_MAX)
                put_be64(hi, id + 1);
            else
                hl = 24;
            rocksdb_writebatch_delete_range_cf(b, db->cf[cf], (const char *)lo,
                                               8, (const char *)hi, hl);
            n++;
        }
        if (id == UINT64_MAX)
            break;
        put_be64(lo, id + 1);
        rocksdb_iter_seek(it, (const char *)lo, 8);
    }
    /* A damaged block stops the sweep: sequences were already judged. */
    char *rerr = NULL;
    rocksdb_iter_get_error(it, &rerr);
    if (rerr)
        rocksdb_free(rerr);
    rocksdb_iter_destroy(it);
    if (n)
        db_write(db, db->wo_nosync, b, NULL, 0, "orphan sweep");
    rocksdb_writebatch_destroy(b);
}

int kvs__db_load(kvs__db_t *db, const kvs__db_loader_t *L, char *err,
                 size_t errlen) {
    known_t known = {0};
    rocksdb_iterator_t *it =
        rocksdb_create_iterator_cf(db->db, db->ro, db->cf[CF_SEQS]);
    int rc = 0;
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it) && !rc;
         rocksdb_iter_next(it)) {
        size_t kl, vl;
        const unsigned char *k =
            (const unsigned char *)rocksdb_iter_key(it, &kl);
        const unsigned char *v =
            (const unsigned char *)rocksdb_iter_value(it, &vl);
        if (kl != 8)
            continue;
        if (known.n == known.cap) {
            size_t cap = known.cap ? known.cap * 2 : 64;
            uint64_t *ids = realloc(known.ids, cap * sizeof *ids);
            uint8_t *dm = ids ? realloc(known.damaged, cap) : NULL;
            if (!ids || !dm) {
                if (ids)
                    known.ids = ids;
                rc = KVS_ENOMEM;
                break;
            }
            known.ids = ids;
            known.damaged = dm;
            known.cap = cap;
        }
        uint64_t id = get_be64(k);
        known.ids[known.n] = id;
        known.damaged[known.n] = 0;
        known.n++;
        kvs_geometry_t g;
        uint32_t f[7], crc;
        if (vl != 32 ||
            (memcpy(&crc, v, 4), memcpy(f, v + 4, 28),
             crc != kvs_crc32c(0, v + 4, 28)) ||
            f[0] != SEQ_VERSION) {
            /* Still announce it, so it can be listed and dropped. */
            g = (kvs_geometry_t){1, 1, 1, 1, KVS_DTYPE_F32};
            L->seq(L->ctx, id, &g, 0);
            damage(&known, L, (int)known.n - 1,
                   "sequence metadata fails its checksum");
            continue;
        }
        g = (kvs_geometry_t){f[1], f[2], f[3], f[4], (kvs_dtype_t)f[5]};
        if (L->seq(L->ctx, id, &g, f[6])) {
            g = (kvs_geometry_t){1, 1, 1, 1, KVS_DTYPE_F32};
            L->seq(L->ctx, id, &g, 0);
            damage(&known, L, (int)known.n - 1, "bad sequence geometry");
        }
    }
    char *rerr = NULL;
    rocksdb_iter_get_error(it, &rerr);
    rocksdb_iter_destroy(it);
    if (!rc)
        rc = take_err(rerr, err, errlen, "sequence metadata");
    else if (rerr)
        rocksdb_free(rerr);
    /* One sequence at a time (seeking to its prefix), segments first, then
     * the rows after them; a budget can evict between sequences. */
    for (size_t i = 0; i < known.n && !rc; i++) {
        known_t one = {&known.ids[i], &known.damaged[i], 1, 1};
        rc = load_records(db, CF_INDEX, &one, L, 1, err, errlen);
        if (!rc)
            rc = load_records(db, CF_KV, &one, L, 1, err, errlen);
        if (!rc && L->loaded)
            L->loaded(L->ctx, known.ids[i]);
    }
    for (int cf = CF_KV; cf <= CF_INDEX && !rc; cf++)
        sweep_orphans(db, cf, &known);
    free(known.ids);
    free(known.damaged);
    return rc;
}

int kvs__db_load_seq(kvs__db_t *db, uint64_t id, const kvs__db_loader_t *L,
                     char *err, size_t errlen) {
    uint8_t damaged = 0;
    known_t known = {&id, &damaged, 1, 1};
    int rc = load_records(db, CF_INDEX, &known, L, 1, err, errlen);
    if (!rc)
        rc = load_records(db, CF_KV, &known, L, 1, err, errlen);
    return rc;
}

uint64_t kvs__db_disk_bytes(kvs__db_t *db) {
    DIR *d = opendir(db->dir);
    if (!d)
        return 0;
    uint64_t total = 0;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d))) {
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", db->dir, e->d_name);
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode))
            total += (uint64_t)st.st_size;
    }
    closedir(d);
    return total;
}

int kvs__db_check_format(kvs__db_t *db, const kvs__db_format_t *f, char *err,
                         size_t errlen) {
    static const char key[] = "kvstore-format";
    /* crc, version, segment_tokens, sink_tokens, window_tokens */
    uint32_t want[5] = {0, 1u, f->segment_tokens, f->sink_tokens,
                        f->window_tokens};
    want[0] = kvs_crc32c(0, want + 1, sizeof want - 4);
    char *rerr = NULL;
    size_t vl = 0;
    char *v = rocksdb_get_cf(db->db, db->ro, db->cf[CF_DEFAULT], key,
                             sizeof key - 1, &vl, &rerr);
    int rc = take_err(rerr, err, errlen, "format record");
    if (rc)
        return rc;
    if (!v) {
        rocksdb_writebatch_t *b = rocksdb_writebatch_create();
        rocksdb_writebatch_put_cf(b, db->cf[CF_DEFAULT], key, sizeof key - 1,
                                  (const char *)want, sizeof want);
        rc = write_durable(db, b, err, errlen);
        rocksdb_writebatch_destroy(b);
        return rc;
    }
    uint32_t have[5] = {0};
    if (vl == sizeof have)
        memcpy(have, v, sizeof have);
    rocksdb_free(v);
    if (vl != sizeof have ||
        have[0] != kvs_crc32c(0, have + 1, sizeof have - 4)) {
        snprintf(err, errlen, "format record is damaged");
        return KVS_ECORRUPT;
    }
    if (have[1] != 1u) {
        snprintf(err, errlen, "unknown storage format version %u", have[1]);
        return KVS_ECORRUPT;
    }
    /* Stored rows are split at multiples of the segment size, and stored
     * segments carry adjustment tables for the sink and window sizes. */
    static const char *const names[3] = {"segment_tokens", "sink_tokens",
                                         "window_tokens"};
    for (int i = 0; i < 3; i++)
        if (have[2 + i] != want[2 + i]) {
            snprintf(err, errlen,
                     "the data directory was created with "
                     "%s %u, not %u",
                     names[i], have[2 + i], want[2 + i]);
            return KVS_EINVAL;
        }
    return 0;
}

void kvs__db_compact(kvs__db_t *db) {
    for (int cf = 0; cf < CF_COUNT; cf++)
        rocksdb_compact_range_cf(db->db, db->cf[cf], NULL, 0, NULL, 0);
}
