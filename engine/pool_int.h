/*
 * pool_int.h: private to engine/. A fixed set of worker threads that run
 * parallel-for jobs. Any number of threads may submit jobs at once; the
 * submitting thread works on its own job too, so a job always makes
 * progress even when every worker is busy with other callers' jobs.
 */
#ifndef KVS_ENGINE_POOL_H
#define KVS_ENGINE_POOL_H

#include <stdint.h>

typedef struct kvs__pool_s kvs__pool_t;

/* fn(ctx, i) for one task index i. */
typedef void (*kvs__task_fn)(void *ctx, uint32_t i);

/* Start `n_threads` workers (0 is allowed: callers do all the work). */
int kvs__pool_new(uint32_t n_threads, kvs__pool_t **out);
/* Join the workers. No job may be running. */
void kvs__pool_free(kvs__pool_t *pool);
/* Run fn(ctx, i) for i in [0, n) and return when all have finished. */
void kvs__pool_run(kvs__pool_t *pool, uint32_t n, kvs__task_fn fn, void *ctx);

#endif
