/*
 * kvs_rng.h: one small seeded random generator (splitmix64) for k-means
 * seeding, tests and benchmarks: the same sequence for the same seed on
 * every platform and compiler, no global state, no locking. Not for
 * anything that needs unpredictability.
 */
#ifndef KVS_RNG_H
#define KVS_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct kvs_rng_s {
    uint64_t s; /* any value, 0 included */
} kvs_rng_t;

static inline uint64_t kvs_rng_next(kvs_rng_t *r) {
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1): never 0, so log() of it is finite. */
static inline double kvs_rng_uniform(kvs_rng_t *r) {
    return ((double)(kvs_rng_next(r) >> 11) + 0.5) / 9007199254740992.0;
}

/* Standard normal (Box-Muller; one draw per call, the twin discarded). */
static inline float kvs_rng_normal(kvs_rng_t *r) {
    const double u = kvs_rng_uniform(r), v = kvs_rng_uniform(r);
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

#endif /* KVS_RNG_H */
