/*
 * transfer.c: a sequence as a stream of its stored records (export), and
 * the import of such a stream as a sequence of the same id without
 * re-clustering. kvstored's repair (server/repair.c) moves sequences
 * between nodes with these; the rule that decides whether an import may
 * replace an existing copy is stated in kvstore.h and docs/cluster.md.
 *
 * The stream is a run of records, little-endian:
 *   u32 len | u32 crc32c(type + body) | u8 type | body      (len = 1 + body)
 *   HEADER  magic, version, id, geometry, ttl, segment/sink/window tokens
 *   LAYER   layer, tokens, indexed (where every head's segments end)
 *   SEGMENT layer, head, kvs_segment_encode() bytes
 *   ROWS    layer, head, pos, n, keys[n][d], values[n][d]
 *   END
 * Layers come in order, each wholly (segments, then rows, head by head)
 * before the next. Exported segments end at one position in every head of
 * a layer, as a fork's do, so the imported sequence is stored the way
 * kvs_seq_fork stores a child (kvs__seq_persist).
 */
#include "engine_int.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_MAGIC 0x5853564bu /* "KVSX" */
#define STREAM_VERSION 1u
#define REC_HEAD 9u /* len, crc, type */
/* Bounds what one record may make the importer buffer. */
#define MAX_RECORD (64u << 20)
/* Rows per ROWS record: records stay near 1 MiB. */
#define ROWS_RECORD_BYTES (1u << 20)

enum {
    REC_HEADER = 1,
    REC_LAYER = 2,
    REC_SEGMENT = 3,
    REC_ROWS = 4,
    REC_END = 5
};

#define HEADER_BODY 52u
#define LAYER_BODY 20u

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* ---------------------------------------------------------------------- */
/* Export                                                                 */

typedef struct writer_s {
    kvs_export_fn fn;
    void *ctx;
    uint8_t *buf;
    size_t len, cap;
    int rc;
} writer_t;

static int w_bytes(writer_t *w, const void *data, size_t n) {
    const uint8_t *p = data;
    while (n && !w->rc) {
        size_t k = w->cap - w->len < n ? w->cap - w->len : n;
        memcpy(w->buf + w->len, p, k);
        w->len += k;
        p += k;
        n -= k;
        if (w->len == w->cap) {
            w->rc = w->fn(w->ctx, w->buf, w->len);
            w->len = 0;
        }
    }
    return w->rc;
}

/* One record: its head, then the body given in up to three parts (so that
 * rows need not be copied into one buffer first). */
static int w_record(writer_t *w, uint8_t type, const void *a, size_t na,
                    const void *b, size_t nb, const void *c, size_t nc) {
    uint8_t head[REC_HEAD];
    uint32_t crc = kvs_crc32c(0, &type, 1);
    crc = kvs_crc32c(crc, a, na);
    crc = kvs_crc32c(crc, b, nb);
    crc = kvs_crc32c(crc, c, nc);
    put32(head, (uint32_t)(1 + na + nb + nc));
    put32(head + 4, crc);
    head[8] = type;
    w_bytes(w, head, sizeof head);
    w_bytes(w, a, na);
    w_bytes(w, b, nb);
    return w_bytes(w, c, nc);
}

/* One layer as read under its lock: the segments every head has built
 * (referenced) and the rows past them (copied). */
typedef struct layer_snap_s {
    uint64_t tokens, indexed;
    uint32_t *n_segs;     /* [kvh] */
    kvs_segment_t **segs; /* [kvh][max_segs] */
    uint32_t max_segs;
    char *keys, *values; /* [kvh][tokens - indexed][d] */
} layer_snap_t;

static void snap_release(layer_snap_t *sn, uint32_t kvh) {
    if (sn->segs && sn->n_segs)
        for (uint32_t h = 0; h < kvh; h++)
            for (uint32_t i = 0; i < sn->n_segs[h]; i++)
                kvs__segment_unref(sn->segs[(size_t)h * sn->max_segs + i]);
    free(sn->n_segs);
    free(sn->segs);
    free(sn->keys);
    free(sn->values);
    memset(sn, 0, sizeof *sn);
}

/* End of the head's segments that lie wholly below `at`. */
static uint64_t segs_end_below(const head_t *hd, uint64_t at) {
    uint64_t end = 0;
    for (uint32_t i = 0; i < hd->n_segments; i++) {
        uint64_t e = hd->segments[i]->first_pos + hd->segments[i]->n_tokens;
        if (e <= at)
            end = e;
    }
    return end;
}

static int snap_layer(kvs_store_t *s, seq_t *q, uint32_t l, layer_snap_t *sn) {
    const uint32_t kvh = q->geo.n_kv_heads;
    const size_t rb = q->row_bytes;
    layer_t *L = &q->layers[l];
    int rc = kvs__layer_lock(s, q, L, 0);
    if (rc)
        return rc;
    sn->tokens = L->tokens;
    /* Heads finish builds at different times: send as segments only what
     * all of them have built (segment boundaries are the same in every
     * head, so this settles at once; the loop only guards the bound). */
    uint64_t end = sn->tokens;
    for (int again = 1; again;) {
        again = 0;
        for (uint32_t h = 0; h < kvh; h++) {
            uint64_t e = segs_end_below(&L->heads[h], end);
            if (e < end) {
                end = e;
                again = 1;
            }
        }
    }
    sn->indexed = end;
    uint32_t maxs = 0;
    for (uint32_t h = 0; h < kvh; h++)
        if (L->heads[h].n_segments > maxs)
            maxs = L->heads[h].n_segments;
    sn->max_segs = maxs;
    uint64_t rest = sn->tokens - end;
    sn->n_segs = calloc(kvh, sizeof *sn->n_segs);
    sn->segs = calloc((size_t)kvh * (maxs ? maxs : 1), sizeof *sn->segs);
    if (rest) {
        sn->keys = malloc(rest * kvh * rb);
        sn->values = malloc(rest * kvh * rb);
    }
    if (!sn->n_segs || !sn->segs || (rest && (!sn->keys || !sn->values))) {
        kvs__rwunlock(&L->lock);
        return kvs__fail(s, KVS_ENOMEM, "export of layer %u", l);
    }
    for (uint32_t h = 0; h < kvh; h++) {
        const head_t *hd = &L->heads[h];
        for (uint32_t i = 0; i < hd->n_segments; i++) {
            kvs_segment_t *sg = hd->segments[i];
            if (sg->first_pos + sg->n_tokens > end)
                break;
            __atomic_fetch_add(&sg->extra_refs, 1, __ATOMIC_RELAXED);
            sn->segs[(size_t)h * maxs + sn->n_segs[h]++] = sg;
        }
        if (rest)
            kvs__head_gather(hd, rb, end, rest, sn->keys + h * rest * rb,
                             sn->values + h * rest * rb, rb);
    }
    kvs__rwunlock(&L->lock);
    return 0;
}

static int export_layer(writer_t *w, const seq_t *q, uint32_t l,
                        const layer_snap_t *sn) {
    const uint32_t kvh = q->geo.n_kv_heads;
    const size_t rb = q->row_bytes;
    uint8_t body[LAYER_BODY];
    put32(body, l);
    put64(body + 4, sn->tokens);
    put64(body + 12, sn->indexed);
    w_record(w, REC_LAYER, body, sizeof body, NULL, 0, NULL, 0);
    for (uint32_t h = 0; h < kvh && !w->rc; h++)
        for (uint32_t i = 0; i < sn->n_segs[h] && !w->rc; i++) {
            const kvs_segment_t *sg = sn->segs[(size_t)h * sn->max_segs + i];
            size_t n = kvs_segment_encoded_size(sg);
            uint8_t *enc = malloc(n);
            if (!enc)
                return w->rc = KVS_ENOMEM;
            kvs_segment_encode(sg, enc);
            uint8_t lh[8];
            put32(lh, l);
            put32(lh + 4, h);
            w_record(w, REC_SEGMENT, lh, sizeof lh, enc, n, NULL, 0);
            free(enc);
        }
    uint64_t rest = sn->tokens - sn->indexed;
    uint64_t per = ROWS_RECORD_BYTES / (2 * rb);
    if (per == 0)
        per = 1;
    for (uint32_t h = 0; h < kvh && !w->rc; h++)
        for (uint64_t off = 0; off < rest && !w->rc; off += per) {
            uint32_t n = (uint32_t)(rest - off < per ? rest - off : per);
            uint8_t rh[24];
            put32(rh, l);
            put32(rh + 4, h);
            put64(rh + 8, sn->indexed + off);
            put32(rh + 16, n);
            put32(rh + 20, 0);
            size_t at = (h * rest + off) * rb;
            w_record(w, REC_ROWS, rh, sizeof rh, sn->keys + at, n * rb,
                     sn->values + at, n * rb);
        }
    return w->rc;
}

int kvs_seq_export(kvs_store_t *s, uint64_t id, size_t max_chunk,
                   kvs_export_fn fn, void *ctx) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!fn || max_chunk < 64)
        return kvs__fail(s, KVS_EINVAL, "export needs fn and max_chunk >= 64");
    int rc = 0;
    seq_t *q = kvs__seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    writer_t w = {.fn = fn, .ctx = ctx, .cap = max_chunk};
    const kvs_geometry_t *g = &q->geo;
    layer_snap_t sn;
    memset(&sn, 0, sizeof sn);
    if (!(w.buf = malloc(max_chunk))) {
        rc = kvs__fail(s, KVS_ENOMEM, "export buffer");
        goto out;
    }
    uint8_t hb[HEADER_BODY];
    put32(hb, STREAM_MAGIC);
    put32(hb + 4, STREAM_VERSION);
    put64(hb + 8, id);
    put32(hb + 16, g->n_layers);
    put32(hb + 20, g->n_q_heads);
    put32(hb + 24, g->n_kv_heads);
    put32(hb + 28, g->head_dim);
    put32(hb + 32, (uint32_t)g->dtype);
    put32(hb + 36, atomic_load(&q->ttl_s));
    put32(hb + 40, s->opts.segment_tokens);
    put32(hb + 44, s->opts.sink_tokens);
    put32(hb + 48, s->opts.window_tokens);
    w_record(&w, REC_HEADER, hb, sizeof hb, NULL, 0, NULL, 0);
    for (uint32_t l = 0; l < g->n_layers && !w.rc; l++) {
        if ((rc = snap_layer(s, q, l, &sn)))
            goto out;
        export_layer(&w, q, l, &sn);
        snap_release(&sn, g->n_kv_heads);
    }
    w_record(&w, REC_END, NULL, 0, NULL, 0, NULL, 0);
    if (!w.rc && w.len)
        w.rc = fn(ctx, w.buf, w.len);
    if (w.rc)
        rc = kvs__fail(s, w.rc, "export of sequence %llu stopped",
                       (unsigned long long)id);
out:
    snap_release(&sn, g->n_kv_heads);
    free(w.buf);
    kvs__seq_unref(q);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Import                                                                 */

struct kvs_import_s {
    kvs_store_t *s;
    uint64_t id;
    seq_t *q; /* staged, unlinked; NULL until the header */
    uint8_t *buf;
    size_t len, cap;
    uint32_t next_layer; /* layers started so far */
    uint64_t indexed;    /* of the current layer */
    int done, failed;
};

int kvs_seq_import_begin(kvs_store_t *s, uint64_t id, kvs_import_t **out) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!out)
        return kvs__fail(s, KVS_EINVAL, "out is NULL");
    kvs_import_t *im = calloc(1, sizeof *im);
    if (!im)
        return kvs__fail(s, KVS_ENOMEM, "import");
    im->s = s;
    im->id = id;
    *out = im;
    return 0;
}

void kvs_seq_import_abort(kvs_import_t *im) {
    if (!im)
        return;
    if (im->q)
        kvs__seq_free(im->q);
    free(im->buf);
    free(im);
}

static int bad(kvs_import_t *im, int code, const char *what) {
    return kvs__fail(im->s, code, "import of sequence %llu: %s",
                     (unsigned long long)im->id, what);
}

/* Is the current layer (next_layer - 1) whole? */
static int layer_whole(kvs_import_t *im) {
    if (im->next_layer == 0)
        return 1;
    const layer_t *L = &im->q->layers[im->next_layer - 1];
    for (uint32_t h = 0; h < im->q->geo.n_kv_heads; h++) {
        const head_t *hd = &L->heads[h];
        if (hd->indexed_tokens != im->indexed ||
            hd->indexed_tokens + hd->tail_len != L->tokens)
            return 0;
    }
    return 1;
}

static int rec_header(kvs_import_t *im, const uint8_t *b, size_t n) {
    kvs_store_t *s = im->s;
    if (im->q || n != HEADER_BODY)
        return bad(im, KVS_EPROTO, "misplaced or short header");
    if (get32(b) != STREAM_MAGIC || get32(b + 4) != STREAM_VERSION)
        return bad(im, KVS_EPROTO, "not a sequence stream of version 1");
    if (get64(b + 8) != im->id)
        return bad(im, KVS_EPROTO, "the stream is of another sequence");
    kvs_geometry_t g = {.n_layers = get32(b + 16),
                        .n_q_heads = get32(b + 20),
                        .n_kv_heads = get32(b + 24),
                        .head_dim = get32(b + 28),
                        .dtype = (kvs_dtype_t)get32(b + 32)};
    int rc = kvs__check_geometry(s, &g);
    if (rc)
        return rc;
    if (get32(b + 40) != s->opts.segment_tokens ||
        get32(b + 44) != s->opts.sink_tokens ||
        get32(b + 48) != s->opts.window_tokens)
        return kvs__fail(s, KVS_EINVAL,
                         "import of sequence %llu: cut with segment/sink/"
                         "window tokens %u/%u/%u, this store uses %u/%u/%u",
                         (unsigned long long)im->id, get32(b + 40),
                         get32(b + 44), get32(b + 48), s->opts.segment_tokens,
                         s->opts.sink_tokens, s->opts.window_tokens);
    if ((rc = kvs__seq_new(s, im->id, &g, &im->q)))
        return rc;
    atomic_store(&im->q->ttl_s, get32(b + 36));
    return 0;
}

static int rec_layer(kvs_import_t *im, const uint8_t *b, size_t n) {
    if (!im->q || n != LAYER_BODY)
        return bad(im, KVS_EPROTO, "misplaced or short layer record");
    if (!layer_whole(im))
        return bad(im, KVS_EPROTO, "a layer ended before its tokens");
    uint32_t l = get32(b);
    uint64_t tokens = get64(b + 4), indexed = get64(b + 12);
    if (l != im->next_layer || l >= im->q->geo.n_layers)
        return bad(im, KVS_EPROTO, "layers out of order");
    if (indexed > tokens || tokens > (1ull << 40))
        return bad(im, KVS_EPROTO, "layer extent out of range");
    im->q->layers[l].tokens = tokens;
    im->indexed = indexed;
    im->next_layer++;
    return 0;
}

/* The current layer and head a SEGMENT or ROWS record names. */
static int rec_place(kvs_import_t *im, const uint8_t *b, size_t n, size_t min,
                     layer_t **L, head_t **hd) {
    if (!im->q || im->next_layer == 0 || n < min)
        return bad(im, KVS_EPROTO, "misplaced or short record");
    uint32_t l = get32(b), h = get32(b + 4);
    if (l != im->next_layer - 1 || h >= im->q->geo.n_kv_heads)
        return bad(im, KVS_EPROTO, "record of another layer or no head");
    *L = &im->q->layers[l];
    *hd = &(*L)->heads[h];
    return 0;
}

static int rec_segment(kvs_import_t *im, const uint8_t *b, size_t n) {
    layer_t *L;
    head_t *hd;
    int rc = rec_place(im, b, n, 8, &L, &hd);
    if (rc)
        return rc;
    char err[160] = "";
    kvs_segment_t *sg = NULL;
    if ((rc = kvs_segment_decode(b + 8, n - 8, &sg, err, sizeof err)))
        return kvs__fail(im->s, rc, "import of sequence %llu: segment: %s",
                         (unsigned long long)im->id, err);
    const kvs_geometry_t *g = &im->q->geo;
    if (sg->d != g->head_dim || sg->dtype != g->dtype || sg->n_tokens == 0 ||
        hd->tail_len || sg->first_pos != hd->indexed_tokens ||
        sg->first_pos + sg->n_tokens > im->indexed) {
        kvs_segment_free(sg);
        return bad(im, KVS_EPROTO, "segment out of place or of other shape");
    }
    if (hd->n_segments == hd->segments_cap) {
        uint32_t cap = hd->segments_cap ? 2 * hd->segments_cap : 8;
        kvs_segment_t **a = realloc(hd->segments, cap * sizeof *a);
        if (!a) {
            kvs_segment_free(sg);
            return bad(im, KVS_ENOMEM, "segments");
        }
        hd->segments = a;
        hd->segments_cap = cap;
    }
    hd->segments[hd->n_segments++] = sg;
    hd->indexed_tokens += sg->n_tokens;
    return 0;
}

static int rec_rows(kvs_import_t *im, const uint8_t *b, size_t n) {
    layer_t *L;
    head_t *hd;
    int rc = rec_place(im, b, n, 24, &L, &hd);
    if (rc)
        return rc;
    const size_t rb = im->q->row_bytes;
    uint64_t pos = get64(b + 8);
    uint32_t k = get32(b + 16);
    if (k == 0 || (n - 24) / 2 / rb != k || n - 24 != 2 * (size_t)k * rb)
        return bad(im, KVS_EPROTO, "rows record of the wrong size");
    if (hd->indexed_tokens != im->indexed ||
        pos != hd->indexed_tokens + hd->tail_len || pos + k > L->tokens)
        return bad(im, KVS_EPROTO, "rows out of place");
    if (kvs__head_reserve(hd, rb, k))
        return bad(im, KVS_ENOMEM, "rows");
    size_t at = (hd->tail_start + hd->tail_len) * rb;
    memcpy(hd->tail_keys + at, b + 24, k * rb);
    memcpy(hd->tail_values + at, b + 24 + k * rb, k * rb);
    hd->tail_len += k;
    return 0;
}

static int rec_end(kvs_import_t *im, size_t n) {
    if (!im->q || n != 0 || im->next_layer != im->q->geo.n_layers ||
        !layer_whole(im))
        return bad(im, KVS_EPROTO, "the stream ended before its layers");
    im->done = 1;
    return 0;
}

static int record(kvs_import_t *im, uint8_t type, const uint8_t *b, size_t n) {
    if (im->done)
        return bad(im, KVS_EPROTO, "a record after the end");
    switch (type) {
    case REC_HEADER:
        return rec_header(im, b, n);
    case REC_LAYER:
        return rec_layer(im, b, n);
    case REC_SEGMENT:
        return rec_segment(im, b, n);
    case REC_ROWS:
        return rec_rows(im, b, n);
    case REC_END:
        return rec_end(im, n);
    default:
        return bad(im, KVS_EPROTO, "unknown record type");
    }
}

/* Take every whole record at the front of p[0..n); return bytes used. */
static int parse(kvs_import_t *im, const uint8_t *p, size_t n, size_t *used) {
    size_t off = 0;
    while (n - off >= REC_HEAD) {
        uint32_t len = get32(p + off);
        if (len == 0 || len > MAX_RECORD)
            return bad(im, len ? KVS_ETOOBIG : KVS_EPROTO,
                       "record length out of range");
        if (n - off - 8 < len)
            break;
        const uint8_t *r = p + off + 8;
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
        /* (A fuzzing build skips it, so mutations reach the records.) */
        if (kvs_crc32c(0, r, len) != get32(p + off + 4))
            return bad(im, KVS_ECORRUPT, "record checksum mismatch");
#endif
        int rc = record(im, r[0], r + 1, len - 1);
        if (rc)
            return rc;
        off += 8 + (size_t)len;
    }
    *used = off;
    return 0;
}

int kvs_seq_import_chunk(kvs_import_t *im, const void *data, size_t len) {
    if (!im)
        return KVS_EINVAL;
    kvs__clear_err(im->s);
    if (im->failed)
        return bad(im, KVS_EINVAL, "a chunk after a failed one");
    if (len && !data)
        return bad(im, KVS_EINVAL, "data is NULL");
    const uint8_t *p = data;
    size_t used = 0;
    int rc = 0;
    if (im->len == 0) {
        /* Records whole in this chunk are read in place. */
        if ((rc = parse(im, p, len, &used)))
            goto fail;
        p += used;
        len -= used;
        if (len == 0)
            return 0;
    }
    if (im->len + len > im->cap) {
        size_t cap = im->cap ? im->cap : 4096;
        while (cap < im->len + len)
            cap *= 2;
        if (cap > MAX_RECORD + 2 * REC_HEAD + (size_t)len)
            cap = MAX_RECORD + 2 * REC_HEAD + (size_t)len;
        uint8_t *b = realloc(im->buf, cap);
        if (!b) {
            rc = bad(im, KVS_ENOMEM, "record buffer");
            goto fail;
        }
        im->buf = b;
        im->cap = cap;
    }
    memcpy(im->buf + im->len, p, len);
    im->len += len;
    if ((rc = parse(im, im->buf, im->len, &used)))
        goto fail;
    memmove(im->buf, im->buf + used, im->len - used);
    im->len -= used;
    return 0;
fail:
    im->failed = 1;
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Installing an import                                                   */

/* A reference to the table's sequence `id` (quarantined ones too); NULL
 * when there is none. */
static seq_t *seq_ref(kvs_store_t *s, uint64_t id) {
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    seq_t *q = kvs__map_find(s, id);
    if (q && atomic_load(&q->unlinking))
        q = NULL;
    if (q)
        atomic_fetch_add(&q->refs, 1);
    kvs__unlock(&s->map_mu);
    return q;
}

/* Compare the first tokens of every layer of `e` (the store's copy) and
 * `in` (staged), recording e's layer tokens. *prefix = 0 at the first
 * position where they differ. */
#define CMP_TOKENS 256
static int compare_prefix(kvs_store_t *s, seq_t *e, const seq_t *in,
                          uint64_t *e_tokens, int *prefix) {
    const size_t rb = in->row_bytes;
    char *a = malloc(2 * CMP_TOKENS * rb), *b = malloc(2 * CMP_TOKENS * rb);
    int rc = 0;
    *prefix = 1;
    if (!a || !b) {
        rc = kvs__fail(s, KVS_ENOMEM, "import comparison");
        goto out;
    }
    for (uint32_t l = 0; l < in->geo.n_layers; l++) {
        layer_t *EL = &e->layers[l];
        const layer_t *IL = &in->layers[l];
        if ((rc = kvs__layer_lock(s, e, EL, 0)))
            goto out;
        e_tokens[l] = EL->tokens;
        /* Past a difference only the tokens are still wanted. */
        uint64_t n = !*prefix                  ? 0
                     : EL->tokens < IL->tokens ? EL->tokens
                                               : IL->tokens;
        for (uint32_t h = 0; h < in->geo.n_kv_heads && *prefix; h++)
            for (uint64_t p = 0; p < n && *prefix; p += CMP_TOKENS) {
                uint64_t k = n - p < CMP_TOKENS ? n - p : CMP_TOKENS;
                kvs__head_gather(&EL->heads[h], rb, p, k, a, a + k * rb, rb);
                kvs__head_gather(&IL->heads[h], rb, p, k, b, b + k * rb, rb);
                *prefix = memcmp(a, b, 2 * k * rb) == 0;
            }
        kvs__rwunlock(&EL->lock);
    }
out:
    free(a);
    free(b);
    return rc;
}

static int same_geometry(const kvs_geometry_t *a, const kvs_geometry_t *b) {
    return a->n_layers == b->n_layers && a->n_q_heads == b->n_q_heads &&
           a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->dtype == b->dtype;
}

/* Under meta_mu (and, when replacing, the old copy's append_mus): store
 * the staged sequence and link it into the table. */
static int install(kvs_store_t *s, seq_t *c) {
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    int rc = kvs__map_find(s, c->id) ? KVS_EBUSY : kvs__seq_admit(s, &c->geo);
    kvs__unlock(&s->map_mu);
    if (rc == KVS_EBUSY)
        return kvs__fail(s, rc, "sequence %llu appeared during the import",
                         (unsigned long long)c->id);
    if (rc)
        return rc;
    if (s->db) {
        char err[256] = "";
        if ((rc = kvs__seq_persist(s, c, err, sizeof err)))
            return kvs__fail(s, rc, "storing the import: %s", err);
    }
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    rc = kvs__map_insert(s, c);
    if (!rc)
        atomic_fetch_add(&c->refs, 1); /* a racing drop must not free it */
    kvs__unlock(&s->map_mu);
    return rc ? kvs__fail(s, rc, "sequence table") : 0;
}

static void wake_waiters(kvs_store_t *s) {
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    pthread_cond_broadcast(&s->build_done);
    kvs__unlock(&s->build_mu);
}

int kvs_seq_import_end(kvs_import_t *im, kvs_import_result_t *result) {
    if (!im)
        return KVS_EINVAL;
    kvs_store_t *s = im->s;
    kvs__clear_err(s);
    kvs_import_result_t res = KVS_IMPORT_NONE;
    seq_t *e = NULL, *c = im->q;
    uint64_t *et = NULL;
    int rc = 0;
    if (im->failed || !im->done || im->len) {
        rc = bad(im, KVS_EPROTO, "the stream stopped before its end");
        goto out;
    }
    const uint32_t nl = c->geo.n_layers;
    if ((e = seq_ref(s, im->id))) {
        if (e->damage) {
            rc = kvs__fail(s, KVS_EQUARANTINED,
                           "import of sequence %llu: the copy here is "
                           "quarantined",
                           (unsigned long long)im->id);
            goto out;
        }
        if (!same_geometry(&e->geo, &c->geo)) {
            rc = bad(im, KVS_ECONFLICT, "the copy here has another geometry");
            goto out;
        }
        if (!(et = calloc(nl, sizeof *et))) {
            rc = bad(im, KVS_ENOMEM, "import");
            goto out;
        }
        int prefix;
        if ((rc = compare_prefix(s, e, c, et, &prefix)))
            goto out;
        int longer = 0, shorter = 0;
        for (uint32_t l = 0; l < nl; l++) {
            longer |= c->layers[l].tokens > et[l];
            shorter |= c->layers[l].tokens < et[l];
        }
        /* An unconfirmed repair copy follows its source: what it holds
         * beyond the source's snapshot came through writes that went to
         * every holder, the source included (docs/cluster.md). */
        int follows = atomic_load(&e->unconfirmed);
        if (prefix && !longer) {
            if (!shorter) /* equal: the repair copy has caught up */
                atomic_store(&e->unconfirmed, 0);
            res = KVS_IMPORT_CURRENT;
            goto out;
        }
        if (!prefix || shorter) {
            /* An unconfirmed copy follows only a snapshot at least as long
             * as itself: a shorter one is an older push, not a catch-up. */
            if (follows && shorter) {
                rc = bad(im, KVS_EBUSY, "the repair copy here is newer");
                goto out;
            }
            if (!follows) {
                rc = bad(im, KVS_ECONFLICT,
                         "the copy here holds tokens the import lacks");
                goto out;
            }
        }
    }
    atomic_store(&c->unconfirmed, 1);
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    if (e) {
        /* Hold the old copy's appends, then check that none came since the
         * comparison: what is dropped is exactly what was compared. */
        for (uint32_t l = 0; l < nl; l++)
            kvs__lock(&e->layers[l].append_mu, KVS__RANK_APPEND, l);
        int moved = atomic_load(&e->dropped), dropped = 0;
        for (uint32_t l = 0; l < nl && !moved; l++) {
            kvs__rdlock(&e->layers[l].lock, l);
            moved = e->layers[l].tokens != et[l];
            kvs__rwunlock(&e->layers[l].lock);
        }
        if (moved) {
            rc = bad(im, KVS_EBUSY, "the copy here changed meanwhile");
        } else if (!(rc = kvs__drop_seq_held(s, e))) {
            /* Storage cannot swap the two in one batch (the same keys):
             * a failure or crash from here on leaves neither copy on this
             * node; the exporter still holds its own and keeps it until
             * this node confirms (docs/cluster.md). */
            dropped = 1;
            rc = install(s, c);
        }
        for (uint32_t l = nl; l-- > 0;)
            kvs__unlock(&e->layers[l].append_mu);
        if (dropped) {
            kvs__seq_unref(e); /* the table's reference */
            wake_waiters(s);
        }
        res = KVS_IMPORT_REPLACED;
    } else {
        rc = install(s, c);
        res = KVS_IMPORT_INSTALLED;
    }
    kvs__unlock(&s->meta_mu);
    if (rc)
        goto out;
    /* Rows past the segments may hold a whole segment: build as usual. */
    for (uint32_t l = 0; l < nl; l++) {
        kvs__wrlock(&c->layers[l].lock, l);
        kvs__bytes_add(s, c, kvs__layer_bytes(c, &c->layers[l]));
        for (uint32_t h = 0; h < c->geo.n_kv_heads; h++)
            kvs__maybe_build(s, c, l, h);
        kvs__rwunlock(&c->layers[l].lock);
    }
    kvs__seq_unref(c);
    im->q = NULL;
out:
    if (rc)
        res = KVS_IMPORT_NONE;
    if (result)
        *result = res;
    if (e)
        kvs__seq_unref(e);
    free(et);
    kvs_seq_import_abort(im);
    return rc;
}

int kvs_seq_drop_if_covered(kvs_store_t *s, uint64_t id, uint64_t max_tokens) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    kvs__lock(&s->meta_mu, KVS__RANK_META, 0);
    seq_t *q = seq_ref(s, id);
    if (!q) {
        kvs__unlock(&s->meta_mu);
        return kvs__fail(s, KVS_ENOSEQ, "unknown sequence %llu",
                         (unsigned long long)id);
    }
    const uint32_t nl = q->geo.n_layers;
    for (uint32_t l = 0; l < nl; l++)
        kvs__lock(&q->layers[l].append_mu, KVS__RANK_APPEND, l);
    int rc = 0;
    for (uint32_t l = 0; l < nl && !rc; l++) {
        kvs__rdlock(&q->layers[l].lock, l);
        if (q->layers[l].tokens > max_tokens)
            rc = kvs__fail(s, KVS_EBUSY,
                           "layer %u of sequence %llu holds %llu tokens, "
                           "more than %llu",
                           l, (unsigned long long)id,
                           (unsigned long long)q->layers[l].tokens,
                           (unsigned long long)max_tokens);
        kvs__rwunlock(&q->layers[l].lock);
    }
    if (!rc)
        rc = kvs__drop_seq_held(s, q);
    for (uint32_t l = nl; l-- > 0;)
        kvs__unlock(&q->layers[l].append_mu);
    kvs__unlock(&s->meta_mu);
    if (!rc) {
        kvs__seq_unref(q); /* the table's */
        wake_waiters(s);
    }
    kvs__seq_unref(q);
    return rc;
}
