/*
 * kvs_wire.h: the one conversion between the protobuf messages of
 * proto/kvstore.proto and the C API types of include/kvstore.h, used by the
 * daemon (server/ops.c), the client library (client/client.c) and the
 * request checks of kvs_frame.c. Two hand-written copies of it drifted once
 * (KVS_MODE_FULL sent by the client ran as WAVE on the server); every field
 * and every enum value goes through here instead.
 *
 * Conventions:
 * - Enums are mapped value by value with a switch, never cast: the C and
 *   wire numbers differ for kvs_mode_t (the C enum was renumbered so that
 *   its zero is DEFAULT; the wire kept its numbers for older peers). A value
 *   either side does not know is refused with KVS_EINVAL and a one-line
 *   reason in `err` (may be NULL); the output is then left unspecified.
 * - Structs are converted field by field. A zero field stays zero both
 *   ways, so "zero means the store's default" survives the trip.
 * - _to_pb functions fill a message the caller initialised with its
 *   KVS__V1__*__INIT macro; string fields of the stats message are left to
 *   the caller (they are not part of kvs_store_stats_t). Nothing here
 *   allocates or keeps state; every function is thread-safe.
 */
#ifndef KVS_WIRE_H
#define KVS_WIRE_H

#include "kvs_common.h"
#include "kvstore.h"
#include "kvstore.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ enums
 * Errors: KVS_EINVAL (a value the target enum has no counterpart for). */

int kvs_wire_dtype_from_pb(Kvs__V1__DType in, kvs_dtype_t *out, char *err,
                           size_t errlen);
int kvs_wire_dtype_to_pb(kvs_dtype_t in, Kvs__V1__DType *out, char *err,
                         size_t errlen);
int kvs_wire_mode_from_pb(Kvs__V1__Mode in, kvs_mode_t *out, char *err,
                          size_t errlen);
int kvs_wire_mode_to_pb(kvs_mode_t in, Kvs__V1__Mode *out, char *err,
                        size_t errlen);
int kvs_wire_budget_from_pb(Kvs__V1__Budget in, kvs_budget_t *out, char *err,
                            size_t errlen);
int kvs_wire_budget_to_pb(kvs_budget_t in, Kvs__V1__Budget *out, char *err,
                          size_t errlen);
int kvs_wire_rank_from_pb(Kvs__V1__Rank in, kvs_rank_t *out, char *err,
                          size_t errlen);
int kvs_wire_rank_to_pb(kvs_rank_t in, Kvs__V1__Rank *out, char *err,
                        size_t errlen);

/* ---------------------------------------------------------------- structs */

/* `m` NULL (the field absent on the wire) gives an all-zero struct: every
 * field the store's default. The float fields are copied as they are; their
 * ranges are the engine's to check (kvs_frame_decode_request checks them
 * too, before a worker sees the request). Errors: KVS_EINVAL (mode,
 * budget or rank unknown). */
int kvs_wire_params_from_pb(const Kvs__V1__QueryParams *m,
                            kvs_query_params_t *out, char *err, size_t errlen);
int kvs_wire_params_to_pb(const kvs_query_params_t *p,
                          Kvs__V1__QueryParams *out, char *err, size_t errlen);

/* `m` NULL gives an all-zero geometry (which the engine refuses). Errors:
 * KVS_EINVAL (dtype unknown). */
int kvs_wire_geometry_from_pb(const Kvs__V1__Geometry *m, kvs_geometry_t *out,
                              char *err, size_t errlen);
int kvs_wire_geometry_to_pb(const kvs_geometry_t *g, Kvs__V1__Geometry *out,
                            char *err, size_t errlen);

/* No enums: these cannot fail. `m` NULL gives all zeros. */
void kvs_wire_attend_stats_from_pb(const Kvs__V1__AttendStats *m,
                                   kvs_attend_stats_t *out);
void kvs_wire_attend_stats_to_pb(const kvs_attend_stats_t *s,
                                 Kvs__V1__AttendStats *out);

/* The geometry travels as a sub-message: _to_pb points out->geometry at
 * `geo`, which the caller provides and keeps alive as long as `out`.
 * Errors: KVS_EINVAL (dtype unknown). */
int kvs_wire_seq_info_from_pb(const Kvs__V1__InfoResponse *m,
                              kvs_seq_info_t *out, char *err, size_t errlen);
int kvs_wire_seq_info_to_pb(const kvs_seq_info_t *info,
                            Kvs__V1__InfoResponse *out, Kvs__V1__Geometry *geo,
                            char *err, size_t errlen);

/* Every field of kvs_store_stats_t; the daemon's own fields of the message
 * (versions, connections, ...) are not touched. gpu_device -1 (no GPU)
 * travels as gpu_device_plus1 0. Cannot fail. */
void kvs_wire_store_stats_from_pb(const Kvs__V1__StatsResponse *m,
                                  kvs_store_stats_t *out);
void kvs_wire_store_stats_to_pb(const kvs_store_stats_t *s,
                                Kvs__V1__StatsResponse *out);

/* ----------------------------------------------------------- status codes
 * A Response's status is 0, a KVS_E* code of include/kvs_common.h (the
 * numbers are part of the protocol) or a negated errno of the server's
 * host (-1 .. -4095). */

/* What to put on the wire for an engine or server return code: `rc` itself
 * when it is one of the above, else KVS_EPROTO (never a positive status). */
int32_t kvs_wire_status_to_pb(int rc);
/* The code a client reports for a received status: the status itself when
 * it is one of the above, else KVS_EPROTO (a newer server's code this
 * client does not know, or garbage). */
int kvs_wire_status_from_pb(int32_t status);

#ifdef __cplusplus
}
#endif
#endif /* KVS_WIRE_H */
