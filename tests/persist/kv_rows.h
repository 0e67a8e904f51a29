/*
 * kv_rows.h: the K/V rows the persistence tests write and check. Element i
 * of token t of (seq, layer) is a pure function of them, so a reader (after
 * a crash, a restart or damage) checks any row without keeping what was
 * written. Also the temporary data directories they open. Header-only, for
 * tests (no cmocka: the store fuzz target includes it too).
 */
#ifndef KV_ROWS_H
#define KV_ROWS_H

#include "kvs_kernels.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Key (val 0) or value (val 1) element i of token t, in [-2, 2). */
static inline float kv_rows_elem(uint64_t seq, uint32_t layer, uint64_t t,
                                 uint32_t i, int val) {
    uint64_t x = (seq * 1000003u + layer * 7919u + t * 131u + i * 17u +
                  (uint64_t)val * 999983u) *
                 0x9e3779b97f4a7c15ull;
    x ^= x >> 29;
    return (float)((double)(x >> 11) / 9007199254740992.0 * 4 - 2);
}

/* test_persist's variant (its rows since it was written): the same, plus
 * 1.5 on every 4th key element, so its keys share a direction and are not
 * the centred cloud of kv_rows_elem. Its reopen checks compare answers
 * before and after, so either works there; keep it to keep its data. */
static inline float kv_rows_elem_key_biased(uint64_t seq, uint32_t layer,
                                            uint64_t t, uint32_t i, int val) {
    return kv_rows_elem(seq, layer, t, i, val) +
           (val ? 0 : (i % 4 == 0 ? 1.5f : 0));
}

typedef float (*kv_rows_elem_fn)(uint64_t seq, uint32_t layer, uint64_t t,
                                 uint32_t i, int val);

static inline void kv_rows_make_with(kv_rows_elem_fn elem, uint32_t width,
                                     uint64_t seq, uint32_t layer, uint64_t t0,
                                     uint32_t n, uint16_t *k, uint16_t *v) {
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t i = 0; i < width; i++) {
            k[(size_t)t * width + i] =
                kvs_f32_to_f16(elem(seq, layer, t0 + t, i, 0));
            v[(size_t)t * width + i] =
                kvs_f32_to_f16(elem(seq, layer, t0 + t, i, 1));
        }
}

/* Tokens t0 .. t0 + n - 1 as f16 rows of `width` elements (KV heads x
 * head_dim) into k and v, [n][width] each. */
static inline void kv_rows_make(uint32_t width, uint64_t seq, uint32_t layer,
                                uint64_t t0, uint32_t n, uint16_t *k,
                                uint16_t *v) {
    kv_rows_make_with(kv_rows_elem, width, seq, layer, t0, n, k, v);
}

/* The same rows from kv_rows_elem_key_biased. */
static inline void kv_rows_make_key_biased(uint32_t width, uint64_t seq,
                                           uint32_t layer, uint64_t t0,
                                           uint32_t n, uint16_t *k,
                                           uint16_t *v) {
    kv_rows_make_with(kv_rows_elem_key_biased, width, seq, layer, t0, n, k, v);
}

/* A fresh directory /tmp/kvs-<tag>-XXXXXX, malloc'ed (free it); NULL when
 * it cannot be made. */
static inline char *kv_temp_dir(const char *tag) {
    char *d = malloc(strlen(tag) + 32);
    if (!d)
        return NULL;
    sprintf(d, "/tmp/kvs-%s-XXXXXX", tag);
    if (!mkdtemp(d)) {
        free(d);
        return NULL;
    }
    return d;
}

/* rm -rf dir: 0, or -1 when it could not be removed. */
static inline int kv_rm_rf(const char *dir) {
    char cmd[512];
    if (snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir) >= (int)sizeof cmd)
        return -1;
    return system(cmd) == 0 ? 0 : -1;
}

#endif /* KV_ROWS_H */
