/*
 * import_seedgen.c: writes the seed streams of tests/fuzz/corpus/import
 * (fuzz_import.c): exports of small sequences from a store cut like the
 * fuzz target's (segments of 64 tokens). Run by hand when the stream
 * format grows: import_seedgen DIR.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore.h"

typedef struct out_s {
    FILE *f;
} out_t;

static int put(void *ctx, const void *data, size_t len) {
    out_t *o = ctx;
    return fwrite(data, 1, len, o->f) == len ? 0 : KVS_EIO;
}

static int seed(kvs_store_t *s, const char *dir, const char *name,
                const kvs_geometry_t *g, uint32_t tokens, uint64_t id) {
    int rc = kvs_seq_create(s, id, g);
    size_t rb = (size_t)g->n_kv_heads * g->head_dim * kvs_dtype_size(g->dtype);
    unsigned char *k = malloc(tokens * rb), *v = malloc(tokens * rb);
    if (!k || !v)
        return KVS_ENOMEM;
    for (size_t i = 0; i < tokens * rb; i++) {
        /* small finite values in any dtype: bytes 0..63 then 0x3c */
        k[i] = (unsigned char)((i * 37) % 61);
        v[i] = (unsigned char)((i * 11) % 59);
        if (i % 2 == 1 && g->dtype != KVS_DTYPE_F32)
            k[i] = v[i] = 0x3c;
        if (i % 4 == 3 && g->dtype == KVS_DTYPE_F32)
            k[i] = v[i] = 0x3e;
    }
    for (uint32_t l = 0; !rc && tokens && l < g->n_layers; l++)
        rc = kvs_seq_append(s, id, l, tokens, k, v);
    free(k);
    free(v);
    if (!rc)
        rc = kvs_seq_wait_indexed(s, id);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    out_t o = {fopen(path, "wb")};
    if (!o.f)
        return KVS_EIO;
    /* The target imports as id 3: write every seed under it. */
    if (!rc && id != 3) {
        rc = kvs_seq_fork(s, id, tokens, 3);
        id = 3;
    }
    if (!rc)
        rc = kvs_seq_export(s, id, 4096, put, &o);
    fclose(o.f);
    kvs_seq_drop(s, 3);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: import_seedgen DIR\n");
        return 2;
    }
    kvs_options_t o;
    kvs_options_default(&o);
    o.segment_tokens = 64;
    o.window_tokens = 16;
    o.deterministic = 1;
    kvs_store_t *s;
    if (kvs_store_open(&o, &s))
        return 1;
    kvs_geometry_t g1 = {.n_layers = 2,
                         .n_q_heads = 2,
                         .n_kv_heads = 1,
                         .head_dim = 32,
                         .dtype = KVS_DTYPE_F32};
    kvs_geometry_t g2 = {.n_layers = 1,
                         .n_q_heads = 4,
                         .n_kv_heads = 2,
                         .head_dim = 8,
                         .dtype = KVS_DTYPE_F16};
    kvs_geometry_t g3 = {.n_layers = 3,
                         .n_q_heads = 1,
                         .n_kv_heads = 1,
                         .head_dim = 4,
                         .dtype = KVS_DTYPE_BF16};
    int rc = seed(s, argv[1], "segments-f32", &g1, 150, 3);
    if (!rc)
        rc = seed(s, argv[1], "tail-f16", &g2, 40, 10);
    if (!rc)
        rc = seed(s, argv[1], "three-layers-bf16", &g3, 70, 11);
    if (!rc)
        rc = seed(s, argv[1], "empty-layers", &g3, 0, 12);
    kvs_store_close(s);
    if (rc)
        fprintf(stderr, "seedgen: %s\n", kvs_strerror(rc));
    return rc ? 1 : 0;
}
