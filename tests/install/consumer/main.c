/*
 * main.c: a program outside the tree, built against an installed kvstore
 * (by pkg-config and by find_package): create, append and attend in
 * process, and a client opened (options parsed, no connection), so that
 * both shared libraries, the headers and their link lines are exercised.
 */
#include <kvs_client.h>
#include <kvstore.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    kvs_store_t *s = NULL;
    kvs_client_t *c = NULL;
    int rc = kvs_store_open(NULL, &s);
    if (rc)
        goto err;
    kvs_geometry_t g;
    memset(&g, 0, sizeof(g));
    g.n_layers = 1;
    g.n_q_heads = 2;
    g.n_kv_heads = 1;
    g.head_dim = 4;
    g.dtype = KVS_DTYPE_F32;
    if ((rc = kvs_seq_create(s, 7, &g)))
        goto err;
    /* Two tokens; the query matches the first key only, strongly. */
    float keys[8] = {10, 0, 0, 0, 0, 10, 0, 0};
    float values[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    if ((rc = kvs_seq_append(s, 7, 0, 2, keys, values)))
        goto err;
    float q[8] = {10, 0, 0, 0, 10, 0, 0, 0}, out[8];
    kvs_query_params_t p;
    kvs_query_params_default(&p);
    p.mode = KVS_MODE_EXACT;
    if ((rc = kvs_seq_attend(s, 7, 0, q, &p, out, NULL)))
        goto err;
    for (int i = 0; i < 8; i++) {
        if (fabsf(out[i] - values[i % 4]) > 1e-3f) {
            fprintf(stderr, "out[%d] = %g, want %g\n", i, out[i],
                    values[i % 4]);
            kvs_store_close(s);
            return 1;
        }
    }
    kvs_client_options_t co;
    kvs_client_options_default(&co);
    const char *addr = "tcp://127.0.0.1:1";
    co.addrs = &addr;
    co.n_addrs = 1;
    if ((rc = kvs_client_open(&co, &c)))
        goto err;
    kvs_client_close(c);
    if ((rc = kvs_store_close(s)))
        goto err;
    printf("installed kvstore ok\n");
    return 0;
err:
    fprintf(stderr, "kvstore: %s\n", kvs_strerror(rc));
    kvs_client_close(c);
    kvs_store_close(s);
    return 1;
}
