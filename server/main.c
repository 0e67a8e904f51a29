/*
 * main.c: the kvstored executable: configuration layers, process setup
 * (worker pool size, file-descriptor limit, SIGPIPE, SIGHUP, log file, data
 * directory, secrets on the command line), then the server loop until a
 * graceful shutdown. Exit codes: 0 clean shutdown or a valid --check-config,
 * 1 runtime failure, 2 bad configuration.
 */
#include "server_int.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* Is `arg` the flag --auth-token (or --auth_token, any case), bare or with
 * "=value"? Returns the value's offset in arg with "=", -1 bare, 0 not. */
static int auth_token_flag(const char *arg) {
    static const char name[] = "auth-token";
    if (strncmp(arg, "--", 2))
        return 0;
    size_t i = 0;
    for (; name[i]; i++) {
        char c =
            arg[2 + i] == '_' ? '-' : (char)tolower((unsigned char)arg[2 + i]);
        if (c != name[i])
            return 0;
    }
    if (arg[2 + i] == 0)
        return -1;
    return arg[2 + i] == '=' ? (int)(2 + i + 1) : 0;
}

/* A token given as a flag is readable by every local user in ps and
 * /proc/PID/cmdline. Still accepted (scripts use it); warn, and blank it
 * in our argv, which is what /proc shows from now on. */
static void hide_auth_token(int argc, char **argv) {
    bool seen = false;
    for (int i = 1; i < argc; i++) {
        int at = auth_token_flag(argv[i]);
        char *v = at > 0                   ? argv[i] + at
                  : at < 0 && i + 1 < argc ? argv[++i]
                                           : NULL;
        if (!v)
            continue;
        seen = true;
        memset(v, 'x', strlen(v));
    }
    if (seen)
        kvs__log(KVS__LOG_WARN, "auth_token_on_command_line",
                 "msg=\"other local users can read --auth-token in ps and "
                 "/proc; use --auth-token-file or KVSTORED_AUTH_TOKEN\"");
}

static void check_token_file(const char *path) {
    struct stat st;
    if (!path[0] || stat(path, &st) != 0)
        return; /* validate already read it */
    if (st.st_mode & 077)
        kvs__log(KVS__LOG_WARN, "auth_token_file_permissions",
                 "path=%s mode=%04o msg=\"group or other users can read the "
                 "token; chmod 600\"",
                 path, (unsigned)(st.st_mode & 07777));
}

/* The data directory holds the KV cache, i.e. what users' prompts turned
 * into: create it for the daemon's user only, and say so when an existing
 * one is open to others (we do not chmod a directory we did not make).
 * Missing parents are created with the umask's mode, like mkdir -p. */
static int prepare_data_dir(const char *path) {
    struct stat st;
    if (!path[0])
        return 0;
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode) && (st.st_mode & 077))
            kvs__log(KVS__LOG_WARN, "data_dir_permissions",
                     "path=%s mode=%04o msg=\"group or other users could "
                     "read the KV cache; the store sets it to 0700\"",
                     path, (unsigned)(st.st_mode & 07777));
        return 0;
    }
    if (errno != ENOENT)
        return -errno;
    char *p = strdup(path);
    if (!p)
        return -ENOMEM;
    int rc = 0;
    for (char *s = p + 1; *s && !rc; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST)
            rc = -errno;
        *s = '/';
    }
    free(p);
    if (!rc && mkdir(path, 0700) != 0 && errno != EEXIST)
        rc = -errno;
    /* The umask may have narrowed 0700 but never widened it; set it
     * exactly anyway, so the mode does not depend on the caller. */
    if (!rc && chmod(path, 0700) != 0)
        rc = -errno;
    if (!rc)
        kvs__log(KVS__LOG_INFO, "data_dir_created", "path=%s mode=0700", path);
    return rc;
}

/* A supervisor or a parent may start us with descriptors 0-2 closed. The
 * first socket would then take one of them: a stray write to stdout or
 * stderr would reach a client, and libuv refuses to close them (it aborted
 * at shutdown). /dev/null holds each closed one. */
static int hold_std_fds(void) {
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        /* open() takes the lowest free descriptor: this one */
        int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
        if (n < 0)
            return -errno;
        if (n != fd) {
            int rc = dup2(n, fd) < 0 ? -errno : 0;
            close(n);
            if (rc)
                return rc;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (hold_std_fds())
        return 1; /* nowhere to say why: stderr is what failed */
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
    /* Until the server's handler is installed (after the store opens,
     * which can take a while), SIGHUP would kill the daemon. */
    signal(SIGHUP, SIG_IGN);
    if ((rc = kvs__log_open(cfg.log_file))) {
        fprintf(stderr, "kvstored: cannot open log_file %s: %s\n", cfg.log_file,
                strerror(-rc));
        kvs_server_config_destroy(&cfg);
        return 1;
    }
    hide_auth_token(argc, argv);
    check_token_file(cfg.auth_token_file);
    if ((rc = prepare_data_dir(cfg.data_dir))) {
        kvs__log(KVS__LOG_ERROR, "data_dir_failed", "path=%s err=%s",
                 cfg.data_dir, kvs_err_name(rc));
        kvs_server_config_destroy(&cfg);
        return 1;
    }
    /* Append frames are megabytes each: served from mmap, every one would
     * page-fault its way in and be unmapped again. Keep them in the heap. */
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    raise_nofile(cfg.max_connections);

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
