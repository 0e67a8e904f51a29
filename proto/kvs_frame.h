/*
 * kvs_frame.h: framing of the kvstored wire protocol, shared by the daemon
 * (server/), the client library (client/) and the fuzz targets.
 *
 * A frame is a fixed 24-byte little-endian header followed by `body_len`
 * bytes holding one protobuf message (kvs.v1.Request from client to server,
 * kvs.v1.Response from server to client; proto/kvstore.proto):
 *
 *   offset size field
 *        0    4 magic        "KVSP" (0x5053564B as a little-endian u32)
 *        4    2 version      KVS_PROTOCOL_VERSION
 *        6    2 flags        KVS_FRAME_F_* bits; unknown bits are an error
 *        8    8 request_id   chosen by the client, echoed by the server
 *       16    4 body_len     bytes of protobuf that follow
 *       20    4 reserved     zero
 *
 * The header is not protobuf so that a reader knows how much to buffer, and
 * can refuse an oversized frame, before it parses anything.
 *
 * Conventions: int returns, 0 on success, KVS_E* codes on failure; functions
 * that can fail on input take an `err` buffer (may be NULL) that receives a
 * one-line reason. Nothing here keeps global state; a kvs_frame_reader_t
 * belongs to one connection and is not thread-safe.
 */
#ifndef KVS_FRAME_H
#define KVS_FRAME_H

#include "kvs_common.h"
#include "kvstore.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_FRAME_MAGIC 0x5053564Bu /* "KVSP" on the wire */
#define KVS_PROTOCOL_VERSION 1
#define KVS_FRAME_HEADER_SIZE 24
/* Default limit on body_len; each side may configure its own. */
#define KVS_FRAME_DEFAULT_MAX_BODY (64u << 20)
/* Hard ceiling for any configured limit: body_len is a u32 and protobuf-c
 * sizes must stay far from overflow. */
#define KVS_FRAME_MAX_BODY_LIMIT (1u << 30)

/* Set on every frame the server sends. */
#define KVS_FRAME_F_RESPONSE 0x1u
/* The sender closes the connection after this frame (a refusal, or the
 * answer to a frame that broke the protocol). */
#define KVS_FRAME_F_CLOSE 0x2u
#define KVS_FRAME_F_KNOWN (KVS_FRAME_F_RESPONSE | KVS_FRAME_F_CLOSE)

typedef struct kvs_frame_header_s {
    uint32_t magic;
    uint16_t version;
    uint16_t flags;
    uint64_t request_id;
    uint32_t body_len;
} kvs_frame_header_t;

/* Write `h` into `out` (exactly KVS_FRAME_HEADER_SIZE bytes); reserved bytes
 * are zero. Never fails. */
void kvs_frame_header_encode(const kvs_frame_header_t *h, uint8_t *out);

/*
 * Parse the first KVS_FRAME_HEADER_SIZE bytes of `buf` into `h`.
 * Errors:
 *   KVS_EINVAL  len < KVS_FRAME_HEADER_SIZE (the caller must wait for more)
 *   KVS_EPROTO  bad magic (h->request_id is then meaningless), unknown flag
 *               bits, non-zero reserved bytes, or a version other than
 *               KVS_PROTOCOL_VERSION (h is filled, so the peer can be
 *               answered with its request id)
 *   KVS_ETOOBIG body_len > max_body (h is filled)
 */
int kvs_frame_header_decode(const uint8_t *buf, size_t len, uint32_t max_body,
                            kvs_frame_header_t *h, char *err, size_t errlen);

/*
 * Frames of at least this many bytes (header included) are "direct": once
 * their header is in, the rest is received straight into a buffer of their
 * own, exactly their size, instead of the shared buffer (which would grow,
 * compact and read ahead into the next frame). The caller may then take
 * that buffer (kvs_frame_reader_take) and keep the body without copying it,
 * e.g. to decode an Append in place. Smaller frames share one buffer so
 * that a pipeline of them costs one read.
 */
#define KVS_FRAME_DIRECT_MIN (256u << 10)

/* Where direct frame buffers come from; NULL functions mean malloc/free.
 * `free` gets what `alloc` returned. Called on the reader's thread. */
typedef struct kvs_frame_allocator_s {
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr);
    void *ctx;
} kvs_frame_allocator_t;

/*
 * An incremental reader: bytes go in as they arrive from a socket, whole
 * frames come out. The buffer grows to fit the frame being read (at most
 * KVS_FRAME_HEADER_SIZE + max_body plus read-ahead), so a frame's body is
 * always contiguous; a direct frame has a buffer of its own.
 */
typedef struct kvs_frame_reader_s {
    uint8_t *buf;
    size_t cap;
    size_t off; /* first unconsumed byte */
    size_t len; /* end of received bytes */
    uint32_t max_body;
    /* The direct frame at the front (NULL: none): dhave of its dlen bytes
     * (header + body) have arrived; dready once _next returned it. */
    uint8_t *dbuf;
    size_t dhave, dlen;
    int dready;
    /* The last frame was direct: read the next header alone, so that a
     * following direct frame's first bytes are not read into buf. */
    int after_direct;
    kvs_frame_allocator_t alloc;
    /* Bytes the reader copied after receiving them (compaction, growth of
     * the shared buffer, the first bytes of a direct frame): the copies
     * beyond the one from the socket, for the copies-per-byte metric. */
    uint64_t copied;
} kvs_frame_reader_t;

/* Errors: KVS_EINVAL (max_body 0 or above KVS_FRAME_MAX_BODY_LIMIT). */
int kvs_frame_reader_init(kvs_frame_reader_t *r, uint32_t max_body);
/* Release the buffers; the reader may be _init'ed again. */
void kvs_frame_reader_destroy(kvs_frame_reader_t *r);
/* Take direct frame buffers from `a` (copied) instead of malloc; before the
 * first byte is fed. */
void kvs_frame_reader_set_allocator(kvs_frame_reader_t *r,
                                    const kvs_frame_allocator_t *a);

/*
 * Space to receive into: *ptr and *len describe at least `want` writable bytes
 * (fewer only when the current frame needs fewer). Invalidates body pointers
 * returned by kvs_frame_reader_next(). Errors: KVS_ENOMEM.
 */
int kvs_frame_reader_prepare(kvs_frame_reader_t *r, size_t want, void **ptr,
                             size_t *len);
/* Mark `n` bytes written at the space from _prepare as received. */
void kvs_frame_reader_commit(kvs_frame_reader_t *r, size_t n);
/* Copy `n` bytes in (convenience for callers that own their read buffer).
 * Errors: KVS_ENOMEM. */
int kvs_frame_reader_feed(kvs_frame_reader_t *r, const void *data, size_t n);

/*
 * Take the next complete frame. Returns 1 with *h and *body (body_len bytes,
 * valid until the next _prepare, _feed, _next or _destroy; a direct frame's
 * body, once taken, until its buffer is freed) filled, 0 when more bytes
 * are needed, or an error of kvs_frame_header_decode(); after an error the
 * stream cannot be resynchronised and the connection should be closed.
 * Bytes still buffered: kvs_frame_reader_pending().
 */
int kvs_frame_reader_next(kvs_frame_reader_t *r, kvs_frame_header_t *h,
                          const uint8_t **body, char *err, size_t errlen);
static inline size_t kvs_frame_reader_pending(const kvs_frame_reader_t *r) {
    return r->len - r->off + (r->dbuf && !r->dready ? r->dhave : 0);
}

/* The received bytes of the frame at the front (header first), *have of
 * them; for looking at its header before the frame is complete. */
const uint8_t *kvs_frame_reader_front(const kvs_frame_reader_t *r,
                                      size_t *have);

/*
 * After kvs_frame_reader_next() returned a direct frame: hand its buffer
 * (the header at offset 0, the body at KVS_FRAME_HEADER_SIZE) to the
 * caller, who frees it with kvs_frame_reader_free_buf() (any thread the
 * allocator allows) and may keep body pointers until then. NULL when the
 * last frame returned was not direct or was taken already. A direct frame
 * not taken is freed by the next _prepare, _feed, _next or _destroy.
 */
uint8_t *kvs_frame_reader_take(kvs_frame_reader_t *r);
void kvs_frame_reader_free_buf(const kvs_frame_reader_t *r, uint8_t *buf);

/*
 * Encode a whole frame (header + packed message) into one malloc'ed buffer
 * that the caller frees with free(). `flags` goes into the header as is.
 * Errors: KVS_ETOOBIG (the packed message exceeds max_body), KVS_ENOMEM.
 */
int kvs_frame_encode(uint64_t request_id, uint16_t flags,
                     const ProtobufCMessage *msg, uint32_t max_body,
                     uint8_t **out, size_t *out_len);

/* Encode a frame into caller memory: `body_len` must be
 * protobuf_c_message_get_packed_size(msg) and `dst` must hold
 * KVS_FRAME_HEADER_SIZE + body_len bytes. For callers that batch frames into
 * one output buffer (no allocation per frame). Never fails. */
void kvs_frame_encode_to(uint64_t request_id, uint16_t flags,
                         const ProtobufCMessage *msg, size_t body_len,
                         uint8_t *dst);

/* Limits that a structurally valid request must respect. Zero fields are
 * not checked. */
typedef struct kvs_frame_limits_s {
    uint32_t max_head_dim;
    uint32_t max_tokens_per_append;
} kvs_frame_limits_t;

/*
 * Unpack a request body and check what can be checked without knowing the
 * sequence: an op is set, sub-messages that must exist do, enums are known,
 * byte arrays have whole elements, appends have as many value bytes as key
 * bytes and a whole number of bytes per token, `limits` hold.
 * On success *out is freed with kvs__v1__request__free_unpacked(*out, NULL).
 * On a check failure *out is still set (so the caller can answer with the
 * op's name) and the return is the error.
 * Errors: KVS_EPROTO (not a Request, no op: *out NULL for the former),
 * KVS_EINVAL (a field out of its domain), KVS_ETOOBIG (a limit).
 */
int kvs_frame_decode_request(const uint8_t *body, size_t len,
                             const kvs_frame_limits_t *limits,
                             Kvs__V1__Request **out, char *err, size_t errlen);

/*
 * A decoded request that may borrow its frame's body. An Append in the
 * form encoders produce (the Request holds only the append field; the
 * AppendRequest each of its fields at most once, with the wire types of
 * kvstore.proto) is decoded in place: its keys and values point into the
 * body, nothing is copied, and the body must stay valid and unchanged until
 * kvs_frame_request_release(). Anything else is unpacked by protobuf-c
 * (copied) exactly as kvs_frame_decode_request() does, and borrows nothing.
 * Both give the same field values for the same bytes.
 */
typedef struct kvs_frame_request_s {
    Kvs__V1__Request *msg;
    int borrowed;  /* msg points into the body */
    size_t copied; /* payload bytes the decode copied (keys+values) */
} kvs_frame_request_t;

/*
 * kvs_frame_decode_request() that decodes Appends in place (above). Same
 * checks and errors; on a check failure out->msg is set as there. Release
 * with kvs_frame_request_release() in every case (a NULL msg is fine).
 */
int kvs_frame_decode_request_in_place(const uint8_t *body, size_t len,
                                      const kvs_frame_limits_t *limits,
                                      kvs_frame_request_t *out, char *err,
                                      size_t errlen);
void kvs_frame_request_release(kvs_frame_request_t *req);

/*
 * Unpack a response body and check that its arrays are consistent with
 * their declared shapes. Free with kvs__v1__response__free_unpacked().
 * Errors: KVS_EPROTO.
 */
int kvs_frame_decode_response(const uint8_t *body, size_t len,
                              Kvs__V1__Response **out, char *err,
                              size_t errlen);

/* Lower-case name of a request op ("append", ...; "none" for unset). */
const char *kvs_frame_op_name(Kvs__V1__Request__OpCase op);

#ifdef __cplusplus
}
#endif
#endif /* KVS_FRAME_H */
