/*
 * wire.c: protobuf <-> C API conversion (kvs_wire.h). Every enum goes
 * through a switch with no default branch that maps silently: a value with
 * no counterpart is an error, so that a mode one side does not know can
 * never run as another mode (what the old client did with KVS_MODE_FULL).
 * -Wswitch flags a C enum value added to kvstore.h and forgotten here.
 */
#include "kvs_wire.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int werr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int werr(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return KVS_EINVAL;
}

/* ------------------------------------------------------------------ enums */

int kvs_wire_dtype_from_pb(Kvs__V1__DType in, kvs_dtype_t *out, char *err,
                           size_t errlen) {
    switch (in) {
    case KVS__V1__DTYPE__DTYPE_F32:
        *out = KVS_DTYPE_F32;
        return 0;
    case KVS__V1__DTYPE__DTYPE_F16:
        *out = KVS_DTYPE_F16;
        return 0;
    case KVS__V1__DTYPE__DTYPE_BF16:
        *out = KVS_DTYPE_BF16;
        return 0;
    case _KVS__V1__DTYPE_IS_INT_SIZE:
        break;
    }
    return werr(err, errlen, "unknown dtype %d on the wire", (int)in);
}

int kvs_wire_dtype_to_pb(kvs_dtype_t in, Kvs__V1__DType *out, char *err,
                         size_t errlen) {
    switch (in) {
    case KVS_DTYPE_F32:
        *out = KVS__V1__DTYPE__DTYPE_F32;
        return 0;
    case KVS_DTYPE_F16:
        *out = KVS__V1__DTYPE__DTYPE_F16;
        return 0;
    case KVS_DTYPE_BF16:
        *out = KVS__V1__DTYPE__DTYPE_BF16;
        return 0;
    }
    return werr(err, errlen, "unknown dtype %d", (int)in);
}

int kvs_wire_mode_from_pb(Kvs__V1__Mode in, kvs_mode_t *out, char *err,
                          size_t errlen) {
    switch (in) {
    case KVS__V1__MODE__MODE_DEFAULT:
        *out = KVS_MODE_DEFAULT;
        return 0;
    case KVS__V1__MODE__MODE_EXACT:
        *out = KVS_MODE_EXACT;
        return 0;
    case KVS__V1__MODE__MODE_WAVE:
        *out = KVS_MODE_WAVE;
        return 0;
    case KVS__V1__MODE__MODE_FULL:
        *out = KVS_MODE_FULL;
        return 0;
    case _KVS__V1__MODE_IS_INT_SIZE:
        break;
    }
    return werr(err, errlen, "unknown mode %d on the wire", (int)in);
}

int kvs_wire_mode_to_pb(kvs_mode_t in, Kvs__V1__Mode *out, char *err,
                        size_t errlen) {
    switch (in) {
    case KVS_MODE_DEFAULT:
        *out = KVS__V1__MODE__MODE_DEFAULT;
        return 0;
    case KVS_MODE_WAVE:
        *out = KVS__V1__MODE__MODE_WAVE;
        return 0;
    case KVS_MODE_EXACT:
        *out = KVS__V1__MODE__MODE_EXACT;
        return 0;
    case KVS_MODE_FULL:
        *out = KVS__V1__MODE__MODE_FULL;
        return 0;
    }
    return werr(err, errlen, "unknown mode %d", (int)in);
}

int kvs_wire_budget_from_pb(Kvs__V1__Budget in, kvs_budget_t *out, char *err,
                            size_t errlen) {
    switch (in) {
    case KVS__V1__BUDGET__BUDGET_DEFAULT:
        *out = KVS_BUDGET_DEFAULT;
        return 0;
    case KVS__V1__BUDGET__BUDGET_FIXED:
        *out = KVS_BUDGET_FIXED;
        return 0;
    case KVS__V1__BUDGET__BUDGET_BOUNDED:
        *out = KVS_BUDGET_BOUNDED;
        return 0;
    case _KVS__V1__BUDGET_IS_INT_SIZE:
        break;
    }
    return werr(err, errlen, "unknown budget %d on the wire", (int)in);
}

int kvs_wire_budget_to_pb(kvs_budget_t in, Kvs__V1__Budget *out, char *err,
                          size_t errlen) {
    switch (in) {
    case KVS_BUDGET_DEFAULT:
        *out = KVS__V1__BUDGET__BUDGET_DEFAULT;
        return 0;
    case KVS_BUDGET_FIXED:
        *out = KVS__V1__BUDGET__BUDGET_FIXED;
        return 0;
    case KVS_BUDGET_BOUNDED:
        *out = KVS__V1__BUDGET__BUDGET_BOUNDED;
        return 0;
    }
    return werr(err, errlen, "unknown budget %d", (int)in);
}

int kvs_wire_rank_from_pb(Kvs__V1__Rank in, kvs_rank_t *out, char *err,
                          size_t errlen) {
    switch (in) {
    case KVS__V1__RANK__RANK_DEFAULT:
        *out = KVS_RANK_DEFAULT;
        return 0;
    case KVS__V1__RANK__RANK_CENTROID:
        *out = KVS_RANK_CENTROID;
        return 0;
    case KVS__V1__RANK__RANK_CODES:
        *out = KVS_RANK_CODES;
        return 0;
    case _KVS__V1__RANK_IS_INT_SIZE:
        break;
    }
    return werr(err, errlen, "unknown rank %d on the wire", (int)in);
}

int kvs_wire_rank_to_pb(kvs_rank_t in, Kvs__V1__Rank *out, char *err,
                        size_t errlen) {
    switch (in) {
    case KVS_RANK_DEFAULT:
        *out = KVS__V1__RANK__RANK_DEFAULT;
        return 0;
    case KVS_RANK_CENTROID:
        *out = KVS__V1__RANK__RANK_CENTROID;
        return 0;
    case KVS_RANK_CODES:
        *out = KVS__V1__RANK__RANK_CODES;
        return 0;
    }
    return werr(err, errlen, "unknown rank %d", (int)in);
}

/* ---------------------------------------------------------------- structs */

int kvs_wire_params_from_pb(const Kvs__V1__QueryParams *m,
                            kvs_query_params_t *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    if (!m)
        return 0;
    int rc = kvs_wire_mode_from_pb(m->mode, &out->mode, err, errlen);
    if (!rc)
        rc = kvs_wire_budget_from_pb(m->budget, &out->budget, err, errlen);
    if (!rc)
        rc = kvs_wire_rank_from_pb(m->rank, &out->rank, err, errlen);
    if (rc)
        return rc;
    out->retrieval_fraction = m->retrieval_fraction;
    out->estimation_fraction = m->estimation_fraction;
    out->epsilon = m->epsilon;
    out->scale = m->scale;
    return 0;
}

int kvs_wire_params_to_pb(const kvs_query_params_t *p,
                          Kvs__V1__QueryParams *out, char *err, size_t errlen) {
    int rc = kvs_wire_mode_to_pb(p->mode, &out->mode, err, errlen);
    if (!rc)
        rc = kvs_wire_budget_to_pb(p->budget, &out->budget, err, errlen);
    if (!rc)
        rc = kvs_wire_rank_to_pb(p->rank, &out->rank, err, errlen);
    if (rc)
        return rc;
    out->retrieval_fraction = p->retrieval_fraction;
    out->estimation_fraction = p->estimation_fraction;
    out->epsilon = p->epsilon;
    out->scale = p->scale;
    return 0;
}

int kvs_wire_geometry_from_pb(const Kvs__V1__Geometry *m, kvs_geometry_t *out,
                              char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    if (!m)
        return 0;
    out->n_layers = m->n_layers;
    out->n_q_heads = m->n_q_heads;
    out->n_kv_heads = m->n_kv_heads;
    out->head_dim = m->head_dim;
    return kvs_wire_dtype_from_pb(m->dtype, &out->dtype, err, errlen);
}

int kvs_wire_geometry_to_pb(const kvs_geometry_t *g, Kvs__V1__Geometry *out,
                            char *err, size_t errlen) {
    out->n_layers = g->n_layers;
    out->n_q_heads = g->n_q_heads;
    out->n_kv_heads = g->n_kv_heads;
    out->head_dim = g->head_dim;
    return kvs_wire_dtype_to_pb(g->dtype, &out->dtype, err, errlen);
}

void kvs_wire_attend_stats_from_pb(const Kvs__V1__AttendStats *m,
                                   kvs_attend_stats_t *out) {
    memset(out, 0, sizeof(*out));
    if (!m)
        return;
    out->keys_total = m->keys_total;
    out->keys_exact = m->keys_exact;
    out->keys_steady = m->keys_steady;
    out->clusters_total = m->clusters_total;
    out->clusters_retrieved = m->clusters_retrieved;
    out->clusters_estimated = m->clusters_estimated;
    out->clusters_skipped = m->clusters_skipped;
    out->seconds = m->seconds;
}

void kvs_wire_attend_stats_to_pb(const kvs_attend_stats_t *s,
                                 Kvs__V1__AttendStats *out) {
    out->keys_total = s->keys_total;
    out->keys_exact = s->keys_exact;
    out->keys_steady = s->keys_steady;
    out->clusters_total = s->clusters_total;
    out->clusters_retrieved = s->clusters_retrieved;
    out->clusters_estimated = s->clusters_estimated;
    out->clusters_skipped = s->clusters_skipped;
    out->seconds = s->seconds;
}

int kvs_wire_seq_info_from_pb(const Kvs__V1__InfoResponse *m,
                              kvs_seq_info_t *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    if (!m)
        return 0;
    int rc =
        kvs_wire_geometry_from_pb(m->geometry, &out->geometry, err, errlen);
    if (rc)
        return rc;
    out->tokens_min = m->tokens_min;
    out->tokens_max = m->tokens_max;
    out->indexed_tokens = m->indexed_tokens;
    out->segments = m->segments;
    out->builds_pending = m->builds_pending;
    out->bytes = m->bytes;
    out->index_bytes = m->index_bytes;
    out->resident = !m->evicted;
    return 0;
}

int kvs_wire_seq_info_to_pb(const kvs_seq_info_t *info,
                            Kvs__V1__InfoResponse *out, Kvs__V1__Geometry *geo,
                            char *err, size_t errlen) {
    int rc = kvs_wire_geometry_to_pb(&info->geometry, geo, err, errlen);
    if (rc)
        return rc;
    out->geometry = geo;
    out->tokens_min = info->tokens_min;
    out->tokens_max = info->tokens_max;
    out->indexed_tokens = info->indexed_tokens;
    out->segments = info->segments;
    out->builds_pending = info->builds_pending;
    out->bytes = info->bytes;
    out->index_bytes = info->index_bytes;
    out->evicted = !info->resident;
    return 0;
}

void kvs_wire_store_stats_from_pb(const Kvs__V1__StatsResponse *m,
                                  kvs_store_stats_t *out) {
    memset(out, 0, sizeof(*out));
    out->gpu_device = -1;
    if (!m)
        return;
    out->sequences = m->sequences;
    out->bytes = m->bytes;
    out->index_bytes = m->index_bytes;
    out->disk_bytes = m->disk_bytes;
    out->quarantined = m->quarantined;
    out->expired = m->expired;
    out->resident_bytes = m->resident_bytes;
    out->evictions = m->evictions;
    out->page_ins = m->page_ins;
    out->builds_pending = m->builds_pending;
    out->builds_done = m->builds_done;
    out->build_keys = m->build_keys;
    out->build_seconds = m->build_seconds;
    /* A device ordinal above INT32_MAX cannot come from a real server. */
    out->gpu_device =
        m->gpu_device_plus1 == 0 || m->gpu_device_plus1 > (uint32_t)INT32_MAX
            ? -1
            : (int32_t)(m->gpu_device_plus1 - 1);
    out->gpu_attends = m->gpu_attends;
    out->gpu_fallbacks = m->gpu_fallbacks;
    out->gpu_errors = m->gpu_errors;
    out->gpu_bytes = m->gpu_bytes;
    out->gpu_pinned_bytes = m->gpu_pinned_bytes;
    out->gpu_kv_bytes = m->gpu_kv_bytes;
    out->gpu_cache_lookups = m->gpu_cache_lookups;
    out->gpu_cache_hits = m->gpu_cache_hits;
    out->gpu_bus_bytes = m->gpu_bus_bytes;
    out->gpu_upload_bytes = m->gpu_upload_bytes;
    out->gpu_builds = m->gpu_builds;
    out->gpu_build_errors = m->gpu_build_errors;
    out->gpu_mirrors_evicted = m->gpu_mirrors_evicted;
    out->queued_seqno = m->queued_seqno;
    out->persisted_seqno = m->persisted_seqno;
    out->unpersisted_bytes = m->unpersisted_bytes;
    out->unpersisted_waits = m->unpersisted_waits;
}

void kvs_wire_store_stats_to_pb(const kvs_store_stats_t *s,
                                Kvs__V1__StatsResponse *out) {
    out->sequences = s->sequences;
    out->bytes = s->bytes;
    out->index_bytes = s->index_bytes;
    out->disk_bytes = s->disk_bytes;
    out->quarantined = s->quarantined;
    out->expired = s->expired;
    out->resident_bytes = s->resident_bytes;
    out->evictions = s->evictions;
    out->page_ins = s->page_ins;
    out->builds_pending = s->builds_pending;
    out->builds_done = s->builds_done;
    out->build_keys = s->build_keys;
    out->build_seconds = s->build_seconds;
    /* Any negative ordinal is "no GPU" (the engine uses -1). */
    out->gpu_device_plus1 =
        s->gpu_device < 0 ? 0 : (uint32_t)s->gpu_device + 1u;
    out->gpu_attends = s->gpu_attends;
    out->gpu_fallbacks = s->gpu_fallbacks;
    out->gpu_errors = s->gpu_errors;
    out->gpu_bytes = s->gpu_bytes;
    out->gpu_pinned_bytes = s->gpu_pinned_bytes;
    out->gpu_kv_bytes = s->gpu_kv_bytes;
    out->gpu_cache_lookups = s->gpu_cache_lookups;
    out->gpu_cache_hits = s->gpu_cache_hits;
    out->gpu_bus_bytes = s->gpu_bus_bytes;
    out->gpu_upload_bytes = s->gpu_upload_bytes;
    out->gpu_builds = s->gpu_builds;
    out->gpu_build_errors = s->gpu_build_errors;
    out->gpu_mirrors_evicted = s->gpu_mirrors_evicted;
    out->queued_seqno = s->queued_seqno;
    out->persisted_seqno = s->persisted_seqno;
    out->unpersisted_bytes = s->unpersisted_bytes;
    out->unpersisted_waits = s->unpersisted_waits;
}

/* ----------------------------------------------------------- status codes */

static int status_known(int64_t v) {
    switch (v) {
    case 0:
#define KVS__WIRE_ERR_CASE(name, value, msg) case KVS_##name:
        KVS_ERRNO_MAP(KVS__WIRE_ERR_CASE)
#undef KVS__WIRE_ERR_CASE
        return 1;
    default:
        return v < 0 && v >= -4095;
    }
}

int32_t kvs_wire_status_to_pb(int rc) {
    return status_known(rc) ? (int32_t)rc : KVS_EPROTO;
}

int kvs_wire_status_from_pb(int32_t status) {
    return status_known(status) ? (int)status : KVS_EPROTO;
}
