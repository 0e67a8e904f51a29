/*
 * sample.h: the sample kvtune tunes on. A Q/K/V dump of `kvdecode --dump`
 * (format in bench/README.md, "Dump format") mapped read-only, and the
 * small statistics helpers the sweep shares. The dump reader follows
 * bench/recall/recall_bench.c, which is a benchmark and links nothing from
 * here; this is the tool's own copy, kept to what tuning needs.
 */
#ifndef KVS_TUNE_SAMPLE_H
#define KVS_TUNE_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvt_dump_s {
    const uint8_t *map;
    size_t size;
    uint32_t n_layers, n_q, n_kv, d, n_tokens, dtype;
    uint64_t data_off;
} kvt_dump_t;

/* Map and validate the dump at `path`. 0, -errno, or KVS_ECORRUPT (not a
 * dump, or its size does not match its header). */
int kvt_dump_open(const char *path, kvt_dump_t *dp);
void kvt_dump_close(kvt_dump_t *dp);

/* Rows pos .. pos+n of one head's array as fp32 into out [n][d]. `arr`
 * numbers the layer's arrays: query heads 0 .. n_q-1, then the KV heads'
 * keys, then their values. */
void kvt_dump_rows(const kvt_dump_t *dp, uint32_t layer, uint32_t arr,
                   uint32_t pos, uint32_t n, float *out);

/* Nearest-rank percentile (p in (0, 1]) of v[0..n), sorted in place. NAN
 * when n is 0. */
double kvt_pct(double *v, size_t n, double p);

/* recall@k of `got` (k entries, -1 for none) against `truth` (k entries,
 * -1 for none): the share of truth's keys that got holds. */
double kvt_recall(const int64_t *truth, const int64_t *got, uint32_t k);

#endif /* KVS_TUNE_SAMPLE_H */
