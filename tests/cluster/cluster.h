/*
 * cluster.h: helpers of the cluster tests: a real etcd on loopback ports
 * with a temporary data directory, and real kvstored processes registered
 * in it (--etcd-endpoints). Copied in spirit from tests/server/daemon.c,
 * which another test suite owns, rather than shared with it.
 */
#ifndef KVS_TEST_CLUSTER_H
#define KVS_TEST_CLUSTER_H

#include "kvs_client.h"
#include "kvs_etcd.h"

#include <stdbool.h>
#include <sys/types.h>

typedef struct tc_etcd_s {
    pid_t pid;
    int port, peer_port;
    char dir[128];
    char endpoint[64]; /* "http://127.0.0.1:PORT" */
} tc_etcd_t;

/* Path of the etcd binary, or NULL when it is not installed. */
const char *tc_etcd_binary(void);
/* Start etcd in a fresh temp dir and wait until it answers (<= 15 s). */
int tc_etcd_start(tc_etcd_t *e);
/* SIGTERM it and remove its directory. */
void tc_etcd_stop(tc_etcd_t *e);

typedef struct tc_node_s {
    pid_t pid;
    int port, http_port;
    char node_id[32];
    char dir[128];
    char log[192];
} tc_node_t;

/* Start kvstored named node_id, registered in e under prefix with a lease
 * of ttl seconds, plus `extra` flags (NULL-terminated, may be NULL).
 * Returns 0 once its port file is written. */
int tc_node_start(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                  const char *node_id, int ttl, const char *const *extra);
/* Start n again (after tc_node_kill/stop) on its data directory: same
 * node id and data, a new port. */
int tc_node_restart(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                    int ttl, const char *const *extra);
/* SIGTERM and wait (<= 20 s): the exit status, -1 on a signal/timeout. */
int tc_node_stop(tc_node_t *n);
/* SIGKILL: no drain, no deregistration. */
void tc_node_kill(tc_node_t *n);
/* Stop if running, remove the directory. */
void tc_node_cleanup(tc_node_t *n);
void tc_node_dump_log(const tc_node_t *n);
/* SIGKILL every node still running and remove its directory: a failed
 * assertion skips a test's own cleanup (call from the group teardown). */
void tc_reap_all(void);

/* A client of `addr` (host:port or etcd://...) with R = replicas, a 100 ms
 * membership refresh and `timeout_ms` per request; NULL if it cannot
 * open. */
kvs_client_t *tc_client_open(const char *addr, uint32_t replicas,
                             uint32_t timeout_ms);

/* One etcd for a cmocka group of tests: tc_group_setup starts it, or notes
 * that etcd is not installed (TC_NEED_ETCD() then skips the test, it does
 * not fail); tc_test_teardown reaps what a failed test left running;
 * tc_group_teardown stops etcd. */
extern tc_etcd_t tc_etcd;
extern bool tc_have_etcd;
int tc_group_setup(void **state);
int tc_test_teardown(void **state);
int tc_group_teardown(void **state);
#define TC_NEED_ETCD()                                                         \
    do {                                                                       \
        if (!tc_have_etcd) {                                                   \
            fprintf(stderr, "skipped: etcd not installed\n");                  \
            skip();                                                            \
        }                                                                      \
    } while (0)

/* Node ids registered under prefix right now (sorted, comma-joined into
 * out); -1 when etcd cannot be read. */
int tc_members(const tc_etcd_t *e, const char *prefix, char *out, size_t cap);
/* Poll tc_members until it equals `want` or timeout_ms passes; returns the
 * milliseconds it took, or -1 on timeout. */
long tc_wait_members(const tc_etcd_t *e, const char *prefix, const char *want,
                     int timeout_ms);

/* Value of the unlabelled metric `name` on the node's /metrics, -1 when
 * missing or unreachable. */
double tc_metric(int http_port, const char *name);
/* Polls tc_metric until it equals `want` or timeout_ms passes; returns the
 * last value read. The daemon updates its etcd gauges just after the put
 * that makes its key visible, so a test that saw the key must wait. */
double tc_metric_wait(int http_port, const char *name, double want,
                      int timeout_ms);

void tc_sleep_ms(int ms);
long tc_now_ms(void);

#endif
