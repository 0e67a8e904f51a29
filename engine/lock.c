/*
 * lock.c: the engine's lock-order check (engine_int.h, "Locks").
 *
 * Every engine lock is taken through kvs__lock / kvs__rdlock / kvs__wrlock,
 * which, in builds without NDEBUG, keep per thread the locks it holds with
 * their rank and assert at each acquisition that the new lock comes after
 * all of them. A wrong order then fails the first time a test runs that
 * path, on one thread, instead of deadlocking once in a while under load.
 * With NDEBUG the wrappers are the bare pthread calls (engine_int.h) and
 * this file compiles to nothing.
 */
#include "engine_int.h"

#ifndef NDEBUG

#include <assert.h>
#include <stdlib.h>
#include <string.h>

typedef struct held_s {
    const void *lock;
    uint32_t sub;
    uint8_t rank, write;
} held_t;

/* Most threads hold a few locks; a page-in or a drop holds two per layer,
 * so the stack moves to the heap past SMALL and back when it empties (a
 * large static TLS block would not load in a dlopen'ed extension). */
#define SMALL 16
static _Thread_local held_t small[SMALL];
static _Thread_local held_t *held;
static _Thread_local uint32_t n_held, cap_held;

/* (rank, sub) of `h` strictly before (rank, sub)? */
static int before(const held_t *h, int rank, uint32_t sub) {
    return h->rank < rank || (h->rank == rank && h->sub < sub);
}

/* Checked before blocking, so that a wrong order aborts here rather than
 * deadlocks. The stack stays sorted (each push is after all it holds), so
 * its top is the latest lock in the order. */
static void check(int rank, uint32_t sub) {
    assert(rank > 0 && rank < KVS__RANK_N);
    assert((n_held == 0 || before(&held[n_held - 1], rank, sub)) &&
           "engine lock taken out of order (engine_int.h, Locks)");
    (void)rank;
    (void)sub;
}

static void push(const void *lock, int rank, uint32_t sub, int write) {
    if (!held) {
        held = small;
        cap_held = SMALL;
    }
    if (n_held == cap_held) {
        held_t *h = malloc(2 * (size_t)cap_held * sizeof *h);
        assert(h && "lock-order check: out of memory");
        if (!h)
            abort();
        memcpy(h, held, n_held * sizeof *h);
        if (held != small)
            free(held);
        held = h;
        cap_held *= 2;
    }
    held[n_held++] = (held_t){lock, sub, (uint8_t)rank, (uint8_t)write};
}

static void pop(const void *lock) {
    uint32_t i = n_held;
    while (i > 0 && held[i - 1].lock != lock)
        i--;
    assert(i > 0 && "engine lock released by a thread that does not hold it");
    if (i == 0)
        return;
    memmove(&held[i - 1], &held[i], (n_held - i) * sizeof *held);
    if (--n_held == 0 && held != small) {
        free(held);
        held = small;
        cap_held = SMALL;
    }
}

static const held_t *find(const void *lock) {
    for (uint32_t i = n_held; i-- > 0;)
        if (held[i].lock == lock)
            return &held[i];
    return NULL;
}

void kvs__lock(pthread_mutex_t *mu, int rank, uint32_t sub) {
    check(rank, sub);
    pthread_mutex_lock(mu);
    push(mu, rank, sub, 1);
}

void kvs__unlock(pthread_mutex_t *mu) {
    pop(mu);
    pthread_mutex_unlock(mu);
}

void kvs__rdlock(pthread_rwlock_t *rw, uint32_t sub) {
    check(KVS__RANK_LAYER, sub);
    pthread_rwlock_rdlock(rw);
    push(rw, KVS__RANK_LAYER, sub, 0);
}

void kvs__wrlock(pthread_rwlock_t *rw, uint32_t sub) {
    check(KVS__RANK_LAYER, sub);
    pthread_rwlock_wrlock(rw);
    push(rw, KVS__RANK_LAYER, sub, 1);
}

void kvs__rwunlock(pthread_rwlock_t *rw) {
    pop(rw);
    pthread_rwlock_unlock(rw);
}

int kvs__held(const void *lock) {
    return find(lock) != NULL;
}

int kvs__held_write(const void *lock) {
    const held_t *h = find(lock);
    return h && h->write;
}

#else

/* ISO C wants a declaration in every translation unit. */
typedef int kvs__lock_unused_t;

#endif /* NDEBUG */
