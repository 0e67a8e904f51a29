/*
 * test_decoder_store.c: `kvdecode --store URL` against a real kvstored on
 * loopback (integration). The daemon runs on 127.0.0.1 with an ephemeral
 * port and a Unix socket in a temporary directory (tests/server/daemon.c);
 * kvdecode runs as a child process, as a user would run it. On stories260K,
 * store-exact through the daemon must give the same logits, bit for bit, as
 * store-exact in-process over a few dozen decode steps; the sequence is
 * dropped at the end unless --keep; the daemon exits 0 on SIGTERM.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "daemon.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MODEL KVS_SHARED_DATA "/stories260K.bin"
#define KVDECODE KVS_BINARY_DIR "/tools/kvdecode/kvdecode"
/* BOS and 15 input tokens, fed one by one after BOS, then 32 generated:
 * 47 decode steps. */
#define INPUT_IDS "400,301,270,500,43,67,89,12,250,311,90,17,480,2,77"

static test_daemon_t g_d;

static int setup(void **state) {
    (void)state;
    memset(&g_d, 0, sizeof(g_d));
    return td_start(&g_d, NULL) == 0 ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    int st = td_stop(&g_d);
    td_cleanup(&g_d);
    return st == 0 ? 0 : -1;
}

/* Run kvdecode with `args` (NULL-terminated), output to `log`; exit code. */
static int run_kvdecode(const char *const *args, const char *log) {
    const char *argv[48] = {KVDECODE, MODEL};
    int n = 2;
    while (args[n - 2] && n < 46) {
        argv[n] = args[n - 2];
        n++;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        FILE *f = freopen(log, "w", stdout);
        if (f)
            dup2(fileno(f), 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
        return -1;
    if (WEXITSTATUS(st) != 0) {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "cat '%s' >&2", log);
        if (system(cmd) != 0)
            fprintf(stderr, "kvdecode failed; log %s\n", log);
    }
    return WEXITSTATUS(st);
}

static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len ? *len : 1);
    if (b && fread(b, 1, *len, f) != *len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    return b;
}

static size_t seq_count(void) {
    kvs_client_t *c = td_client(&g_d, 0, NULL);
    assert_non_null(c);
    uint64_t ids[8];
    size_t n = 0;
    uint64_t total = 99;
    assert_int_equal(kvs_client_store_list(c, 0, ids, 8, &n, &total), 0);
    kvs_client_close(c);
    return (size_t)total;
}

/* Logits of store-exact via `url` (NULL: in-process) into `out`. */
static void decode_exact(const char *url, const char *seq, const char *out,
                         bool keep) {
    char log[256];
    snprintf(log, sizeof(log), "%s.log", out);
    const char *args[24] = {"--token-ids",
                            INPUT_IDS,
                            "--step-from",
                            "1",
                            "--gen",
                            "32",
                            "--attn",
                            "store-exact",
                            "--logits-out",
                            out,
                            "--quiet",
                            "--seq-id",
                            seq};
    int n = 13;
    if (url) {
        args[n++] = "--store";
        args[n++] = url;
    }
    if (keep)
        args[n++] = "--keep";
    args[n] = NULL;
    assert_int_equal(run_kvdecode(args, log), 0);
}

static void assert_same_file(const char *a, const char *b) {
    size_t la = 0, lb = 0;
    unsigned char *x = slurp(a, &la), *y = slurp(b, &lb);
    assert_non_null(x);
    assert_non_null(y);
    /* 8-byte magic, n and vocab, 48 token ids, 48 rows of 512 logits. */
    assert_int_equal(la, 16 + 48 * 4 + (size_t)48 * 512 * 4);
    assert_int_equal(la, lb);
    assert_memory_equal(x, y, la);
    free(x);
    free(y);
}

static void test_decoder_store_tcp_equals_in_process(void **state) {
    (void)state;
    char url[64], a[256], b[256];
    snprintf(url, sizeof(url), "tcp://127.0.0.1:%d", g_d.port);
    snprintf(a, sizeof(a), "%s/tcp.logits", g_d.dir);
    snprintf(b, sizeof(b), "%s/local.logits", g_d.dir);
    decode_exact(url, "11", a, false);
    decode_exact(NULL, "11", b, false);
    assert_same_file(a, b);
    /* Dropped at the end. */
    assert_int_equal(seq_count(), 0);
}

static void test_decoder_store_unix_keep(void **state) {
    (void)state;
    char url[256], a[256], b[256];
    snprintf(url, sizeof(url), "unix://%s", g_d.sock);
    snprintf(a, sizeof(a), "%s/unix.logits", g_d.dir);
    snprintf(b, sizeof(b), "%s/local2.logits", g_d.dir);
    decode_exact(url, "12", a, true);
    decode_exact(NULL, "12", b, false);
    assert_same_file(a, b);
    /* --keep leaves the sequence, with every token of every layer. */
    kvs_client_t *c = td_client(&g_d, 0, NULL);
    assert_non_null(c);
    kvs_seq_info_t info;
    assert_int_equal(kvs_client_seq_info(c, 12, &info), 0);
    assert_int_equal(info.geometry.n_layers, 5);
    assert_int_equal(info.geometry.head_dim, 8);
    assert_int_equal(info.tokens_min, 48);
    assert_int_equal(info.tokens_max, 48);
    /* A second run on the same id is refused, not merged. */
    const char *args[] = {"--gen",   "2", "--attn",   "store-exact",
                          "--store", url, "--seq-id", "12",
                          "--quiet", NULL};
    char log[256];
    snprintf(log, sizeof(log), "%s/exists.log", g_d.dir);
    assert_int_equal(run_kvdecode(args, log), 1);
    assert_int_equal(kvs_client_seq_drop(c, 12), 0);
    kvs_client_close(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decoder_store_tcp_equals_in_process),
        cmocka_unit_test(test_decoder_store_unix_keep),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
