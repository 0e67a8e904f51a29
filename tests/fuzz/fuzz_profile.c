/*
 * fuzz_profile.c: libFuzzer target for the tuning-profile parser
 * (kvs__profile_parse, engine/profile.c), which reads files that users and
 * kvtune write and kvstored loads at start. Whatever the bytes, the parser
 * must return 0 or KVS_EINVAL with a NUL-terminated message, and a profile
 * it accepts must describe options a store accepts (checked against the
 * same relations kvs_store_open enforces). Replayed over
 * tests/fuzz/corpus/profile by CTest (test_fuzz_profile_replay).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/profile.h"
#include "kvstore.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvs_options_t o;
    kvs_options_default(&o);
    char err[96];
    memset(err, 'x', sizeof err);
    int rc = kvs__profile_parse(&o, "fuzz", (const char *)data, size, err,
                                sizeof err);
    if (rc != 0 && rc != KVS_EINVAL)
        abort();
    if (!memchr(err, '\0', sizeof err))
        abort();
    if (rc == 0) {
        const kvs_query_params_t *d = &o.defaults;
        if (o.cluster_tokens == 0 || o.kmeans_iters == 0 ||
            o.segment_tokens < o.cluster_tokens ||
            o.segment_tokens <= (uint64_t)o.sink_tokens + o.window_tokens ||
            !(d->retrieval_fraction > 0 && d->retrieval_fraction <= 1) ||
            !(d->estimation_fraction >= 0 && d->estimation_fraction <= 1) ||
            !(d->epsilon > 0 && d->epsilon <= 1))
            abort();
    } else if (!err[0]) {
        abort(); /* a refusal always says why */
    }
    return 0;
}
