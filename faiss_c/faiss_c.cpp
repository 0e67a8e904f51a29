/*
 * faiss_c.cpp: the part of the upstream FAISS C API that kvstore uses,
 * implemented over the C++ library.
 *
 * Debian's libfaiss (1.7.3) installs the C API headers (under faiss/c_api/) but
 * not the library that implements them, so C code cannot call FAISS out of
 * the box. This file defines, with the exact upstream names and signatures
 * (the installed headers are included so the compiler checks them), the
 * functions that the benchmarks, tests and kvtune call: clustering,
 * flat indexes, IVF-Flat, the index factory (HNSW and friends) and the
 * parameter space. Nothing here is kvstore-specific: C callers write the
 * same code they would write against upstream's libfaiss_c.
 *
 * Like upstream, every C++ exception is caught at the boundary: the function
 * returns -2 for a faiss::FaissException, -4 for another std::exception and
 * -1 for anything else (FaissErrorCode), and faiss_get_last_error() returns
 * the message of the calling thread's last failure. Unlike upstream's debug
 * build, nothing is printed to stderr: a server reports errors its own way.
 */
#include <faiss/AutoTune.h>
#include <faiss/Clustering.h>
#include <faiss/Index.h>
#include <faiss/IndexFlat.h>
#include <faiss/IndexIVF.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/FaissException.h>
#include <faiss/index_factory.h>
#include <faiss/utils/distances.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/Clustering_c.h>
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/IndexIVFFlat_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/utils/distances_c.h>

#include <exception>
#include <new>
#include <string>

namespace {

/* Per thread, as upstream: two threads failing at once must not see each
 * other's messages. A copy of the text (not the exception) is kept so the
 * returned pointer stays valid until this thread's next failure. */
thread_local std::string last_error;
thread_local bool have_error = false;

int fail(const char *what, int code) {
    try {
        last_error = what;
    } catch (...) {
        last_error.clear();
    }
    have_error = true;
    return code;
}

/* Runs f, turning any exception into upstream's error code. */
template <typename F> int guarded(F &&f) {
    try {
        f();
        return OK;
    } catch (const faiss::FaissException &e) {
        return fail(e.what(), FAISS_EXCEPT);
    } catch (const std::exception &e) {
        return fail(e.what(), STD_EXCEPT);
    } catch (...) {
        return fail("Unknown error", UNKNOWN_EXCEPT);
    }
}

faiss::Index *idx(FaissIndex *p) {
    return reinterpret_cast<faiss::Index *>(p);
}
const faiss::Index *idx(const FaissIndex *p) {
    return reinterpret_cast<const faiss::Index *>(p);
}
FaissIndex *to_c(faiss::Index *p) {
    return reinterpret_cast<FaissIndex *>(p);
}
faiss::Clustering *clus(FaissClustering *p) {
    return reinterpret_cast<faiss::Clustering *>(p);
}
const faiss::Clustering *clus(const FaissClustering *p) {
    return reinterpret_cast<const faiss::Clustering *>(p);
}
faiss::IndexIVF *ivf(FaissIndexIVF *p) {
    return reinterpret_cast<faiss::IndexIVF *>(p);
}
const faiss::IndexIVF *ivf(const FaissIndexIVF *p) {
    return reinterpret_cast<const faiss::IndexIVF *>(p);
}
const faiss::ParameterSpace *space(const FaissParameterSpace *p) {
    return reinterpret_cast<const faiss::ParameterSpace *>(p);
}

} // namespace

extern "C" {

/* ---- errors ------------------------------------------------------------ */

const char *faiss_get_last_error() {
    return have_error ? last_error.c_str() : nullptr;
}

/* ---- clustering -------------------------------------------------------- */

void faiss_ClusteringParameters_init(FaissClusteringParameters *params) {
    faiss::ClusteringParameters d;
    params->niter = d.niter;
    params->nredo = d.nredo;
    params->verbose = d.verbose;
    params->spherical = d.spherical;
    params->int_centroids = d.int_centroids;
    params->update_index = d.update_index;
    params->frozen_centroids = d.frozen_centroids;
    params->min_points_per_centroid = d.min_points_per_centroid;
    params->max_points_per_centroid = d.max_points_per_centroid;
    params->seed = d.seed;
    params->decode_block_size = d.decode_block_size;
}

int faiss_Clustering_new(FaissClustering **p_clustering, int d, int k) {
    return guarded([&] {
        *p_clustering =
            reinterpret_cast<FaissClustering *>(new faiss::Clustering(d, k));
    });
}

int faiss_Clustering_new_with_params(FaissClustering **p_clustering, int d,
                                     int k,
                                     const FaissClusteringParameters *cp) {
    return guarded([&] {
        faiss::ClusteringParameters p;
        p.niter = cp->niter;
        p.nredo = cp->nredo;
        p.verbose = cp->verbose != 0;
        p.spherical = cp->spherical != 0;
        p.int_centroids = cp->int_centroids != 0;
        p.update_index = cp->update_index != 0;
        p.frozen_centroids = cp->frozen_centroids != 0;
        p.min_points_per_centroid = cp->min_points_per_centroid;
        p.max_points_per_centroid = cp->max_points_per_centroid;
        p.seed = cp->seed;
        p.decode_block_size = cp->decode_block_size;
        *p_clustering =
            reinterpret_cast<FaissClustering *>(new faiss::Clustering(d, k, p));
    });
}

int faiss_Clustering_train(FaissClustering *clustering, idx_t n, const float *x,
                           FaissIndex *index) {
    return guarded([&] { clus(clustering)->train(n, x, *idx(index)); });
}

void faiss_Clustering_centroids(FaissClustering *clustering, float **centroids,
                                size_t *size) {
    std::vector<float> &v = clus(clustering)->centroids;
    if (centroids)
        *centroids = v.data();
    if (size)
        *size = v.size();
}

void faiss_Clustering_iteration_stats(
    FaissClustering *clustering,
    FaissClusteringIterationStats **iteration_stats, size_t *size) {
    auto &v = clus(clustering)->iteration_stats;
    if (iteration_stats)
        *iteration_stats =
            reinterpret_cast<FaissClusteringIterationStats *>(v.data());
    if (size)
        *size = v.size();
}

float faiss_ClusteringIterationStats_obj(
    const FaissClusteringIterationStats *s) {
    return reinterpret_cast<const faiss::ClusteringIterationStats *>(s)->obj;
}

size_t faiss_Clustering_d(const FaissClustering *c) {
    return clus(c)->d;
}

size_t faiss_Clustering_k(const FaissClustering *c) {
    return clus(c)->k;
}

void faiss_Clustering_free(FaissClustering *clustering) {
    delete clus(clustering);
}

int faiss_kmeans_clustering(size_t d, size_t n, size_t k, const float *x,
                            float *centroids, float *q_error) {
    return guarded([&] {
        float e = faiss::kmeans_clustering(d, n, k, x, centroids);
        if (q_error)
            *q_error = e;
    });
}

/* ---- Index ------------------------------------------------------------- */

void faiss_Index_free(FaissIndex *obj) {
    delete idx(obj);
}

int faiss_Index_d(const FaissIndex *index) {
    return idx(index)->d;
}

int faiss_Index_is_trained(const FaissIndex *index) {
    return idx(index)->is_trained ? 1 : 0;
}

idx_t faiss_Index_ntotal(const FaissIndex *index) {
    return idx(index)->ntotal;
}

FaissMetricType faiss_Index_metric_type(const FaissIndex *index) {
    return static_cast<FaissMetricType>(idx(index)->metric_type);
}

int faiss_Index_verbose(const FaissIndex *index) {
    return idx(index)->verbose ? 1 : 0;
}

void faiss_Index_set_verbose(FaissIndex *index, int verbose) {
    idx(index)->verbose = verbose != 0;
}

int faiss_Index_train(FaissIndex *index, idx_t n, const float *x) {
    return guarded([&] { idx(index)->train(n, x); });
}

int faiss_Index_add(FaissIndex *index, idx_t n, const float *x) {
    return guarded([&] { idx(index)->add(n, x); });
}

int faiss_Index_add_with_ids(FaissIndex *index, idx_t n, const float *x,
                             const idx_t *xids) {
    return guarded([&] { idx(index)->add_with_ids(n, x, xids); });
}

int faiss_Index_search(const FaissIndex *index, idx_t n, const float *x,
                       idx_t k, float *distances, idx_t *labels) {
    return guarded([&] { idx(index)->search(n, x, k, distances, labels); });
}

int faiss_Index_assign(FaissIndex *index, idx_t n, const float *x,
                       idx_t *labels, idx_t k) {
    return guarded([&] { idx(index)->assign(n, x, labels, k); });
}

int faiss_Index_reset(FaissIndex *index) {
    return guarded([&] { idx(index)->reset(); });
}

int faiss_Index_reconstruct(const FaissIndex *index, idx_t key, float *recons) {
    return guarded([&] { idx(index)->reconstruct(key, recons); });
}

/* ---- flat indexes ------------------------------------------------------ */

int faiss_IndexFlat_new(FaissIndexFlat **p_index) {
    return guarded([&] { *p_index = to_c(new faiss::IndexFlat()); });
}

int faiss_IndexFlat_new_with(FaissIndexFlat **p_index, idx_t d,
                             FaissMetricType metric) {
    return guarded([&] {
        *p_index = to_c(
            new faiss::IndexFlat(d, static_cast<faiss::MetricType>(metric)));
    });
}

int faiss_IndexFlatIP_new(FaissIndexFlatIP **p_index) {
    return guarded([&] { *p_index = to_c(new faiss::IndexFlatIP()); });
}

int faiss_IndexFlatIP_new_with(FaissIndexFlatIP **p_index, idx_t d) {
    return guarded([&] { *p_index = to_c(new faiss::IndexFlatIP(d)); });
}

int faiss_IndexFlatL2_new(FaissIndexFlatL2 **p_index) {
    return guarded([&] { *p_index = to_c(new faiss::IndexFlatL2()); });
}

int faiss_IndexFlatL2_new_with(FaissIndexFlatL2 **p_index, idx_t d) {
    return guarded([&] { *p_index = to_c(new faiss::IndexFlatL2(d)); });
}

void faiss_IndexFlat_free(FaissIndexFlat *obj) {
    delete idx(obj);
}

void faiss_IndexFlatIP_free(FaissIndexFlatIP *obj) {
    delete idx(obj);
}

void faiss_IndexFlatL2_free(FaissIndexFlatL2 *obj) {
    delete idx(obj);
}

/* ---- IVF --------------------------------------------------------------- */

FaissIndexIVF *faiss_IndexIVF_cast(FaissIndex *index) {
    return to_c(dynamic_cast<faiss::IndexIVF *>(idx(index)));
}

void faiss_IndexIVF_free(FaissIndexIVF *obj) {
    delete idx(obj);
}

size_t faiss_IndexIVF_nlist(const FaissIndexIVF *index) {
    return ivf(index)->nlist;
}

size_t faiss_IndexIVF_nprobe(const FaissIndexIVF *index) {
    return ivf(index)->nprobe;
}

void faiss_IndexIVF_set_nprobe(FaissIndexIVF *index, size_t nprobe) {
    ivf(index)->nprobe = nprobe;
}

int faiss_IndexIVF_own_fields(const FaissIndexIVF *index) {
    return ivf(index)->own_fields ? 1 : 0;
}

void faiss_IndexIVF_set_own_fields(FaissIndexIVF *index, int own) {
    ivf(index)->own_fields = own != 0;
}

FaissIndexIVFFlat *faiss_IndexIVFFlat_cast(FaissIndex *index) {
    return to_c(dynamic_cast<faiss::IndexIVFFlat *>(idx(index)));
}

void faiss_IndexIVFFlat_free(FaissIndexIVFFlat *obj) {
    delete idx(obj);
}

size_t faiss_IndexIVFFlat_nlist(const FaissIndexIVFFlat *index) {
    return ivf(index)->nlist;
}

size_t faiss_IndexIVFFlat_nprobe(const FaissIndexIVFFlat *index) {
    return ivf(index)->nprobe;
}

void faiss_IndexIVFFlat_set_nprobe(FaissIndexIVFFlat *index, size_t nprobe) {
    ivf(index)->nprobe = nprobe;
}

int faiss_IndexIVFFlat_own_fields(const FaissIndexIVFFlat *index) {
    return ivf(index)->own_fields ? 1 : 0;
}

void faiss_IndexIVFFlat_set_own_fields(FaissIndexIVFFlat *index, int own) {
    ivf(index)->own_fields = own != 0;
}

int faiss_IndexIVFFlat_new(FaissIndexIVFFlat **p_index) {
    return guarded([&] { *p_index = to_c(new faiss::IndexIVFFlat()); });
}

int faiss_IndexIVFFlat_new_with(FaissIndexIVFFlat **p_index,
                                FaissIndex *quantizer, size_t d, size_t nlist) {
    return guarded([&] {
        *p_index = to_c(new faiss::IndexIVFFlat(idx(quantizer), d, nlist));
    });
}

int faiss_IndexIVFFlat_new_with_metric(FaissIndexIVFFlat **p_index,
                                       FaissIndex *quantizer, size_t d,
                                       size_t nlist, FaissMetricType metric) {
    return guarded([&] {
        *p_index = to_c(new faiss::IndexIVFFlat(
            idx(quantizer), d, nlist, static_cast<faiss::MetricType>(metric)));
    });
}

/* ---- index factory and parameter space --------------------------------- */

int faiss_index_factory(FaissIndex **p_index, int d, const char *description,
                        FaissMetricType metric) {
    return guarded([&] {
        *p_index = to_c(faiss::index_factory(
            d, description, static_cast<faiss::MetricType>(metric)));
    });
}

int faiss_ParameterSpace_new(FaissParameterSpace **p_space) {
    return guarded([&] {
        *p_space = reinterpret_cast<FaissParameterSpace *>(
            new faiss::ParameterSpace());
    });
}

void faiss_ParameterSpace_free(FaissParameterSpace *obj) {
    delete reinterpret_cast<faiss::ParameterSpace *>(obj);
}

int faiss_ParameterSpace_set_index_parameter(const FaissParameterSpace *s,
                                             FaissIndex *index,
                                             const char *name, double value) {
    return guarded(
        [&] { space(s)->set_index_parameter(idx(index), name, value); });
}

int faiss_ParameterSpace_set_index_parameters(const FaissParameterSpace *s,
                                              FaissIndex *index,
                                              const char *params) {
    return guarded([&] { space(s)->set_index_parameters(idx(index), params); });
}

/* ---- distance computation knobs ---------------------------------------- */

void faiss_set_distance_compute_blas_threshold(int value) {
    faiss::distance_compute_blas_threshold = value;
}

int faiss_get_distance_compute_blas_threshold() {
    return faiss::distance_compute_blas_threshold;
}

void faiss_set_distance_compute_blas_query_bs(int value) {
    faiss::distance_compute_blas_query_bs = value;
}

int faiss_get_distance_compute_blas_query_bs() {
    return faiss::distance_compute_blas_query_bs;
}

void faiss_set_distance_compute_blas_database_bs(int value) {
    faiss::distance_compute_blas_database_bs = value;
}

int faiss_get_distance_compute_blas_database_bs() {
    return faiss::distance_compute_blas_database_bs;
}

void faiss_fvec_renorm_L2(size_t d, size_t nx, float *x) {
    faiss::fvec_renorm_L2(d, nx, x);
}

} /* extern "C" */
