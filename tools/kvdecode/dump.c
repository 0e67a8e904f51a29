/*
 * dump.c: writes every layer's post-RoPE queries, keys and values, per head,
 * to one file that recall and accuracy benchmarks read with a plain mmap or
 * numpy.memmap (format: bench/README.md, "Dump format"). Arrays are stored
 * head-major ([head][token][head_dim]) because a benchmark works on one head
 * at a time; the decoder produces token-major chunks, so each chunk is
 * scattered to its place with pwrite rather than buffered whole (a 64K-token
 * dump of tinycode128 is 1.5 GB in fp32).
 */
#include "decoder_int.h"
#include "kvs_dump.h"
#include "kvs_kernels.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct kvs_qkv_dump_s {
    int fd;
    char *path;
    kvs_model_config_t cfg;
    uint32_t n_tokens;
    kvs_dtype_t dtype;
    size_t elt;
    uint64_t data_offset;
    void *buf; /* one head's rows of one chunk, converted */
    size_t buf_cap;
    uint32_t done; /* tokens written for the last layer */
    int err;
};

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static int write_all(int fd, const void *buf, size_t len, uint64_t off) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        len -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

int kvs_qkv_dump_open(const char *path, const kvs_model_config_t *cfg,
                      const int32_t *tokens, uint32_t n_tokens,
                      kvs_dtype_t dtype, kvs_qkv_dump_t **out, char *errbuf,
                      size_t errlen) {
    kvs__dec_fmt(errbuf, errlen, "%s", "");
    if (!path || !cfg || !tokens || n_tokens == 0 || !out ||
        (dtype != KVS_DTYPE_F32 && dtype != KVS_DTYPE_F16)) {
        kvs__dec_fmt(errbuf, errlen,
                     "dump: bad arguments (need path, tokens, f32 or f16)");
        return KVS_EINVAL;
    }
    *out = NULL;
    kvs_qkv_dump_t *d = calloc(1, sizeof(*d));
    if (!d || !(d->path = strdup(path))) {
        free(d);
        kvs__dec_fmt(errbuf, errlen, "out of memory");
        return KVS_ENOMEM;
    }
    d->cfg = *cfg;
    d->n_tokens = n_tokens;
    d->dtype = dtype;
    d->elt = kvs_dtype_size(dtype);
    uint64_t toks_end = KVS_DUMP_HEADER_BYTES + 4ull * n_tokens;
    d->data_offset =
        (toks_end + KVS_DUMP_ALIGN - 1) / KVS_DUMP_ALIGN * KVS_DUMP_ALIGN;
    d->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (d->fd < 0) {
        int rc = -errno;
        kvs__dec_fmt(errbuf, errlen, "dump: %s: %s", path, strerror(errno));
        free(d->path);
        free(d);
        return rc;
    }
    unsigned char h[KVS_DUMP_HEADER_BYTES];
    memset(h, 0, sizeof(h));
    memcpy(h, KVS_DUMP_MAGIC, 8);
    put32(h + 8, KVS_DUMP_VERSION);
    put32(h + 12, KVS_DUMP_HEADER_BYTES);
    put32(h + 16, cfg->n_layers);
    put32(h + 20, cfg->n_heads);
    put32(h + 24, cfg->n_kv_heads);
    put32(h + 28, cfg->head_dim);
    put32(h + 32, n_tokens);
    put32(h + 36, (uint32_t)dtype);
    put32(h + 40, cfg->seq_len);
    put32(h + 44, cfg->vocab_size);
    put64(h + 48, d->data_offset);
    float scale = 1.0f / sqrtf((float)cfg->head_dim);
    memcpy(h + 56, &scale, 4);
    int rc = write_all(d->fd, h, sizeof(h), 0);
    /* Tokens as little-endian int32 (the host is little-endian x86/arm). */
    if (rc == 0)
        rc = write_all(d->fd, tokens, 4ull * n_tokens, KVS_DUMP_HEADER_BYTES);
    uint64_t total =
        d->data_offset + (uint64_t)cfg->n_layers *
                             (cfg->n_heads + 2ull * cfg->n_kv_heads) *
                             n_tokens * cfg->head_dim * d->elt;
    /* Size the file now: a short dump then reads as zeros, not EOF, and a
     * full disk fails here rather than after an hour of prefill. */
    if (rc == 0 && (rc = posix_fallocate(d->fd, 0, (off_t)total)) != 0)
        rc = -rc;
    if (rc != 0) {
        kvs__dec_fmt(errbuf, errlen, "dump: %s: %s", path, kvs_strerror(rc));
        close(d->fd);
        unlink(d->path);
        free(d->path);
        free(d);
        return rc;
    }
    *out = d;
    return 0;
}

/* Write rows [n][stride] column block `col` (head_dim wide) of `src` to the
 * array of `head` in the block starting at `arr` (bytes). */
static int put_head(kvs_qkv_dump_t *d, uint64_t arr, uint32_t head,
                    uint32_t pos, uint32_t n, const float *src,
                    uint32_t stride) {
    uint32_t hd = d->cfg.head_dim;
    size_t need = (size_t)n * hd * d->elt;
    if (need > d->buf_cap) {
        void *b = realloc(d->buf, need);
        if (!b)
            return KVS_ENOMEM;
        d->buf = b;
        d->buf_cap = need;
    }
    for (uint32_t i = 0; i < n; i++) {
        const float *row = src + (size_t)i * stride + (size_t)head * hd;
        char *dst = (char *)d->buf + (size_t)i * hd * d->elt;
        if (d->dtype == KVS_DTYPE_F32)
            memcpy(dst, row, hd * sizeof(float));
        else
            kvs_from_f32(d->dtype, row, dst, hd);
    }
    uint64_t off = arr + ((uint64_t)head * d->n_tokens + pos) * hd * d->elt;
    return write_all(d->fd, d->buf, need, off);
}

int kvs_qkv_dump_observe(void *ctx, uint32_t layer, uint32_t pos,
                         uint32_t n_tokens, const float *q, const float *k,
                         const float *v) {
    kvs_qkv_dump_t *d = ctx;
    if (d->err || pos >= d->n_tokens)
        return d->err;
    if (n_tokens > d->n_tokens - pos)
        n_tokens = d->n_tokens - pos;
    const kvs_model_config_t *c = &d->cfg;
    uint64_t head_bytes = (uint64_t)d->n_tokens * c->head_dim * d->elt;
    uint64_t qarr = d->data_offset + (uint64_t)layer *
                                         (c->n_heads + 2ull * c->n_kv_heads) *
                                         head_bytes;
    uint64_t karr = qarr + c->n_heads * head_bytes;
    uint64_t varr = karr + c->n_kv_heads * head_bytes;
    int rc = 0;
    for (uint32_t h = 0; h < c->n_heads && rc == 0; h++)
        rc = put_head(d, qarr, h, pos, n_tokens, q, c->dim);
    for (uint32_t g = 0; g < c->n_kv_heads && rc == 0; g++)
        rc = put_head(d, karr, g, pos, n_tokens, k, c->kv_dim);
    for (uint32_t g = 0; g < c->n_kv_heads && rc == 0; g++)
        rc = put_head(d, varr, g, pos, n_tokens, v, c->kv_dim);
    if (rc == 0 && layer == c->n_layers - 1 && pos + n_tokens > d->done)
        d->done = pos + n_tokens;
    d->err = rc;
    return rc;
}

int kvs_qkv_dump_close(kvs_qkv_dump_t *d) {
    if (!d)
        return 0;
    int rc = d->err;
    /* A run that stopped early leaves zeros: never pass that off as data. */
    if (rc == 0 && d->done < d->n_tokens)
        rc = KVS_EINVAL;
    if (close(d->fd) != 0 && rc == 0)
        rc = -errno;
    if (rc != 0)
        unlink(d->path);
    free(d->buf);
    free(d->path);
    free(d);
    return rc;
}
