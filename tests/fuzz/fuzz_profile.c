/*
 * fuzz_profile.c: libFuzzer target for the tuning-profile parser
 * (kvs_options_parse_profile, engine/profile.c), which reads files that users
 * and kvtune write and kvstored loads at start. Whatever the bytes, the parser
 * must return 0 or KVS_EINVAL with a NUL-terminated message, and a profile
 * it accepts must describe options a store accepts (checked against the
 * same relations kvs_store_open enforces). Replayed over
 * tests/fuzz/corpus/profile by CTest (test_fuzz_profile_replay);
 * tests/fuzz/run-fuzz-profile.sh fuzzes it with clang.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore.h"

/* The store's defaults (kvs_options_default), set here so that the target
 * links engine/profile.c alone (run-fuzz-profile.sh); the checks below
 * hold for any valid starting point. */
static void start_options(kvs_options_t *o) {
    memset(o, 0, sizeof *o);
    o->segment_tokens = 8192;
    o->cluster_tokens = 16;
    o->kmeans_iters = 10;
    o->sink_tokens = 4;
    o->window_tokens = 64;
    o->defaults.mode = KVS_MODE_WAVE;
    o->defaults.budget = KVS_BUDGET_FIXED;
    o->defaults.retrieval_fraction = 0.018f;
    o->defaults.estimation_fraction = 0.232f;
    o->defaults.epsilon = 0.02f;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvs_options_t o;
    start_options(&o);
    char err[96];
    memset(err, 'x', sizeof err);
    int rc = kvs_options_parse_profile(&o, "fuzz", (const char *)data, size,
                                       err, sizeof err);
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
