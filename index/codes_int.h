/*
 * codes_int.h: private to index/. The codes builder for a caller that
 * already holds the segment's keys in fp32 (the segment builder), so they
 * are not converted a second time.
 */
#ifndef KVS_CODES_INT_H
#define KVS_CODES_INT_H

#include "kvs_index.h"

/* Max head dim with codes (the stack buffers of one row). */
#define KVS__CODES_MAX_D KVS_CODES_MAX_D

/*
 * kvs_segment_build_codes for seg, whose keys in slot order as fp32 are
 * xr [n_tokens][d] (exactly kvs_to_f32 of seg->keys); xr is scratch and
 * may be overwritten (rotated in place). The caller checked that codes
 * apply (kvs_codes_dim(d) != 0). Errors: KVS_ENOMEM.
 */
int kvs__segment_build_codes_f32(kvs_segment_t *seg, uint64_t seed, float *xr);

#endif
