/*
 * wave.cu: the wave-attention plan (kvs_cuda_wave_*: scratch sized from the
 * layer geometry, select then attend), and the small C-boundary helpers of
 * the module (device count, error conversion).
 */
#include "attend.cuh"
#include "wave.cuh"

#include <string.h>

static __thread char last_err[256];

int kvs__cuda_fail(cudaError_t e, const char *what) {
    snprintf(last_err, sizeof last_err, "%s: %s", what, cudaGetErrorString(e));
    return kvs_cuda_err(e);
}

extern "C" const char *kvs_cuda_last_error(void) {
    return last_err;
}

extern "C" int kvs_cuda_err(cudaError_t e) {
    switch (e) {
    case cudaSuccess:
        return 0;
    case cudaErrorMemoryAllocation:
        return KVS_ENOMEM;
    case cudaErrorInvalidValue:
        return KVS_EINVAL;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
        return KVS_ENOTSUP;
    default:
        return KVS_EIO;
    }
}

extern "C" int kvs_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no device" error */
        return 0;
    }
    return n;
}

static uint32_t frac_cap(float f, uint32_t n) {
    /* the device's count can never exceed this; at least 1 slot */
    const uint32_t k = kvs__cuda_frac_count(f, n);
    return k ? k : 1;
}

static uint32_t div_up(uint32_t a, uint32_t b) {
    return (a + b - 1) / b;
}

extern "C" int kvs_cuda_wave_new(const kvs_cuda_layer_t *g,
                                 const kvs_cuda_wave_params_t *p,
                                 kvs_cuda_wave_t **out) {
    *out = NULL;
    if (!g || !p || g->d != KVS_CUDA_HEAD_DIM || g->n_heads == 0 ||
        g->group == 0 || g->group > KVS_CUDA_MAX_GROUP ||
        g->max_clusters == 0 || p->retrieval_fraction < 0 ||
        p->estimation_fraction < 0)
        return KVS_EINVAL;
    if (g->dtype != KVS_DTYPE_BF16 && g->dtype != KVS_DTYPE_F16)
        return KVS_ENOTSUP;
    kvs_cuda_wave_t *w = (kvs_cuda_wave_t *)calloc(1, sizeof *w);
    if (!w)
        return KVS_ENOMEM;
    const size_t H = g->n_heads, G = g->group, C = g->max_clusters;
    w->dtype = g->dtype;
    w->n_heads = g->n_heads;
    w->group = g->group;
    w->max_clusters = g->max_clusters;
    w->n_steady = g->n_steady;
    w->rf = p->retrieval_fraction;
    w->ef = p->estimation_fraction;
    w->scale = p->scale > 0 ? p->scale : 1.f / sqrtf((float)g->d);
    w->rcap = frac_cap(w->rf, g->max_clusters);
    w->ecap = frac_cap(w->ef, g->max_clusters);
    w->tiles = div_up(g->max_clusters, SCORE_TILE);
    const int few = g->n_heads <= ATT_FEW_HEADS;
    w->ret_split = few ? ATT_RET_CLUSTERS_FEW : ATT_RET_CLUSTERS;
    w->est_rows = few ? ATT_EST_ROWS_FEW : ATT_EST_ROWS;
    w->steady_items = div_up(g->n_steady, ATT_STEADY_ROWS);
    w->ret_items = div_up(w->rcap, w->ret_split);
    w->est_items = div_up(w->ecap, w->est_rows);
    w->pdl = p->pdl & 3u;
    const size_t items = w->steady_items + w->ret_items + w->est_items;
    w->select_block = p->select_block == 1;
    const size_t smem = kvs__cuda_select_smem(g->max_clusters, w->select_block);
    int rc = 0;
#define ALLOC(ptr, n)                                                          \
    do {                                                                       \
        cudaError_t e_ = cudaMalloc((void **)&(ptr), (n) * sizeof *(ptr));     \
        if (e_ != cudaSuccess) {                                               \
            rc = kvs__cuda_fail(e_, "cudaMalloc " #ptr);                       \
            goto err;                                                          \
        }                                                                      \
    } while (0)
    ALLOC(w->logits, H * G * C);
    ALLOC(w->tile_ms, H * w->tiles * G * 2);
    ALLOC(w->scores, H * C);
    if (!smem)
        ALLOC(w->keys, H * C);
    ALLOC(w->ret, H * w->rcap);
    ALLOC(w->n_ret, H);
    ALLOC(w->est, H * w->ecap);
    ALLOC(w->n_est, H);
    ALLOC(w->po, H * items * G * KVS_CUDA_HEAD_DIM);
    ALLOC(w->plse, H * items * G);
    ALLOC(w->done, H);
    ALLOC(w->ghist, kvs__cuda_select_hist_words(g->n_heads));
#undef ALLOC
    {
        cudaError_t e = cudaMemset(w->done, 0, H * sizeof *w->done);
        if (e == cudaSuccess)
            e = cudaMemset(w->ghist, 0,
                           kvs__cuda_select_hist_words(g->n_heads) * 4);
        if (e != cudaSuccess) {
            rc = kvs__cuda_fail(e, "cudaMemset done");
            goto err;
        }
    }
    if ((rc = kvs__cuda_select_prepare(smem, w->select_block)) != 0)
        goto err;
    {
        w->sel_threads = p->select_threads
                             ? (int)p->select_threads
                             : kvs__cuda_select_threads(g->n_heads, smem);
        if (w->sel_threads != 256 && w->sel_threads != 512)
            w->sel_threads = 512;
        /* 4 score blocks of 106 registers fit an SM: more than that per
         * SM is more than one wave */
        int dev = 0, sms = 132;
        if (cudaGetDevice(&dev) == cudaSuccess)
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        w->score_many = (uint64_t)w->tiles * g->n_heads > 4ull * sms;
    }
    *out = w;
    return 0;
err:
    kvs_cuda_wave_free(w);
    return rc;
}

extern "C" void kvs_cuda_wave_free(kvs_cuda_wave_t *w) {
    if (!w)
        return;
    cudaFree(w->logits);
    cudaFree(w->tile_ms);
    cudaFree(w->scores);
    cudaFree(w->keys);
    cudaFree(w->ret);
    cudaFree(w->n_ret);
    cudaFree(w->est);
    cudaFree(w->n_est);
    cudaFree(w->po);
    cudaFree(w->plse);
    cudaFree(w->done);
    cudaFree(w->ghist);
    free(w);
}

extern "C" uint32_t kvs_cuda_wave_retrieval_cap(const kvs_cuda_wave_t *w) {
    return w->rcap;
}

extern "C" uint32_t kvs_cuda_wave_estimation_cap(const kvs_cuda_wave_t *w) {
    return w->ecap;
}

static int check_layer(const kvs_cuda_wave_t *w, const kvs_cuda_layer_t *L) {
    if (L->dtype != w->dtype || L->d != KVS_CUDA_HEAD_DIM ||
        L->n_heads != w->n_heads || L->group != w->group ||
        L->max_clusters != w->max_clusters || L->n_steady != w->n_steady)
        return KVS_EINVAL;
    return 0;
}

extern "C" int kvs_cuda_wave_select(kvs_cuda_wave_t *w,
                                    const kvs_cuda_layer_t *L, const float *q,
                                    cudaStream_t stream) {
    int rc = check_layer(w, L);
    return rc ? rc : kvs__cuda_score_select(w, L, q, stream);
}

extern "C" int kvs_cuda_wave_attend(kvs_cuda_wave_t *w,
                                    const kvs_cuda_layer_t *L,
                                    const kvs_cuda_cache_t *cache,
                                    const float *q, float *out,
                                    cudaStream_t stream) {
    int rc = check_layer(w, L);
    if (rc)
        return rc;
    return kvs__cuda_attend_zones(w, L, cache, q, out, stream);
}

extern "C" const uint32_t *kvs_cuda_wave_retrieved(const kvs_cuda_wave_t *w,
                                                   const uint32_t **n) {
    if (n)
        *n = w->n_ret;
    return w->ret;
}

extern "C" const uint32_t *kvs_cuda_wave_estimated(const kvs_cuda_wave_t *w,
                                                   const uint32_t **n) {
    if (n)
        *n = w->n_est;
    return w->est;
}

extern "C" const float *kvs_cuda_wave_scores(const kvs_cuda_wave_t *w) {
    return w->scores;
}
