/*
 * overhead.c: the C side of the binding's per-call overhead benchmark
 * (overhead.py runs the same calls from Python): one in-process store,
 * one sequence (q_heads x head_dim queries over `tokens` keys), `iters`
 * attend calls in full mode; prints the fastest of 5 rounds in us per call
 * (overhead.py compares fastest with fastest: the call's own time swings
 * by several us between processes on a shared machine).
 * Usage: overhead TOKENS ITERS
 */
#define _POSIX_C_SOURCE 200809L
#include <kvstore.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QH 32
#define KVH 8
#define HD 128

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    unsigned tokens = argc > 1 ? (unsigned)atoi(argv[1]) : 64;
    int iters = argc > 2 ? atoi(argv[2]) : 20000;
    kvs_options_t o;
    kvs_options_default(&o);
    o.n_threads = 1;
    kvs_store_t *s = NULL;
    float *k = NULL, *q = NULL, *out = NULL;
    int rc = kvs_store_open(&o, &s);
    if (rc)
        goto err;
    kvs_geometry_t g;
    memset(&g, 0, sizeof(g));
    g.n_layers = 1;
    g.n_q_heads = QH;
    g.n_kv_heads = KVH;
    g.head_dim = HD;
    g.dtype = KVS_DTYPE_F32;
    if ((rc = kvs_seq_create(s, 1, &g)))
        goto err;
    k = malloc(sizeof(float) * tokens * KVH * HD);
    q = malloc(sizeof(float) * QH * HD);
    out = malloc(sizeof(float) * QH * HD);
    if (!k || !q || !out) {
        rc = KVS_ENOMEM;
        goto err;
    }
    srand(15);
    for (size_t i = 0; i < (size_t)tokens * KVH * HD; i++)
        k[i] = (float)rand() / RAND_MAX - 0.5f;
    for (size_t i = 0; i < QH * HD; i++)
        q[i] = (float)rand() / RAND_MAX - 0.5f;
    if ((rc = kvs_seq_append(s, 1, 0, tokens, k, k)))
        goto err;
    kvs_query_params_t p;
    memset(&p, 0, sizeof(p));
    p.mode = KVS_MODE_FULL;
    kvs_attend_stats_t st;
    double r[5];
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        for (int i = 0; i < iters; i++)
            if ((rc = kvs_seq_attend(s, 1, 0, q, &p, out, &st)))
                goto err;
        r[round] = (now() - t0) / iters * 1e6;
    }
    qsort(r, 5, sizeof(r[0]), cmp);
    printf("%.3f\n", r[0]);
    free(k);
    free(q);
    free(out);
    return kvs_store_close(s) ? 1 : 0;
err:
    fprintf(stderr, "overhead: %s\n", kvs_strerror(rc));
    free(k);
    free(q);
    free(out);
    kvs_store_close(s);
    return 1;
}
