/*
 * config.c: kvstored's configuration: the option table from kvs_server.h
 * turned into defaults, a `key value` file parser, KVSTORED_* environment
 * overrides, command-line flags, --help text and validation.
 *
 * One table drives all of them so that an option cannot be parsed but not
 * documented, or documented with a default it does not have.
 */
#include "kvs_server.h"

#include "kvs_errf.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

enum opt_type { OPT_STR, OPT_U32, OPT_SIZE, OPT_BOOL };

typedef struct opt_s {
    const char *name;
    enum opt_type type;
    const char *def;
    uint64_t min, max;
    const char *help;
    size_t offset;
} opt_t;

static const opt_t opts[] = {
#define KVS__OPT_ROW(name, type, def, min, max, help)                          \
    {#name,                                                                    \
     OPT_##type,                                                               \
     def,                                                                      \
     (uint64_t)(min),                                                          \
     (uint64_t)(max),                                                          \
     help,                                                                     \
     offsetof(kvs_server_config_t, name)},
    KVS_SERVER_OPTIONS(KVS__OPT_ROW)
#undef KVS__OPT_ROW
};
#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

/* `-` and `_` are equivalent so that flags (--max-frame-bytes) and file keys
 * (max_frame_bytes) name the same option. */
static const opt_t *find_opt(const char *key, size_t keylen) {
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *n = opts[i].name;
        if (strlen(n) != keylen)
            continue;
        size_t j = 0;
        for (; j < keylen; j++) {
            char a = key[j] == '-' ? '_' : (char)tolower((unsigned char)key[j]);
            if (a != n[j])
                break;
        }
        if (j == keylen)
            return &opts[i];
    }
    return NULL;
}

static int parse_u64(const char *s, bool suffixes, uint64_t *out) {
    if (!*s || *s == '-' || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        return -1;
    uint64_t mult = 1;
    if (suffixes && *end) {
        switch (toupper((unsigned char)*end)) {
        case 'K':
            mult = 1ull << 10;
            break;
        case 'M':
            mult = 1ull << 20;
            break;
        case 'G':
            mult = 1ull << 30;
            break;
        default:
            return -1;
        }
        end++;
        if (toupper((unsigned char)*end) == 'B' ||
            toupper((unsigned char)*end) == 'I')
            end++;
    }
    if (*end)
        return -1;
    if (v > UINT64_MAX / mult)
        return -1;
    *out = v * mult;
    return 0;
}

static int parse_bool(const char *s, bool *out) {
    static const char *yes[] = {"1", "yes", "true", "on"};
    static const char *no[] = {"0", "no", "false", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (!strcasecmp(s, yes[i]))
            return *out = true, 0;
        if (!strcasecmp(s, no[i]))
            return *out = false, 0;
    }
    return -1;
}

static int set_opt(kvs_server_config_t *cfg, const opt_t *o, const char *value,
                   char *err, size_t errlen) {
    char *field = (char *)cfg + o->offset;
    switch (o->type) {
    case OPT_STR: {
        char *dup = strdup(value);
        if (!dup)
            return KVS_ENOMEM;
        char **p = (char **)(void *)field;
        free(*p);
        *p = dup;
        return 0;
    }
    case OPT_BOOL: {
        bool b;
        if (parse_bool(value, &b))
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "%s: expected yes/no, got \"%s\"", o->name, value);
        *(bool *)(void *)field = b;
        return 0;
    }
    case OPT_U32:
    case OPT_SIZE: {
        uint64_t v;
        if (parse_u64(value, o->type == OPT_SIZE, &v))
            return kvs__errf(
                err, errlen, KVS_EINVAL,
                "%s: expected a non-negative number%s, got \"%s\"", o->name,
                o->type == OPT_SIZE ? " (K/M/G suffixes)" : "", value);
        if (v < o->min || v > o->max)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "%s: %llu is outside [%llu, %llu]", o->name,
                             (unsigned long long)v, (unsigned long long)o->min,
                             (unsigned long long)o->max);
        if (o->type == OPT_U32)
            *(uint32_t *)(void *)field = (uint32_t)v;
        else
            *(uint64_t *)(void *)field = v;
        return 0;
    }
    }
    return KVS_EINVAL;
}

int kvs_server_config_set(kvs_server_config_t *cfg, const char *key,
                          const char *value, char *err, size_t errlen) {
    const opt_t *o = find_opt(key, strlen(key));
    if (!o)
        return kvs__errf(err, errlen, KVS_EINVAL, "unknown option \"%s\"", key);
    return set_opt(cfg, o, value, err, errlen);
}

int kvs_server_config_init(kvs_server_config_t *cfg) {
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < N_OPTS; i++) {
        int rc = set_opt(cfg, &opts[i], opts[i].def, NULL, 0);
        if (rc) {
            kvs_server_config_destroy(cfg);
            return rc;
        }
    }
    return 0;
}

void kvs_server_config_destroy(kvs_server_config_t *cfg) {
    for (size_t i = 0; i < N_OPTS; i++) {
        if (opts[i].type != OPT_STR)
            continue;
        char **p = (char **)(void *)((char *)cfg + opts[i].offset);
        free(*p);
        *p = NULL;
    }
}

int kvs_server_config_load_file(kvs_server_config_t *cfg, const char *path,
                                char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f)
        return kvs__errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
    char line[4096];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        size_t n = strlen(line);
        if (n == sizeof(line) - 1 && line[n - 1] != '\n') {
            rc = kvs__errf(err, errlen, KVS_EINVAL, "%s:%d: line too long",
                           path, lineno);
            break;
        }
        while (n && isspace((unsigned char)line[n - 1]))
            line[--n] = 0;
        char *p = line;
        while (isspace((unsigned char)*p))
            p++;
        if (!*p || *p == '#')
            continue;
        char *key = p;
        while (*p && !isspace((unsigned char)*p))
            p++;
        size_t keylen = (size_t)(p - key);
        while (isspace((unsigned char)*p))
            p++;
        char *val = p;
        size_t vlen = strlen(val);
        if (vlen >= 2 && val[0] == '"' && val[vlen - 1] == '"') {
            val[vlen - 1] = 0;
            val++;
        }
        const opt_t *o = find_opt(key, keylen);
        if (!o) {
            rc = kvs__errf(err, errlen, KVS_EINVAL,
                           "%s:%d: unknown option \"%.*s\"", path, lineno,
                           (int)keylen, key);
            break;
        }
        char why[256];
        rc = set_opt(cfg, o, val, why, sizeof(why));
        if (rc) {
            kvs__errf(err, errlen, rc, "%s:%d: %s", path, lineno, why);
            break;
        }
    }
    fclose(f);
    return rc;
}

int kvs_server_config_load_env(kvs_server_config_t *cfg, char *const *envp,
                               char *err, size_t errlen) {
    static const char prefix[] = "KVSTORED_";
    if (!envp)
        envp = environ;
    for (; envp && *envp; envp++) {
        const char *e = *envp;
        if (strncmp(e, prefix, sizeof(prefix) - 1))
            continue;
        const char *key = e + sizeof(prefix) - 1;
        const char *eq = strchr(key, '=');
        if (!eq)
            continue;
        const opt_t *o = find_opt(key, (size_t)(eq - key));
        if (!o) /* other tools may share the prefix: skip, do not fail */
            continue;
        char why[256];
        int rc = set_opt(cfg, o, eq + 1, why, sizeof(why));
        if (rc)
            return kvs__errf(err, errlen, rc, "environment %.*s: %s",
                             (int)(eq - e), e, why);
    }
    return 0;
}

int kvs_server_config_validate(kvs_server_config_t *cfg, char *err,
                               size_t errlen) {
    if (!cfg->bind[0] && !cfg->unix_socket[0])
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "nothing to listen on: bind and unix_socket are both "
                         "empty");
    if (cfg->auth_token_file[0]) {
        FILE *f = fopen(cfg->auth_token_file, "r");
        if (!f)
            return kvs__errf(err, errlen, -errno, "auth_token_file %s: %s",
                             cfg->auth_token_file, strerror(errno));
        char buf[1024] = "";
        char *got = fgets(buf, sizeof(buf), f);
        fclose(f);
        size_t n = got ? strlen(buf) : 0;
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
            buf[--n] = 0;
        if (!n)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "auth_token_file %s is empty",
                             cfg->auth_token_file);
        char *dup = strdup(buf);
        if (!dup)
            return KVS_ENOMEM;
        free(cfg->auth_token);
        cfg->auth_token = dup;
    }
    if (strlen(cfg->auth_token) > 512)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "auth_token is longer than 512 bytes");
    if (strcmp(cfg->sync, "batch") && strcmp(cfg->sync, "always") &&
        strcmp(cfg->sync, "none") && strcmp(cfg->sync, "async"))
        return kvs__errf(
            err, errlen, KVS_EINVAL,
            "sync must be batch, always, none or async, not \"%s\"", cfg->sync);
    if (strcmp(cfg->load, "warm") && strcmp(cfg->load, "lazy") &&
        strcmp(cfg->load, "eager"))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "load must be warm, lazy or eager, not \"%s\"",
                         cfg->load);
    if (strcmp(cfg->cuda_kv, "auto") && strcmp(cfg->cuda_kv, "host"))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "cuda_kv must be auto or host, not \"%s\"",
                         cfg->cuda_kv);
    const char *lv = cfg->log_level;
    if (strcmp(lv, "debug") && strcmp(lv, "info") && strcmp(lv, "warn") &&
        strcmp(lv, "error"))
        return kvs__errf(
            err, errlen, KVS_EINVAL,
            "log_level must be debug, info, warn or error, not \"%s\"", lv);
    /* The endpoints' full parse is proto's (kvs_etcd_new, at start); catch
     * here what would otherwise fail only then, with exit 1 not 2. */
    for (const char *e = cfg->etcd_endpoints; *e;) {
        size_t n = strcspn(e, ",");
        if (n && (!strncmp(e, "https://", 8) || !memchr(e, ':', n) ||
                  (!strncmp(e, "http://", 7) && !memchr(e + 7, ':', n - 7))))
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "etcd_endpoints: \"%.*s\" is not "
                             "http://host:port (https is not supported)",
                             (int)n, e);
        e += n;
        if (*e == ',')
            e++;
    }
    if (cfg->etcd_endpoints[0] && cfg->etcd_prefix[0] != '/')
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "etcd_prefix must start with '/', not \"%s\"",
                         cfg->etcd_prefix);
    if (cfg->etcd_endpoints[0] && strchr(cfg->node_id, '/'))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "node_id must not contain '/' with etcd (it is the "
                         "last part of the node's key)");
    /* Repair finds the other nodes in etcd: without it the option would
     * silently do nothing. */
    if (cfg->replicas && !cfg->etcd_endpoints[0])
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "replicas (repair) needs etcd_endpoints");
    if (cfg->advertise_addr[0] && !strchr(cfg->advertise_addr, ':'))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "advertise_addr must be host:port, not \"%s\"",
                         cfg->advertise_addr);
    if (cfg->unix_socket[0] && strlen(cfg->unix_socket) >= 100)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "unix_socket path is longer than 99 bytes");
    /* Octal only, as chmod(1) takes it: read as decimal, "660" would be
     * another mode altogether. */
    const char *m = cfg->unix_socket_mode;
    size_t ml = strlen(m);
    if (ml < 1 || ml > 4 || strspn(m, "01234567") != ml ||
        strtoul(m, NULL, 8) > 0777)
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "unix_socket_mode must be octal permissions such as "
                         "0660, not \"%s\"",
                         m);
    return 0;
}

void kvs_server_config_usage(FILE *out) {
    fprintf(out, "usage: kvstored [--config FILE] [--KEY VALUE]... "
                 "[--check-config] [--help] [--version]\n\n"
                 "Serves a kvstore KV-cache store over TCP and Unix sockets.\n"
                 "Each option may be set in the config file (`key value`), as\n"
                 "KVSTORED_KEY in the environment, or as --key VALUE (later "
                 "layers win).\n\n"
                 "options (default in brackets):\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        char flag[64];
        snprintf(flag, sizeof(flag), "--%s", opts[i].name);
        for (char *p = flag + 2; *p; p++)
            if (*p == '_')
                *p = '-';
        fprintf(out, "  %-26s %s [%s]\n", flag, opts[i].help,
                opts[i].def[0] ? opts[i].def : "\"\"");
    }
    fprintf(out, "\n  --config FILE, -c FILE     read options from FILE\n"
                 "  --check-config             validate the configuration, "
                 "print it and exit\n"
                 "  --help, -h                 this text\n"
                 "  --version                  print the version\n");
}

void kvs_server_config_dump(const kvs_server_config_t *cfg, FILE *out) {
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *field = (const char *)cfg + opts[i].offset;
        switch (opts[i].type) {
        case OPT_STR: {
            const char *s = *(char *const *)(const void *)field;
            bool secret = !strcmp(opts[i].name, "auth_token") && s[0];
            fprintf(out, "%s \"%s\"\n", opts[i].name, secret ? "********" : s);
            break;
        }
        case OPT_U32:
            fprintf(out, "%s %u\n", opts[i].name,
                    *(const uint32_t *)(const void *)field);
            break;
        case OPT_SIZE:
            fprintf(out, "%s %llu\n", opts[i].name,
                    (unsigned long long)*(const uint64_t *)(const void *)field);
            break;
        case OPT_BOOL:
            fprintf(out, "%s %s\n", opts[i].name,
                    *(const bool *)(const void *)field ? "yes" : "no");
            break;
        }
    }
}

int kvs_server_config_from_args(kvs_server_config_t *cfg, int argc, char **argv,
                                int *action, char *err, size_t errlen) {
    *action = 0;
    /* The file layer goes first, so find --config before applying flags. */
    const char *file = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c")) {
            if (i + 1 >= argc)
                return kvs__errf(err, errlen, KVS_EINVAL, "%s needs a file",
                                 argv[i]);
            file = argv[++i];
        } else if (!strncmp(argv[i], "--config=", 9)) {
            file = argv[i] + 9;
        }
    }
    if (!file && getenv("KVSTORED_CONFIG"))
        file = getenv("KVSTORED_CONFIG");
    int rc;
    if (file && (rc = kvs_server_config_load_file(cfg, file, err, errlen)))
        return rc;
    if ((rc = kvs_server_config_load_env(cfg, NULL, err, errlen)))
        return rc;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--config") || !strcmp(a, "-c")) {
            i++;
            continue;
        }
        if (!strncmp(a, "--config=", 9))
            continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            *action = 1;
            continue;
        }
        if (!strcmp(a, "--check-config")) {
            *action = *action ? *action : 2;
            continue;
        }
        if (!strcmp(a, "--version")) {
            *action = *action ? *action : 3;
            continue;
        }
        if (strncmp(a, "--", 2))
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "unexpected argument \"%s\" (try --help)", a);
        const char *key = a + 2;
        const char *eq = strchr(key, '=');
        size_t keylen = eq ? (size_t)(eq - key) : strlen(key);
        const opt_t *o = find_opt(key, keylen);
        if (!o)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "unknown option --%.*s (try --help)", (int)keylen,
                             key);
        const char *val;
        if (eq) {
            val = eq + 1;
        } else if (o->type == OPT_BOOL &&
                   (i + 1 >= argc || !strncmp(argv[i + 1], "--", 2))) {
            val = "yes"; /* a bare boolean flag turns it on */
        } else {
            if (i + 1 >= argc)
                return kvs__errf(err, errlen, KVS_EINVAL, "--%s needs a value",
                                 o->name);
            val = argv[++i];
        }
        if ((rc = set_opt(cfg, o, val, err, errlen)))
            return rc;
    }
    return 0;
}
