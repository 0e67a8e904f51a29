/*
 * test_persist_damage.c: a data directory damaged on disk, or a disk that
 * fills up. Each case opens a copy of a small closed store after one
 * change to one file and asserts what the store promises:
 * - damage to RocksDB's own files (CURRENT, MANIFEST, WAL) refuses the
 *   open with KVS_ECORRUPT and a message naming the file, and removes no
 *   file; an open that succeeds serves every acknowledged token bit for bit;
 * - a table file cut short or deleted refuses the open the same way (it
 *   used to abort in a RocksDB assertion);
 * - a damaged table block quarantines exactly the sequences whose records
 *   it holds (found independently with point lookups), no neighbour, at
 *   an eager open, by the first reads after a lazy one, and at page-in;
 * - the directory is 0700 and every file in it 0600, after writes and a
 *   compaction;
 * - after the disk fills, later writes say KVS_ENOSPC and that the disk is
 *   full, and kvs_store_close returns the error instead of aborting.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <rocksdb/c.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kv_rows.h"
#include "kvs_kernels.h"
#include "kvstore.h"

enum { KVH = 2, QH = 4, D = 16, SEG = 256, N_LAYERS = 2 };
static const kvs_geometry_t GEO = {N_LAYERS, QH, KVH, D, KVS_DTYPE_F16};

static char *temp_dir(void) {
    char *d = strdup("/tmp/kvs-damage-XXXXXX");
    assert_non_null(mkdtemp(d));
    return d;
}

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (system(cmd) != 0)
        fail_msg("command failed: %s", cmd);
}

static kvs_store_t *open_dir(const char *dir, kvs_sync_t sync) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.sync = sync;
    o.n_threads = 2;
    kvs_store_t *s = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc)
        fail_msg("open %s: %s (%s)", dir, kvs_strerror(rc),
                 kvs_store_open_error());
    return s;
}

static int try_open_load(const char *dir, kvs_store_t **s, kvs_load_t load) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.n_threads = 2;
    o.load = load;
    return kvs_store_open(&o, s);
}

static int try_open(const char *dir, kvs_store_t **s) {
    return try_open_load(dir, s, KVS_LOAD_DEFAULT);
}

static void append_tokens(kvs_store_t *s, uint64_t seq, uint32_t layer,
                          uint64_t t0, uint32_t n) {
    uint16_t *k = malloc((size_t)n * KVH * D * 2);
    uint16_t *v = malloc((size_t)n * KVH * D * 2);
    kv_rows_make(KVH * D, seq, layer, t0, n, k, v);
    int rc = kvs_seq_append(s, seq, layer, n, k, v);
    if (rc)
        fail_msg("append %llu: %s", (unsigned long long)seq,
                 kvs_store_errmsg(s));
    free(k);
    free(v);
}

/* Whether (seq, layer) reads back n tokens as generated: 1 yes, 0 no, or
 * the read's error code. */
static int tokens_match(kvs_store_t *s, uint64_t seq, uint32_t layer,
                        uint64_t n) {
    kvs_geometry_t g;
    uint64_t have = 0;
    int rc = kvs_seq_shape(s, seq, layer, &g, &have);
    if (rc)
        return rc;
    if (have != n)
        return 0;
    uint16_t *k = malloc(n * KVH * D * 2), *v = malloc(n * KVH * D * 2);
    uint16_t *ek = malloc(n * KVH * D * 2), *ev = malloc(n * KVH * D * 2);
    kv_rows_make(KVH * D, seq, layer, 0, (uint32_t)n, ek, ev);
    rc = kvs_seq_read(s, seq, layer, 0, (uint32_t)n, k, v);
    if (rc == 0)
        rc = !memcmp(k, ek, n * KVH * D * 2) && !memcmp(v, ev, n * KVH * D * 2);
    free(k), free(v), free(ek), free(ev);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* A small store: sequences 1 and 2 in tables (compacted), sequence 3 and  */
/* more of sequence 1 only in the WAL. Every append is acknowledged with   */
/* sync=always.                                                            */

#define SMALL_SEQS 3
static const uint64_t small_tokens[SMALL_SEQS + 1][N_LAYERS] = {
    {0, 0}, {600, 350}, {500, 300}, {300, 120}};

static void build_small_store(const char *dir) {
    kvs_store_t *s = open_dir(dir, KVS_SYNC_ALWAYS);
    for (uint64_t id = 1; id <= 2; id++) {
        assert_int_equal(kvs_seq_create(s, id, &GEO), 0);
        /* Sequence 1 layer 1 gets its last 50 tokens after the compaction. */
        for (uint32_t l = 0; l < N_LAYERS; l++)
            append_tokens(s, id, l, 0,
                          (uint32_t)small_tokens[id][l] -
                              (id == 1 && l == 1 ? 50 : 0));
        assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
    }
    kvs_store_compact(s);
    assert_int_equal(kvs_seq_create(s, 3, &GEO), 0);
    for (uint32_t l = 0; l < N_LAYERS; l++)
        append_tokens(s, 3, l, 0, (uint32_t)small_tokens[3][l]);
    append_tokens(s, 1, 1, 300, 50);
    assert_int_equal(kvs_store_close(s), 0);
}

/* Every token of the small store, bit for bit, nothing quarantined. */
static void check_small_store(kvs_store_t *s) {
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.quarantined, 0);
    assert_int_equal(st.sequences, SMALL_SEQS);
    for (uint64_t id = 1; id <= SMALL_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++)
            if (tokens_match(s, id, l, small_tokens[id][l]) != 1)
                fail_msg("sequence %llu layer %u does not read back",
                         (unsigned long long)id, l);
}

/* The directory's file names, sorted, one per line. */
static char *listing(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "ls -1 '%s' | sort", dir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 4096, n = 0;
    char *buf = calloc(1, cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (n + 1 == cap)
            buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    pclose(p);
    return buf;
}

/* Every name of `before` is in `after` (RocksDB's open may add a LOG.old). */
static void no_file_lost(const char *before, const char *after,
                         const char *what) {
    char name[256];
    for (const char *p = before; *p;) {
        size_t n = strcspn(p, "\n");
        snprintf(name, sizeof name, "\n%.*s\n", (int)n, p);
        char *wrapped = malloc(strlen(after) + 2);
        sprintf(wrapped, "\n%s", after);
        if (!strstr(wrapped, name))
            fail_msg("%s: %.*s disappeared", what, (int)n, p);
        free(wrapped);
        p += n + (p[n] == '\n');
    }
}

/* The first file of `dir` whose name matches the shell pattern. */
static int find_file(const char *dir, const char *pattern, char *name,
                     size_t len) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cd '%s' && ls -1S %s 2>/dev/null | head -1", dir,
             pattern);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    name[0] = 0;
    if (!fgets(name, (int)len, p))
        name[0] = 0;
    pclose(p);
    name[strcspn(name, "\n")] = 0;
    return name[0] ? 0 : -1;
}

static long file_size(const char *dir, const char *name) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (long)st.st_size;
}

/* XOR `n` bytes at `off` with 0xff. */
static void flip(const char *dir, const char *name, long off, int n) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    unsigned char b[64];
    assert_int_equal(fseek(f, off, SEEK_SET), 0);
    size_t got = fread(b, 1, (size_t)n, f);
    for (size_t i = 0; i < got; i++)
        b[i] ^= 0xff;
    assert_int_equal(fseek(f, off, SEEK_SET), 0);
    assert_int_equal(fwrite(b, 1, got, f), got);
    assert_int_equal(fclose(f), 0);
}

typedef struct outcome_s {
    int opened, refused;
} outcome_t;

/* Open `work` after damage to file `name`: either every token reads back
 * and nothing is quarantined, or KVS_ECORRUPT names the file and the
 * directory lost no file. */
static void open_damaged(const char *work, const char *name, outcome_t *out,
                         const char *what) {
    char *before = listing(work);
    kvs_store_t *s = NULL;
    int rc = try_open(work, &s);
    if (rc == 0) {
        check_small_store(s);
        assert_int_equal(kvs_store_close(s), 0);
        out->opened++;
    } else {
        if (rc != KVS_ECORRUPT)
            fail_msg("%s: open gave %s (%s)", what, kvs_strerror(rc),
                     kvs_store_open_error());
        if (!strstr(kvs_store_open_error(), name))
            fail_msg("%s: the message does not name %s: %s", what, name,
                     kvs_store_open_error());
        char *after = listing(work);
        no_file_lost(before, after, what);
        free(after);
        out->refused++;
    }
    free(before);
}

/* 8-byte flips at 18 evenly spaced offsets (start and end included) of
 * CURRENT, MANIFEST, OPTIONS and the WAL. */
static void test_persist_damage_metadata_flips(void **state) {
    (void)state;
    char *pristine = temp_dir(), *work = temp_dir();
    build_small_store(pristine);
    {
        /* On a copy: an open replays the WAL into a table. */
        sh("rm -rf '%s' && cp -a '%s' '%s'", work, pristine, work);
        kvs_store_t *s = open_dir(work, KVS_SYNC_ALWAYS);
        check_small_store(s);
        assert_int_equal(kvs_store_close(s), 0);
    }
    static const char *const kinds[4][2] = {{"CURRENT", "CURRENT"},
                                            {"MANIFEST", "MANIFEST-*"},
                                            {"OPTIONS", "OPTIONS-*"},
                                            {"WAL", "*.log"}};
    for (int kd = 0; kd < 4; kd++) {
        char name[256];
        assert_int_equal(find_file(pristine, kinds[kd][1], name, sizeof name),
                         0);
        long size = file_size(pristine, name);
        assert_true(size > 8);
        outcome_t out = {0, 0};
        for (int i = 0; i < 18; i++) {
            long off = i * (size - 8) / 17;
            sh("rm -rf '%s' && cp -a '%s' '%s'", work, pristine, work);
            flip(work, name, off, 8);
            char what[2048];
            snprintf(what, sizeof what, "%s flipped at %ld of %ld", name, off,
                     size);
            open_damaged(work, name, &out, what);
        }
        print_message("%-8s (%s, %ld bytes): %d flips opened intact, %d "
                      "refused naming it\n",
                      kinds[kd][0], name, size, out.opened, out.refused);
        if (kd == 2) {
            /* RocksDB does not read OPTIONS files at open (the store passes
             * its options in code): damage there changes nothing. */
            assert_int_equal(out.opened, 18);
        } else if (kd != 3) {
            /* Every byte of CURRENT and of the MANIFEST's records counts. */
            assert_int_equal(out.refused, 18);
        } else {
            /* The WAL holds acknowledged appends: all damage refuses. */
            assert_int_equal(out.refused, 18);
        }
    }
    /* The MANIFEST's length fields: 8 bytes from each record header's
     * length on (RocksDB read a damaged one in the last block as a torn
     * write, opened with no sequence and deleted every table). */
    {
        char name[256], path[2048];
        assert_int_equal(find_file(pristine, "MANIFEST-*", name, sizeof name),
                         0);
        snprintf(path, sizeof path, "%s/%s", pristine, name);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        unsigned char buf[1 << 16];
        size_t size = fread(buf, 1, sizeof buf, f);
        fclose(f);
        assert_true(size < sizeof buf && size < 32768); /* one block */
        outcome_t out = {0, 0};
        for (size_t off = 0; off + 7 <= size;
             off += 7 + (buf[off + 4] | (size_t)buf[off + 5] << 8)) {
            /* 8 bytes (length, type, payload), then the length alone. */
            for (int n = 8; n >= 2; n -= 6) {
                sh("rm -rf '%s' && cp -a '%s' '%s'", work, pristine, work);
                flip(work, name, (long)off + 4, n);
                char what[2048];
                snprintf(what, sizeof what, "%s header at %zu (%d bytes)", name,
                         off, n);
                open_damaged(work, name, &out, what);
            }
        }
        print_message("MANIFEST record headers: %d flips, all refused\n",
                      out.refused);
        assert_int_equal(out.opened, 0);
        assert_true(out.refused >= 5);
    }
    /* Deleting each of them. */
    for (int kd = 0; kd < 4; kd++) {
        char name[256];
        assert_int_equal(find_file(pristine, kinds[kd][1], name, sizeof name),
                         0);
        sh("rm -rf '%s' && cp -a '%s' '%s' && rm '%s/%s'", work, pristine, work,
           work, name);
        outcome_t out = {0, 0};
        char what[2048];
        snprintf(what, sizeof what, "%s deleted", name);
        /* The message names the file, or for the WAL says what is lost. */
        open_damaged(work, kd == 3 ? "WAL" : name, &out, what);
        print_message("%-8s deleted: %s\n", kinds[kd][0],
                      out.opened ? "opened intact" : "refused");
        assert_int_equal(out.opened, kd == 2);
    }
    sh("rm -rf '%s' '%s'", pristine, work);
    free(pristine);
    free(work);
}

/* Every table file cut short (by one byte, to half) or deleted: refused
 * with the file named, nothing removed. */
static void test_persist_damage_sst_truncated_or_deleted(void **state) {
    (void)state;
    char *pristine = temp_dir(), *work = temp_dir();
    build_small_store(pristine);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cd '%s' && ls -1 *.sst", pristine);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char ssts[16][64];
    int n = 0;
    while (n < 16 && fgets(ssts[n], sizeof ssts[n], p))
        ssts[n][strcspn(ssts[n], "\n")] = 0, n++;
    pclose(p);
    assert_true(n >= 2);
    int cases = 0;
    for (int i = 0; i < n; i++) {
        long size = file_size(pristine, ssts[i]);
        for (int how = 0; how < 3; how++) {
            sh("rm -rf '%s' && cp -a '%s' '%s'", work, pristine, work);
            char path[2048], what[2048];
            snprintf(path, sizeof path, "%s/%s", work, ssts[i]);
            if (how == 2) {
                assert_int_equal(unlink(path), 0);
            } else {
                assert_int_equal(truncate(path, how == 0 ? size - 1 : size / 2),
                                 0);
            }
            snprintf(what, sizeof what, "%s %s", ssts[i],
                     how == 2 ? "deleted" : "truncated");
            char *before = listing(work);
            kvs_store_t *s = NULL;
            int rc = try_open(work, &s);
            if (rc != KVS_ECORRUPT)
                fail_msg("%s: open gave %d (%s)", what, rc,
                         kvs_store_open_error());
            if (!strstr(kvs_store_open_error(), ssts[i]))
                fail_msg("%s: message does not name it: %s", what,
                         kvs_store_open_error());
            char *after = listing(work);
            no_file_lost(before, after, what);
            free(before);
            free(after);
            cases++;
        }
    }
    print_message("%d table files: %d cases, each refused naming the file\n", n,
                  cases);
    sh("rm -rf '%s' '%s'", pristine, work);
    free(pristine);
    free(work);
}

/* ---------------------------------------------------------------------- */
/* Quarantine: 12 sequences, each with a segment and eight row records per */
/* (layer, head); a 4 KiB table block holds one segment record, or about  */
/* three row records: some hold the rows of two sequences.                 */

#define Q_SEQS 12
enum { Q_TOKENS = 400, Q_CHUNK = 19 };

static void build_q_store(const char *dir, uint64_t memory_bytes,
                          kvs_store_t **keep) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.sync = KVS_SYNC_NONE;
    o.n_threads = 2;
    o.memory_bytes = memory_bytes;
    kvs_store_t *s = NULL;
    assert_int_equal(kvs_store_open(&o, &s), 0);
    for (uint64_t id = 1; id <= Q_SEQS; id++) {
        assert_int_equal(kvs_seq_create(s, id, &GEO), 0);
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            append_tokens(s, id, l, 0, SEG);
            for (uint32_t t = SEG; t < Q_TOKENS; t += Q_CHUNK)
                append_tokens(s, id, l, t,
                              Q_TOKENS - t < Q_CHUNK ? Q_TOKENS - t : Q_CHUNK);
        }
        assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
    }
    assert_int_equal(kvs_store_compact(s), 0);
    if (keep) {
        *keep = s;
        return;
    }
    assert_int_equal(kvs_store_close(s), 0);
}

/* The keys of sequence `id` in family `cf` (2: kv, 3: index, 4: K/V
 * blocks: the index keys, then a 4-byte slot 0). */
static int q_keys(uint64_t id, int cf, unsigned char keys[][28]) {
    int n = 0;
    for (uint32_t l = 0; l < N_LAYERS; l++)
        for (uint32_t h = 0; h < KVH; h++) {
            uint64_t first = cf >= 3 ? 0 : SEG;
            uint64_t last = cf >= 3 ? 0 : Q_TOKENS - 1;
            uint64_t step = cf >= 3 ? 1 : Q_CHUNK;
            for (uint64_t pos = first; pos <= last; pos += step) {
                unsigned char *k = keys[n++];
                memset(k, 0, 28);
                for (int i = 0; i < 8; i++) {
                    k[i] = (unsigned char)(id >> (56 - 8 * i));
                    k[16 + i] = (unsigned char)(pos >> (56 - 8 * i));
                }
                for (int i = 0; i < 4; i++) {
                    k[8 + i] = (unsigned char)(l >> (24 - 8 * i));
                    k[12 + i] = (unsigned char)(h >> (24 - 8 * i));
                }
            }
        }
    return n;
}

/* Ground truth, independent of the loader: which sequences have a record
 * that a point lookup cannot read (its block fails its checksum). */
static int unreadable_seqs(const char *dir, int damaged[Q_SEQS + 1]) {
    rocksdb_options_t *o = rocksdb_options_create();
    const char *names[5] = {"default", "seqs", "kv", "index", "blocks"};
    const rocksdb_options_t *cfo[5] = {o, o, o, o, o};
    rocksdb_column_family_handle_t *cf[5];
    char *err = NULL;
    rocksdb_t *db =
        rocksdb_open_column_families(o, dir, 5, names, cfo, cf, &err);
    if (err)
        fail_msg("raw open: %s", err);
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(ro, 1);
    rocksdb_readoptions_set_fill_cache(ro, 0);
    int n_damaged = 0;
    for (uint64_t id = 1; id <= Q_SEQS; id++) {
        damaged[id] = 0;
        for (int c = 2; c <= 4; c++) {
            unsigned char keys[64][28];
            int n = q_keys(id, c, keys);
            for (int i = 0; i < n; i++) {
                size_t vl;
                char *v = rocksdb_get_cf(db, ro, cf[c], (const char *)keys[i],
                                         c == 4 ? 28 : 24, &vl, &err);
                if (err) {
                    rocksdb_free(err);
                    err = NULL;
                    damaged[id] = 1;
                } else if (!v) {
                    fail_msg("sequence %llu: a record is not there",
                             (unsigned long long)id);
                }
                rocksdb_free(v);
            }
        }
        n_damaged += damaged[id];
    }
    rocksdb_readoptions_destroy(ro);
    for (int i = 0; i < 5; i++)
        rocksdb_column_family_handle_destroy(cf[i]);
    rocksdb_close(db);
    rocksdb_options_destroy(o);
    return n_damaged;
}

/* The (largest) table file of column family `fam` in a closed store. */
static void family_table(const char *dir, const char *fam, char *name,
                         size_t len) {
    rocksdb_options_t *o = rocksdb_options_create();
    const char *names[5] = {"default", "seqs", "kv", "index", "blocks"};
    const rocksdb_options_t *cfo[5] = {o, o, o, o, o};
    rocksdb_column_family_handle_t *cf[5];
    char *err = NULL;
    rocksdb_t *db = rocksdb_open_for_read_only_column_families(
        o, dir, 5, names, cfo, cf, 0, &err);
    if (err)
        fail_msg("raw open: %s", err);
    const rocksdb_livefiles_t *lf = rocksdb_livefiles(db);
    size_t best = 0;
    name[0] = 0;
    for (int i = 0; i < rocksdb_livefiles_count(lf); i++) {
        const char *n = rocksdb_livefiles_name(lf, i);
        if (strcmp(rocksdb_livefiles_column_family_name(lf, i), fam) ||
            rocksdb_livefiles_size(lf, i) < best)
            continue;
        best = rocksdb_livefiles_size(lf, i);
        snprintf(name, len, "%s", n + (n[0] == '/'));
    }
    rocksdb_livefiles_destroy(lf);
    for (int i = 0; i < 5; i++)
        rocksdb_column_family_handle_destroy(cf[i]);
    rocksdb_close(db);
    rocksdb_options_destroy(o);
    if (!name[0])
        fail_msg("no table of family %s", fam);
}

/* Where a table's data blocks end: the offset of its first meta block is
 * past them; the index handle in the footer bounds it from above. */
static long table_index_offset(const char *dir, const char *name) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char ft[53];
    assert_int_equal(fseek(f, -53, SEEK_END), 0);
    assert_int_equal(fread(ft, 1, 53, f), 53);
    fclose(f);
    const unsigned char *p = ft + 1;
    uint64_t h[4];
    for (int i = 0; i < 4; i++) {
        h[i] = 0;
        for (int shift = 0;; shift += 7) {
            unsigned char b = *p++;
            h[i] |= (uint64_t)(b & 0x7f) << shift;
            if (!(b & 0x80))
                break;
        }
    }
    return (long)(h[0] < h[2] ? h[0] : h[2]); /* metaindex, index */
}

/* Each sequence is quarantined iff `damaged` says so; the others read
 * back bit for bit. A read that finds the damage itself (a lazy open's
 * first read, or a page-in) gets KVS_ECORRUPT naming the sequence; later
 * ones KVS_EQUARANTINED. */
static int ecorrupt_seen; /* reads that found the damage themselves */

static void check_quarantine(kvs_store_t *s, const int damaged[Q_SEQS + 1],
                             const char *what) {
    for (uint64_t id = 1; id <= Q_SEQS; id++) {
        /* Layers are read one at a time: a damaged sequence's intact layers
         * serve (what they hold, checked) until a read meets the damage. */
        int found = 0;
        for (uint32_t pass = 0; pass < 2; pass++)
            for (uint32_t l = 0; l < N_LAYERS; l++) {
                int rc = tokens_match(s, id, l, Q_TOKENS);
                if (rc == KVS_ECORRUPT) {
                    char name[40];
                    snprintf(name, sizeof name,
                             "sequence %llu:", (unsigned long long)id);
                    if (!strstr(kvs_store_errmsg(s), name))
                        fail_msg("%s: KVS_ECORRUPT without the sequence named: "
                                 "%s",
                                 what, kvs_store_errmsg(s));
                    ecorrupt_seen++;
                    rc = KVS_EQUARANTINED;
                }
                if (damaged[id] && rc == 1 && !found && pass == 0)
                    continue; /* an intact layer read before the damage */
                found |= rc == KVS_EQUARANTINED;
                if (damaged[id] && rc != KVS_EQUARANTINED)
                    fail_msg("%s: sequence %llu has an unreadable record but "
                             "reads (%d)",
                             what, (unsigned long long)id, rc);
                if (!damaged[id] && rc != 1)
                    fail_msg("%s: intact sequence %llu layer %u: %s (%s)", what,
                             (unsigned long long)id, l,
                             rc == 0 ? "wrong data" : kvs_strerror(rc),
                             kvs_store_errmsg(s));
            }
    }
}

static void test_persist_damage_quarantine_exact(void **state) {
    (void)state;
    char *pristine = temp_dir(), *work = temp_dir(), *probe = temp_dir();
    build_q_store(pristine, 0, NULL);
    static const char *const fams[3] = {"kv", "index", "blocks"};
    int cases = 0;
    for (int fam = 0; fam < 3; fam++) {
        char name[64] = "";
        family_table(pristine, fams[fam], name, sizeof name);
        long data_end = table_index_offset(pristine, name);
        /* Start, middle and end of the key space; in the kv table also
         * the first block that holds rows of two sequences. */
        long offs[4] = {100, data_end / 2, data_end - 100, 100};
        for (int w = 0; w < (fam == 0 ? 4 : 3); w++) {
            int damaged[Q_SEQS + 1], n_damaged = 0;
            long off = offs[w];
            /* Near the end the last blocks may be meta blocks: step back
             * until the flip hits a data block; for the shared block, step
             * forward until two sequences are hit. */
            for (;; off += w == 3 ? 1000 : -1024) {
                assert_true(off > 0 && off < data_end);
                sh("rm -rf '%s' && cp -a '%s' '%s'", probe, pristine, probe);
                flip(probe, name, off, 16);
                n_damaged = unreadable_seqs(probe, damaged);
                if (w == 3 ? n_damaged == 2 : n_damaged > 0)
                    break;
            }
            /* Eager: found at open. Lazy: found by the first read (or at
             * open, where the last record of a head is the damaged one),
             * and the same sequences in the end. */
            for (int lazy = 0; lazy < 2; lazy++) {
                sh("rm -rf '%s' && cp -a '%s' '%s'", work, pristine, work);
                flip(work, name, off, 16);
                kvs_store_t *s = NULL;
                int rc = try_open_load(work, &s,
                                       lazy ? KVS_LOAD_LAZY : KVS_LOAD_EAGER);
                if (rc)
                    fail_msg("open after a data block flip: %s",
                             kvs_store_open_error());
                char what[200];
                snprintf(what, sizeof what, "%s table %s at %ld (%s open)",
                         fams[fam], name, off, lazy ? "lazy" : "eager");
                kvs_store_stats_t st;
                assert_int_equal(kvs_store_stats(s, &st), 0);
                uint64_t at_open = st.quarantined;
                check_quarantine(s, damaged, what);
                if (lazy)
                    assert_int_equal(kvs_store_stats(s, &st), 0);
                assert_int_equal(st.quarantined, (uint64_t)n_damaged);
                assert_int_equal(kvs_store_close(s), 0);
                print_message("%s: %d of %d sequences quarantined (%llu at "
                              "open), as the point lookups say\n",
                              what, n_damaged, Q_SEQS,
                              (unsigned long long)at_open);
                cases++;
            }
        }
    }
    assert_int_equal(cases, 20);
    sh("rm -rf '%s' '%s' '%s'", pristine, work, probe);
    free(pristine), free(work), free(probe);
}

/* The same at page-in: a store under a budget that holds about one
 * sequence evicts the others; a block damaged on disk while the store is
 * open quarantines, when paged in, exactly the sequences it holds. */
static void test_persist_damage_quarantine_page_in(void **state) {
    (void)state;
    char *dir = temp_dir(), *probe = temp_dir();
    kvs_store_t *s = NULL;
    build_q_store(dir, 150 << 10, &s);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_true(st.evictions > 0);
    char cmd[600], name[64] = "";
    snprintf(cmd, sizeof cmd, "cd '%s' && ls -1S *.sst | head -1", dir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(name, sizeof name, p));
    pclose(p);
    name[strcspn(name, "\n")] = 0;
    long off = table_index_offset(dir, name) / 2;
    int damaged[Q_SEQS + 1], n_damaged;
    sh("rm -rf '%s' && cp -a '%s' '%s' && rm -f '%s/LOCK'", probe, dir, probe,
       probe);
    flip(probe, name, off, 16);
    n_damaged = unreadable_seqs(probe, damaged);
    assert_true(n_damaged > 0);
    flip(dir, name, off, 16); /* under the open store */
    uint64_t page_ins = st.page_ins;
    char what[200];
    snprintf(what, sizeof what, "%s at %ld (page-in)", name, off);
    check_quarantine(s, damaged, what);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_true(st.page_ins > page_ins);
    print_message("%s: %d of %d sequences quarantined, as the point lookups "
                  "say\n",
                  what, n_damaged, Q_SEQS);
    assert_int_equal(kvs_store_close(s), 0);
    sh("rm -rf '%s' '%s'", dir, probe);
    free(dir), free(probe);
}

/* After a lazy open (no warm-up), a block damaged under the open store is
 * found by the first read of each sequence it holds: that read gets
 * KVS_ECORRUPT naming the sequence, only those sequences are quarantined,
 * and none of it counts as a page-in. */
static void test_persist_damage_quarantine_lazy_first_use(void **state) {
    (void)state;
    char *dir = temp_dir(), *probe = temp_dir();
    build_q_store(dir, 0, NULL);
    kvs_store_t *s = NULL;
    assert_int_equal(try_open_load(dir, &s, KVS_LOAD_LAZY), 0);
    kvs_store_stats_t st;
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.quarantined, 0);
    char cmd[600], name[64] = "";
    snprintf(cmd, sizeof cmd, "cd '%s' && ls -1S *.sst | head -1", dir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    assert_non_null(fgets(name, sizeof name, p));
    pclose(p);
    name[strcspn(name, "\n")] = 0;
    long off = table_index_offset(dir, name) / 2;
    int damaged[Q_SEQS + 1], n_damaged;
    sh("rm -rf '%s' && cp -a '%s' '%s' && rm -f '%s/LOCK'", probe, dir, probe,
       probe);
    flip(probe, name, off, 16);
    n_damaged = unreadable_seqs(probe, damaged);
    assert_true(n_damaged > 0);
    flip(dir, name, off, 16); /* under the open store */
    char what[200];
    snprintf(what, sizeof what, "%s at %ld (lazy open, first use)", name, off);
    ecorrupt_seen = 0;
    check_quarantine(s, damaged, what);
    assert_int_equal(ecorrupt_seen, n_damaged);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.quarantined, (uint64_t)n_damaged);
    assert_int_equal(st.page_ins, 0);
    print_message("%s: %d of %d sequences quarantined, each by its first "
                  "read (KVS_ECORRUPT)\n",
                  what, n_damaged, Q_SEQS);
    assert_int_equal(kvs_store_close(s), 0);
    sh("rm -rf '%s' '%s'", dir, probe);
    free(dir), free(probe);
}

/* ---------------------------------------------------------------------- */

/* The directory 0700, every file 0600, after writes and a compaction; the
 * caller's umask back as it was after the close. */
static void test_persist_damage_file_modes(void **state) {
    (void)state;
    mode_t um = umask(022);
    char *dir = temp_dir();
    char sub[600];
    snprintf(sub, sizeof sub, "%s/store", dir);
    kvs_store_t *s = open_dir(sub, KVS_SYNC_BATCH);
    assert_int_equal(kvs_seq_create(s, 1, &GEO), 0);
    append_tokens(s, 1, 0, 0, 600);
    assert_int_equal(kvs_seq_wait_indexed(s, 1), 0);
    assert_int_equal(kvs_store_compact(s), 0);
    append_tokens(s, 1, 1, 0, 100);
    assert_int_equal(kvs_store_compact(s), 0);
    struct stat st;
    assert_int_equal(stat(sub, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0700);
    int n = 0;
    DIR *d = opendir(sub);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        char path[2048];
        snprintf(path, sizeof path, "%s/%s", sub, e->d_name);
        assert_int_equal(lstat(path, &st), 0);
        if (!S_ISREG(st.st_mode))
            continue;
        if (st.st_mode & 077)
            fail_msg("%s has mode %o", e->d_name, st.st_mode & 0777);
        n++;
    }
    closedir(d);
    assert_int_equal(kvs_store_close(s), 0);
    /* The close wrote KVSTORE-CLOSED: private too. */
    snprintf(sub, sizeof sub, "%s/store/KVSTORE-CLOSED", dir);
    assert_int_equal(stat(sub, &st), 0);
    assert_int_equal(st.st_mode & 077, 0);
    assert_int_equal(umask(um), 022);
    print_message("%d files, all 0600; directory 0700\n", n);
    assert_true(n >= 6);
    sh("rm -rf '%s'", dir);
    free(dir);
}

/* A directory in use is refused with KVS_ELOCKED before any check reads
 * its files (they change under a live store), in this process and in
 * another. */
static void test_persist_damage_in_use_refused(void **state) {
    (void)state;
    char *dir = temp_dir();
    kvs_store_t *s = open_dir(dir, KVS_SYNC_BATCH);
    assert_int_equal(kvs_seq_create(s, 1, &GEO), 0);
    append_tokens(s, 1, 0, 0, 300);
    kvs_store_t *s2 = NULL;
    assert_int_equal(try_open(dir, &s2), KVS_ELOCKED);
    assert_non_null(strstr(kvs_store_open_error(), "this process"));
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kvs_store_t *s3 = NULL;
        int rc = try_open(dir, &s3);
        _exit(rc == KVS_ELOCKED &&
                      strstr(kvs_store_open_error(), "locked by process")
                  ? 0
                  : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(kvs_store_close(s), 0);
    /* Closed: it opens again, here. */
    s = open_dir(dir, KVS_SYNC_BATCH);
    assert_int_equal(tokens_match(s, 1, 0, 300), 1);
    assert_int_equal(kvs_store_close(s), 0);
    sh("rm -rf '%s'", dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

/* The file-size limit stands in for a full disk. One-token appends make
 * the index builder's segment writes (a whole segment each) the larger
 * writes, so that the disk often fills under a build: either way, the
 * writes that follow the first failure say the disk is full, and the close
 * returns the error instead of aborting in RocksDB. */
static void test_persist_damage_disk_full_close(void **state) {
    (void)state;
    char *dir = temp_dir();
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {1 << 20, 1 << 20};
        setrlimit(RLIMIT_FSIZE, &rl);
        kvs_options_t o;
        kvs_options_default(&o);
        o.data_dir = dir;
        o.segment_tokens = SEG;
        o.sync = KVS_SYNC_BATCH;
        o.n_threads = 2;
        kvs_store_t *s = NULL;
        if (kvs_store_open(&o, &s) || kvs_seq_create(s, 1, &GEO))
            _exit(2);
        uint16_t k[KVH * D], v[KVH * D];
        int rc = 0;
        uint64_t t;
        for (t = 0; t < 200000; t++) {
            kv_rows_make(KVH * D, 1, 0, t, 1, k, v);
            if ((rc = kvs_seq_append(s, 1, 0, 1, k, v)))
                break;
        }
        if (rc != KVS_ENOSPC)
            _exit(3);
        /* The next write: refused, saying the disk is full. */
        kv_rows_make(KVH * D, 1, 0, t, 1, k, v);
        rc = kvs_seq_append(s, 1, 0, 1, k, v);
        const char *msg = kvs_store_errmsg(s);
        if (rc != KVS_ENOSPC || !strstr(msg, "disk is full"))
            _exit(4);
        if (write(fds[1], &t, sizeof t) != sizeof t)
            _exit(5);
        rc = kvs_store_close(s);
        _exit(rc == KVS_ENOSPC ? 0 : 6);
    }
    close(fds[1]);
    uint64_t acked = 0;
    int got = read(fds[0], &acked, sizeof acked) == sizeof acked;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status))
        fail_msg("the writer died of signal %d", WTERMSIG(status));
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(got && acked > 0);
    print_message("disk full after %llu one-token appends\n",
                  (unsigned long long)acked);
    /* Every acknowledged token is there after a reopen. */
    kvs_store_t *s = open_dir(dir, KVS_SYNC_BATCH);
    assert_int_equal(tokens_match(s, 1, 0, acked), 1);
    assert_int_equal(kvs_store_close(s), 0);
    sh("rm -rf '%s'", dir);
    free(dir);
}

/* A real full disk (ENOSPC, which RLIMIT_FSIZE does not give): a 3 MiB
 * tmpfs in a private mount namespace. RocksDB's WAL writer used to abort
 * the close after it (an assertion on a writer that has seen an error).
 * Needs CAP_SYS_ADMIN; skipped with a message without it. */
static void test_persist_damage_enospc_close(void **state) {
    (void)state;
    char *dir = temp_dir();
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        int skip = unshare(CLONE_NEWNS) ||
                   mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) ||
                   mount("tmpfs", dir, "tmpfs", 0, "size=3m");
        if (write(fds[1], &skip, sizeof skip) != sizeof skip || skip)
            _exit(0);
        char sub[600];
        snprintf(sub, sizeof sub, "%s/store", dir);
        pid_t writer = fork();
        if (writer == 0) {
            kvs_options_t o;
            kvs_options_default(&o);
            o.data_dir = sub;
            o.segment_tokens = SEG;
            o.sync = KVS_SYNC_BATCH;
            o.n_threads = 2;
            kvs_store_t *s = NULL;
            if (kvs_store_open(&o, &s) || kvs_seq_create(s, 1, &GEO))
                _exit(2);
            enum { CH = 64 };
            uint16_t k[CH * KVH * D], v[CH * KVH * D];
            uint64_t t = 0;
            int rc;
            for (;; t += CH) {
                kv_rows_make(KVH * D, 1, 0, t, CH, k, v);
                if ((rc = kvs_seq_append(s, 1, 0, CH, k, v)))
                    break;
                if (write(fds[1], &t, sizeof t) != sizeof t)
                    _exit(3);
            }
            if (rc != KVS_ENOSPC)
                _exit(4);
            rc = kvs_seq_append(s, 1, 0, CH, k, v);
            if (rc != KVS_ENOSPC ||
                !strstr(kvs_store_errmsg(s), "disk is full"))
                _exit(5);
            _exit(kvs_store_close(s) == KVS_ENOSPC ? 0 : 6);
        }
        int st;
        waitpid(writer, &st, 0);
        if (!WIFEXITED(st))
            _exit(100 + WTERMSIG(st));
        if (WEXITSTATUS(st))
            _exit(WEXITSTATUS(st));
        /* (Reading it back needs space for RocksDB's open: the durability
         * of acknowledged appends after a full disk is test_persist's.) */
        uint64_t done = UINT64_MAX;
        if (write(fds[1], &done, sizeof done) != sizeof done)
            _exit(7);
        _exit(0);
    }
    close(fds[1]);
    int skip = 1;
    assert_int_equal(read(fds[0], &skip, sizeof skip), sizeof skip);
    uint64_t acked = 0, msg;
    int finished = 0;
    while (read(fds[0], &msg, sizeof msg) == sizeof msg) {
        if (msg == UINT64_MAX)
            finished = 1;
        else
            acked = msg + 64;
    }
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    if (WEXITSTATUS(status) > 100)
        fail_msg("the writer died of signal %d", WEXITSTATUS(status) - 100);
    assert_int_equal(WEXITSTATUS(status), 0);
    if (skip) {
        print_message("skipped: no private tmpfs (needs CAP_SYS_ADMIN)\n");
    } else {
        assert_true(finished && acked > 0);
        print_message("ENOSPC after %llu tokens; the close returned "
                      "KVS_ENOSPC\n",
                      (unsigned long long)acked);
    }
    sh("rm -rf '%s'", dir);
    free(dir);
}

int main(int argc, char **argv) {
    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_persist_damage_metadata_flips),
        cmocka_unit_test(test_persist_damage_sst_truncated_or_deleted),
        cmocka_unit_test(test_persist_damage_quarantine_exact),
        cmocka_unit_test(test_persist_damage_quarantine_page_in),
        cmocka_unit_test(test_persist_damage_quarantine_lazy_first_use),
        cmocka_unit_test(test_persist_damage_file_modes),
        cmocka_unit_test(test_persist_damage_in_use_refused),
        cmocka_unit_test(test_persist_damage_disk_full_close),
        cmocka_unit_test(test_persist_damage_enospc_close),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
