/*
 * profile.c: tuning profiles (docs/kvtune.md), the `key value` text files
 * that tools/kvtune writes and kvs_options_load_profile reads onto a
 * kvs_options_t (kvstored --profile, kvdecode --profile).
 *
 * A profile is applied whole or not at all: it is parsed onto a copy of the
 * options, validated there, and copied back only on success, so a bad line
 * never leaves a store half-tuned. Unknown keys and versions are refused
 * rather than skipped: a profile written for another build that silently
 * lost a key would run with settings nobody chose.
 */
#include "kvstore.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROFILE_VERSION 1
#define PROFILE_MAX_LINE 1024
#define PROFILE_MAX_BYTES (1u << 20)

typedef enum key_type_e { K_U32, K_FRAC, K_MODE, K_BUDGET, K_RANK } key_type_t;

typedef struct key_s {
    const char *name;
    key_type_t type;
    double lo, hi; /* inclusive range for K_U32 and K_FRAC */
    int lo_open;   /* K_FRAC: lo itself is refused */
} pkey_t;

/* Ranges are what a store can open with (engine/store.c's checks) and
 * nothing a tuner would sensibly go beyond; segment_tokens against
 * sink + window and cluster_tokens is checked on the result. */
static const pkey_t keys[] = {
    {"segment_tokens", K_U32, 64, 1u << 24, 0},
    {"cluster_tokens", K_U32, 1, 1u << 16, 0},
    {"kmeans_iters", K_U32, 1, 1000, 0},
    {"sink_tokens", K_U32, 0, 1u << 20, 0},
    {"window_tokens", K_U32, 0, 1u << 20, 0},
    {"mode", K_MODE, 0, 0, 0},
    {"budget", K_BUDGET, 0, 0, 0},
    {"retrieval_fraction", K_FRAC, 0, 1, 1},
    {"estimation_fraction", K_FRAC, 0, 1, 0},
    {"epsilon", K_FRAC, 0, 1, 1},
    {"rank", K_RANK, 0, 0, 0},
};
#define N_KEYS (sizeof keys / sizeof keys[0])

static int fail(char *err, size_t errlen, const char *name, unsigned line,
                const char *fmt, ...) {
    if (err && errlen) {
        int n = 0;
        if (line)
            n = snprintf(err, errlen, "%s:%u: ", name ? name : "profile", line);
        else
            n = snprintf(err, errlen, "%s: ", name ? name : "profile");
        if (n < 0)
            n = 0;
        if ((size_t)n < errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return KVS_EINVAL;
}

static int parse_u32(const char *s, double lo, double hi, uint32_t *out) {
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return -1;
    if ((double)v < lo || (double)v > hi)
        return 1;
    *out = (uint32_t)v;
    return 0;
}

static int parse_frac(const char *s, const pkey_t *k, float *out) {
    /* strtod also takes "nan", "inf" and hex; a profile holds plain
     * decimals, so anything else is refused before it is converted. */
    for (const char *p = s; *p; p++)
        if (!strchr("0123456789.eE+-", *p))
            return -1;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || errno == ERANGE || !isfinite(v))
        return -1;
    if (v < k->lo || v > k->hi || (k->lo_open && v == k->lo))
        return 1;
    *out = (float)v;
    return 0;
}

static int word_is(const char *s, const char *w) {
    return !strcmp(s, w);
}

/* One `key value` pair onto *o. 0, or a message in err. */
static int apply(kvs_options_t *o, const pkey_t *k, const char *v,
                 const char *name, unsigned line, char *err, size_t errlen) {
    uint32_t u = 0;
    float f = 0;
    int r;
    switch (k->type) {
    case K_U32:
        r = parse_u32(v, k->lo, k->hi, &u);
        if (r < 0)
            return fail(err, errlen, name, line,
                        "%s: '%s' is not a whole number", k->name, v);
        if (r > 0)
            return fail(err, errlen, name, line,
                        "%s: %s is out of range [%.0f, %.0f]", k->name, v,
                        k->lo, k->hi);
        if (word_is(k->name, "segment_tokens"))
            o->segment_tokens = u;
        else if (word_is(k->name, "cluster_tokens"))
            o->cluster_tokens = u;
        else if (word_is(k->name, "kmeans_iters"))
            o->kmeans_iters = u;
        else if (word_is(k->name, "sink_tokens"))
            o->sink_tokens = u;
        else
            o->window_tokens = u;
        return 0;
    case K_FRAC:
        r = parse_frac(v, k, &f);
        if (r < 0)
            return fail(err, errlen, name, line, "%s: '%s' is not a number",
                        k->name, v);
        if (r > 0)
            return fail(err, errlen, name, line,
                        "%s: %s is out of range %s%g, %g]", k->name, v,
                        k->lo_open ? "(" : "[", k->lo, k->hi);
        if (word_is(k->name, "retrieval_fraction"))
            o->defaults.retrieval_fraction = f;
        else if (word_is(k->name, "estimation_fraction"))
            o->defaults.estimation_fraction = f;
        else
            o->defaults.epsilon = f;
        return 0;
    case K_MODE:
        if (word_is(v, "default"))
            o->defaults.mode = KVS_MODE_DEFAULT;
        else if (word_is(v, "wave"))
            o->defaults.mode = KVS_MODE_WAVE;
        else if (word_is(v, "exact"))
            o->defaults.mode = KVS_MODE_EXACT;
        else if (word_is(v, "full"))
            o->defaults.mode = KVS_MODE_FULL;
        else
            return fail(err, errlen, name, line,
                        "mode: '%s' is not one of default, wave, exact, full",
                        v);
        return 0;
    case K_BUDGET:
        if (word_is(v, "default"))
            o->defaults.budget = KVS_BUDGET_DEFAULT;
        else if (word_is(v, "fixed"))
            o->defaults.budget = KVS_BUDGET_FIXED;
        else if (word_is(v, "bounded"))
            o->defaults.budget = KVS_BUDGET_BOUNDED;
        else
            return fail(err, errlen, name, line,
                        "budget: '%s' is not one of default, fixed, bounded",
                        v);
        return 0;
    case K_RANK:
        /* kvs_query_params_t has no ranking field in this build: the store
         * ranks as KVS_RANK_DEFAULT does (codes for fixed-budget search,
         * centroids for attention). A profile that asks for anything else
         * would not get it, so it is refused, not ignored. */
        if (word_is(v, "default"))
            return 0;
        if (word_is(v, "codes") || word_is(v, "centroid"))
            return fail(err, errlen, name, line,
                        "rank: '%s' is not supported by this build (its "
                        "query parameters have no ranking choice; only "
                        "'default')",
                        v);
        return fail(err, errlen, name, line,
                    "rank: '%s' is not one of default, codes, centroid", v);
    }
    return fail(err, errlen, name, line, "internal: bad key type");
}

int kvs_options_parse_profile(kvs_options_t *opts, const char *name,
                              const char *text, size_t len, char *err,
                              size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    if (!opts || (!text && len))
        return fail(err, errlen, name, 0, "NULL argument");
    if (len > PROFILE_MAX_BYTES)
        return fail(err, errlen, name, 0, "larger than %u bytes",
                    PROFILE_MAX_BYTES);
    if (memchr(text, '\0', len))
        return fail(err, errlen, name, 0,
                    "contains a NUL byte: not a text "
                    "profile");
    kvs_options_t o = *opts;
    unsigned char seen[N_KEYS] = {0};
    int have_version = 0;
    unsigned line = 0;
    size_t pos = 0;
    char buf[PROFILE_MAX_LINE + 1];
    while (pos < len) {
        line++;
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        if (n > PROFILE_MAX_LINE)
            return fail(err, errlen, name, line, "line longer than %u bytes",
                        PROFILE_MAX_LINE);
        memcpy(buf, text + pos, n);
        buf[n] = '\0';
        pos += n + (nl ? 1 : 0);
        /* Comments run to the end of the line; CR of CRLF files is blank. */
        char *hash = strchr(buf, '#');
        if (hash)
            *hash = '\0';
        char *save = NULL;
        const char *ws = " \t\r\v\f";
        char *key = strtok_r(buf, ws, &save);
        if (!key)
            continue;
        char *val = strtok_r(NULL, ws, &save);
        char *extra = strtok_r(NULL, ws, &save);
        if (!val)
            return fail(err, errlen, name, line, "'%s' has no value", key);
        if (extra)
            return fail(err, errlen, name, line, "'%s' has more than one value",
                        key);
        if (!have_version) {
            if (strcmp(key, "kvs_profile"))
                return fail(err, errlen, name, line,
                            "expected 'kvs_profile %d' before any key, "
                            "found '%s'",
                            PROFILE_VERSION, key);
            uint32_t ver;
            if (parse_u32(val, 0, 1e9, &ver) || ver != PROFILE_VERSION)
                return fail(err, errlen, name, line,
                            "profile version '%s' is not supported (this "
                            "build reads version %d)",
                            val, PROFILE_VERSION);
            have_version = 1;
            continue;
        }
        if (!strcmp(key, "kvs_profile"))
            return fail(err, errlen, name, line, "'kvs_profile' given twice");
        size_t i = 0;
        while (i < N_KEYS && strcmp(keys[i].name, key))
            i++;
        if (i == N_KEYS)
            return fail(err, errlen, name, line, "unknown key '%s'", key);
        if (seen[i])
            return fail(err, errlen, name, line, "'%s' given twice", key);
        seen[i] = 1;
        int rc = apply(&o, &keys[i], val, name, line, err, errlen);
        if (rc)
            return rc;
    }
    if (!have_version)
        return fail(err, errlen, name, 0, "empty: no 'kvs_profile %d' line",
                    PROFILE_VERSION);
    /* The same relations kvs_store_open checks, reported against the
     * profile so the message names what to change. */
    if (o.segment_tokens < o.cluster_tokens ||
        o.segment_tokens <= (uint64_t)o.sink_tokens + o.window_tokens)
        return fail(err, errlen, name, 0,
                    "segment_tokens (%u) must exceed sink_tokens + "
                    "window_tokens (%llu) and be at least cluster_tokens "
                    "(%u)",
                    o.segment_tokens,
                    (unsigned long long)o.sink_tokens + o.window_tokens,
                    o.cluster_tokens);
    *opts = o;
    return 0;
}

int kvs_options_load_profile(kvs_options_t *opts, const char *path, char *err,
                             size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    if (!opts || !path)
        return fail(err, errlen, path, 0, "NULL argument");
    char *text = NULL;
    int rc;
    FILE *f = fopen(path, "rb");
    if (!f) {
        rc = -errno;
        fail(err, errlen, path, 0, "%s", strerror(errno));
        goto err;
    }
    text = malloc(PROFILE_MAX_BYTES + 1);
    if (!text) {
        rc = KVS_ENOMEM;
        fail(err, errlen, path, 0, "out of memory");
        goto err;
    }
    size_t n = fread(text, 1, PROFILE_MAX_BYTES + 1, f);
    if (ferror(f)) {
        rc = KVS_EIO;
        fail(err, errlen, path, 0, "read error");
        goto err;
    }
    rc = kvs_options_parse_profile(opts, path, text, n, err, errlen);
err:
    free(text);
    if (f)
        fclose(f);
    return rc;
}
