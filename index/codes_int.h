/*
 * codes_int.h: private to index/. The codes builder for a caller that
 * already holds the segment's keys in fp32 (the segment builder), so they
 * are not converted a second time.
 */
#ifndef KVS_CODES_INT_H
#define KVS_CODES_INT_H

#include "kvs_index.h"

/* Max head dim with codes (the stack buffers of one row). */
#define KVS__CODES_MAX_D 1024

/*
 * kvs_segment_build_codes for seg, whose keys in slot order as fp32 are
 * xr [n_tokens][d] (exactly kvs_to_f32 of seg->keys); xr is scratch and
 * is overwritten (rotated in place). The caller checked that codes apply
 * (d % 32 == 0, d <= KVS__CODES_MAX_D). Errors: KVS_ENOMEM.
 */
int kvs__segment_build_codes_f32(kvs_segment_t *seg, uint64_t seed, float *xr);

#endif
