/*
 * kvs_index.h: the wave index of one (sequence, layer, KV head).
 *
 * Keys arrive in token order. Once a run of `segment_tokens` keys is complete
 * it is built into a *segment*: the keys are centred on their mean, clustered
 * by spherical maximum-inner-product k-means (FAISS's algorithm, run on
 * cblas_sgemm: see docs/index.md for why), then every key is
 * assigned once more against all centroids and each centroid is set to the
 * plain mean of its members' raw keys. The segment stores its keys and values
 * cluster-ordered (cluster c is the contiguous slots offsets[c] ..
 * offsets[c+1]), the token position of every slot, and per cluster its
 * centroid, member count and value mean (value sum = mean x count; the mean
 * is what is stored because a sum of many fp16 values can overflow fp16).
 *
 * Keys not yet in a segment form the *tail*, attended exactly.
 *
 * The steady zone (first `sink_tokens` positions, last `window_tokens`
 * indexed positions, the tail) is attended exactly. Its indexed members also
 * sit inside clusters, so a segment carries two small *adjustment* tables
 * that give the count and value mean of each cluster with its steady members
 * left out: `adj_always` (sink positions, which are steady forever) and
 * `adj_last` (sinks plus the segment's last window_tokens positions, which
 * are steady while this is the newest segment).
 *
 * Functions here run on the calling thread (the builder's sgemm may use
 * OpenBLAS's own threads); the engine runs one KV head per worker. A built
 * segment is immutable and may be read from any number of threads.
 */
#ifndef KVS_INDEX_H
#define KVS_INDEX_H

#include "kvs_common.h"

#include <math.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Clusters whose steady members are left out (see above). Sorted by id. */
typedef struct kvs_cluster_adj_s {
    uint32_t n;        /* number of adjusted clusters */
    uint32_t *cluster; /* [n] cluster ids, ascending */
    uint32_t *count;   /* [n] members that are not steady (may be 0) */
    void *value_means; /* [n][d] dtype; mean over non-steady members
                          (zeros when count is 0) */
} kvs_cluster_adj_t;

/*
 * Compact codes of a segment for two-stage search (index/codes.c). They
 * have dc = kvs_codes_dim(d) dimensions: a key is padded with zeros to dc
 * (the 4-bit kernels work in blocks of 32 dims), then keys and centroids
 * are rotated by R = H diag(sign) / sqrt(dc) (H the Walsh-Hadamard matrix,
 * sign drawn from `seed` by splitmix64; dc a power of two, else the signs
 * alone), which spreads a few large channels over all dims, then
 * quantised per rotated dim: key x gets code_j = round((Rx_j - lo_j) /
 * step_j) in 0..15 (4 bits, kvs_code4_dot_rows layout), centroid c gets
 * 8-bit codes with its own clo/cstep. q.x is estimated as
 * Rq.lo + sum_j (Rq_j step_j) code_j. Built with the segment (its data,
 * nothing else), so codebooks follow the data.
 */
typedef struct kvs_codes_s {
    uint64_t seed;      /* rotation signs */
    float *lo, *step;   /* [dc] key codes: offset and step per rotated dim */
    float *clo, *cstep; /* [dc] centroid codes */
    uint8_t *keys;      /* [n_tokens][dc / 2] 4-bit codes, slot order */
    uint8_t *centroids; /* [n_clusters][dc] 8-bit codes */
    float *spread;      /* [n_clusters] RMS member distance to the centroid
                           over sqrt(d): the spread of q.x - q.c per unit
                           of |q| if residuals were isotropic */
} kvs_codes_t;

/* adj_flags bits: the cluster is listed in adj_always / adj_last. */
#define KVS_ADJ_ALWAYS 1u
#define KVS_ADJ_LAST 2u

typedef struct kvs_segment_s {
    kvs_dtype_t dtype;
    uint32_t d;          /* head_dim */
    uint64_t first_pos;  /* position of the segment's first token */
    uint32_t n_tokens;   /* positions first_pos .. first_pos + n_tokens */
    uint32_t n_clusters; /* non-empty clusters */
    uint32_t *offsets;   /* [n_clusters + 1] slot ranges, offsets[0] = 0 */
    uint32_t *positions; /* [n_tokens] slot -> position - first_pos */
    void *keys;          /* [n_tokens][d] dtype, cluster-ordered, raw */
    void *values;        /* [n_tokens][d] dtype, cluster-ordered, raw */
    void *centroids;     /* [n_clusters][d] dtype: mean of member keys */
    void *value_means;   /* [n_clusters][d] dtype: mean of member values */
    uint32_t *counts;    /* [n_clusters] members */
    uint8_t *adj_flags;  /* [n_clusters] KVS_ADJ_* bits */
    kvs_cluster_adj_t adj_always;
    kvs_cluster_adj_t adj_last;
    /* Owners beyond the first (forked sequences share segments); 0 from
     * the builder and the decoder. Managed by the engine with atomics. */
    int32_t extra_refs;
    /* Compact codes (NULL when kvs_codes_dim(d) is 0): built by both
     * builders, stored by segment_io.c (format 2), rebuilt from the keys
     * when a whole record without them is decoded or a segment without
     * them is made whole by kvs_segment_kv_attach. Freed by
     * kvs_segment_free. */
    kvs_codes_t *codes;
} kvs_segment_t;

/* How segments are built. */
typedef struct kvs_build_params_s {
    uint32_t cluster_tokens; /* mean members per cluster (16) */
    uint32_t kmeans_iters;   /* spherical k-means iterations (10) */
    uint32_t sink_tokens;    /* positions < sink_tokens are steady forever */
    uint32_t window_tokens;  /* last positions steady while segment is newest */
    uint64_t seed;           /* k-means seed; builds are deterministic */
} kvs_build_params_t;

/*
 * Build a segment from `n` keys/values in token order ([n][d] of `dtype`
 * each) whose first token is at position `first_pos`. The arrays are only
 * read. n_clusters = max(1, round(n / cluster_tokens)) before empty clusters
 * are dropped. On success *out is a segment to release with
 * kvs_segment_free(). `err` (may be NULL) receives a message on failure.
 * Errors: KVS_EINVAL (n == 0, d == 0, n <= window_tokens), KVS_ENOTFINITE
 * (NaN/Inf in the keys), KVS_ENOMEM.
 */
int kvs_segment_build(const kvs_build_params_t *params, kvs_dtype_t dtype,
                      uint32_t d, uint64_t first_pos, uint32_t n,
                      const void *keys, const void *values, kvs_segment_t **out,
                      char *err, size_t errlen);

/*
 * The second half of kvs_segment_build for a clustering made elsewhere
 * (the GPU k-means): label[i] < k is the cluster of token i. Empty
 * clusters are dropped, members sorted stably by cluster, centroids and
 * value means are the plain means of the members, the adjustment tables
 * are built. Errors as kvs_segment_build, KVS_EINVAL for a bad label.
 */
int kvs_segment_from_labels(const kvs_build_params_t *params, kvs_dtype_t dtype,
                            uint32_t d, uint64_t first_pos, uint32_t n,
                            const void *keys, const void *values, uint32_t k,
                            const uint32_t *label, kvs_segment_t **out,
                            char *err, size_t errlen);
/* Clusters k-means makes for n keys: max(1, round(n / cluster_tokens)). */
uint32_t kvs_segment_clusters(const kvs_build_params_t *params, uint32_t n);

void kvs_segment_free(kvs_segment_t *seg);

/* Head dims up to this get codes. */
#define KVS_CODES_MAX_D 1024

/* The dimensions of the codes of a head of d dims: d rounded up to a
 * multiple of 32, or 0 when such a head gets no codes (d < 32, where 4-bit
 * codes of 32 dims would be as large as 16-bit keys of 8 or 16, or d >
 * KVS_CODES_MAX_D). Every multiple of 32 is its own: the codes of heads
 * built before padding existed are unchanged. */
static inline uint32_t kvs_codes_dim(uint32_t d) {
    return d < 32 || d > KVS_CODES_MAX_D ? 0 : (d + 31) & ~31u;
}

/* The rotation seed of the codes the builders make (segments stored before
 * it carry their own; kvs_codes_t.seed is stored with each). */
#define KVS_CODES_SEED 0x6b7673636f646573ull

/* Build seg->codes from the segment's keys and centroids (replacing any);
 * deterministic in (keys, seed). A no-op returning 0 when
 * kvs_codes_dim(d) is 0. Errors: KVS_ENOMEM. Called by the builders and by
 * kvs_segment_decode for records written without codes. */
int kvs_segment_build_codes(kvs_segment_t *seg, uint64_t seed);
void kvs_codes_free(kvs_codes_t *codes);
/* Bytes held by codes of a segment of n tokens, C clusters, d dims. */
size_t kvs_codes_bytes(uint32_t n, uint32_t C, uint32_t d);
/* out = R x for the rotation of `codes`: x [d], out [kvs_codes_dim(d)]
 * (x padded with zeros); they may alias (then the buffer holds the
 * larger). */
void kvs_codes_rotate(const kvs_codes_t *codes, uint32_t d, const float *x,
                      float *out);

/* Serialisation for storage (index/segment_io.c): encode into a buffer of
 * kvs_segment_encoded_size() bytes; decode validates every invariant and
 * returns KVS_ECORRUPT (message in err) for a damaged record, KVS_ENOMEM. */
size_t kvs_segment_encoded_size(const kvs_segment_t *seg);
void kvs_segment_encode(const kvs_segment_t *seg, void *buf);
int kvs_segment_decode(const void *buf, size_t len, kvs_segment_t **out,
                       char *err, size_t errlen);

/* The same segment as a *metadata* record (everything ranking needs: no
 * keys, no values) plus K/V blocks of consecutive slots, stored apart so
 * that a store can read the one without the other. kvs_segment_decode
 * refuses a metadata record (the segments it gives are whole);
 * kvs_segment_meta_decode takes either kind and gives a segment with keys
 * and values NULL for a metadata record: it must not be searched, attended
 * or encoded until kvs_segment_kv_attach has been given blocks covering
 * slots 0 .. n_tokens in slot order. `*next` (0 before the first block) is
 * the slot the next block must start at; the segment is whole when it
 * equals n_tokens. A failed attach (KVS_ECORRUPT with a message: a block
 * that does not continue the segment or whose size disagrees; KVS_ENOMEM)
 * leaves *next as it was. */
size_t kvs_segment_meta_encoded_size(const kvs_segment_t *seg);
void kvs_segment_meta_encode(const kvs_segment_t *seg, void *buf);
int kvs_segment_meta_decode(const void *buf, size_t len, kvs_segment_t **out,
                            char *err, size_t errlen);
/* Block of slots slot0 .. slot0+n of a segment holding its K/V. */
size_t kvs_segment_kv_block_size(const kvs_segment_t *seg, uint32_t n);
void kvs_segment_kv_block_encode(const kvs_segment_t *seg, uint32_t slot0,
                                 uint32_t n, void *buf);
/* The same block as parts to write where they lie: its header into `hdr`
 * (KVS_SEGMENT_KV_BLOCK_HDR bytes), then keys and values of the slots,
 * which point into the segment. Concatenated they are the encoded block. */
#define KVS_SEGMENT_KV_BLOCK_HDR 16
void kvs_segment_kv_block_parts(const kvs_segment_t *seg, uint32_t slot0,
                                uint32_t n, void *hdr, const void **keys,
                                const void **values, size_t *len);
int kvs_segment_kv_attach(kvs_segment_t *seg, const void *buf, size_t len,
                          uint32_t *next, char *err, size_t errlen);

/* Bytes held by the segment beyond its raw keys and values. */
size_t kvs_segment_index_bytes(const kvs_segment_t *seg);
/* Bytes held in all (raw K/V plus index). */
size_t kvs_segment_bytes(const kvs_segment_t *seg);

/* Cluster c's count and value mean as seen by a query: with its steady
 * members left out when `is_last` (segment is the newest) or when sinks
 * fall inside it. Returns the count (0: nothing left to estimate). */
uint32_t kvs_segment_cluster_view(const kvs_segment_t *seg, uint32_t c,
                                  int is_last, const void **value_mean);

/* ------------------------------------------------------------------------ */
/* Search and attention over one KV head: segments plus tail.               */

/* A consistent snapshot of one KV head, borrowed for one call. */
typedef struct kvs_head_view_s {
    kvs_dtype_t dtype;
    uint32_t d;
    kvs_segment_t *const *segments; /* [n_segments], position order */
    uint32_t n_segments;
    uint64_t indexed_tokens; /* positions 0 .. indexed_tokens */
    const void *tail_keys;   /* [tail_tokens][d] dtype, token order */
    const void *tail_values;
    uint32_t tail_tokens; /* positions indexed_tokens .. + tail */
    uint32_t sink_tokens;
    uint32_t window_tokens;
} kvs_head_view_t;

/* Steady positions of a head: the sinks and the last window of indexed
 * tokens (tail positions, never inside a segment, are steady as well).
 * One definition for the CPU zones and the GPU mirror (engine/gpu.c). */
static inline int kvs_head_is_steady(const kvs_head_view_t *v, uint64_t pos) {
    uint64_t lo = v->indexed_tokens > v->window_tokens
                      ? v->indexed_tokens - v->window_tokens
                      : 0;
    return pos < v->sink_tokens || pos >= lo;
}

/* kvs_rank_t (how keys are ranked) is in kvs_common.h, shared with the
 * engine's API. */

/* Zone sizing for one call; see kvs_query_params_t in kvstore.h. */
typedef struct kvs_zone_params_s {
    int exact;   /* 1: ignore the index, attend every key */
    int precise; /* with exact: accumulate in double (the
                    reference); else fp32, the speed baseline */
    int bounded; /* 1: accuracy-bounded retrieval zone */
    float retrieval_fraction;
    float estimation_fraction;
    float epsilon;
    float scale;      /* softmax scale (> 0) */
    double scale_f64; /* the same in double, for precise mode
                         (0: use scale) */
} kvs_zone_params_t;

/* How keys are ranked (the *_ranked calls; NULL or all zeros: defaults).
 * Kept out of kvs_zone_params_t so that callers which fill that struct
 * field by field (the engine) get the defaults, never stray values. */
typedef struct kvs_rank_params_s {
    kvs_rank_t rank;
    float code_ratio;   /* keys scored by code per key read in full
                           (0: KVS_CODE_RATIO_DEFAULT) */
    float spread;       /* weight of the cluster spread in the order in
                           which the codes paths scan clusters:
                           q.c + spread |q| s_c (0: KVS_SPREAD_DEFAULT for
                           search, KVS_SPREAD_ATTEND_DEFAULT for attention;
                           < 0: none) */
    float budget_scale; /* the codes paths' R (keys read in full) is
                           retrieval_fraction x budget_scale of the indexed
                           keys, M follows; the engine's per-head budgets
                           (0: 1). The centroid paths ignore it, so the
                           GPU path, which serves them, stays the CPU's. */
} kvs_rank_params_t;

/* 16, not 4: the scan takes clusters in centroid order, and a key far
 * above its centroid's score is read only if its cluster is scanned. At 4
 * the 32K tinycode128 dump's median error was 0.84% against 0.52%, its
 * max 5.4% against 2.2%, and 8K greedy agreement fell to 0.986 (one key
 * holding half a late head's attention sat in the 97th of 512 clusters,
 * past the 40 scanned). */
#define KVS_CODE_RATIO_DEFAULT 16.0f
#define KVS_SPREAD_DEFAULT 1.0f
#define KVS_SPREAD_ATTEND_DEFAULT 2.0f

/* ceil(f C) of C clusters, at most C; 0 when f <= 0. */
static inline uint32_t kvs_zone_clusters(float f, uint32_t C) {
    if (f <= 0)
        return 0;
    double x = ceil((double)f * C);
    return x >= C ? C : (uint32_t)x;
}

/* Fixed-budget zone sizes over C clusters of which n_valid keep a member
 * in the query's view: retrieval ceil(rf C), estimation ceil(ef C), both
 * taken from the n_valid only. The rule of kvs_head_attend, of the GPU
 * select (kernels/cuda/score.cu) and of the GPU path's stats. */
static inline void kvs_zone_sizes(float rf, float ef, uint32_t C,
                                  uint32_t n_valid, uint32_t *R, uint32_t *E) {
    uint32_t r = kvs_zone_clusters(rf, C), e = kvs_zone_clusters(ef, C);
    r = r > n_valid ? n_valid : r;
    *R = r;
    *E = e > n_valid - r ? n_valid - r : e;
}

typedef struct kvs_zone_stats_s {
    uint64_t keys_total;
    uint64_t keys_exact;
    uint64_t keys_steady;
    uint64_t clusters_total;
    uint64_t clusters_retrieved;
    uint64_t clusters_estimated;
    uint64_t clusters_skipped;
    /* Search only: bytes the call read from the index and the keys
     * (centroids, per-cluster metadata, key codes, full keys and their
     * positions), and how many keys it scored from their codes. */
    uint64_t bytes_read;
    uint64_t keys_coded;
} kvs_zone_stats_t;

/* acc += x, every field. */
void kvs_zone_stats_add(kvs_zone_stats_t *acc, const kvs_zone_stats_t *x);

/* Per-thread scratch memory, grown on demand and reused between calls. */
typedef struct kvs_scratch_s kvs_scratch_t;
kvs_scratch_t *kvs_scratch_new(void);
void kvs_scratch_free(kvs_scratch_t *s);

/*
 * Attention for the `g` query heads of one GQA group over `view`.
 * q is [g][d] fp32; out receives [g][d]. Stats are added to *stats. A
 * group of more than KVS_KERNEL_MAX_Q heads (multi-query attention) is
 * attended as consecutive groups of at most that many, each ranking keys
 * for itself and adding its own stats (as one head's).
 * Errors: KVS_ENOMEM, KVS_EINVAL (g == 0, empty view).
 */
int kvs_head_attend(const kvs_head_view_t *view, const float *q, uint32_t g,
                    const kvs_zone_params_t *zp, kvs_scratch_t *scratch,
                    float *out, kvs_zone_stats_t *stats);
/* The same with how keys are ranked (rp NULL: defaults, as above).
 * KVS_EINVAL also when rp asks for codes the view's segments lack. */
int kvs_head_attend_ranked(const kvs_head_view_t *view, const float *q,
                           uint32_t g, const kvs_zone_params_t *zp,
                           const kvs_rank_params_t *rp, kvs_scratch_t *scratch,
                           float *out, kvs_zone_stats_t *stats);

/*
 * Top-k by q.k for one query over `view`: exact when zp->exact, else steady
 * zone plus retrieval-zone clusters ranked by q.c. positions/scores [k],
 * best first; when fewer than k keys are scanned the rest of positions is -1
 * and scores -INFINITY.
 */
int kvs_head_search(const kvs_head_view_t *view, const float *q, uint32_t k,
                    const kvs_zone_params_t *zp, kvs_scratch_t *scratch,
                    int64_t *positions, float *scores, kvs_zone_stats_t *stats);

/* The same for the `g` query heads of a GQA group at once (q [g][d],
 * positions/scores [g][k]): rows every query scans (steady zone, or all of
 * them in exact mode) and the centroids are read once for the group. Stats
 * count (query, key) pairs. Identical results to g single searches. */
int kvs_head_search_group(const kvs_head_view_t *view, const float *q,
                          uint32_t g, uint32_t k, const kvs_zone_params_t *zp,
                          kvs_scratch_t *scratch, int64_t *positions,
                          float *scores, kvs_zone_stats_t *stats);
/* The same with how keys are ranked (rp NULL: defaults). */
int kvs_head_search_group_ranked(const kvs_head_view_t *view, const float *q,
                                 uint32_t g, uint32_t k,
                                 const kvs_zone_params_t *zp,
                                 const kvs_rank_params_t *rp,
                                 kvs_scratch_t *scratch, int64_t *positions,
                                 float *scores, kvs_zone_stats_t *stats);

#ifdef __cplusplus
}
#endif
#endif /* KVS_INDEX_H */
