/*
 * gpu_none.c: the engine's GPU path (gpu_int.h) in a build without CUDA: the
 * store is told why there is no GPU and every call runs on the CPU. CMake
 * builds this file instead of gpu.c where the CUDA parts are not built.
 */
#include "gpu_int.h"

#include <stdio.h>
#include <string.h>

struct kvs__gpu_s {
    int unused;
};

int kvs__gpu_open(const kvs__gpu_params_t *p, kvs__gpu_t **out, char *why,
                  size_t why_len) {
    *out = NULL;
    if (p && p->device >= 0)
        snprintf(why, why_len,
                 "this build has no CUDA (nvcc was not found "
                 "when it was configured)");
    return 0;
}

void kvs__gpu_close(kvs__gpu_t *g) {
    (void)g;
}

int kvs__gpu_attend(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *mirror,
                    const kvs_head_view_t *views, uint32_t n_heads,
                    uint32_t group, const float *q, const kvs_zone_params_t *zp,
                    const kvs_rank_params_t *rp, float *out,
                    kvs_zone_stats_t *stats) {
    (void)g, (void)mirror, (void)views, (void)n_heads, (void)group, (void)q;
    (void)zp, (void)rp, (void)out, (void)stats;
    return KVS_ENOTSUP;
}

int kvs__gpu_attend_device(kvs__gpu_t *g, kvs__gpu_layer_t *_Atomic *mirror,
                           const kvs_head_view_t *views, uint32_t n_heads,
                           uint32_t group, const float *q_dev,
                           const kvs_zone_params_t *zp,
                           const kvs_rank_params_t *rp, float *out_dev,
                           kvs_zone_stats_t *stats) {
    return kvs__gpu_attend(g, mirror, views, n_heads, group, q_dev, zp, rp,
                           out_dev, stats);
}

int kvs__gpu_check_ptr(kvs__gpu_t *g, const void *p, size_t n) {
    (void)g, (void)p, (void)n;
    return KVS_ENOTSUP;
}

int kvs__gpu_copy(kvs__gpu_t *g, void *dst, const void *src, size_t n,
                  int to_device) {
    (void)g, (void)dst, (void)src, (void)n, (void)to_device;
    return KVS_ENOTSUP;
}

void kvs__gpu_layer_free(kvs__gpu_t *g, kvs__gpu_layer_t *m) {
    (void)g, (void)m;
}

int kvs__gpu_cluster(kvs__gpu_t *g, kvs_dtype_t dtype, uint32_t d, uint32_t n,
                     const void *keys, const kvs_build_params_t *bp,
                     uint32_t *label, uint32_t *k) {
    (void)g, (void)dtype, (void)d, (void)n, (void)keys, (void)bp;
    (void)label, (void)k;
    return KVS_ENOTSUP;
}

void kvs__gpu_stats(const kvs__gpu_t *g, kvs__gpu_stats_t *out) {
    (void)g;
    memset(out, 0, sizeof *out);
    out->device = -1;
}
