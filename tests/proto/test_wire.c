/*
 * test_wire.c: unit tests of the protobuf <-> C API conversion
 * (proto/kvs_wire.h). Every value of every enum and every field of every
 * struct goes C -> message -> packed bytes -> message -> C and is compared
 * field by field (never memcmp: padding bytes are not data); every wire
 * enum value goes the other way round; values either side does not know are
 * refused with KVS_EINVAL and a reason; status codes keep their numbers.
 */
#include "kvs_wire.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Tripwires: a field added to one of these structs must be added to the
 * wire (kvstore.proto, wire.c) and to the field-by-field checks below. */
_Static_assert(sizeof(kvs_query_params_t) == 28, "new query param field");
_Static_assert(sizeof(kvs_geometry_t) == 20, "new geometry field");
_Static_assert(sizeof(kvs_attend_stats_t) == 64, "new attend stats field");
_Static_assert(sizeof(kvs_seq_info_t) == 88, "new seq info field");
_Static_assert(sizeof(kvs_store_stats_t) == 248, "new store stats field");

static const kvs_mode_t MODES[] = {KVS_MODE_DEFAULT, KVS_MODE_WAVE,
                                   KVS_MODE_EXACT, KVS_MODE_FULL};
static const kvs_budget_t BUDGETS[] = {KVS_BUDGET_DEFAULT, KVS_BUDGET_FIXED,
                                       KVS_BUDGET_BOUNDED};
static const kvs_rank_t RANKS[] = {KVS_RANK_DEFAULT, KVS_RANK_CENTROID,
                                   KVS_RANK_CODES};
static const kvs_dtype_t DTYPES[] = {KVS_DTYPE_F32, KVS_DTYPE_F16,
                                     KVS_DTYPE_BF16};
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------ enums */

static void test_wire_mode_every_value(void **state) {
    (void)state;
    char err[128];
    /* Each C mode has its own wire value, and comes back as itself. */
    Kvs__V1__Mode seen[N_OF(MODES)];
    for (size_t i = 0; i < N_OF(MODES); i++) {
        Kvs__V1__Mode w;
        kvs_mode_t back;
        assert_int_equal(kvs_wire_mode_to_pb(MODES[i], &w, err, sizeof(err)),
                         0);
        for (size_t j = 0; j < i; j++)
            assert_int_not_equal(w, seen[j]);
        seen[i] = w;
        assert_int_equal(kvs_wire_mode_from_pb(w, &back, err, sizeof(err)), 0);
        assert_int_equal(back, MODES[i]);
    }
    /* The numbers that travel: FULL is no longer sent as WAVE. */
    Kvs__V1__Mode w;
    kvs_wire_mode_to_pb(KVS_MODE_FULL, &w, NULL, 0);
    assert_int_equal(w, KVS__V1__MODE__MODE_FULL);
    kvs_wire_mode_to_pb(KVS_MODE_DEFAULT, &w, NULL, 0);
    assert_int_equal(w, KVS__V1__MODE__MODE_DEFAULT);
    kvs_wire_mode_to_pb(KVS_MODE_EXACT, &w, NULL, 0);
    assert_int_equal(w, KVS__V1__MODE__MODE_EXACT);
    kvs_wire_mode_to_pb(KVS_MODE_WAVE, &w, NULL, 0);
    assert_int_equal(w, KVS__V1__MODE__MODE_WAVE);
    /* Every wire value maps to C and back to itself. */
    for (int v = 0; v <= KVS__V1__MODE__MODE_FULL; v++) {
        kvs_mode_t m;
        Kvs__V1__Mode again;
        assert_int_equal(
            kvs_wire_mode_from_pb((Kvs__V1__Mode)v, &m, err, sizeof(err)), 0);
        assert_int_equal(kvs_wire_mode_to_pb(m, &again, err, sizeof(err)), 0);
        assert_int_equal(again, v);
    }
}

static void test_wire_budget_dtype_every_value(void **state) {
    (void)state;
    char err[128];
    for (size_t i = 0; i < N_OF(BUDGETS); i++) {
        Kvs__V1__Budget w;
        kvs_budget_t back;
        assert_int_equal(
            kvs_wire_budget_to_pb(BUDGETS[i], &w, err, sizeof(err)), 0);
        assert_int_equal(kvs_wire_budget_from_pb(w, &back, err, sizeof(err)),
                         0);
        assert_int_equal(back, BUDGETS[i]);
    }
    for (int v = 0; v <= KVS__V1__BUDGET__BUDGET_BOUNDED; v++) {
        kvs_budget_t b;
        Kvs__V1__Budget again;
        assert_int_equal(
            kvs_wire_budget_from_pb((Kvs__V1__Budget)v, &b, err, sizeof(err)),
            0);
        assert_int_equal(kvs_wire_budget_to_pb(b, &again, err, sizeof(err)), 0);
        assert_int_equal(again, v);
    }
    for (size_t i = 0; i < N_OF(DTYPES); i++) {
        Kvs__V1__DType w;
        kvs_dtype_t back;
        assert_int_equal(kvs_wire_dtype_to_pb(DTYPES[i], &w, err, sizeof(err)),
                         0);
        /* dtype numbers are the same on both sides (and on disk). */
        assert_int_equal((int)w, (int)DTYPES[i]);
        assert_int_equal(kvs_wire_dtype_from_pb(w, &back, err, sizeof(err)), 0);
        assert_int_equal(back, DTYPES[i]);
    }
}

static void test_wire_rank_every_value(void **state) {
    (void)state;
    char err[128];
    /* Each C rank has its own wire value and comes back as itself. */
    for (size_t i = 0; i < N_OF(RANKS); i++) {
        Kvs__V1__Rank w;
        kvs_rank_t back;
        assert_int_equal(kvs_wire_rank_to_pb(RANKS[i], &w, err, sizeof(err)),
                         0);
        for (size_t j = 0; j < i; j++) {
            Kvs__V1__Rank o;
            kvs_wire_rank_to_pb(RANKS[j], &o, NULL, 0);
            assert_int_not_equal(o, w);
        }
        assert_int_equal(kvs_wire_rank_from_pb(w, &back, err, sizeof(err)), 0);
        assert_int_equal(back, RANKS[i]);
    }
    /* Zero is DEFAULT on both sides: an old client's absent field. */
    Kvs__V1__Rank w;
    kvs_wire_rank_to_pb(KVS_RANK_DEFAULT, &w, NULL, 0);
    assert_int_equal(w, KVS__V1__RANK__RANK_DEFAULT);
    assert_int_equal(KVS__V1__RANK__RANK_DEFAULT, 0);
    /* Every wire value maps, and back to itself. */
    for (int v = 0; v <= KVS__V1__RANK__RANK_CODES; v++) {
        kvs_rank_t r;
        Kvs__V1__Rank again;
        assert_int_equal(
            kvs_wire_rank_from_pb((Kvs__V1__Rank)v, &r, err, sizeof(err)), 0);
        assert_int_equal(kvs_wire_rank_to_pb(r, &again, err, sizeof(err)), 0);
        assert_int_equal(again, v);
    }
    const int bad[] = {-1, 3, 7, 1000, INT32_MAX};
    for (size_t i = 0; i < N_OF(bad); i++) {
        kvs_rank_t r;
        Kvs__V1__Rank wr;
        err[0] = 0;
        assert_int_equal(
            kvs_wire_rank_to_pb((kvs_rank_t)bad[i], &wr, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "rank"));
        err[0] = 0;
        assert_int_equal(
            kvs_wire_rank_from_pb((Kvs__V1__Rank)bad[i], &r, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "unknown rank"));
    }
    /* A params struct with an unknown rank is refused as a whole. */
    kvs_query_params_t p = {.mode = KVS_MODE_WAVE, .rank = (kvs_rank_t)7};
    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    assert_int_equal(kvs_wire_params_to_pb(&p, &qp, err, sizeof(err)),
                     KVS_EINVAL);
    qp.rank = (Kvs__V1__Rank)9;
    assert_int_equal(kvs_wire_params_from_pb(&qp, &p, err, sizeof(err)),
                     KVS_EINVAL);
}

static void test_wire_unknown_enums_refused(void **state) {
    (void)state;
    char err[128];
    const int bad[] = {-1, 4, 7, 1000, INT32_MAX};
    for (size_t i = 0; i < N_OF(bad); i++) {
        kvs_mode_t m;
        kvs_budget_t b;
        kvs_dtype_t d;
        Kvs__V1__Mode wm;
        Kvs__V1__Budget wb;
        Kvs__V1__DType wd;
        err[0] = 0;
        assert_int_equal(
            kvs_wire_mode_to_pb((kvs_mode_t)bad[i], &wm, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "mode"));
        assert_int_equal(
            kvs_wire_mode_from_pb((Kvs__V1__Mode)bad[i], &m, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "unknown mode"));
        assert_int_equal(
            kvs_wire_budget_to_pb((kvs_budget_t)bad[i], &wb, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "budget"));
        assert_int_equal(kvs_wire_budget_from_pb((Kvs__V1__Budget)bad[i], &b,
                                                 err, sizeof(err)),
                         KVS_EINVAL);
        assert_int_equal(
            kvs_wire_dtype_to_pb((kvs_dtype_t)bad[i], &wd, err, sizeof(err)),
            KVS_EINVAL);
        assert_non_null(strstr(err, "dtype"));
        assert_int_equal(kvs_wire_dtype_from_pb((Kvs__V1__DType)bad[i], &d, err,
                                                sizeof(err)),
                         KVS_EINVAL);
        /* A NULL err buffer is allowed. */
        assert_int_equal(
            kvs_wire_mode_from_pb((Kvs__V1__Mode)bad[i], &m, NULL, 0),
            KVS_EINVAL);
    }
    /* The first value past each enum. */
    kvs_budget_t b;
    kvs_dtype_t d;
    assert_int_equal(
        kvs_wire_budget_from_pb((Kvs__V1__Budget)3, &b, err, sizeof(err)),
        KVS_EINVAL);
    assert_int_equal(kvs_wire_budget_to_pb((kvs_budget_t)3,
                                           &(Kvs__V1__Budget){0}, err,
                                           sizeof(err)),
                     KVS_EINVAL);
    assert_int_equal(
        kvs_wire_dtype_from_pb((Kvs__V1__DType)3, &d, err, sizeof(err)),
        KVS_EINVAL);
    /* A struct with one unknown enum is refused as a whole. */
    kvs_query_params_t p = {.mode = (kvs_mode_t)9};
    Kvs__V1__QueryParams qp = KVS__V1__QUERY_PARAMS__INIT;
    assert_int_equal(kvs_wire_params_to_pb(&p, &qp, err, sizeof(err)),
                     KVS_EINVAL);
    p.mode = KVS_MODE_FULL;
    p.budget = (kvs_budget_t)5;
    assert_int_equal(kvs_wire_params_to_pb(&p, &qp, err, sizeof(err)),
                     KVS_EINVAL);
    qp.mode = (Kvs__V1__Mode)5;
    qp.budget = KVS__V1__BUDGET__BUDGET_FIXED;
    assert_int_equal(kvs_wire_params_from_pb(&qp, &p, err, sizeof(err)),
                     KVS_EINVAL);
    kvs_geometry_t g = {.n_layers = 1, .dtype = (kvs_dtype_t)3};
    Kvs__V1__Geometry gm = KVS__V1__GEOMETRY__INIT;
    assert_int_equal(kvs_wire_geometry_to_pb(&g, &gm, err, sizeof(err)),
                     KVS_EINVAL);
    gm.dtype = (Kvs__V1__DType)9;
    assert_int_equal(kvs_wire_geometry_from_pb(&gm, &g, err, sizeof(err)),
                     KVS_EINVAL);
    Kvs__V1__InfoResponse im = KVS__V1__INFO_RESPONSE__INIT;
    im.geometry = &gm;
    kvs_seq_info_t info;
    assert_int_equal(kvs_wire_seq_info_from_pb(&im, &info, err, sizeof(err)),
                     KVS_EINVAL);
}

/* --------------------------------------------------------------- structs */

/* Pack `m` and unpack it again with the generated code, so that every
 * round trip below crosses real wire bytes. */
#define REPACK(type, fn, m, out)                                               \
    do {                                                                       \
        size_t n_ = kvs__v1__##fn##__get_packed_size(m);                       \
        uint8_t *b_ = malloc(n_ ? n_ : 1);                                     \
        assert_non_null(b_);                                                   \
        assert_int_equal(kvs__v1__##fn##__pack(m, b_), n_);                    \
        (out) = kvs__v1__##fn##__unpack(NULL, n_, b_);                         \
        assert_non_null(out);                                                  \
        free(b_);                                                              \
    } while (0)

static void check_params_equal(const kvs_query_params_t *a,
                               const kvs_query_params_t *b) {
    assert_int_equal(a->mode, b->mode);
    assert_int_equal(a->budget, b->budget);
    assert_true(a->retrieval_fraction == b->retrieval_fraction);
    assert_true(a->estimation_fraction == b->estimation_fraction);
    assert_true(a->epsilon == b->epsilon);
    assert_true(a->scale == b->scale);
    assert_int_equal(a->rank, b->rank);
}

static void test_wire_params_roundtrip(void **state) {
    (void)state;
    char err[128];
    for (size_t i = 0; i < N_OF(MODES); i++)
        for (size_t j = 0; j < N_OF(BUDGETS); j++)
            for (size_t r = 0; r < N_OF(RANKS); r++) {
                kvs_query_params_t p = {
                    .mode = MODES[i],
                    .budget = BUDGETS[j],
                    .rank = RANKS[r],
                    .retrieval_fraction = 0.125f + (float)i,
                    .estimation_fraction = 0.375f + (float)j,
                    .epsilon = 0.0625f * (float)(i + j + 1),
                    .scale = 0.088388f * (float)(i + 1),
                };
                Kvs__V1__QueryParams m = KVS__V1__QUERY_PARAMS__INIT;
                assert_int_equal(
                    kvs_wire_params_to_pb(&p, &m, err, sizeof(err)), 0);
                Kvs__V1__QueryParams *u;
                REPACK(Kvs__V1__QueryParams, query_params, &m, u);
                kvs_query_params_t back;
                memset(&back, 0xa5, sizeof(back)); /* no stale field passes */
                assert_int_equal(
                    kvs_wire_params_from_pb(u, &back, err, sizeof(err)), 0);
                check_params_equal(&p, &back);
                kvs__v1__query_params__free_unpacked(u, NULL);
            }
    /* Zero stays zero (the store's defaults), and absent means zero. */
    kvs_query_params_t z, back;
    memset(&z, 0, sizeof(z));
    Kvs__V1__QueryParams m = KVS__V1__QUERY_PARAMS__INIT;
    assert_int_equal(kvs_wire_params_to_pb(&z, &m, err, sizeof(err)), 0);
    assert_int_equal(m.mode, KVS__V1__MODE__MODE_DEFAULT);
    assert_int_equal(m.budget, KVS__V1__BUDGET__BUDGET_DEFAULT);
    assert_int_equal(kvs__v1__query_params__get_packed_size(&m), 0);
    memset(&back, 0xa5, sizeof(back));
    assert_int_equal(kvs_wire_params_from_pb(NULL, &back, err, sizeof(err)), 0);
    check_params_equal(&z, &back);
    assert_int_equal(back.mode, KVS_MODE_DEFAULT);
    assert_int_equal(back.budget, KVS_BUDGET_DEFAULT);
    assert_int_equal(back.rank, KVS_RANK_DEFAULT);
}

static void test_wire_geometry_roundtrip(void **state) {
    (void)state;
    char err[128];
    for (size_t i = 0; i < N_OF(DTYPES); i++) {
        kvs_geometry_t g = {.n_layers = 32 + (uint32_t)i,
                            .n_q_heads = 64,
                            .n_kv_heads = 8,
                            .head_dim = 128 + (uint32_t)i,
                            .dtype = DTYPES[i]};
        Kvs__V1__Geometry m = KVS__V1__GEOMETRY__INIT;
        assert_int_equal(kvs_wire_geometry_to_pb(&g, &m, err, sizeof(err)), 0);
        Kvs__V1__Geometry *u;
        REPACK(Kvs__V1__Geometry, geometry, &m, u);
        kvs_geometry_t back;
        memset(&back, 0xa5, sizeof(back));
        assert_int_equal(kvs_wire_geometry_from_pb(u, &back, err, sizeof(err)),
                         0);
        assert_int_equal(back.n_layers, g.n_layers);
        assert_int_equal(back.n_q_heads, g.n_q_heads);
        assert_int_equal(back.n_kv_heads, g.n_kv_heads);
        assert_int_equal(back.head_dim, g.head_dim);
        assert_int_equal(back.dtype, g.dtype);
        kvs__v1__geometry__free_unpacked(u, NULL);
    }
}

static void test_wire_attend_stats_roundtrip(void **state) {
    (void)state;
    kvs_attend_stats_t s = {.keys_total = 1ull << 40,
                            .keys_exact = 2,
                            .keys_steady = 3,
                            .clusters_total = 4,
                            .clusters_retrieved = 5,
                            .clusters_estimated = 6,
                            .clusters_skipped = UINT64_MAX,
                            .seconds = 0.00123};
    Kvs__V1__AttendStats m = KVS__V1__ATTEND_STATS__INIT;
    kvs_wire_attend_stats_to_pb(&s, &m);
    Kvs__V1__AttendStats *u;
    REPACK(Kvs__V1__AttendStats, attend_stats, &m, u);
    kvs_attend_stats_t b;
    memset(&b, 0xa5, sizeof(b));
    kvs_wire_attend_stats_from_pb(u, &b);
    assert_true(b.keys_total == s.keys_total);
    assert_true(b.keys_exact == s.keys_exact);
    assert_true(b.keys_steady == s.keys_steady);
    assert_true(b.clusters_total == s.clusters_total);
    assert_true(b.clusters_retrieved == s.clusters_retrieved);
    assert_true(b.clusters_estimated == s.clusters_estimated);
    assert_true(b.clusters_skipped == s.clusters_skipped);
    assert_true(b.seconds == s.seconds);
    kvs__v1__attend_stats__free_unpacked(u, NULL);
    /* Absent stats read as zeros. */
    memset(&b, 0xa5, sizeof(b));
    kvs_wire_attend_stats_from_pb(NULL, &b);
    assert_true(b.keys_total == 0 && b.clusters_skipped == 0 && b.seconds == 0);
}

static void test_wire_seq_info_roundtrip(void **state) {
    (void)state;
    char err[128];
    for (int resident = 0; resident <= 1; resident++) {
        kvs_seq_info_t in = {
            .geometry = {.n_layers = 2,
                         .n_q_heads = 4,
                         .n_kv_heads = 2,
                         .head_dim = 64,
                         .dtype = KVS_DTYPE_BF16},
            .tokens_min = 11,
            .tokens_max = 12,
            .indexed_tokens = 13,
            .segments = 14,
            .builds_pending = 15,
            .bytes = 1ull << 33,
            .index_bytes = 17,
            .resident = resident,
        };
        Kvs__V1__InfoResponse m = KVS__V1__INFO_RESPONSE__INIT;
        Kvs__V1__Geometry gm = KVS__V1__GEOMETRY__INIT;
        assert_int_equal(
            kvs_wire_seq_info_to_pb(&in, &m, &gm, err, sizeof(err)), 0);
        assert_ptr_equal(m.geometry, &gm);
        Kvs__V1__InfoResponse *u;
        REPACK(Kvs__V1__InfoResponse, info_response, &m, u);
        kvs_seq_info_t b;
        memset(&b, 0xa5, sizeof(b));
        assert_int_equal(kvs_wire_seq_info_from_pb(u, &b, err, sizeof(err)), 0);
        assert_int_equal(b.geometry.n_layers, in.geometry.n_layers);
        assert_int_equal(b.geometry.n_q_heads, in.geometry.n_q_heads);
        assert_int_equal(b.geometry.n_kv_heads, in.geometry.n_kv_heads);
        assert_int_equal(b.geometry.head_dim, in.geometry.head_dim);
        assert_int_equal(b.geometry.dtype, in.geometry.dtype);
        assert_true(b.tokens_min == in.tokens_min);
        assert_true(b.tokens_max == in.tokens_max);
        assert_true(b.indexed_tokens == in.indexed_tokens);
        assert_true(b.segments == in.segments);
        assert_true(b.builds_pending == in.builds_pending);
        assert_true(b.bytes == in.bytes);
        assert_true(b.index_bytes == in.index_bytes);
        assert_int_equal(b.resident, in.resident);
        kvs__v1__info_response__free_unpacked(u, NULL);
    }
    /* An older daemon sends no `evicted`: the sequence reads as resident. */
    Kvs__V1__InfoResponse old = KVS__V1__INFO_RESPONSE__INIT;
    kvs_seq_info_t b;
    assert_int_equal(kvs_wire_seq_info_from_pb(&old, &b, err, sizeof(err)), 0);
    assert_int_equal(b.resident, 1);
}

static void check_store_stats_equal(const kvs_store_stats_t *a,
                                    const kvs_store_stats_t *b) {
    assert_true(a->sequences == b->sequences);
    assert_true(a->bytes == b->bytes);
    assert_true(a->index_bytes == b->index_bytes);
    assert_true(a->disk_bytes == b->disk_bytes);
    assert_true(a->quarantined == b->quarantined);
    assert_true(a->expired == b->expired);
    assert_true(a->resident_bytes == b->resident_bytes);
    assert_true(a->evictions == b->evictions);
    assert_true(a->page_ins == b->page_ins);
    assert_true(a->builds_pending == b->builds_pending);
    assert_true(a->builds_done == b->builds_done);
    assert_true(a->build_keys == b->build_keys);
    assert_true(a->build_seconds == b->build_seconds);
    assert_int_equal(a->gpu_device, b->gpu_device);
    assert_true(a->gpu_attends == b->gpu_attends);
    assert_true(a->gpu_fallbacks == b->gpu_fallbacks);
    assert_true(a->gpu_errors == b->gpu_errors);
    assert_true(a->gpu_bytes == b->gpu_bytes);
    assert_true(a->gpu_pinned_bytes == b->gpu_pinned_bytes);
    assert_true(a->gpu_kv_bytes == b->gpu_kv_bytes);
    assert_true(a->gpu_cache_lookups == b->gpu_cache_lookups);
    assert_true(a->gpu_cache_hits == b->gpu_cache_hits);
    assert_true(a->gpu_bus_bytes == b->gpu_bus_bytes);
    assert_true(a->gpu_upload_bytes == b->gpu_upload_bytes);
    assert_true(a->gpu_builds == b->gpu_builds);
    assert_true(a->gpu_mirrors_evicted == b->gpu_mirrors_evicted);
    assert_true(a->gpu_build_errors == b->gpu_build_errors);
}

static void test_wire_store_stats_roundtrip(void **state) {
    (void)state;
    const int32_t devices[] = {-1, 0, 1, 7};
    for (size_t i = 0; i < N_OF(devices); i++) {
        /* Distinct values per field, so a swapped pair is caught. */
        kvs_store_stats_t s = {
            .sequences = 101,
            .bytes = 102,
            .index_bytes = 103,
            .disk_bytes = 104,
            .quarantined = 105,
            .expired = 106,
            .resident_bytes = 107,
            .evictions = 108,
            .page_ins = 109,
            .builds_pending = 110,
            .builds_done = 111,
            .build_keys = 112,
            .build_seconds = 11.25,
            .gpu_device = devices[i],
            .gpu_attends = 114,
            .gpu_fallbacks = 115,
            .gpu_errors = 116,
            .gpu_bytes = 117,
            .gpu_pinned_bytes = 118,
            .gpu_kv_bytes = 119,
            .gpu_cache_lookups = 120,
            .gpu_cache_hits = 121,
            .gpu_bus_bytes = 122,
            .gpu_upload_bytes = 123,
            .gpu_builds = 124,
            .gpu_mirrors_evicted = 1ull << 51,
            .gpu_build_errors = 1ull << 50,
        };
        Kvs__V1__StatsResponse m = KVS__V1__STATS_RESPONSE__INIT;
        kvs_wire_store_stats_to_pb(&s, &m);
        Kvs__V1__StatsResponse *u;
        REPACK(Kvs__V1__StatsResponse, stats_response, &m, u);
        kvs_store_stats_t b;
        memset(&b, 0xa5, sizeof(b));
        kvs_wire_store_stats_from_pb(u, &b);
        check_store_stats_equal(&s, &b);
        kvs__v1__stats_response__free_unpacked(u, NULL);
    }
    /* An older daemon sends no device: no GPU, not device 0. */
    Kvs__V1__StatsResponse old = KVS__V1__STATS_RESPONSE__INIT;
    kvs_store_stats_t b;
    kvs_wire_store_stats_from_pb(&old, &b);
    assert_int_equal(b.gpu_device, -1);
}

/* ----------------------------------------------------------- status codes */

static void test_wire_status_codes(void **state) {
    (void)state;
    /* Every KVS_E* code keeps its number both ways. */
    const int codes[] = {
#define KVS__T_CODE(name, value, msg) KVS_##name,
        KVS_ERRNO_MAP(KVS__T_CODE)
#undef KVS__T_CODE
    };
    assert_int_equal(kvs_wire_status_to_pb(0), 0);
    assert_int_equal(kvs_wire_status_from_pb(0), 0);
    for (size_t i = 0; i < N_OF(codes); i++) {
        assert_int_equal(kvs_wire_status_to_pb(codes[i]), codes[i]);
        assert_int_equal(kvs_wire_status_from_pb(codes[i]), codes[i]);
    }
    /* Negated errno values pass as they are. */
    const int errnos[] = {-1, -2, -28, -4095};
    for (size_t i = 0; i < N_OF(errnos); i++) {
        assert_int_equal(kvs_wire_status_to_pb(errnos[i]), errnos[i]);
        assert_int_equal(kvs_wire_status_from_pb(errnos[i]), errnos[i]);
    }
    /* Anything else is a protocol error, never a positive status. */
    const int bad[] = {1, 42, -4096, -5000, INT32_MIN};
    for (size_t i = 0; i < N_OF(bad); i++) {
        assert_int_equal(kvs_wire_status_to_pb(bad[i]), KVS_EPROTO);
        assert_int_equal(kvs_wire_status_from_pb(bad[i]), KVS_EPROTO);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wire_mode_every_value),
        cmocka_unit_test(test_wire_budget_dtype_every_value),
        cmocka_unit_test(test_wire_rank_every_value),
        cmocka_unit_test(test_wire_unknown_enums_refused),
        cmocka_unit_test(test_wire_params_roundtrip),
        cmocka_unit_test(test_wire_geometry_roundtrip),
        cmocka_unit_test(test_wire_attend_stats_roundtrip),
        cmocka_unit_test(test_wire_seq_info_roundtrip),
        cmocka_unit_test(test_wire_store_stats_roundtrip),
        cmocka_unit_test(test_wire_status_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
