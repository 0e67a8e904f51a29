/*
 * kvs_dump.h: the one reader of `kvdecode --dump` files (format:
 * bench/README.md, "Dump format"), next to their writer (dump.c,
 * kvs_qkv_dump_* in kvs_decoder.h). The recall and accuracy benchmarks and
 * kvtune read dumps only through it, so a change of the layout is made in
 * one place.
 *
 * A dump is mapped read-only; kvs_dump_open checks every header field and
 * the file's size against the header before any row is read (a damaged
 * file is rejected there, never read out of bounds later), and
 * kvs_dump_rows checks its arguments against the geometry.
 *
 * Conventions (those of kvstore.h): opaque handle; functions return 0 or a
 * negative KVS_E* code / -errno; open writes its message into a caller
 * buffer (there is no handle yet) naming the file and what is wrong.
 *
 * Thread-safety: an open dump is read-only; any number of threads may call
 * kvs_dump_info and kvs_dump_rows on it at once.
 */
#ifndef KVS_DUMP_H
#define KVS_DUMP_H

#include "kvs_common.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The layout, shared by writer and reader. */
#define KVS_DUMP_MAGIC "KVSDUMP1"
#define KVS_DUMP_VERSION 1
#define KVS_DUMP_HEADER_BYTES 64
#define KVS_DUMP_ALIGN 4096 /* data_offset is a multiple of it */

/* Sanity limits of the reader: a header outside them is a damaged file.
 * They are far above any model we dump and keep every size product below
 * 2^64 before it is compared with the file's size. */
#define KVS_DUMP_MAX_LAYERS 4096
#define KVS_DUMP_MAX_HEADS 4096
#define KVS_DUMP_MAX_HEAD_DIM 4096

/* The header, checked. */
typedef struct kvs_dump_info_s {
    uint32_t n_layers;
    uint32_t n_q_heads;
    uint32_t n_kv_heads; /* divides n_q_heads */
    uint32_t head_dim;
    uint32_t n_tokens;
    kvs_dtype_t dtype; /* KVS_DTYPE_F32 or KVS_DTYPE_F16 */
    uint32_t seq_len;  /* the model's trained context */
    uint32_t vocab_size;
    float scale; /* softmax scale of the model, 1/sqrt(head_dim) */
} kvs_dump_info_t;

/* The three arrays of a layer. */
typedef enum kvs_dump_array_e {
    KVS_DUMP_Q = 0, /* post-RoPE queries, n_q_heads heads */
    KVS_DUMP_K = 1, /* post-RoPE keys, n_kv_heads heads */
    KVS_DUMP_V = 2, /* values, n_kv_heads heads */
} kvs_dump_array_t;

typedef struct kvs_dump_s kvs_dump_t;

/*
 * Map the dump at `path` read-only and check it. On success *out is the
 * dump (kvs_dump_close frees it). Errors: -errno (open, fstat, mmap),
 * KVS_ECORRUPT (not a dump, unknown version, a header field outside the
 * limits above, or a size that differs from what the header says: a
 * truncated or oversized file), KVS_EINVAL (NULL arguments), KVS_ENOMEM.
 * errbuf (may be NULL) gets "PATH: what is wrong" on failure.
 */
int kvs_dump_open(const char *path, kvs_dump_t **out, char *errbuf,
                  size_t errlen);

/*
 * The same checks over a dump already in memory: `len` bytes at `buf`,
 * borrowed until kvs_dump_close (the caller keeps them alive and
 * unchanged). For tests and the fuzz target; `name` is used in messages.
 * buf must be at least 4-byte aligned (malloc and mmap are).
 */
int kvs_dump_open_buffer(const void *buf, size_t len, const char *name,
                         kvs_dump_t **out, char *errbuf, size_t errlen);

/* Unmap (if mapped) and free. NULL is a no-op. */
void kvs_dump_close(kvs_dump_t *dump);

/* The checked header; valid until kvs_dump_close. */
const kvs_dump_info_t *kvs_dump_info(const kvs_dump_t *dump);

/* The n_tokens token ids (int32, position t at index t); valid until
 * kvs_dump_close. */
const int32_t *kvs_dump_tokens(const kvs_dump_t *dump);

/*
 * Rows pos .. pos+n-1 of head `head` of array `which` of `layer`, as fp32,
 * into out [n][head_dim] (fp16 dumps are converted). Errors: KVS_EINVAL
 * (NULL, unknown array) or KVS_ERANGE (layer, head or positions outside
 * the dump); out is untouched then.
 */
int kvs_dump_rows(const kvs_dump_t *dump, uint32_t layer,
                  kvs_dump_array_t which, uint32_t head, uint32_t pos,
                  uint32_t n, float *out);

#ifdef __cplusplus
}
#endif
#endif /* KVS_DUMP_H */
