/*
 * daemon.c: process and raw-socket helpers for the kvstored integration
 * tests (see daemon.h). Loopback only: 127.0.0.1 and ::1.
 */
#include "daemon.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

double td_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void td_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int td_start(test_daemon_t *d, const char *const *extra) {
    if (!d->dir[0]) {
        snprintf(d->dir, sizeof(d->dir), "/tmp/kvs-srv-test-XXXXXX");
        if (!mkdtemp(d->dir))
            return -errno;
    }
    char pf[256], data[256], port[16];
    snprintf(pf, sizeof(pf), "%s/port", d->dir);
    snprintf(data, sizeof(data), "%s/data", d->dir);
    snprintf(d->sock, sizeof(d->sock), "%s/sock", d->dir);
    snprintf(d->log, sizeof(d->log), "%s/log", d->dir);
    snprintf(port, sizeof(port), "%d", d->port);
    unlink(pf);
    const char *argv[64] = {KVS_BINARY_DIR "/server/kvstored",
                            "--bind",
                            "127.0.0.1,::1",
                            "--port",
                            port,
                            "--http-port",
                            "0",
                            "--port-file",
                            pf,
                            "--data-dir",
                            data,
                            "--unix-socket",
                            d->sock,
                            "--workers",
                            "2",
                            "--engine-threads",
                            "1",
                            "--build-threads",
                            "1",
                            "--log-level",
                            "info"};
    int n = 0;
    while (argv[n])
        n++;
    for (int i = 0; extra && extra[i] && n < 62; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 2);
            dup2(fd, 1);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    d->pid = pid;
    for (int i = 0; i < 1000; i++) { /* up to 10 s */
        FILE *f = fopen(pf, "r");
        if (f) {
            char key[32];
            int v;
            while (fscanf(f, "%31s %d", key, &v) == 2) {
                if (!strcmp(key, "port"))
                    d->port = v;
                else if (!strcmp(key, "http_port"))
                    d->http_port = v;
            }
            fclose(f);
            return 0;
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            d->pid = 0;
            td_dump_log(d);
            return -1;
        }
        td_sleep_ms(10);
    }
    return -ETIMEDOUT;
}

int td_stop(test_daemon_t *d) {
    return td_stop_within(d, 20000, NULL);
}

int td_stop_within(test_daemon_t *d, int timeout_ms, double *seconds) {
    if (d->pid <= 0)
        return -1;
    double t0 = td_now_ms();
    kill(d->pid, SIGTERM);
    int st = 0;
    for (int t = 0; t <= timeout_ms; t += 10) {
        pid_t r = waitpid(d->pid, &st, WNOHANG);
        if (r == d->pid) {
            d->pid = 0;
            if (seconds)
                *seconds = (td_now_ms() - t0) / 1e3;
            if (WIFEXITED(st))
                return WEXITSTATUS(st);
            td_dump_log(d);
            return -1;
        }
        td_sleep_ms(10);
    }
    if (seconds)
        *seconds = (td_now_ms() - t0) / 1e3;
    kill(d->pid, SIGKILL);
    waitpid(d->pid, &st, 0);
    d->pid = 0;
    td_dump_log(d);
    return -1;
}

void td_cleanup(test_daemon_t *d) {
    if (d->pid > 0)
        td_stop(d);
    if (d->dir[0]) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", d->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "cannot remove %s\n", d->dir);
    }
    d->dir[0] = 0;
}

void td_kill_cleanup(test_daemon_t *d) {
    if (d->pid > 0) {
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
        d->pid = 0;
    }
    td_cleanup(d);
}

void td_dump_log(const test_daemon_t *d) {
    FILE *f = fopen(d->log, "r");
    if (!f)
        return;
    char line[1024];
    fprintf(stderr, "---- kvstored log %s\n", d->log);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fclose(f);
}

char *td_slurp(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 2) {
            char *b = realloc(buf, cap * 2);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf)
        buf[len] = 0;
    return buf;
}

bool td_log_wait(const char *path, const char *needle, int timeout_ms) {
    for (int t = 0;; t += 20) {
        char *s = td_slurp(path);
        bool found = s && strstr(s, needle);
        free(s);
        if (found)
            return true;
        if (t >= timeout_ms)
            return false;
        td_sleep_ms(20);
    }
}

long td_rss_kb(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmRSS:", 6)) {
            kb = atol(line + 6);
            break;
        }
    fclose(f);
    return kb;
}

kvs_client_t *td_client(const test_daemon_t *d, int v6, const char *token) {
    char addr[256];
    if (v6 == 2)
        snprintf(addr, sizeof(addr), "unix:%s", d->sock);
    else if (v6)
        snprintf(addr, sizeof(addr), "[::1]:%d", d->port);
    else
        snprintf(addr, sizeof(addr), "127.0.0.1:%d", d->port);
    const char *addrs[1] = {addr};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 1;
    o.auth_token = token;
    o.request_timeout_ms = 20000;
    kvs_client_t *c = NULL;
    if (kvs_client_open(&o, &c))
        return NULL;
    return c;
}

int td_raw_connect(int port, bool v6) {
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int rc;
    if (v6) {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6,
                                 .sin6_port = htons((uint16_t)port)};
        inet_pton(AF_INET6, "::1", &a.sin6_addr);
        rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port)};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
    }
    if (rc) {
        int e = errno;
        close(fd);
        return -e;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

void td_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

void td_put_header(uint8_t *out, uint64_t id, uint32_t body_len) {
    kvs_frame_header_t h = {.magic = KVS_FRAME_MAGIC,
                            .version = KVS_PROTOCOL_VERSION,
                            .request_id = id,
                            .body_len = body_len};
    kvs_frame_header_encode(&h, out);
}

int td_send_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -errno;
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

int td_send_request(int fd, uint64_t id, uint16_t version,
                    const Kvs__V1__Request *req) {
    uint8_t *buf;
    size_t len;
    int rc = kvs_frame_encode(id, 0, &req->base, KVS_FRAME_MAX_BODY_LIMIT, &buf,
                              &len);
    if (rc)
        return rc;
    if (version != KVS_PROTOCOL_VERSION) {
        buf[4] = (uint8_t)version;
        buf[5] = (uint8_t)(version >> 8);
    }
    rc = td_send_all(fd, buf, len);
    free(buf);
    return rc;
}

static int read_exact(int fd, void *buf, size_t len, int timeout_ms) {
    uint8_t *p = buf;
    while (len) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, timeout_ms);
        if (r == 0)
            return -1;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0)
            return 1;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return errno == ECONNRESET ? 1 : -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int td_read_response(int fd, int timeout_ms, kvs_frame_header_t *h,
                     Kvs__V1__Response **r) {
    uint8_t hdr[KVS_FRAME_HEADER_SIZE];
    int rc = read_exact(fd, hdr, sizeof(hdr), timeout_ms);
    if (rc)
        return rc;
    if (kvs_frame_header_decode(hdr, sizeof(hdr), KVS_FRAME_MAX_BODY_LIMIT, h,
                                NULL, 0))
        return -1;
    uint8_t *body = malloc(h->body_len ? h->body_len : 1);
    if (!body)
        return -1;
    rc = read_exact(fd, body, h->body_len, timeout_ms);
    if (rc) {
        free(body);
        return rc;
    }
    rc = kvs_frame_decode_response(body, h->body_len, r, NULL, 0) ? -1 : 0;
    free(body);
    return rc;
}

int td_call(int fd, uint64_t id, const Kvs__V1__Request *req, int timeout_ms) {
    if (td_send_request(fd, id, KVS_PROTOCOL_VERSION, req))
        return -100001;
    kvs_frame_header_t h;
    Kvs__V1__Response *r = NULL;
    if (td_read_response(fd, timeout_ms, &h, &r))
        return -100002;
    int st = r->status;
    if (h.request_id != id)
        st = -100003;
    kvs__v1__response__free_unpacked(r, NULL);
    return st;
}

int td_hello(int fd, const char *token) {
    Kvs__V1__Request req = KVS__V1__REQUEST__INIT;
    Kvs__V1__HelloRequest h = KVS__V1__HELLO_REQUEST__INIT;
    h.protocol_version = KVS_PROTOCOL_VERSION;
    h.auth_token = (char *)(token ? token : "");
    h.client_name = (char *)"kvs-test";
    req.op_case = KVS__V1__REQUEST__OP_HELLO;
    req.hello = &h;
    return td_call(fd, 1, &req, 10000);
}

bool td_wait_eof(int fd, int timeout_ms) {
    uint8_t buf[4096];
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, timeout_ms);
        if (r <= 0)
            return false;
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            return true;
        if (n < 0 && errno != EINTR)
            return false;
    }
}

char *td_http_get(int port, const char *path, int *status) {
    int fd = td_raw_connect(port, false);
    if (fd < 0)
        return NULL;
    char req[256];
    int n =
        snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path);
    if (td_send_all(fd, req, (size_t)n)) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, 5000) <= 0)
            break;
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = 0;
    *status = 0;
    sscanf(buf, "HTTP/1.%*d %d", status);
    char *body = strstr(buf, "\r\n\r\n");
    if (!body) {
        free(buf);
        return NULL;
    }
    memmove(buf, body + 4, strlen(body + 4) + 1);
    return buf;
}

double td_metric(const char *body, const char *name) {
    size_t nl = strlen(name);
    for (const char *p = body; p && *p;
         p = strchr(p, '\n'), p = p ? p + 1 : p) {
        if (!strncmp(p, name, nl) && p[nl] == ' ')
            return atof(p + nl + 1);
    }
    return -1;
}
