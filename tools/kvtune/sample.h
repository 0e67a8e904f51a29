/*
 * sample.h: the sample kvtune tunes on. A Q/K/V dump of `kvdecode --dump`
 * (format in bench/README.md, "Dump format") read through the one dump
 * reader (tools/kvdecode/kvs_dump.h), with its geometry at hand, and the
 * small statistics helpers the sweep shares.
 */
#ifndef KVS_TUNE_SAMPLE_H
#define KVS_TUNE_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvs_dump_s kvs_dump_t;

typedef struct kvt_dump_s {
    kvs_dump_t *dump;
    uint32_t n_layers, n_q, n_kv, d, n_tokens, dtype;
} kvt_dump_t;

/* Open and check the dump at `path` (kvs_dump_open). 0, -errno, or
 * KVS_ECORRUPT (not a dump, or its size does not match its header); the
 * reader's message goes to stderr. */
int kvt_dump_open(const char *path, kvt_dump_t *dp);
void kvt_dump_close(kvt_dump_t *dp);

/* Rows pos .. pos+n of one head's array as fp32 into out [n][d]. `arr`
 * numbers the layer's arrays: query heads 0 .. n_q-1, then the KV heads'
 * keys, then their values. A range outside the dump is a bug of the
 * caller: the program stops. */
void kvt_dump_rows(const kvt_dump_t *dp, uint32_t layer, uint32_t arr,
                   uint32_t pos, uint32_t n, float *out);

/* Nearest-rank percentile (p in (0, 1]) of v[0..n), sorted in place. NAN
 * when n is 0. */
double kvt_pct(double *v, size_t n, double p);

/* recall@k of `got` (k entries, -1 for none) against `truth` (k entries,
 * -1 for none): the share of truth's keys that got holds. */
double kvt_recall(const int64_t *truth, const int64_t *got, uint32_t k);

#endif /* KVS_TUNE_SAMPLE_H */
