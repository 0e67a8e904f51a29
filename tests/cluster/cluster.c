/*
 * cluster.c: see cluster.h. Loopback only (127.0.0.1).
 */
#include "cluster.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Nodes started and not yet cleaned up, by pid (0 once reaped) and
 * directory: copies, since a failed assertion leaves the test's tc_node_t
 * behind on its stack. */
#define MAX_LIVE 32
static pid_t live_pid[MAX_LIVE];
static char live_dir[MAX_LIVE][128];

static void live_add(pid_t pid, const char *dir) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (!live_dir[i][0]) {
            live_pid[i] = pid;
            snprintf(live_dir[i], sizeof(live_dir[i]), "%s", dir);
            return;
        }
}

/* The process is reaped; the directory stays listed until cleanup. */
static void live_reaped(pid_t pid) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live_pid[i] == pid)
            live_pid[i] = 0;
}

static void live_del_dir(const char *dir) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live_dir[i][0] && !strcmp(live_dir[i], dir))
            live_dir[i][0] = 0;
}

static void rm_rf(const char *dir);

void tc_reap_all(void) {
    for (int i = 0; i < MAX_LIVE; i++) {
        if (live_pid[i]) {
            kill(live_pid[i], SIGKILL);
            waitpid(live_pid[i], NULL, 0);
            live_pid[i] = 0;
        }
        if (live_dir[i][0])
            rm_rf(live_dir[i]);
        live_dir[i][0] = 0;
    }
}

void tc_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

long tc_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *tc_etcd_binary(void) {
    static const char *paths[] = {"/usr/bin/etcd", "/usr/local/bin/etcd"};
    for (size_t i = 0; i < 2; i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

/* A port free right now (the kernel's pick for port 0). Another process
 * could take it before etcd binds it; etcd would then fail to start and
 * the test says so. */
static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    socklen_t l = sizeof(a);
    int port = -1;
    if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof(a)) &&
        !getsockname(fd, (struct sockaddr *)&a, &l))
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static pid_t spawn(const char *const *argv, const char *log) {
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static void rm_rf(const char *dir) {
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
}

int tc_etcd_start(tc_etcd_t *e) {
    memset(e, 0, sizeof(*e));
    const char *bin = tc_etcd_binary();
    if (!bin)
        return -ENOENT;
    snprintf(e->dir, sizeof(e->dir), "/tmp/kvs-etcd-test-XXXXXX");
    if (!mkdtemp(e->dir))
        return -errno;
    e->port = free_port();
    e->peer_port = free_port();
    char data[192], log[192], client[64], peer[64], cluster[96];
    snprintf(data, sizeof(data), "%s/data", e->dir);
    snprintf(log, sizeof(log), "%s/log", e->dir);
    snprintf(client, sizeof(client), "http://127.0.0.1:%d", e->port);
    snprintf(peer, sizeof(peer), "http://127.0.0.1:%d", e->peer_port);
    snprintf(cluster, sizeof(cluster), "test=%s", peer);
    snprintf(e->endpoint, sizeof(e->endpoint), "%s", client);
    const char *argv[] = {bin,     "--name",
                          "test",  "--data-dir",
                          data,    "--listen-client-urls",
                          client,  "--advertise-client-urls",
                          client,  "--listen-peer-urls",
                          peer,    "--initial-advertise-peer-urls",
                          peer,    "--initial-cluster",
                          cluster, "--log-level",
                          "warn",  NULL};
    e->pid = spawn(argv, log);
    if (e->pid < 0)
        return -errno;
    kvs_etcd_t *c = NULL;
    if (kvs_etcd_new(e->endpoint, 500, &c, NULL, 0))
        return -EINVAL;
    int rc = -ETIMEDOUT;
    for (int i = 0; i < 150; i++) { /* 15 s */
        kvs_etcd_kv_t *kvs;
        size_t n;
        if (kvs_etcd_range_prefix(c, "/", &kvs, &n, NULL) == 0) {
            kvs_etcd_kvs_free(kvs, n);
            rc = 0;
            break;
        }
        int st;
        if (waitpid(e->pid, &st, WNOHANG) == e->pid) {
            e->pid = 0;
            rc = -ECHILD;
            break;
        }
        tc_sleep_ms(100);
    }
    kvs_etcd_free(c);
    return rc;
}

void tc_etcd_stop(tc_etcd_t *e) {
    if (e->pid > 0) {
        kill(e->pid, SIGTERM);
        waitpid(e->pid, NULL, 0);
        e->pid = 0;
    }
    if (e->dir[0])
        rm_rf(e->dir);
    e->dir[0] = 0;
}

static int node_spawn(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                      int ttl, const char *const *extra);

int tc_node_start(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                  const char *node_id, int ttl, const char *const *extra) {
    memset(n, 0, sizeof(*n));
    snprintf(n->node_id, sizeof(n->node_id), "%s", node_id);
    snprintf(n->dir, sizeof(n->dir), "/tmp/kvs-node-test-XXXXXX");
    if (!mkdtemp(n->dir))
        return -errno;
    return node_spawn(n, e, prefix, ttl, extra);
}

int tc_node_restart(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                    int ttl, const char *const *extra) {
    if (n->pid > 0 || !n->dir[0])
        return -EINVAL;
    char pf[192];
    snprintf(pf, sizeof(pf), "%s/port", n->dir);
    unlink(pf); /* the wait below is for the new process's */
    n->port = n->http_port = 0;
    return node_spawn(n, e, prefix, ttl, extra);
}

static int node_spawn(tc_node_t *n, const tc_etcd_t *e, const char *prefix,
                      int ttl, const char *const *extra) {
    char pf[192], data[192], ttl_s[16];
    snprintf(pf, sizeof(pf), "%s/port", n->dir);
    snprintf(data, sizeof(data), "%s/data", n->dir);
    snprintf(n->log, sizeof(n->log), "%s/log", n->dir);
    snprintf(ttl_s, sizeof(ttl_s), "%d", ttl);
    const char *argv[48] = {KVS_BINARY_DIR "/server/kvstored",
                            "--bind",
                            "127.0.0.1",
                            "--port",
                            "0",
                            "--http-port",
                            "0",
                            "--port-file",
                            pf,
                            "--data-dir",
                            data,
                            "--workers",
                            "1",
                            "--engine-threads",
                            "1",
                            "--build-threads",
                            "1",
                            "--node-id",
                            n->node_id,
                            "--etcd-endpoints",
                            e->endpoint,
                            "--etcd-prefix",
                            prefix,
                            "--etcd-lease-ttl",
                            ttl_s};
    int k = 0;
    while (argv[k])
        k++;
    for (int i = 0; extra && extra[i] && k < 46; i++)
        argv[k++] = extra[i];
    argv[k] = NULL;
    n->pid = spawn(argv, n->log);
    if (n->pid < 0)
        return -errno;
    live_add(n->pid, n->dir);
    for (int i = 0; i < 1000; i++) { /* 10 s */
        FILE *f = fopen(pf, "r");
        if (f) {
            char key[32];
            int v;
            while (fscanf(f, "%31s %d", key, &v) == 2) {
                if (!strcmp(key, "port"))
                    n->port = v;
                else if (!strcmp(key, "http_port"))
                    n->http_port = v;
            }
            fclose(f);
            return 0;
        }
        int st;
        if (waitpid(n->pid, &st, WNOHANG) == n->pid) {
            live_reaped(n->pid);
            n->pid = 0;
            tc_node_dump_log(n);
            return -ECHILD;
        }
        tc_sleep_ms(10);
    }
    return -ETIMEDOUT;
}

int tc_node_stop(tc_node_t *n) {
    if (n->pid <= 0)
        return -1;
    kill(n->pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 2000; i++) {
        if (waitpid(n->pid, &st, WNOHANG) == n->pid) {
            live_reaped(n->pid);
            n->pid = 0;
            return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        }
        tc_sleep_ms(10);
    }
    kill(n->pid, SIGKILL);
    waitpid(n->pid, &st, 0);
    live_reaped(n->pid);
    n->pid = 0;
    return -1;
}

void tc_node_kill(tc_node_t *n) {
    if (n->pid <= 0)
        return;
    kill(n->pid, SIGKILL);
    waitpid(n->pid, NULL, 0);
    live_reaped(n->pid);
    n->pid = 0;
}

void tc_node_cleanup(tc_node_t *n) {
    if (n->pid > 0)
        tc_node_stop(n);
    if (n->dir[0]) {
        rm_rf(n->dir);
        live_del_dir(n->dir);
    }
    n->dir[0] = 0;
}

void tc_node_dump_log(const tc_node_t *n) {
    FILE *f = fopen(n->log, "r");
    if (!f)
        return;
    char line[1024];
    fprintf(stderr, "---- kvstored log %s\n", n->log);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fclose(f);
}

int tc_members(const tc_etcd_t *e, const char *prefix, char *out, size_t cap) {
    kvs_etcd_t *c = NULL;
    char kp[256];
    out[0] = 0;
    if (kvs_etcd_new(e->endpoint, 1000, &c, NULL, 0) ||
        kvs_node_key_prefix(prefix, kp, sizeof(kp))) {
        kvs_etcd_free(c);
        return -1;
    }
    kvs_etcd_kv_t *kvs = NULL;
    size_t n = 0;
    int rc = kvs_etcd_range_prefix(c, kp, &kvs, &n, NULL);
    kvs_etcd_free(c);
    if (rc)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        kvs_node_record_t r;
        if (kvs_node_record_decode(kvs[i].value, kvs[i].value_len, &r))
            continue;
        int w = snprintf(out + o, cap - o, "%s%s", o ? "," : "", r.node_id);
        if (w < 0 || (size_t)w >= cap - o)
            break;
        o += (size_t)w;
    }
    kvs_etcd_kvs_free(kvs, n);
    return 0;
}

long tc_wait_members(const tc_etcd_t *e, const char *prefix, const char *want,
                     int timeout_ms) {
    long t0 = tc_now_ms();
    char got[1024];
    for (;;) {
        if (tc_members(e, prefix, got, sizeof(got)) == 0 && !strcmp(got, want))
            return tc_now_ms() - t0;
        if (tc_now_ms() - t0 > timeout_ms)
            return -1;
        tc_sleep_ms(50);
    }
}

double tc_metric(int http_port, const char *name) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)http_port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a))) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    static const char req[] = "GET /metrics HTTP/1.0\r\n\r\n";
    if (write(fd, req, sizeof(req) - 1) != (ssize_t)(sizeof(req) - 1)) {
        close(fd);
        return -1;
    }
    static char buf[1 << 20];
    size_t len = 0;
    ssize_t r;
    while (len + 1 < sizeof(buf) &&
           (r = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
        len += (size_t)r;
    close(fd);
    buf[len] = 0;
    size_t nl = strlen(name);
    for (char *p = buf; (p = strstr(p, name)); p += nl)
        if ((p == buf || p[-1] == '\n') && p[nl] == ' ')
            return atof(p + nl + 1);
    return -1;
}

double tc_metric_wait(int http_port, const char *name, double want,
                      int timeout_ms) {
    double v = tc_metric(http_port, name);
    for (int t = 0; v != want && t < timeout_ms; t += 20) {
        tc_sleep_ms(20);
        v = tc_metric(http_port, name);
    }
    return v;
}

tc_etcd_t tc_etcd;
bool tc_have_etcd;

int tc_group_setup(void **state) {
    (void)state;
    if (!tc_etcd_binary()) {
        fprintf(stderr, "etcd not installed (apt-get install etcd-server, or "
                        "scripts/install-deps.sh): cluster tests skipped\n");
        return 0;
    }
    int rc = tc_etcd_start(&tc_etcd);
    if (rc) {
        fprintf(stderr, "etcd did not start (%d); log in %s/log\n", rc,
                tc_etcd.dir);
        return -1;
    }
    tc_have_etcd = true;
    return 0;
}

/* A failed assertion skips the test's own cleanup: no daemon outlives it. */
int tc_test_teardown(void **state) {
    (void)state;
    tc_reap_all();
    return 0;
}

int tc_group_teardown(void **state) {
    (void)state;
    tc_reap_all();
    if (tc_have_etcd)
        tc_etcd_stop(&tc_etcd);
    return 0;
}

kvs_client_t *tc_client_open(const char *addr, uint32_t replicas,
                             uint32_t timeout_ms) {
    const char *addrs[1] = {addr};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = addrs;
    o.n_addrs = 1;
    o.request_timeout_ms = timeout_ms;
    o.membership_refresh_ms = 100;
    o.replicas = replicas;
    kvs_client_t *c = NULL;
    return kvs_client_open(&o, &c) ? NULL : c;
}
