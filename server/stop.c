/*
 * The stop flag of kvstored's background threads (etcd membership, repair):
 * a bool guarded by a leaf mutex, with a condition variable on
 * CLOCK_MONOTONIC so that a stop request ends a wait at once.
 */
#include "server_int.h"

#include <time.h>

bool kvs__wait_stop(pthread_mutex_t *mu, pthread_cond_t *cv, const bool *stop,
                    uint64_t ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(mu);
    while (!*stop && pthread_cond_timedwait(cv, mu, &ts) == 0)
        ;
    bool s = *stop;
    pthread_mutex_unlock(mu);
    return s;
}

bool kvs__stopping(pthread_mutex_t *mu, const bool *stop) {
    pthread_mutex_lock(mu);
    bool s = *stop;
    pthread_mutex_unlock(mu);
    return s;
}
