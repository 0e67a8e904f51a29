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
/* td_stop with its own bound: SIGTERM, wait up to timeout_ms; the exit
 * status, or -1 on a signal or timeout (then killed, log dumped).
 * *seconds (may be NULL) gets how long the daemon took. */
int td_stop_within(test_daemon_t *d, int timeout_ms, double *seconds);
/* Remove d->dir (after td_stop when the daemon still runs). */
void td_cleanup(test_daemon_t *d);
/* SIGKILL and reap a daemon left running (a failed assertion left its
 * test), then td_cleanup: for cmocka teardowns, so no daemon outlives the
 * test binary. No-op on a zeroed d. */
void td_kill_cleanup(test_daemon_t *d);
/* Dump the daemon's log to stderr (for failures). */
void td_dump_log(const test_daemon_t *d);
/* Whole file as a malloc'ed string (NULL if unreadable). */
char *td_slurp(const char *path);
/* true once `needle` is in the file at `path`, polled every 20 ms for up
 * to timeout_ms (0: look once). */
bool td_log_wait(const char *path, const char *needle, int timeout_ms);
/* Resident memory of pid in KiB (VmRSS), -1 if unreadable. */
long td_rss_kb(pid_t pid);
/* Milliseconds on a monotonic clock; sleep for ms. */
double td_now_ms(void);
void td_sleep_ms(int ms);

/* A client with one address: "127.0.0.1:port", "[::1]:port" or the unix
 * socket (v6 = 2). */
kvs_client_t *td_client(const test_daemon_t *d, int v6, const char *token);

/* Raw sockets. */
int td_raw_connect(int port, bool v6);
/* Make fd non-blocking. */
void td_nonblock(int fd);
int td_send_all(int fd, const void *buf, size_t len);
/* A frame header (current version, no flags) announcing body_len bytes,
 * written to out[KVS_FRAME_HEADER_SIZE]: for frames built by hand. */
void td_put_header(uint8_t *out, uint64_t id, uint32_t body_len);
int td_send_request(int fd, uint64_t id, uint16_t version,
                    const Kvs__V1__Request *req);
/* Read one response frame: 0 with *r set, 1 on EOF, -1 on timeout/error. */
int td_read_response(int fd, int timeout_ms, kvs_frame_header_t *h,
                     Kvs__V1__Response **r);
/* Send one request and wait for its answer: the answer's status, or a
 * value below -100000 when none came (-100001 send, -100002 read,
 * -100003 an answer to another id). */
int td_call(int fd, uint64_t id, const Kvs__V1__Request *req, int timeout_ms);
/* Send Hello (token may be NULL) and read its answer (td_call's result). */
int td_hello(int fd, const char *token);
/* true when the peer closes within timeout_ms (bytes before EOF ignored). */
bool td_wait_eof(int fd, int timeout_ms);
/* GET path on the HTTP port; returns malloc'ed body (NULL on failure). */
char *td_http_get(int port, const char *path, int *status);
/* Value of an unlabelled metric line "name value", or -1. */
double td_metric(const char *body, const char *name);

#endif
