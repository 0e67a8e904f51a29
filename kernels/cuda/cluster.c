/*
 * cluster.c: clustering one index segment from host memory, and the device
 * check of a store's GPU path (kvs_cuda.h). The keys are copied in, the
 * segmented k-means of kmeans.cu runs, the labels come back; the device
 * buffers stay for the next segment of the same shape. The engine's GPU
 * builds (engine/gpu.c) go through here, so that the engine itself makes
 * no CUDA runtime call.
 */
#include "kvs_cuda.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kvs_cuda_copy(int device, void *dst, const void *src, size_t n,
                  int to_device) {
    const int was = kvs_cuda_current_device();
    int rc = kvs_cuda_err(cudaSetDevice(device));
    /* the legacy stream, not a per-thread default: a DLPack producer asked
     * for stream 1 orders its writes before it. A copy from pageable
     * memory may return before its DMA lands: wait for the stream. */
    if (!rc)
        rc = kvs_cuda_err(cudaMemcpyAsync(dst, src, n,
                                          to_device ? cudaMemcpyHostToDevice
                                                    : cudaMemcpyDeviceToHost,
                                          cudaStreamLegacy));
    if (!rc)
        rc = kvs_cuda_err(cudaStreamSynchronize(cudaStreamLegacy));
    kvs_cuda_restore_device(was);
    return rc;
}

int kvs_cuda_device_ptr(int device, const void *p, size_t n) {
    struct cudaPointerAttributes a;
    for (int end = 0; end < 2; end++) {
        const char *at = (const char *)p + (end ? n - 1 : 0);
        if (cudaPointerGetAttributes(&a, at) != cudaSuccess) {
            cudaGetLastError(); /* not sticky, but clear it for the caller */
            return KVS_EINVAL;
        }
        if ((a.type != cudaMemoryTypeDevice &&
             a.type != cudaMemoryTypeManaged) ||
            a.device != device)
            return KVS_EINVAL;
    }
    return 0;
}

int kvs_cuda_current_device(void) {
    int d = -1;
    if (cudaGetDevice(&d) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return d;
}

void kvs_cuda_restore_device(int device) {
    if (device >= 0 && kvs_cuda_current_device() != device)
        cudaSetDevice(device);
}

int kvs_cuda_device_check(int device, int min_major, size_t *free_bytes,
                          char *name, size_t name_len, char *why,
                          size_t why_len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n <= 0) {
        snprintf(why, why_len, "no CUDA device: %s",
                 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        cudaGetLastError(); /* clear the sticky "no device" error */
        return KVS_ENOTSUP;
    }
    if (device < 0 || device >= n) {
        snprintf(why, why_len, "CUDA device %d asked for, %d present", device,
                 n);
        return KVS_ENOTSUP;
    }
    struct cudaDeviceProp prop;
    if (cudaSetDevice(device) != cudaSuccess ||
        cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        snprintf(why, why_len, "CUDA device %d unusable: %s", device,
                 cudaGetErrorString(cudaGetLastError()));
        return KVS_ENOTSUP;
    }
    if (prop.major < min_major) {
        snprintf(why, why_len,
                 "CUDA device %d (%s) is sm_%d%d; the kernels are built for "
                 "sm_90a",
                 device, prop.name, prop.major, prop.minor);
        return KVS_ENOTSUP;
    }
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        snprintf(why, why_len, "CUDA device %d: %s", device,
                 cudaGetErrorString(cudaGetLastError()));
        return KVS_ENOTSUP;
    }
    *free_bytes = free_b;
    snprintf(name, name_len, "%s", prop.name);
    return 0;
}

struct kvs_cuda_cluster_s {
    int device;
    cudaStream_t stream;
    kvs_cuda_kmeans_t *km;
    kvs_dtype_t dtype;
    uint32_t n, ct, iters, k;
    void *d_keys;
    uint32_t *d_nc, *d_counts, *d_offs, *d_pos;
    uint8_t *d_flags;
    void *d_cent, *d_vmean;
    uint32_t *h_label; /* pinned [n] */
};

static void release(kvs_cuda_cluster_t *c) {
    kvs_cuda_kmeans_free(c->km);
    c->km = NULL;
    cudaFree(c->d_keys);
    cudaFree(c->d_nc);
    cudaFree(c->d_counts);
    cudaFree(c->d_offs);
    cudaFree(c->d_pos);
    cudaFree(c->d_flags);
    cudaFree(c->d_cent);
    cudaFree(c->d_vmean);
    cudaFreeHost(c->h_label);
    c->d_keys = c->d_cent = c->d_vmean = NULL;
    c->d_nc = c->d_counts = c->d_offs = c->d_pos = NULL;
    c->d_flags = NULL;
    c->h_label = NULL;
    c->n = 0;
}

/* A k-means handle and its buffers for segments of n keys. */
static int setup(kvs_cuda_cluster_t *c, const kvs_cuda_kmeans_params_t *kp,
                 kvs_dtype_t dtype, uint32_t n) {
    if (c->km && c->n == n && c->dtype == dtype &&
        c->ct == kp->cluster_tokens && c->iters == kp->iters)
        return 0;
    release(c);
    kvs_cuda_kmeans_params_t p = *kp;
    p.segment_tokens = n;
    int rc = kvs_cuda_kmeans_new(&p, dtype, KVS_CUDA_HEAD_DIM, 1, n, &c->km);
    if (rc)
        return rc;
    const uint32_t K = kvs_cuda_kmeans_clusters_per_head(c->km);
    const size_t row = kvs_dtype_size(dtype) * KVS_CUDA_HEAD_DIM;
    if ((rc = kvs_cuda_err(cudaMalloc(&c->d_keys, (size_t)n * row))) ||
        (rc = kvs_cuda_err(cudaMalloc((void **)&c->d_nc, 4))) ||
        (rc = kvs_cuda_err(cudaMalloc((void **)&c->d_counts, (size_t)K * 4))) ||
        (rc = kvs_cuda_err(
             cudaMalloc((void **)&c->d_offs, (size_t)(K + 1) * 4))) ||
        (rc = kvs_cuda_err(cudaMalloc((void **)&c->d_pos, (size_t)n * 4))) ||
        (rc = kvs_cuda_err(cudaMalloc((void **)&c->d_flags, K))) ||
        (rc = kvs_cuda_err(cudaMalloc(&c->d_cent, (size_t)K * row))) ||
        (rc = kvs_cuda_err(cudaMalloc(&c->d_vmean, (size_t)K * row))) ||
        (rc = kvs_cuda_err(
             cudaMallocHost((void **)&c->h_label, (size_t)n * 4)))) {
        release(c);
        return rc;
    }
    c->n = n;
    c->dtype = dtype;
    c->ct = kp->cluster_tokens;
    c->iters = kp->iters;
    c->k = K;
    return 0;
}

int kvs_cuda_cluster_new(int device, kvs_cuda_cluster_t **out) {
    *out = NULL;
    kvs_cuda_cluster_t *c = calloc(1, sizeof *c);
    if (!c)
        return KVS_ENOMEM;
    c->device = device;
    int rc = kvs_cuda_err(cudaSetDevice(device));
    if (!rc)
        rc = kvs_cuda_err(
            cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    if (rc) {
        free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvs_cuda_cluster_free(kvs_cuda_cluster_t *c) {
    if (!c)
        return;
    cudaSetDevice(c->device);
    release(c);
    cudaStreamDestroy(c->stream);
    free(c);
}

int kvs_cuda_cluster_run(kvs_cuda_cluster_t *c,
                         const kvs_cuda_kmeans_params_t *kp, kvs_dtype_t dtype,
                         uint32_t n, const void *keys, uint32_t *label,
                         uint32_t *k) {
    if (dtype != KVS_DTYPE_F16 && dtype != KVS_DTYPE_BF16)
        return KVS_ENOTSUP;
    int rc = kvs_cuda_err(cudaSetDevice(c->device));
    if (!rc)
        rc = setup(c, kp, dtype, n);
    if (rc)
        return rc;
    kvs_cuda_kmeans_set_seed(c->km, kp->seed);
    const size_t row = kvs_dtype_size(dtype) * KVS_CUDA_HEAD_DIM;
    kvs_cuda_kmeans_out_t o = {
        .cluster_stride = c->k,
        .token_stride = n,
        .n_clusters = c->d_nc,
        .centroids = c->d_cent,
        .value_means = c->d_vmean,
        .counts = c->d_counts,
        .offsets = c->d_offs,
        .steady_flags = c->d_flags,
        .positions = c->d_pos,
        .keys = NULL,
        .values = NULL,
    };
    /* values are only averaged into value_means, which the caller redoes:
     * the keys stand in for them */
    if (!(rc = kvs_cuda_err(cudaMemcpyAsync(c->d_keys, keys, (size_t)n * row,
                                            cudaMemcpyHostToDevice,
                                            c->stream))) &&
        !(rc = kvs_cuda_kmeans_build(c->km, c->d_keys, c->d_keys, n, 0, &o,
                                     c->stream)) &&
        !(rc = kvs_cuda_err(cudaMemcpyAsync(
              c->h_label, kvs_cuda_kmeans_assignment(c->km), (size_t)n * 4,
              cudaMemcpyDeviceToHost, c->stream))))
        rc = kvs_cuda_err(cudaStreamSynchronize(c->stream));
    if (rc) {
        release(c); /* start clean next time */
        return rc;
    }
    memcpy(label, c->h_label, (size_t)n * 4);
    *k = c->k;
    return 0;
}
