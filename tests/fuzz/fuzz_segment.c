/*
 * fuzz_segment.c: libFuzzer target for the stored-segment decoder
 * (kvs_segment_decode, index/segment_io.c) — the parser of every index
 * record read back from RocksDB. A decoded segment must then be safe to
 * serve: attention, search and the cluster views run over it, so a record
 * that passes validation but breaks an invariant shows up as a crash here.
 * Replayed over tests/fuzz/corpus/segment by CTest (test_fuzz_segment_replay)
 * with any compiler; `tests/fuzz/run-fuzz-segment.sh` fuzzes it with clang.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvs_index.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvs_segment_t *seg = NULL;
    char err[128];
    if (kvs_segment_decode(data, size, &seg, err, sizeof err) != 0)
        return 0;
    uint32_t d = seg->d;
    float *q = calloc((size_t)2 * d, sizeof(float));
    float *out = malloc((size_t)2 * d * sizeof(float));
    kvs_scratch_t *s = kvs_scratch_new();
    if (q && out && s) {
        for (uint32_t i = 0; i < 2 * d; i++)
            q[i] = (float)(i % 5) * 0.25f - 0.5f;
        kvs_segment_t *segs[1] = {seg};
        kvs_head_view_t v = {.dtype = seg->dtype,
                             .d = d,
                             .segments = segs,
                             .n_segments = 1,
                             .indexed_tokens = seg->first_pos + seg->n_tokens,
                             .sink_tokens = 4,
                             .window_tokens = 8};
        /* The view's positions start at the segment's first_pos: a lone
         * segment stands for the whole indexed prefix. */
        v.indexed_tokens = seg->n_tokens;
        seg->first_pos = 0;
        kvs_zone_params_t zp = {.retrieval_fraction = 0.3f,
                                .estimation_fraction = 0.3f,
                                .scale = 0.125f};
        kvs_head_attend(&v, q, 2, &zp, s, out, NULL);
        zp.bounded = 1;
        zp.epsilon = 0.05f;
        kvs_head_attend(&v, q, 2, &zp, s, out, NULL);
        int64_t pos[4];
        float sc[4];
        uint32_t k = seg->n_tokens < 4 ? seg->n_tokens : 4;
        kvs_head_search(&v, q, k, &zp, s, pos, sc, NULL);
        /* The two-stage path over the record's codes (index/codes.c). */
        kvs_zone_params_t zc = {.retrieval_fraction = 0.3f, .scale = 0.125f};
        kvs_head_search(&v, q, k, &zc, s, pos, sc, NULL);
        for (uint32_t c = 0; c < seg->n_clusters; c++) {
            const void *mean;
            kvs_segment_cluster_view(seg, c, (int)(c & 1), &mean);
        }
    }
    kvs_scratch_free(s);
    free(q);
    free(out);
    kvs_segment_free(seg);
    return 0;
}
