/* error.c: the one table that turns kvstore error codes into text. */
#include "kvs_common.h"
#include "kvs_errf.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

size_t kvs_dtype_size(kvs_dtype_t dtype) {
    switch (dtype) {
    case KVS_DTYPE_F32:
        return 4;
    case KVS_DTYPE_F16:
    case KVS_DTYPE_BF16:
        return 2;
    }
    return 0;
}

const char *kvs_dtype_name(kvs_dtype_t dtype) {
    switch (dtype) {
    case KVS_DTYPE_F32:
        return "f32";
    case KVS_DTYPE_F16:
        return "f16";
    case KVS_DTYPE_BF16:
        return "bf16";
    }
    return "?";
}

const char *kvs_strerror(int err) {
    switch (err) {
    case 0:
        return "success";
#define KVS__ERR_MSG(name, value, msg)                                         \
    case KVS_##name:                                                           \
        return msg;
        KVS_ERRNO_MAP(KVS__ERR_MSG)
#undef KVS__ERR_MSG
    }
    if (err < 0 && err > -4096)
        return strerror(-err);
    return "unknown error";
}

const char *kvs_err_name(int err) {
    switch (err) {
    case 0:
        return "OK";
#define KVS__ERR_NAME(name, value, msg)                                        \
    case KVS_##name:                                                           \
        return "KVS_" #name;
        KVS_ERRNO_MAP(KVS__ERR_NAME)
#undef KVS__ERR_NAME
    }
    if (err < 0 && err > -4096) {
        const char *n = strerrorname_np(-err);
        return n ? n : "errno";
    }
    return "unknown";
}

int kvs__errf(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}
