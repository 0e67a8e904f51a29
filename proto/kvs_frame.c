/*
 * kvs_frame.c: frame header codec, the incremental frame reader, and the
 * structural checks on decoded requests and responses.
 *
 * Everything here runs on bytes from the network, so every length is checked
 * before it is used and nothing asserts on input: a bad frame is an error
 * return with a reason, never a crash. The fuzz target tests/fuzz/fuzz_frame.c
 * drives these functions with arbitrary bytes.
 */
#include "kvs_frame.h"
#include "kvs_wire.h"

#include "kvs_errf.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Explicit byte order, so the header is the same on any host. */
static void put_le16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get_le16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static uint32_t get_le32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

void kvs_frame_header_encode(const kvs_frame_header_t *h, uint8_t *out) {
    put_le32(out, h->magic);
    put_le16(out + 4, h->version);
    put_le16(out + 6, h->flags);
    put_le64(out + 8, h->request_id);
    put_le32(out + 16, h->body_len);
    put_le32(out + 20, 0);
}

int kvs_frame_header_decode(const uint8_t *buf, size_t len, uint32_t max_body,
                            kvs_frame_header_t *h, char *err, size_t errlen) {
    if (len < KVS_FRAME_HEADER_SIZE)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "frame header needs %d bytes, have %zu",
                         KVS_FRAME_HEADER_SIZE, len);
    h->magic = get_le32(buf);
    h->version = get_le16(buf + 4);
    h->flags = get_le16(buf + 6);
    h->request_id = get_le64(buf + 8);
    h->body_len = get_le32(buf + 16);
    uint32_t reserved = get_le32(buf + 20);
    if (h->magic != KVS_FRAME_MAGIC)
        return kvs__errf(err, errlen, KVS_EPROTO,
                         "bad frame magic 0x%08x (expected 0x%08x \"KVSP\")",
                         h->magic, KVS_FRAME_MAGIC);
    if (h->version != KVS_PROTOCOL_VERSION)
        return kvs__errf(err, errlen, KVS_EPROTO,
                         "unsupported protocol version %u (this side speaks "
                         "%d)",
                         h->version, KVS_PROTOCOL_VERSION);
    if (h->flags & ~KVS_FRAME_F_KNOWN)
        return kvs__errf(err, errlen, KVS_EPROTO, "unknown frame flags 0x%x",
                         h->flags & ~KVS_FRAME_F_KNOWN);
    if (reserved != 0)
        return kvs__errf(err, errlen, KVS_EPROTO,
                         "reserved header bytes are not zero");
    if (h->body_len > max_body)
        return kvs__errf(err, errlen, KVS_ETOOBIG,
                         "frame body of %u bytes exceeds max_frame_bytes %u",
                         h->body_len, max_body);
    return 0;
}

/* ---------------------------------------------------------------- reader */

int kvs_frame_reader_init(kvs_frame_reader_t *r, uint32_t max_body) {
    memset(r, 0, sizeof(*r));
    if (max_body == 0 || max_body > KVS_FRAME_MAX_BODY_LIMIT)
        return KVS_EINVAL;
    r->max_body = max_body;
    return 0;
}

void kvs_frame_reader_destroy(kvs_frame_reader_t *r) {
    free(r->buf);
    r->buf = NULL;
    r->cap = r->off = r->len = 0;
    if (r->dbuf)
        kvs_frame_reader_free_buf(r, r->dbuf);
    r->dbuf = NULL;
    r->dhave = r->dlen = 0;
    r->dready = 0;
}

void kvs_frame_reader_set_allocator(kvs_frame_reader_t *r,
                                    const kvs_frame_allocator_t *a) {
    if (a)
        r->alloc = *a;
    else
        memset(&r->alloc, 0, sizeof(r->alloc));
}

void kvs_frame_reader_free_buf(const kvs_frame_reader_t *r, uint8_t *buf) {
    if (!buf)
        return;
    if (r->alloc.free)
        r->alloc.free(r->alloc.ctx, buf);
    else
        free(buf);
}

/* A direct frame that _next returned and nobody took is dead. */
static void drop_ready(kvs_frame_reader_t *r) {
    if (!r->dbuf || !r->dready)
        return;
    kvs_frame_reader_free_buf(r, r->dbuf);
    r->dbuf = NULL;
    r->dhave = r->dlen = 0;
    r->dready = 0;
}

/* The frame at r->off has `total` bytes and is not all here: give it a
 * buffer of its own and move what arrived of it there (at most a read
 * chunk: the header came with it). */
static int direct_start(kvs_frame_reader_t *r, size_t total) {
    size_t have = r->len - r->off;
    uint8_t *b =
        r->alloc.alloc ? r->alloc.alloc(r->alloc.ctx, total) : malloc(total);
    if (!b)
        return KVS_ENOMEM;
    memcpy(b, r->buf + r->off, have);
    r->copied += have;
    r->off = r->len = 0;
    r->dbuf = b;
    r->dhave = have;
    r->dlen = total;
    r->dready = 0;
    return 0;
}

const uint8_t *kvs_frame_reader_front(const kvs_frame_reader_t *r,
                                      size_t *have) {
    if (r->dbuf && !r->dready) {
        *have = r->dhave;
        return r->dbuf;
    }
    *have = r->len - r->off;
    return r->buf ? r->buf + r->off : NULL;
}

uint8_t *kvs_frame_reader_take(kvs_frame_reader_t *r) {
    if (!r->dbuf || !r->dready)
        return NULL;
    uint8_t *b = r->dbuf;
    r->dbuf = NULL;
    r->dhave = r->dlen = 0;
    r->dready = 0;
    return b;
}

/* Bytes the frame at r->off still needs, when its header is in; 0 when the
 * header is not complete or does not decode (next() reports that). */
static size_t frame_missing(const kvs_frame_reader_t *r) {
    size_t have = r->len - r->off;
    if (have < KVS_FRAME_HEADER_SIZE)
        return KVS_FRAME_HEADER_SIZE - have;
    kvs_frame_header_t h;
    if (kvs_frame_header_decode(r->buf + r->off, have, r->max_body, &h, NULL,
                                0) != 0)
        return 0;
    size_t total = (size_t)KVS_FRAME_HEADER_SIZE + h.body_len;
    return total > have ? total - have : 0;
}

static int reader_reserve(kvs_frame_reader_t *r, size_t want) {
    /* Compact first: consumed bytes are dead, and a frame must end up
     * contiguous from the buffer start to be grown into without copying
     * twice. */
    if (r->off > 0) {
        size_t have = r->len - r->off;
        if (have)
            memmove(r->buf, r->buf + r->off, have);
        r->copied += have;
        r->len = have;
        r->off = 0;
    }
    if (r->cap - r->len >= want)
        return 0;
    size_t need = r->len + want;
    size_t cap = r->cap ? r->cap : 4096;
    while (cap < need)
        cap *= 2;
    uint8_t *nb = realloc(r->buf, cap);
    if (!nb)
        return KVS_ENOMEM;
    r->copied += r->len; /* at most: realloc may grow in place */
    r->buf = nb;
    r->cap = cap;
    return 0;
}

int kvs_frame_reader_prepare(kvs_frame_reader_t *r, size_t want, void **ptr,
                             size_t *len) {
    drop_ready(r);
    /* A direct frame takes exactly its missing bytes: nothing of the next
     * frame lands in its buffer. */
    if (r->dbuf) {
        *ptr = r->dbuf + r->dhave;
        *len = r->dlen - r->dhave;
        return 0;
    }
    /* Read at least the rest of the current frame in one go when it is
     * large, but never reserve more than the frame needs plus `want` so that
     * an idle connection costs little memory. */
    /* An idle connection should not keep the buffer of its largest frame
     * (an append can be megabytes): drop it once everything is consumed. */
    if (r->off == r->len && r->cap > (1u << 20)) {
        free(r->buf);
        r->buf = NULL;
        r->cap = r->off = r->len = 0;
    }
    size_t have = r->len - r->off;
    kvs_frame_header_t h;
    if (have >= KVS_FRAME_HEADER_SIZE &&
        kvs_frame_header_decode(r->buf + r->off, have, r->max_body, &h, NULL,
                                0) == 0) {
        size_t total = (size_t)KVS_FRAME_HEADER_SIZE + h.body_len;
        if (total >= KVS_FRAME_DIRECT_MIN && have < total) {
            int rc = direct_start(r, total);
            if (rc)
                return rc;
            *ptr = r->dbuf + r->dhave;
            *len = r->dlen - r->dhave;
            return 0;
        }
    }
    size_t missing = frame_missing(r);
    if (missing > want)
        want = missing;
    if (want == 0)
        want = 1;
    /* Only compact/grow when the tail does not have room: a memmove per
     * read would cost more than the read for small frames. */
    if (r->cap - r->len < want) {
        int rc = reader_reserve(r, want);
        if (rc)
            return rc;
    }
    *ptr = r->buf + r->len;
    *len = r->cap - r->len;
    /* After a direct frame, large frames are likely to follow: take the
     * next header alone rather than a chunk of its body that would then be
     * copied into its own buffer. */
    if (r->after_direct && have < KVS_FRAME_HEADER_SIZE)
        *len = KVS_FRAME_HEADER_SIZE - have;
    return 0;
}

void kvs_frame_reader_commit(kvs_frame_reader_t *r, size_t n) {
    if (r->dbuf && !r->dready) {
        assert(n <= r->dlen - r->dhave);
        r->dhave += n;
        return;
    }
    assert(n <= r->cap - r->len);
    r->len += n;
}

int kvs_frame_reader_feed(kvs_frame_reader_t *r, const void *data, size_t n) {
    while (n > 0) {
        void *p;
        size_t room;
        int rc = kvs_frame_reader_prepare(r, n, &p, &room);
        if (rc)
            return rc;
        size_t c = room < n ? room : n;
        memcpy(p, data, c);
        kvs_frame_reader_commit(r, c);
        data = (const uint8_t *)data + c;
        n -= c;
    }
    return 0;
}

int kvs_frame_reader_next(kvs_frame_reader_t *r, kvs_frame_header_t *h,
                          const uint8_t **body, char *err, size_t errlen) {
    drop_ready(r);
    if (r->dbuf) {
        if (r->dhave < r->dlen)
            return 0;
        /* Checked when the frame became direct; decoded again for *h. */
        int rc = kvs_frame_header_decode(r->dbuf, r->dhave, r->max_body, h, err,
                                         errlen);
        if (rc)
            return rc;
        *body = r->dbuf + KVS_FRAME_HEADER_SIZE;
        r->dready = 1;
        r->after_direct = 1;
        return 1;
    }
    size_t have = r->len - r->off;
    if (have < KVS_FRAME_HEADER_SIZE)
        return 0;
    int rc = kvs_frame_header_decode(r->buf + r->off, have, r->max_body, h, err,
                                     errlen);
    if (rc)
        return rc;
    if (have - KVS_FRAME_HEADER_SIZE < h->body_len)
        return 0;
    *body = r->buf + r->off + KVS_FRAME_HEADER_SIZE;
    r->after_direct = 0;
    r->off += KVS_FRAME_HEADER_SIZE + (size_t)h->body_len;
    if (r->off == r->len)
        r->off = r->len = 0; /* cheap reset; body stays readable */
    return 1;
}

/* ---------------------------------------------------------------- encode */

int kvs_frame_encode(uint64_t request_id, uint16_t flags,
                     const ProtobufCMessage *msg, uint32_t max_body,
                     uint8_t **out, size_t *out_len) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    if (n > max_body || n > KVS_FRAME_MAX_BODY_LIMIT)
        return KVS_ETOOBIG;
    uint8_t *buf = malloc(KVS_FRAME_HEADER_SIZE + n);
    if (!buf)
        return KVS_ENOMEM;
    kvs_frame_header_t h = {
        .magic = KVS_FRAME_MAGIC,
        .version = KVS_PROTOCOL_VERSION,
        .flags = flags,
        .request_id = request_id,
        .body_len = (uint32_t)n,
    };
    kvs_frame_header_encode(&h, buf);
    size_t packed = protobuf_c_message_pack(msg, buf + KVS_FRAME_HEADER_SIZE);
    assert(packed == n);
    (void)packed;
    *out = buf;
    *out_len = KVS_FRAME_HEADER_SIZE + n;
    return 0;
}

void kvs_frame_encode_to(uint64_t request_id, uint16_t flags,
                         const ProtobufCMessage *msg, size_t body_len,
                         uint8_t *dst) {
    kvs_frame_header_t h = {
        .magic = KVS_FRAME_MAGIC,
        .version = KVS_PROTOCOL_VERSION,
        .flags = flags,
        .request_id = request_id,
        .body_len = (uint32_t)body_len,
    };
    kvs_frame_header_encode(&h, dst);
    size_t packed = protobuf_c_message_pack(msg, dst + KVS_FRAME_HEADER_SIZE);
    assert(packed == body_len);
    (void)packed;
}

/* ---------------------------------------------------------------- checks */

const char *kvs_frame_op_name(Kvs__V1__Request__OpCase op) {
    switch (op) {
    case KVS__V1__REQUEST__OP_HELLO:
        return "hello";
    case KVS__V1__REQUEST__OP_CREATE:
        return "create";
    case KVS__V1__REQUEST__OP_APPEND:
        return "append";
    case KVS__V1__REQUEST__OP_SEARCH:
        return "search";
    case KVS__V1__REQUEST__OP_ATTEND:
        return "attend";
    case KVS__V1__REQUEST__OP_FORK:
        return "fork";
    case KVS__V1__REQUEST__OP_DROP:
        return "drop";
    case KVS__V1__REQUEST__OP_STATS:
        return "stats";
    case KVS__V1__REQUEST__OP_LIST:
        return "list";
    case KVS__V1__REQUEST__OP_PING:
        return "ping";
    case KVS__V1__REQUEST__OP_INFO:
        return "info";
    case KVS__V1__REQUEST__OP_SET_TTL:
        return "set_ttl";
    case KVS__V1__REQUEST__OP_FLUSH:
        return "flush";
    case KVS__V1__REQUEST__OP_OBSERVE:
        return "observe";
    case KVS__V1__REQUEST__OP_SEQ_IMPORT:
        return "import";
    default:
        return "none";
    }
}

static int check_params(const Kvs__V1__QueryParams *p, char *err,
                        size_t errlen) {
    if (!p)
        return 0;
    /* The enum domains are the conversion's: what it maps is what the
     * workers can run. */
    kvs_query_params_t c;
    int rc = kvs_wire_params_from_pb(p, &c, err, errlen);
    if (rc)
        return rc;
    /* NaN fails every comparison, so it is caught by the negated tests. */
    if (!(p->retrieval_fraction >= 0 && p->retrieval_fraction <= 1) ||
        !(p->estimation_fraction >= 0 && p->estimation_fraction <= 1))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "zone fractions must be within [0, 1]");
    if (!(p->epsilon >= 0 && p->epsilon <= 1))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "epsilon must be within [0, 1]");
    if (!(p->scale >= 0 && p->scale < 1e30f))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "scale must be finite and >= 0");
    return 0;
}

static int check_queries(const ProtobufCBinaryData *q, Kvs__V1__DType dt,
                         char *err, size_t errlen) {
    kvs_dtype_t cdt;
    if (kvs_wire_dtype_from_pb(dt, &cdt, NULL, 0))
        return kvs__errf(err, errlen, KVS_EINVAL, "unknown query dtype %d",
                         (int)dt);
    size_t es = kvs_dtype_size(cdt);
    if (q->len == 0 || q->len % es)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "queries must be a non-empty whole number of %zu-byte "
                         "elements (got %zu bytes)",
                         es, q->len);
    return 0;
}

static int check_request(const Kvs__V1__Request *req,
                         const kvs_frame_limits_t *lim, char *err,
                         size_t errlen) {
    switch (req->op_case) {
    case KVS__V1__REQUEST__OP_HELLO:
        if (!req->hello)
            break;
        return 0;
    case KVS__V1__REQUEST__OP_CREATE: {
        if (!req->create)
            break;
        const Kvs__V1__Geometry *g = req->create->geometry;
        if (!g)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "create needs a geometry");
        kvs_geometry_t cg;
        int rc = kvs_wire_geometry_from_pb(g, &cg, err, errlen);
        if (rc)
            return rc;
        if (lim && lim->max_head_dim && g->head_dim > lim->max_head_dim)
            return kvs__errf(err, errlen, KVS_ETOOBIG,
                             "head_dim %u exceeds max_head_dim %u", g->head_dim,
                             lim->max_head_dim);
        return 0;
    }
    case KVS__V1__REQUEST__OP_APPEND: {
        const Kvs__V1__AppendRequest *a = req->append;
        if (!a)
            break;
        if (a->n_tokens == 0)
            return kvs__errf(err, errlen, KVS_EINVAL, "append of zero tokens");
        if (lim && lim->max_tokens_per_append &&
            a->n_tokens > lim->max_tokens_per_append)
            return kvs__errf(err, errlen, KVS_ETOOBIG,
                             "append of %u tokens exceeds "
                             "max_tokens_per_append %u",
                             a->n_tokens, lim->max_tokens_per_append);
        if (a->keys.len != a->values.len)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "keys (%zu bytes) and values (%zu bytes) differ "
                             "in size",
                             a->keys.len, a->values.len);
        if (a->keys.len == 0 || a->keys.len % a->n_tokens)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "%zu key bytes are not a whole number of bytes "
                             "for each of %u tokens",
                             a->keys.len, a->n_tokens);
        return 0;
    }
    case KVS__V1__REQUEST__OP_SEARCH: {
        const Kvs__V1__SearchRequest *s = req->search;
        if (!s)
            break;
        if (s->k == 0)
            return kvs__errf(err, errlen, KVS_ERANGE, "search with k = 0");
        int rc = check_queries(&s->queries, s->query_dtype, err, errlen);
        return rc ? rc : check_params(s->params, err, errlen);
    }
    case KVS__V1__REQUEST__OP_ATTEND: {
        const Kvs__V1__AttendRequest *a = req->attend;
        if (!a)
            break;
        int rc = check_queries(&a->queries, a->query_dtype, err, errlen);
        return rc ? rc : check_params(a->params, err, errlen);
    }
    case KVS__V1__REQUEST__OP_OBSERVE: {
        const Kvs__V1__ObserveQueriesRequest *o = req->observe;
        if (!o)
            break;
        if (o->n == 0)
            return kvs__errf(err, errlen, KVS_EINVAL, "observe with n = 0");
        int rc = check_queries(&o->queries, o->query_dtype, err, errlen);
        if (!rc && o->queries.len % o->n)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "%zu query bytes are not a whole number of "
                             "bytes for each of %u tokens",
                             o->queries.len, o->n);
        return rc;
    }
    case KVS__V1__REQUEST__OP_SEQ_IMPORT: {
        const Kvs__V1__ImportRequest *im = req->seq_import;
        if (!im)
            break;
        if (im->abort && (im->last || im->data.len))
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "import abort carries no data");
        if (!im->abort && !im->last && im->data.len == 0)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "import piece without data");
        if (im->offset > UINT64_MAX - im->data.len)
            return kvs__errf(err, errlen, KVS_ERANGE,
                             "import offset out of range");
        return 0;
    }
    case KVS__V1__REQUEST__OP_FORK:
        if (!req->fork)
            break;
        if (req->fork->src == req->fork->dst)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "fork source and destination are the same");
        return 0;
    case KVS__V1__REQUEST__OP_DROP:
    case KVS__V1__REQUEST__OP_STATS:
    case KVS__V1__REQUEST__OP_LIST:
    case KVS__V1__REQUEST__OP_PING:
    case KVS__V1__REQUEST__OP_INFO:
    case KVS__V1__REQUEST__OP_SET_TTL:
    case KVS__V1__REQUEST__OP_FLUSH:
        /* The union member is a pointer for every case; any one tells. */
        if (!req->drop)
            break;
        return 0;
    default:
        return kvs__errf(err, errlen, KVS_EPROTO, "request has no operation");
    }
    return kvs__errf(err, errlen, KVS_EPROTO, "request op %s has no body",
                     kvs_frame_op_name(req->op_case));
}

int kvs_frame_decode_request(const uint8_t *body, size_t len,
                             const kvs_frame_limits_t *limits,
                             Kvs__V1__Request **out, char *err, size_t errlen) {
    *out = kvs__v1__request__unpack(NULL, len, body);
    if (!*out)
        return kvs__errf(err, errlen, KVS_EPROTO,
                         "frame body (%zu bytes) is not a valid Request "
                         "message",
                         len);
    return check_request(*out, limits, err, errlen);
}

/* -------------------------------------------------------- in-place append */

/* A varint of at most `max` bytes at *p; 0 when truncated or longer. */
static int pb_varint(const uint8_t **p, const uint8_t *end, int max,
                     uint64_t *v) {
    uint64_t x = 0;
    for (int i = 0; i < max && *p < end; i++) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *v = x;
            return 1;
        }
    }
    return 0;
}

/* A length-delimited field's extent: 0 unless it fits in the input. */
static int pb_bytes(const uint8_t **p, const uint8_t *end, const uint8_t **d,
                    size_t *n) {
    uint64_t l;
    if (!pb_varint(p, end, 10, &l) || l > (uint64_t)(end - *p))
        return 0;
    *d = *p;
    *n = (size_t)l;
    *p += l;
    return 1;
}

/* One allocation holds a borrowed request (msg is its first member, so
 * free(msg) releases it). */
typedef struct borrowed_s {
    Kvs__V1__Request req;
    Kvs__V1__AppendRequest append;
} borrowed_t;

/*
 * Decode `body` as Request{append} without copying keys and values, when
 * it has the canonical form (kvs_frame_request_t); anything else is left to
 * protobuf-c, so that both decoders agree on every input by construction:
 * this one only takes inputs whose meaning has no protobuf subtlety
 * (repeats that merge or override, unknown fields, uint32 truncation).
 * Returns 1 with *out set, 0 to fall back, KVS_ENOMEM.
 */
static int append_in_place(const uint8_t *body, size_t len,
                           Kvs__V1__Request **out) {
    const uint8_t *p = body, *end = body + len;
    uint64_t tag, v;
    const uint8_t *sub;
    size_t sublen;
    if (!pb_varint(&p, end, 5, &tag) ||
        tag != ((uint64_t)KVS__V1__REQUEST__OP_APPEND << 3 | 2) ||
        !pb_bytes(&p, end, &sub, &sublen) || p != end)
        return 0;
    Kvs__V1__AppendRequest a = KVS__V1__APPEND_REQUEST__INIT;
    unsigned seen = 0;
    p = sub;
    end = sub + sublen;
    while (p < end) {
        if (!pb_varint(&p, end, 5, &tag))
            return 0;
        uint64_t field = tag >> 3, wt = tag & 7;
        if (field < 1 || field > 5 || (seen & (1u << field)))
            return 0;
        seen |= 1u << field;
        if (field <= 3) {
            /* uint64 seq: up to 10 bytes; uint32 layer and n_tokens: 5,
             * and no bits protobuf-c would truncate. */
            if (wt != 0 || !pb_varint(&p, end, field == 1 ? 10 : 5, &v) ||
                (field > 1 && v > UINT32_MAX))
                return 0;
            if (field == 1)
                a.seq = v;
            else if (field == 2)
                a.layer = (uint32_t)v;
            else
                a.n_tokens = (uint32_t)v;
            continue;
        }
        const uint8_t *d;
        size_t n;
        if (wt != 2 || !pb_bytes(&p, end, &d, &n))
            return 0;
        ProtobufCBinaryData *bd = field == 4 ? &a.keys : &a.values;
        bd->data = n ? (uint8_t *)d : NULL;
        bd->len = n;
    }
    borrowed_t *b = malloc(sizeof(*b));
    if (!b)
        return KVS_ENOMEM;
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    b->req = req;
    b->append = a;
    b->req.op_case = KVS__V1__REQUEST__OP_APPEND;
    b->req.append = &b->append;
    *out = &b->req;
    return 1;
}

int kvs_frame_decode_request_in_place(const uint8_t *body, size_t len,
                                      const kvs_frame_limits_t *limits,
                                      kvs_frame_request_t *out, char *err,
                                      size_t errlen) {
    memset(out, 0, sizeof(*out));
    int rc = append_in_place(body, len, &out->msg);
    if (rc < 0)
        return kvs__errf(err, errlen, rc,
                         "out of memory decoding a %zu-byte request", len);
    if (rc == 1) {
        out->borrowed = 1;
        return check_request(out->msg, limits, err, errlen);
    }
    rc = kvs_frame_decode_request(body, len, limits, &out->msg, err, errlen);
    const Kvs__V1__Request *m = out->msg;
    if (m && m->op_case == KVS__V1__REQUEST__OP_APPEND && m->append)
        out->copied = m->append->keys.len + m->append->values.len;
    return rc;
}

void kvs_frame_request_release(kvs_frame_request_t *req) {
    if (req->msg) {
        if (req->borrowed)
            free(req->msg); /* the borrowed_t block */
        else
            kvs__v1__request__free_unpacked(req->msg, NULL);
    }
    req->msg = NULL;
    req->borrowed = 0;
}

static int check_response(const Kvs__V1__Response *r, char *err,
                          size_t errlen) {
    if (r->status > 0)
        return kvs__errf(err, errlen, KVS_EPROTO, "positive status %d",
                         r->status);
    switch (r->result_case) {
    case KVS__V1__RESPONSE__RESULT_SEARCH: {
        const Kvs__V1__SearchResponse *s = r->search;
        if (!s)
            break;
        uint64_t n = (uint64_t)s->n_q_heads * s->k;
        if (s->positions.len != n * 8 || s->scores.len != n * 4)
            return kvs__errf(err, errlen, KVS_EPROTO,
                             "search response arrays do not match %u heads x "
                             "k %u",
                             s->n_q_heads, s->k);
        return 0;
    }
    case KVS__V1__RESPONSE__RESULT_ATTEND:
        if (!r->attend)
            break;
        if (r->attend->output.len % 4)
            return kvs__errf(err, errlen, KVS_EPROTO,
                             "attend output is not whole float32s");
        return 0;
    case KVS__V1__RESPONSE__RESULT__NOT_SET:
        return 0;
    default:
        if (!r->hello)
            break;
        return 0;
    }
    return kvs__errf(err, errlen, KVS_EPROTO, "response result has no body");
}

int kvs_frame_decode_response(const uint8_t *body, size_t len,
                              Kvs__V1__Response **out, char *err,
                              size_t errlen) {
    *out = kvs__v1__response__unpack(NULL, len, body);
    if (!*out)
        return kvs__errf(err, errlen, KVS_EPROTO,
                         "frame body (%zu bytes) is not a valid Response "
                         "message",
                         len);
    int rc = check_response(*out, err, errlen);
    if (rc) {
        kvs__v1__response__free_unpacked(*out, NULL);
        *out = NULL;
    }
    return rc;
}
