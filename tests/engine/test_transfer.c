/*
 * test_transfer.c: kvs_seq_export / kvs_seq_import_* (engine/transfer.c)
 * and kvs_seq_drop_if_covered. An imported sequence answers attend and
 * search bit for bit as its source, also after a restart of the importing
 * store; the ownership rule (an import replaces only a copy it extends,
 * equals or shorter copies change nothing, anything else is a conflict);
 * damaged, cut, foreign and misordered streams are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvstore.h"

enum { L = 2, QH = 4, KVH = 2, D = 32, SEG = 512 };

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2 - 1);
}

static const kvs_geometry_t geo = {.n_layers = L,
                                   .n_q_heads = QH,
                                   .n_kv_heads = KVH,
                                   .head_dim = D,
                                   .dtype = KVS_DTYPE_F32};

static char *tmpdir(void) {
    char *d = strdup("/tmp/kvs_transfer_XXXXXX");
    assert_non_null(mkdtemp(d));
    return d;
}

static void rm_rf(char *d) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d);
    assert_int_equal(system(cmd), 0);
    free(d);
}

static kvs_store_t *open_store(const char *dir, uint32_t seg) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = seg;
    o.n_threads = 2;
    o.deterministic = 1;
    o.data_dir = dir;
    kvs_store_t *s = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc)
        fail_msg("open: %s", kvs_strerror(rc));
    return s;
}

/* n tokens of random rows to every layer. */
static void append_random(kvs_store_t *s, uint64_t id, uint32_t n) {
    size_t m = (size_t)n * KVH * D;
    float *k = malloc(m * sizeof *k), *v = malloc(m * sizeof *v);
    assert_non_null(k);
    assert_non_null(v);
    for (uint32_t l = 0; l < L; l++) {
        for (size_t i = 0; i < m; i++) {
            k[i] = frand();
            v[i] = frand();
        }
        assert_int_equal(kvs_seq_append(s, id, l, n, k, v), 0);
    }
    free(k);
    free(v);
}

typedef struct stream_s {
    uint8_t *p;
    size_t len, cap, chunks, max_chunk;
} stream_t;

static int sink(void *ctx, const void *data, size_t len) {
    stream_t *st = ctx;
    assert_true(len > 0 && len <= st->max_chunk);
    if (st->len + len > st->cap) {
        st->cap = 2 * (st->len + len);
        st->p = realloc(st->p, st->cap);
        assert_non_null(st->p);
    }
    memcpy(st->p + st->len, data, len);
    st->len += len;
    st->chunks++;
    return 0;
}

static stream_t export_seq(kvs_store_t *s, uint64_t id, size_t max_chunk) {
    stream_t st = {.max_chunk = max_chunk};
    int rc = kvs_seq_export(s, id, max_chunk, sink, &st);
    if (rc)
        fail_msg("export: %s (%s)", kvs_strerror(rc), kvs_store_errmsg(s));
    return st;
}

/* Import `st` in pieces of `piece` bytes; returns end's code. */
static int import_seq(kvs_store_t *s, uint64_t id, const stream_t *st,
                      size_t piece, kvs_import_result_t *res) {
    kvs_import_t *im = NULL;
    assert_int_equal(kvs_seq_import_begin(s, id, &im), 0);
    for (size_t off = 0; off < st->len; off += piece) {
        size_t n = st->len - off < piece ? st->len - off : piece;
        int rc = kvs_seq_import_chunk(im, st->p + off, n);
        if (rc) {
            kvs_seq_import_abort(im);
            return rc;
        }
    }
    return kvs_seq_import_end(im, res);
}

/* Attend and search on every layer of `id` in a and b: bit-identical. */
static void assert_same_answers(kvs_store_t *a, kvs_store_t *b, uint64_t id) {
    float q[QH * D], oa[QH * D], ob[QH * D], sa[QH * 10], sb[QH * 10];
    int64_t pa[QH * 10], pb[QH * 10];
    for (int trial = 0; trial < 3; trial++)
        for (uint32_t l = 0; l < L; l++) {
            for (int i = 0; i < QH * D; i++)
                q[i] = 2 * frand();
            assert_int_equal(kvs_seq_attend(a, id, l, q, NULL, oa, NULL), 0);
            assert_int_equal(kvs_seq_attend(b, id, l, q, NULL, ob, NULL), 0);
            assert_memory_equal(oa, ob, sizeof oa);
            assert_int_equal(kvs_seq_search(a, id, l, q, 10, NULL, pa, sa), 0);
            assert_int_equal(kvs_seq_search(b, id, l, q, 10, NULL, pb, sb), 0);
            assert_memory_equal(pa, pb, sizeof pa);
            assert_memory_equal(sa, sb, sizeof sa);
        }
    kvs_seq_info_t ia, ib;
    assert_int_equal(kvs_seq_info(a, id, &ia), 0);
    assert_int_equal(kvs_seq_info(b, id, &ib), 0);
    assert_int_equal(ia.tokens_min, ib.tokens_min);
    assert_int_equal(ia.tokens_max, ib.tokens_max);
    assert_int_equal(ia.segments, ib.segments);
    assert_int_equal(ia.indexed_tokens, ib.indexed_tokens);
}

static void test_transfer_roundtrip(void **state) {
    (void)state;
    char *da = tmpdir(), *db = tmpdir();
    kvs_store_t *a = open_store(da, SEG), *b = open_store(db, SEG);
    assert_int_equal(kvs_seq_create(a, 7, &geo), 0);
    assert_int_equal(kvs_seq_set_ttl(a, 7, 3600), 0);
    append_random(a, 7, 3 * SEG + 100); /* three segments and a tail */
    assert_int_equal(kvs_seq_wait_indexed(a, 7), 0);

    stream_t st = export_seq(a, 7, 1000);
    assert_true(st.chunks > 10); /* pieces, not one buffer */
    kvs_import_result_t res = KVS_IMPORT_NONE;
    /* Pieces that cut records anywhere. */
    assert_int_equal(import_seq(b, 7, &st, 777, &res), 0);
    assert_int_equal(res, KVS_IMPORT_INSTALLED);
    kvs_seq_info_t ib;
    assert_int_equal(kvs_seq_info(b, 7, &ib), 0);
    assert_int_equal(ib.segments, 3 * KVH * L); /* not re-clustered */
    assert_int_equal(ib.builds_pending, 0);
    assert_same_answers(a, b, 7);

    /* Stored: a restart of b answers the same. */
    assert_int_equal(kvs_store_close(b), 0);
    b = open_store(db, SEG);
    assert_same_answers(a, b, 7);

    /* The same stream again: b holds it already. One byte at a time for
     * the first records exercises the buffering path. */
    res = KVS_IMPORT_NONE;
    assert_int_equal(import_seq(b, 7, &st, 1, &res), 0);
    assert_int_equal(res, KVS_IMPORT_CURRENT);

    /* The source grows past a segment (rows not yet built when exported
     * are built by the importer, deterministically): a longer copy
     * replaces the older one. */
    append_random(a, 7, SEG);
    stream_t st2 = export_seq(a, 7, 4096);
    assert_int_equal(import_seq(b, 7, &st2, 100000, &res), 0);
    assert_int_equal(res, KVS_IMPORT_REPLACED);
    assert_int_equal(kvs_seq_wait_indexed(a, 7), 0);
    assert_int_equal(kvs_seq_wait_indexed(b, 7), 0);
    assert_same_answers(a, b, 7);
    /* The older stream never shortens it. */
    assert_int_equal(import_seq(b, 7, &st, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_CURRENT);
    assert_same_answers(a, b, 7);

    free(st.p);
    free(st2.p);
    kvs_store_close(a);
    kvs_store_close(b);
    rm_rf(da);
    rm_rf(db);
}

/* Two copies that differ are never merged or replaced. */
static void test_transfer_conflict(void **state) {
    (void)state;
    kvs_store_t *a = open_store(NULL, SEG), *b = open_store(NULL, SEG);
    assert_int_equal(kvs_seq_create(a, 9, &geo), 0);
    assert_int_equal(kvs_seq_create(b, 9, &geo), 0);
    append_random(a, 9, 300);
    append_random(b, 9, 200); /* other rows: created apart */
    stream_t st = export_seq(a, 9, 4096);
    kvs_import_result_t res = KVS_IMPORT_INSTALLED;
    assert_int_equal(import_seq(b, 9, &st, 4096, &res), KVS_ECONFLICT);
    assert_int_equal(res, KVS_IMPORT_NONE);
    kvs_seq_info_t ib;
    assert_int_equal(kvs_seq_info(b, 9, &ib), 0);
    assert_int_equal(ib.tokens_max, 200); /* b's copy untouched */

    /* A longer copy on the importer with the same prefix: current. The
     * second import finds the copy equal, which confirms it. */
    kvs_store_t *c = open_store(NULL, SEG);
    assert_int_equal(import_seq(c, 9, &st, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_INSTALLED);
    assert_int_equal(import_seq(c, 9, &st, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_CURRENT);
    append_random(c, 9, 10);
    assert_int_equal(import_seq(c, 9, &st, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_CURRENT);
    /* ... but a source that grew differently conflicts. */
    append_random(a, 9, 20);
    stream_t st2 = export_seq(a, 9, 4096);
    assert_int_equal(import_seq(c, 9, &st2, 4096, &res), KVS_ECONFLICT);
    assert_int_equal(kvs_seq_info(c, 9, &ib), 0);
    assert_int_equal(ib.tokens_max, 310);

    /* An unconfirmed repair copy (imported, never found equal since) that
     * took appends the source lacks follows its source: replaced. */
    kvs_store_t *e = open_store(NULL, SEG);
    assert_int_equal(import_seq(e, 9, &st, 4096, &res), 0);
    append_random(e, 9, 5);
    assert_int_equal(import_seq(e, 9, &st2, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_REPLACED);
    assert_same_answers(a, e, 9);
    /* ... and once equal it is confirmed: a diverging import conflicts. */
    assert_int_equal(import_seq(e, 9, &st2, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_CURRENT);
    append_random(e, 9, 1);
    append_random(a, 9, 3);
    stream_t st3 = export_seq(a, 9, 4096);
    assert_int_equal(import_seq(e, 9, &st3, 4096, &res), KVS_ECONFLICT);
    free(st3.p);
    kvs_store_close(e);

    /* Another geometry: a conflict too. */
    kvs_geometry_t g2 = geo;
    g2.head_dim = 64;
    kvs_store_t *d = open_store(NULL, SEG);
    assert_int_equal(kvs_seq_create(d, 9, &g2), 0);
    assert_int_equal(import_seq(d, 9, &st, 4096, &res), KVS_ECONFLICT);
    free(st.p);
    free(st2.p);
    kvs_store_close(a);
    kvs_store_close(b);
    kvs_store_close(c);
    kvs_store_close(d);
}

static void test_transfer_bad_streams(void **state) {
    (void)state;
    kvs_store_t *a = open_store(NULL, SEG), *b = open_store(NULL, SEG);
    assert_int_equal(kvs_seq_create(a, 3, &geo), 0);
    append_random(a, 3, SEG + 50);
    assert_int_equal(kvs_seq_wait_indexed(a, 3), 0);
    stream_t st = export_seq(a, 3, 4096);
    kvs_import_result_t res;

    /* Cut short anywhere: refused at end, nothing installed. */
    size_t full = st.len;
    size_t cuts[] = {0, 5, 9, 70, full / 2, full - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        st.len = cuts[i];
        assert_int_equal(import_seq(b, 3, &st, 4096, &res), KVS_EPROTO);
        kvs_seq_info_t info;
        assert_int_equal(kvs_seq_info(b, 3, &info), KVS_ENOSEQ);
    }
    st.len = full;

    /* A flipped byte fails a checksum (or the length bound). */
    for (size_t at = 20; at < full; at += full / 7) {
        st.p[at] ^= 0x40;
        int rc = import_seq(b, 3, &st, 4096, &res);
        assert_true(rc == KVS_ECORRUPT || rc == KVS_ETOOBIG ||
                    rc == KVS_EPROTO);
        st.p[at] ^= 0x40;
    }

    /* Another id than the stream's. */
    assert_int_equal(import_seq(b, 4, &st, 4096, &res), KVS_EPROTO);
    /* A store cut into other segments. */
    kvs_store_t *c = open_store(NULL, 2 * SEG);
    assert_int_equal(import_seq(c, 3, &st, 4096, &res), KVS_EINVAL);
    /* Bytes after the end. */
    kvs_import_t *im;
    assert_int_equal(kvs_seq_import_begin(b, 3, &im), 0);
    assert_int_equal(kvs_seq_import_chunk(im, st.p, st.len), 0);
    assert_int_equal(kvs_seq_import_chunk(im, st.p, 70), KVS_EPROTO);
    assert_int_equal(kvs_seq_import_chunk(im, st.p, 1), KVS_EINVAL);
    assert_int_equal(kvs_seq_import_end(im, &res), KVS_EPROTO);
    /* Abort frees a half-read import. */
    assert_int_equal(kvs_seq_import_begin(b, 3, &im), 0);
    assert_int_equal(kvs_seq_import_chunk(im, st.p, st.len / 2), 0);
    kvs_seq_import_abort(im);
    /* Export errors. */
    assert_int_equal(kvs_seq_export(a, 99, 4096, sink, &st), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_export(a, 3, 8, sink, &st), KVS_EINVAL);
    /* And the intact stream still imports. */
    assert_int_equal(import_seq(b, 3, &st, 4096, &res), 0);
    assert_int_equal(res, KVS_IMPORT_INSTALLED);
    assert_same_answers(a, b, 3);
    free(st.p);
    kvs_store_close(a);
    kvs_store_close(b);
    kvs_store_close(c);
}

static int stop_after_one(void *ctx, const void *data, size_t len) {
    (void)data, (void)len;
    return ++*(int *)ctx > 1 ? KVS_ECONN : 0;
}

static void test_transfer_drop_if_covered(void **state) {
    (void)state;
    kvs_store_t *a = open_store(NULL, SEG);
    assert_int_equal(kvs_seq_create(a, 5, &geo), 0);
    append_random(a, 5, 40);
    assert_int_equal(kvs_seq_drop_if_covered(a, 5, 39), KVS_EBUSY);
    kvs_seq_info_t info;
    assert_int_equal(kvs_seq_info(a, 5, &info), 0);
    /* The callback's error stops the export and is returned. */
    int calls = 0;
    assert_int_equal(kvs_seq_export(a, 5, 64, stop_after_one, &calls),
                     KVS_ECONN);
    assert_int_equal(calls, 2);
    assert_int_equal(kvs_seq_drop_if_covered(a, 5, 40), 0);
    assert_int_equal(kvs_seq_info(a, 5, &info), KVS_ENOSEQ);
    assert_int_equal(kvs_seq_drop_if_covered(a, 5, 40), KVS_ENOSEQ);
    kvs_store_close(a);
}

typedef struct worker_s {
    kvs_store_t *s;
    uint64_t id;
    int append;
    atomic_int *stop;
    uint64_t rng;
} worker_t;

/* Until *stop: the source's writer (`append`: 8 tokens to every layer,
 * then an attend) or the importer's reader (attends; ENOSEQ allowed while
 * a replacement swaps the copies). */
static void *appender(void *arg) {
    worker_t *w = arg;
    float k[8 * KVH * D], v[8 * KVH * D], q[QH * D], o[QH * D];
    for (int i = 0; i < QH * D; i++)
        q[i] = 0.5f;
    while (!atomic_load(w->stop)) {
        for (size_t i = 0; i < 8 * KVH * D; i++) {
            w->rng = w->rng * 6364136223846793005ull + 1442695040888963407ull;
            k[i] = (float)(w->rng >> 40) / 16777216.0f - 0.5f;
            v[i] = -k[i];
        }
        for (uint32_t l = 0; l < L; l++) {
            int rc = w->append ? kvs_seq_append(w->s, w->id, l, 8, k, v) : 0;
            assert_int_equal(rc, 0);
            rc = kvs_seq_attend(w->s, w->id, l, q, NULL, o, NULL);
            if (w->append)
                assert_int_equal(rc, 0);
        }
        if (w->append)
            usleep(500); /* a few appends per export */
    }
    return NULL;
}

/* Exports while the source takes appends and attends, imports while the
 * importer's copy serves attends; once the writer stops, one more push
 * makes the copies answer alike. Run under TSan (label tsan). */
static void test_transfer_concurrent(void **state) {
    (void)state;
    kvs_store_t *a = open_store(NULL, SEG), *b = open_store(NULL, SEG);
    assert_int_equal(kvs_seq_create(a, 20, &geo), 0);
    append_random(a, 20, SEG + 88);
    atomic_int stop_a = 0, stop_b = 0;
    worker_t wa = {.s = a, .id = 20, .append = 1, .stop = &stop_a, .rng = 1};
    worker_t wb = {.s = b, .id = 20, .stop = &stop_b, .rng = 2};
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, appender, &wa), 0);
    assert_int_equal(pthread_create(&tb, NULL, appender, &wb), 0);
    int installed = 0, busy = 0;
    for (int i = 0; i < 12; i++) {
        stream_t st = export_seq(a, 20, 2048);
        kvs_import_result_t res = KVS_IMPORT_NONE;
        int rc = import_seq(b, 20, &st, 3000, &res);
        if (rc == KVS_EBUSY) {
            busy++; /* not expected without appends here; allowed */
        } else {
            assert_int_equal(rc, 0);
            installed +=
                res == KVS_IMPORT_INSTALLED || res == KVS_IMPORT_REPLACED;
        }
        free(st.p);
        usleep(3000); /* let the source grow between pushes */
    }
    atomic_store(&stop_a, 1);
    assert_int_equal(pthread_join(ta, NULL), 0);
    atomic_store(&stop_b, 1);
    assert_int_equal(pthread_join(tb, NULL), 0);
    assert_true(installed >= 1);
    /* Quiet now: the last push makes the importer's copy the source's. */
    assert_int_equal(kvs_seq_wait_indexed(a, 20), 0);
    stream_t st = export_seq(a, 20, 2048);
    kvs_import_result_t res = KVS_IMPORT_NONE;
    assert_int_equal(import_seq(b, 20, &st, 3000, &res), 0);
    assert_true(res == KVS_IMPORT_REPLACED || res == KVS_IMPORT_CURRENT ||
                res == KVS_IMPORT_INSTALLED);
    assert_int_equal(kvs_seq_wait_indexed(b, 20), 0);
    assert_same_answers(a, b, 20);
    print_message("concurrent: %d of 12 imports installed or replaced, %d "
                  "found the copy changed meanwhile (EBUSY)\n",
                  installed, busy);
    free(st.p);
    kvs_store_close(a);
    kvs_store_close(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transfer_roundtrip),
        cmocka_unit_test(test_transfer_conflict),
        cmocka_unit_test(test_transfer_bad_streams),
        cmocka_unit_test(test_transfer_drop_if_covered),
        cmocka_unit_test(test_transfer_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
