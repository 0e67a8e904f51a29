/*
 * daemon.h: helpers for the server integration tests: start a real kvstored
 * process on loopback with ephemeral ports (--port 0 --port-file), stop it
 * with SIGTERM and check its exit status, and talk to it with raw frames
 * when a test needs bytes a well-behaved client would never send.
 */
#ifndef KVS_TEST_DAEMON_H
#define KVS_TEST_DAEMON_H

#include "kvs_client.h"
#include "kvs_frame.h"

#include <stdbool.h>
#include <sys/types.h>

typedef struct test_daemon_s {
    pid_t pid;
    int port;
    int http_port;
    char dir[128]; /* temp dir: data/, log, port file, socket */
    char sock[192];
    char log[192];
} test_daemon_t;

/* Make d->dir (a fresh temp dir) and start kvstored there with `extra`
 * (NULL-terminated) flags; port 0 unless d->port is set (restart on the
 * same port). Returns 0 once the port file is written. */
int td_start(test_daemon_t *d, const char *const *extra);
/* SIGTERM, wait up to 20 s; returns the exit status (or -1 on a signal /
 * timeout, after SIGKILL). */
int td_stop(test_daemon_t *d);
/* Remove d->dir. */
void td_cleanup(test_daemon_t *d);
/* Dump the daemon's log to stderr (for failures). */
void td_dump_log(const test_daemon_t *d);

/* A client with one address: "127.0.0.1:port", "[::1]:port" or the unix
 * socket (v6 = 2). */
kvs_client_t *td_client(const test_daemon_t *d, int v6, const char *token);

/* Raw sockets. */
int td_raw_connect(int port, bool v6);
int td_send_all(int fd, const void *buf, size_t len);
int td_send_request(int fd, uint64_t id, uint16_t version,
                    const Kvs__V1__Request *req);
/* Read one response frame: 0 with *r set, 1 on EOF, -1 on timeout/error. */
int td_read_response(int fd, int timeout_ms, kvs_frame_header_t *h,
                     Kvs__V1__Response **r);
/* true when the peer closes within timeout_ms (bytes before EOF ignored). */
bool td_wait_eof(int fd, int timeout_ms);
/* GET path on the HTTP port; returns malloc'ed body (NULL on failure). */
char *td_http_get(int port, const char *path, int *status);
/* Value of an unlabelled metric line "name value", or -1. */
double td_metric(const char *body, const char *name);

#endif
