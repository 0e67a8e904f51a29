/*
 * test_lock.c: the engine's lock-order check (engine/lock.c, the order in
 * engine/engine_int.h). Locks taken in order pass and are reported held;
 * a lock taken out of order, or released by a thread that does not hold
 * it, aborts (checked in a forked child). Debug builds only: with NDEBUG
 * the check is compiled out and these tests skip.
 */
#include "engine_int.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#ifndef NDEBUG

static pthread_mutex_t meta = PTHREAD_MUTEX_INITIALIZER,
                       page = PTHREAD_MUTEX_INITIALIZER,
                       map = PTHREAD_MUTEX_INITIALIZER,
                       build = PTHREAD_MUTEX_INITIALIZER;

/* Run `fn` in a child; 1 when the child died of SIGABRT (a failed assert). */
static int aborts(void (*fn)(void)) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* the assert message is expected: keep the test output clean */
        if (!freopen("/dev/null", "w", stderr))
            _exit(3);
        fn();
        _exit(0);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
}

static void test_lock_in_order(void **state) {
    (void)state;
    enum { N = 100 }; /* past the tracker's inline stack */
    pthread_mutex_t app[N];
    pthread_rwlock_t rw[N];
    for (int i = 0; i < N; i++) {
        pthread_mutex_init(&app[i], NULL);
        pthread_rwlock_init(&rw[i], NULL);
    }
    kvs__lock(&meta, KVS__RANK_META, 0);
    kvs__lock(&page, KVS__RANK_PAGE, 0);
    for (uint32_t i = 0; i < N; i++)
        kvs__lock(&app[i], KVS__RANK_APPEND, i);
    for (uint32_t i = 0; i < N; i++) {
        if (i % 2)
            kvs__rdlock(&rw[i], i);
        else
            kvs__wrlock(&rw[i], i);
    }
    kvs__lock(&map, KVS__RANK_MAP, 0);
    kvs__lock(&build, KVS__RANK_BUILD, 0);
    assert_true(kvs__held(&meta));
    assert_true(kvs__held(&app[N - 1]));
    assert_true(kvs__held_write(&rw[0]));
    assert_true(kvs__held(&rw[1]));
    assert_false(kvs__held_write(&rw[1]));
    /* released out of order, as drop_seq releases map_mu before the
     * append_mus */
    kvs__unlock(&map);
    kvs__unlock(&meta);
    assert_false(kvs__held(&map));
    assert_false(kvs__held(&meta));
    assert_true(kvs__held(&build));
    kvs__unlock(&build);
    for (uint32_t i = N; i-- > 0;)
        kvs__rwunlock(&rw[i]);
    for (uint32_t i = N; i-- > 0;)
        kvs__unlock(&app[i]);
    kvs__unlock(&page);
    assert_false(kvs__held(&app[0]));
    assert_false(kvs__held(&rw[0]));
    /* the map lock again, on its own: nothing is left recorded */
    kvs__lock(&map, KVS__RANK_MAP, 0);
    kvs__unlock(&map);
    for (int i = 0; i < N; i++) {
        pthread_mutex_destroy(&app[i]);
        pthread_rwlock_destroy(&rw[i]);
    }
}

static void map_then_meta(void) {
    kvs__lock(&map, KVS__RANK_MAP, 0);
    kvs__lock(&meta, KVS__RANK_META, 0);
}

static void layers_backwards(void) {
    static pthread_rwlock_t a = PTHREAD_RWLOCK_INITIALIZER,
                            b = PTHREAD_RWLOCK_INITIALIZER;
    kvs__rdlock(&a, 1);
    kvs__rdlock(&b, 0);
}

static void layer_then_append(void) {
    static pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;
    static pthread_mutex_t app = PTHREAD_MUTEX_INITIALIZER;
    kvs__wrlock(&rw, 0);
    kvs__lock(&app, KVS__RANK_APPEND, 0);
}

static void unlock_not_held(void) {
    kvs__unlock(&build);
}

static void test_lock_out_of_order_aborts(void **state) {
    (void)state;
    assert_true(aborts(map_then_meta));
    assert_true(aborts(layers_backwards));
    assert_true(aborts(layer_then_append));
    assert_true(aborts(unlock_not_held));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lock_in_order),
        cmocka_unit_test(test_lock_out_of_order_aborts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else /* NDEBUG: nothing to check */

static void test_lock_compiled_out(void **state) {
    (void)state;
    skip();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lock_compiled_out),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#endif
