/*
 * store.c: opening and closing a store (include/kvstore.h), its options,
 * its error messages and its statistics.
 *
 * The engine's files share one private header, engine_int.h, which holds
 * the store, sequence, layer and head types and the lock order. An open
 * loads the data directory (residency.c: all of it, or by default only the
 * sequence table and token counts), then starts the builder threads
 * (build.c), the housekeeping thread (seq.c: TTL expiry, the memory
 * budget) and the warm-up thread (residency.c: reads what a lazy load left
 * on disk); a close stops them before it frees any sequence.
 */
#include "engine_int.h"

#include <cblas.h> /* openblas_set_num_threads */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------- */
/* Errors: one message per (thread, store).                               */

static _Thread_local const kvs_store_t *err_store;
static _Thread_local char err_msg[256];

int kvs__fail(const kvs_store_t *store, int code, const char *fmt, ...) {
    err_store = store;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return code;
}

void kvs__clear_err(const kvs_store_t *store) {
    if (err_store == store)
        err_msg[0] = 0;
}

const char *kvs_store_errmsg(const kvs_store_t *store) {
    return err_store == store ? err_msg : "";
}

void kvs__store_log(const kvs_store_t *s, int level, const char *fmt, ...) {
    if (!s->opts.log)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    s->opts.log(s->opts.log_ctx, level, msg);
}

uint64_t kvs__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

double kvs__now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------------- */
/* Options                                                                */

void kvs_query_params_default(kvs_query_params_t *p) {
    memset(p, 0, sizeof *p);
    p->mode = KVS_MODE_WAVE;
    p->budget = KVS_BUDGET_FIXED;
    p->retrieval_fraction = 0.018f;
    p->estimation_fraction = 0.5f;
    p->epsilon = 0.02f;
    p->scale = 0;
}

void kvs_options_default(kvs_options_t *o) {
    memset(o, 0, sizeof *o);
    o->n_threads = 0;
    o->n_build_threads = 1;
    /* The unindexed tail is attended exactly: at 24-32K, segments of 1024
     * attend 3.6% of keys exactly against 15.9% for 8192 at the same
     * attention error, recall unchanged; at 8K segments of 256 attend
     * 4.1% exactly against 9.4% for 1024 (0.60% vs 0.39% median error),
     * build 27% more keys/s and attend as fast at 128K
     * (bench/accuracy/RESULTS.md, bench/RESULTS.md). */
    o->segment_tokens = 256;
    o->cluster_tokens = 16;
    o->kmeans_iters = 10;
    o->sink_tokens = 4;
    o->window_tokens = 64;
    o->sync = KVS_SYNC_BATCH;
    o->sync_interval_ms = 2;
    o->max_unpersisted_bytes = 256ull << 20;
    o->cuda_device = -1;
    o->cuda_cache_fraction = 0.1f;
    o->cuda_build = 1;
    kvs_query_params_default(&o->defaults);
}

static int check_options(kvs_store_t *s, const kvs_options_t *o) {
    if (o->cluster_tokens == 0 || o->kmeans_iters == 0)
        return kvs__fail(s, KVS_EINVAL,
                         "cluster_tokens and kmeans_iters must be > 0");
    if (o->segment_tokens < o->cluster_tokens ||
        o->segment_tokens <= (uint64_t)o->sink_tokens + o->window_tokens)
        return kvs__fail(s, KVS_EINVAL,
                         "segment_tokens (%u) must exceed sink_tokens + "
                         "window_tokens (%u) and cluster_tokens",
                         o->segment_tokens, o->sink_tokens + o->window_tokens);
    if (o->segment_tokens > (1u << 24))
        return kvs__fail(s, KVS_EINVAL, "segment_tokens above 16M");
    const kvs_query_params_t *d = &o->defaults;
    if (!(d->retrieval_fraction >= 0 && d->retrieval_fraction <= 1) ||
        !(d->estimation_fraction >= 0 && d->estimation_fraction <= 1) ||
        !(d->epsilon >= 0 && d->epsilon <= 1) || !(d->scale >= 0) ||
        !isfinite(d->scale))
        return kvs__fail(s, KVS_EINVAL, "default query params out of range");
    if (d->rank != KVS_RANK_DEFAULT && d->rank != KVS_RANK_CODES &&
        d->rank != KVS_RANK_CENTROID)
        return kvs__fail(s, KVS_EINVAL, "unknown default rank %d",
                         (int)d->rank);
    if (o->n_threads > 1024 || o->n_build_threads > 64)
        return kvs__fail(s, KVS_EINVAL, "too many threads");
    if (o->load != KVS_LOAD_DEFAULT && o->load != KVS_LOAD_WARM &&
        o->load != KVS_LOAD_LAZY && o->load != KVS_LOAD_EAGER)
        return kvs__fail(s, KVS_EINVAL, "unknown load mode %d", (int)o->load);
    if (o->cuda_device >= 0 &&
        !(o->cuda_cache_fraction > 0 && o->cuda_cache_fraction <= 1))
        return kvs__fail(s, KVS_EINVAL,
                         "cuda_cache_fraction must be in (0, 1]");
    if (o->cuda_kv != KVS_CUDA_KV_AUTO && o->cuda_kv != KVS_CUDA_KV_HOST)
        return kvs__fail(s, KVS_EINVAL, "unknown cuda_kv %d", (int)o->cuda_kv);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Open / close                                                           */

/* Thread exit: unlink and free this thread's scratch. */
static void scratch_destroy(void *p) {
    scratch_node_t *n = p;
    kvs__lock(&n->s->scratch_mu, KVS__RANK_SCRATCH, 0);
    if (n->prev)
        n->prev->next = n->next;
    else
        n->s->scratches = n->next;
    if (n->next)
        n->next->prev = n->prev;
    kvs__unlock(&n->s->scratch_mu);
    kvs_scratch_free(n->sc);
    free(n);
}

static _Thread_local char open_err[320];

const char *kvs_store_open_error(void) {
    return open_err;
}

/* Fail an open: the message goes where kvs_store_open_error() finds it. */
__attribute__((format(printf, 2, 3))) static int
open_fail(int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(open_err, sizeof open_err, fmt, ap);
    va_end(ap);
    return rc;
}

int kvs_store_open(const kvs_options_t *opts, kvs_store_t **out) {
    open_err[0] = 0;
    if (!out)
        return open_fail(KVS_EINVAL, "out is NULL");
    *out = NULL;
    kvs_store_t *s = calloc(1, sizeof *s);
    if (!s)
        return open_fail(KVS_ENOMEM, "store");
    if (opts)
        s->opts = *opts;
    else
        kvs_options_default(&s->opts);
    kvs_query_params_t def;
    kvs_query_params_default(&def);
    kvs_query_params_t *d = &s->opts.defaults;
    if (d->retrieval_fraction == 0 && d->estimation_fraction == 0 &&
        d->epsilon == 0) {
        kvs_mode_t m = d->mode;
        kvs_budget_t b = d->budget;
        kvs_rank_t r = d->rank;
        float scale = d->scale;
        *d = def;
        d->mode = m;
        d->budget = b;
        d->rank = r;
        d->scale = scale;
    }
    int rc = check_options(s, &s->opts);
    if (rc) {
        open_fail(rc, "%s", err_msg);
        free(s);
        return rc;
    }
    if (s->opts.sync == KVS_SYNC_DEFAULT) /* persist.c knows only the four */
        s->opts.sync = KVS_SYNC_BATCH;
    if (s->opts.max_unpersisted_bytes == 0)
        s->opts.max_unpersisted_bytes = 256ull << 20;
    if (s->opts.sync != KVS_SYNC_BATCH && s->opts.sync != KVS_SYNC_ALWAYS &&
        s->opts.sync != KVS_SYNC_NONE && s->opts.sync != KVS_SYNC_ASYNC) {
        int mode = (int)s->opts.sync;
        free(s);
        return open_fail(KVS_EINVAL, "unknown sync mode %d", mode);
    }
    if (s->opts.memory_bytes && !(opts && opts->data_dir)) {
        free(s);
        return open_fail(KVS_EINVAL, "memory_bytes needs a data_dir to evict "
                                     "to");
    }
    if (s->opts.n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        s->opts.n_threads = n > 0 ? (uint32_t)n : 1;
    }
    if (s->opts.n_build_threads == 0)
        s->opts.n_build_threads = 1;
    if (s->opts.blas_threads)
        openblas_set_num_threads((int)s->opts.blas_threads);

    pthread_mutex_init(&s->meta_mu, NULL);
    pthread_mutex_init(&s->map_mu, NULL);
    pthread_mutex_init(&s->build_mu, NULL);
    pthread_cond_init(&s->build_cv, NULL);
    pthread_cond_init(&s->build_done, NULL);
    atomic_init(&s->stopping, 0);
    s->n_buckets = 64;
    s->buckets = calloc(s->n_buckets, sizeof *s->buckets);
    pthread_mutex_init(&s->scratch_mu, NULL);
    if (!s->buckets || pthread_key_create(&s->scratch_key, scratch_destroy)) {
        free(s->buckets);
        free(s);
        return open_fail(KVS_ENOMEM, "store");
    }
    if (s->opts.cuda_device >= 0) {
        kvs__gpu_params_t gp = {
            .device = s->opts.cuda_device,
            .cache_fraction = s->opts.cuda_cache_fraction,
            .memory_bytes = s->opts.cuda_memory_bytes,
            .kv_host_only = s->opts.cuda_kv == KVS_CUDA_KV_HOST,
            .segment_tokens = s->opts.segment_tokens,
            .sink_tokens = s->opts.sink_tokens,
            .window_tokens = s->opts.window_tokens,
            .profile = s->opts.cuda_profile,
            .log = s->opts.log,
            .log_ctx = s->opts.log_ctx,
        };
        if ((rc = kvs__gpu_open(&gp, &s->gpu, s->gpu_info,
                                sizeof s->gpu_info))) {
            open_fail(rc, "GPU path");
            goto fail;
        }
        if (!s->gpu) { /* the CPU path serves; say why */
            char why[sizeof s->gpu_info];
            memcpy(why, s->gpu_info, sizeof why);
            why[sizeof why - 8] = 0; /* room for "CPU (" ")" */
            snprintf(s->gpu_info, sizeof s->gpu_info, "CPU (%.*s)",
                     (int)(sizeof why - 8), why);
            kvs__store_log(
                s, KVS_LOG_WARN,
                "GPU path unavailable (cuda_device %d): %s; attends run "
                "on the CPU",
                (int)s->opts.cuda_device, why);
        }
    } else {
        snprintf(s->gpu_info, sizeof s->gpu_info, "CPU (no cuda_device)");
    }
    s->opts.data_dir = NULL;
    if (opts && opts->data_dir) {
        if (!(s->data_dir = strdup(opts->data_dir))) {
            rc = open_fail(KVS_ENOMEM, "store");
            goto fail;
        }
        s->opts.data_dir = s->data_dir;
        char err[256] = "";
        rc = kvs__db_open(s->data_dir, s->opts.sync, s->opts.sync_interval_ms,
                          &s->db, err, sizeof err);
        kvs__db_format_t fmt = {s->opts.segment_tokens, s->opts.sink_tokens,
                                s->opts.window_tokens};
        if (!rc)
            rc = kvs__db_check_format(s->db, &fmt, err, sizeof err);
        if (!rc)
            rc = kvs__store_load(s, err, sizeof err);
        /* After the load, whose writes (the format record, the orphan
         * sweep) are direct. */
        if (!rc &&
            (rc = kvs__db_start_writer(s->db, s->opts.max_unpersisted_bytes,
                                       s->opts.log, s->opts.log_ctx)))
            snprintf(err, sizeof err, "write-behind thread");
        if (rc) {
            open_fail(rc, "%s: %s", s->data_dir, err);
            goto fail;
        }
    }
    /* The calling thread works on its own calls, so n_threads - 1 helpers. */
    if ((rc = kvs__pool_new(s->opts.n_threads - 1, &s->pool))) {
        open_fail(rc, "worker pool");
        goto fail;
    }
    s->builders = calloc(s->opts.n_build_threads, sizeof(pthread_t));
    if (!s->builders) {
        rc = open_fail(KVS_ENOMEM, "builders");
        goto fail;
    }
    for (uint32_t i = 0; i < s->opts.n_build_threads; i++) {
        if ((rc = -pthread_create(&s->builders[i], NULL, kvs__builder, s))) {
            open_fail(rc, "builder thread");
            goto fail;
        }
        s->n_builders++;
    }
    /* Builds are queued and idle clocks restarted before the housekeeping
     * thread can expire anything (it would free sequences under this walk,
     * and a long load must not count as idle time). */
    kvs__load_schedule_builds(s);
    uint64_t now = kvs__now_ms();
    for (size_t b = 0; b < s->n_buckets; b++)
        for (seq_t *q = s->buckets[b]; q; q = q->next)
            atomic_store(&q->last_access, now);
    pthread_cond_init(&s->keeper_cv, NULL);
    if ((rc = -pthread_create(&s->keeper, NULL, kvs__keeper_main, s))) {
        open_fail(rc, "housekeeping thread");
        goto fail;
    }
    s->keeper_running = 1;
    /* Last, once the table is final for the open: the warm-up reads what
     * the lazy load left cold, competing with calls like any page-in. */
    if (s->db &&
        (s->opts.load == KVS_LOAD_DEFAULT || s->opts.load == KVS_LOAD_WARM)) {
        if ((rc = -pthread_create(&s->warmer, NULL, kvs__warmup_main, s))) {
            open_fail(rc, "warm-up thread");
            goto fail;
        }
        s->warmer_running = 1;
    }
    *out = s;
    return 0;
fail:
    kvs_store_close(s);
    return rc;
}

int kvs_store_close(kvs_store_t *s) {
    if (!s)
        return 0;
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    s->stopping = 1;
    pthread_cond_broadcast(&s->build_cv);
    if (s->keeper_running)
        pthread_cond_broadcast(&s->keeper_cv);
    kvs__unlock(&s->build_mu);
    /* Its read in flight sees `stopping` between records and gives up. */
    if (s->warmer_running)
        pthread_join(s->warmer, NULL);
    if (s->keeper_running) {
        pthread_join(s->keeper, NULL);
        pthread_cond_destroy(&s->keeper_cv);
    }
    for (uint32_t i = 0; i < s->n_builders; i++)
        pthread_join(s->builders[i], NULL);
    /* Jobs never started: their tails simply stay unindexed. */
    for (build_job_t *j = s->q_head, *nx; j; j = nx) {
        nx = j->next;
        atomic_fetch_sub(&j->seq->builds_pending, 1);
        kvs__seq_unref(j->seq);
        free(j);
    }
    free(s->builders);
    if (s->pool)
        kvs__pool_free(s->pool);
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i], *nx; q; q = nx) {
            nx = q->next;
            kvs__seq_unref(q);
        }
    free(s->buckets);
    kvs__gpu_close(s->gpu); /* after every sequence's mirrors */
    /* This thread's scratch; other threads' go with their exit. */
    pthread_key_delete(s->scratch_key);
    kvs__lock(&s->scratch_mu, KVS__RANK_SCRATCH, 0);
    for (scratch_node_t *n = s->scratches, *nx; n; n = nx) {
        nx = n->next;
        kvs_scratch_free(n->sc);
        free(n);
    }
    s->scratches = NULL;
    kvs__unlock(&s->scratch_mu);
    pthread_mutex_destroy(&s->scratch_mu);
    pthread_cond_destroy(&s->build_cv);
    pthread_cond_destroy(&s->build_done);
    pthread_mutex_destroy(&s->build_mu);
    pthread_mutex_destroy(&s->map_mu);
    pthread_mutex_destroy(&s->meta_mu);
    /* After every build has stopped: nothing writes to it any more. */
    int rc = kvs__db_close(s->db);
    free(s->data_dir);
    free(s);
    return rc;
}

/* ---------------------------------------------------------------------- */
/* Store statistics                                                       */

int kvs_store_stats(kvs_store_t *s, kvs_store_stats_t *st) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!st)
        return kvs__fail(s, KVS_EINVAL, "stats is NULL");
    memset(st, 0, sizeof *st);
    /* Take references under the map lock, account outside it. */
    kvs__lock(&s->map_mu, KVS__RANK_MAP, 0);
    size_t n = s->n_seqs, k = 0;
    seq_t **all = malloc((n ? n : 1) * sizeof *all);
    if (!all) {
        kvs__unlock(&s->map_mu);
        return kvs__fail(s, KVS_ENOMEM, "stats");
    }
    for (size_t i = 0; i < s->n_buckets; i++)
        for (seq_t *q = s->buckets[i]; q; q = q->next) {
            if (atomic_load(&q->unlinking))
                continue; /* as lookups and list: being dropped */
            atomic_fetch_add(&q->refs, 1);
            all[k++] = q;
        }
    kvs__unlock(&s->map_mu);
    st->sequences = k;
    for (size_t i = 0; i < k; i++) {
        kvs_seq_info_t info;
        if (all[i]->damage) {
            st->quarantined++;
            kvs__seq_unref(all[i]);
            continue;
        }
        kvs__seq_account(all[i], &info);
        st->bytes += info.bytes;
        st->index_bytes += info.index_bytes;
        kvs__seq_unref(all[i]);
    }
    free(all);
    if (s->db)
        st->disk_bytes = kvs__db_disk_bytes(s->db);
    kvs__lock(&s->build_mu, KVS__RANK_BUILD, 0);
    st->builds_pending = s->builds_pending;
    st->builds_done = s->builds_done;
    st->build_keys = s->build_keys;
    st->build_seconds = s->build_seconds;
    st->expired = s->expired;
    int64_t rb = atomic_load(&s->resident_bytes);
    st->resident_bytes = rb > 0 ? (uint64_t)rb : 0; /* racing drops */
    st->evictions = atomic_load(&s->evictions);
    st->page_ins = atomic_load(&s->page_ins);
    kvs__unlock(&s->build_mu);
    kvs__gpu_stats_t g;
    kvs__gpu_stats(s->gpu, &g);
    st->gpu_device = g.device;
    st->gpu_attends = g.attends;
    st->gpu_fallbacks = g.fallbacks;
    st->gpu_errors = g.errors;
    st->gpu_bytes = g.bytes_gpu;
    st->gpu_pinned_bytes = g.bytes_pinned;
    st->gpu_kv_bytes = g.bytes_kv_device;
    st->gpu_builds = g.builds;
    st->gpu_build_errors = g.build_errors;
    st->gpu_mirrors_evicted = g.mirrors_evicted;
    st->gpu_cache_lookups = g.lookups;
    st->gpu_cache_hits = g.hits;
    st->gpu_bus_bytes = g.bytes_bus;
    st->gpu_upload_bytes = g.bytes_uploaded;
    if (s->db) {
        kvs__db_progress_t p;
        kvs__db_progress(s->db, &p);
        st->queued_seqno = p.queued;
        st->persisted_seqno = p.persisted;
        st->unpersisted_bytes = p.unpersisted_bytes;
        st->unpersisted_waits = p.lag_waits;
    }
    return 0;
}

int kvs_store_flush(kvs_store_t *s) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    if (!s->db)
        return 0;
    char err[256] = "";
    int rc = kvs__db_flush(s->db, err, sizeof err);
    return rc ? kvs__fail(s, rc, "%s", err) : 0;
}

int kvs_seq_flush(kvs_store_t *s, uint64_t id) {
    if (!s)
        return KVS_EINVAL;
    kvs__clear_err(s);
    int rc = 0;
    seq_t *q = kvs__seq_lookup(s, id, &rc);
    if (!q)
        return rc;
    kvs__seq_unref(q);
    return kvs_store_flush(s);
}

const char *kvs_store_gpu_info(const kvs_store_t *s) {
    return s ? s->gpu_info : "";
}

int kvs_store_compact(kvs_store_t *s) {
    if (!s)
        return KVS_EINVAL;
    if (s->db)
        kvs__db_compact(s->db);
    return 0;
}
