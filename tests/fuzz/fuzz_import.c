/*
 * fuzz_import.c: libFuzzer target for the sequence stream importer
 * (kvs_seq_import_chunk / _end, engine/transfer.c): the parser of every
 * repair push a kvstored receives from a peer. The input is a stream, fed
 * in pieces whose size it also picks (its length modulo 257, plus one), so
 * records cut anywhere are exercised; a stream that installs is then
 * attended and searched on every layer and dropped. Replayed over
 * tests/fuzz/corpus/import by CTest (test_fuzz_import_replay) with any
 * compiler; with clang the `fuzz_import` target fuzzes it (libFuzzer +
 * ASan + UBSan). The store matches the corpus: memory only, segments of
 * 64 tokens, a window of 16. For coverage of the records past their
 * checksums, build the engine itself instrumented and with
 * -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION (the importer then skips the
 * CRC check), e.g. CC=clang cmake -DKVS_CUDA=OFF -DCMAKE_C_FLAGS=
 * "-fsanitize=fuzzer-no-link,address,undefined
 * -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION" and build fuzz_import.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore.h"

static kvs_store_t *store;

static void close_store(void) {
    kvs_store_close(store);
    store = NULL;
}

static void serve(uint64_t id) {
    kvs_geometry_t g;
    uint64_t tokens = 0;
    if (kvs_seq_shape(store, id, 0, &g, NULL))
        return;
    size_t n = (size_t)g.n_q_heads * g.head_dim;
    float *q = malloc(n * sizeof *q), *out = malloc(n * sizeof *out);
    int64_t *pos = malloc(g.n_q_heads * 4 * sizeof *pos);
    float *sc = malloc(g.n_q_heads * 4 * sizeof *sc);
    for (size_t i = 0; q && i < n; i++)
        q[i] = (float)(i % 7) * 0.25f - 0.75f;
    for (uint32_t l = 0; q && out && pos && sc && l < g.n_layers; l++) {
        kvs_seq_attend(store, id, l, q, NULL, out, NULL);
        if (kvs_seq_shape(store, id, l, &g, &tokens) == 0 && tokens)
            kvs_seq_search(store, id, l, q, tokens < 4 ? (uint32_t)tokens : 4,
                           NULL, pos, sc);
    }
    free(q);
    free(out);
    free(pos);
    free(sc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!store) {
        kvs_options_t o;
        kvs_options_default(&o);
        o.segment_tokens = 64;
        o.window_tokens = 16;
        o.n_threads = 1;
        o.deterministic = 1;
        if (kvs_store_open(&o, &store))
            return 0;
        atexit(close_store);
    }
    kvs_import_t *im = NULL;
    if (kvs_seq_import_begin(store, 3, &im))
        return 0;
    size_t piece = size % 257 + 1;
    for (size_t off = 0; off < size; off += piece) {
        size_t k = size - off < piece ? size - off : piece;
        if (kvs_seq_import_chunk(im, data + off, k)) {
            kvs_seq_import_abort(im);
            return 0;
        }
    }
    kvs_import_result_t res;
    if (kvs_seq_import_end(im, &res) == 0) {
        serve(3);
        kvs_seq_wait_indexed(store, 3);
        kvs_seq_drop(store, 3);
    }
    return 0;
}
