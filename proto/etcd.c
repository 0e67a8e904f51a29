/*
 * etcd.c: the etcd v3 JSON-gateway client and the node record of
 * kvs_etcd.h. HTTP/1.0 so that etcd (Go's net/http) ends every answer by
 * closing the connection: no keep-alive and no chunked bodies to decode.
 * The JSON reader is a scanner over the answer's text, enough for the
 * gateway's messages and our own record: objects, arrays, strings with
 * escapes, numbers and numbers in strings (the gateway's int64s).
 */
#include "kvs_etcd.h"

#include "kvs_common.h"
#include "kvs_errf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Answers are small (a range over a few hundred nodes is well under this);
 * the cap keeps a confused peer from growing us without bound. */
#define MAX_ANSWER (16u << 20)

typedef struct endpoint_s {
    char host[256];
    char port[8];
} endpoint_t;

struct kvs_etcd_s {
    endpoint_t ep[KVS_ETCD_MAX_ENDPOINTS];
    size_t n_ep;
    size_t cur; /* the endpoint that answered last */
    uint32_t timeout_ms;
    char errmsg[512];
};

static int efail(kvs_etcd_t *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int efail(kvs_etcd_t *e, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->errmsg, sizeof(e->errmsg), fmt, ap);
    va_end(ap);
    return code;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* --------------------------------------------------------------- base64 */

static const char b64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* out holds 4 * ((n + 2) / 3) + 1 bytes. */
static void b64_encode(const uint8_t *in, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = b64[(v >> 18) & 63];
        out[o++] = b64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? b64[v & 63] : '=';
    }
    out[o] = 0;
}

static int b64_val(char ch) {
    const char *p = ch ? strchr(b64, ch) : NULL;
    return p ? (int)(p - b64) : -1;
}

/* Decode n chars into out (holds n / 4 * 3 + 1), NUL-terminated; -1 on a
 * bad character. */
static int b64_decode(const char *in, size_t n, uint8_t *out, size_t *len) {
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        if (in[i] == '=')
            break;
        int v = b64_val(in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    out[o] = 0;
    *len = o;
    return 0;
}

/* ----------------------------------------------------------------- JSON */

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* Past the value at p, or NULL if it is malformed. */
static const char *skip_value(const char *p, const char *end, int depth) {
    p = ws(p, end);
    if (p >= end || depth > 32)
        return NULL;
    if (*p == '"') {
        for (p++; p < end; p++) {
            if (*p == '\\')
                p++;
            else if (*p == '"')
                return p + 1;
        }
        return NULL;
    }
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = ws(p + 1, end);
        if (p < end && *p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                if (!(p = skip_value(p, end, depth + 1)))
                    return NULL;
                p = ws(p, end);
                if (p >= end || *p != ':')
                    return NULL;
                p++;
            }
            if (!(p = skip_value(p, end, depth + 1)))
                return NULL;
            p = ws(p, end);
            if (p >= end)
                return NULL;
            if (*p == close)
                return p + 1;
            if (*p != ',')
                return NULL;
            p++;
        }
    }
    const char *s = p;
    while (p < end &&
           (strchr("+-.0123456789eE", *p) || (*p >= 'a' && *p <= 'z')))
        p++;
    return p > s ? p : NULL;
}

/* In the object at obj (its '{'), the value of member `key`: [*v, *vend).
 * Keys are compared as written (ours and etcd's have no escapes). */
static bool json_get(const char *obj, const char *end, const char *key,
                     const char **v, const char **vend) {
    const char *p = ws(obj, end);
    if (p >= end || *p != '{')
        return false;
    p = ws(p + 1, end);
    size_t kl = strlen(key);
    while (p < end && *p == '"') {
        const char *ks = p + 1;
        const char *ke = skip_value(p, end, 0);
        if (!ke)
            return false;
        p = ws(ke, end);
        if (p >= end || *p != ':')
            return false;
        const char *vs = ws(p + 1, end);
        const char *ve = skip_value(vs, end, 0);
        if (!ve)
            return false;
        if ((size_t)(ke - 1 - ks) == kl && !memcmp(ks, key, kl)) {
            *v = vs;
            *vend = ve;
            return true;
        }
        p = ws(ve, end);
        if (p < end && *p == ',')
            p = ws(p + 1, end);
    }
    return false;
}

/* A JSON string value into out (cap bytes, NUL-terminated, truncated);
 * \u escapes outside ASCII become '?'. false if v is not a string. */
static bool json_str(const char *v, const char *vend, char *out, size_t cap) {
    if (v >= vend || *v != '"' || cap == 0)
        return false;
    size_t o = 0;
    for (const char *p = v + 1; p < vend - 1; p++) {
        char ch = *p;
        if (ch == '\\' && p + 1 < vend - 1) {
            ch = *++p;
            switch (ch) {
            case 'n':
                ch = '\n';
                break;
            case 't':
                ch = '\t';
                break;
            case 'r':
                ch = '\r';
                break;
            case 'b':
                ch = '\b';
                break;
            case 'f':
                ch = '\f';
                break;
            case 'u': {
                unsigned cp = 0;
                if (vend - 1 - p <= 4 || sscanf(p + 1, "%4x", &cp) != 1)
                    return false;
                p += 4;
                ch = cp < 0x80 ? (char)cp : '?';
                break;
            }
            default:
                break; /* \" \\ \/ */
            }
        }
        if (o + 1 < cap)
            out[o++] = ch;
    }
    out[o] = 0;
    return true;
}

/* A number, bare or in a string (the gateway writes int64 as "123"). */
static bool json_i64(const char *v, const char *vend, int64_t *out) {
    char buf[32];
    size_t n = (size_t)(vend - v);
    if (n && *v == '"') {
        v++;
        n = n >= 2 ? n - 2 : 0;
    }
    if (!n || n >= sizeof(buf))
        return false;
    memcpy(buf, v, n);
    buf[n] = 0;
    char *e;
    errno = 0;
    long long x = strtoll(buf, &e, 10);
    if (errno || *e)
        return false;
    *out = x;
    return true;
}

static int64_t member_i64(const char *obj, const char *end, const char *key) {
    const char *v, *ve;
    int64_t x = 0;
    if (json_get(obj, end, key, &v, &ve) && json_i64(v, ve, &x))
        return x;
    return 0;
}

/* JSON string escaping of s into out; false if it does not fit. */
static bool json_quote(const char *s, char *out, size_t cap) {
    size_t o = 0;
    if (cap < 3)
        return false;
    out[o++] = '"';
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char esc[8];
        size_t el;
        if (ch == '"' || ch == '\\')
            el = (size_t)snprintf(esc, sizeof(esc), "\\%c", ch);
        else if (ch < 0x20)
            el = (size_t)snprintf(esc, sizeof(esc), "\\u%04x", ch);
        else
            esc[0] = (char)ch, el = 1;
        if (o + el + 2 > cap)
            return false;
        memcpy(out + o, esc, el);
        o += el;
    }
    out[o++] = '"';
    out[o] = 0;
    return true;
}

/* ----------------------------------------------------------------- HTTP */

static int parse_endpoint(endpoint_t *ep, const char *s, size_t n, char *err,
                          size_t errlen) {
    char buf[300];
    if (n >= sizeof(buf))
        return kvs__errf(err, errlen, KVS_EINVAL, "etcd endpoint too long");
    memcpy(buf, s, n);
    buf[n] = 0;
    char *a = buf;
    if (!strncmp(a, "https://", 8))
        return kvs__errf(err, errlen, KVS_EINVAL,
                         "etcd endpoint %s: https is not supported (plain "
                         "http only)",
                         buf);
    if (!strncmp(a, "http://", 7))
        a += 7;
    size_t al = strlen(a);
    if (al && a[al - 1] == '/')
        a[--al] = 0;
    char *colon;
    if (a[0] == '[') {
        char *e = strchr(a, ']');
        if (!e || e[1] != ':')
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "etcd endpoint %s: expected [addr]:port", buf);
        *e = 0;
        snprintf(ep->host, sizeof(ep->host), "%s", a + 1);
        colon = e + 1;
    } else {
        colon = strrchr(a, ':');
        if (!colon || colon == a)
            return kvs__errf(err, errlen, KVS_EINVAL,
                             "etcd endpoint %s: expected host:port", buf);
        *colon = 0;
        snprintf(ep->host, sizeof(ep->host), "%s", a);
    }
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || port <= 0 || port > 65535)
        return kvs__errf(err, errlen, KVS_EINVAL, "etcd endpoint %s: bad port",
                         buf);
    snprintf(ep->port, sizeof(ep->port), "%ld", port);
    return 0;
}

int kvs_etcd_new(const char *endpoints, uint32_t timeout_ms, kvs_etcd_t **out,
                 char *err, size_t errlen) {
    *out = NULL;
    if (!endpoints || !endpoints[0])
        return kvs__errf(err, errlen, KVS_EINVAL, "no etcd endpoint");
    kvs_etcd_t *e = calloc(1, sizeof(*e));
    if (!e)
        return KVS_ENOMEM;
    e->timeout_ms = timeout_ms ? timeout_ms : 2000;
    int rc;
    for (const char *p = endpoints; *p;) {
        size_t n = strcspn(p, ",");
        if (n) {
            if (e->n_ep == KVS_ETCD_MAX_ENDPOINTS) {
                rc = kvs__errf(err, errlen, KVS_EINVAL,
                               "more than %d etcd endpoints",
                               KVS_ETCD_MAX_ENDPOINTS);
                goto err;
            }
            if ((rc = parse_endpoint(&e->ep[e->n_ep], p, n, err, errlen)))
                goto err;
            e->n_ep++;
        }
        p += n;
        if (*p == ',')
            p++;
    }
    if (!e->n_ep) {
        rc = kvs__errf(err, errlen, KVS_EINVAL, "no etcd endpoint");
        goto err;
    }
    *out = e;
    return 0;
err:
    free(e);
    return rc;
}

void kvs_etcd_free(kvs_etcd_t *e) {
    free(e);
}

const char *kvs_etcd_errmsg(const kvs_etcd_t *e) {
    return e->errmsg;
}

/* Wait for `events` on fd until the deadline: 1 ready, 0 timed out, -errno. */
static int wait_fd(int fd, short events, uint64_t deadline) {
    for (;;) {
        uint64_t now = now_ms();
        if (now >= deadline)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        return r > 0;
    }
}

static int connect_ep(const endpoint_t *ep, uint64_t deadline, int *fd_out) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(ep->host, ep->port, &hints, &res);
    if (g)
        return g == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
    int rc = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family,
                        ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                        ai->ai_protocol);
        if (fd < 0) {
            rc = -errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            *fd_out = fd;
            rc = 0;
            break;
        }
        if (errno == EINPROGRESS) {
            int w = wait_fd(fd, POLLOUT, deadline);
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (w > 0 && !getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) &&
                !soerr) {
                *fd_out = fd;
                rc = 0;
                break;
            }
            rc = w == 0 ? -ETIMEDOUT : w < 0 ? w : -soerr;
        } else {
            rc = -errno;
        }
        close(fd);
    }
    freeaddrinfo(res);
    return rc;
}

/* One POST to one endpoint; the body of a 200 answer in *resp (malloc'ed,
 * NUL-terminated). */
static int post_ep(kvs_etcd_t *e, const endpoint_t *ep, const char *path,
                   const char *body, char **resp, size_t *rlen) {
    uint64_t deadline = now_ms() + e->timeout_ms;
    int fd = -1, rc = connect_ep(ep, deadline, &fd);
    char *buf = NULL;
    if (rc)
        return efail(e, rc == -ETIMEDOUT ? KVS_ETIMEDOUT : KVS_ECONN,
                     "etcd %s:%s: connect: %s", ep->host, ep->port,
                     strerror(-rc));
    size_t blen = strlen(body);
    char head[512];
    int hl = snprintf(head, sizeof(head),
                      "POST %s HTTP/1.0\r\nHost: %s:%s\r\nContent-Type: "
                      "application/json\r\nContent-Length: %zu\r\n\r\n",
                      path, ep->host, ep->port, blen);
    const char *parts[2] = {head, body};
    size_t lens[2] = {(size_t)hl, blen};
    for (int i = 0; i < 2; i++) {
        size_t off = 0;
        while (off < lens[i]) {
            ssize_t w = send(fd, parts[i] + off, lens[i] - off, MSG_NOSIGNAL);
            if (w > 0) {
                off += (size_t)w;
                continue;
            }
            if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
                int r = wait_fd(fd, POLLOUT, deadline);
                if (r > 0)
                    continue;
                rc = efail(e, r ? KVS_ECONN : KVS_ETIMEDOUT,
                           "etcd %s:%s: send timed out", ep->host, ep->port);
                goto err;
            }
            rc = efail(e, KVS_ECONN, "etcd %s:%s: send: %s", ep->host, ep->port,
                       strerror(errno));
            goto err;
        }
    }
    size_t len = 0, cap = 4096;
    if (!(buf = malloc(cap))) {
        rc = efail(e, KVS_ENOMEM, "out of memory");
        goto err;
    }
    for (;;) {
        if (len + 1 == cap) {
            if (cap >= MAX_ANSWER) {
                rc = efail(e, KVS_EPROTO, "etcd %s:%s: answer over %u bytes",
                           ep->host, ep->port, MAX_ANSWER);
                goto err;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                rc = efail(e, KVS_ENOMEM, "out of memory");
                goto err;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = recv(fd, buf + len, cap - 1 - len, 0);
        if (r > 0) {
            len += (size_t)r;
            continue;
        }
        if (r == 0)
            break;
        if (errno == EAGAIN || errno == EINTR) {
            int w = wait_fd(fd, POLLIN, deadline);
            if (w > 0)
                continue;
            rc = efail(e, w ? KVS_ECONN : KVS_ETIMEDOUT,
                       "etcd %s:%s: no answer within %u ms", ep->host, ep->port,
                       e->timeout_ms);
            goto err;
        }
        rc = efail(e, KVS_ECONN, "etcd %s:%s: recv: %s", ep->host, ep->port,
                   strerror(errno));
        goto err;
    }
    close(fd);
    fd = -1;
    buf[len] = 0;
    int status = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    if (sscanf(buf, "HTTP/%*d.%*d %d", &status) != 1 || !sep) {
        rc = efail(e, KVS_EPROTO, "etcd %s:%s: not an HTTP answer", ep->host,
                   ep->port);
        goto err;
    }
    sep += 4;
    size_t blen2 = len - (size_t)(sep - buf);
    memmove(buf, sep, blen2 + 1);
    if (status != 200) {
        /* The gateway's error body: {"error":"...","code":N,...}. */
        char msg[256] = "";
        const char *v, *ve;
        if (!json_get(buf, buf + blen2, "error", &v, &ve) ||
            !json_str(v, ve, msg, sizeof(msg)))
            snprintf(msg, sizeof(msg), "%.200s", buf);
        rc = efail(e, KVS_EIO, "etcd %s:%s: %s: HTTP %d: %s", ep->host,
                   ep->port, path, status, msg);
        goto err;
    }
    *resp = buf;
    *rlen = blen2;
    return 0;
err:
    if (fd >= 0)
        close(fd);
    free(buf);
    return rc;
}

/* POST to the endpoint that answered last, then to the others; an error
 * answer from etcd itself (KVS_EIO) is final, unreachable ones are not. */
static int post(kvs_etcd_t *e, const char *path, const char *body, char **resp,
                size_t *rlen) {
    int rc = KVS_ECONN;
    for (size_t i = 0; i < e->n_ep; i++) {
        size_t k = (e->cur + i) % e->n_ep;
        rc = post_ep(e, &e->ep[k], path, body, resp, rlen);
        if (rc != KVS_ECONN && rc != KVS_ETIMEDOUT) {
            if (!rc)
                e->cur = k;
            return rc;
        }
    }
    return rc;
}

/* ------------------------------------------------------------ the calls */

int kvs_etcd_lease_grant(kvs_etcd_t *e, uint32_t ttl_seconds, int64_t *id) {
    char body[64], *r = NULL;
    size_t rl;
    snprintf(body, sizeof(body), "{\"TTL\":%u}", ttl_seconds);
    int rc = post(e, "/v3/lease/grant", body, &r, &rl);
    if (rc)
        return rc;
    *id = member_i64(r, r + rl, "ID");
    free(r);
    if (!*id)
        return efail(e, KVS_EPROTO, "etcd lease grant: no ID in the answer");
    return 0;
}

int kvs_etcd_lease_keepalive(kvs_etcd_t *e, int64_t id, int64_t *ttl_left) {
    char body[64], *r = NULL;
    size_t rl;
    snprintf(body, sizeof(body), "{\"ID\":\"%" PRId64 "\"}", id);
    int rc = post(e, "/v3/lease/keepalive", body, &r, &rl);
    if (rc)
        return rc;
    /* A stream of one message: {"result":{..., "TTL":"N"}}; no TTL (0) once
     * the lease is gone. */
    const char *v, *ve;
    *ttl_left =
        json_get(r, r + rl, "result", &v, &ve) ? member_i64(v, ve, "TTL") : 0;
    free(r);
    return 0;
}

int kvs_etcd_lease_revoke(kvs_etcd_t *e, int64_t id) {
    char body[64], *r = NULL;
    size_t rl;
    snprintf(body, sizeof(body), "{\"ID\":\"%" PRId64 "\"}", id);
    int rc = post(e, "/v3/lease/revoke", body, &r, &rl);
    free(r);
    return rc;
}

int kvs_etcd_put(kvs_etcd_t *e, const char *key, const void *value,
                 size_t value_len, int64_t lease) {
    size_t kl = strlen(key);
    size_t cap = 4 * ((kl + 2) / 3) + 4 * ((value_len + 2) / 3) + 128;
    char *body = malloc(cap), *r = NULL;
    if (!body)
        return efail(e, KVS_ENOMEM, "out of memory");
    size_t o = (size_t)snprintf(body, cap, "{\"key\":\"");
    b64_encode((const uint8_t *)key, kl, body + o);
    o += strlen(body + o);
    o += (size_t)snprintf(body + o, cap - o, "\",\"value\":\"");
    b64_encode(value, value_len, body + o);
    o += strlen(body + o);
    snprintf(body + o, cap - o, "\",\"lease\":\"%" PRId64 "\"}", lease);
    size_t rl;
    int rc = post(e, "/v3/kv/put", body, &r, &rl);
    free(body);
    free(r);
    return rc;
}

void kvs_etcd_kvs_free(kvs_etcd_kv_t *kvs, size_t n) {
    for (size_t i = 0; kvs && i < n; i++) {
        free(kvs[i].key);
        free(kvs[i].value);
    }
    free(kvs);
}

/* Decode one base64 member of obj into a malloc'ed buffer. */
static char *member_b64(const char *obj, const char *end, const char *key,
                        size_t *len) {
    const char *v, *ve;
    *len = 0;
    if (!json_get(obj, end, key, &v, &ve))
        return calloc(1, 1); /* the gateway omits empty values */
    if (*v != '"' || ve - v < 2)
        return NULL;
    size_t n = (size_t)(ve - v - 2);
    char *out = malloc(n / 4 * 3 + 4);
    if (out && b64_decode(v + 1, n, (uint8_t *)out, len)) {
        free(out);
        return NULL;
    }
    return out;
}

int kvs_etcd_range_prefix(kvs_etcd_t *e, const char *prefix,
                          kvs_etcd_kv_t **kvs, size_t *n, int64_t *revision) {
    *kvs = NULL;
    *n = 0;
    size_t pl = strlen(prefix);
    if (!pl || pl > 1024)
        return efail(e, KVS_EINVAL, "etcd range: bad prefix");
    /* range_end = the prefix with its last byte incremented: every key
     * that starts with the prefix sorts below it. */
    char end_key[1025];
    memcpy(end_key, prefix, pl);
    end_key[pl - 1] = (char)((unsigned char)end_key[pl - 1] + 1);
    char body[2 * 1400 + 64], kb[1400], eb[1400];
    b64_encode((const uint8_t *)prefix, pl, kb);
    b64_encode((const uint8_t *)end_key, pl, eb);
    snprintf(body, sizeof(body), "{\"key\":\"%s\",\"range_end\":\"%s\"}", kb,
             eb);
    char *r = NULL;
    size_t rl;
    int rc = post(e, "/v3/kv/range", body, &r, &rl);
    if (rc)
        return rc;
    const char *rend = r + rl, *v, *ve;
    if (revision) {
        *revision = 0;
        if (json_get(r, rend, "header", &v, &ve))
            *revision = member_i64(v, ve, "revision");
    }
    kvs_etcd_kv_t *out = NULL;
    size_t cnt = 0, cap = 0;
    if (json_get(r, rend, "kvs", &v, &ve)) {
        const char *p = ws(v + 1, ve);
        while (p < ve && *p == '{') {
            const char *oe = skip_value(p, ve, 0);
            if (!oe) {
                rc = efail(e, KVS_EPROTO, "etcd range: bad kvs entry");
                goto err;
            }
            if (cnt == cap) {
                cap = cap ? cap * 2 : 16;
                kvs_etcd_kv_t *t = realloc(out, cap * sizeof(*t));
                if (!t) {
                    rc = efail(e, KVS_ENOMEM, "out of memory");
                    goto err;
                }
                out = t;
            }
            kvs_etcd_kv_t *kv = &out[cnt];
            memset(kv, 0, sizeof(*kv));
            size_t kl;
            kv->key = member_b64(p, oe, "key", &kl);
            kv->value = member_b64(p, oe, "value", &kv->value_len);
            cnt++;
            if (!kv->key || !kv->value) {
                rc = efail(e, KVS_EPROTO, "etcd range: bad base64");
                goto err;
            }
            kv->mod_revision = member_i64(p, oe, "mod_revision");
            kv->lease = member_i64(p, oe, "lease");
            p = ws(oe, ve);
            if (p < ve && *p == ',')
                p = ws(p + 1, ve);
        }
    }
    free(r);
    *kvs = out;
    *n = cnt;
    return 0;
err:
    free(r);
    kvs_etcd_kvs_free(out, cnt);
    return rc;
}

/* ----------------------------------------------------------- node record */

static int key_join(const char *prefix, const char *tail, char *buf,
                    size_t cap) {
    size_t pl = strlen(prefix);
    while (pl && prefix[pl - 1] == '/')
        pl--;
    int n = snprintf(buf, cap, "%.*s/nodes/%s", (int)pl, prefix, tail);
    return n < 0 || (size_t)n >= cap ? KVS_ETOOBIG : 0;
}

int kvs_node_key(const char *prefix, const char *node_id, char *buf,
                 size_t cap) {
    return key_join(prefix, node_id, buf, cap);
}

int kvs_node_key_prefix(const char *prefix, char *buf, size_t cap) {
    return key_join(prefix, "", buf, cap);
}

int kvs_node_record_encode(const kvs_node_record_t *r, char *buf, size_t cap,
                           size_t *len) {
    char id[300], addr[600], ver[80];
    if (!json_quote(r->node_id, id, sizeof(id)) ||
        !json_quote(r->addr, addr, sizeof(addr)) ||
        !json_quote(r->version, ver, sizeof(ver)))
        return KVS_ETOOBIG;
    int n =
        snprintf(buf, cap,
                 "{\"node_id\":%s,\"addr\":%s,\"port\":%u,\"http_port\":%u,"
                 "\"memory_limit\":%" PRIu64 ",\"memory_used\":%" PRIu64
                 ",\"sequences\":%" PRIu64 ",\"start_time\":%" PRId64
                 ",\"protocol\":%u,\"version\":%s}",
                 id, addr, r->port, r->http_port, r->memory_limit,
                 r->memory_used, r->sequences, r->start_time, r->protocol, ver);
    if (n < 0 || (size_t)n >= cap)
        return KVS_ETOOBIG;
    if (len)
        *len = (size_t)n;
    return 0;
}

int kvs_node_record_decode(const char *json, size_t len, kvs_node_record_t *r) {
    memset(r, 0, sizeof(*r));
    const char *end = json + len, *v, *ve;
    const char *p = ws(json, end);
    if (p >= end || *p != '{' || !skip_value(p, end, 0))
        return KVS_EPROTO;
    if (!json_get(p, end, "addr", &v, &ve) ||
        !json_str(v, ve, r->addr, sizeof(r->addr)) || !r->addr[0])
        return KVS_EPROTO;
    if (json_get(p, end, "node_id", &v, &ve))
        json_str(v, ve, r->node_id, sizeof(r->node_id));
    if (json_get(p, end, "version", &v, &ve))
        json_str(v, ve, r->version, sizeof(r->version));
    r->port = (uint32_t)member_i64(p, end, "port");
    r->http_port = (uint32_t)member_i64(p, end, "http_port");
    r->memory_limit = (uint64_t)member_i64(p, end, "memory_limit");
    r->memory_used = (uint64_t)member_i64(p, end, "memory_used");
    r->sequences = (uint64_t)member_i64(p, end, "sequences");
    r->start_time = member_i64(p, end, "start_time");
    r->protocol = (uint32_t)member_i64(p, end, "protocol");
    return 0;
}

/* ------------------------------------------------------ rendezvous order */

uint64_t kvs_rendezvous_node_hash(const char *addr) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (; *addr; addr++) {
        h ^= (unsigned char)*addr;
        h *= 0x100000001b3ull;
    }
    return h;
}

uint64_t kvs_rendezvous_weight(uint64_t seq, uint64_t node_hash) {
    uint64_t x = seq ^ node_hash; /* splitmix64's finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}
