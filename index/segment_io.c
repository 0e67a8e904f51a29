/*
 * segment_io.c: a built segment as one flat byte string, so storage can
 * persist it and a restart can reload it without running k-means again.
 *
 * Layout (little-endian, every field 4-byte aligned):
 *   u32 magic "KVSG", u32 version, u32 dtype, u32 d, u64 first_pos,
 *   u32 n_tokens, u32 n_clusters, u32 adj_always.n, u32 adj_last.n,
 *   u32 offsets[C+1], u32 positions[n], u32 counts[C], u8 adj_flags[C]
 *   padded to 4, then keys[n][d], values[n][d], centroids[C][d],
 *   value_means[C][d] in dtype, then per adjustment table
 *   u32 cluster[m], u32 count[m], value_means[m][d].
 * Version 2 (codes) appends: u32 has_codes, u32 0, and when has_codes
 *   u64 seed, f32 lo[dc], step[dc], clo[dc], cstep[dc], spread[C],
 *   u8 centroid codes[C][dc], u8 key codes[n][dc/2] (see kvs_codes_t;
 *   dc = kvs_codes_dim(d), which is d for every multiple of 32).
 * Version 1 records (before codes) still decode: their codes are rebuilt
 * from the keys with seed = first_pos (a few ms per segment, no k-means).
 * So are version-2 records without codes whose head_dim has them now
 * (before padding, only multiples of 32 had codes), with KVS_CODES_SEED;
 * a metadata record (below) of that kind gets them when its last K/V
 * block is attached.
 * Version 3 (the *metadata* record, what ranking needs) is version 2
 *   without keys[n][d] and values[n][d]: those are stored apart, as K/V
 *   blocks of consecutive slots (kvs_segment_kv_*), so that a store can read
 *   what ranks without the bulk it ranks (4-bit codes: 64 bytes per key at
 *   d=128 against 512 of fp16 K+V). A segment decoded from a version-3
 *   record has keys and values NULL until every block is attached.
 * K/V block: u32 magic "KVSB", u32 slot0, u32 n, u32 row_bytes, then
 *   keys[n][d] and values[n][d] of slots slot0 .. slot0+n, in dtype.
 * Decoding checks every invariant the attention code relies on (sizes,
 * offsets, a permutation of positions, counts, adjustment tables), so a
 * damaged record is an error, never an out-of-bounds read. Integrity of the
 * bytes themselves is the storage layer's checksum.
 */
#include "kvs_index.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "segment_io.c writes its native layout: little-endian hosts only"
#endif

#define SEG_MAGIC 0x4753564bu /* "KVSG" */
#define SEG_VERSION 2u        /* K/V inside (kvs_segment_encode) */
#define SEG_VERSION_META 3u   /* K/V apart (kvs_segment_meta_encode) */
#define BLK_MAGIC 0x4253564bu /* "KVSB" */

typedef struct hdr_s {
    uint32_t magic, version, dtype, d;
    uint64_t first_pos;
    uint32_t n_tokens, n_clusters, n_always, n_last;
} hdr_t;

static size_t pad4(size_t x) {
    return (x + 3) & ~(size_t)3;
}

/* K/V are inside every version but the metadata record's. */
static int has_kv(const hdr_t *h) {
    return h->version != SEG_VERSION_META;
}

static size_t encoded_size(const hdr_t *h) {
    size_t esz = kvs_dtype_size((kvs_dtype_t)h->dtype);
    size_t n = h->n_tokens, c = h->n_clusters, d = h->d;
    size_t s = sizeof(hdr_t);
    s += 4 * (c + 1) + 4 * n + 4 * c + pad4(c);
    s += esz * d * ((has_kv(h) ? 2 * n : 0) + 2 * c);
    s += (8 + esz * d) * ((size_t)h->n_always + h->n_last);
    return s;
}

/* The version-2 codes section (has_codes word and pad included). */
static size_t codes_size(const hdr_t *h, int has) {
    size_t n = h->n_tokens, c = h->n_clusters, d = kvs_codes_dim(h->d);
    return 8 + (has ? 8 + 16 * d + 4 * c + c * d + n * (d / 2) : 0);
}

static hdr_t seg_hdr(const kvs_segment_t *seg, uint32_t version) {
    return (hdr_t){SEG_MAGIC,       version,           (uint32_t)seg->dtype,
                   seg->d,          seg->first_pos,    seg->n_tokens,
                   seg->n_clusters, seg->adj_always.n, seg->adj_last.n};
}

size_t kvs_segment_encoded_size(const kvs_segment_t *seg) {
    hdr_t h = seg_hdr(seg, SEG_VERSION);
    return encoded_size(&h) + codes_size(&h, seg->codes != NULL);
}

size_t kvs_segment_meta_encoded_size(const kvs_segment_t *seg) {
    hdr_t h = seg_hdr(seg, SEG_VERSION_META);
    return encoded_size(&h) + codes_size(&h, seg->codes != NULL);
}

static char *put(char *p, const void *src, size_t n) {
    if (n)
        memcpy(p, src, n);
    return p + n;
}

/* One encoder for both layouts, so a field added to the segment is added
 * once: `version` says whether keys and values are inside. */
static void encode(const kvs_segment_t *seg, uint32_t version, void *buf) {
    hdr_t h = seg_hdr(seg, version);
    size_t esz = kvs_dtype_size(seg->dtype);
    size_t n = seg->n_tokens, c = seg->n_clusters, rb = esz * seg->d;
    char *p = buf;
    p = put(p, &h, sizeof h);
    p = put(p, seg->offsets, 4 * (c + 1));
    p = put(p, seg->positions, 4 * n);
    p = put(p, seg->counts, 4 * c);
    p = put(p, seg->adj_flags, c);
    memset(p, 0, pad4(c) - c);
    p += pad4(c) - c;
    if (has_kv(&h)) {
        p = put(p, seg->keys, rb * n);
        p = put(p, seg->values, rb * n);
    }
    p = put(p, seg->centroids, rb * c);
    p = put(p, seg->value_means, rb * c);
    const kvs_cluster_adj_t *adj[2] = {&seg->adj_always, &seg->adj_last};
    for (int a = 0; a < 2; a++) {
        p = put(p, adj[a]->cluster, 4 * (size_t)adj[a]->n);
        p = put(p, adj[a]->count, 4 * (size_t)adj[a]->n);
        p = put(p, adj[a]->value_means, rb * adj[a]->n);
    }
    const kvs_codes_t *k = seg->codes;
    uint32_t has[2] = {k != NULL, 0};
    p = put(p, has, sizeof has);
    if (!k)
        return;
    size_t d = kvs_codes_dim(seg->d);
    p = put(p, &k->seed, 8);
    p = put(p, k->lo, 4 * d);
    p = put(p, k->step, 4 * d);
    p = put(p, k->clo, 4 * d);
    p = put(p, k->cstep, 4 * d);
    p = put(p, k->spread, 4 * c);
    p = put(p, k->centroids, c * d);
    put(p, k->keys, n * (d / 2));
}

void kvs_segment_encode(const kvs_segment_t *seg, void *buf) {
    encode(seg, SEG_VERSION, buf);
}

void kvs_segment_meta_encode(const kvs_segment_t *seg, void *buf) {
    encode(seg, SEG_VERSION_META, buf);
}

/* Copy `n` bytes into a fresh malloc() block (at least 1 byte). */
static void *take(const char **p, size_t n) {
    void *x = malloc(n ? n : 1);
    if (x && n)
        memcpy(x, *p, n);
    *p += n;
    return x;
}

static int bad(char *err, size_t errlen, const char *what) {
    if (err && errlen)
        snprintf(err, errlen, "segment record: %s", what);
    return KVS_ECORRUPT;
}

/* `meta`: a metadata record (K/V apart) is accepted too. */
static int decode(const void *buf, size_t len, int meta, kvs_segment_t **out,
                  char *err, size_t errlen) {
    *out = NULL;
    hdr_t h;
    if (len < sizeof h)
        return bad(err, errlen, "truncated header");
    memcpy(&h, buf, sizeof h);
    if (h.magic != SEG_MAGIC)
        return bad(err, errlen, "bad magic");
    if (h.version != 1 && h.version != SEG_VERSION &&
        (!meta || h.version != SEG_VERSION_META))
        return bad(err, errlen, "unknown version");
    if (kvs_dtype_size((kvs_dtype_t)h.dtype) == 0 || h.d == 0 || h.d > 4096)
        return bad(err, errlen, "bad dtype or head_dim");
    if (h.n_tokens == 0 || h.n_clusters == 0 || h.n_clusters > h.n_tokens ||
        h.n_always > h.n_clusters || h.n_last > h.n_clusters ||
        h.n_tokens > (1u << 26))
        return bad(err, errlen, "bad counts");
    size_t body = encoded_size(&h);
    uint32_t has_codes = 0;
    if (h.version >= 2) {
        if (len < body + 8)
            return bad(err, errlen, "size does not match header");
        memcpy(&has_codes, (const char *)buf + body, 4);
        if (has_codes > 1 || (has_codes && !kvs_codes_dim(h.d)))
            return bad(err, errlen, "bad codes flag");
        body += codes_size(&h, (int)has_codes);
    }
    if (body != len)
        return bad(err, errlen, "size does not match header");

    size_t esz = kvs_dtype_size((kvs_dtype_t)h.dtype);
    size_t n = h.n_tokens, c = h.n_clusters, rb = esz * h.d;
    kvs_segment_t *s = calloc(1, sizeof *s);
    if (!s)
        return KVS_ENOMEM;
    s->dtype = (kvs_dtype_t)h.dtype;
    s->d = h.d;
    s->first_pos = h.first_pos;
    s->n_tokens = h.n_tokens;
    s->n_clusters = h.n_clusters;
    const char *p = (const char *)buf + sizeof h;
    s->offsets = take(&p, 4 * (c + 1));
    s->positions = take(&p, 4 * n);
    s->counts = take(&p, 4 * c);
    s->adj_flags = take(&p, c);
    p += pad4(c) - c;
    if (has_kv(&h)) {
        s->keys = take(&p, rb * n);
        s->values = take(&p, rb * n);
    }
    s->centroids = take(&p, rb * c);
    s->value_means = take(&p, rb * c);
    kvs_cluster_adj_t *adj[2] = {&s->adj_always, &s->adj_last};
    uint32_t adj_n[2] = {h.n_always, h.n_last};
    for (int a = 0; a < 2; a++) {
        adj[a]->n = adj_n[a];
        adj[a]->cluster = take(&p, 4 * (size_t)adj_n[a]);
        adj[a]->count = take(&p, 4 * (size_t)adj_n[a]);
        adj[a]->value_means = take(&p, rb * adj_n[a]);
    }
    int rc = KVS_ENOMEM;
    if (!s->offsets || !s->positions || !s->counts || !s->adj_flags ||
        (has_kv(&h) && (!s->keys || !s->values)) || !s->centroids ||
        !s->value_means || !adj[0]->cluster || !adj[0]->count ||
        !adj[0]->value_means || !adj[1]->cluster || !adj[1]->count ||
        !adj[1]->value_means)
        goto fail;

    /* Invariants the attention code relies on. */
    rc = KVS_ECORRUPT;
    if (s->offsets[0] != 0 || s->offsets[c] != n) {
        bad(err, errlen, "offsets do not span the segment");
        goto fail;
    }
    for (size_t i = 0; i < c; i++)
        if (s->offsets[i + 1] <= s->offsets[i] ||
            s->counts[i] != s->offsets[i + 1] - s->offsets[i] ||
            (s->adj_flags[i] & ~(KVS_ADJ_ALWAYS | KVS_ADJ_LAST))) {
            bad(err, errlen, "bad cluster offsets, counts or flags");
            goto fail;
        }
    uint8_t *seen = calloc(n, 1);
    if (!seen) {
        rc = KVS_ENOMEM;
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        if (s->positions[i] >= n || seen[s->positions[i]]) {
            free(seen);
            bad(err, errlen, "positions are not a permutation");
            goto fail;
        }
        seen[s->positions[i]] = 1;
    }
    free(seen);
    for (int a = 0; a < 2; a++) {
        uint32_t listed = 0;
        for (uint32_t i = 0; i < adj[a]->n; i++) {
            uint32_t cl = adj[a]->cluster[i];
            if (cl >= c || (i && cl <= adj[a]->cluster[i - 1]) ||
                adj[a]->count[i] > s->counts[cl] ||
                !(s->adj_flags[cl] & (1u << a))) {
                bad(err, errlen, "bad adjustment table");
                goto fail;
            }
        }
        for (size_t i = 0; i < c; i++)
            listed += (s->adj_flags[i] >> a) & 1u;
        if (listed != adj[a]->n) {
            bad(err, errlen, "adjustment flags disagree with tables");
            goto fail;
        }
    }
    if (h.version >= 2 && has_codes) {
        size_t d = kvs_codes_dim(h.d);
        p += 8; /* has_codes, pad */
        kvs_codes_t *k = calloc(1, sizeof *k);
        if (!k) {
            rc = KVS_ENOMEM;
            goto fail;
        }
        s->codes = k;
        memcpy(&k->seed, p, 8);
        p += 8;
        k->lo = take(&p, 4 * d);
        k->step = take(&p, 4 * d);
        k->clo = take(&p, 4 * d);
        k->cstep = take(&p, 4 * d);
        k->spread = take(&p, 4 * c);
        k->centroids = take(&p, c * d);
        k->keys = take(&p, n * (d / 2));
        if (!k->lo || !k->step || !k->clo || !k->cstep || !k->spread ||
            !k->centroids || !k->keys) {
            rc = KVS_ENOMEM;
            goto fail;
        }
        /* Scores must stay finite: no NaN/Inf ranges, no negative steps. */
        for (size_t j = 0; j < d; j++)
            if (!isfinite(k->lo[j]) || !isfinite(k->clo[j]) ||
                !(k->step[j] >= 0 && k->step[j] < INFINITY) ||
                !(k->cstep[j] >= 0 && k->cstep[j] < INFINITY)) {
                bad(err, errlen, "bad code ranges");
                goto fail;
            }
        for (size_t i = 0; i < c; i++)
            if (!(k->spread[i] >= 0 && k->spread[i] < INFINITY)) {
                bad(err, errlen, "bad cluster spread");
                goto fail;
            }
    } else if (h.version == 1 &&
               (rc = kvs_segment_build_codes(s, s->first_pos))) {
        goto fail;
    } else if (h.version == SEG_VERSION && !has_codes &&
               (rc = kvs_segment_build_codes(s, KVS_CODES_SEED))) {
        goto fail;
    }
    *out = s;
    return 0;
fail:
    kvs_segment_free(s);
    return rc;
}

int kvs_segment_decode(const void *buf, size_t len, kvs_segment_t **out,
                       char *err, size_t errlen) {
    return decode(buf, len, 0, out, err, errlen);
}

int kvs_segment_meta_decode(const void *buf, size_t len, kvs_segment_t **out,
                            char *err, size_t errlen) {
    return decode(buf, len, 1, out, err, errlen);
}

/* ------------------------------------------------------------------------ */
/* K/V blocks of a segment stored apart (metadata record, version 3)        */

typedef struct blk_hdr_s {
    uint32_t magic, slot0, n, row_bytes;
} blk_hdr_t;

size_t kvs_segment_kv_block_size(const kvs_segment_t *seg, uint32_t n) {
    size_t rb = kvs_dtype_size(seg->dtype) * seg->d;
    return sizeof(blk_hdr_t) + 2 * rb * n;
}

_Static_assert(sizeof(blk_hdr_t) == KVS_SEGMENT_KV_BLOCK_HDR,
               "the block header's size is part of the header file");

void kvs_segment_kv_block_parts(const kvs_segment_t *seg, uint32_t slot0,
                                uint32_t n, void *hdr, const void **keys,
                                const void **values, size_t *len) {
    size_t rb = kvs_dtype_size(seg->dtype) * seg->d;
    blk_hdr_t h = {BLK_MAGIC, slot0, n, (uint32_t)rb};
    memcpy(hdr, &h, sizeof h);
    *keys = (const char *)seg->keys + rb * slot0;
    *values = (const char *)seg->values + rb * slot0;
    *len = rb * n;
}

/* The parts, concatenated. */
void kvs_segment_kv_block_encode(const kvs_segment_t *seg, uint32_t slot0,
                                 uint32_t n, void *buf) {
    const void *keys, *values;
    size_t len;
    kvs_segment_kv_block_parts(seg, slot0, n, buf, &keys, &values, &len);
    char *p = put((char *)buf + KVS_SEGMENT_KV_BLOCK_HDR, keys, len);
    put(p, values, len);
}

int kvs_segment_kv_attach(kvs_segment_t *seg, const void *buf, size_t len,
                          uint32_t *next, char *err, size_t errlen) {
    size_t rb = kvs_dtype_size(seg->dtype) * seg->d;
    blk_hdr_t h;
    if (len < sizeof h)
        return bad(err, errlen, "K/V block: truncated header");
    memcpy(&h, buf, sizeof h);
    /* Blocks are attached to a segment whose K/V were stored apart, in
     * slot order: anything else is a damaged or misplaced block. */
    if (h.magic != BLK_MAGIC || h.row_bytes != rb)
        return bad(err, errlen, "K/V block: bad magic or row size");
    if (h.slot0 != *next || h.n == 0 || h.n > seg->n_tokens - *next)
        return bad(err, errlen, "K/V block: does not continue the segment");
    if (len != sizeof h + 2 * rb * h.n)
        return bad(err, errlen, "K/V block: size does not match header");
    if (*next == 0) {
        if (seg->keys || seg->values)
            return bad(err, errlen, "K/V block: the segment holds its K/V");
        seg->keys = malloc(rb * seg->n_tokens);
        seg->values = malloc(rb * seg->n_tokens);
        if (!seg->keys || !seg->values) {
            free(seg->keys);
            free(seg->values);
            seg->keys = seg->values = NULL;
            return KVS_ENOMEM;
        }
    }
    const char *p = (const char *)buf + sizeof h;
    memcpy((char *)seg->keys + rb * h.slot0, p, rb * h.n);
    memcpy((char *)seg->values + rb * h.slot0, p + rb * h.n, rb * h.n);
    /* Whole now: a record of a head_dim without codes before padding
     * gets them from its keys, as a whole record does in decode(). */
    if (*next + h.n == seg->n_tokens && !seg->codes && kvs_codes_dim(seg->d)) {
        int rc = kvs_segment_build_codes(seg, KVS_CODES_SEED);
        if (rc) { /* KVS_ENOMEM: the segment as it was before the call */
            if (*next == 0) {
                free(seg->keys);
                free(seg->values);
                seg->keys = seg->values = NULL;
            }
            return rc;
        }
    }
    *next += h.n;
    return 0;
}
