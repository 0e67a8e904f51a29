/*
 * kvstore.h: libkvstore, the in-process KV-cache vector store.
 *
 * An inference engine appends the key/value vectors of each layer as it
 * prefills and decodes; at each decode step it asks for the top-k keys of a
 * query (search) or for the attention output itself (attend), computed over a
 * wave index: segmented clusters of keys, a steady zone attended exactly, a
 * retrieval zone of the best clusters attended exactly and an estimation zone
 * approximated from cluster centroids. See docs/engine.md.
 *
 * Conventions (as in rocksdb/c.h and lmdb.h):
 * - Opaque handles only. Every function returns int: 0 on success, negative
 *   on failure (a KVS_E* code from kvs_common.h, or -errno). After a failure
 *   kvs_store_errmsg() gives a detailed message for the calling thread.
 * - Sequences are named by a caller-chosen 64-bit id.
 * - Key/value arrays are laid out [token][kv_head][head_dim] in the
 *   sequence's dtype; queries are [q_head][head_dim] fp32; outputs are
 *   caller-allocated with the sizes documented on each function.
 * - Positions are 0-based token indices within a (sequence, layer).
 * - With a data_dir, any call on a sequence may also fail with
 *   KVS_EQUARANTINED (its stored records are damaged; drop is allowed) or a
 *   storage error (KVS_EIO, KVS_ENOSPC; reads keep working).
 *
 * Thread-safety: a kvs_store_t may be used from any number of threads.
 * search/attend run concurrently on any sequences, also while another thread
 * appends to the same sequence (they see a consistent prefix). Appends to one
 * (sequence, layer) are serialised by the store. kvs_store_close() must not
 * race with other calls on the same store.
 */
#ifndef KVSTORE_H
#define KVSTORE_H

#include "kvs_common.h"

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvs_store_s kvs_store_t;

/* Limits enforced on every geometry. */
#define KVS_MAX_LAYERS 1024
#define KVS_MAX_HEADS 1024
#define KVS_MAX_HEAD_DIM 1024

/* The model shape of one sequence. */
typedef struct kvs_geometry_s {
    uint32_t n_layers;
    uint32_t n_q_heads; /* query heads; a multiple of n_kv_heads (GQA;
                           any ratio, multi-query too: beyond 16 per KV
                           head the CPU attends them 16 at a time, each
                           16 ranking keys for itself) */
    uint32_t n_kv_heads;
    uint32_t head_dim;
    kvs_dtype_t dtype; /* element type of appended keys/values */
} kvs_geometry_t;

/* Zero is DEFAULT in every enum here, so that a zero-filled params or
 * options struct means "the defaults" field by field. The numbers are not
 * stored on disk; on the wire proto/wire.c maps them (docs/protocol.md). */
typedef enum kvs_mode_e {
    /* The store's default (kvs_options_t.defaults.mode; WAVE unless set). */
    KVS_MODE_DEFAULT = 0,
    /* Tripartite attention over the wave index. */
    KVS_MODE_WAVE = 1,
    /* Every key, accumulated in double: the reference (slow). */
    KVS_MODE_EXACT = 2,
    /* Every key with the fp32 SIMD kernels: full attention as a decoder
     * would compute it; the speed baseline of the benchmarks. For search,
     * the same as EXACT. */
    KVS_MODE_FULL = 3,
} kvs_mode_t;

typedef enum kvs_budget_e {
    /* The store's default (kvs_options_t.defaults.budget; FIXED unless
     * set). */
    KVS_BUDGET_DEFAULT = 0,
    /* Retrieval and estimation zones are fixed fractions of the clusters. */
    KVS_BUDGET_FIXED = 1,
    /* Retrieval clusters are added until the estimated attention mass left
     * outside the steady and retrieval zones is below epsilon; the
     * estimation zone is then the next estimation_fraction of clusters. */
    KVS_BUDGET_BOUNDED = 2,
} kvs_budget_t;

/* How one search/attend call sizes its zones. Zero-initialised fields take
 * the store's defaults (kvs_options_t.defaults): a zero-filled struct is the
 * same as passing NULL. The three zone numbers go together: when all three
 * are 0 all three come from the defaults, else each is taken as given. */
typedef struct kvs_query_params_s {
    kvs_mode_t mode;
    kvs_budget_t budget;
    float retrieval_fraction;  /* of the clusters; default 0.018 */
    float estimation_fraction; /* of the clusters; default 0.5 */
    float epsilon;             /* bounded mode; default 0.02 */
    float scale;               /* softmax scale; 0 = 1/sqrt(head_dim) */
    /* How keys are ranked (kvs_rank_t in kvs_common.h). DEFAULT: the
     * store's default, whose own DEFAULT is codes where a head's segments
     * have them (centroid for the bounded budget). KVS_RANK_CODES on a
     * head whose segments lack codes (segments stored before codes
     * existed) fails with KVS_EINVAL, as does KVS_RANK_CODES with the
     * bounded budget (it is judged on centroid mass). The GPU path serves
     * KVS_RANK_CENTROID only: on a store whose GPU path is usable, DEFAULT
     * means centroid there; an explicit KVS_RANK_CODES runs on the CPU and
     * counts in gpu_fallbacks. */
    kvs_rank_t rank;
} kvs_query_params_t;

/* kvs_options_t.cuda_kv */
#define KVS_CUDA_KV_AUTO 0
#define KVS_CUDA_KV_HOST 1

/* When an append to a persistent store is acknowledged. */
typedef enum kvs_sync_e {
    KVS_SYNC_DEFAULT = 0, /* KVS_SYNC_BATCH */
    KVS_SYNC_BATCH = 1,   /* group commit: appends return after an fsync
                             of the WAL that covers them; one fsync serves
                             every append made while the previous one ran,
                             at most one per sync_interval_ms */
    KVS_SYNC_ALWAYS = 2,  /* fsync of the WAL before each append returns */
    KVS_SYNC_NONE = 3,    /* written to the WAL, not fsynced: survives a
                             process crash, not a power loss */
    KVS_SYNC_ASYNC = 4,   /* write-behind: an append returns once it is in
                             memory and queued; one background writer per
                             store writes the queue in order, in
                             WriteBatches of ~8 MiB, each with an fsync of
                             the WAL. A crash loses a suffix of the
                             acknowledged appends, never anything before
                             the last completed kvs_store_flush /
                             kvs_seq_flush, nor anything through the
                             persisted_seqno stats reported.
                             Creates, drops, forks and TTL changes still
                             return once durable (after every append queued
                             before them). docs/persistence.md */
} kvs_sync_t;

/* How kvs_store_open reads a data directory (kvs_options_t.load). */
typedef enum kvs_load_e {
    KVS_LOAD_DEFAULT = 0, /* KVS_LOAD_WARM */
    /* Lazy: the open reads the sequence table and, per (layer, KV head),
     * the last stored record (its token count), not the K/V and index
     * records: a sequence's records are read and their checksums checked
     * on its first use, as an evicted sequence is paged in (under the
     * same locks and memory_bytes). A block found damaged then
     * quarantines that sequence only, and the call that found it gets
     * KVS_ECORRUPT naming it. WARM adds one background thread that reads
     * every sequence so, in id order, while they fit memory_bytes beside
     * what is resident (it never evicts); calls are served meanwhile. */
    KVS_LOAD_WARM = 1,
    KVS_LOAD_LAZY = 2, /* lazy, without the warm-up: first use only */
    /* Every record read and checked before the open returns (as before
     * issue 14): damage is quarantined at open; an open of N bytes of
     * K/V reads N bytes. */
    KVS_LOAD_EAGER = 3,
} kvs_load_t;

/* Levels of the messages a store gives its log callback (most severe
 * first). */
typedef enum kvs_log_level_e {
    KVS_LOG_ERROR = 0, /* data or work lost: a quarantined sequence, a
                          failed index build or segment write */
    KVS_LOG_WARN = 1,  /* degraded: the GPU path unavailable or failing */
    KVS_LOG_INFO = 2,  /* expected events: a TTL expiry, a GPU profile */
    KVS_LOG_DEBUG = 3,
} kvs_log_level_t;

/*
 * Log callback (kvs_options_t.log): `msg` is one line without a trailing
 * newline, valid during the call only. Called from any of the store's
 * threads (builders, housekeeping, the caller's), possibly concurrently;
 * it must not call into the store.
 */
typedef void (*kvs_log_fn)(void *ctx, int level, const char *msg);

/* Store-wide options. Initialise with kvs_options_default(). */
typedef struct kvs_options_s {
    /* Data directory of the RocksDB database; NULL keeps everything in
     * memory. Opening a directory reloads its sequences and built index
     * segments (no k-means is re-run). */
    const char *data_dir;
    kvs_sync_t sync;
    uint32_t sync_interval_ms; /* KVS_SYNC_BATCH; default 2 */
    /* KVS_SYNC_ASYNC: most bytes queued for the disk and not yet written
     * (the lag a crash can lose). An append that would go past it waits
     * for the writer, never dropped; one larger than it alone is queued
     * once the queue is empty. 0: default 256 MiB. */
    uint64_t max_unpersisted_bytes;
    /* RAM for K/V and index of all sequences (0: unlimited). Over it, the
     * least recently used sequences are evicted to storage only and paged
     * back in on their next use. Needs a data_dir. */
    uint64_t memory_bytes;
    uint32_t n_threads;       /* attend/search workers; 0 = online CPUs */
    uint32_t n_build_threads; /* background index builders; 0 = 1 */
    /* Most sequences the store holds; a create or fork past it fails with
     * KVS_ETOOBIG. 0 (default): no limit but memory_bytes. Each sequence
     * costs bookkeeping in RAM even when empty or evicted (about 72 bytes
     * per (layer, KV head) plus 200 per layer): that is counted in
     * resident_bytes, and with memory_bytes set a create or fork whose
     * bookkeeping would not fit in it fails with KVS_ENOMEM. */
    uint64_t max_sequences;
    /* OpenBLAS threads, set process-wide at open (0: leave as is). Index
     * builds run sgemm; with several builders, 1 here lets each build own
     * a core instead of all of them queueing on one BLAS thread pool
     * (2 builders x 1 BLAS thread build ~50% more keys/s than 1 x 2 on 2
     * cores). It also applies to any other OpenBLAS user in the process. */
    uint32_t blas_threads;
    /* Wave index. */
    /* Keys per segment; default 256 (1024 from issue 13 to 2026-12-07,
     * 8192 before: a data directory made then opens only with the
     * segment_tokens it was made with; kvs_store_open says which). */
    uint32_t segment_tokens;
    uint32_t cluster_tokens; /* mean keys per cluster; default 16 */
    uint32_t kmeans_iters;   /* spherical k-means iterations; default 10 */
    uint32_t sink_tokens;    /* first tokens always exact; default 4 */
    uint32_t window_tokens;  /* last indexed tokens always exact; 64 */
    /* For fields a call leaves 0. Its own DEFAULT mode and budget mean
     * WAVE and FIXED, and all three zone numbers 0 mean 0.018 / 0.5 /
     * 0.02. */
    kvs_query_params_t defaults;
    /* GPU attend path (docs/gpu.md). With a CUDA device ordinal here, a
     * build with CUDA and that device present (sm_90), wave-mode attends
     * with a fixed budget on F16/BF16 sequences of head_dim 128 run on the
     * GPU through a wave buffer per (sequence, layer): index and steady
     * zone in GPU memory, keys/values in pinned host memory with a GPU
     * cache of cluster pages. Everything else, and every store without a
     * usable GPU, runs on the CPU with the same results within fp32
     * rounding; kvs_store_gpu_info() says which path serves. -1 (default):
     * CPU only. */
    int32_t cuda_device;
    float cuda_cache_fraction; /* cache slots per head, as a fraction of
                                  its clusters; default 0.1 */
    /* GPU memory for all layers' buffers; 0: no limit. A layer that
     * would go over it (or finds the GPU out of memory) makes room by
     * evicting the least recently attended layers' buffers (they are
     * uploaded again at their next attend; gpu_mirrors_evicted counts
     * them); a layer larger than the whole budget stays on the CPU. */
    uint64_t cuda_memory_bytes;
    /* Where a GPU-served layer keeps its keys/values: KVS_CUDA_KV_AUTO
     * (default) in GPU memory while those of all such layers fit half the
     * memory free at open (half of cuda_memory_bytes when set), else in
     * pinned host memory behind the GPU cache; KVS_CUDA_KV_HOST always the
     * latter (long contexts offloaded, GPU memory left to the model). */
    int32_t cuda_kv;
    /* 1 (default): with a usable GPU, index segments are clustered there
     * (the same k-means, finished on the CPU; builds differ from the CPU's
     * in detail, not in quality); 0: on the CPU. */
    int32_t cuda_build;
    /* 1: time the host side of GPU attends per phase and give the means to
     * the log callback (KVS_LOG_INFO) at close; 0 (default): off. */
    int32_t cuda_profile;
    /* Where the store reports what no call returns: sequences quarantined
     * at open or page-in, failed background builds and segment writes, TTL
     * expiries, a GPU path that is unavailable. NULL (default): nothing is
     * reported; the library never prints. log_ctx is passed back as is. */
    kvs_log_fn log;
    void *log_ctx;
    /* 1: every search and attend first waits until its layer has no index
     * build queued or running, so the index a call sees, and so its answer,
     * depends only on the tokens appended before it, never on how fast the
     * background builders ran: the same appends and queries give the same
     * outputs on every run (benchmarks and tests use it). A call that comes
     * right after an append completing a segment then waits for that
     * segment's k-means. 0 (default): calls never wait; a segment becomes
     * visible when its build finishes, and until then its keys are served
     * exactly from the tail (same accuracy or better, timing-dependent). */
    int32_t deterministic;
    /* How an open reads the data directory: KVS_LOAD_WARM (default),
     * KVS_LOAD_LAZY or KVS_LOAD_EAGER (see kvs_load_t). */
    kvs_load_t load;
    /* Per-head budgets (kvs_seq_observe_queries): query groups kept per
     * (sequence, layer, KV head) in a seeded reservoir of the queries
     * observed and, once a sequence was observed, of its wave attends';
     * 0: 16; at most
     * KVS_OBSERVE_SAMPLES_MAX; < 0: off (nothing kept, every head takes
     * the call's budget). The reservoirs cost observe_samples x
     * (n_q_heads / n_kv_heads) x head_dim x 4 bytes per (layer, KV head)
     * that has seen a query, counted in resident_bytes for as long as the
     * sequence exists (eviction keeps them, like its bookkeeping). */
    int32_t observe_samples;
} kvs_options_t;

#define KVS_OBSERVE_SAMPLES_MAX 4096
/* Most query tokens one kvs_seq_observe_queries call takes. */
#define KVS_OBSERVE_MAX 65536u

/* Fill `opts` with the defaults above. */
void kvs_options_default(kvs_options_t *opts);
/* Fill `params` with wave mode, fixed budget and the default fractions
 * (explicit values: they do not follow a store's own defaults, a
 * zero-filled struct does). */
void kvs_query_params_default(kvs_query_params_t *params);

/*
 * Open a store. `opts` may be NULL for all defaults; it is copied (data_dir
 * too). On success *out is a store to release with kvs_store_close().
 * With a data_dir, every sequence stored there comes back; a sequence whose
 * records fail their checksums or do not fit together is *quarantined*
 * (listed, refused with KVS_EQUARANTINED, droppable) and the others serve.
 * How much is read before the open returns is opts->load (kvs_load_t):
 * by default the records are read on first use or by a warm-up thread,
 * and damage found then quarantines as at open.
 * Errors: KVS_EINVAL (bad option, message says which), KVS_ENOMEM,
 * KVS_ELOCKED (another process has the directory open), KVS_EIO,
 * KVS_ECORRUPT (the database's own files are damaged or missing: the
 * message names the file, and no file of the directory is removed).
 * kvs_store_open_error() gives the message of the last failed open on this
 * thread (there is no store to ask).
 */
int kvs_store_open(const kvs_options_t *opts, kvs_store_t **out);
/* Stop background builds, release every sequence and the store. NULL is a
 * no-op. The store is released whatever the result: 0, or the first write
 * error the store met while open (KVS_ENOSPC: the disk filled up; KVS_EIO),
 * so that a daemon can exit with a failure status. Acknowledged data is
 * durable either way. */
int kvs_store_close(kvs_store_t *store);
/* Message of this thread's last failed kvs_store_open ("" if none). */
const char *kvs_store_open_error(void);

/* The detailed message of the calling thread's last failed call on `store`
 * ("" when there is none). Valid until this thread's next call on it. */
const char *kvs_store_errmsg(const kvs_store_t *store);

/*
 * Create an empty sequence `seq` with geometry `geo`.
 * Errors: KVS_EEXIST, KVS_EINVAL (geometry out of the limits above, or
 * n_q_heads not a multiple of n_kv_heads), KVS_ENOMEM.
 */
int kvs_seq_create(kvs_store_t *store, uint64_t seq, const kvs_geometry_t *geo);

/*
 * Append `n_tokens` tokens to `layer` of `seq`. `keys` and `values` each hold
 * n_tokens * n_kv_heads * head_dim elements of the sequence dtype, laid out
 * [token][kv_head][head_dim]; they are copied before return. Index segments
 * are built in the background: append never waits for k-means.
 * Errors: KVS_ENOSEQ, KVS_ERANGE (layer), KVS_EINVAL (NULL, zero tokens),
 * KVS_ENOTFINITE (NaN/Inf anywhere; nothing is appended), KVS_ENOMEM.
 */
int kvs_seq_append(kvs_store_t *store, uint64_t seq, uint32_t layer,
                   uint32_t n_tokens, const void *keys, const void *values);

/*
 * Top-k keys of `layer` for each query head. `queries` is [n_q_heads]
 * [head_dim] fp32. Outputs are [n_q_heads][k]: `positions` token positions,
 * `scores` raw dot products q.k (unscaled), best first. `params` may be NULL
 * (store defaults); with mode WAVE only the steady zone and the retrieval
 * zone are scanned (per query head, clusters ranked by q.c).
 * Errors: KVS_ENOSEQ, KVS_ERANGE (layer, or k > tokens in the layer or k 0),
 * KVS_EINVAL, KVS_ENOTFINITE.
 */
int kvs_seq_search(kvs_store_t *store, uint64_t seq, uint32_t layer,
                   const float *queries, uint32_t k,
                   const kvs_query_params_t *params, int64_t *positions,
                   float *scores);

/* What one attend call did, summed over KV heads. */
typedef struct kvs_attend_stats_s {
    uint64_t keys_total;  /* tokens in the layer x n_kv_heads (x the
                             groups of 16 query heads a KV head's are
                             attended in, beyond 16: each counts as one) */
    uint64_t keys_exact;  /* keys attended exactly (steady+retrieval) */
    uint64_t keys_steady; /* of which in the steady zone */
    uint64_t clusters_total;
    uint64_t clusters_retrieved; /* attended exactly over their members */
    uint64_t clusters_estimated; /* attended as one pseudo-token each */
    uint64_t clusters_skipped;
    double seconds; /* wall time of the call */
} kvs_attend_stats_t;

/*
 * Attention output of `layer` for each query head: softmax(scale * q.K) V
 * over every token appended so far. `queries` is [n_q_heads][head_dim] fp32;
 * `out` receives [n_q_heads][head_dim] fp32. `stats` may be NULL.
 * Errors: KVS_ENOSEQ, KVS_ERANGE (layer; or the layer is empty),
 * KVS_EINVAL, KVS_ENOTFINITE.
 */
int kvs_seq_attend(kvs_store_t *store, uint64_t seq, uint32_t layer,
                   const float *queries, const kvs_query_params_t *params,
                   float *out, kvs_attend_stats_t *stats);

/*
 * One decode step of a batch: kvs_seq_attend of `layer` for n sequences
 * at once, run in parallel on the store's threads (each sequence's heads
 * too). queries is [n][n_q_heads][head_dim] fp32 and out the same; every
 * sequence must have n_q_heads x head_dim == row_floats (else
 * KVS_EGEOMETRY for it), and appear once (else KVS_EINVAL for the call:
 * two rows of one sequence would answer in scheduling order). Each
 * sequence's answer is what kvs_seq_attend gives it alone. rcs (may be NULL)
 * gets each sequence's code, stats (may be NULL) [n] its counts; a failed
 * sequence's out row is unspecified, the others are computed. Returns 0 when
 * every sequence succeeded, else the code of the first that failed
 * (kvs_store_errmsg names it).
 */
int kvs_seq_attend_batch(kvs_store_t *store, uint32_t n, const uint64_t *seqs,
                         uint32_t layer, const float *queries,
                         size_t row_floats, const kvs_query_params_t *params,
                         float *out, int *rcs, kvs_attend_stats_t *stats);

/*
 * kvs_seq_attend for an engine whose tensors live on the GPU: `queries` and
 * `out`, n floats each (n_q_heads x head_dim, else KVS_EGEOMETRY), are in
 * the memory of the store's CUDA device (kvs_options_t.cuda_device), e.g.
 * a CUDA tensor's data. The call first waits for the work queued on that
 * device's legacy default stream (a DLPack consumer gets a producer's
 * pending writes there by asking for `__dlpack__(stream=1)`), then copies
 * the queries to the host (validation, per-head budgets and any CPU path
 * read them: 4n bytes); it returns once `out` is written. Where
 * kvs_seq_attend would run on the GPU, the step reads `queries` and writes
 * `out` in place; elsewhere (exact mode, codes ranking, ...) the CPU
 * computes it and `out` is copied up. The same answers as kvs_seq_attend.
 * The calling thread's current CUDA device is left as it was. Errors:
 * those of kvs_seq_attend; KVS_ENOTSUP when the store has no GPU (no CUDA
 * in the build, no cuda_device, or the device was unusable at open:
 * kvs_store_gpu_info says which); KVS_EINVAL when a pointer is not memory
 * of that device; KVS_EIO when a copy fails.
 */
int kvs_seq_attend_device(kvs_store_t *store, uint64_t seq, uint32_t layer,
                          const float *queries, size_t n,
                          const kvs_query_params_t *params, float *out,
                          kvs_attend_stats_t *stats);

/*
 * Show the store queries the decoder makes at `layer` of `seq`, so that it
 * sizes each KV head's budget for them (per-head budgets): `queries` is
 * [n][n_q_heads][head_dim] fp32, the layout of kvs_seq_attend's queries
 * for n tokens (e.g. a sample of the prefill's queries, every k-th
 * position). Each token's query group of KV head h goes into that head's
 * reservoir (options.observe_samples, seeded: the same calls in the same
 * order keep the same sample), which the sequence's wave attends feed too
 * from the first observation on (a sequence never observed keeps the
 * call's budget for every head, as before). At the layer's next wave
 * attend, and again whenever its index grows, the sample calibrates per
 * (layer, KV head) multiples (0.25 .. 4) of the call's retrieval budget:
 * each head's own wave attend is measured against full attention on the
 * sample at every multiple, and the multiples that minimise the sum of
 * the errors of all the sequence's calibrated heads, with their mean at
 * most 1 (the same keys in all), are applied to wave attends with the
 * fixed budget that rank by codes (the default on the CPU) with a
 * retrieval_fraction of at most 1/4 (so no head's share is cut at all its
 * keys); search, the bounded budget, the centroid ranking, the GPU path
 * and larger fractions take the call's budget as is. Calibration runs
 * inside the attend that finds the sample or the index changed (13 wave
 * attends and one full attend per sample and KV head: once per segment
 * built, not per step). Nothing is stored on disk; a fork starts without
 * observations. The queries are copied before return. With
 * observe_samples < 0 the call validates and keeps nothing.
 * Errors: KVS_ENOSEQ, KVS_ERANGE (layer), KVS_EINVAL (NULL, n 0),
 * KVS_ETOOBIG (n > KVS_OBSERVE_MAX), KVS_ENOTFINITE, KVS_ENOMEM.
 */
int kvs_seq_observe_queries(kvs_store_t *store, uint64_t seq, uint32_t layer,
                            uint32_t n, const float *queries);

/*
 * Copy tokens pos .. pos+n of `layer` out, in the append layout
 * ([n][n_kv_heads][head_dim], sequence dtype) into `keys` and `values` (each
 * n * n_kv_heads * head_dim elements; either may be NULL). For dumps and
 * verification, not for the decode path (indexed rows are gathered from
 * cluster order). Errors: KVS_ENOSEQ, KVS_ERANGE (layer, or the range is
 * past the tokens held), KVS_EINVAL.
 */
int kvs_seq_read(kvs_store_t *store, uint64_t seq, uint32_t layer, uint64_t pos,
                 uint32_t n, void *keys, void *values);

/*
 * Fork: create `child` holding the first `at_token` tokens of every layer of
 * `parent`. Built segments wholly below at_token are shared in memory (copy
 * on write: nothing is copied until the child diverges; the child's own
 * appends go to its own tail); the few rows past the last shared segment are
 * copied. Parent and child are independent afterwards: dropping either
 * keeps the other intact. With a data_dir the child is stored in full
 * (shared segments are written again under the child's id).
 * Errors: KVS_ENOSEQ (parent), KVS_EEXIST (child), KVS_ERANGE (at_token
 * past the tokens of some layer), KVS_ENOMEM, storage errors.
 */
int kvs_seq_fork(kvs_store_t *store, uint64_t parent, uint64_t at_token,
                 uint64_t child);

/*
 * Expire `seq` after `ttl_seconds` without an append, search, attend, read
 * or fork (0: never, the default). Expired sequences are dropped by the
 * store's housekeeping thread (every second) or by kvs_store_expire(). The
 * TTL is stored with the sequence; after a restart the idle clock starts
 * again. Errors: KVS_ENOSEQ, storage errors.
 */
int kvs_seq_set_ttl(kvs_store_t *store, uint64_t seq, uint32_t ttl_seconds);

/* Drop every sequence whose TTL has run out now; *n_expired (may be NULL)
 * receives how many. */
int kvs_store_expire(kvs_store_t *store, uint64_t *n_expired);

/* Drop `seq` and everything it holds, in memory and in storage. Searches
 * and attends already running on it complete on the data they hold;
 * appends not yet stored are refused with KVS_ENOSEQ. Errors: KVS_ENOSEQ,
 * storage errors. */
int kvs_seq_drop(kvs_store_t *store, uint64_t seq);

/* What a sequence holds. */
typedef struct kvs_seq_info_s {
    kvs_geometry_t geometry;
    uint64_t tokens_min;     /* fewest tokens over its layers */
    uint64_t tokens_max;     /* most tokens over its layers */
    uint64_t indexed_tokens; /* tokens in built segments, summed over layers */
    uint64_t segments;       /* built segments, summed over layers & kv heads */
    uint64_t builds_pending; /* segment builds queued or running */
    uint64_t bytes;          /* RAM held: raw K/V plus index */
    uint64_t index_bytes;    /* RAM held by the index beyond raw K/V */
    int resident;            /* 0: evicted to storage (counts above are of
                                what is in RAM) */
} kvs_seq_info_t;

/* Errors: KVS_ENOSEQ, KVS_EINVAL. Walks every layer: not for hot paths. */
int kvs_seq_info(kvs_store_t *store, uint64_t seq, kvs_seq_info_t *info);

/* The cheap subset for request validation on hot paths: the geometry, and
 * (when `layer_tokens` is not NULL) the tokens held by `layer`. Does not
 * page an evicted sequence in. Errors: KVS_ENOSEQ, KVS_ERANGE (layer),
 * KVS_EINVAL. */
int kvs_seq_shape(kvs_store_t *store, uint64_t seq, uint32_t layer,
                  kvs_geometry_t *geometry, uint64_t *layer_tokens);

/* Block until every segment build queued for `seq` has finished (or the
 * sequence is dropped). Errors: KVS_ENOSEQ. */
int kvs_seq_wait_indexed(kvs_store_t *store, uint64_t seq);

/*
 * Moving a sequence between stores (repair between kvstored nodes,
 * docs/cluster.md). kvs_seq_export writes the sequence's stored records as
 * a byte stream: its geometry and TTL, then per layer each KV head's built
 * segments (kvs_segment_encode) and its unindexed rows. A layer is read
 * under its lock, one layer at a time, so appends go on meanwhile; each
 * layer is exported as it was when read (its tokens then). Only segments
 * every head of a layer has built are sent as segments; rows past them go
 * as rows (the importer builds them as its own appends would).
 *
 * `fn` receives the stream in pieces of at most `max_chunk` bytes (>= 64),
 * in order, on the calling thread; a non-zero return stops the export and
 * is returned. Slices do not follow record boundaries: give the pieces to
 * kvs_seq_import_chunk in the same order. Errors: KVS_ENOSEQ,
 * KVS_EQUARANTINED, KVS_EINVAL, KVS_ENOMEM, storage errors (an evicted
 * sequence is paged in).
 */
typedef int (*kvs_export_fn)(void *ctx, const void *data, size_t len);
int kvs_seq_export(kvs_store_t *store, uint64_t seq, size_t max_chunk,
                   kvs_export_fn fn, void *ctx);

/* What an import did. */
typedef enum kvs_import_result_e {
    KVS_IMPORT_NONE = 0,
    KVS_IMPORT_INSTALLED, /* the store had no sequence of that id */
    KVS_IMPORT_REPLACED,  /* it had an older copy: replaced */
    KVS_IMPORT_CURRENT    /* it holds this copy already, or a longer one
                             extending it: nothing changed */
} kvs_import_result_t;

/*
 * Import an exported stream as sequence `seq`. begin allocates the import
 * (nothing is visible until end); chunk takes the stream's bytes in order,
 * in pieces of any size, checking every record (a CRC-32C each, then
 * geometry, order, positions; segments through kvs_segment_decode) and
 * keeping it in memory; end installs the sequence and frees the import;
 * abort frees it without installing. After a failed chunk only abort is
 * allowed.
 *
 * The ownership rule: a sequence that already exists under `seq` is
 * replaced only by a copy that extends it: the same geometry, for every
 * layer at least as many tokens, and the same keys and values at every
 * position the existing copy holds (compared byte for byte). An append
 * that reached the existing copy is therefore never undone by an import.
 * A copy that the existing one extends (or equals) changes nothing
 * (KVS_IMPORT_CURRENT). Anything else is a conflict (KVS_ECONFLICT) and
 * both copies stay as they are. The check and the replacement happen with
 * the existing copy's appends held; an append that came between the
 * comparison and that point makes end return KVS_EBUSY (try again).
 *
 * Stores must agree on segment_tokens, sink_tokens and window_tokens (the
 * stream says which it was cut with; KVS_EINVAL otherwise). Errors of
 * chunk: KVS_EPROTO (malformed or out of order), KVS_ECORRUPT (a checksum
 * or segment fails), KVS_ETOOBIG (a record over 64 MiB), KVS_EINVAL,
 * KVS_ENOMEM. Of end: KVS_EPROTO (the stream stopped early), KVS_ECONFLICT,
 * KVS_EBUSY, KVS_EQUARANTINED (the existing copy), KVS_ETOOBIG / KVS_ENOMEM
 * (max_sequences, memory_bytes), storage errors. Thread-safety: one import
 * is used by one thread at a time; imports of different ids run in
 * parallel.
 */
typedef struct kvs_import_s kvs_import_t;
int kvs_seq_import_begin(kvs_store_t *store, uint64_t seq, kvs_import_t **out);
int kvs_seq_import_chunk(kvs_import_t *im, const void *data, size_t len);
int kvs_seq_import_end(kvs_import_t *im, kvs_import_result_t *result);
void kvs_seq_import_abort(kvs_import_t *im);

/*
 * Drop `seq` only if no layer holds more than `max_tokens` tokens, checked
 * with the sequence's appends held, so that no append lands between the
 * check and the drop (repair drops a copy past R this way once the nodes
 * that keep it hold at least as much). Errors: KVS_ENOSEQ, KVS_EBUSY (a
 * layer holds more: kept), storage errors.
 */
int kvs_seq_drop_if_covered(kvs_store_t *store, uint64_t seq,
                            uint64_t max_tokens);

/* Store-wide counters. */
typedef struct kvs_store_stats_s {
    uint64_t sequences;
    uint64_t bytes; /* RAM held by all sequences */
    uint64_t index_bytes;
    uint64_t disk_bytes;     /* files in data_dir (0 without one) */
    uint64_t quarantined;    /* sequences refused after damage */
    uint64_t expired;        /* sequences dropped by their TTL */
    uint64_t resident_bytes; /* K/V + index bytes counted against
                                memory_bytes */
    uint64_t evictions;      /* sequences evicted to storage */
    uint64_t page_ins;       /* evicted sequences paged back in */
    uint64_t builds_pending;
    uint64_t builds_done;
    uint64_t build_keys;  /* keys clustered by finished builds */
    double build_seconds; /* wall time spent in finished builds */
    /* GPU attend path (all 0, gpu_device -1, without one). */
    int32_t gpu_device;
    uint64_t gpu_attends;      /* attend calls served on the GPU */
    uint64_t gpu_fallbacks;    /* wave attends the GPU path did not take */
    uint64_t gpu_errors;       /* GPU failures (redone on the CPU) */
    uint64_t gpu_bytes;        /* GPU memory held by layer buffers */
    uint64_t gpu_pinned_bytes; /* pinned host memory held by them */
    uint64_t gpu_kv_bytes;     /* K/V held in GPU memory (KVS_CUDA_KV_AUTO) */
    uint64_t gpu_cache_lookups, gpu_cache_hits; /* retrieved clusters */
    uint64_t gpu_bus_bytes;       /* K/V read from host memory (cache misses) */
    uint64_t gpu_upload_bytes;    /* index and steady rows copied in */
    uint64_t gpu_builds;          /* segments clustered on the GPU */
    uint64_t gpu_build_errors;    /* GPU clusterings that failed (built on
                                     the CPU instead) */
    uint64_t gpu_mirrors_evicted; /* layer buffers given back (least
                                     recently used first) to make room
                                     under cuda_memory_bytes */
    /* Storage writes (appends, index segments, sequence metadata) are
     * numbered from 1 in the order the store makes them, per open. */
    uint64_t queued_seqno;      /* the last one made */
    uint64_t persisted_seqno;   /* every one up to it is durable */
    uint64_t unpersisted_bytes; /* KVS_SYNC_ASYNC: queued, not written */
    uint64_t unpersisted_waits; /* writes that waited for the lag bound */
} kvs_store_stats_t;

/* Errors: KVS_EINVAL. */
int kvs_store_stats(kvs_store_t *store, kvs_store_stats_t *stats);

/*
 * Barrier: return once every storage write the store made before the call
 * (every append acknowledged before it, of all sequences) is durable. With
 * KVS_SYNC_ASYNC it waits for the background writer; with KVS_SYNC_NONE it
 * fsyncs the WAL; BATCH and ALWAYS have nothing left to do; 0 without a
 * data_dir. Errors: KVS_EINVAL; the write error that made the store
 * read-only (KVS_ENOSPC, KVS_EIO), in which case what was queued is lost
 * (the log callback says how much). Thread-safe; appends may go on
 * meanwhile (those made after the call are not waited for).
 */
int kvs_store_flush(kvs_store_t *store);

/* kvs_store_flush for a caller that holds a sequence: KVS_ENOSEQ when
 * `seq_id` is unknown, else the same barrier (writes are ordered store-wide,
 * so it covers the other sequences' earlier appends too). */
int kvs_seq_flush(kvs_store_t *store, uint64_t seq_id);

/* Which path serves wave attends: "CUDA device 0: NVIDIA H100 80GB HBM3",
 * or "CPU (why)". Valid while the store is open. */
const char *kvs_store_gpu_info(const kvs_store_t *store);

/* Compact the data directory now, so that space of dropped sequences and
 * of rows replaced by index segments is reclaimed (RocksDB also does this
 * in the background over time). A no-op without a data_dir. */
int kvs_store_compact(kvs_store_t *store);

/*
 * List up to `cap` sequence ids into `ids` (any order); *n_out receives the
 * number of sequences in the store (may exceed cap).
 */
int kvs_store_list(kvs_store_t *store, uint64_t *ids, size_t cap,
                   size_t *n_out);

/*
 * Tuning profiles (docs/kvtune.md): apply the `key value` text file at
 * `path`, written by tools/kvtune, onto `opts` (initialise it first, e.g.
 * with kvs_options_default). It sets only the keys it lists, among
 * segment_tokens, cluster_tokens, kmeans_iters, sink_tokens,
 * window_tokens and defaults.{mode, budget, retrieval_fraction,
 * estimation_fraction, epsilon}; all or nothing: on failure `opts` is
 * unchanged. The first key must be `kvs_profile 1`; unknown keys, other
 * versions, repeated keys, bad or out-of-range values are refused.
 * `err` (may be NULL) receives a message naming the file and line.
 * Errors: KVS_EINVAL (bad profile), -errno (cannot open), KVS_EIO,
 * KVS_ENOMEM. Thread-safe (no shared state).
 */
int kvs_options_load_profile(kvs_options_t *opts, const char *path, char *err,
                             size_t errlen);
/* The same on `len` bytes of profile text in memory (need not be
 * NUL-terminated); `name` (may be NULL) stands for the file in messages. */
int kvs_options_parse_profile(kvs_options_t *opts, const char *name,
                              const char *text, size_t len, char *err,
                              size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* KVSTORE_H */
