/*
 * main.c: the kvstored executable: configuration layers, process setup
 * (worker pool size, file-descriptor limit, SIGPIPE), then the server loop
 * until a graceful shutdown. Exit codes: 0 clean shutdown or a valid
 * --check-config, 1 runtime failure, 2 bad configuration.
 */
#include "server_int.h"

#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

/* 1,000+ connections need more descriptors than the usual soft limit of
 * 1024; raise it to the hard limit like redis does. */
static void raise_nofile(uint32_t want) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl))
        return;
    rlim_t need = (rlim_t)want + 64;
    if (rl.rlim_cur >= need)
        return;
    rl.rlim_cur = rl.rlim_max < need ? rl.rlim_max : need;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need)
        kvs__log(KVS__LOG_WARN, "nofile_limit",
                 "limit=%llu max_connections=%u (raise the hard limit)",
                 (unsigned long long)rl.rlim_cur, want);
}

int main(int argc, char **argv) {
    kvs_server_config_t cfg;
    char err[512] = "";
    int action = 0;
    if (kvs_server_config_init(&cfg)) {
        fprintf(stderr, "kvstored: out of memory\n");
        return 1;
    }
    int rc = kvs_server_config_from_args(&cfg, argc, argv, &action, err,
                                         sizeof(err));
    if (action == 1) {
        kvs_server_config_usage(stdout);
        kvs_server_config_destroy(&cfg);
        return 0;
    }
    if (action == 3) {
        printf("kvstored %s (protocol %d)\n", KVS_SERVER_VERSION,
               KVS_PROTOCOL_VERSION);
        kvs_server_config_destroy(&cfg);
        return 0;
    }
    if (!rc)
        rc = kvs_server_config_validate(&cfg, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "kvstored: configuration error: %s\n", err);
        kvs_server_config_destroy(&cfg);
        return 2;
    }
    if (action == 2) {
        printf("# configuration is valid\n");
        kvs_server_config_dump(&cfg, stdout);
        kvs_server_config_destroy(&cfg);
        return 0;
    }
    kvs__log_set_level(cfg.log_level);
    signal(SIGPIPE, SIG_IGN);
    /* Append frames are megabytes each: served from mmap, every one would
     * page-fault its way in and be unmapped again. Keep them in the heap. */
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    raise_nofile(cfg.max_connections);
    /* libuv sizes its pool from the environment at first use. */
    char n[16];
    snprintf(n, sizeof(n), "%u", cfg.workers);
    setenv("UV_THREADPOOL_SIZE", n, 1);

    kvs_server_t *srv = NULL;
    rc = kvs_server_new(&cfg, &srv);
    if (rc) {
        kvs__log(KVS__LOG_ERROR, "startup_failed", "status=%s",
                 kvs_err_name(rc));
        kvs_server_config_destroy(&cfg);
        return 1;
    }
    rc = kvs_server_run(srv);
    kvs_server_free(srv);
    kvs__log(KVS__LOG_INFO, "exit", "status=%d", rc);
    kvs_server_config_destroy(&cfg);
    return rc ? 1 : 0;
}
