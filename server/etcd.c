/*
 * etcd.c: kvstored's membership in etcd (docs/cluster.md). While the daemon
 * serves, `<etcd_prefix>/nodes/<node_id>` holds its node record (proto's
 * kvs_etcd.h) under a lease of etcd_lease_ttl seconds; a keepalive every
 * third of the TTL holds the lease, so a daemon that dies without draining
 * disappears from the list within the TTL. On SIGTERM the drain begins by
 * revoking the lease, so clients stop placing new sequences here while the
 * requests in flight are answered.
 *
 * All etcd I/O runs on one thread of its own with blocking calls (bounded
 * by a timeout): the libuv loop never waits on etcd. The thread shares with
 * the rest of the server only `mu`/`cv` (stop and wake-up) and the store,
 * which is thread-safe; what it reads of the server (ports, node id, config)
 * is fixed before it starts.
 *
 * When etcd is unreachable the daemon keeps serving (it is the data path;
 * etcd is only how clients find it) and retries every second, logging the
 * state changes rather than every failure.
 */
#include "server_int.h"

#include "kvs_etcd.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct kvs__member_s {
    kvs_server_t *srv;
    kvs_etcd_t *etcd;
    char key[512];
    kvs_node_record_t rec;
    char last_put[1024]; /* the record as last written, to skip equal puts */
    int64_t lease;
    pthread_t thread;
    bool started;
    /* mu guards stop; a leaf lock, taken by the loop thread and ours. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    /* For /metrics (read on the loop thread, written on ours). */
    atomic_bool registered;
    atomic_uint_fast64_t registrations, failures;
};

static uint64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static bool wait_stop(kvs__member_t *m, uint64_t ms) {
    return kvs__wait_stop(&m->mu, &m->cv, &m->stop, ms);
}

static bool stopping(kvs__member_t *m) {
    return kvs__stopping(&m->mu, &m->stop);
}

/* Write the record if it changed (load figures move) or `force`. */
static int put_record(kvs__member_t *m, bool force) {
    kvs_store_stats_t st;
    memset(&st, 0, sizeof(st));
    if (kvs_store_stats(m->srv->store, &st) == 0) {
        m->rec.memory_used = st.resident_bytes;
        m->rec.sequences = st.sequences;
    }
    char buf[1024];
    size_t len;
    int rc = kvs_node_record_encode(&m->rec, buf, sizeof(buf), &len);
    if (rc)
        return rc;
    if (!force && !strcmp(buf, m->last_put))
        return 0;
    if ((rc = kvs_etcd_put(m->etcd, m->key, buf, len, m->lease)))
        return rc;
    memcpy(m->last_put, buf, len + 1);
    return 0;
}

static void *member_main(void *arg) {
    kvs__member_t *m = arg;
    const kvs_server_config_t *cfg = m->srv->cfg;
    uint64_t every = cfg->etcd_lease_ttl * 1000ull / 3;
    bool down = false; /* logged as unreachable, not yet recovered */
    char q[600];
    while (!stopping(m)) {
        int rc;
        const char *what;
        if (!m->lease) {
            what = "lease_grant";
            rc = kvs_etcd_lease_grant(m->etcd, cfg->etcd_lease_ttl, &m->lease);
            if (!rc) {
                what = "put";
                if ((rc = put_record(m, true))) {
                    m->lease = 0; /* expires by itself: never kept alive */
                } else {
                    atomic_store(&m->registered, true);
                    atomic_fetch_add(&m->registrations, 1);
                    kvs__log(KVS__LOG_INFO, "etcd_registered",
                             "key=%s addr=%s lease=%lld ttl=%u", m->key,
                             m->rec.addr, (long long)m->lease,
                             cfg->etcd_lease_ttl);
                }
            }
        } else {
            int64_t left = 0;
            what = "keepalive";
            rc = kvs_etcd_lease_keepalive(m->etcd, m->lease, &left);
            if (!rc && left <= 0) {
                /* Expired while etcd was away from us (or revoked by an
                 * operator): register again at once. */
                kvs__log(KVS__LOG_WARN, "etcd_lease_lost", "key=%s lease=%lld",
                         m->key, (long long)m->lease);
                m->lease = 0;
                m->last_put[0] = 0;
                atomic_store(&m->registered, false);
                continue;
            }
            if (!rc) {
                what = "put";
                rc = put_record(m, false);
            }
        }
        if (rc)
            atomic_fetch_add(&m->failures, 1);
        if (rc && !down)
            kvs__log(KVS__LOG_WARN, "etcd_unreachable",
                     "op=%s status=%s msg=%s (serving on; retrying)", what,
                     kvs_err_name(rc),
                     kvs__logq(q, sizeof(q), kvs_etcd_errmsg(m->etcd)));
        else if (!rc && down)
            kvs__log(KVS__LOG_INFO, "etcd_reachable", "key=%s", m->key);
        down = rc != 0;
        if (wait_stop(m, rc ? (every < 1000 ? every : 1000) : every))
            break;
    }
    if (m->lease) {
        /* Revoking deletes the key with it: one call, and no window in
         * which the key outlives a lease we no longer keep alive. */
        uint64_t t0 = mono_ms();
        int rc = kvs_etcd_lease_revoke(m->etcd, m->lease);
        kvs__log(rc ? KVS__LOG_WARN : KVS__LOG_INFO, "etcd_deregistered",
                 "key=%s status=%s ms=%llu%s", m->key,
                 rc ? kvs_err_name(rc) : "ok",
                 (unsigned long long)(mono_ms() - t0),
                 rc ? " (the key goes when its lease expires)" : "");
        m->lease = 0;
        atomic_store(&m->registered, false);
    }
    return NULL;
}

bool kvs__member_metrics(const kvs_server_t *srv, bool *registered,
                         uint64_t *registrations, uint64_t *failures) {
    kvs__member_t *m = srv->member;
    if (!m)
        return false;
    *registered = atomic_load(&m->registered);
    *registrations = atomic_load(&m->registrations);
    *failures = atomic_load(&m->failures);
    return true;
}

/* The address clients dial: advertise_addr, else the first bind address
 * (IPv6 in brackets) and the bound port. */
static void advertised(const kvs_server_t *srv, char *out, size_t cap) {
    const kvs_server_config_t *cfg = srv->cfg;
    if (cfg->advertise_addr[0]) {
        snprintf(out, cap, "%s", cfg->advertise_addr);
        return;
    }
    size_t n = strcspn(cfg->bind, ",");
    const char *b = cfg->bind;
    if (n == 0 || srv->port <= 0) {
        /* Unix socket only: nothing a remote client could dial. */
        snprintf(out, cap, "unix:%s", cfg->unix_socket);
        return;
    }
    bool v6 = memchr(b, ':', n) != NULL;
    snprintf(out, cap, "%s%.*s%s:%d", v6 ? "[" : "", (int)n, b, v6 ? "]" : "",
             srv->port);
}

int kvs__member_start(kvs_server_t *srv) {
    const kvs_server_config_t *cfg = srv->cfg;
    if (!cfg->etcd_endpoints[0])
        return 0;
    kvs__member_t *m = calloc(1, sizeof(*m));
    if (!m)
        return KVS_ENOMEM;
    m->srv = srv;
    pthread_mutex_init(&m->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->cv, &ca);
    pthread_condattr_destroy(&ca);
    char err[256], q[300];
    /* Each call waits at most a third of the TTL per endpoint, so that one
     * slow answer does not let the lease lapse. */
    uint32_t tmo = cfg->etcd_lease_ttl * 1000u / 3;
    int rc = kvs_etcd_new(cfg->etcd_endpoints, tmo < 2000 ? tmo : 2000,
                          &m->etcd, err, sizeof(err));
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "etcd_config", "msg=%s",
                 kvs__logq(q, sizeof(q), err));
        goto err;
    }
    if ((rc = kvs_node_key(cfg->etcd_prefix, srv->node_id, m->key,
                           sizeof(m->key)))) {
        kvs__log(KVS__LOG_ERROR, "etcd_config", "msg=\"key too long\"");
        goto err;
    }
    snprintf(m->rec.node_id, sizeof(m->rec.node_id), "%s", srv->node_id);
    advertised(srv, m->rec.addr, sizeof(m->rec.addr));
    if (!strncmp(m->rec.addr, "0.0.0.0:", 8) ||
        !strncmp(m->rec.addr, "[::]:", 5))
        kvs__log(KVS__LOG_WARN, "etcd_advertise_wildcard",
                 "addr=%s msg=\"clients cannot dial a wildcard address; set "
                 "advertise_addr\"",
                 m->rec.addr);
    m->rec.port = srv->port > 0 ? (uint32_t)srv->port : 0;
    m->rec.http_port = srv->http_port > 0 ? (uint32_t)srv->http_port : 0;
    m->rec.memory_limit = cfg->memory_bytes;
    m->rec.start_time = (int64_t)time(NULL);
    m->rec.protocol = KVS_PROTOCOL_VERSION;
    snprintf(m->rec.version, sizeof(m->rec.version), "%s", KVS_SERVER_VERSION);
    if ((rc = -pthread_create(&m->thread, NULL, member_main, m)))
        goto err;
    m->started = true;
    srv->member = m;
    /* Repair reads the same membership; it is not the data path either, so
     * a failure to start it is logged, not fatal. */
    if ((rc = kvs__repair_start(srv, m->rec.addr)))
        kvs__log(KVS__LOG_ERROR, "repair_start_failed", "status=%s",
                 kvs_err_name(rc));
    return 0;
err:
    kvs_etcd_free(m->etcd);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    free(m);
    return rc;
}

void kvs__member_leave(kvs_server_t *srv) {
    kvs__repair_leave(srv); /* a leaving node pushes nothing more */
    kvs__member_t *m = srv->member;
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->stop = true;
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
}

void kvs__member_stop(kvs_server_t *srv) {
    /* First: repair's thread reads the membership and the store. */
    kvs__repair_stop(srv);
    kvs__member_t *m = srv->member;
    if (!m)
        return;
    kvs__member_leave(srv);
    if (m->started)
        pthread_join(m->thread, NULL);
    kvs_etcd_free(m->etcd);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
    free(m);
    srv->member = NULL;
}
