/*
 * ops.c: the worker-pool side of kvstored. Each function turns one decoded
 * request into engine calls and encodes the response frame, so that neither
 * engine work nor response packing ever runs on the I/O loop.
 *
 * The engine sizes its reads from the sequence's geometry, not from the
 * bytes we received, so every byte array is checked against the geometry
 * (kvs_seq_info) before the engine sees it, under a per-sequence read lock
 * that create/drop take for writing: a drop and re-create with another
 * geometry cannot slip between the check and the call.
 *
 * Messages become C API values only through proto/kvs_wire.h, the same
 * conversion the client uses.
 */
#include "kvs_kernels.h"
#include "kvs_wire.h"
#include "server_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvstored passes wire arrays to the engine as-is: little-endian only"
#endif

typedef struct op_ctx_s {
    kvs__work_t *w;
    kvs_store_t *store;
    char msg[512];
} op_ctx_t;

static int fail(op_ctx_t *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(op_ctx_t *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof(c->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* The engine's own detail for its last failure on this thread. */
static int engine_fail(op_ctx_t *c, int rc, const char *what) {
    const char *detail = kvs_store_errmsg(c->store);
    return fail(c, rc, "%s: %s", what,
                detail && *detail ? detail : kvs_strerror(rc));
}

static uint64_t w_max_frame(const op_ctx_t *c) {
    return c->w->srv->cfg->max_frame_bytes;
}

static pthread_rwlock_t *seq_lock(kvs_server_t *srv, uint64_t seq) {
    uint64_t h = seq * 0x9E3779B97F4A7C15ull;
    return &srv->seq_locks[h >> 58];
}

/* Queries as fp32 [n][head_dim]: borrowed from the message when already
 * fp32 (malloc'ed by protobuf-c, so aligned), converted otherwise. */
static int queries_f32_n(op_ctx_t *c, const ProtobufCBinaryData *q,
                         Kvs__V1__DType wire_dt, const kvs_geometry_t *g,
                         uint32_t tokens, const float **out, float **owned) {
    *owned = NULL;
    kvs_dtype_t dt;
    int rc = kvs_wire_dtype_from_pb(wire_dt, &dt, c->msg, sizeof(c->msg));
    if (rc)
        return rc;
    size_t es = kvs_dtype_size(dt);
    size_t n = (size_t)tokens * g->n_q_heads * g->head_dim;
    if (q->len != n * es)
        return fail(c, KVS_EGEOMETRY,
                    "queries hold %zu bytes; the sequence needs %u tokens x "
                    "%u heads x %u dims x %zu bytes = %zu",
                    q->len, tokens, g->n_q_heads, g->head_dim, es, n * es);
    if (dt == KVS_DTYPE_F32) {
        *out = (const float *)(const void *)q->data;
        return 0;
    }
    float *f = malloc(n * sizeof(float));
    if (!f)
        return fail(c, KVS_ENOMEM, "out of memory converting queries");
    /* The wire is little-endian, as every host kvstored builds for. */
    kvs_to_f32(dt, q->data, f, n);
    *out = f;
    *owned = f;
    return 0;
}

static int queries_f32(op_ctx_t *c, const ProtobufCBinaryData *q,
                       Kvs__V1__DType wire_dt, const kvs_geometry_t *g,
                       const float **out, float **owned) {
    return queries_f32_n(c, q, wire_dt, g, 1, out, owned);
}

/* A wire conversion failure: its reason is already in c->msg. */
static int wire_fail(op_ctx_t *c, int rc, const char *what) {
    char why[sizeof(c->msg)];
    snprintf(why, sizeof(why), "%s", c->msg);
    return fail(c, rc, "%s: %s", what, why);
}

static int op_create(op_ctx_t *c, const Kvs__V1__CreateSequenceRequest *r) {
    kvs_geometry_t g;
    int rc = kvs_wire_geometry_from_pb(r->geometry, &g, c->msg, sizeof(c->msg));
    if (rc)
        return wire_fail(c, rc, "create");
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_wrlock(l);
    rc = kvs_seq_create(c->store, r->seq, &g);
    if (!rc && r->ttl_seconds) {
        rc = kvs_seq_set_ttl(c->store, r->seq, r->ttl_seconds);
        if (rc) /* all or nothing: no sequence without its TTL */
            kvs_seq_drop(c->store, r->seq);
    }
    pthread_rwlock_unlock(l);
    return rc ? engine_fail(c, rc, "create") : 0;
}

static int op_set_ttl(op_ctx_t *c, const Kvs__V1__SetTtlRequest *r) {
    int rc = kvs_seq_set_ttl(c->store, r->seq, r->ttl_seconds);
    return rc ? engine_fail(c, rc, "set_ttl") : 0;
}

static int op_append(op_ctx_t *c, const Kvs__V1__AppendRequest *r,
                     Kvs__V1__AppendResponse *out) {
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_rdlock(l);
    kvs_geometry_t geo;
    int rc = kvs_seq_shape(c->store, r->seq, 0, &geo, NULL);
    if (rc) {
        rc = engine_fail(c, rc, "append");
        goto out;
    }
    const kvs_geometry_t *g = &geo;
    size_t need = (size_t)r->n_tokens * g->n_kv_heads * g->head_dim *
                  kvs_dtype_size(g->dtype);
    if (r->keys.len != need) {
        rc = fail(c, KVS_EGEOMETRY,
                  "append of %u tokens needs %zu key bytes (%u kv heads x %u "
                  "dims x %s), got %zu",
                  r->n_tokens, need, g->n_kv_heads, g->head_dim,
                  kvs_dtype_name(g->dtype), r->keys.len);
        goto out;
    }
    rc = kvs_seq_append(c->store, r->seq, r->layer, r->n_tokens, r->keys.data,
                        r->values.data);
    if (rc) {
        rc = engine_fail(c, rc, "append");
        goto out;
    }
    out->tokens = 0; /* not tracked per layer by the engine API */
out:
    pthread_rwlock_unlock(l);
    return rc;
}

static int op_search(op_ctx_t *c, const Kvs__V1__SearchRequest *r,
                     Kvs__V1__SearchResponse *out, void **bufs) {
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_rdlock(l);
    float *owned = NULL;
    kvs_geometry_t geo;
    uint64_t tokens = 0;
    int rc = kvs_seq_shape(c->store, r->seq, r->layer, &geo, &tokens);
    if (rc) {
        rc = engine_fail(c, rc, "search");
        goto out;
    }
    const kvs_geometry_t *g = &geo;
    const float *q;
    if ((rc = queries_f32(c, &r->queries, r->query_dtype, g, &q, &owned)))
        goto out;
    kvs_query_params_t p;
    if ((rc = kvs_wire_params_from_pb(r->params, &p, c->msg, sizeof(c->msg)))) {
        rc = wire_fail(c, rc, "search");
        goto out;
    }
    /* Bound k before allocating outputs sized by it: the reply (a position
     * and a score per head and rank) must fit one frame, or a huge k on a
     * long layer would allocate gigabytes only to be refused at encoding. */
    uint64_t reply =
        (uint64_t)r->k * g->n_q_heads * (sizeof(int64_t) + sizeof(float));
    if (reply > w_max_frame(c)) {
        rc =
            fail(c, KVS_ETOOBIG,
                 "search reply of k %u x %u heads x %zu bytes = %llu bytes "
                 "exceeds max_frame_bytes %llu",
                 r->k, g->n_q_heads, sizeof(int64_t) + sizeof(float),
                 (unsigned long long)reply, (unsigned long long)w_max_frame(c));
        goto out;
    }
    if (r->k > tokens) {
        rc = fail(c, KVS_ERANGE, "k %u exceeds the %llu tokens of layer %u",
                  r->k, (unsigned long long)tokens, r->layer);
        goto out;
    }
    size_t n = (size_t)g->n_q_heads * r->k;
    int64_t *pos = malloc(n * sizeof(int64_t));
    float *sc = malloc(n * sizeof(float));
    bufs[0] = pos;
    bufs[1] = sc;
    if (!pos || !sc) {
        rc = fail(c, KVS_ENOMEM, "out of memory for %zu results", n);
        goto out;
    }
    rc = kvs_seq_search(c->store, r->seq, r->layer, q, r->k, &p, pos, sc);
    if (rc) {
        rc = engine_fail(c, rc, "search");
        goto out;
    }
    out->n_q_heads = g->n_q_heads;
    out->k = r->k;
    out->positions.data = (uint8_t *)pos;
    out->positions.len = n * sizeof(int64_t);
    out->scores.data = (uint8_t *)sc;
    out->scores.len = n * sizeof(float);
out:
    pthread_rwlock_unlock(l);
    free(owned);
    return rc;
}

static int op_attend(op_ctx_t *c, const Kvs__V1__AttendRequest *r,
                     Kvs__V1__AttendResponse *out, Kvs__V1__AttendStats *st,
                     void **bufs) {
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_rdlock(l);
    float *owned = NULL;
    kvs_geometry_t geo;
    int rc = kvs_seq_shape(c->store, r->seq, 0, &geo, NULL);
    if (rc) {
        rc = engine_fail(c, rc, "attend");
        goto out;
    }
    const kvs_geometry_t *g = &geo;
    const float *q;
    if ((rc = queries_f32(c, &r->queries, r->query_dtype, g, &q, &owned)))
        goto out;
    kvs_query_params_t p;
    if ((rc = kvs_wire_params_from_pb(r->params, &p, c->msg, sizeof(c->msg)))) {
        rc = wire_fail(c, rc, "attend");
        goto out;
    }
    size_t n = (size_t)g->n_q_heads * g->head_dim;
    float *o = malloc(n * sizeof(float));
    bufs[0] = o;
    if (!o) {
        rc = fail(c, KVS_ENOMEM, "out of memory for the output");
        goto out;
    }
    kvs_attend_stats_t s;
    memset(&s, 0, sizeof(s));
    rc = kvs_seq_attend(c->store, r->seq, r->layer, q, &p, o, &s);
    if (rc) {
        rc = engine_fail(c, rc, "attend");
        goto out;
    }
    out->output.data = (uint8_t *)o;
    out->output.len = n * sizeof(float);
    kvs_wire_attend_stats_to_pb(&s, st);
    out->stats = st;
out:
    pthread_rwlock_unlock(l);
    free(owned);
    return rc;
}

static int op_fork(op_ctx_t *c, const Kvs__V1__ForkRequest *r) {
    uint64_t at = r->at_token;
    if (r->whole) {
        /* "All of it" is the shortest layer: the engine forks the same
         * prefix of every layer. */
        kvs_seq_info_t info;
        int rc = kvs_seq_info(c->store, r->src, &info);
        if (rc)
            return engine_fail(c, rc, "fork");
        at = info.tokens_min;
    }
    /* No stripe lock: fork sizes no buffer from the geometry, and the
     * engine itself refuses an existing child or a too-long prefix. */
    int rc = kvs_seq_fork(c->store, r->src, at, r->dst);
    return rc ? engine_fail(c, rc, "fork") : 0;
}

static int op_drop(op_ctx_t *c, const Kvs__V1__DropRequest *r) {
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_wrlock(l);
    int rc = kvs_seq_drop(c->store, r->seq);
    pthread_rwlock_unlock(l);
    return rc ? engine_fail(c, rc, "drop") : 0;
}

static int op_info(op_ctx_t *c, const Kvs__V1__InfoRequest *r,
                   Kvs__V1__InfoResponse *out, Kvs__V1__Geometry *gm) {
    kvs_seq_info_t info;
    int rc = kvs_seq_info(c->store, r->seq, &info);
    if (rc)
        return engine_fail(c, rc, "info");
    rc = kvs_wire_seq_info_to_pb(&info, out, gm, c->msg, sizeof(c->msg));
    return rc ? wire_fail(c, rc, "info") : 0;
}

static int op_stats(op_ctx_t *c, Kvs__V1__StatsResponse *out) {
    kvs_store_stats_t s;
    memset(&s, 0, sizeof(s));
    int rc = kvs_store_stats(c->store, &s);
    if (rc)
        return engine_fail(c, rc, "stats");
    kvs__work_t *w = c->w;
    kvs_wire_store_stats_to_pb(&s, out);
    out->attend_path = (char *)kvs_store_gpu_info(c->store);
    out->server_version = (char *)KVS_SERVER_VERSION;
    out->node_id = w->srv->node_id;
    out->uptime_seconds = (double)(uv_hrtime() - w->srv->start_ns) / 1e9;
    out->connections = w->snap_connections;
    out->requests_total = w->snap_requests;
    out->inflight = w->snap_inflight;
    out->bytes_in = w->snap_in;
    out->bytes_out = w->snap_out;
    return 0;
}

static int op_flush(op_ctx_t *c, const Kvs__V1__FlushRequest *r,
                    Kvs__V1__FlushResponse *out) {
    int rc = kvs_seq_flush(c->store, r->seq);
    if (rc)
        return engine_fail(c, rc, "flush");
    kvs_store_stats_t s;
    memset(&s, 0, sizeof(s));
    if (kvs_store_stats(c->store, &s) == 0)
        out->persisted_seqno = s.persisted_seqno;
    return 0;
}

static int op_list(op_ctx_t *c, const Kvs__V1__ListSequencesRequest *r,
                   Kvs__V1__ListSequencesResponse *out, void **bufs) {
    uint32_t cap = c->w->srv->cfg->max_list_ids;
    if (r->limit && r->limit < cap)
        cap = r->limit;
    uint64_t *ids = malloc((size_t)cap * sizeof(uint64_t));
    bufs[0] = ids;
    if (!ids)
        return fail(c, KVS_ENOMEM, "out of memory for %u ids", cap);
    size_t n = 0;
    int rc = kvs_store_list(c->store, ids, cap, &n);
    if (rc)
        return engine_fail(c, rc, "list");
    out->ids = ids;
    out->n_ids = n < cap ? n : cap;
    out->total = n;
    return 0;
}

static int op_observe(op_ctx_t *c, const Kvs__V1__ObserveQueriesRequest *r) {
    pthread_rwlock_t *l = seq_lock(c->w->srv, r->seq);
    pthread_rwlock_rdlock(l);
    float *owned = NULL;
    kvs_geometry_t geo;
    int rc = kvs_seq_shape(c->store, r->seq, 0, &geo, NULL);
    if (rc) {
        rc = engine_fail(c, rc, "observe");
        goto out;
    }
    /* The engine's bound first: n x heads x dims must not overflow nor
     * make the byte count below match by wrapping. */
    if (r->n > KVS_OBSERVE_MAX) {
        rc = fail(c, KVS_ETOOBIG, "observe of %u queries (most %u)", r->n,
                  KVS_OBSERVE_MAX);
        goto out;
    }
    const float *q;
    if ((rc = queries_f32_n(c, &r->queries, r->query_dtype, &geo, r->n, &q,
                            &owned)))
        goto out;
    rc = kvs_seq_observe_queries(c->store, r->seq, r->layer, r->n, q);
    if (rc)
        rc = engine_fail(c, rc, "observe");
out:
    pthread_rwlock_unlock(l);
    free(owned);
    return rc;
}

static int op_import(op_ctx_t *c, const Kvs__V1__ImportRequest *r,
                     Kvs__V1__ImportResponse *out) {
    /* No stripe lock: an import never changes the geometry of a sequence
     * that exists (another geometry is a conflict), and installs one only
     * where none is (a create in between makes it fail), so a geometry an
     * append or a query checked stays true. Holding the stripe across a
     * long install would stall every sequence sharing it. */
    return kvs__import_piece(c->w->srv, c->w->conn->id, r, &out->result, c->msg,
                             sizeof(c->msg));
}

void kvs__op_run(kvs__work_t *w) {
    op_ctx_t c = {.w = w, .store = w->srv->store};
    const Kvs__V1__Request *req = w->msg;
    Kvs__V1__Response resp = KVS__V1__RESPONSE__INIT;
    /* Storage for whichever result is set; only one is used per call. */
    Kvs__V1__CreateSequenceResponse r_create =
        KVS__V1__CREATE_SEQUENCE_RESPONSE__INIT;
    Kvs__V1__AppendResponse r_append = KVS__V1__APPEND_RESPONSE__INIT;
    Kvs__V1__SearchResponse r_search = KVS__V1__SEARCH_RESPONSE__INIT;
    Kvs__V1__AttendResponse r_attend = KVS__V1__ATTEND_RESPONSE__INIT;
    Kvs__V1__AttendStats r_astats = KVS__V1__ATTEND_STATS__INIT;
    Kvs__V1__DropResponse r_drop = KVS__V1__DROP_RESPONSE__INIT;
    Kvs__V1__ForkResponse r_fork = KVS__V1__FORK_RESPONSE__INIT;
    Kvs__V1__SetTtlResponse r_ttl = KVS__V1__SET_TTL_RESPONSE__INIT;
    Kvs__V1__InfoResponse r_info = KVS__V1__INFO_RESPONSE__INIT;
    Kvs__V1__Geometry r_geo = KVS__V1__GEOMETRY__INIT;
    Kvs__V1__StatsResponse r_stats = KVS__V1__STATS_RESPONSE__INIT;
    Kvs__V1__ListSequencesResponse r_list =
        KVS__V1__LIST_SEQUENCES_RESPONSE__INIT;
    Kvs__V1__FlushResponse r_flush = KVS__V1__FLUSH_RESPONSE__INIT;
    Kvs__V1__ObserveQueriesResponse r_observe =
        KVS__V1__OBSERVE_QUERIES_RESPONSE__INIT;
    Kvs__V1__ImportResponse r_import = KVS__V1__IMPORT_RESPONSE__INIT;
    void *bufs[2] = {NULL, NULL};
    int rc;

    switch (req->op_case) {
    case KVS__V1__REQUEST__OP_CREATE:
        rc = op_create(&c, req->create);
        resp.result_case = KVS__V1__RESPONSE__RESULT_CREATE;
        resp.create = &r_create;
        break;
    case KVS__V1__REQUEST__OP_APPEND:
        rc = op_append(&c, req->append, &r_append);
        resp.result_case = KVS__V1__RESPONSE__RESULT_APPEND;
        resp.append = &r_append;
        break;
    case KVS__V1__REQUEST__OP_SEARCH:
        rc = op_search(&c, req->search, &r_search, bufs);
        resp.result_case = KVS__V1__RESPONSE__RESULT_SEARCH;
        resp.search = &r_search;
        break;
    case KVS__V1__REQUEST__OP_ATTEND:
        rc = op_attend(&c, req->attend, &r_attend, &r_astats, bufs);
        resp.result_case = KVS__V1__RESPONSE__RESULT_ATTEND;
        resp.attend = &r_attend;
        break;
    case KVS__V1__REQUEST__OP_DROP:
        rc = op_drop(&c, req->drop);
        resp.result_case = KVS__V1__RESPONSE__RESULT_DROP;
        resp.drop = &r_drop;
        break;
    case KVS__V1__REQUEST__OP_INFO:
        rc = op_info(&c, req->info, &r_info, &r_geo);
        resp.result_case = KVS__V1__RESPONSE__RESULT_INFO;
        resp.info = &r_info;
        break;
    case KVS__V1__REQUEST__OP_STATS:
        rc = op_stats(&c, &r_stats);
        resp.result_case = KVS__V1__RESPONSE__RESULT_STATS;
        resp.stats = &r_stats;
        break;
    case KVS__V1__REQUEST__OP_LIST:
        rc = op_list(&c, req->list, &r_list, bufs);
        resp.result_case = KVS__V1__RESPONSE__RESULT_LIST;
        resp.list = &r_list;
        break;
    case KVS__V1__REQUEST__OP_SET_TTL:
        rc = op_set_ttl(&c, req->set_ttl);
        resp.result_case = KVS__V1__RESPONSE__RESULT_SET_TTL;
        resp.set_ttl = &r_ttl;
        break;
    case KVS__V1__REQUEST__OP_FORK:
        rc = op_fork(&c, req->fork);
        resp.result_case = KVS__V1__RESPONSE__RESULT_FORK;
        resp.fork = &r_fork;
        break;
    case KVS__V1__REQUEST__OP_FLUSH:
        rc = op_flush(&c, req->flush, &r_flush);
        resp.result_case = KVS__V1__RESPONSE__RESULT_FLUSH;
        resp.flush = &r_flush;
        break;
    case KVS__V1__REQUEST__OP_OBSERVE:
        rc = op_observe(&c, req->observe);
        resp.result_case = KVS__V1__RESPONSE__RESULT_OBSERVE;
        resp.observe = &r_observe;
        break;
    case KVS__V1__REQUEST__OP_SEQ_IMPORT:
        rc = op_import(&c, req->seq_import, &r_import);
        resp.result_case = KVS__V1__RESPONSE__RESULT_SEQ_IMPORT;
        resp.seq_import = &r_import;
        break;
    default:
        /* Hello and Ping are answered on the loop thread; anything else was
         * rejected by kvs_frame_decode_request(). */
        rc = fail(&c, KVS_EPROTO, "op %s cannot run on a worker",
                  kvs_frame_op_name(req->op_case));
        break;
    }

    if (rc) {
        /* An error carries no result: clients must not read half a result. */
        resp.result_case = KVS__V1__RESPONSE__RESULT__NOT_SET;
        resp.status = kvs_wire_status_to_pb(rc);
        resp.message = c.msg;
    }
    resp.request_id = w->request_id;
    w->status = rc;
    int erc = kvs_frame_encode(w->request_id, KVS_FRAME_F_RESPONSE, &resp.base,
                               (uint32_t)w->srv->cfg->max_frame_bytes,
                               &w->frame, &w->frame_len);
    if (erc) {
        char m[160];
        snprintf(m, sizeof(m),
                 "response of %zu bytes exceeds max_frame_bytes %llu",
                 protobuf_c_message_get_packed_size(&resp.base),
                 (unsigned long long)w->srv->cfg->max_frame_bytes);
        w->status = erc;
        w->frame = kvs__error_frame(w->request_id, KVS_FRAME_F_RESPONSE, erc,
                                    erc == KVS_ETOOBIG ? m : kvs_strerror(erc),
                                    &w->frame_len);
    }
    free(bufs[0]);
    free(bufs[1]);
}

uint8_t *kvs__error_frame(uint64_t request_id, uint16_t flags, int status,
                          const char *message, size_t *len) {
    Kvs__V1__Response resp = KVS__V1__RESPONSE__INIT;
    resp.request_id = request_id;
    resp.status = kvs_wire_status_to_pb(status);
    resp.message = (char *)(message ? message : kvs_strerror(status));
    uint8_t *f = NULL;
    if (kvs_frame_encode(request_id, flags | KVS_FRAME_F_RESPONSE, &resp.base,
                         KVS_FRAME_MAX_BODY_LIMIT, &f, len))
        return NULL;
    return f;
}
