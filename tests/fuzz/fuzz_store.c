/*
 * fuzz_store.c: the store's loader against damaged directories. A small
 * valid store is built once (sequences 1 and 2 in table files, sequence 3
 * and the tail of sequence 1 only in the WAL, every append acknowledged
 * with sync=always); each input picks one mutation of one file of a copy
 * of it, opens the copy, and aborts unless:
 * - the open returns KVS_ECORRUPT or an I/O error, and removed no file; or
 * - it succeeds, no table file disappeared, all three sequences are there,
 *   and each reads back bit for bit or is quarantined (KVS_EQUARANTINED,
 *   or KVS_ECORRUPT from the read that found the damage).
 *
 * Input: [0] file kind (table, MANIFEST, CURRENT, OPTIONS, WAL, LOCK),
 * [1] action (flip bytes, truncate, delete), [2..5] offset (LE, modulo the
 * size), [6] flip length - 1 (mod 16), [7] which file of the kind, [8] XOR
 * mask (0: 0xff). Shorter inputs are zero-padded.
 *
 * store_sweep.c runs a fixed set of inputs under CTest. With clang as the
 * C compiler (CC=clang cmake -S . -B build-clang), the fuzz_store target is
 * libFuzzer's; its coverage feedback stops at this file (libkvstore is
 * built without -fsanitize=fuzzer), so the input format keeps every case
 * one mutation away.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz_store.h"
#include "kv_rows.h"
#include "kvs_kernels.h"
#include "kvstore.h"

enum { KVH = 2, QH = 4, D = 16, SEG = 256, N_LAYERS = 2, N_SEQS = 3 };
static const kvs_geometry_t GEO = {N_LAYERS, QH, KVH, D, KVS_DTYPE_F16};
static const uint32_t tokens[N_SEQS + 1][N_LAYERS] = {
    {0, 0}, {600, 350}, {300, 300}, {100, 100}};

const char *const kvs_fuzz_store_kinds[KVS_FUZZ_KINDS] = {
    "table", "MANIFEST", "CURRENT", "OPTIONS", "WAL", "LOCK"};
const char *const kvs_fuzz_store_actions[KVS_FUZZ_ACTIONS] = {
    "flip", "truncate", "delete"};
kvs_fuzz_store_stats_t kvs_fuzz_store_stats;

static char pristine[256], work[256];

static void die(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "fuzz_store: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    abort();
}

static kvs_store_t *open_store(const char *dir, int *rc) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = SEG;
    o.sync = KVS_SYNC_ALWAYS;
    o.n_threads = 1;
    o.n_build_threads = 1;
    kvs_store_t *s = NULL;
    *rc = kvs_store_open(&o, &s);
    return s;
}

static void append(kvs_store_t *s, uint64_t id, uint32_t l, uint64_t t0,
                   uint32_t n) {
    uint16_t *k = malloc((size_t)n * KVH * D * 2);
    uint16_t *v = malloc((size_t)n * KVH * D * 2);
    kv_rows_make(KVH * D, id, l, t0, n, k, v);
    if (!k || !v || kvs_seq_append(s, id, l, n, k, v))
        die("%s%s: append failed", "", "");
    free(k);
    free(v);
}

static void build(void) {
    int rc;
    kvs_store_t *s = open_store(pristine, &rc);
    if (rc)
        die("open %s: %s", pristine, kvs_store_open_error());
    for (uint64_t id = 1; id <= 2; id++) {
        kvs_seq_create(s, id, &GEO);
        for (uint32_t l = 0; l < N_LAYERS; l++)
            append(s, id, l, 0, tokens[id][l] - (id == 1 && l == 1 ? 50 : 0));
        kvs_seq_wait_indexed(s, id);
    }
    kvs_store_compact(s);
    kvs_seq_create(s, 3, &GEO);
    for (uint32_t l = 0; l < N_LAYERS; l++)
        append(s, 3, l, 0, tokens[3][l]);
    append(s, 1, 1, 300, 50);
    if (kvs_store_close(s))
        die("%s%sclose failed", "", "");
}

/* Remove a directory of plain files. */
static void clear(const char *dir) {
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char path[600];
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    closedir(d);
    rmdir(dir);
}

static void copy_dir(const char *from, const char *to) {
    if (mkdir(to, 0700))
        die("mkdir %s: %s", to, strerror(errno));
    DIR *d = opendir(from);
    if (!d)
        die("opendir %s: %s", from, strerror(errno));
    struct dirent *e;
    char a[600], b[600];
    static char buf[1 << 16];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(a, sizeof a, "%s/%s", from, e->d_name);
        snprintf(b, sizeof b, "%s/%s", to, e->d_name);
        int in = open(a, O_RDONLY), out = open(b, O_WRONLY | O_CREAT, 0600);
        if (in < 0 || out < 0)
            die("copy %s: %s", a, strerror(errno));
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0)
            if (write(out, buf, (size_t)n) != n)
                die("write %s: %s", b, strerror(errno));
        close(in);
        close(out);
    }
    closedir(d);
}

/* The names in `dir`, '/'-separated, with a leading and trailing '/'. */
static void names(const char *dir, char *out, size_t len) {
    DIR *d = opendir(dir);
    size_t n = 0;
    out[n++] = '/';
    out[n] = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.' && n + strlen(e->d_name) + 2 < len)
            n += (size_t)snprintf(out + n, len - n, "%s/", e->d_name);
    if (d)
        closedir(d);
}

/* Every name of `before` (only table files: `tables_only`) is in `after`. */
static void none_lost(const char *before, const char *after, int tables_only,
                      const char *what) {
    char name[300];
    for (const char *p = before + 1; *p;) {
        size_t n = strcspn(p, "/");
        snprintf(name, sizeof name, "/%.*s/", (int)n, p);
        int table = n > 4 && !strncmp(p + n - 4, ".sst", 4);
        if ((table || !tables_only) && !strstr(after, name))
            die("%s: %s disappeared", what, name);
        p += n + 1;
    }
}

static int kind_of(const char *name) {
    size_t n = strlen(name);
    if (n > 4 && !strcmp(name + n - 4, ".sst"))
        return 0;
    if (!strncmp(name, "MANIFEST-", 9))
        return 1;
    if (!strcmp(name, "CURRENT"))
        return 2;
    if (!strncmp(name, "OPTIONS-", 8))
        return 3;
    if (n > 4 && !strcmp(name + n - 4, ".log"))
        return 4;
    if (!strcmp(name, "LOCK"))
        return 5;
    return -1;
}

/* The `which`-th file of `kind` in `dir` (sorted by name), or "". */
static void pick(const char *dir, int kind, unsigned which, char *out,
                 size_t len) {
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort), m = 0;
    out[0] = 0;
    for (int i = 0; i < n; i++)
        m += kind_of(list[i]->d_name) == kind;
    for (int i = 0, j = 0; i < n; i++) {
        if (kind_of(list[i]->d_name) == kind && m && j++ == (int)(which % m))
            snprintf(out, len, "%s", list[i]->d_name);
        free(list[i]);
    }
    free(list);
}

static int setup(void) {
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(pristine, sizeof pristine, "%s/kvs-fuzz-store-%d", base,
             (int)getpid());
    snprintf(work, sizeof work, "%s/kvs-fuzz-store-%d.work", base,
             (int)getpid());
    clear(work);
    clear(pristine);
    build();
    return 0;
}

void kvs_fuzz_store_cleanup(void) {
    clear(work);
    clear(pristine);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int ready;
    if (!ready)
        ready = !setup();
    uint8_t in[9] = {0};
    memcpy(in, data, size < sizeof in ? size : sizeof in);
    int kind = in[0] % KVS_FUZZ_KINDS, action = in[1] % KVS_FUZZ_ACTIONS;
    uint32_t off = (uint32_t)in[2] | (uint32_t)in[3] << 8 |
                   (uint32_t)in[4] << 16 | (uint32_t)in[5] << 24;
    int len = 1 + in[6] % 16;
    uint8_t mask = in[8] ? in[8] : 0xff;

    clear(work);
    copy_dir(pristine, work);
    char name[256], path[600], what[400];
    pick(work, kind, in[7], name, sizeof name);
    if (!name[0])
        return 0; /* no file of that kind (the WAL may be empty) */
    snprintf(path, sizeof path, "%s/%s", work, name);
    snprintf(what, sizeof what, "%s %s at %u", name,
             kvs_fuzz_store_actions[action], off);
    struct stat st;
    if (stat(path, &st))
        die("stat %s: %s", path, strerror(errno));
    long fsize = (long)st.st_size;
    if (action == 0 && fsize > 0) {
        FILE *f = fopen(path, "r+b");
        long at = (long)(off % (uint32_t)fsize);
        unsigned char b[16];
        fseek(f, at, SEEK_SET);
        size_t got = fread(b, 1, (size_t)len, f);
        for (size_t i = 0; i < got; i++)
            b[i] ^= mask;
        fseek(f, at, SEEK_SET);
        fwrite(b, 1, got, f);
        fclose(f);
    } else if (action == 1) {
        if (truncate(path, fsize ? (off_t)(off % (uint32_t)fsize) : 0))
            die("truncate %s: %s", path, strerror(errno));
    } else if (action == 2) {
        unlink(path);
    }
    char before[4096], after[4096];
    names(work, before, sizeof before);

    int rc;
    kvs_store_t *s = open_store(work, &rc);
    kvs_fuzz_store_stats.cases++;
    kvs_fuzz_outcome_t *oc = &kvs_fuzz_store_stats.by[kind][action];
    if (rc) {
        names(work, after, sizeof after);
        none_lost(before, after, 0, what);
        if (rc != KVS_ECORRUPT && rc != KVS_EIO)
            die("%s: open gave %s", what, kvs_store_open_error());
        if (rc == KVS_ECORRUPT) {
            oc->refused_corrupt++;
        } else {
            oc->refused_io++;
            fprintf(stderr, "%s: %s\n", what, kvs_store_open_error());
        }
        return 0;
    }
    names(work, after, sizeof after);
    none_lost(before, after, 1, what);
    int quarantined = 0;
    uint16_t *k = malloc(600 * KVH * D * 2), *v = malloc(600 * KVH * D * 2);
    uint16_t *ek = malloc(600 * KVH * D * 2), *ev = malloc(600 * KVH * D * 2);
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        int q = 0;
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            kvs_geometry_t g;
            uint64_t have = 0;
            int r = kvs_seq_shape(s, id, l, &g, &have);
            if (r == KVS_EQUARANTINED) {
                q = 1;
                continue;
            }
            if (r)
                die("%s: a sequence is gone: %s", what, kvs_strerror(r));
            if (have != tokens[id][l])
                die("%s: a sequence lost tokens silently%s", what, "");
            r = kvs_seq_read(s, id, l, 0, (uint32_t)have, k, v);
            /* KVS_ECORRUPT: this read found the damage (a lazy open reads
             * records on first use) and quarantined the sequence. */
            if (r == KVS_EQUARANTINED || r == KVS_ECORRUPT) {
                q = 1;
                continue;
            }
            kv_rows_make(KVH * D, id, l, 0, (uint32_t)have, ek, ev);
            if (r || memcmp(k, ek, have * KVH * D * 2) ||
                memcmp(v, ev, have * KVH * D * 2))
                die("%s: a sequence reads back wrong%s", what, "");
        }
        quarantined += q;
    }
    free(k), free(v), free(ek), free(ev);
    kvs_store_close(s);
    if (quarantined)
        oc->opened_quarantined++;
    else
        oc->opened_intact++;
    return 0;
}
