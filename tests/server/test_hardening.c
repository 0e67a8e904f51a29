/*
 * test_hardening.c: integration tests of kvstored's operational edges, each
 * against a real daemon on loopback: the HTTP port's connection limit and
 * timeout, shutdown with idle HTTP connections, what --unix-socket may and
 * may not remove, the modes of the files kvstored creates, SIGHUP, the
 * --auth-token warning, and the /metrics exposition (conventions checked
 * here; promtool's own linter when it is installed).
 *
 * Every wait is bounded; each test starts its own daemon (in memory unless
 * it needs the data directory) so that the tests do not depend on order.
 */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* Seconds on a monotonic clock. */
static double now_s(void) {
    return td_now_ms() / 1e3;
}

static bool log_has(const char *path, const char *needle) {
    return td_log_wait(path, needle, 0);
}

static int file_mode(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0 ? (int)(st.st_mode & 07777) : -1;
}

static bool ping_ok(const test_daemon_t *d, int how) {
    kvs_client_t *c = td_client(d, how, NULL);
    if (!c)
        return false;
    int rc = kvs_client_ping(c, 0);
    kvs_client_close(c);
    return rc == 0;
}

/* Start a daemon that is expected to refuse to start: true when it exits
 * within 10 s without writing its port file (its log says why). */
static bool start_fails(test_daemon_t *d, const char *const *extra) {
    if (td_start(d, extra) == 0) {
        td_stop(d);
        return false;
    }
    return true;
}

/* The daemons of the running test. A failed assertion leaves the test
 * at once: reap() then kills what it left running and removes its files,
 * so no daemon outlives the test binary. */
static test_daemon_t D, R;

static int fresh(void **state) {
    (void)state;
    memset(&D, 0, sizeof(D));
    memset(&R, 0, sizeof(R));
    return 0;
}

static int reap(void **state) {
    (void)state;
    td_kill_cleanup(&D);
    td_kill_cleanup(&R);
    return 0;
}

/* ------------------------------------------------------------ HTTP port */

/* Over the limit: answered 503 and closed at once, RPC unaffected; within
 * the limit: closed by the timeout, not before. */
static void test_server_http_limit_and_timeout(void **state) {
    (void)state;
    enum { LIMIT = 8, OVER = 200, TIMEOUT_MS = 3000 };
    const char *extra[] = {
        "--data-dir", "",  "--http-max-connections", "8", "--http-timeout-ms",
        "3000",       NULL};
    assert_int_equal(td_start(&D, extra), 0);

    int idle[LIMIT];
    double t_open = now_s();
    for (int i = 0; i < LIMIT; i++) {
        idle[i] = td_raw_connect(D.http_port, false);
        assert_true(idle[i] >= 0);
    }
    td_sleep_ms(100); /* let the daemon accept (and count) them */
    for (int i = 0; i < OVER; i++) {
        int fd = td_raw_connect(D.http_port, false);
        assert_true(fd >= 0);
        char buf[256] = "";
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        assert_int_equal(poll(&pfd, 1, 2000), 1);
        ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
        assert_true(n > 0);
        assert_non_null(strstr(buf, "HTTP/1.1 503"));
        assert_true(td_wait_eof(fd, 2000));
        close(fd);
    }
    /* The RPC port still takes connections. */
    assert_true(ping_ok(&D, 0));
    assert_true(ping_ok(&D, 2));
    /* Else the idle ones may have timed out during the loop, and some of
     * the OVER were let in: the test would prove nothing. */
    assert_true(now_s() - t_open < TIMEOUT_MS / 1000.0);
    /* The idle ones are closed by the timeout, and not much before it. */
    for (int i = 0; i < LIMIT; i++) {
        assert_true(td_wait_eof(idle[i], 3 * TIMEOUT_MS));
        close(idle[i]);
    }
    assert_true(now_s() - t_open >= TIMEOUT_MS / 1000.0 * 0.9);

    int status = 0;
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_int_equal(status, 200);
    assert_true(td_metric(m, "kvstored_http_connections_refused_total") ==
                OVER);
    assert_true(td_metric(m, "kvstored_http_timeouts_total") >= LIMIT);
    assert_true(td_metric(m, "kvstored_http_connections") == 1); /* this */
    free(m);
    assert_true(log_has(D.log, "event=http_refused"));
    double secs;
    assert_int_equal(td_stop_within(&D, 5000, &secs), 0);
    td_cleanup(&D);
}

/* The report: thousands of idle HTTP connections used up the daemon's file
 * descriptors, and RPC connections were then accepted and dropped. Here
 * with the daemon's limit lowered to 160 descriptors (prlimit) and 400 idle
 * HTTP connections. */
static void test_server_http_fd_exhaustion(void **state) {
    (void)state;
    enum { N = 400 };
    struct rlimit mine;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &mine), 0);
    if (mine.rlim_cur < N + 64) {
        fprintf(stderr, "SKIP: this process may open only %llu files\n",
                (unsigned long long)mine.rlim_cur);
        skip();
    }
    const char *extra[] = {"--data-dir", "", NULL};
    assert_int_equal(td_start(&D, extra), 0);
    struct rlimit low = {160, 160};
    if (prlimit(D.pid, RLIMIT_NOFILE, &low, NULL) != 0) {
        fprintf(stderr, "SKIP: prlimit on the daemon: %s\n", strerror(errno));
        skip(); /* reap() stops the daemon */
    }
    int *fds = calloc(N, sizeof(int));
    assert_non_null(fds);
    for (int i = 0; i < N; i++) {
        fds[i] = td_raw_connect(D.http_port, false);
        assert_true(fds[i] >= 0);
    }
    td_sleep_ms(200);
    for (int i = 0; i < 3; i++) {
        assert_true(ping_ok(&D, 0));
        assert_true(ping_ok(&D, 1));
        assert_true(ping_ok(&D, 2));
    }
    for (int i = 0; i < N; i++)
        close(fds[i]);
    free(fds);
    td_sleep_ms(100);
    int status = 0;
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_int_equal(status, 200);
    assert_true(td_metric(m, "kvstored_http_connections_refused_total") >=
                N - 64);
    free(m);
    double secs;
    assert_int_equal(td_stop_within(&D, 8000, &secs), 0);
    td_cleanup(&D);
}

/* An idle HTTP connection used to keep the loop, and so the daemon, alive
 * forever after SIGTERM. */
static void test_server_http_idle_shutdown(void **state) {
    (void)state;
    /* The default http_timeout_ms (10 s) is well past the 5 s allowed:
     * the stop, not the timeout, must close them. */
    const char *extra[] = {"--data-dir", "", NULL};
    assert_int_equal(td_start(&D, extra), 0);
    int fds[6];
    for (int i = 0; i < 6; i++) {
        fds[i] = td_raw_connect(D.http_port, false);
        assert_true(fds[i] >= 0);
    }
    /* One with half a request, one with a request it never reads. */
    assert_int_equal(td_send_all(fds[0], "GET /metr", 9), 0);
    assert_int_equal(td_send_all(fds[1], "GET /metrics HTTP/1.1\r\n\r\n", 25),
                     0);
    assert_true(ping_ok(&D, 0));
    td_sleep_ms(100);
    double secs;
    assert_int_equal(td_stop_within(&D, 8000, &secs), 0);
    assert_true(secs < 5.0);
    for (int i = 0; i < 6; i++) {
        assert_true(td_wait_eof(fds[i], 1000));
        close(fds[i]);
    }
    assert_true(log_has(D.log, "event=http_closed"));
    td_cleanup(&D);
}

/* --------------------------------------------------------- Unix socket */

static void test_server_unix_socket_path(void **state) {
    (void)state;
    snprintf(D.dir, sizeof(D.dir), "/tmp/kvs-hard-test-XXXXXX");
    assert_non_null(mkdtemp(D.dir));
    char path[100]; /* fits sun_path */
    snprintf(path, sizeof(path), "%.80s/notasock", D.dir);

    /* A regular file: refused, kept, contents intact. */
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("precious\n", f);
    fclose(f);
    const char *extra[] = {"--data-dir", "", "--unix-socket", path, NULL};
    assert_true(start_fails(&D, extra));
    char *s = td_slurp(path);
    assert_non_null(s);
    assert_string_equal(s, "precious\n");
    free(s);
    assert_true(log_has(D.log, "event=unix_socket_path_taken"));
    assert_true(log_has(D.log, "type=file"));
    unlink(path);

    /* A directory: refused, kept. */
    assert_int_equal(mkdir(path, 0700), 0);
    assert_true(start_fails(&D, extra));
    struct stat st;
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_true(log_has(D.log, "type=directory"));
    rmdir(path);

    /* A symlink (here to a file): refused; neither link nor target goes. */
    char target[128];
    snprintf(target, sizeof(target), "%.80s/target", D.dir);
    f = fopen(target, "w");
    assert_non_null(f);
    fputs("keep\n", f);
    fclose(f);
    assert_int_equal(symlink(target, path), 0);
    assert_true(start_fails(&D, extra));
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(access(target, F_OK), 0);
    assert_true(log_has(D.log, "type=symlink"));
    unlink(path);
    unlink(target);

    /* A live socket (someone listens): refused, and left working. */
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(l, 4), 0);
    assert_true(start_fails(&D, extra));
    assert_true(log_has(D.log, "event=unix_socket_in_use"));
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_int_equal(connect(c, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(c);
    /* ...then stale: its owner died without unlinking. Replaced. */
    close(l);
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(td_start(&D, extra), 0);
    assert_true(log_has(D.log, "event=unix_socket_stale"));
    snprintf(D.sock, sizeof(D.sock), "%s", path);
    assert_true(ping_ok(&D, 2));
    assert_int_equal(td_stop(&D), 0);
    /* Our own socket is removed at exit. */
    assert_int_equal(lstat(path, &st), -1);
    td_cleanup(&D);
}

/* ------------------------------------------------------- file modes */

static void test_server_file_modes(void **state) {
    (void)state;
    mode_t old = umask(022); /* the usual umask: 0755 dirs, 0644 files */
    const char *extra[] = {"--log-file", NULL, NULL};
    snprintf(D.dir, sizeof(D.dir), "/tmp/kvs-hard-test-XXXXXX");
    assert_non_null(mkdtemp(D.dir));
    char logf[256], path[256];
    snprintf(logf, sizeof(logf), "%s/kvstored.log", D.dir);
    extra[1] = logf;
    assert_int_equal(td_start(&D, extra), 0);
    snprintf(path, sizeof(path), "%s/data", D.dir);
    assert_int_equal(file_mode(path), 0700);
    assert_int_equal(file_mode(D.sock), 0660);
    snprintf(path, sizeof(path), "%s/port", D.dir);
    assert_int_equal(file_mode(path), 0600);
    assert_int_equal(file_mode(logf), 0600);
    assert_true(td_log_wait(logf, "event=ready", 5000));
    assert_false(log_has(logf, "data_dir_permissions"));
    assert_true(ping_ok(&D, 2));
    assert_int_equal(td_stop(&D), 0);

    /* An existing data dir open to others: served, with a warning, and the
     * store tightens its own directory and files (engine/persist.c). */
    snprintf(path, sizeof(path), "%s/data", D.dir);
    assert_int_equal(chmod(path, 0755), 0);
    const char *extra2[] = {"--unix-socket-mode", "0600", NULL};
    assert_int_equal(td_start(&D, extra2), 0);
    assert_int_equal(file_mode(D.sock), 0600);
    assert_int_equal(file_mode(path), 0700);
    assert_true(log_has(D.log, "event=data_dir_permissions"));
    assert_true(ping_ok(&D, 2));
    assert_int_equal(td_stop(&D), 0);

    /* Decimal-looking or out-of-range modes are configuration errors. */
    const char *bad[] = {"--unix-socket-mode", "660x", NULL};
    assert_true(start_fails(&D, bad));
    assert_true(log_has(D.log, "unix_socket_mode must be octal"));
    const char *bad2[] = {"--unix-socket-mode", "1777", NULL};
    assert_true(start_fails(&D, bad2));
    td_cleanup(&D);
    umask(old);
}

/* ------------------------------------------------------------ SIGHUP */

static void test_server_sighup(void **state) {
    (void)state;
    /* Without a log file: logged and ignored. */
    const char *extra[] = {"--data-dir", "", NULL};
    assert_int_equal(td_start(&D, extra), 0);
    assert_int_equal(kill(D.pid, SIGHUP), 0);
    assert_true(td_log_wait(D.log, "signal=SIGHUP action=ignored", 5000));
    assert_int_equal(waitpid(D.pid, NULL, WNOHANG), 0); /* still running */
    assert_true(ping_ok(&D, 0));
    assert_int_equal(td_stop(&D), 0);
    td_cleanup(&D);

    /* With one: rotated like logrotate does (rename, SIGHUP). */
    snprintf(R.dir, sizeof(R.dir), "/tmp/kvs-hard-test-XXXXXX");
    assert_non_null(mkdtemp(R.dir));
    char logf[256], rotated[256];
    snprintf(logf, sizeof(logf), "%s/kvstored.log", R.dir);
    snprintf(rotated, sizeof(rotated), "%s/kvstored.log.1", R.dir);
    const char *extra2[] = {"--data-dir", "", "--log-file", logf, NULL};
    assert_int_equal(td_start(&R, extra2), 0);
    assert_true(td_log_wait(logf, "event=ready", 5000));
    assert_int_equal(rename(logf, rotated), 0);
    assert_int_equal(kill(R.pid, SIGHUP), 0);
    assert_true(td_log_wait(logf, "action=log_reopen", 5000));
    assert_true(log_has(logf, "status=ok"));
    assert_int_equal(file_mode(logf), 0600);
    assert_true(ping_ok(&R, 0));
    assert_int_equal(td_stop(&R), 0);
    /* The shutdown went to the new file, nothing more to the old one. */
    assert_true(log_has(logf, "event=exit"));
    assert_false(log_has(rotated, "event=exit"));
    assert_false(log_has(rotated, "log_reopen"));
    td_cleanup(&R);
}

/* --------------------------------------------------------- auth token */

static void test_server_auth_token_sources(void **state) {
    (void)state;
    const char *extra[] = {"--data-dir", "", "--auth-token", "s3cret-flag",
                           NULL};
    assert_int_equal(td_start(&D, extra), 0);
    assert_true(log_has(D.log, "event=auth_token_on_command_line"));
    /* Blanked in /proc/PID/cmdline, still the token. */
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)D.pid);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char cmd[4096];
    size_t n = fread(cmd, 1, sizeof(cmd) - 1, f);
    fclose(f);
    assert_true(n > 0);
    assert_null(memmem(cmd, n, "s3cret", 6));
    assert_non_null(memmem(cmd, n, "xxxxxxxxxxx", 11));
    kvs_client_t *c = td_client(&D, 0, "s3cret-flag");
    assert_non_null(c);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    assert_int_equal(td_stop(&D), 0);

    /* From a file: no command-line warning; one for a readable file. */
    char tf[256];
    snprintf(tf, sizeof(tf), "%s/token", D.dir);
    f = fopen(tf, "w");
    assert_non_null(f);
    fputs("s3cret-file\n", f);
    fclose(f);
    assert_int_equal(chmod(tf, 0644), 0);
    const char *extra2[] = {"--data-dir", "", "--auth-token-file", tf, NULL};
    assert_int_equal(td_start(&D, extra2), 0);
    assert_true(log_has(D.log, "event=auth_token_file_permissions"));
    c = td_client(&D, 0, "s3cret-file");
    assert_non_null(c);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    assert_int_equal(td_stop(&D), 0);
    assert_int_equal(chmod(tf, 0600), 0);
    unlink(D.log); /* the log appends: look at this run's lines only */
    assert_int_equal(td_start(&D, extra2), 0);
    assert_false(log_has(D.log, "auth_token_file_permissions"));
    assert_false(log_has(D.log, "auth_token_on_command_line"));
    assert_int_equal(td_stop(&D), 0);
    td_cleanup(&D);
}

/* ------------------------------------------------------------ metrics */

static bool valid_name(const char *s, size_t n) {
    if (!n || !((s[0] >= 'a' && s[0] <= 'z') || s[0] == '_'))
        return false;
    for (size_t i = 0; i < n; i++) /* snake_case: no upper case, no '-' */
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_'))
            return false;
    return true;
}

static bool has_suffix(const char *s, size_t n, const char *suf) {
    size_t m = strlen(suf);
    return n >= m && !memcmp(s + n - m, suf, m);
}

/* Prometheus conventions, the ones promtool's linter checks and ours:
 * every sample's family has HELP then TYPE before its first sample, each
 * once; counters end in _total and nothing else does; units are base units
 * (seconds, bytes) at the end of the name; histograms have _bucket with le
 * up to +Inf, _sum and _count. Returns the number of samples, fails the
 * test on the first violation. */
static int check_exposition(const char *body) {
    char fam[128] = "", type[32] = "", help_of[128] = "";
    char seen[64][128];
    int n_seen = 0, samples = 0;
    bool inf_seen = true;
    for (const char *p = body; *p;) {
        const char *e = strchr(p, '\n');
        assert_non_null(e); /* every line ends in \n, the last too */
        size_t len = (size_t)(e - p);
        char line[1024];
        assert_true(len < sizeof(line));
        memcpy(line, p, len);
        line[len] = 0;
        p = e + 1;
        if (!strncmp(line, "# HELP ", 7)) {
            char name[128];
            assert_int_equal(sscanf(line + 7, "%127s", name), 1);
            assert_true(strlen(line + 7) > strlen(name) + 1); /* has text */
            for (int i = 0; i < n_seen; i++)
                if (!strcmp(seen[i], name))
                    fail_msg("second HELP for %s", name);
            assert_true(n_seen < 64);
            snprintf(seen[n_seen++], sizeof(seen[0]), "%s", name);
            assert_true(inf_seen); /* the last histogram was complete */
            snprintf(help_of, sizeof(help_of), "%s", name);
            fam[0] = 0;
            continue;
        }
        if (!strncmp(line, "# TYPE ", 7)) {
            char name[128], t[32];
            assert_int_equal(sscanf(line + 7, "%127s %31s", name, t), 2);
            if (strcmp(name, help_of))
                fail_msg("TYPE %s not right after its HELP", name);
            snprintf(fam, sizeof(fam), "%s", name);
            snprintf(type, sizeof(type), "%s", t);
            size_t n = strlen(fam);
            assert_true(valid_name(fam, n));
            if (!strcmp(t, "counter")) {
                if (!has_suffix(fam, n, "_total"))
                    fail_msg("counter %s does not end in _total", fam);
                n -= 6;
            } else if (!strcmp(t, "gauge") || !strcmp(t, "histogram")) {
                if (has_suffix(fam, n, "_total"))
                    fail_msg("%s %s ends in _total", t, fam);
            } else {
                fail_msg("unexpected type %s", t);
            }
            /* A unit word is the name's last word, and a base unit. */
            static const char *units[] = {"seconds", "bytes"};
            static const char *bad[] = {
                "_ms",       "millis",    "micros",  "_kb",     "_mb",  "_gb",
                "kilobytes", "megabytes", "percent", "minutes", "hours"};
            for (size_t i = 0; i < 2; i++) {
                const char *u = strstr(fam, units[i]);
                if (u && (size_t)(u - fam) + strlen(units[i]) != n)
                    fail_msg("%s: unit %s is not at the end", fam, units[i]);
            }
            for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
                if (strstr(fam, bad[i]))
                    fail_msg("%s: not a base unit (%s)", fam, bad[i]);
            inf_seen = strcmp(t, "histogram") != 0;
            continue;
        }
        assert_true(line[0] != '#' && line[0] != 0);
        /* A sample: name[{labels}] value */
        size_t nl = strcspn(line, "{ ");
        if (!fam[0])
            fail_msg("sample without HELP and TYPE: %s", line);
        bool ok;
        if (!strcmp(type, "histogram")) {
            ok = (nl == strlen(fam) + 7 && !strncmp(line, fam, strlen(fam)) &&
                  !strncmp(line + strlen(fam), "_bucket", 7)) ||
                 (nl == strlen(fam) + 4 && !strncmp(line, fam, strlen(fam)) &&
                  (!strncmp(line + strlen(fam), "_sum", 4))) ||
                 (nl == strlen(fam) + 6 && !strncmp(line, fam, strlen(fam)) &&
                  !strncmp(line + strlen(fam), "_count", 6));
            if (strstr(line, "_bucket{") && strstr(line, "le=\"+Inf\""))
                inf_seen = true;
        } else {
            ok = nl == strlen(fam) && !strncmp(line, fam, nl);
        }
        if (!ok)
            fail_msg("sample %s is not of family %s (%s)", line, fam, type);
        const char *v = strrchr(line, ' ');
        assert_non_null(v);
        char *end;
        double val = strtod(v + 1, &end);
        assert_true(*end == 0 && end != v + 1);
        if (!strcmp(type, "counter"))
            assert_true(val >= 0);
        samples++;
    }
    assert_true(inf_seen);
    return samples;
}

static void test_server_metrics_conventions(void **state) {
    (void)state;
    assert_int_equal(td_start(&D, NULL), 0);
    kvs_client_t *c = td_client(&D, 0, NULL);
    assert_non_null(c);
    assert_int_equal(kvs_client_ping(c, 0), 0);
    kvs_client_close(c);
    int status = 0;
    char *h = td_http_get(D.http_port, "/healthz", &status); /* an http conn */
    free(h);
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_int_equal(status, 200);
    int n = check_exposition(m);
    assert_true(n > 50);
    /* The 13 families that went out without HELP, and the new ones. */
    static const char *must[] = {"kvstored_received_bytes_total",
                                 "kvstored_sent_bytes_total",
                                 "kvstored_connections",
                                 "kvstored_connections_total",
                                 "kvstored_connections_refused_total",
                                 "kvstored_protocol_errors_total",
                                 "kvstored_auth_failures_total",
                                 "kvstored_idle_closed_total",
                                 "kvstored_inflight_requests",
                                 "kvstored_uptime_seconds",
                                 "kvstore_index_bytes",
                                 "kvstore_builds_total",
                                 "kvstore_build_seconds_total",
                                 "kvstored_http_connections",
                                 "kvstored_http_timeouts_total"};
    for (size_t i = 0; i < sizeof(must) / sizeof(must[0]); i++) {
        char help[160];
        snprintf(help, sizeof(help), "# HELP %s ", must[i]);
        if (!strstr(m, help))
            fail_msg("no HELP for %s", must[i]);
        assert_true(td_metric(m, must[i]) >= 0);
    }
    /* Histogram buckets are cumulative and end at the count. */
    assert_non_null(strstr(m, "kvstored_request_duration_seconds_bucket{op="
                              "\"ping\",le=\"+Inf\"}"));
    free(m);
    assert_int_equal(td_stop(&D), 0);
    td_cleanup(&D);
}

/* promtool (Debian: package prometheus) is the reference linter; CI hosts
 * without it skip, loudly. */
static const char *find_promtool(void) {
    static const char *where[] = {"/usr/bin/promtool",
                                  "/usr/local/bin/promtool", "/bin/promtool"};
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]); i++)
        if (access(where[i], X_OK) == 0)
            return where[i];
    return NULL;
}

static void test_server_metrics_promtool(void **state) {
    (void)state;
    const char *promtool = find_promtool();
    if (!promtool) {
        fprintf(stderr, "SKIP test_server_metrics_promtool: promtool not "
                        "installed (apt-get install prometheus)\n");
        skip();
    }
    assert_int_equal(td_start(&D, NULL), 0);
    assert_true(ping_ok(&D, 0));
    int status = 0;
    char *m = td_http_get(D.http_port, "/metrics", &status);
    assert_non_null(m);
    assert_int_equal(status, 200);
    char in[256], out[256], cmd[1024];
    snprintf(in, sizeof(in), "%s/metrics.txt", D.dir);
    snprintf(out, sizeof(out), "%s/promtool.txt", D.dir);
    FILE *f = fopen(in, "w");
    assert_non_null(f);
    fputs(m, f);
    fclose(f);
    free(m);
    snprintf(cmd, sizeof(cmd), "%s check metrics < '%s' > '%s' 2>&1", promtool,
             in, out);
    int rc = system(cmd);
    char *said = td_slurp(out);
    if (rc != 0 || (said && said[0]))
        fail_msg("promtool check metrics: status %d: %s", rc, said ? said : "");
    free(said);
    assert_int_equal(td_stop(&D), 0);
    td_cleanup(&D);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_server_http_limit_and_timeout,
                                        fresh, reap),
        cmocka_unit_test_setup_teardown(test_server_http_fd_exhaustion, fresh,
                                        reap),
        cmocka_unit_test_setup_teardown(test_server_http_idle_shutdown, fresh,
                                        reap),
        cmocka_unit_test_setup_teardown(test_server_unix_socket_path, fresh,
                                        reap),
        cmocka_unit_test_setup_teardown(test_server_file_modes, fresh, reap),
        cmocka_unit_test_setup_teardown(test_server_sighup, fresh, reap),
        cmocka_unit_test_setup_teardown(test_server_auth_token_sources, fresh,
                                        reap),
        cmocka_unit_test_setup_teardown(test_server_metrics_conventions, fresh,
                                        reap),
        cmocka_unit_test_setup_teardown(test_server_metrics_promtool, fresh,
                                        reap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
