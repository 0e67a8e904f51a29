/*
 * hnsw_count.cpp: one FAISS HNSW search that counts its distance
 * computations, for the recall benchmark's "keys scanned" of HNSW.
 *
 * FAISS 1.7.3 (Debian) counts, in faiss::hnsw_stats, only the distances
 * computed on level 0 (in the field n3; ndis stays 0) and not those of the
 * greedy descent through the upper levels, which at 32K keys are a few
 * hundred: too many to leave out when the goal is ~2% of the keys. So this
 * runs the same search IndexHNSW::search runs for one query (HNSW::search
 * over the storage's distance computer, negated for inner product, with a
 * max-heap for the results) through a distance computer that counts every
 * call. The benchmark checks that the labels equal IndexHNSW::search's.
 *
 * C callers see one function; C++ exceptions stop here (returns -1).
 */
#include <faiss/IndexHNSW.h>
#include <faiss/MetricType.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/HNSW.h>
#include <faiss/utils/Heap.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace {

struct CountingDistance : faiss::DistanceComputer {
    faiss::DistanceComputer *inner = nullptr;
    bool negate = false; /* HNSW minimises: inner product is negated */
    uint64_t n = 0;

    void set_query(const float *x) override {
        inner->set_query(x);
    }
    float operator()(idx_t i) override {
        n++;
        float d = (*inner)(i);
        return negate ? -d : d;
    }
    float symmetric_dis(idx_t i, idx_t j) override {
        float d = inner->symmetric_dis(i, j);
        return negate ? -d : d;
    }
};

} // namespace

extern "C" int kvs__recall_hnsw_search(const void *index, const float *q, int k,
                                       int ef, int64_t *labels,
                                       uint64_t *ndis) {
    try {
        auto *h = dynamic_cast<const faiss::IndexHNSW *>(
            static_cast<const faiss::Index *>(index));
        if (!h || !h->storage)
            return -1;
        std::unique_ptr<faiss::DistanceComputer> dc(
            h->storage->get_distance_computer());
        CountingDistance c;
        c.inner = dc.get();
        c.negate = h->metric_type == faiss::METRIC_INNER_PRODUCT;
        faiss::VisitedTable vt((int)h->ntotal);
        faiss::SearchParametersHNSW p;
        p.efSearch = ef;
        std::vector<float> dist((size_t)k);
        auto *I = reinterpret_cast<faiss::Index::idx_t *>(labels);
        faiss::maxheap_heapify(k, dist.data(), I);
        c.set_query(q);
        h->hnsw.search(c, k, I, dist.data(), vt, &p);
        faiss::maxheap_reorder(k, dist.data(), I);
        *ndis = c.n;
        return 0;
    } catch (...) {
        return -1;
    }
}
