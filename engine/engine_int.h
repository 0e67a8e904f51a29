/*
 * engine_int.h: what the files of libkvstore's engine share (private to
 * engine/; nothing outside it includes this).
 *
 *   store.c      open/close, options, error messages, store statistics
 *   seq.c        the sequence table: create, drop, fork, TTL and expiry,
 *                info, list
 *   build.c      background index builds
 *   residency.c  loading a data directory (eagerly, or lazily with a
 *                warm-up thread), memory budget, eviction, page-in
 *   query.c      append, search, attend, read
 *   transfer.c   a sequence as a stream of its records (export), and the
 *                import of one (repair between kvstored nodes)
 *
 * A store holds sequences in a hash table keyed by id. A sequence has one
 * layer_t per model layer, each guarded by a reader-writer lock and holding
 * one head_t per KV head: that head's built segments (immutable, from
 * index/) and its unindexed tail in token order.
 */
#ifndef KVS_ENGINE_INT_H
#define KVS_ENGINE_INT_H

#include "kvstore.h"

#include "gpu_int.h"
#include "persist_int.h"
#include "pool_int.h"
#include "kvs_index.h"
#include "kvs_kernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------- */
/* Locks                                                                  */

/*
 * The lock order, first to last. A thread takes a lock only when every lock
 * it holds comes earlier in this list; two locks of one rank (a sequence's
 * append_mus, its layer rwlocks) only in increasing layer order.
 *
 *   1 meta_mu     store  serialises the sequence-table changes that write
 *                        storage (create, fork, drop, set_ttl, expiry) and
 *                        is held across their writes, so that those of one
 *                        id stay in order
 *   2 page_mu     seq    serialises eviction and page-in of a sequence
 *   3 append_mu   layer  one append's storage write at a time; a drop or an
 *                        eviction takes every layer's, so no append is half
 *                        done under it
 *   4 lock        layer  rwlock over the layer's heads
 *   5 map_mu      store  the sequence table itself; never held across I/O,
 *                        so lookups (every call) never wait for an fsync
 *   6 build_mu    store  build queue and counters, keeper's sleep
 *   7 scratch_mu  store  the list of thread scratches
 *   8 obs_mu      seq    observed queries and per-head budgets (observe.c);
 *                        taken under a layer's read lock by attends
 *
 * The engine takes these only through the wrappers below. Where NDEBUG is
 * not defined (the RelWithDebInfo and Debug builds: the top CMakeLists
 * sets RelWithDebInfo to "-O2 -g") each thread keeps the locks it holds
 * (lock.c) and every acquisition asserts the order, before it blocks; and
 * functions that need a lock held assert kvs__held() instead of saying so
 * in a comment. Locks inside gpu.c, pool.c and persist.c are leaves: the
 * engine never takes one of its own while in there.
 */
enum {
    KVS__RANK_META = 1,
    KVS__RANK_PAGE,
    KVS__RANK_APPEND,
    KVS__RANK_LAYER,
    KVS__RANK_MAP,
    KVS__RANK_BUILD,
    KVS__RANK_SCRATCH,
    KVS__RANK_OBS,
    KVS__RANK_N
};

#ifndef NDEBUG
/* `sub`: the layer index for APPEND and LAYER, 0 for the others. */
void kvs__lock(pthread_mutex_t *mu, int rank, uint32_t sub);
void kvs__unlock(pthread_mutex_t *mu);
void kvs__rdlock(pthread_rwlock_t *rw, uint32_t sub); /* rank LAYER */
void kvs__wrlock(pthread_rwlock_t *rw, uint32_t sub);
void kvs__rwunlock(pthread_rwlock_t *rw);
/* For assert() only: does this thread hold `lock` (in write mode)? */
int kvs__held(const void *lock);
int kvs__held_write(const void *lock);
#else
static inline void kvs__lock(pthread_mutex_t *mu, int rank, uint32_t sub) {
    (void)rank, (void)sub;
    pthread_mutex_lock(mu);
}
static inline void kvs__unlock(pthread_mutex_t *mu) {
    pthread_mutex_unlock(mu);
}
static inline void kvs__rdlock(pthread_rwlock_t *rw, uint32_t sub) {
    (void)sub;
    pthread_rwlock_rdlock(rw);
}
static inline void kvs__wrlock(pthread_rwlock_t *rw, uint32_t sub) {
    (void)sub;
    pthread_rwlock_wrlock(rw);
}
static inline void kvs__rwunlock(pthread_rwlock_t *rw) {
    pthread_rwlock_unlock(rw);
}
#endif

/* ---------------------------------------------------------------------- */
/* Types                                                                  */

typedef struct head_s {
    kvs_segment_t **segments;
    uint32_t n_segments, segments_cap;
    uint64_t indexed_tokens;
    /* Tail: rows tail_start .. tail_start + tail_len of the buffers. */
    char *tail_keys, *tail_values;
    uint64_t tail_start, tail_len, tail_cap; /* in tokens */
    int build_inflight;
} head_t;

typedef struct layer_s {
    pthread_rwlock_t lock;
    /* Serialises appends to this layer, so the storage write (which may
     * wait for an fsync) happens outside the rwlock readers need. */
    pthread_mutex_t append_mu;
    head_t *heads; /* [n_kv_heads] */
    uint64_t tokens;
    /* 0 while the sequence is evicted: heads are empty, tokens still
     * counts what storage holds. Read and written under `lock`. */
    int resident;
    /* Rows reserved by an append whose storage write is in flight (the
     * rwlock is released meanwhile): a shrink must keep room for them. */
    uint64_t appending;
    /* GPU mirror of the index (engine/gpu_int.h), NULL until a GPU attend;
     * freed under the write lock (eviction, drop, free). */
    kvs__gpu_layer_t *_Atomic gpu;
} layer_t;

/* Observed queries of a sequence and what they calibrate (observe.c). */
typedef struct kvs__obs_s kvs__obs_t;

typedef struct seq_s {
    uint64_t id;
    kvs_geometry_t geo;
    size_t row_bytes; /* head_dim * dtype size */
    atomic_int refs;
    atomic_int dropped;
    /* A drop is deleting the stored sequence: lookups see none (set and
     * cleared under map_mu, see drop_seq) */
    atomic_int unlinking;
    atomic_uint_fast64_t builds_pending;
    char *damage;            /* non-NULL: quarantined, and why */
    atomic_uint ttl_s;       /* 0: never expires */
    pthread_mutex_t page_mu; /* serialises evict / page-in */
    /* Some layer is not in memory (layer_t.resident 0; a page-in reads
     * layers one at a time). Eviction takes every layer out at once. */
    atomic_int evicted;
    /* Not read since a lazy open (KVS_LOAD_WARM/LAZY): evicted, layers'
     * tokens known, records still on disk. Cleared once its first page-ins
     * (layer by layer, on first use or by the warm-up) have read every
     * layer; those are not counted as page-ins. The warm-up reads only
     * these. */
    atomic_int cold;
    /* Installed by kvs_seq_import_end and not yet found equal to a later
     * import of the same sequence (transfer.c): a repair copy that may
     * have missed appends made while it was copied, so a newer import
     * replaces it even where the two differ. Not stored: a restart makes
     * it an ordinary copy. */
    atomic_int unconfirmed;
    /* Number of this sequence's latest queued append (persist.c ticket):
     * with KVS_SYNC_ASYNC eviction waits until it is on disk, since the
     * rows it frees must be readable back. */
    atomic_uint_fast64_t last_write;
    atomic_int_fast64_t bytes;        /* counted against memory_bytes */
    atomic_uint_fast64_t last_access; /* monotonic ms */
    layer_t *layers;
    /* Query reservoirs and per-head budgets, NULL until the first query
     * is observed; obs_bytes of it count in the store's resident_bytes
     * (kept across eviction, like the bookkeeping). */
    pthread_mutex_t obs_mu;
    kvs__obs_t *obs;
    atomic_int_fast64_t obs_bytes;
    kvs__gpu_t *gpu;    /* the store's, for freeing mirrors */
    struct seq_s *next; /* hash chain */
} seq_t;

typedef struct build_job_s {
    seq_t *seq;
    uint32_t layer, head;
    struct build_job_s *next;
} build_job_t;

struct kvs_store_s {
    kvs_options_t opts;
    char *data_dir;
    kvs__db_t *db; /* NULL: memory only */
    kvs__pool_t *pool;
    pthread_key_t scratch_key;
    /* Every thread's scratch, so that close frees those of threads that
     * are still alive (key destructors stop running once it is deleted). */
    pthread_mutex_t scratch_mu;
    struct scratch_node_s *scratches;

    /* Sequence table (ranks 1 and 5 of the lock order, above). */
    pthread_mutex_t meta_mu;
    pthread_mutex_t map_mu;
    seq_t **buckets;
    size_t n_buckets, n_seqs;
    uint64_t meta_bytes; /* bookkeeping of the sequences in the table (part
                            of resident_bytes; eviction keeps it) */

    /* Build queue. */
    pthread_mutex_t build_mu;
    pthread_cond_t build_cv;   /* work queued or stopping */
    pthread_cond_t build_done; /* some build finished */
    build_job_t *q_head, *q_tail;
    atomic_int stopping;
    pthread_t *builders;
    uint32_t n_builders;
    uint64_t builds_pending, builds_done, build_keys;
    uint64_t builds_finished; /* every finished build, failed ones too:
                                 deterministic reads wait for it to move */
    double build_seconds;
    uint64_t expired;

    /* Memory budget. */
    atomic_int_fast64_t resident_bytes;
    atomic_uint_fast64_t evictions, page_ins;

    /* GPU attend path (NULL: CPU only; gpu_info says why). */
    kvs__gpu_t *gpu;
    char gpu_info[192];

    /* Housekeeping: TTL expiry. */
    pthread_t keeper;
    int keeper_running;
    pthread_cond_t keeper_cv;

    /* KVS_LOAD_WARM: the thread reading what the lazy open left on disk. */
    pthread_t warmer;
    int warmer_running;
};

/* A thread's scratch for search/attend, listed so that close frees those
 * of threads that are still alive. */
typedef struct scratch_node_s {
    kvs_scratch_t *sc;
    kvs_store_t *s;
    struct scratch_node_s *prev, *next;
} scratch_node_t;

/* ---------------------------------------------------------------------- */
/* store.c                                                                */

/* Record `fmt` as this thread's message for `store`; returns `code`. */
__attribute__((format(printf, 3, 4))) int
kvs__fail(const kvs_store_t *store, int code, const char *fmt, ...);
void kvs__clear_err(const kvs_store_t *store);
/* Give the options' log callback a message (nothing without one). */
__attribute__((format(printf, 3, 4))) void
kvs__store_log(const kvs_store_t *s, int level, const char *fmt, ...);
uint64_t kvs__now_ms(void); /* monotonic */
double kvs__now_s(void);    /* monotonic */

/* ---------------------------------------------------------------------- */
/* seq.c                                                                  */

void kvs__head_release(head_t *h);
/* Free a sequence nobody else can reach (not in the table, no reference). */
void kvs__seq_free(seq_t *q);
void kvs__seq_unref(seq_t *q);
int kvs__check_geometry(kvs_store_t *s, const kvs_geometry_t *g);
int kvs__seq_new(kvs_store_t *s, uint64_t id, const kvs_geometry_t *geo,
                 seq_t **out);
/* RAM a sequence of geometry g takes before it holds a token. */
uint64_t kvs__seq_meta_bytes(const kvs_geometry_t *g);
/* 0 when one more sequence of g fits max_sequences and memory_bytes, else
 * the error (with its message). Caller holds map_mu. */
int kvs__seq_admit(kvs_store_t *s, const kvs_geometry_t *g);
int kvs__map_insert(kvs_store_t *s, seq_t *q);
seq_t *kvs__map_find(kvs_store_t *s, uint64_t id);
/* A usable sequence with a reference taken and its TTL clock restarted;
 * NULL with *rc (and the message) when unknown or quarantined. */
seq_t *kvs__seq_lookup(kvs_store_t *s, uint64_t id, int *rc);
/* Fill `info` from the sequence's layers (each read-locked in turn). */
void kvs__seq_account(const seq_t *q, kvs_seq_info_t *info);
/* The housekeeping thread: TTL expiry and the memory budget. */
void *kvs__keeper_main(void *arg);
/* Release one owner of a segment shared between sequences. */
void kvs__segment_unref(kvs_segment_t *seg);
/* Write an unlinked sequence's records, then its metadata (fork, import). */
int kvs__seq_persist(kvs_store_t *s, seq_t *c, char *err, size_t errlen);
/* Delete `q` from storage and the table (kvs_seq_drop's work) with meta_mu
 * and every layer's append_mu held by the caller, so that a check made
 * under them still holds when the sequence goes (transfer.c). On success
 * the caller drops the table's reference. */
int kvs__drop_seq_held(kvs_store_t *s, seq_t *q);

/* ---------------------------------------------------------------------- */
/* build.c                                                                */

/* Queue a build of the head when its tail holds a whole segment. */
void kvs__maybe_build(kvs_store_t *s, seq_t *q, uint32_t layer, uint32_t head);
void *kvs__builder(void *arg); /* a builder thread */

/* ---------------------------------------------------------------------- */
/* residency.c                                                            */

/* Load every sequence of the store's data directory (at open). */
int kvs__store_load(kvs_store_t *s, char *err, size_t errlen);
void kvs__load_schedule_builds(kvs_store_t *s);
void kvs__bytes_add(kvs_store_t *s, seq_t *q, int64_t delta);
int64_t kvs__layer_bytes(const seq_t *q, const layer_t *L);
/* Evict least recently used sequences (never `keep`) until the resident
 * bytes fit memory_bytes. */
void kvs__enforce_budget(kvs_store_t *s, const seq_t *keep);
/* Read the layers of an evicted (or cold) sequence that are not in memory
 * back: all of them, or one (the unit of paging is the layer). KVS_ECORRUPT
 * (message naming the sequence) when this read found it damaged and
 * quarantined it. */
int kvs__page_in(kvs_store_t *s, seq_t *q);
int kvs__page_in_layer(kvs_store_t *s, seq_t *q, uint32_t layer);
/* KVS_LOAD_WARM's thread (see residency.c). */
void *kvs__warmup_main(void *arg);
/* Take `L`'s lock with its rows in memory, paging the sequence in first
 * when it was evicted. */
int kvs__layer_lock(kvs_store_t *s, seq_t *q, layer_t *L, int write);

/* ---------------------------------------------------------------------- */
/* query.c                                                                */

/* Room for `more` rows at the end of the head's tail. */
int kvs__head_reserve(head_t *h, size_t row_bytes, uint64_t more);
/* Calibration of per-head budgets (observe.c): for `n` query groups
 * ([n][group][d]) of KV head h of layer L, err[j] (j < nm) receives the
 * mean relative L2 error of the wave attend with budget_scale mults[j]
 * against the fp32 attention over every key. Under the layer's read
 * lock, on the caller's thread. */
int kvs__head_errors(kvs_store_t *s, const seq_t *q, const layer_t *L,
                     uint32_t h, const float *samples, uint32_t n,
                     const kvs_zone_params_t *zp, const kvs_rank_params_t *rp,
                     const float *mults, int nm, double *err);
/* Copy tokens pos .. pos+n of one head into rows `stride` bytes apart
 * (either destination may be NULL). */
void kvs__head_gather(const head_t *hd, size_t rb, uint64_t pos, uint64_t n,
                      char *keys, char *values, size_t stride);

/* ---------------------------------------------------------------------- */
/* observe.c                                                              */

/* Reservoir samples per (layer, KV head) when opts.observe_samples is 0. */
#define KVS__OBSERVE_DEFAULT 16
/* Per-head budget of a wave attend: offer the call's queries to the
 * reservoirs of `layer`, recalibrate the budgets when the layer's index or
 * sample changed, and fill scale[h] (the retrieval multiplier of each KV
 * head; 1 where nothing is calibrated). Under the layer's read lock. */
int kvs__obs_attend(kvs_store_t *s, seq_t *q, uint32_t layer,
                    const float *queries, const kvs_zone_params_t *zp,
                    const kvs_rank_params_t *rp, float *scale);
void kvs__obs_free(seq_t *q);

#endif /* KVS_ENGINE_INT_H */
