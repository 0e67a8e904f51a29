/*
 * fuzz_dump.c: libFuzzer target for the kvdecode --dump reader
 * (kvs_dump_open_buffer, tools/kvdecode/dump_read.c), which the recall and
 * accuracy benchmarks and kvtune trust with files of gigabytes. A dump that
 * passes the header checks must be readable everywhere its geometry says:
 * every (layer, array, head) is read at its first and last position, and
 * requests just outside must be refused, so a check that lets a size
 * through shows up as an out-of-bounds read under ASan.
 * Replayed over tests/fuzz/corpus/dump by CTest (test_fuzz_dump_replay)
 * with any compiler; with clang, fuzz_dump is the libFuzzer binary.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvs_dump.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* The reader wants 4-byte alignment (it reads token ids and fp16 rows
     * in place); libFuzzer's buffer has no such promise. */
    void *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    kvs_dump_t *d = NULL;
    char err[256];
    if (kvs_dump_open_buffer(buf, size, "fuzz", &d, err, sizeof(err)) != 0) {
        free(buf);
        return 0;
    }
    const kvs_dump_info_t *in = kvs_dump_info(d);
    const int32_t *tok = kvs_dump_tokens(d);
    volatile int32_t sink = tok[0] ^ tok[in->n_tokens - 1];
    (void)sink;
    float *row = malloc((size_t)2 * in->head_dim * sizeof(float));
    if (row) {
        const uint32_t heads[3] = {in->n_q_heads, in->n_kv_heads,
                                   in->n_kv_heads};
        uint32_t last = in->n_tokens - 1;
        for (uint32_t l = 0; l < in->n_layers; l++)
            for (uint32_t a = 0; a < 3; a++)
                for (uint32_t h = 0; h < heads[a]; h++) {
                    kvs_dump_array_t w = (kvs_dump_array_t)a;
                    if (kvs_dump_rows(d, l, w, h, 0, 1, row) != 0 ||
                        kvs_dump_rows(d, l, w, h, last, 1, row) != 0 ||
                        kvs_dump_rows(d, l, w, h, last, 2, row) != KVS_ERANGE)
                        abort();
                }
        if (kvs_dump_rows(d, in->n_layers, KVS_DUMP_Q, 0, 0, 1, row) !=
                KVS_ERANGE ||
            kvs_dump_rows(d, 0, KVS_DUMP_K, in->n_kv_heads, 0, 1, row) !=
                KVS_ERANGE)
            abort();
        free(row);
    }
    kvs_dump_close(d);
    free(buf);
    return 0;
}
