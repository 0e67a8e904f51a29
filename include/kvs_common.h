/*
 * kvs_common.h: the types and error codes that every kvstore module shares.
 *
 * Conventions of the whole project, stated once:
 * - Every function that can fail returns int: 0 on success, a negative value
 *   on failure: -errno for system errors, or one of the KVS_E* codes below.
 *   kvs_strerror() turns either into a static string.
 * - Vectors are passed as pointer + count; element type is a kvs_dtype_t.
 * - Outputs are caller-allocated arrays whose sizes each function documents,
 *   or `T **out` for objects the library allocates and a matching _free or
 *   _close releases.
 */
#ifndef KVS_COMMON_H
#define KVS_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of key/value vectors. Values are stable (on disk, on wire). */
typedef enum kvs_dtype_e {
    KVS_DTYPE_F32 = 0,
    KVS_DTYPE_F16 = 1,
    KVS_DTYPE_BF16 = 2,
} kvs_dtype_t;

/* How search and attention rank keys (kvs_query_params_t.rank in
 * kvstore.h; the index's kvs_rank_params_t.rank). Here, below both, so that
 * the engine's API and the index it calls share one enum. */
typedef enum kvs_rank_e {
    /* The store's default (kvs_options_t.defaults.rank); its own DEFAULT,
     * and the index's: codes where every segment of a head has them, else
     * centroid. The accuracy-bounded budget is judged on centroid mass and
     * so ranks by centroid unless codes are asked for by name. */
    KVS_RANK_DEFAULT = 0,
    /* Clusters by q.c over full-precision centroids; every member of the
     * retrieval clusters is read in full (the index before codes). The GPU
     * path implements this ranking only. */
    KVS_RANK_CENTROID = 1,
    /* Two stages: clusters ranked by 8-bit centroid codes plus a spread
     * term; the 4-bit codes of their members are scanned until
     * code_ratio x R keys are scored; the best R by code score are read
     * in full (R = retrieval_fraction x indexed keys). */
    KVS_RANK_CODES = 2,
} kvs_rank_t;

/* Bytes per element of `dtype`, 0 for an unknown dtype. */
size_t kvs_dtype_size(kvs_dtype_t dtype);
/* "f32", "f16", "bf16" or "?". */
const char *kvs_dtype_name(kvs_dtype_t dtype);

/*
 * Error codes: X(name, value, message). Values live below -1000 so that they
 * never collide with -errno. The numbers are part of the wire protocol.
 */
#define KVS_ERRNO_MAP(X)                                                       \
    X(EINVAL, -1001, "invalid argument")                                       \
    X(ENOSEQ, -1002, "unknown sequence")                                       \
    X(EEXIST, -1003, "sequence already exists")                                \
    X(EGEOMETRY, -1004, "geometry does not match the sequence")                \
    X(ERANGE, -1005, "value out of range")                                     \
    X(ENOTFINITE, -1006, "input contains NaN or Inf")                          \
    X(ENOMEM, -1007, "out of memory")                                          \
    X(EIO, -1008, "I/O error")                                                 \
    X(ECORRUPT, -1009, "data corruption detected")                             \
    X(ELOCKED, -1010, "data directory is locked by another process")           \
    X(ECLOSED, -1011, "store is closing")                                      \
    X(EFAISS, -1012, "FAISS call failed")                                      \
    X(ETOOBIG, -1013, "request exceeds a configured limit")                    \
    X(EPROTO, -1014, "protocol error")                                         \
    X(EAUTH, -1015, "authentication required or failed")                       \
    X(EBUSY, -1016, "resource busy, try again")                                \
    X(ETIMEDOUT, -1017, "timed out")                                           \
    X(ECONN, -1018, "connection lost")                                         \
    X(ENOSPC, -1019, "no space left on device")                                \
    X(EQUARANTINED, -1020, "sequence is quarantined after corruption")         \
    X(ENOTSUP, -1021, "operation not supported")                               \
    X(ECONFLICT, -1022, "another copy of the sequence conflicts")

enum {
#define KVS__ERR_ENUM(name, value, msg) KVS_##name = (value),
    KVS_ERRNO_MAP(KVS__ERR_ENUM)
#undef KVS__ERR_ENUM
};

/* A static message for `err` (a KVS_E* code or -errno). Never NULL. */
const char *kvs_strerror(int err);
/* The code's name, e.g. "KVS_ENOSEQ" or "ENOENT"; never NULL. */
const char *kvs_err_name(int err);

/* CRC-32C of n bytes, continuing from `crc` (0 to start). */
uint32_t kvs_crc32c(uint32_t crc, const void *data, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* KVS_COMMON_H */
