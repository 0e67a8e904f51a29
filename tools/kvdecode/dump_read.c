/*
 * dump_read.c: the reader of kvs_dump.h. Every header field is checked
 * against the limits before a size is computed from it, and the file must be
 * exactly as long as the header says, so that kvs_dump_rows can index the
 * mapping with nothing left to check but its own arguments.
 */
#include "kvs_dump.h"

#include "kvs_errf.h"
#include "kvs_kernels.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct kvs_dump_s {
    const uint8_t *base;
    size_t size;
    int mapped; /* base is our mmap (kvs_dump_open), else borrowed */
    kvs_dump_info_t info;
    size_t elt;        /* bytes per element */
    uint64_t data_off; /* where layer 0 starts */
    uint64_t head_bytes;
};

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p) {
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Check the header of the `len` bytes at `b` and fill d; the message names
 * the file and the first thing found wrong. */
static int parse(kvs_dump_t *d, const uint8_t *b, size_t len, const char *name,
                 char *errbuf, size_t errlen) {
    if (len < KVS_DUMP_HEADER_BYTES)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: truncated: %zu bytes, shorter than the %d-byte "
                         "dump header",
                         name, len, KVS_DUMP_HEADER_BYTES);
    if (memcmp(b, KVS_DUMP_MAGIC, 8) != 0)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: not a kvdecode --dump file (no %s magic)", name,
                         KVS_DUMP_MAGIC);
    uint32_t version = get32(b + 8), hbytes = get32(b + 12);
    if (version != KVS_DUMP_VERSION || hbytes != KVS_DUMP_HEADER_BYTES)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: dump version %u with a %u-byte header; this "
                         "reader knows version %d (%d bytes)",
                         name, version, hbytes, KVS_DUMP_VERSION,
                         KVS_DUMP_HEADER_BYTES);
    kvs_dump_info_t *in = &d->info;
    in->n_layers = get32(b + 16);
    in->n_q_heads = get32(b + 20);
    in->n_kv_heads = get32(b + 24);
    in->head_dim = get32(b + 28);
    in->n_tokens = get32(b + 32);
    uint32_t dtype = get32(b + 36);
    in->seq_len = get32(b + 40);
    in->vocab_size = get32(b + 44);
    uint64_t off = get64(b + 48);
    memcpy(&in->scale, b + 56, 4);
    if (in->n_layers == 0 || in->n_layers > KVS_DUMP_MAX_LAYERS ||
        in->n_q_heads == 0 || in->n_q_heads > KVS_DUMP_MAX_HEADS ||
        in->n_kv_heads == 0 || in->n_q_heads % in->n_kv_heads != 0 ||
        in->head_dim == 0 || in->head_dim > KVS_DUMP_MAX_HEAD_DIM ||
        in->n_tokens == 0)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: damaged header: %u layers, %u query heads, %u KV "
                         "heads, head_dim %u, %u tokens (limits: 1..%d "
                         "layers, 1..%d heads dividing the query heads, "
                         "head_dim 1..%d, at least 1 token)",
                         name, in->n_layers, in->n_q_heads, in->n_kv_heads,
                         in->head_dim, in->n_tokens, KVS_DUMP_MAX_LAYERS,
                         KVS_DUMP_MAX_HEADS, KVS_DUMP_MAX_HEAD_DIM);
    if (dtype != KVS_DTYPE_F32 && dtype != KVS_DTYPE_F16)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: damaged header: dtype %u (0 = fp32, 1 = fp16)",
                         name, dtype);
    in->dtype = (kvs_dtype_t)dtype;
    if (!isfinite(in->scale) || !(in->scale > 0))
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: damaged header: softmax scale %g", name,
                         (double)in->scale);
    /* Token ids sit between the header and the arrays. */
    uint64_t toks_end = KVS_DUMP_HEADER_BYTES + 4ull * in->n_tokens;
    if (off % KVS_DUMP_ALIGN != 0 || off < toks_end)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: damaged header: data offset %llu (a multiple "
                         "of %d, at least %llu for %u tokens)",
                         name, (unsigned long long)off, KVS_DUMP_ALIGN,
                         (unsigned long long)toks_end, in->n_tokens);
    if (off > len)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: truncated: %zu bytes, the arrays start at %llu",
                         name, len, (unsigned long long)off);
    d->elt = in->dtype == KVS_DTYPE_F32 ? 4 : 2;
    /* < 2^32 * 2^12 * 4 = 2^46, then * 3 * 2^12 < 2^60: no wrap. The
     * layer count is checked by division so that it cannot wrap either. */
    d->head_bytes = (uint64_t)in->n_tokens * in->head_dim * d->elt;
    uint64_t layer_bytes =
        (in->n_q_heads + 2ull * in->n_kv_heads) * d->head_bytes;
    uint64_t avail = len - off;
    if (avail / layer_bytes < in->n_layers)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: truncated: %zu bytes, the header needs %llu "
                         "bytes per layer for %u layers after offset %llu",
                         name, len, (unsigned long long)layer_bytes,
                         in->n_layers, (unsigned long long)off);
    uint64_t need = off + in->n_layers * layer_bytes;
    if (need != len)
        return kvs__errf(errbuf, errlen, KVS_ECORRUPT,
                         "%s: oversized: %zu bytes where the header says "
                         "%llu",
                         name, len, (unsigned long long)need);
    d->data_off = off;
    d->base = b;
    d->size = len;
    return 0;
}

int kvs_dump_open_buffer(const void *buf, size_t len, const char *name,
                         kvs_dump_t **out, char *errbuf, size_t errlen) {
    kvs__errf(errbuf, errlen, 0, "%s", "");
    if (!out)
        return kvs__errf(errbuf, errlen, KVS_EINVAL, "dump: no output");
    *out = NULL;
    if (!name)
        name = "dump";
    /* Token ids and fp16 rows are read in place. */
    if (!buf || (uintptr_t)buf % 4 != 0)
        return kvs__errf(errbuf, errlen, KVS_EINVAL,
                         "%s: buffer missing or not 4-byte aligned", name);
    kvs_dump_t *d = calloc(1, sizeof(*d));
    if (!d)
        return kvs__errf(errbuf, errlen, KVS_ENOMEM, "%s: out of memory", name);
    int rc = parse(d, buf, len, name, errbuf, errlen);
    if (rc != 0) {
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

int kvs_dump_open(const char *path, kvs_dump_t **out, char *errbuf,
                  size_t errlen) {
    kvs__errf(errbuf, errlen, 0, "%s", "");
    if (!path || !out)
        return kvs__errf(errbuf, errlen, KVS_EINVAL,
                         "dump: no path or no output");
    *out = NULL;
    void *map = MAP_FAILED;
    size_t size = 0;
    kvs_dump_t *d = NULL;
    int rc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = -errno;
        kvs__errf(errbuf, errlen, rc, "%s: %s", path, strerror(errno));
        goto err;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        kvs__errf(errbuf, errlen, rc, "%s: %s", path, strerror(errno));
        goto err;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = kvs__errf(errbuf, errlen, KVS_ECORRUPT, "%s: not a regular file",
                       path);
        goto err;
    }
    size = (size_t)st.st_size;
    /* mmap refuses length 0; parse reports the short file instead. */
    if (size >= KVS_DUMP_HEADER_BYTES) {
        map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            rc = -errno;
            kvs__errf(errbuf, errlen, rc, "%s: mmap: %s", path,
                      strerror(errno));
            goto err;
        }
    }
    if (!(d = calloc(1, sizeof(*d)))) {
        rc = kvs__errf(errbuf, errlen, KVS_ENOMEM, "%s: out of memory", path);
        goto err;
    }
    static const uint8_t none[1];
    rc = parse(d, map == MAP_FAILED ? none : map, map == MAP_FAILED ? 0 : size,
               path, errbuf, errlen);
    if (rc != 0)
        goto err;
    d->mapped = 1;
    close(fd);
    *out = d;
    return 0;
err:
    free(d);
    if (map != MAP_FAILED)
        munmap(map, size);
    if (fd >= 0)
        close(fd);
    return rc;
}

void kvs_dump_close(kvs_dump_t *d) {
    if (!d)
        return;
    if (d->mapped)
        munmap((void *)d->base, d->size);
    free(d);
}

const kvs_dump_info_t *kvs_dump_info(const kvs_dump_t *d) {
    return &d->info;
}

const int32_t *kvs_dump_tokens(const kvs_dump_t *d) {
    return (const int32_t *)(const void *)(d->base + KVS_DUMP_HEADER_BYTES);
}

int kvs_dump_rows(const kvs_dump_t *d, uint32_t layer, kvs_dump_array_t which,
                  uint32_t head, uint32_t pos, uint32_t n, float *out) {
    if (!d || (!out && n > 0))
        return KVS_EINVAL;
    const kvs_dump_info_t *in = &d->info;
    uint64_t arr;
    switch (which) {
    case KVS_DUMP_Q:
        if (head >= in->n_q_heads)
            return KVS_ERANGE;
        arr = head;
        break;
    case KVS_DUMP_K:
        if (head >= in->n_kv_heads)
            return KVS_ERANGE;
        arr = (uint64_t)in->n_q_heads + head;
        break;
    case KVS_DUMP_V:
        if (head >= in->n_kv_heads)
            return KVS_ERANGE;
        arr = (uint64_t)in->n_q_heads + in->n_kv_heads + head;
        break;
    default:
        return KVS_EINVAL;
    }
    if (layer >= in->n_layers || pos > in->n_tokens || n > in->n_tokens - pos)
        return KVS_ERANGE;
    const uint8_t *p =
        d->base + d->data_off +
        ((uint64_t)layer * (in->n_q_heads + 2ull * in->n_kv_heads) + arr) *
            d->head_bytes +
        (uint64_t)pos * in->head_dim * d->elt;
    size_t cnt = (size_t)n * in->head_dim;
    if (d->elt == 4) {
        memcpy(out, p, cnt * 4);
    } else {
        const uint16_t *s = (const uint16_t *)(const void *)p;
        for (size_t i = 0; i < cnt; i++)
            out[i] = kvs_f16_to_f32(s[i]);
    }
    return 0;
}
