/*
 * kv_rows.h: the K/V rows the persistence tests write and check. Element i
 * of token t of (seq, layer) is a pure function of them, so a reader (after
 * a crash, a restart or damage) checks any row without keeping what was
 * written. Header-only, for tests.
 */
#ifndef KV_ROWS_H
#define KV_ROWS_H

#include "kvs_kernels.h"

#include <stdint.h>

/* Key (val 0) or value (val 1) element i of token t, in [-2, 2). */
static inline float kv_rows_elem(uint64_t seq, uint32_t layer, uint64_t t,
                                 uint32_t i, int val) {
    uint64_t x = (seq * 1000003u + layer * 7919u + t * 131u + i * 17u +
                  (uint64_t)val * 999983u) *
                 0x9e3779b97f4a7c15ull;
    x ^= x >> 29;
    return (float)((double)(x >> 11) / 9007199254740992.0 * 4 - 2);
}

/* Tokens t0 .. t0 + n - 1 as f16 rows of `width` elements (KV heads x
 * head_dim) into k and v, [n][width] each. */
static inline void kv_rows_make(uint32_t width, uint64_t seq, uint32_t layer,
                                uint64_t t0, uint32_t n, uint16_t *k,
                                uint16_t *v) {
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t i = 0; i < width; i++) {
            k[(size_t)t * width + i] =
                kvs_f32_to_f16(kv_rows_elem(seq, layer, t0 + t, i, 0));
            v[(size_t)t * width + i] =
                kvs_f32_to_f16(kv_rows_elem(seq, layer, t0 + t, i, 1));
        }
}

#endif /* KV_ROWS_H */
