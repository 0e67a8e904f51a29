/*
 * sample.c: the dump access and statistics of sample.h.
 */
#include "sample.h"

#include "kvs_common.h"
#include "kvs_dump.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kvt_dump_open(const char *path, kvt_dump_t *dp) {
    memset(dp, 0, sizeof *dp);
    char err[512];
    int rc = kvs_dump_open(path, &dp->dump, err, sizeof err);
    if (rc) {
        /* kvtune's own message names the code; this says what is wrong. */
        fprintf(stderr, "kvtune: %s\n", err);
        return rc;
    }
    const kvs_dump_info_t *in = kvs_dump_info(dp->dump);
    dp->n_layers = in->n_layers;
    dp->n_q = in->n_q_heads;
    dp->n_kv = in->n_kv_heads;
    dp->d = in->head_dim;
    dp->n_tokens = in->n_tokens;
    dp->dtype = (uint32_t)in->dtype;
    return 0;
}

void kvt_dump_close(kvt_dump_t *dp) {
    kvs_dump_close(dp->dump);
    memset(dp, 0, sizeof *dp);
}

void kvt_dump_rows(const kvt_dump_t *dp, uint32_t layer, uint32_t arr,
                   uint32_t pos, uint32_t n, float *out) {
    kvs_dump_array_t which = KVS_DUMP_Q;
    uint32_t head = arr;
    if (arr >= dp->n_q + dp->n_kv) {
        which = KVS_DUMP_V;
        head = arr - dp->n_q - dp->n_kv;
    } else if (arr >= dp->n_q) {
        which = KVS_DUMP_K;
        head = arr - dp->n_q;
    }
    int rc = kvs_dump_rows(dp->dump, layer, which, head, pos, n, out);
    if (rc) {
        fprintf(stderr, "kvtune: dump rows (layer %u, array %u, %u+%u): %s\n",
                layer, arr, pos, n, kvs_strerror(rc));
        exit(1);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double kvt_pct(double *v, size_t n, double p) {
    if (!n)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    size_t r = (size_t)ceil(p * (double)n);
    if (r < 1)
        r = 1;
    return v[r - 1];
}

double kvt_recall(const int64_t *truth, const int64_t *got, uint32_t k) {
    uint32_t want = 0, hit = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (truth[i] < 0)
            continue;
        want++;
        for (uint32_t j = 0; j < k; j++)
            if (got[j] == truth[i]) {
                hit++;
                break;
            }
    }
    return want ? (double)hit / want : 1.0;
}
