/*
 * persist.c: the RocksDB store of a data directory (see persist_int.h for the
 * layout). RocksDB is reached through its C API only; every errptr it
 * returns is turned into a KVS_E* code and a message here.
 *
 * Sync modes: ALWAYS writes each batch with WriteOptions.sync; NONE never
 * syncs; BATCH writes without sync and then group-commits: one fsync of the
 * WAL (FlushWAL(sync)) covers every batch written before it (see
 * write_durable). ASYNC queues writes for one writer thread (see
 * submit).
 */
#include "persist_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include <unistd.h>

#define SEQ_VERSION 1u

/* Storage format (the format record): 1 before K/V blocks were stored
 * apart from segment metadata (CF_BLOCKS), 2 since. A version-1 store is
 * opened as it is and its record rewritten to 2: its segment records (K/V
 * inside) are still read, new segments are written split, and a binary
 * that knows only version 1 refuses the directory from then on. */
#define FORMAT_VERSION 2u

enum { CF_DEFAULT, CF_SEQS, CF_KV, CF_INDEX, CF_BLOCKS, CF_COUNT };
static const char *const cf_names[CF_COUNT] = {"default", "seqs", "kv", "index",
                                               "blocks"};

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
    /* The first write error (KVS_ENOSPC, KVS_EIO...), 0 while none:
     * RocksDB is read-only from then on, and syncing its WAL again would
     * trip an assertion in some builds. */
    atomic_int failed;
    int sync_err;
    int private_umask;         /* holds a private_files_begin() */
    int opened;                /* passed every check at open */
    struct open_dir_s *listed; /* in open_dirs while open */
    struct timespec last_sync;
    /* Write numbering, and KVS_SYNC_ASYNC's queue (see submit). q_mu is a
     * leaf: nothing is taken under it; it may be waited on under any
     * engine lock, since the writer takes none. */
    pthread_mutex_t q_mu;
    pthread_cond_t q_work; /* pending writes or stopping */
    pthread_cond_t q_done; /* persisted moved, or the writer failed */
    /* Pending writes: a FIFO of batches, the last one open for filling.
     * A batch is closed once it holds QB_TARGET bytes, and written ones
     * are cleared and kept (q_free, up to q_keep_bytes of capacity), so
     * a burst of appends is copied once into warm memory, not into one
     * string that regrows (a copy of all it holds at each doubling) over
     * freshly faulted pages. */
    struct qbatch_s *q_head, *q_tail, *q_free;
    uint64_t q_free_bytes, q_keep_bytes;
    size_t qb_target;
    uint64_t pending_n, pending_bytes;
    uint64_t queued, persisted; /* tickets */
    uint64_t unpersisted;       /* bytes pending or being written */
    uint64_t max_unpersisted;
    uint64_t groups, lag_waits;
    int q_failed; /* the writer's error: everything after persisted lost */
    int q_stop, writer_running;
    pthread_t writer;
    /* Cleared batches for the synchronous modes (under q_mu): a batch
     * keeps its buffer's capacity, so an append's records are copied into
     * warm memory instead of a fresh, growing string (page faults and
     * regrowth copies, per append). */
    rocksdb_writebatch_t *free_batches[4];
    int n_free_batches;
    kvs_log_fn log;
    void *log_ctx;
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

/* ---------------------------------------------------------------------- */
/* Checking the directory before RocksDB reads it                         */
/*
 * RocksDB forgives damage to its own metadata in ways that lose data: a
 * MANIFEST record whose length field is damaged in the last block reads as
 * a torn write, recovery stops there, and the table files the lost records
 * named are deleted as obsolete; without paranoid_checks a WAL record that
 * fails its CRC is skipped and replay goes on; a missing CURRENT makes a
 * new, empty database next to the old files. So before RocksDB opens the
 * directory we read what it will read, with the log format's own CRCs
 * (32 KiB blocks, 7-byte headers: masked CRC-32C, length, type), and
 * refuse with KVS_ECORRUPT and the file's name on any damage. The one
 * forgiven case is the tail of a log that a crash cut short (a record that
 * runs past the end of the file, or a last record missing its fragments):
 * it was never acknowledged.
 */

enum {
    LOG_BLOCK = 32768,
    LOG_HDR = 7,
    LOG_HDR_RECYCLED = 11, /* + log number; recycled WAL files only */
};

static uint32_t log_unmask(uint32_t m) {
    uint32_t r = m - 0xa282ead8u;
    return (r >> 17) | (r << 15);
}

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* A record whose length runs past the end of the file: a torn write, unless
 * a shorter length gives the stored CRC (then the length field itself was
 * damaged, and what follows it is not a tail). */
static int log_is_torn(const unsigned char *h, size_t avail, size_t hs) {
    /* avail: payload bytes present after the header */
    uint32_t want = log_unmask(get_le32(h));
    uint32_t c = kvs_crc32c(0, h + 6, hs - 6);
    if (c == want)
        return 0;
    for (size_t i = 0; i < avail; i++) {
        c = kvs_crc32c(c, h + hs + i, 1);
        if (c == want)
            return 0;
    }
    return 1;
}

/* Check every record of one RocksDB log file (MANIFEST or WAL) as its
 * reader will: 0, KVS_ECORRUPT with `why` said, or -errno. */
static int log_check(const char *path, char *why, size_t whylen) {
    int rc = 0;
    /* Records never cross a block: one block in memory at a time. */
    unsigned char *blk = malloc(LOG_BLOCK);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || !blk) {
        rc = fd < 0 ? -errno : KVS_ENOMEM;
        goto out;
    }
    int in_frag = 0;
    for (uint64_t base = 0;; base += LOG_BLOCK) {
        ssize_t got = pread(fd, blk, LOG_BLOCK, (off_t)base);
        if (got < 0) {
            rc = -errno;
            goto out;
        }
        size_t size = (size_t)got, off = 0;
        while (off < size) {
            size_t left = LOG_BLOCK - off;
            if (left < LOG_HDR) /* the writer pads a block's tail */
                break;
            if (size - off < LOG_HDR)
                break; /* header cut short by a crash (last block) */
            const unsigned char *h = blk + off;
            size_t len = (size_t)h[4] | (size_t)h[5] << 8;
            unsigned type = h[6];
            if (type == 0 && len == 0) {
                /* Preallocated space: the reader skips the rest of the
                 * block, so it must hold nothing. */
                for (size_t i = off; i < size; i++)
                    if (blk[i]) {
                        snprintf(why, whylen,
                                 "data after an empty record at offset "
                                 "%llu",
                                 (unsigned long long)(base + off));
                        rc = KVS_ECORRUPT;
                        goto out;
                    }
                break;
            }
            if (type < 1 || type > 9) {
                snprintf(why, whylen, "unknown record type %u at offset %llu",
                         type, (unsigned long long)(base + off));
                rc = KVS_ECORRUPT;
                goto out;
            }
            size_t hs = type >= 5 && type <= 8 ? LOG_HDR_RECYCLED : LOG_HDR;
            if (size - off < hs)
                break; /* header cut short by a crash */
            if (hs + len > left) {
                snprintf(why, whylen, "record at offset %llu crosses a block",
                         (unsigned long long)(base + off));
                rc = KVS_ECORRUPT;
                goto out;
            }
            if (hs + len > size - off) { /* runs past the end of the file */
                if (log_is_torn(h, size - off - hs, hs))
                    break; /* cut short by a crash: never acknowledged */
                snprintf(why, whylen, "record length damaged at offset %llu",
                         (unsigned long long)(base + off));
                rc = KVS_ECORRUPT;
                goto out;
            }
            if (log_unmask(get_le32(h)) != kvs_crc32c(0, h + 6, hs - 6 + len)) {
                snprintf(why, whylen,
                         "record at offset %llu fails its checksum",
                         (unsigned long long)(base + off));
                rc = KVS_ECORRUPT;
                goto out;
            }
            /* Fragments: full | first middle* last (recycled: +4). */
            unsigned kind = type >= 5 && type <= 8 ? type - 4 : type;
            if (kind == 9) {
                /* A settings record (WAL compression): not in a batch. */
            } else if ((kind == 1 || kind == 2) == in_frag) {
                snprintf(why, whylen, "broken record chain at offset %llu",
                         (unsigned long long)(base + off));
                rc = KVS_ECORRUPT;
                goto out;
            } else {
                in_frag = kind == 2 || kind == 3;
            }
            off += hs + len;
        }
        if (size < LOG_BLOCK)
            break; /* the last block; a record missing its last fragments
                    * is a torn write too */
    }
out:
    free(blk);
    if (fd >= 0)
        close(fd);
    return rc;
}

/* RocksDB's numbered files: digits then `suffix`. */
static int numbered(const char *name, const char *suffix) {
    size_t i = 0;
    while (name[i] >= '0' && name[i] <= '9')
        i++;
    return i > 0 && strcmp(name + i, suffix) == 0;
}

static int check_log_file(const char *dir, const char *name, char *err,
                          size_t errlen) {
    char path[4096], why[160] = "";
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = log_check(path, why, sizeof why);
    if (rc == KVS_ECORRUPT)
        snprintf(err, errlen, "%s is damaged: %s", name, why);
    else if (rc == -ENOENT)
        snprintf(err, errlen, "%s is missing", name);
    else if (rc)
        snprintf(err, errlen, "cannot read %s: %s", name, kvs_strerror(rc));
    return rc == -ENOENT ? KVS_ECORRUPT : rc;
}

/* What RocksDB will trust at open: CURRENT names an existing MANIFEST,
 * and the MANIFEST and every WAL pass their record CRCs. An empty
 * directory is a new store. */
static int dir_check(const char *dir, char *err, size_t errlen) {
    DIR *d = opendir(dir);
    if (!d) {
        int e = errno;
        snprintf(err, errlen, "cannot read %s: %s", dir, strerror(e));
        return -e;
    }
    int rc = 0, have_current = 0;
    const char *store_file = NULL; /* a file only an opened store writes */
    char name[256] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, "CURRENT"))
            have_current = 1;
        else if (numbered(e->d_name, ".sst") || numbered(e->d_name, ".log") ||
                 !strncmp(e->d_name, "OPTIONS-", 8))
            snprintf(name, sizeof name, "%s", store_file = e->d_name);
    }
    if (!have_current) {
        if (store_file) {
            /* RocksDB would start an empty store beside the old files and
             * then delete them as obsolete. */
            snprintf(err, errlen,
                     "CURRENT is missing, yet the directory holds a store "
                     "(%s)",
                     name);
            rc = KVS_ECORRUPT;
        }
        goto out;
    }
    char path[4096], cur[64] = "";
    snprintf(path, sizeof path, "%s/CURRENT", dir);
    FILE *f = fopen(path, "rb");
    size_t n = 0;
    if (f) {
        n = fread(cur, 1, sizeof cur - 1, f);
        fclose(f);
    }
    cur[n] = 0;
    size_t digits = 0;
    if (n > 9 && !strncmp(cur, "MANIFEST-", 9))
        while (cur[9 + digits] >= '0' && cur[9 + digits] <= '9')
            digits++;
    if (!f || digits == 0 || n != 9 + digits + 1 || cur[n - 1] != '\n') {
        snprintf(err, errlen, "CURRENT is damaged (it must name a MANIFEST)");
        rc = KVS_ECORRUPT;
        goto out;
    }
    cur[n - 1] = 0;
    if ((rc = check_log_file(dir, cur, err, errlen)))
        goto out;
    /* The WALs RocksDB replays (older ones are skipped, and deleted: a
     * damaged one refuses the open too, as nothing says it is old). */
    rewinddir(d);
    while ((e = readdir(d)))
        if (numbered(e->d_name, ".log") &&
            (rc = check_log_file(dir, e->d_name, err, errlen)))
            goto out;
out:
    closedir(d);
    return rc;
}

/* A block-based table ends in a footer: checksum type, the metaindex and
 * index block handles (varints, padded to 40 bytes), format version and
 * magic. A damaged footer or index handle fails the table's open, which
 * RocksDB's iterators do not survive: check them here. */
enum { FOOTER_LEN = 53 };

static int get_varint64(const unsigned char **p, const unsigned char *end,
                        uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        unsigned char b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 0;
    }
    return -1;
}

static int table_footer_check(const char *path, uint64_t size, char *why,
                              size_t whylen) {
    unsigned char ft[FOOTER_LEN];
    if (size < FOOTER_LEN) {
        snprintf(why, whylen, "too short for a table");
        return KVS_ECORRUPT;
    }
    FILE *f = fopen(path, "rb");
    if (!f)
        return -errno;
    int ok = fseeko(f, (off_t)(size - FOOTER_LEN), SEEK_SET) == 0 &&
             fread(ft, 1, FOOTER_LEN, f) == FOOTER_LEN;
    fclose(f);
    if (!ok)
        return KVS_EIO;
    uint64_t magic = 0;
    for (int i = 7; i >= 0; i--)
        magic = magic << 8 | ft[45 + i];
    if (magic != 0x88e241b785f4cff7ull) {
        snprintf(why, whylen, "bad table magic number");
        return KVS_ECORRUPT;
    }
    uint32_t version = get_le32(ft + 41);
    const unsigned char *p = ft + 1, *end = ft + 41;
    uint64_t h[4];
    int bad = ft[0] > 4 || version < 1 || version > 5;
    for (int i = 0; i < 4 && !bad; i++)
        bad = get_varint64(&p, end, &h[i]) != 0;
    /* Each block is followed by a 5-byte trailer (type, checksum). */
    for (int i = 0; i < 4 && !bad; i += 2)
        bad = h[i] > size || h[i + 1] > size ||
              h[i] + h[i + 1] + 5 > size - FOOTER_LEN;
    if (bad) {
        snprintf(why, whylen, "bad table footer");
        return KVS_ECORRUPT;
    }
    return 0;
}

static int db_sync_wal(kvs__db_t *db);
static void stop_writer(kvs__db_t *db);

/* The MANIFEST's table files, checked against the directory before anything
 * reads them: RocksDB (without paranoid_checks) opens with a table missing
 * or cut short, and its first read then aborts on an assertion. Each table
 * must exist with the size the MANIFEST gives and end in a block-based
 * table footer whose block handles lie inside it. */
static int tables_check(rocksdb_t *rdb, const char *dir, char *err,
                        size_t errlen) {
    const rocksdb_livefiles_t *lf = rocksdb_livefiles(rdb);
    if (!lf)
        return 0;
    int rc = 0, n = rocksdb_livefiles_count(lf);
    for (int i = 0; i < n && !rc; i++) {
        const char *name = rocksdb_livefiles_name(lf, i);
        size_t want = rocksdb_livefiles_size(lf, i);
        name += name[0] == '/';
        char path[4096], why[160] = "";
        snprintf(path, sizeof path, "%s/%s", dir, name);
        struct stat st;
        if (stat(path, &st)) {
            int e = errno;
            if (e == ENOENT) {
                snprintf(err, errlen, "table file %s is missing", name);
                rc = KVS_ECORRUPT;
            } else {
                snprintf(err, errlen, "cannot stat %s: %s", name, strerror(e));
                rc = -e;
            }
        } else if ((uint64_t)st.st_size != want) {
            snprintf(err, errlen,
                     "table file %s holds %lld bytes, the MANIFEST says %zu",
                     name, (long long)st.st_size, want);
            rc = KVS_ECORRUPT;
        } else if ((rc = table_footer_check(path, want, why, sizeof why))) {
            if (rc == KVS_ECORRUPT)
                snprintf(err, errlen, "table file %s is damaged: %s", name,
                         why);
            else
                snprintf(err, errlen, "cannot read %s: %s", name,
                         kvs_strerror(rc));
        }
    }
    rocksdb_livefiles_destroy(lf);
    return rc;
}

/* RocksDB opens without complaint when a WAL is missing or cut short, or
 * when a MANIFEST cut short (read as a torn write) no longer lists tables
 * that hold data, which it then deletes as obsolete. A clean close writes
 * what it leaves, CLOSED_FILE: the last sequence number and every live
 * table with its size, under a CRC. The next open must find all of it
 * (a later sequence, every table live at that size) and removes the file
 * once open: after a crash there is none, and these losses cannot be told
 * from the crash's own. */
#define CLOSED_FILE "KVSTORE-CLOSED"

static void closed_write(kvs__db_t *db) {
    char path[4096], tmp[4096];
    snprintf(path, sizeof path, "%s/" CLOSED_FILE, db->dir);
    snprintf(tmp, sizeof tmp, "%s/" CLOSED_FILE ".tmp", db->dir);
    const rocksdb_livefiles_t *lf = rocksdb_livefiles(db->db);
    int n = lf ? rocksdb_livefiles_count(lf) : 0;
    size_t cap = 64 + (size_t)n * 96, len = 0;
    char *buf = malloc(cap);
    if (buf) {
        len += (size_t)snprintf(
            buf + len, cap - len, "kvstore-closed 1\nseq %llu\n",
            (unsigned long long)rocksdb_get_latest_sequence_number(db->db));
        for (int i = 0; i < n && len < cap; i++) {
            const char *name = rocksdb_livefiles_name(lf, i);
            len += (size_t)snprintf(buf + len, cap - len, "table %.64s %zu\n",
                                    name + (name[0] == '/'),
                                    rocksdb_livefiles_size(lf, i));
        }
    }
    if (lf)
        rocksdb_livefiles_destroy(lf);
    if (!buf || len + 16 > cap) {
        free(buf);
        return; /* no record: the next open checks less, that is all */
    }
    len += (size_t)snprintf(buf + len, cap - len, "crc %08x\n",
                            kvs_crc32c(0, buf, len));
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len && fflush(f) == 0 &&
             fsync(fileno(f)) == 0;
    if (f)
        ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path))
        unlink(tmp);
    free(buf);
}

static int closed_check(rocksdb_t *rdb, const char *dir, char *err,
                        size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/" CLOSED_FILE, dir);
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0; /* not closed cleanly since the last open */
    char *buf = NULL;
    struct stat st;
    size_t len = 0;
    if (fstat(fileno(f), &st) == 0 && st.st_size < (64 << 20) &&
        (buf = malloc((size_t)st.st_size + 1)))
        len = fread(buf, 1, (size_t)st.st_size, f);
    fclose(f);
    if (!buf)
        return KVS_ENOMEM;
    buf[len] = 0;
    int rc = 0;
    const rocksdb_livefiles_t *lf = NULL;
    char *crc_at = strstr(buf, "crc ");
    unsigned crc = 0;
    unsigned long long want = 0;
    if (!crc_at || sscanf(crc_at, "crc %8x", &crc) != 1 ||
        crc != kvs_crc32c(0, buf, (size_t)(crc_at - buf)) ||
        sscanf(buf, "kvstore-closed 1\nseq %llu\n", &want) != 1) {
        snprintf(err, errlen, CLOSED_FILE " is damaged (remove it to open)");
        rc = KVS_ECORRUPT;
        goto out;
    }
    uint64_t have = rocksdb_get_latest_sequence_number(rdb);
    if (have < want) {
        snprintf(err, errlen,
                 "a WAL is missing or cut short: the store was closed at "
                 "sequence %llu, only %llu are there (" CLOSED_FILE ")",
                 want, (unsigned long long)have);
        rc = KVS_ECORRUPT;
        goto out;
    }
    lf = rocksdb_livefiles(rdb);
    int n = lf ? rocksdb_livefiles_count(lf) : 0;
    for (char *p = strstr(buf, "\ntable "); p && p < crc_at && !rc;
         p = strstr(p + 1, "\ntable ")) {
        char name[80];
        size_t size;
        if (sscanf(p, "\ntable %79s %zu", name, &size) != 2)
            break;
        int live = 0;
        for (int i = 0; i < n && !live; i++) {
            const char *ln = rocksdb_livefiles_name(lf, i);
            live = !strcmp(ln + (ln[0] == '/'), name) &&
                   rocksdb_livefiles_size(lf, i) == size;
        }
        if (!live) {
            snprintf(err, errlen,
                     "the MANIFEST no longer lists table file %s, which "
                     "held data at the last clean close (" CLOSED_FILE ")",
                     name);
            rc = KVS_ECORRUPT;
        }
    }
out:
    if (lf)
        rocksdb_livefiles_destroy(lf);
    free(buf);
    return rc;
}

/* Files only the store's user may read (they hold users' contexts).
 * RocksDB creates its files 0644 less the umask and takes no mode, and
 * creates them from its own threads for as long as the store is open, so
 * the process umask denies group and others while any store is open (a
 * chmod after open would miss every later table and log). */
static pthread_mutex_t umask_mu = PTHREAD_MUTEX_INITIALIZER;
static int umask_users;
static mode_t umask_saved;

static void private_files_begin(void) {
    pthread_mutex_lock(&umask_mu);
    if (umask_users++ == 0) {
        umask_saved = umask(077);
        umask(umask_saved | 077);
    }
    pthread_mutex_unlock(&umask_mu);
}

static void private_files_end(void) {
    pthread_mutex_lock(&umask_mu);
    if (--umask_users == 0)
        umask(umask_saved);
    pthread_mutex_unlock(&umask_mu);
}

/* Stores written before the umask rule: tighten what is there. */
static void private_files_fix(const char *dir) {
    struct stat st;
    if (stat(dir, &st) || st.st_uid != geteuid())
        return;
    if ((st.st_mode & 0777) != 0700)
        chmod(dir, 0700);
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d))) {
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (lstat(path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 077))
            chmod(path, st.st_mode & 0700);
    }
    closedir(d);
}

/* The records whose damage refuses the open (the format record, the
 * sequences' metadata) must be readable before the read-write open, which
 * would already have rewritten RocksDB's own files. */
static int meta_check(rocksdb_t *rdb, rocksdb_column_family_handle_t **cf,
                      char *err, size_t errlen) {
    static const char key[] = "kvstore-format";
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(ro, 1);
    rocksdb_readoptions_set_fill_cache(ro, 0);
    char *rerr = NULL;
    size_t vl;
    rocksdb_free(rocksdb_get_cf(rdb, ro, cf[CF_DEFAULT], key, sizeof key - 1,
                                &vl, &rerr));
    int rc = take_err(rerr, err, errlen, "format record");
    if (!rc) {
        rocksdb_iterator_t *it =
            rocksdb_create_iterator_cf(rdb, ro, cf[CF_SEQS]);
        for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it);
             rocksdb_iter_next(it))
            ;
        rocksdb_iter_get_error(it, &rerr);
        rocksdb_iter_destroy(it);
        rc = take_err(rerr, err, errlen, "sequence metadata");
    }
    rocksdb_readoptions_destroy(ro);
    /* A block that cannot be read is damage, whatever RocksDB calls it. */
    return rc == KVS_EIO ? KVS_ECORRUPT : rc;
}

/* What RocksDB's open would trust without looking, looked at through a
 * read-only open first (it reads the MANIFEST and replays the WALs into
 * memory, and writes nothing): a refused open leaves the directory as it
 * was. A new store has nothing to check. */
static int open_check(const rocksdb_options_t *o, const char *dir, char *err,
                      size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/CURRENT", dir);
    if (access(path, F_OK))
        return 0; /* dir_check allowed it: an empty directory */
    const rocksdb_options_t *cfo[CF_COUNT] = {o, o, o, o, o};
    rocksdb_column_family_handle_t *cf[CF_COUNT] = {NULL};
    char *rerr = NULL;
    /* A format-1 store has no blocks family yet (the read-write open
     * creates it): a read-only open must not ask for it. */
    int n_cf = CF_COUNT;
    size_t listed = 0;
    char **names = rocksdb_list_column_families(o, dir, &listed, &rerr);
    if (rerr) {
        rocksdb_free(rerr);
        rerr = NULL;
    } else {
        n_cf = CF_BLOCKS;
        for (size_t i = 0; i < listed; i++)
            if (!strcmp(names[i], cf_names[CF_BLOCKS]))
                n_cf = CF_COUNT;
        rocksdb_list_column_families_destroy(names, listed);
    }
    rocksdb_t *rdb = rocksdb_open_for_read_only_column_families(
        o, dir, n_cf, cf_names, cfo, cf, 0, &rerr);
    if (rerr && strstr(rerr, "Column family not found")) {
        /* Every store has the first four: the MANIFEST lost their
         * records. */
        char cur[64] = "the MANIFEST";
        FILE *f = fopen(path, "rb");
        if (f) {
            if (!fgets(cur, sizeof cur, f))
                snprintf(cur, sizeof cur, "the MANIFEST");
            cur[strcspn(cur, "\n")] = 0;
            fclose(f);
        }
        snprintf(err, errlen, "%s is damaged: %s", cur, rerr);
        rocksdb_free(rerr);
        return KVS_ECORRUPT;
    }
    int rc = take_err(rerr, err, errlen, "cannot open the database");
    if (rc)
        return rc;
    if (!(rc = tables_check(rdb, dir, err, errlen)))
        rc = closed_check(rdb, dir, err, errlen);
    if (!rc)
        rc = meta_check(rdb, cf, err, errlen);
    for (int i = 0; i < n_cf; i++)
        rocksdb_column_family_handle_destroy(cf[i]);
    rocksdb_close(rdb);
    return rc;
}

/* The checks before RocksDB's open read files that a store open elsewhere
 * is changing (its WAL grows, compactions delete tables), and would call
 * that damage: a directory in use is refused first, as RocksDB would
 * (KVS_ELOCKED). In this process, by a list of open directories: closing
 * any descriptor of LOCK here would drop RocksDB's lock on it. In another,
 * by asking for the lock RocksDB holds on LOCK (fcntl, whole file). */
typedef struct open_dir_s {
    dev_t dev;
    ino_t ino;
    pid_t pid; /* entries a fork inherits are its parent's */
    struct open_dir_s *next;
} open_dir_t;

static pthread_mutex_t open_mu = PTHREAD_MUTEX_INITIALIZER;
static open_dir_t *open_dirs;

static int in_use(const char *dir, char *err, size_t errlen) {
    struct stat st;
    if (stat(dir, &st))
        return 0; /* the open reports it */
    int here = 0;
    pthread_mutex_lock(&open_mu);
    for (open_dir_t *o = open_dirs; o && !here; o = o->next)
        here = o->dev == st.st_dev && o->ino == st.st_ino && o->pid == getpid();
    pthread_mutex_unlock(&open_mu);
    if (here) {
        snprintf(err, errlen, "%s is open in this process already", dir);
        return KVS_ELOCKED;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/LOCK", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    int held = fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
    close(fd);
    if (held) {
        snprintf(err, errlen, "%s is locked by process %d", dir, (int)fl.l_pid);
        return KVS_ELOCKED;
    }
    return 0;
}

static void open_dir_add(kvs__db_t *db) {
    struct stat st;
    open_dir_t *o = malloc(sizeof *o);
    if (!o || stat(db->dir, &st)) {
        free(o);
        return;
    }
    o->dev = st.st_dev;
    o->ino = st.st_ino;
    o->pid = getpid();
    pthread_mutex_lock(&open_mu);
    o->next = open_dirs;
    open_dirs = o;
    pthread_mutex_unlock(&open_mu);
    db->listed = o;
}

static void open_dir_remove(kvs__db_t *db) {
    pthread_mutex_lock(&open_mu);
    for (open_dir_t **p = &open_dirs; *p; p = &(*p)->next)
        if (*p == db->listed) {
            *p = db->listed->next;
            break;
        }
    pthread_mutex_unlock(&open_mu);
    free(db->listed);
    db->listed = NULL;
}

__attribute__((format(printf, 3, 4))) static void
db_log(kvs__db_t *db, int level, const char *fmt, ...) {
    if (!db->log)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    db->log(db->log_ctx, level, msg);
}

int kvs__db_open(const char *dir, kvs_sync_t sync, uint32_t interval_ms,
                 kvs__db_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (mkdir(dir, 0700) && errno != EEXIST) {
        int e = errno;
        snprintf(err, errlen, "cannot create %s: %s", dir, strerror(e));
        return -e;
    }
    int rc = in_use(dir, err, errlen);
    if (!rc)
        rc = dir_check(dir, err, errlen);
    if (rc)
        return rc;
    kvs__db_t *db = calloc(1, sizeof *db);
    if (!db)
        return KVS_ENOMEM;
    private_files_begin();
    db->private_umask = 1;
    private_files_fix(dir);
    db->sync = sync;
    db->interval_ms = interval_ms;
    pthread_mutex_init(&db->mu, NULL);
    pthread_cond_init(&db->synced_cv, NULL);
    pthread_mutex_init(&db->q_mu, NULL);
    pthread_cond_init(&db->q_work, NULL);
    pthread_cond_init(&db->q_done, NULL);
    if (!(db->dir = strdup(dir))) {
        rc = KVS_ENOMEM;
        goto err;
    }

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
    /* Not paranoid: one damaged table block must not keep the whole
     * directory from opening. Every record carries its own CRC and reads
     * verify block checksums, so damage still surfaces, per sequence.
     * What paranoid_checks would also guard (the MANIFEST, the WALs, table
     * files' presence and sizes) dir_check and tables_check do. */
    rocksdb_options_set_paranoid_checks(o, 0);
    /* The intent (a torn tail is forgiven, nothing else); without
     * paranoid_checks RocksDB reports no WAL corruption whatever the mode,
     * so dir_check's WAL check is what refuses. */
    rocksdb_options_set_wal_recovery_mode(
        o, rocksdb_tolerate_corrupted_tail_records_recovery);
    if ((rc = open_check(o, dir, err, errlen)))
        goto err;
    const rocksdb_options_t *cfo[CF_COUNT] = {o, o, o, o, o};
    char *rerr = NULL;
    db->db = rocksdb_open_column_families(o, dir, CF_COUNT, cf_names, cfo,
                                          db->cf, &rerr);
    if ((rc = take_err(rerr, err, errlen, "cannot open the database"))) {
        db->db = NULL;
        goto err;
    }
    /* It described the directory before this open; the next clean close
     * writes it anew. */
    char path[4096];
    snprintf(path, sizeof path, "%s/" CLOSED_FILE, dir);
    unlink(path);
    open_dir_add(db);
    db->wo = rocksdb_writeoptions_create();
    /* ASYNC's writer fsyncs each batch it writes (see submit). */
    rocksdb_writeoptions_set_sync(db->wo, sync == KVS_SYNC_ALWAYS ||
                                              sync == KVS_SYNC_ASYNC);
    db->wo_nosync = rocksdb_writeoptions_create();
    db->ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(db->ro, 1);
    rocksdb_readoptions_set_fill_cache(db->ro, 0);
    db->opened = 1;
    *out = db;
    return 0;
err:
    kvs__db_close(db);
    return rc;
}

/* One batch of KVS_SYNC_ASYNC's queue (see submit). */
typedef struct qbatch_s {
    rocksdb_writebatch_t *b;
    size_t peak; /* the most it held: a lower bound of its capacity */
    struct qbatch_s *next;
} qbatch_t;

/* A closed batch is written as it is: past qb_target bytes (QB_TARGET,
 * or KVS_QUEUE_BATCH_BYTES in the environment at open) the next write
 * opens another (one write larger than that still goes in one batch). */
#define QB_TARGET (8u << 20)

static size_t qbatch_size(const qbatch_t *q) {
    size_t n;
    rocksdb_writebatch_data(q->b, &n);
    return n;
}

static void qbatch_free_all(qbatch_t *q) {
    while (q) {
        qbatch_t *next = q->next;
        rocksdb_writebatch_destroy(q->b);
        free(q);
        q = next;
    }
}

int kvs__db_close(kvs__db_t *db) {
    if (!db)
        return 0;
    int rc = 0;
    /* Write out the queue first: close drains, it never drops. */
    stop_writer(db);
    if (db->q_failed)
        rc = db->q_failed;
    qbatch_free_all(db->q_head);
    qbatch_free_all(db->q_free);
    db->q_head = db->q_tail = db->q_free = NULL;
    for (int i = 0; i < db->n_free_batches; i++)
        rocksdb_writebatch_destroy(db->free_batches[i]);
    db->n_free_batches = 0;
    if (db->db) {
        /* Make everything acknowledged so far durable before closing. */
        int src = db_sync_wal(db);
        if (!rc)
            rc = src;
        /* No flush or compaction may change the tables after this: the
         * record of them must be what the next open finds. */
        rocksdb_cancel_all_background_work(db->db, 1);
        if (!rc && db->opened)
            closed_write(db);
        for (int i = 0; i < CF_COUNT; i++)
            rocksdb_column_family_handle_destroy(db->cf[i]);
        /* After a failed write RocksDB's WAL writer asserts on any further
         * use, and closing the database flushes it: Debian builds RocksDB
         * with assertions, so the process would abort. Then the handle is
         * left (its background work is stopped): everything acknowledged
         * is already durable, and the directory stays locked by this
         * process until it exits. */
        if (!atomic_load(&db->failed))
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
    if (db->private_umask)
        private_files_end();
    if (db->listed && !atomic_load(&db->failed))
        open_dir_remove(db); /* a handle left open stays listed */
    pthread_cond_destroy(&db->synced_cv);
    pthread_mutex_destroy(&db->mu);
    pthread_cond_destroy(&db->q_work);
    pthread_cond_destroy(&db->q_done);
    pthread_mutex_destroy(&db->q_mu);
    free(db->dir);
    free(db);
    return rc;
}

/* The first write error, kept: later refusals say what it was (a full
 * disk is the one an operator can fix). */
static void write_failed(kvs__db_t *db, int rc) {
    int none = 0;
    atomic_compare_exchange_strong(&db->failed, &none, rc);
}

static int refused(kvs__db_t *db, char *err, size_t errlen, const char *what) {
    int rc = atomic_load(&db->failed);
    if (err && errlen)
        snprintf(err, errlen,
                 rc == KVS_ENOSPC
                     ? "%s: the disk is full: the store is read-only after "
                       "an earlier write error (free space, then restart)"
                     : "%s: the store is read-only after an earlier write "
                       "error (%s; restart)",
                 what, kvs_strerror(rc));
    return rc;
}

/* Every write goes through here: after one failure the database refuses
 * writes (RocksDB enters read-only mode) and reads go on serving. */
static int db_write(kvs__db_t *db, const rocksdb_writeoptions_t *wo,
                    rocksdb_writebatch_t *b, char *err, size_t errlen,
                    const char *what) {
    if (atomic_load(&db->failed))
        return refused(db, err, errlen, what);
    char *rerr = NULL;
    rocksdb_write(db->db, wo, b, &rerr);
    int rc = take_err(rerr, err, errlen, what);
    if (rc)
        write_failed(db, rc);
    return rc;
}

static int db_sync_wal(kvs__db_t *db) {
    if (atomic_load(&db->failed))
        return atomic_load(&db->failed);
    char *rerr = NULL;
    rocksdb_flush_wal(db->db, 1, &rerr);
    int rc = take_err(rerr, NULL, 0, "");
    if (rc)
        write_failed(db, rc);
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

/* ---------------------------------------------------------------------- */
/* Submitting writes; the write-behind queue (KVS_SYNC_ASYNC)             */
/*
 * Every write of the engine goes through submit(): its records are put into
 * a WriteBatch by a fill function. In the synchronous modes that batch is
 * the caller's own and is written at once (write_durable, or without the
 * fsync wait for a segment). With KVS_SYNC_ASYNC the records go into the
 * open batch of the pending FIFO under q_mu, in the order the engine makes
 * its writes, and the writer thread takes the whole FIFO at a time (a
 * group), writes its batches in order, each with WriteOptions.sync (one
 * fsync per batch of ~8 MiB: what is persisted is durable against power
 * loss too, and while the writer writes the next group fills), then
 * advances persisted.
 * A write is numbered (its ticket) when it joins the FIFO, so "ticket <=
 * persisted" is exactly "on disk", and since batches are written in ticket
 * order, the disk always holds a prefix of the writes made (a failed group
 * may leave a prefix of itself, never synced, never counted). Callers that must
 * be durable on return (metadata: create, drop, TTL, a fork's child) wait for
 * their ticket; appends and segments do not.
 */

typedef void (*fill_fn)(kvs__db_t *db, rocksdb_writebatch_t *b, void *ctx);

/* When submit returns. */
enum {
    SUBMIT_NOWAIT,  /* segments: no fsync wait in any mode */
    SUBMIT_MODE,    /* appends: durable as the mode says; ASYNC: queued */
    SUBMIT_DURABLE, /* metadata: durable in every mode, ASYNC included */
};

/* Wait until `ticket` is on disk; 0 or the error that lost it. Caller
 * holds q_mu. */
static int q_wait_locked(kvs__db_t *db, uint64_t ticket) {
    while (db->persisted < ticket && !db->q_failed)
        pthread_cond_wait(&db->q_done, &db->q_mu);
    return db->persisted >= ticket ? 0 : db->q_failed;
}

static void *writer_main(void *arg) {
    kvs__db_t *db = arg;
    char err[256];
    pthread_mutex_lock(&db->q_mu);
    for (;;) {
        while (!db->pending_n && !db->q_stop)
            pthread_cond_wait(&db->q_work, &db->q_mu);
        if (!db->pending_n)
            break; /* stopping, and everything queued is written */
        /* The whole queue is one group, its batches written in order,
         * each with WriteOptions.sync. Syncing only the last would make
         * persisted right (a synced write syncs every live WAL) but not
         * the prefix after a power loss: RocksDB does not sync a WAL when
         * a memtable switch starts the next one, so an unsynced tail of
         * the old WAL could be lost while a later batch in the new one
         * survived, and recovery (tolerating a torn tail) would replay
         * it: a hole in ticket order. One fsync per ~8 MiB batch costs
         * little beside writing the batch. */
        qbatch_t *group = db->q_head;
        db->q_head = db->q_tail = NULL;
        uint64_t hi = db->queued, bytes = db->pending_bytes;
        db->pending_bytes = 0;
        db->pending_n = 0;
        pthread_mutex_unlock(&db->q_mu);
        err[0] = 0;
        int rc = 0;
        for (qbatch_t *q = group; q; q = q->next) {
            if (!rc)
                rc =
                    db_write(db, db->wo, q->b, err, sizeof err, "queued write");
            size_t n = qbatch_size(q);
            q->peak = n > q->peak ? n : q->peak;
            rocksdb_writebatch_clear(q->b);
        }
        pthread_mutex_lock(&db->q_mu);
        /* Keep the cleared batches (their capacity is warm memory for the
         * next burst) up to q_keep_bytes, none that a huge write grew;
         * free the rest outside the lock. */
        qbatch_t *drop = NULL;
        for (qbatch_t *q = group, *next; q; q = next) {
            next = q->next;
            if (q->peak <= 2 * db->qb_target &&
                db->q_free_bytes + q->peak <= db->q_keep_bytes) {
                q->next = db->q_free;
                db->q_free = q;
                db->q_free_bytes += q->peak;
            } else {
                q->next = drop;
                drop = q;
            }
        }
        if (!rc) {
            db->persisted = hi;
            db->groups++;
        } else if (!db->q_failed) {
            /* Read-only from here: submit refuses, and what is queued now
             * (this group and any behind it) will never be written. */
            db->q_failed = rc;
            uint64_t lost = db->queued - db->persisted;
            uint64_t lost_bytes = db->unpersisted;
            db_log(db, KVS_LOG_ERROR,
                   "write-behind failed (%s): the %llu writes (%llu bytes) "
                   "acknowledged after persisted_seqno %llu are lost (a "
                   "prefix of them, written before the error, may still be "
                   "found after a restart); the store is read-only",
                   err[0] ? err : kvs_strerror(rc), (unsigned long long)lost,
                   (unsigned long long)lost_bytes,
                   (unsigned long long)db->persisted);
        }
        db->unpersisted -= bytes;
        pthread_cond_broadcast(&db->q_done);
        pthread_mutex_unlock(&db->q_mu);
        qbatch_free_all(drop);
        pthread_mutex_lock(&db->q_mu);
    }
    pthread_mutex_unlock(&db->q_mu);
    return NULL;
}

/* `bytes`: about what the records take (for the lag bound). `wait`: one
 * of SUBMIT_*. *ticket (may be NULL) gets the write's number. */
static int submit(kvs__db_t *db, fill_fn fill, void *ctx, uint64_t bytes,
                  int wait, uint64_t *ticket, char *err, size_t errlen,
                  const char *what) {
    int rc = 0;
    if (!db->writer_running) {
        rocksdb_writebatch_t *b = NULL;
        pthread_mutex_lock(&db->q_mu);
        if (db->n_free_batches)
            b = db->free_batches[--db->n_free_batches];
        pthread_mutex_unlock(&db->q_mu);
        if (!b && !(b = rocksdb_writebatch_create()))
            return KVS_ENOMEM;
        fill(db, b, ctx);
        rc = wait != SUBMIT_NOWAIT
                 ? write_durable(db, b, err, errlen)
                 : db_write(db, db->wo_nosync, b, err, errlen, what);
        /* Keep it unless it is huge (its memory would stay held). */
        size_t used;
        rocksdb_writebatch_data(b, &used);
        rocksdb_writebatch_clear(b);
        pthread_mutex_lock(&db->q_mu);
        if (used <= (64u << 20) &&
            db->n_free_batches <
                (int)(sizeof(db->free_batches) / sizeof(db->free_batches[0]))) {
            db->free_batches[db->n_free_batches++] = b;
            b = NULL;
        }
        pthread_mutex_unlock(&db->q_mu);
        if (b)
            rocksdb_writebatch_destroy(b);
        pthread_mutex_lock(&db->q_mu);
        if (!rc)
            db->persisted = ++db->queued;
        if (ticket)
            *ticket = db->queued;
        pthread_mutex_unlock(&db->q_mu);
        return rc;
    }
    pthread_mutex_lock(&db->q_mu);
    /* The lag bound: wait for the writer, never drop. A write larger than
     * the bound alone goes in once the queue is empty. */
    int waited = 0;
    while (!db->q_failed && db->unpersisted > 0 &&
           db->unpersisted + bytes > db->max_unpersisted) {
        waited = 1;
        pthread_cond_wait(&db->q_done, &db->q_mu);
    }
    db->lag_waits += waited;
    if (db->q_failed) {
        pthread_mutex_unlock(&db->q_mu);
        return refused(db, err, errlen, what);
    }
    if (!db->q_tail || qbatch_size(db->q_tail) >= db->qb_target) {
        qbatch_t *q = db->q_free;
        if (q) {
            db->q_free = q->next;
            db->q_free_bytes -= q->peak;
        } else if ((q = calloc(1, sizeof *q)) &&
                   !(q->b = rocksdb_writebatch_create())) {
            free(q);
            q = NULL;
        }
        if (!q) {
            pthread_mutex_unlock(&db->q_mu);
            if (err && errlen)
                snprintf(err, errlen, "%s: out of memory for the queue", what);
            return KVS_ENOMEM;
        }
        q->next = NULL;
        if (db->q_tail)
            db->q_tail->next = q;
        else
            db->q_head = q;
        db->q_tail = q;
    }
    fill(db, db->q_tail->b, ctx);
    uint64_t mine = ++db->queued;
    db->pending_n++;
    db->pending_bytes += bytes;
    db->unpersisted += bytes;
    if (ticket)
        *ticket = mine;
    pthread_cond_signal(&db->q_work);
    if (wait == SUBMIT_DURABLE && (rc = q_wait_locked(db, mine)))
        refused(db, err, errlen, what);
    pthread_mutex_unlock(&db->q_mu);
    return rc;
}

int kvs__db_start_writer(kvs__db_t *db, uint64_t max_unpersisted,
                         kvs_log_fn log, void *log_ctx) {
    db->log = log;
    db->log_ctx = log_ctx;
    if (db->sync != KVS_SYNC_ASYNC)
        return 0;
    db->max_unpersisted = max_unpersisted;
    /* Warm batches kept between bursts: a quarter of the lag bound, at
     * most 64 MiB of memory held idle. */
    db->q_keep_bytes =
        max_unpersisted / 4 < (64u << 20) ? max_unpersisted / 4 : (64u << 20);
    db->qb_target = QB_TARGET;
    const char *env = getenv("KVS_QUEUE_BATCH_BYTES");
    if (env && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        if (*end || v < 4096 || v > (1ull << 30)) {
            db_log(db, KVS_LOG_WARN,
                   "KVS_QUEUE_BATCH_BYTES=%s ignored (4096 .. 2^30 bytes); "
                   "queued batches close at %u bytes",
                   env, QB_TARGET);
        } else {
            db->qb_target = (size_t)v;
        }
    }
    int e = pthread_create(&db->writer, NULL, writer_main, db);
    if (e)
        return -e;
    db->writer_running = 1;
    return 0;
}

int kvs__db_wait(kvs__db_t *db, uint64_t ticket) {
    if (!db->writer_running)
        return 0;
    pthread_mutex_lock(&db->q_mu);
    int rc = q_wait_locked(db, ticket);
    pthread_mutex_unlock(&db->q_mu);
    return rc;
}

int kvs__db_flush(kvs__db_t *db, char *err, size_t errlen) {
    if (db->sync == KVS_SYNC_NONE) {
        int rc = db_sync_wal(db);
        if (rc)
            refused(db, err, errlen, "flush");
        return rc;
    }
    if (!db->writer_running) /* BATCH, ALWAYS: durable on return */
        return atomic_load(&db->failed) ? refused(db, err, errlen, "flush") : 0;
    pthread_mutex_lock(&db->q_mu);
    int rc = q_wait_locked(db, db->queued);
    if (!rc && db->q_failed)
        rc = db->q_failed; /* nothing lost before, but no longer writable */
    pthread_mutex_unlock(&db->q_mu);
    if (rc)
        refused(db, err, errlen, "flush");
    return rc;
}

void kvs__db_progress(kvs__db_t *db, kvs__db_progress_t *p) {
    pthread_mutex_lock(&db->q_mu);
    p->queued = db->queued;
    p->persisted = db->persisted;
    p->unpersisted_bytes = db->unpersisted;
    p->groups = db->groups;
    p->lag_waits = db->lag_waits;
    pthread_mutex_unlock(&db->q_mu);
}

static void stop_writer(kvs__db_t *db) {
    if (!db->writer_running)
        return;
    pthread_mutex_lock(&db->q_mu);
    db->q_stop = 1;
    pthread_cond_signal(&db->q_work);
    pthread_mutex_unlock(&db->q_mu);
    pthread_join(db->writer, NULL);
    db->writer_running = 0;
}

typedef struct seq_rec_s {
    unsigned char k[8], v[4 + 28];
} seq_rec_t;

static void fill_seq(kvs__db_t *db, rocksdb_writebatch_t *b, void *ctx) {
    seq_rec_t *r = ctx;
    rocksdb_writebatch_put_cf(b, db->cf[CF_SEQS], (const char *)r->k, 8,
                              (const char *)r->v, sizeof r->v);
}

int kvs__db_create_seq(kvs__db_t *db, uint64_t id, const kvs_geometry_t *g,
                       uint32_t ttl_s, char *err, size_t errlen) {
    seq_rec_t r;
    put_be64(r.k, id);
    uint32_t f[7] = {SEQ_VERSION,   g->n_layers, g->n_q_heads,
                     g->n_kv_heads, g->head_dim, (uint32_t)g->dtype,
                     ttl_s};
    memcpy(r.v + 4, f, sizeof f);
    uint32_t crc = kvs_crc32c(0, r.v + 4, sizeof f);
    memcpy(r.v, &crc, 4);
    return submit(db, fill_seq, &r, sizeof r, SUBMIT_DURABLE, NULL, err, errlen,
                  "sequence write");
}

static void fill_drop(kvs__db_t *db, rocksdb_writebatch_t *b, void *ctx) {
    uint64_t id = *(const uint64_t *)ctx;
    unsigned char k[8], lo[24], hi[24];
    put_be64(k, id);
    memset(lo, 0, sizeof lo);
    memset(hi, 0, sizeof hi);
    put_be64(lo, id);
    put_be64(hi, id + 1);
    rocksdb_writebatch_delete_cf(b, db->cf[CF_SEQS], (const char *)k, 8);
    size_t hl = id == UINT64_MAX ? 24 : 8; /* id+1 wraps: end at max key */
    if (id == UINT64_MAX)
        memset(hi, 0xff, sizeof hi);
    for (int cf = CF_KV; cf <= CF_BLOCKS; cf++)
        rocksdb_writebatch_delete_range_cf(b, db->cf[cf], (const char *)lo, 8,
                                           (const char *)hi, hl);
}

/* In ASYNC the drop joins the queue behind every append queued before it
 * (the engine refuses appends of a dropped id from then on), so no queued
 * row of the id can land after its delete. */
int kvs__db_drop_seq(kvs__db_t *db, uint64_t id, char *err, size_t errlen) {
    return submit(db, fill_drop, &id, 64, SUBMIT_DURABLE, NULL, err, errlen,
                  "sequence drop");
}

typedef struct rows_rec_s {
    uint64_t id;
    uint32_t layer, n_kv_heads;
    uint64_t pos0;
    uint32_t n, segment_tokens;
    size_t rb, stride;
    const char *keys, *values; /* the caller's rows, [token][head][rb] */
    const unsigned char *hdrs; /* per record: CRC-32C, token count */
    const char **parts;        /* scratch: 1 + 2 * the longest record */
    size_t *part_len;
} rows_rec_t;

/* A record's value is its 8-byte header, its keys, then its values: put
 * as slices of the caller's rows (RocksDB gathers them into the batch, the
 * one copy), not encoded into a buffer first. */
static void fill_rows(kvs__db_t *db, rocksdb_writebatch_t *b, void *ctx) {
    const rows_rec_t *r = ctx;
    const unsigned char *hdr = r->hdrs;
    for (uint32_t h = 0; h < r->n_kv_heads; h++) {
        uint64_t pos = r->pos0;
        uint32_t done = 0;
        while (done < r->n) {
            uint64_t boundary =
                (pos / r->segment_tokens + 1) * r->segment_tokens;
            uint32_t m = (uint32_t)(boundary - pos);
            if (m > r->n - done)
                m = r->n - done;
            unsigned char k[24];
            rec_key(k, r->id, r->layer, h, pos);
            r->parts[0] = (const char *)hdr;
            r->part_len[0] = 8;
            for (uint32_t t = 0; t < m; t++) {
                size_t o = (size_t)(done + t) * r->stride + h * r->rb;
                r->parts[1 + t] = r->keys + o;
                r->parts[1 + m + t] = r->values + o;
                r->part_len[1 + t] = r->part_len[1 + m + t] = r->rb;
            }
            const char *kp = (const char *)k;
            size_t kl = 24;
            rocksdb_writebatch_putv_cf(b, db->cf[CF_KV], 1, &kp, &kl,
                                       (int)(1 + 2 * m), r->parts, r->part_len);
            hdr += 8;
            pos += m;
            done += m;
        }
    }
}

int kvs__db_append(kvs__db_t *db, uint64_t id, uint32_t layer,
                   const kvs_geometry_t *g, uint64_t pos0, uint32_t n,
                   const void *keys, const void *values,
                   uint32_t segment_tokens, uint64_t *ticket, char *err,
                   size_t errlen) {
    size_t rb = (size_t)g->head_dim * kvs_dtype_size(g->dtype);
    size_t stride = rb * g->n_kv_heads;
    /* Records are split at segment boundaries (a segment covers whole
     * records). Their headers (checksums) are computed here, outside any
     * lock; the queue's lock is held only while RocksDB gathers the rows
     * into the batch, the one copy of the payload on this path. */
    uint64_t first = pos0 / segment_tokens,
             last = (pos0 + n - 1) / segment_tokens;
    size_t n_recs = (size_t)(last - first + 1) * g->n_kv_heads;
    size_t total = n_recs * 8 + 2 * rb * (size_t)n * g->n_kv_heads;
    uint32_t longest = n < segment_tokens ? n : segment_tokens;
    size_t n_parts = 1 + 2 * (size_t)longest;
    unsigned char *hdrs = malloc(n_recs * 8);
    const char **parts = malloc(n_parts * sizeof(*parts));
    size_t *part_len = malloc(n_parts * sizeof(*part_len));
    int rc = KVS_ENOMEM;
    if (!hdrs || !parts || !part_len)
        goto out;
    /* The records' checksums, over the rows where they are: the only pass
     * over the payload before RocksDB's copy. */
    unsigned char *p = hdrs;
    for (uint32_t h = 0; h < g->n_kv_heads; h++) {
        uint64_t pos = pos0;
        uint32_t done = 0;
        while (done < n) {
            uint64_t boundary = (pos / segment_tokens + 1) * segment_tokens;
            uint32_t m = (uint32_t)(boundary - pos);
            if (m > n - done)
                m = n - done;
            uint32_t crc = kvs_crc32c(0, &m, 4);
            for (int part = 0; part < 2; part++) {
                const char *src = part ? values : keys;
                for (uint32_t t = 0; t < m; t++)
                    crc = kvs_crc32c(
                        crc, src + (size_t)(done + t) * stride + h * rb, rb);
            }
            memcpy(p, &crc, 4);
            memcpy(p + 4, &m, 4);
            p += 8;
            pos += m;
            done += m;
        }
    }
    rows_rec_t r = {.id = id,
                    .layer = layer,
                    .n_kv_heads = g->n_kv_heads,
                    .pos0 = pos0,
                    .n = n,
                    .segment_tokens = segment_tokens,
                    .rb = rb,
                    .stride = stride,
                    .keys = keys,
                    .values = values,
                    .hdrs = hdrs,
                    .parts = parts,
                    .part_len = part_len};
    rc = submit(db, fill_rows, &r, total + 24 * n_recs, SUBMIT_MODE, ticket,
                err, errlen, "write");
out:
    free(hdrs);
    free(parts);
    free(part_len);
    return rc;
}

/* A block key: the segment's record key, then the block's first slot. */
static void blk_key(unsigned char k[28], uint64_t id, uint32_t layer,
                    uint32_t head, uint64_t pos, uint32_t slot0) {
    rec_key(k, id, layer, head, pos);
    put_be32(k + 24, slot0);
}

/* K/V blocks per segment: one, of all its slots. A block is read whole or
 * not at all, and the engine makes a layer's segments whole before a call
 * reads them (docs/persistence.md says why not per group of clusters); a
 * finer split needs no format change: readers take any blocks that cover
 * the slots in order. */
typedef struct seg_rec_s {
    unsigned char k[24], lo[24], hi[24], bk[28];
    const unsigned char *buf; /* crc | encoded metadata */
    size_t len;
    /* The K/V block as parts: crc | header, then the segment's own key
     * and value rows (RocksDB gathers them into the batch: no encode
     * buffer of the whole block first). */
    unsigned char blk_head[4 + KVS_SEGMENT_KV_BLOCK_HDR];
    const void *blk_keys, *blk_values;
    size_t blk_rows_len;
} seg_rec_t;

static void fill_segment(kvs__db_t *db, rocksdb_writebatch_t *b, void *ctx) {
    const seg_rec_t *r = ctx;
    const char *bk = (const char *)r->bk;
    size_t bkl = 28;
    const char *parts[3] = {(const char *)r->blk_head, r->blk_keys,
                            r->blk_values};
    size_t part_len[3] = {sizeof r->blk_head, r->blk_rows_len, r->blk_rows_len};
    rocksdb_writebatch_putv_cf(b, db->cf[CF_BLOCKS], 1, &bk, &bkl, 3, parts,
                               part_len);
    rocksdb_writebatch_put_cf(b, db->cf[CF_INDEX], (const char *)r->k, 24,
                              (const char *)r->buf, r->len);
    rocksdb_writebatch_delete_range_cf(b, db->cf[CF_KV], (const char *)r->lo,
                                       24, (const char *)r->hi, 24);
}

int kvs__db_put_segment(kvs__db_t *db, uint64_t id, uint32_t layer,
                        uint32_t head, const kvs_segment_t *seg, char *err,
                        size_t errlen) {
    size_t len = kvs_segment_meta_encoded_size(seg);
    unsigned char *buf = malloc(4 + len);
    if (!buf)
        return KVS_ENOMEM;
    kvs_segment_meta_encode(seg, buf + 4);
    uint32_t crc = kvs_crc32c(0, buf + 4, len);
    memcpy(buf, &crc, 4);
    seg_rec_t r = {.buf = buf, .len = 4 + len};
    kvs_segment_kv_block_parts(seg, 0, seg->n_tokens, r.blk_head + 4,
                               &r.blk_keys, &r.blk_values, &r.blk_rows_len);
    crc = kvs_crc32c(0, r.blk_head + 4, KVS_SEGMENT_KV_BLOCK_HDR);
    crc = kvs_crc32c(crc, r.blk_keys, r.blk_rows_len);
    crc = kvs_crc32c(crc, r.blk_values, r.blk_rows_len);
    memcpy(r.blk_head, &crc, 4);
    rec_key(r.k, id, layer, head, seg->first_pos);
    blk_key(r.bk, id, layer, head, seg->first_pos, 0);
    rec_key(r.lo, id, layer, head, seg->first_pos);
    rec_key(r.hi, id, layer, head, seg->first_pos + seg->n_tokens);
    /* No fsync wait: until the WAL is synced the rows are still there, so a
     * crash loses at most this build, never data. In ASYNC the segment is
     * queued behind the rows it replaces, so its delete of them can never
     * run before they are written. The metadata and its blocks are one
     * batch: a segment is stored whole or not at all. */
    int rc =
        submit(db, fill_segment, &r,
               8 + len + kvs_segment_kv_block_size(seg, seg->n_tokens) + 100,
               SUBMIT_NOWAIT, NULL, err, errlen, "segment write");
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Loading                                                                */

typedef struct known_s {
    uint64_t *ids;
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

/*
 * One sequence's load. A block RocksDB cannot read stops the iterator with
 * an error but does not say whose records it held. The walk is bounded to
 * the sequence's keys (seek to its first possible key, upper bound at the
 * next id), so that RocksDB's index keeps it off the blocks of neighbours
 * (their separators fall on the id boundary), but an error alone still
 * does not prove the sequence lost records. What does: stored records of
 * (layer, head) cover positions 0.. without a gap (segments, then rows),
 * so the record that would follow the last one read has a known key,
 * (id, layer, head, end). After an iterator error every such key is
 * looked up in both families: found (a record the walk missed) or
 * unreadable (its block is the damaged one) charges the sequence; not
 * found anywhere means it was read in full and the damage is a
 * neighbour's, which that neighbour's own walk meets.
 */
typedef struct walk_s {
    uint64_t id;
    uint32_t n_layers, n_heads;
    uint64_t *ends; /* [layer][head]: positions covered so far */
    int gap;        /* a record did not start where the last one ended */
    int damaged;    /* reported through L->damaged */
    int cancelled;  /* L->cancel was set: stopped, nothing charged */
    char io_err[200];
    rocksdb_readoptions_t *ro; /* verified reads bounded to the range */
    unsigned char upper[16];
    /* The range walked: (l0, h0) up to (l1, h1) exclusive, in key order
     * (one layer, one head of it, or everything). */
    uint32_t l0, h0;
    rocksdb_iterator_t *blocks; /* K/V blocks, created on first use */
} walk_t;

static void walk_damage(walk_t *w, const kvs__db_loader_t *L, const char *fmt,
                        ...) __attribute__((format(printf, 3, 4)));
static void walk_damage(walk_t *w, const kvs__db_loader_t *L, const char *fmt,
                        ...) {
    if (w->damaged)
        return;
    w->damaged = 1;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    L->damaged(L->ctx, w->id, msg);
}

/* A walk over the whole sequence, or the part the loader names. */
static int walk_init(walk_t *w, uint64_t id, const kvs_geometry_t *g,
                     const kvs__db_loader_t *L) {
    memset(w, 0, sizeof *w);
    w->id = id;
    w->n_layers = g ? g->n_layers : 0;
    w->n_heads = g ? g->n_kv_heads : 0;
    size_t n = (size_t)w->n_layers * w->n_heads;
    w->ends = calloc(n ? n : 1, sizeof *w->ends);
    w->ro = rocksdb_readoptions_create();
    if (!w->ends || !w->ro)
        return KVS_ENOMEM;
    rocksdb_readoptions_set_verify_checksums(w->ro, 1);
    rocksdb_readoptions_set_fill_cache(w->ro, 0);
    if (L && L->readahead)
        rocksdb_readoptions_set_readahead_size(w->ro, L->readahead);
    size_t ul = 0;
    if (L && L->one_layer) {
        /* The upper bound is a key prefix: (id, layer, head + 1) ends one
         * head, (id, layer + 1) one layer. */
        w->l0 = L->layer;
        put_be64(w->upper, id);
        if (L->one_head) {
            w->h0 = L->head;
            put_be32(w->upper + 8, L->layer);
            put_be32(w->upper + 12, L->head + 1);
            ul = 16;
        } else {
            put_be32(w->upper + 8, L->layer + 1);
            ul = 12;
        }
    } else if (id != UINT64_MAX) { /* the last id runs to the end */
        put_be64(w->upper, id + 1);
        ul = 8;
    }
    if (ul)
        rocksdb_readoptions_set_iterate_upper_bound(w->ro,
                                                    (const char *)w->upper, ul);
    return 0;
}

static void walk_free(walk_t *w) {
    free(w->ends);
    if (w->blocks)
        rocksdb_iter_destroy(w->blocks);
    if (w->ro)
        rocksdb_readoptions_destroy(w->ro);
}

/* Is (layer, head) inside the walk's range? */
static int walk_has(const kvs__db_loader_t *L, uint32_t l, uint32_t h) {
    if (!L->one_layer)
        return 1;
    return l == L->layer && (!L->one_head || h == L->head);
}

/* Make `seg`, decoded from a metadata record, whole: read its K/V blocks
 * (keys after the record's own, in slot order) and check each one's CRC.
 * 0, or a message in `why` (the sequence is then damaged: the blocks are
 * under its own keys, so an unreadable one is its loss), or KVS_ENOMEM. */
static int walk_blocks(kvs__db_t *db, walk_t *w, uint32_t layer, uint32_t head,
                       kvs_segment_t *seg, char *why, size_t whylen) {
    if (!w->blocks && !(w->blocks = rocksdb_create_iterator_cf(
                            db->db, w->ro, db->cf[CF_BLOCKS])))
        return KVS_ENOMEM;
    unsigned char k[28];
    blk_key(k, w->id, layer, head, seg->first_pos, 0);
    uint32_t next = 0;
    rocksdb_iterator_t *it = w->blocks;
    /* Stop at the last block without stepping past it: the next key's
     * block (the next segment's K/V, or a neighbour's) is not ours to read,
     * and a step would read it whole. */
    for (rocksdb_iter_seek(it, (const char *)k, 28); rocksdb_iter_valid(it);
         rocksdb_iter_next(it)) {
        size_t kl, vl;
        const unsigned char *bk =
            (const unsigned char *)rocksdb_iter_key(it, &kl);
        const unsigned char *v =
            (const unsigned char *)rocksdb_iter_value(it, &vl);
        if (kl != 28 || memcmp(bk, k, 24))
            break; /* past this segment's blocks */
        uint32_t crc;
        if (vl < 4 ||
            (memcpy(&crc, v, 4), crc != kvs_crc32c(0, v + 4, vl - 4))) {
            snprintf(why, whylen,
                     "K/V block at layer %u head %u position %llu slot %u "
                     "fails its checksum",
                     layer, head, (unsigned long long)seg->first_pos,
                     get_be32(bk + 24));
            return KVS_ECORRUPT;
        }
        char e[160] = "";
        int rc = kvs_segment_kv_attach(seg, v + 4, vl - 4, &next, e, sizeof e);
        if (rc == KVS_ENOMEM)
            return rc;
        if (rc) {
            snprintf(why, whylen, "layer %u head %u position %llu: %s", layer,
                     head, (unsigned long long)seg->first_pos, e);
            return KVS_ECORRUPT;
        }
        if (next == seg->n_tokens)
            break;
    }
    char *rerr = NULL;
    rocksdb_iter_get_error(it, &rerr);
    if (rerr) {
        snprintf(why, whylen, "K/V block at layer %u head %u position %llu: %s",
                 layer, head, (unsigned long long)seg->first_pos, rerr);
        rocksdb_free(rerr);
        /* An iterator stays failed: the next segment gets a fresh one. */
        rocksdb_iter_destroy(w->blocks);
        w->blocks = NULL;
        return KVS_ECORRUPT;
    }
    if (next != seg->n_tokens) {
        snprintf(why, whylen,
                 "K/V blocks of layer %u head %u position %llu are missing "
                 "(slots %u.. of %u)",
                 layer, head, (unsigned long long)seg->first_pos, next,
                 seg->n_tokens);
        return KVS_ECORRUPT;
    }
    return 0;
}

/* After an iterator error: whether a record follows the last one read in
 * any (layer, head) (see walk_t); 0 when none does. */
static int walk_probe(kvs__db_t *db, walk_t *w, const kvs__db_loader_t *L,
                      char *why, size_t whylen) {
    for (uint32_t l = 0; l < w->n_layers; l++)
        for (uint32_t h = 0; h < w->n_heads; h++)
            for (int cf = CF_KV; cf <= CF_INDEX && walk_has(L, l, h); cf++) {
                unsigned char k[24];
                uint64_t end = w->ends[(size_t)l * w->n_heads + h];
                rec_key(k, w->id, l, h, end);
                char *rerr = NULL;
                size_t vl;
                char *v = rocksdb_get_cf(db->db, db->ro, db->cf[cf],
                                         (const char *)k, 24, &vl, &rerr);
                rocksdb_free(v);
                if (rerr) {
                    snprintf(why, whylen, "%s family: %s", cf_names[cf], rerr);
                    rocksdb_free(rerr);
                    return 1;
                }
                if (v) {
                    snprintf(why, whylen,
                             "%s records of layer %u head %u past position "
                             "%llu cannot be read: %.150s",
                             cf_names[cf], l, h, (unsigned long long)end,
                             w->io_err);
                    return 1;
                }
            }
    return 0;
}

/* Records [pos, pos + n) of (layer, head) were read. */
static void walk_cover(walk_t *w, uint32_t layer, uint32_t head, uint64_t pos,
                       uint64_t n) {
    if (layer >= w->n_layers || head >= w->n_heads) {
        w->gap = 1;
        return;
    }
    uint64_t *e = &w->ends[(size_t)layer * w->n_heads + head];
    if (pos != *e)
        w->gap = 1;
    *e = pos + n;
}

/* Walk one record family (kv or index) over the sequence's keys. */
static void walk_family(kvs__db_t *db, int cf, walk_t *w,
                        const kvs__db_loader_t *L) {
    rocksdb_iterator_t *it =
        rocksdb_create_iterator_cf(db->db, w->ro, db->cf[cf]);
    /* The first possible key, not the 8-byte id: a block separator may be
     * exactly the id, and seeking to it would read the block before. */
    unsigned char seek[24];
    rec_key(seek, w->id, w->l0, w->h0, 0);
    for (rocksdb_iter_seek(it, (const char *)seek, 24);
         rocksdb_iter_valid(it) && !w->damaged; rocksdb_iter_next(it)) {
        if (L->cancel && atomic_load(L->cancel)) {
            w->cancelled = 1;
            break;
        }
        size_t kl, vl;
        const unsigned char *k =
            (const unsigned char *)rocksdb_iter_key(it, &kl);
        const unsigned char *v =
            (const unsigned char *)rocksdb_iter_value(it, &vl);
        if (kl != 24) {
            if (kl >= 8 && get_be64(k) > w->id)
                break;
            continue;
        }
        uint64_t id = get_be64(k);
        if (id != w->id)
            break;
        uint32_t layer = get_be32(k + 8), head = get_be32(k + 12);
        uint64_t pos = get_be64(k + 16);
        uint32_t crc;
        if (vl < 4 ||
            (memcpy(&crc, v, 4), crc != kvs_crc32c(0, v + 4, vl - 4))) {
            walk_damage(w, L,
                        "%s record at layer %u head %u position "
                        "%llu fails its checksum",
                        cf_names[cf], layer, head, (unsigned long long)pos);
            break;
        }
        int rc;
        if (cf == CF_INDEX) {
            kvs_segment_t *seg;
            char why[200] = "";
            rc = kvs_segment_meta_decode(v + 4, vl - 4, &seg, why, sizeof why);
            if (rc) {
                walk_damage(w, L, "index record at layer %u head %u: %s", layer,
                            head, why);
                break;
            }
            /* Metadata stored apart from its K/V: never hand over a segment
             * that is not whole. */
            if (!seg->keys &&
                (rc = walk_blocks(db, w, layer, head, seg, why, sizeof why))) {
                kvs_segment_free(seg);
                /* Out of memory is charged as a callback's failure is */
                walk_damage(w, L, "%s",
                            rc == KVS_ENOMEM ? "out of memory reading K/V "
                                               "blocks"
                                             : why);
                break;
            }
            walk_cover(w, layer, head, seg->first_pos, seg->n_tokens);
            rc = L->segment(L->ctx, id, layer, head, seg);
        } else {
            uint32_t n;
            if (vl < 8) {
                walk_damage(w, L, "short kv record");
                break;
            }
            memcpy(&n, v + 4, 4);
            if (n == 0 || (vl - 8) % (2 * (size_t)n)) {
                walk_damage(w, L,
                            "kv record at layer %u head %u has a "
                            "bad length",
                            layer, head);
                break;
            }
            size_t half = (vl - 8) / 2;
            walk_cover(w, layer, head, pos, n);
            rc = L->rows(L->ctx, id, layer, head, pos, n, half, v + 8,
                         v + 8 + half);
        }
        if (rc && w->io_err[0]) /* the records before it were unreadable */
            walk_damage(w, L, "%s", w->io_err);
        else if (rc)
            walk_damage(w, L,
                        "%s record at layer %u head %u position "
                        "%llu does not fit: %s",
                        cf_names[cf], layer, head, (unsigned long long)pos,
                        kvs_strerror(rc));
    }
    char *rerr = NULL;
    rocksdb_iter_get_error(it, &rerr);
    rocksdb_iter_destroy(it);
    if (rerr && !w->io_err[0])
        snprintf(w->io_err, sizeof w->io_err, "%s family: %s", cf_names[cf],
                 rerr);
    rocksdb_free(rerr);
}

/* Load one sequence's records: segments, then the rows after them. */
static int load_one(kvs__db_t *db, uint64_t id, const kvs_geometry_t *g,
                    const kvs__db_loader_t *L) {
    walk_t w;
    if (walk_init(&w, id, g, L)) {
        walk_free(&w);
        return KVS_ENOMEM;
    }
    if (!g)
        walk_damage(&w, L, "sequence metadata is damaged");
    if (!w.damaged)
        walk_family(db, CF_INDEX, &w, L);
    if (!w.damaged && !w.cancelled)
        walk_family(db, CF_KV, &w, L);
    if (w.cancelled) {
        walk_free(&w);
        return KVS_ECLOSED;
    }
    if (!w.damaged && w.gap)
        walk_damage(&w, L, "records do not continue each other");
    char why[256];
    if (!w.damaged && w.io_err[0] && walk_probe(db, &w, L, why, sizeof why))
        walk_damage(&w, L, "%s", why);
    walk_free(&w);
    return 0;
}

/*
 * Lazy open of one sequence: where each (layer, head) ends, from its last
 * record in each family (SeekForPrev bounded to the id), the records
 * themselves left on disk. Rows follow segments, so a head's last kv
 * record (read and checked: it carries the row count) ends it; without
 * rows its last segment does, segment_tokens after its first position (the
 * key says where; the segment is not decoded: page-in decodes and checks
 * it). 1 when the sequence must be read in full instead (an unreadable
 * block, a record that fails its checksum or reads oddly: load_one then
 * charges the damage exactly), 0 when every layer was given, or an error.
 */
static int extent_one(kvs__db_t *db, uint64_t id, const kvs_geometry_t *g,
                      const kvs__db_loader_t *L) {
    walk_t w;
    uint64_t *ends = NULL;
    rocksdb_iterator_t *it[2] = {NULL, NULL};
    int rc = walk_init(&w, id, g, NULL);
    if (rc)
        goto out;
    if (!(ends = calloc(g->n_kv_heads, sizeof *ends))) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (int f = 0; f < 2; f++)
        it[f] = rocksdb_create_iterator_cf(db->db, w.ro,
                                           db->cf[f ? CF_INDEX : CF_KV]);
    for (uint32_t l = 0; l < g->n_layers && !rc; l++) {
        for (uint32_t h = 0; h < g->n_kv_heads && !rc; h++) {
            unsigned char k[24];
            rec_key(k, id, l, h, UINT64_MAX);
            ends[h] = 0;
            for (int f = 0; f < 2; f++) {
                rocksdb_iter_seek_for_prev(it[f], (const char *)k, 24);
                char *rerr = NULL;
                rocksdb_iter_get_error(it[f], &rerr);
                if (rerr) {
                    rocksdb_free(rerr);
                    rc = 1;
                    break;
                }
                if (!rocksdb_iter_valid(it[f]))
                    continue;
                size_t kl, vl;
                const unsigned char *rk =
                    (const unsigned char *)rocksdb_iter_key(it[f], &kl);
                if (kl != 24 || memcmp(rk, k, 16))
                    continue; /* an earlier head's, or none of this id */
                uint64_t pos = get_be64(rk + 16);
                if (f == 1) { /* a segment: the head has no rows */
                    ends[h] = pos + L->segment_tokens;
                    break;
                }
                const unsigned char *v =
                    (const unsigned char *)rocksdb_iter_value(it[f], &vl);
                uint32_t crc, n;
                if (vl < 8 ||
                    (memcpy(&crc, v, 4), crc != kvs_crc32c(0, v + 4, vl - 4))) {
                    rc = 1;
                    break;
                }
                memcpy(&n, v + 4, 4);
                ends[h] = pos + n;
                break;
            }
        }
        if (!rc)
            rc = L->extent(L->ctx, id, l, ends);
    }
out:
    for (int f = 0; f < 2; f++)
        if (it[f])
            rocksdb_iter_destroy(it[f]);
    free(ends);
    walk_free(&w);
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

/* A sequence's metadata record: 0 and its geometry and TTL, or -1. */
static int parse_seq(const unsigned char *v, size_t vl, kvs_geometry_t *g,
                     uint32_t *ttl_s) {
    uint32_t f[7], crc;
    if (vl != 32)
        return -1;
    memcpy(&crc, v, 4);
    memcpy(f, v + 4, 28);
    if (crc != kvs_crc32c(0, v + 4, 28) || f[0] != SEQ_VERSION)
        return -1;
    *g = (kvs_geometry_t){f[1], f[2], f[3], f[4], (kvs_dtype_t)f[5]};
    *ttl_s = f[6];
    return 0;
}

int kvs__db_load(kvs__db_t *db, const kvs__db_loader_t *L, char *err,
                 size_t errlen) {
    known_t known = {0};
    kvs_geometry_t *geos = NULL; /* n_layers 0: metadata damaged */
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
            if (ids)
                known.ids = ids;
            kvs_geometry_t *gs = ids ? realloc(geos, cap * sizeof *gs) : NULL;
            if (!gs) {
                rc = KVS_ENOMEM;
                break;
            }
            geos = gs;
            known.cap = cap;
        }
        uint64_t id = get_be64(k);
        kvs_geometry_t g;
        uint32_t ttl_s;
        int ok = parse_seq(v, vl, &g, &ttl_s) == 0;
        if (ok && L->seq(L->ctx, id, &g, ttl_s))
            ok = 0;
        if (!ok) {
            /* Still announce it, so it can be listed and dropped. */
            g = (kvs_geometry_t){1, 1, 1, 1, KVS_DTYPE_F32};
            L->seq(L->ctx, id, &g, 0);
            L->damaged(L->ctx, id,
                       "sequence metadata fails its checksum or its "
                       "geometry is invalid");
            g.n_layers = 0;
        }
        known.ids[known.n] = id;
        geos[known.n++] = g;
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
        if (geos[i].n_layers == 0)
            continue; /* already quarantined */
        if (L->extent) {
            rc = extent_one(db, known.ids[i], &geos[i], L);
            if (rc <= 0)
                continue;
        }
        rc = load_one(db, known.ids[i], &geos[i], L);
        if (!rc && L->loaded)
            L->loaded(L->ctx, known.ids[i]);
    }
    for (int cf = CF_KV; cf <= CF_BLOCKS && !rc; cf++)
        sweep_orphans(db, cf, &known);
    free(known.ids);
    free(geos);
    return rc;
}

int kvs__db_load_seq(kvs__db_t *db, uint64_t id, const kvs__db_loader_t *L,
                     char *err, size_t errlen) {
    /* The engine evicted the sequence only once its own writes were on
     * disk (kvs__db_wait), but segments and a re-created id's writes may
     * still be queued: read after all of them. A queue lost to a write
     * error lost none of this sequence's evicted rows. */
    if (db->writer_running) {
        pthread_mutex_lock(&db->q_mu);
        (void)q_wait_locked(db, db->queued);
        pthread_mutex_unlock(&db->q_mu);
    }
    unsigned char k[8];
    put_be64(k, id);
    char *rerr = NULL;
    size_t vl = 0;
    char *v = rocksdb_get_cf(db->db, db->ro, db->cf[CF_SEQS], (const char *)k,
                             8, &vl, &rerr);
    int rc = take_err(rerr, err, errlen, "sequence metadata");
    if (rc)
        return rc;
    kvs_geometry_t g;
    uint32_t ttl_s;
    int ok = v && parse_seq((const unsigned char *)v, vl, &g, &ttl_s) == 0;
    rocksdb_free(v);
    return load_one(db, id, ok ? &g : NULL, L);
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
    uint32_t want[5] = {0, FORMAT_VERSION, f->segment_tokens, f->sink_tokens,
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
    if (have[1] != 1u && have[1] != FORMAT_VERSION) {
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
                     "%s %u, not %u: open it with %s %u (kvstored: "
                     "the option or a --profile) or use another directory",
                     names[i], have[2 + i], want[2 + i], names[i], have[2 + i]);
            return KVS_EINVAL;
        }
    if (have[1] != FORMAT_VERSION) {
        /* Format 1 (K/V inside segment records): read as it is; segments
         * written from now on are split, which a binary of format 1 could
         * not read, so the record says 2 before any is. */
        rocksdb_writebatch_t *b = rocksdb_writebatch_create();
        rocksdb_writebatch_put_cf(b, db->cf[CF_DEFAULT], key, sizeof key - 1,
                                  (const char *)want, sizeof want);
        rc = write_durable(db, b, err, errlen);
        rocksdb_writebatch_destroy(b);
    }
    return rc;
}

void kvs__db_compact(kvs__db_t *db) {
    for (int cf = 0; cf < CF_COUNT; cf++)
        rocksdb_compact_range_cf(db->db, db->cf[cf], NULL, 0, NULL, 0);
}
