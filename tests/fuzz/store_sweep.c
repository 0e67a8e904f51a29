/*
 * store_sweep.c: a fixed sweep of fuzz_store.c's mutations, for CTest (no
 * clang needed): every file kind x action, with offsets spread over each
 * file, N cases in all (argv[1], default 200). Prints how each class was
 * handled; a violated promise aborts inside the target.
 */
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_store.h"

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    uint32_t x = 0x12345678u;
    for (int i = 0; i < n; i++) {
        /* Kinds and actions in turn; the rest from a fixed generator. */
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        uint32_t off = x % 4 == 0 ? (uint32_t)i * 7919u : x;
        uint8_t in[9] = {(uint8_t)(i % KVS_FUZZ_KINDS),
                         (uint8_t)(i / KVS_FUZZ_KINDS % KVS_FUZZ_ACTIONS),
                         (uint8_t)off,
                         (uint8_t)(off >> 8),
                         (uint8_t)(off >> 16),
                         (uint8_t)(off >> 24),
                         (uint8_t)(x >> 8),
                         (uint8_t)(x >> 16),
                         (uint8_t)(i % 3 ? 0 : x >> 24)};
        LLVMFuzzerTestOneInput(in, sizeof in);
    }
    kvs_fuzz_store_cleanup();
    printf("%d cases:\n%-9s %-9s %7s %11s %8s %8s\n",
           kvs_fuzz_store_stats.cases, "file", "action", "intact", "quarantine",
           "ECORRUPT", "EIO");
    for (int k = 0; k < KVS_FUZZ_KINDS; k++)
        for (int a = 0; a < KVS_FUZZ_ACTIONS; a++) {
            const kvs_fuzz_outcome_t *o = &kvs_fuzz_store_stats.by[k][a];
            printf("%-9s %-9s %7d %11d %8d %8d\n", kvs_fuzz_store_kinds[k],
                   kvs_fuzz_store_actions[a], o->opened_intact,
                   o->opened_quarantined, o->refused_corrupt, o->refused_io);
        }
    return kvs_fuzz_store_stats.cases > 0 ? 0 : 1;
}
