/*
 * kvs_errf.h: the one helper every module uses to report a failure into a
 * caller's message buffer (char *err, size_t errlen: the convention of the
 * functions that have no handle to keep a message in). Internal to kvstore.
 */
#ifndef KVS_ERRF_H
#define KVS_ERRF_H

#include <stddef.h>

/* Format the message into err (nothing when err is NULL or errlen is 0;
 * truncated to errlen - 1 bytes) and return `code`, so that a failure path
 * reads `return kvs__errf(err, errlen, KVS_EINVAL, "...", ...);`. */
int kvs__errf(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif /* KVS_ERRF_H */
