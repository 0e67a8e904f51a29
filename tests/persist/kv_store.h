/*
 * kv_store.h: opening a persistent store and appending kv_rows.h rows, for
 * the persistence tests that use cmocka (a failure ends the test with the
 * store's message). The fuzz target, without cmocka, uses kv_rows.h only.
 */
#ifndef KV_STORE_H
#define KV_STORE_H

#include "kv_rows.h"
#include "kvstore.h"

/* A store on `dir` with segments of `seg` tokens, 2 threads,
 * deterministic, the given load mode and memory budget. */
static inline kvs_store_t *kv_store_open_load(const char *dir, uint32_t seg,
                                              kvs_load_t load,
                                              uint64_t memory_bytes) {
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = dir;
    o.segment_tokens = seg;
    o.n_threads = 2;
    o.deterministic = 1;
    o.memory_bytes = memory_bytes;
    o.load = load;
    kvs_store_t *s = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc)
        fail_msg("open %s: %s (%s)", dir, kvs_strerror(rc),
                 kvs_store_open_error());
    return s;
}

/* n bf16 tokens of kv_rows_make (row_elems = kv heads x head_dim) from
 * position t0 of (seq, layer). */
static inline void kv_store_append(kvs_store_t *s, uint64_t seq, uint32_t layer,
                                   uint64_t t0, uint32_t n,
                                   uint32_t row_elems) {
    uint16_t *k = malloc((size_t)n * row_elems * 2);
    uint16_t *v = malloc((size_t)n * row_elems * 2);
    if (!k || !v)
        fail_msg("append: out of memory");
    kv_rows_make(row_elems, seq, layer, t0, n, k, v);
    int rc = kvs_seq_append(s, seq, layer, n, k, v);
    if (rc)
        fail_msg("append %llu: %s", (unsigned long long)seq,
                 kvs_store_errmsg(s));
    free(k);
    free(v);
}

#endif
