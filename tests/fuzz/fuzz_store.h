/*
 * fuzz_store.h: what fuzz_store.c counts, for store_sweep.c to report.
 */
#ifndef KVS_TESTS_FUZZ_STORE_H
#define KVS_TESTS_FUZZ_STORE_H

#include <stddef.h>
#include <stdint.h>

enum { KVS_FUZZ_KINDS = 6, KVS_FUZZ_ACTIONS = 3 };

typedef struct kvs_fuzz_outcome_s {
    int opened_intact;      /* every sequence reads back bit for bit */
    int opened_quarantined; /* some quarantined, the rest bit for bit */
    int refused_corrupt;    /* KVS_ECORRUPT, no file removed */
    int refused_io;         /* KVS_EIO, no file removed */
} kvs_fuzz_outcome_t;

typedef struct kvs_fuzz_store_stats_s {
    int cases;
    kvs_fuzz_outcome_t by[KVS_FUZZ_KINDS][KVS_FUZZ_ACTIONS];
} kvs_fuzz_store_stats_t;

extern const char *const kvs_fuzz_store_kinds[KVS_FUZZ_KINDS];
extern const char *const kvs_fuzz_store_actions[KVS_FUZZ_ACTIONS];
extern kvs_fuzz_store_stats_t kvs_fuzz_store_stats;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Remove the store and its copy. */
void kvs_fuzz_store_cleanup(void);

#endif
