/*
 * log.c: kvstored's logger: one logfmt line per event on stderr
 * (`ts=2025-01-01T00:00:00.123Z level=info event=listen addr=...`), so that
 * journald, kubectl logs and grep all work without a parser.
 *
 * A line is formatted into a stack buffer and written with one write(2), so
 * lines from worker threads never interleave.
 *
 * With log_file, lines go to that file instead. Rotation (SIGHUP) opens the
 * path again and dup2()s the new file over the descriptor writers use: dup2
 * swaps it atomically, so a worker thread in the middle of kvs__log writes
 * to the old file or the new one, never to a closed descriptor, and no lock
 * is needed on the logging path.
 */
#include "server_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int log_min = KVS__LOG_INFO;
/* Set once at startup, before any other thread exists; reopen only
 * changes what the descriptor points at. */
static int log_fd = STDERR_FILENO;
static char *log_path;

static int open_log(const char *path) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    return fd < 0 ? -errno : fd;
}

int kvs__log_open(const char *path) {
    if (!path || !path[0])
        return 0;
    char *dup = strdup(path);
    if (!dup)
        return -ENOMEM;
    int fd = open_log(path);
    if (fd < 0) {
        free(dup);
        return fd;
    }
    if (log_fd != STDERR_FILENO)
        close(log_fd);
    free(log_path);
    log_fd = fd;
    log_path = dup;
    return 0;
}

int kvs__log_reopen(void) {
    if (!log_path)
        return 0;
    int fd = open_log(log_path);
    if (fd < 0)
        return fd;
    int rc = dup2(fd, log_fd) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

const char *kvs__log_path(void) {
    return log_path;
}

void kvs__log_set_level(const char *level) {
    if (!strcmp(level, "debug"))
        log_min = KVS__LOG_DEBUG;
    else if (!strcmp(level, "warn"))
        log_min = KVS__LOG_WARN;
    else if (!strcmp(level, "error"))
        log_min = KVS__LOG_ERROR;
    else
        log_min = KVS__LOG_INFO;
}

const char *kvs__logq(char *buf, size_t len, const char *s) {
    size_t o = 0;
    if (len < 3) {
        if (len)
            buf[0] = 0;
        return buf;
    }
    buf[o++] = '"';
    for (; *s && o + 3 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            buf[o++] = '?'; /* no control characters in one-line logs */
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o++] = '"';
    buf[o] = 0;
    return buf;
}

void kvs__log(int level, const char *event, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < log_min)
        return;
    char line[2048];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, sizeof(line),
                     "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s "
                     "event=%s",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                     tm.tm_min, tm.tm_sec, (long)(tv.tv_usec / 1000),
                     names[level], event);
    if (fmt && *fmt && n > 0 && (size_t)n < sizeof(line) - 2) {
        line[n++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
    }
    if (n < 0)
        return;
    if ((size_t)n > sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    ssize_t w = write(log_fd, line, (size_t)n);
    (void)w; /* nowhere to report a failing log write */
}
