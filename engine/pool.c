/*
 * pool.c: the parallel-for worker pool of the engine (see pool_int.h).
 * Jobs wait in a FIFO list; a worker takes task indices from the job at the
 * head with an atomic counter, and the last finisher wakes the submitter.
 */
#include "pool_int.h"

#include "kvs_common.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

typedef struct job_s {
    kvs__task_fn fn;
    void *ctx;
    uint32_t n;
    atomic_uint next;
    atomic_uint done;
    uint32_t active; /* workers inside drain(); guarded by the pool mutex */
    struct job_s *link;
    pthread_cond_t finished;
} job_t;

struct kvs__pool_s {
    pthread_mutex_t mu;
    pthread_cond_t work;
    job_t *head, *tail;
    int stopping;
    uint32_t n_threads;
    pthread_t *threads;
};

/* Work on `job` until its indices run out. */
static void drain(job_t *job) {
    for (;;) {
        uint32_t i = atomic_fetch_add(&job->next, 1);
        if (i >= job->n)
            break;
        job->fn(job->ctx, i);
        atomic_fetch_add(&job->done, 1);
    }
}

static void unlink_job(kvs__pool_t *p, job_t *job) {
    job_t **pp = &p->head;
    job_t *prev = NULL;
    while (*pp && *pp != job) {
        prev = *pp;
        pp = &(*pp)->link;
    }
    if (*pp) {
        *pp = job->link;
        if (p->tail == job)
            p->tail = prev;
    }
}

static void *worker(void *arg) {
    kvs__pool_t *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stopping && !p->head)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->stopping)
            break;
        job_t *job = p->head;
        /* Every index is claimed: nothing left here for another worker. */
        if (atomic_load(&job->next) >= job->n) {
            unlink_job(p, job);
            continue;
        }
        /* The job lives on its submitter's stack: `active` keeps the
         * submitter waiting until no worker touches it any more. */
        job->active++;
        pthread_mutex_unlock(&p->mu);
        drain(job);
        pthread_mutex_lock(&p->mu);
        if (--job->active == 0)
            pthread_cond_broadcast(&job->finished);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int kvs__pool_new(uint32_t n_threads, kvs__pool_t **out) {
    kvs__pool_t *p = calloc(1, sizeof(*p));
    if (!p)
        return KVS_ENOMEM;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    p->threads = calloc(n_threads ? n_threads : 1, sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < n_threads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, worker, p);
        if (rc) {
            p->n_threads = i;
            kvs__pool_free(p);
            return -rc;
        }
        p->n_threads = i + 1;
    }
    *out = p;
    return 0;
}

void kvs__pool_free(kvs__pool_t *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (uint32_t i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

void kvs__pool_run(kvs__pool_t *p, uint32_t n, kvs__task_fn fn, void *ctx) {
    if (n == 0)
        return;
    if (n == 1 || p->n_threads == 0) {
        for (uint32_t i = 0; i < n; i++)
            fn(ctx, i);
        return;
    }
    job_t job = {.fn = fn, .ctx = ctx, .n = n};
    atomic_init(&job.next, 0);
    atomic_init(&job.done, 0);
    pthread_cond_init(&job.finished, NULL);
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->link = &job;
    else
        p->head = &job;
    p->tail = &job;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);

    drain(&job);

    pthread_mutex_lock(&p->mu);
    unlink_job(p, &job);
    while (atomic_load(&job.done) < n || job.active > 0)
        pthread_cond_wait(&job.finished, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_cond_destroy(&job.finished);
}
