/*
 * test_blocks.c: segments stored as a metadata record plus K/V blocks
 * (storage format 2), paged in a layer at a time (issue 14, the first
 * attend after a restart). Checked here:
 * - a lazily opened store answers attend and search bit for bit as an
 *   eager one (deterministic mode), reading only the layers a call needs,
 *   with resident_bytes what the resident layers hold;
 * - a damaged K/V block (bad CRC, or missing) found on first use
 *   quarantines only its sequence, the call gets KVS_ECORRUPT naming it;
 *   the same for a damaged metadata record (bad CRC, or a CRC-valid record
 *   that fails decoding);
 * - under a memory budget, calls on different layers of different
 *   sequences page layers in and evict sequences partly read, answers
 *   unchanged, and resident_bytes stays the sum of what is resident;
 * - appends and a fork on a lazily opened store read only the layers they
 *   touch, and what they wrote reads back after a restart;
 * - the metadata and K/V block decoders on 3000 mutated records;
 * - a store of format 1 (segment records holding their K/V, written here
 *   with the old encoder through RocksDB) opens, answers as a store built
 *   by the engine from the same rows, is marked format 2, and takes new
 *   (split) segments beside its old ones.
 * Kill -9 during the warm-up (which now reads layer by layer):
 * test_lazy_open. Block-level damage of table files: test_persist_damage.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <pthread.h>
#include <rocksdb/c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kv_store.h"
#include "kvs_index.h"
#include "kvs_kernels.h"
#include "kvstore.h"

enum { KVH = 2, QH = 4, D = 32, SEG = 256, N_LAYERS = 3, TOPK = 8 };
static const kvs_geometry_t GEO = {N_LAYERS, QH, KVH, D, KVS_DTYPE_F16};
enum { N_SEQS = 4 };

/* Every (seq, layer) holds whole segments only (no rows), so what a layer
 * takes in RAM is its segments: kvs_seq_info's bytes add up to it. */
static uint64_t seq_tokens(uint64_t id, uint32_t layer) {
    return (uint64_t)SEG * (2 + (id + layer) % 2);
}

static kvs_store_t *open_load(const char *dir, kvs_load_t load,
                              uint64_t memory_bytes) {
    return kv_store_open_load(dir, SEG, load, memory_bytes);
}

static void append_tokens(kvs_store_t *s, uint64_t seq, uint32_t layer,
                          uint64_t t0, uint32_t n) {
    kv_store_append(s, seq, layer, t0, n, KVH * D);
}

static void build_store(const char *dir) {
    kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        assert_int_equal(kvs_seq_create(s, id, &GEO), 0);
        for (uint32_t l = 0; l < N_LAYERS; l++)
            append_tokens(s, id, l, 0, (uint32_t)seq_tokens(id, l));
        assert_int_equal(kvs_seq_wait_indexed(s, id), 0);
    }
    assert_int_equal(kvs_store_close(s), 0);
}

typedef struct answers_s {
    float attend[N_SEQS + 1][N_LAYERS][QH * D];
    int64_t pos[N_SEQS + 1][N_LAYERS][QH * TOPK];
    float score[N_SEQS + 1][N_LAYERS][QH * TOPK];
} answers_t;

static void query_of(uint64_t id, uint32_t l, float *q) {
    for (int i = 0; i < QH * D; i++)
        q[i] = kv_rows_elem(id + 100, l, 0, (uint32_t)i, 0);
}

/* Attend, search and read (seq, layer): 0, or the first call's error. */
static int ask_one(kvs_store_t *s, uint64_t id, uint32_t l, answers_t *a) {
    float q[QH * D];
    query_of(id, l, q);
    int rc = kvs_seq_attend(s, id, l, q, NULL, a->attend[id][l], NULL);
    if (rc)
        return rc;
    rc =
        kvs_seq_search(s, id, l, q, TOPK, NULL, a->pos[id][l], a->score[id][l]);
    if (rc)
        return rc;
    uint64_t n = seq_tokens(id, l);
    size_t bytes = n * KVH * D * 2;
    uint16_t *k = malloc(bytes), *v = malloc(bytes);
    uint16_t *ek = malloc(bytes), *ev = malloc(bytes);
    kv_rows_make(KVH * D, id, l, 0, (uint32_t)n, ek, ev);
    rc = kvs_seq_read(s, id, l, 0, (uint32_t)n, k, v);
    if (!rc && (memcmp(k, ek, bytes) || memcmp(v, ev, bytes)))
        fail_msg("sequence %llu layer %u reads back wrong",
                 (unsigned long long)id, l);
    free(k), free(v), free(ek), free(ev);
    return rc;
}

static void same_answer(const answers_t *a, const answers_t *b, uint64_t id,
                        uint32_t l) {
    if (memcmp(a->attend[id][l], b->attend[id][l], sizeof a->attend[id][l]) ||
        memcmp(a->pos[id][l], b->pos[id][l], sizeof a->pos[id][l]) ||
        memcmp(a->score[id][l], b->score[id][l], sizeof a->score[id][l]))
        fail_msg("sequence %llu layer %u answers differently",
                 (unsigned long long)id, l);
}

static answers_t *eager_answers(const char *dir) {
    answers_t *a = calloc(1, sizeof *a);
    kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
    for (uint64_t id = 1; id <= N_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++)
            assert_int_equal(ask_one(s, id, l, a), 0);
    assert_int_equal(kvs_store_close(s), 0);
    return a;
}

/* What the resident layers hold, from the layers themselves. */
static uint64_t layers_bytes(kvs_store_t *s) {
    uint64_t b = 0;
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        kvs_seq_info_t info;
        if (kvs_seq_info(s, id, &info) == 0)
            b += info.bytes;
    }
    return b;
}

/* ---------------------------------------------------------------------- */

static void test_persist_blocks_lazy_equals_eager(void **state) {
    (void)state;
    char *dir = kv_temp_dir("blocks");
    build_store(dir);
    answers_t *eager = eager_answers(dir);
    answers_t *lazy = calloc(1, sizeof *lazy);
    kvs_store_t *s = open_load(dir, KVS_LOAD_LAZY, 0);
    kvs_store_stats_t st0, st;
    assert_int_equal(kvs_store_stats(s, &st0), 0);
    /* Last layer first: only that layer is read. */
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        assert_int_equal(ask_one(s, id, N_LAYERS - 1, lazy), 0);
        same_answer(eager, lazy, id, N_LAYERS - 1);
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(s, id, &info), 0);
        assert_int_equal(info.resident, 0);
        assert_int_equal(info.indexed_tokens * KVH, /* one layer's */
                         seq_tokens(id, N_LAYERS - 1) * KVH);
    }
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.resident_bytes - st0.resident_bytes, layers_bytes(s));
    for (uint64_t id = 1; id <= N_SEQS; id++)
        for (uint32_t l = 0; l + 1 < N_LAYERS; l++) {
            assert_int_equal(ask_one(s, id, l, lazy), 0);
            same_answer(eager, lazy, id, l);
        }
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(s, id, &info), 0);
        assert_int_equal(info.resident, 1);
    }
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.page_ins, 0); /* first reads are no page-ins */
    assert_int_equal(st.builds_done, 0);
    assert_int_equal(st.quarantined, 0);
    assert_int_equal(st.resident_bytes - st0.resident_bytes, layers_bytes(s));
    assert_int_equal(kvs_store_close(s), 0);

    /* The warm-up reads the rest while calls read what they need. */
    s = open_load(dir, KVS_LOAD_WARM, 0);
    memset(lazy, 0, sizeof *lazy);
    for (uint64_t id = N_SEQS; id >= 1; id--)
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            assert_int_equal(ask_one(s, id, l, lazy), 0);
            same_answer(eager, lazy, id, l);
        }
    assert_int_equal(kvs_store_close(s), 0);
    free(eager);
    free(lazy);
    kv_rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */
/* Editing records through RocksDB                                        */

enum { F_DEFAULT, F_SEQS, F_KV, F_INDEX, F_BLOCKS, F_N };

typedef struct raw_s {
    rocksdb_options_t *o;
    rocksdb_t *db;
    rocksdb_column_family_handle_t *cf[F_N];
    rocksdb_writeoptions_t *wo;
    rocksdb_readoptions_t *ro;
    int n_cf;
} raw_t;

/* n_cf 4: a format-1 store (no blocks family); 5: format 2. */
static void raw_open(raw_t *r, const char *dir, int n_cf) {
    static const char *names[F_N] = {"default", "seqs", "kv", "index",
                                     "blocks"};
    r->o = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(r->o, 1);
    rocksdb_options_set_create_missing_column_families(r->o, 1);
    rocksdb_options_set_compression(r->o, rocksdb_no_compression);
    const rocksdb_options_t *cfo[F_N] = {r->o, r->o, r->o, r->o, r->o};
    char *err = NULL;
    r->n_cf = n_cf;
    r->db =
        rocksdb_open_column_families(r->o, dir, n_cf, names, cfo, r->cf, &err);
    if (err)
        fail_msg("raw open: %s", err);
    r->wo = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(r->wo, 1);
    r->ro = rocksdb_readoptions_create();
}

static void raw_close(raw_t *r) {
    for (int i = 0; i < r->n_cf; i++)
        rocksdb_column_family_handle_destroy(r->cf[i]);
    rocksdb_close(r->db);
    rocksdb_writeoptions_destroy(r->wo);
    rocksdb_readoptions_destroy(r->ro);
    rocksdb_options_destroy(r->o);
}

static void be64(unsigned char *p, uint64_t x) {
    for (int i = 7; i >= 0; i--, x >>= 8)
        p[i] = (unsigned char)x;
}
static void be32(unsigned char *p, uint32_t x) {
    for (int i = 3; i >= 0; i--, x >>= 8)
        p[i] = (unsigned char)x;
}

/* id layer head pos (24 bytes); blocks add slot 0. */
static size_t rec_key(unsigned char k[28], int fam, uint64_t id, uint32_t l,
                      uint32_t h, uint64_t pos) {
    be64(k, id);
    be32(k + 8, l);
    be32(k + 12, h);
    be64(k + 16, pos);
    be32(k + 24, 0);
    return fam == F_BLOCKS ? 28 : 24;
}

static void raw_put(raw_t *r, int fam, const unsigned char *k, size_t kl,
                    const void *v, size_t vl) {
    char *err = NULL;
    rocksdb_put_cf(r->db, r->wo, r->cf[fam], (const char *)k, kl, v, vl, &err);
    if (err)
        fail_msg("raw put: %s", err);
}

/* crc | body, as the store writes every value. */
static void raw_put_crc(raw_t *r, int fam, const unsigned char *k, size_t kl,
                        const void *body, size_t len) {
    unsigned char *v = malloc(4 + len);
    memcpy(v + 4, body, len);
    uint32_t crc = kvs_crc32c(0, body, len);
    memcpy(v, &crc, 4);
    raw_put(r, fam, k, kl, v, 4 + len);
    free(v);
}

/* How one record of (id, layer 1, head 1, position SEG) is damaged. */
enum { DMG_BLOCK_CRC, DMG_BLOCK_MISSING, DMG_META_CRC, DMG_META_DECODE };

static void damage(const char *dir, uint64_t id, int how) {
    raw_t r;
    raw_open(&r, dir, F_N);
    int fam = how <= DMG_BLOCK_MISSING ? F_BLOCKS : F_INDEX;
    unsigned char k[28];
    size_t kl = rec_key(k, fam, id, 1, 1, SEG);
    char *err = NULL;
    size_t vl = 0;
    char *v =
        rocksdb_get_cf(r.db, r.ro, r.cf[fam], (const char *)k, kl, &vl, &err);
    assert_null(err);
    assert_non_null(v);
    assert_true(vl > 200);
    if (how == DMG_BLOCK_MISSING) {
        rocksdb_delete_cf(r.db, r.wo, r.cf[fam], (const char *)k, kl, &err);
        assert_null(err);
    } else if (how == DMG_META_DECODE) {
        /* A CRC-valid record whose first cluster offset is not 0 (the
         * offsets follow the 40-byte header). */
        uint32_t bad = 1;
        memcpy(v + 4 + 40, &bad, 4);
        raw_put_crc(&r, fam, k, kl, v + 4, vl - 4);
    } else {
        v[vl / 2] ^= 0x10;
        raw_put(&r, fam, k, kl, v, vl);
    }
    rocksdb_free(v);
    raw_close(&r);
}

static void test_persist_blocks_damage_first_use(void **state) {
    (void)state;
    static const char *const hows[4] = {"K/V block CRC", "K/V block missing",
                                        "metadata CRC", "metadata decoding"};
    static const char *const says[4] = {"checksum", "missing", "checksum",
                                        "offsets"};
    char *pristine = kv_temp_dir("blocks-p"), *dir = kv_temp_dir("blocks");
    build_store(pristine);
    answers_t *eager = eager_answers(pristine);
    answers_t *a = calloc(1, sizeof *a);
    const uint64_t victim = 2;
    for (int how = 0; how < 4; how++) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -a '%s' '%s'", dir,
                 pristine, dir);
        assert_int_equal(system(cmd), 0);
        damage(dir, victim, how);
        kvs_store_t *s = open_load(dir, KVS_LOAD_LAZY, 0);
        /* Layer 0 of the victim is whole: served until the damage of
         * layer 1 is found. */
        assert_int_equal(ask_one(s, victim, 0, a), 0);
        same_answer(eager, a, victim, 0);
        float q[QH * D], out[QH * D];
        query_of(victim, 1, q);
        int rc = kvs_seq_attend(s, victim, 1, q, NULL, out, NULL);
        if (rc != KVS_ECORRUPT)
            fail_msg("%s: first use gave %d (%s)", hows[how], rc,
                     kvs_store_errmsg(s));
        if (!strstr(kvs_store_errmsg(s), "sequence 2:") ||
            !strstr(kvs_store_errmsg(s), says[how]))
            fail_msg("%s: message: %s", hows[how], kvs_store_errmsg(s));
        print_message("%s: %s\n", hows[how], kvs_store_errmsg(s));
        assert_int_equal(kvs_seq_attend(s, victim, 0, q, NULL, out, NULL),
                         KVS_EQUARANTINED);
        for (uint64_t id = 1; id <= N_SEQS; id++)
            for (uint32_t l = 0; l < N_LAYERS && id != victim; l++) {
                assert_int_equal(ask_one(s, id, l, a), 0);
                same_answer(eager, a, id, l);
            }
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 1);
        assert_int_equal(kvs_store_close(s), 0);
        /* Eager: found at open, the same sequence only. */
        s = open_load(dir, KVS_LOAD_EAGER, 0);
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 1);
        assert_int_equal(kvs_seq_attend(s, victim, 0, q, NULL, out, NULL),
                         KVS_EQUARANTINED);
        assert_int_equal(ask_one(s, 1, 1, a), 0);
        same_answer(eager, a, 1, 1);
        assert_int_equal(kvs_store_close(s), 0);
    }
    free(eager);
    free(a);
    kv_rm_rf(dir);
    kv_rm_rf(pristine);
    free(dir);
    free(pristine);
}

/* ---------------------------------------------------------------------- */

typedef struct stress_s {
    kvs_store_t *s;
    const answers_t *eager;
    int tid;
    int rounds;
    int failed;
} stress_t;

/* Search and read (attend would add observed-query reservoirs to the
 * resident bytes) over (seq, layer) pairs in an order of its own. */
static void *stress_main(void *arg) {
    stress_t *t = arg;
    answers_t *a = calloc(1, sizeof *a);
    for (int i = 0; i < t->rounds && !t->failed; i++) {
        uint64_t id = 1 + (uint64_t)(i * (t->tid + 1) + t->tid) % N_SEQS;
        uint32_t l = (uint32_t)(i + 2 * t->tid) % N_LAYERS;
        float q[QH * D];
        query_of(id, l, q);
        if (kvs_seq_search(t->s, id, l, q, TOPK, NULL, a->pos[id][l],
                           a->score[id][l]) ||
            memcmp(a->pos[id][l], t->eager->pos[id][l], sizeof a->pos[id][l]) ||
            memcmp(a->score[id][l], t->eager->score[id][l],
                   sizeof a->score[id][l]))
            t->failed = 1;
    }
    free(a);
    return NULL;
}

static void test_persist_blocks_evict_partly_read(void **state) {
    (void)state;
    char *dir = kv_temp_dir("blocks");
    build_store(dir);
    answers_t *eager = eager_answers(dir);
    /* Measure one layer, then give room for about two. */
    kvs_store_t *s = open_load(dir, KVS_LOAD_LAZY, 0);
    kvs_store_stats_t st0, st;
    assert_int_equal(kvs_store_stats(s, &st0), 0);
    answers_t *a = calloc(1, sizeof *a);
    assert_int_equal(ask_one(s, 1, 0, a), 0);
    assert_int_equal(kvs_store_stats(s, &st), 0);
    const uint64_t layer = st.resident_bytes - st0.resident_bytes;
    assert_int_equal(kvs_store_close(s), 0);
    const uint64_t budget = st0.resident_bytes + 2 * layer + layer / 2;
    s = open_load(dir, KVS_LOAD_LAZY, budget);
    enum { THREADS = 3, ROUNDS = 60 };
    stress_t t[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        t[i] = (stress_t){s, eager, i, ROUNDS, 0};
        assert_int_equal(pthread_create(&th[i], NULL, stress_main, &t[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(t[i].failed, 0);
    }
    assert_int_equal(kvs_store_stats(s, &st), 0);
    print_message("budget %.0f KB (a layer %.0f KB): %llu evictions, %llu "
                  "page-ins, resident %.0f KB\n",
                  budget / 1e3, layer / 1e3, (unsigned long long)st.evictions,
                  (unsigned long long)st.page_ins, st.resident_bytes / 1e3);
    assert_true(st.evictions > 0);
    assert_int_equal(st.quarantined, 0);
    /* A page-in may go over by the layer it reads (which is kept). */
    assert_true(st.resident_bytes <= budget + 2 * layer);
    /* True: the bookkeeping equals what the resident layers hold. */
    assert_int_equal(st.resident_bytes - st0.resident_bytes, layers_bytes(s));
    /* And everything still reads back. */
    for (uint64_t id = 1; id <= N_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            assert_int_equal(ask_one(s, id, l, a), 0);
            same_answer(eager, a, id, l);
        }
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.resident_bytes - st0.resident_bytes, layers_bytes(s));
    assert_int_equal(kvs_store_close(s), 0);
    free(a);
    free(eager);
    kv_rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

/* A format-1 store written by hand: the format record (version 1), the
 * sequences' metadata, segment records with their K/V inside (the version-2
 * encoder, kvs_segment_encode) built as the engine builds them, and the
 * rows after the last segment. */
static void write_format1(const char *dir, uint64_t tail) {
    kvs_options_t o;
    kvs_options_default(&o);
    raw_t r;
    raw_open(&r, dir, 4);
    uint32_t fmt[5] = {0, 1, SEG, o.sink_tokens, o.window_tokens};
    fmt[0] = kvs_crc32c(0, fmt + 1, 16);
    static const char fkey[] = "kvstore-format";
    rocksdb_put_cf(r.db, r.wo, r.cf[F_DEFAULT], fkey, sizeof fkey - 1,
                   (const char *)fmt, sizeof fmt, &(char *){NULL});
    const size_t rb = D * 2;
    for (uint64_t id = 1; id <= N_SEQS; id++) {
        unsigned char k[28];
        be64(k, id);
        uint32_t f[7] = {1, N_LAYERS, QH, KVH, D, KVS_DTYPE_F16, 0};
        raw_put_crc(&r, F_SEQS, k, 8, f, sizeof f);
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            uint64_t n = seq_tokens(id, l) + tail;
            uint16_t *kk = malloc(n * KVH * rb), *vv = malloc(n * KVH * rb);
            uint16_t *hk = malloc(n * rb), *hv = malloc(n * rb);
            kv_rows_make(KVH * D, id, l, 0, (uint32_t)n, kk, vv);
            for (uint32_t h = 0; h < KVH; h++) {
                for (uint64_t t = 0; t < n; t++) {
                    memcpy(hk + t * D, kk + (t * KVH + h) * D, rb);
                    memcpy(hv + t * D, vv + (t * KVH + h) * D, rb);
                }
                uint64_t pos = 0;
                for (; pos + SEG <= n; pos += SEG) {
                    kvs_build_params_t bp = {
                        .cluster_tokens = o.cluster_tokens,
                        .kmeans_iters = o.kmeans_iters,
                        .sink_tokens = o.sink_tokens,
                        .window_tokens = o.window_tokens,
                        .seed = 1234 + pos,
                    };
                    kvs_segment_t *seg = NULL;
                    assert_int_equal(kvs_segment_build(&bp, KVS_DTYPE_F16, D,
                                                       pos, SEG, hk + pos * D,
                                                       hv + pos * D, &seg, NULL,
                                                       0),
                                     0);
                    size_t len = kvs_segment_encoded_size(seg);
                    void *buf = malloc(len);
                    kvs_segment_encode(seg, buf);
                    rec_key(k, F_INDEX, id, l, h, pos);
                    raw_put_crc(&r, F_INDEX, k, 24, buf, len);
                    free(buf);
                    kvs_segment_free(seg);
                }
                if (pos < n) { /* crc | n | keys | values */
                    uint32_t m = (uint32_t)(n - pos);
                    unsigned char *body = malloc(4 + 2 * rb * m);
                    memcpy(body, &m, 4);
                    memcpy(body + 4, hk + pos * D, rb * m);
                    memcpy(body + 4 + rb * m, hv + pos * D, rb * m);
                    rec_key(k, F_KV, id, l, h, pos);
                    raw_put_crc(&r, F_KV, k, 24, body, 4 + 2 * rb * m);
                    free(body);
                }
            }
            free(kk), free(vv), free(hk), free(hv);
        }
    }
    raw_close(&r);
}

static uint32_t format_version(const char *dir) {
    raw_t r;
    raw_open(&r, dir, F_N);
    static const char fkey[] = "kvstore-format";
    char *err = NULL;
    size_t vl = 0;
    char *v = rocksdb_get_cf(r.db, r.ro, r.cf[F_DEFAULT], fkey, sizeof fkey - 1,
                             &vl, &err);
    assert_null(err);
    assert_int_equal(vl, 20);
    uint32_t f[5];
    memcpy(f, v, 20);
    rocksdb_free(v);
    raw_close(&r);
    assert_int_equal(f[0], kvs_crc32c(0, f + 1, 16));
    return f[1];
}

static void test_persist_blocks_format1_opens(void **state) {
    (void)state;
    char *dir = kv_temp_dir("blocks-f1"), *ref = kv_temp_dir("blocks");
    /* 40 rows after the segments: a format-1 store with rows too. */
    write_format1(dir, 40);
    /* The reference: the engine builds the same rows (then 40 more). */
    build_store(ref);
    kvs_store_t *s = open_load(ref, KVS_LOAD_EAGER, 0);
    for (uint64_t id = 1; id <= N_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++)
            append_tokens(s, id, l, seq_tokens(id, l), 40);
    assert_int_equal(kvs_store_close(s), 0);
    answers_t *want = calloc(1, sizeof *want), *a = calloc(1, sizeof *a);
    float q[QH * D];
    s = open_load(ref, KVS_LOAD_EAGER, 0);
    for (uint64_t id = 1; id <= N_SEQS; id++)
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            query_of(id, l, q);
            assert_int_equal(
                kvs_seq_attend(s, id, l, q, NULL, want->attend[id][l], NULL),
                0);
        }
    assert_int_equal(kvs_store_close(s), 0);
    assert_int_equal(format_version(ref), 2);

    for (int lazy = 0; lazy < 2; lazy++) {
        s = open_load(dir, lazy ? KVS_LOAD_LAZY : KVS_LOAD_EAGER, 0);
        for (uint64_t id = 1; id <= N_SEQS; id++)
            for (uint32_t l = 0; l < N_LAYERS; l++) {
                query_of(id, l, q);
                assert_int_equal(
                    kvs_seq_attend(s, id, l, q, NULL, a->attend[id][l], NULL),
                    0);
                if (memcmp(a->attend[id][l], want->attend[id][l],
                           sizeof a->attend[id][l]))
                    fail_msg("format-1 store (%s open): sequence %llu layer "
                             "%u answers differently",
                             lazy ? "lazy" : "eager", (unsigned long long)id,
                             l);
            }
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 0);
        assert_int_equal(st.builds_done, 0);
        assert_int_equal(kvs_store_close(s), 0);
        assert_int_equal(format_version(dir), 2);
    }
    /* New segments beside the old ones: written split, read back. */
    s = open_load(dir, KVS_LOAD_LAZY, 0);
    for (uint32_t l = 0; l < N_LAYERS; l++)
        append_tokens(s, 1, l, seq_tokens(1, l) + 40, SEG);
    assert_int_equal(kvs_seq_wait_indexed(s, 1), 0);
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 1, &info), 0);
    float out[QH * D];
    query_of(1, 0, q);
    assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, out, NULL), 0);
    assert_int_equal(kvs_store_close(s), 0);
    for (int lazy = 0; lazy < 2; lazy++) {
        s = open_load(dir, lazy ? KVS_LOAD_LAZY : KVS_LOAD_EAGER, 0);
        float again[QH * D];
        assert_int_equal(kvs_seq_attend(s, 1, 0, q, NULL, again, NULL), 0);
        assert_memory_equal(out, again, sizeof out);
        kvs_seq_info_t info2;
        assert_int_equal(kvs_seq_info(s, 1, &info2), 0);
        if (lazy) /* read layer by layer: the others too */
            for (uint32_t l = 1; l < N_LAYERS; l++)
                assert_int_equal(kvs_seq_attend(s, 1, l, q, NULL, again, NULL),
                                 0);
        assert_int_equal(kvs_seq_info(s, 1, &info2), 0);
        assert_int_equal(info2.segments, info.segments);
        uint64_t n = seq_tokens(1, 2) + 40 + SEG;
        size_t bytes = n * KVH * D * 2;
        uint16_t *k = malloc(bytes), *v = malloc(bytes);
        uint16_t *ek = malloc(bytes), *ev = malloc(bytes);
        kv_rows_make(KVH * D, 1, 2, 0, (uint32_t)n, ek, ev);
        assert_int_equal(kvs_seq_read(s, 1, 2, 0, (uint32_t)n, k, v), 0);
        assert_memory_equal(k, ek, bytes);
        assert_memory_equal(v, ev, bytes);
        free(k), free(v), free(ek), free(ev);
        assert_int_equal(kvs_store_close(s), 0);
    }
    free(want);
    free(a);
    kv_rm_rf(dir);
    kv_rm_rf(ref);
    free(dir);
    free(ref);
}

/* A head_dim that is not a multiple of 32 (80) has codes (padded to 96
 * dims) in its metadata records: after a restart, eager or lazy, the
 * codes ranking serves it (KVS_RANK_CODES is not refused) and every
 * answer is the one given before the restart, bit for bit. */
static void test_persist_blocks_padded_codes(void **state) {
    (void)state;
    enum { PD = 80, PL = 2 };
    const kvs_geometry_t geo = {PL, QH, KVH, PD, KVS_DTYPE_F16};
    char *dir = kv_temp_dir("blocks-d80");
    kvs_store_t *s = open_load(dir, KVS_LOAD_EAGER, 0);
    assert_int_equal(kvs_seq_create(s, 1, &geo), 0);
    for (uint32_t l = 0; l < PL; l++)
        kv_store_append(s, 1, l, 0, 3 * SEG + 17, KVH * PD);
    assert_int_equal(kvs_seq_wait_indexed(s, 1), 0);
    kvs_query_params_t codes;
    kvs_query_params_default(&codes);
    codes.rank = KVS_RANK_CODES;
    float q[QH * PD], want[PL][2][QH * PD], got[QH * PD];
    for (int i = 0; i < QH * PD; i++)
        q[i] = kv_rows_elem(7, 0, 0, (uint32_t)i, 0);
    for (uint32_t l = 0; l < PL; l++) {
        assert_int_equal(kvs_seq_attend(s, 1, l, q, &codes, want[l][0], NULL),
                         0);
        assert_int_equal(kvs_seq_attend(s, 1, l, q, NULL, want[l][1], NULL), 0);
    }
    assert_int_equal(kvs_store_close(s), 0);
    for (int lazy = 0; lazy < 2; lazy++) {
        s = open_load(dir, lazy ? KVS_LOAD_LAZY : KVS_LOAD_EAGER, 0);
        for (uint32_t l = 0; l < PL; l++) {
            assert_int_equal(kvs_seq_attend(s, 1, l, q, &codes, got, NULL), 0);
            assert_memory_equal(got, want[l][0], sizeof got);
            assert_int_equal(kvs_seq_attend(s, 1, l, q, NULL, got, NULL), 0);
            assert_memory_equal(got, want[l][1], sizeof got);
        }
        kvs_store_stats_t st;
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 0);
        assert_int_equal(st.builds_done, 0);
        assert_int_equal(kvs_store_close(s), 0);
    }
    kv_rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

/* Appends and forks on a lazily opened store read only the layers they
 * touch (a fork reads each layer of the parent in turn); what they write
 * reads back after another restart, bit for bit. */
static void test_persist_blocks_append_fork_lazy(void **state) {
    (void)state;
    char *dir = kv_temp_dir("blocks");
    build_store(dir);
    kvs_store_t *s = open_load(dir, KVS_LOAD_LAZY, 0);
    kvs_store_stats_t st0, st;
    assert_int_equal(kvs_store_stats(s, &st0), 0);
    /* Layer 1 of sequence 3 only: a partial segment's rows, then a whole
     * segment more (built and stored split). */
    append_tokens(s, 3, 1, seq_tokens(3, 1), 40);
    append_tokens(s, 3, 1, seq_tokens(3, 1) + 40, SEG);
    assert_int_equal(kvs_seq_wait_indexed(s, 3), 0);
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(s, 3, &info), 0);
    assert_int_equal(info.resident, 0);
    assert_int_equal(info.tokens_max, seq_tokens(3, 1) + 40 + SEG);
    /* A fork of sequence 4 at a position inside its second segment. */
    assert_int_equal(kvs_seq_fork(s, 4, SEG + 100, 9), 0);
    assert_int_equal(kvs_seq_info(s, 4, &info), 0);
    assert_int_equal(info.resident, 1); /* the fork read every layer */
    assert_int_equal(kvs_store_stats(s, &st), 0);
    assert_int_equal(st.page_ins, 0);
    assert_int_equal(st.quarantined, 0);
    assert_int_equal(kvs_store_close(s), 0);
    for (int lazy = 0; lazy < 2; lazy++) {
        s = open_load(dir, lazy ? KVS_LOAD_LAZY : KVS_LOAD_EAGER, 0);
        uint64_t n = seq_tokens(3, 1) + 40 + SEG;
        size_t bytes = n * KVH * D * 2;
        uint16_t *k = malloc(bytes), *v = malloc(bytes);
        uint16_t *ek = malloc(bytes), *ev = malloc(bytes);
        kv_rows_make(KVH * D, 3, 1, 0, (uint32_t)n, ek, ev);
        assert_int_equal(kvs_seq_read(s, 3, 1, 0, (uint32_t)n, k, v), 0);
        assert_memory_equal(k, ek, bytes);
        assert_memory_equal(v, ev, bytes);
        for (uint32_t l = 0; l < N_LAYERS; l++) {
            n = SEG + 100;
            kv_rows_make(KVH * D, 4, l, 0, (uint32_t)n, ek, ev);
            assert_int_equal(kvs_seq_read(s, 9, l, 0, (uint32_t)n, k, v), 0);
            assert_memory_equal(k, ek, n * KVH * D * 2);
            assert_memory_equal(v, ev, n * KVH * D * 2);
        }
        free(k), free(v), free(ek), free(ev);
        assert_int_equal(kvs_store_stats(s, &st), 0);
        assert_int_equal(st.quarantined, 0);
        assert_int_equal(kvs_store_close(s), 0);
    }
    kv_rm_rf(dir);
    free(dir);
}

/* ---------------------------------------------------------------------- */

/* The two new decoders on damaged input (what a CRC collision or a bug in
 * a writer would hand them): a metadata record and a K/V block, each with
 * bytes flipped, truncated or extended, seeded. Whatever decodes and
 * attaches must be safe to attend and search (run under ASan/UBSan). */
static void test_persist_blocks_decoders_mutated(void **state) {
    (void)state;
    kvs_options_t o;
    kvs_options_default(&o);
    kvs_build_params_t bp = {.cluster_tokens = o.cluster_tokens,
                             .kmeans_iters = o.kmeans_iters,
                             .sink_tokens = 4,
                             .window_tokens = 16,
                             .seed = 7};
    enum { N = 128 };
    uint16_t *k = malloc(N * D * 2), *v = malloc(N * D * 2);
    kv_rows_make(D, 9, 0, 0, N, k, v);
    kvs_segment_t *seg = NULL;
    assert_int_equal(
        kvs_segment_build(&bp, KVS_DTYPE_F16, D, 0, N, k, v, &seg, NULL, 0), 0);
    size_t ml = kvs_segment_meta_encoded_size(seg);
    size_t bl = kvs_segment_kv_block_size(seg, N / 2);
    unsigned char *meta = malloc(ml + 64), *blk[2];
    kvs_segment_meta_encode(seg, meta);
    for (int b = 0; b < 2; b++) {
        blk[b] = malloc(bl + 64);
        kvs_segment_kv_block_encode(seg, b * (N / 2), N / 2, blk[b]);
    }
    /* Intact: decodes, attaches in two blocks, equals the original. */
    kvs_segment_t *back = NULL;
    assert_int_equal(kvs_segment_meta_decode(meta, ml, &back, NULL, 0), 0);
    assert_null(back->keys);
    uint32_t next = 0;
    assert_int_not_equal(
        kvs_segment_kv_attach(back, blk[1], bl, &next, NULL, 0), 0);
    assert_int_equal(kvs_segment_kv_attach(back, blk[0], bl, &next, NULL, 0),
                     0);
    assert_int_equal(kvs_segment_kv_attach(back, blk[1], bl, &next, NULL, 0),
                     0);
    assert_int_equal(next, N);
    assert_memory_equal(back->keys, seg->keys, (size_t)N * D * 2);
    assert_memory_equal(back->values, seg->values, (size_t)N * D * 2);
    kvs_segment_free(back);
    /* A metadata record is not a whole segment. */
    assert_int_equal(kvs_segment_decode(meta, ml, &back, NULL, 0),
                     KVS_ECORRUPT);

    unsigned seed = 12345;
    int decoded = 0, attached = 0;
    kvs_scratch_t *sc = kvs_scratch_new();
    unsigned char *m2 = malloc(ml + 64), *b2 = malloc(bl + 64);
    for (int i = 0; i < 3000; i++) {
        memcpy(m2, meta, ml);
        memcpy(b2, blk[0], bl);
        size_t mlen = ml, blen = bl;
        int what = rand_r(&seed) % 4;
        unsigned char *x = i % 2 ? b2 : m2;
        size_t *xl = i % 2 ? &blen : &mlen;
        if (what < 2) {
            for (int f = 0; f < 1 + what * 3; f++)
                x[rand_r(&seed) % (what ? 64 : *xl)] ^=
                    (unsigned char)(1 + rand_r(&seed) % 255);
        } else if (what == 2) {
            *xl = rand_r(&seed) % *xl;
        } else {
            memset(x + *xl, 0, 8);
            *xl += 1 + rand_r(&seed) % 8;
        }
        char err[160];
        kvs_segment_t *s2 = NULL;
        if (kvs_segment_meta_decode(m2, mlen, &s2, err, sizeof err))
            continue;
        decoded++;
        next = 0;
        int ok =
            !s2->keys &&
            kvs_segment_kv_attach(s2, b2, blen, &next, err, sizeof err) == 0 &&
            kvs_segment_kv_attach(s2, blk[1], bl, &next, err, sizeof err) ==
                0 &&
            next == s2->n_tokens;
        if (ok) {
            attached++;
            kvs_segment_t *segs[1] = {s2};
            kvs_head_view_t view = {.dtype = s2->dtype,
                                    .d = s2->d,
                                    .segments = segs,
                                    .n_segments = 1,
                                    .indexed_tokens = s2->n_tokens,
                                    .sink_tokens = 4,
                                    .window_tokens = 16};
            s2->first_pos = 0;
            float q[2 * D], out[2 * D];
            for (int j = 0; j < 2 * D; j++)
                q[j] = (float)(j % 7) * 0.1f - 0.3f;
            kvs_zone_params_t zp = {.retrieval_fraction = 0.2f,
                                    .estimation_fraction = 0.3f,
                                    .scale = 0.2f};
            kvs_head_attend(&view, q, 2, &zp, sc, out, NULL);
            int64_t pos[4];
            float scv[4];
            kvs_head_search(&view, q, 4, &zp, sc, pos, scv, NULL);
        }
        kvs_segment_free(s2);
    }
    print_message("3000 mutated records: %d metadata records decoded, %d "
                  "segments whole and attended\n",
                  decoded, attached);
    assert_true(attached > 0);
    kvs_scratch_free(sc);
    free(m2), free(b2), free(meta), free(blk[0]), free(blk[1]);
    free(k), free(v);
    kvs_segment_free(seg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_persist_blocks_decoders_mutated),
        cmocka_unit_test(test_persist_blocks_lazy_equals_eager),
        cmocka_unit_test(test_persist_blocks_damage_first_use),
        cmocka_unit_test(test_persist_blocks_evict_partly_read),
        cmocka_unit_test(test_persist_blocks_format1_opens),
        cmocka_unit_test(test_persist_blocks_append_fork_lazy),
        cmocka_unit_test(test_persist_blocks_padded_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
