/*
 * model.c: maps a llama2.c "v0" checkpoint and proves it sane before anything
 * reads a weight. The file is untrusted input: every header field is range
 * checked, sizes are computed in 64 bits with overflow checks, the file size
 * must match the header exactly, and the contents are scanned once (finite
 * weights, RoPE tables that are rotations) so that a truncated, shifted or
 * bit-rotted file is reported by name instead of producing garbage logits.
 *
 * Layout (all little-endian): int32 dim, hidden_dim, n_layers, n_heads,
 * n_kv_heads, vocab_size (negative: a separate classifier follows), seq_len;
 * then fp32 token embedding, attention RMSNorm weights, wq, wk, wv, wo, FFN
 * RMSNorm weights, w1, w2, w3, final RMSNorm weights, freq_cis_real and
 * freq_cis_imag ([seq_len][head_dim/2] each), and the optional classifier.
 */
#include "decoder_int.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_BYTES (7 * sizeof(int32_t))
/* llama2.c export.py "version 1+" files start with this magic ("ak42"). */
#define LLAMA2C_MAGIC 0x616b3432

/* a * b + c into *out, false on uint64 overflow. */
static bool mul_add(uint64_t a, uint64_t b, uint64_t c, uint64_t *out) {
    if (a != 0 && b > (UINT64_MAX - c) / a)
        return false;
    *out = a * b + c;
    return true;
}

static int check_header(const int32_t h[7], kvs_model_config_t *cfg,
                        char *errbuf, size_t errlen) {
    static const char *names[7] = {"dim",     "hidden_dim", "n_layers",
                                   "n_heads", "n_kv_heads", "vocab_size",
                                   "seq_len"};
    static const uint32_t max[7] = {KVS_MODEL_MAX_DIM,    KVS_MODEL_MAX_HIDDEN,
                                    KVS_MODEL_MAX_LAYERS, KVS_MODEL_MAX_HEADS,
                                    KVS_MODEL_MAX_HEADS,  KVS_MODEL_MAX_VOCAB,
                                    KVS_MODEL_MAX_SEQ_LEN};
    if (h[0] == LLAMA2C_MAGIC) {
        kvs__dec_fmt(errbuf, errlen,
                     "llama2.c version-1+ file (magic \"ak42\"); only the "
                     "legacy v0 layout is supported");
        return KVS_ECORRUPT;
    }
    uint32_t v[7];
    for (int i = 0; i < 7; i++) {
        int64_t x = h[i];
        if (i == 5 && x < 0)
            x = -x; /* negative vocab: unshared classifier */
        if (x < 1 || x > (int64_t)max[i]) {
            kvs__dec_fmt(errbuf, errlen,
                         "bad header: %s = %d (expected 1..%u%s)", names[i],
                         h[i], max[i], i == 5 ? " or its negative" : "");
            return KVS_ECORRUPT;
        }
        v[i] = (uint32_t)x;
    }
    memset(cfg, 0, sizeof(*cfg));
    cfg->dim = v[0];
    cfg->hidden_dim = v[1];
    cfg->n_layers = v[2];
    cfg->n_heads = v[3];
    cfg->n_kv_heads = v[4];
    cfg->vocab_size = v[5];
    cfg->seq_len = v[6];
    cfg->shared_classifier = h[5] > 0;
    if (cfg->dim % cfg->n_heads != 0) {
        kvs__dec_fmt(errbuf, errlen,
                     "bad header: dim %u not divisible by n_heads %u", cfg->dim,
                     cfg->n_heads);
        return KVS_ECORRUPT;
    }
    if (cfg->n_kv_heads > cfg->n_heads || cfg->n_heads % cfg->n_kv_heads) {
        kvs__dec_fmt(errbuf, errlen,
                     "bad header: n_heads %u not a multiple of n_kv_heads %u",
                     cfg->n_heads, cfg->n_kv_heads);
        return KVS_ECORRUPT;
    }
    cfg->head_dim = cfg->dim / cfg->n_heads;
    if (cfg->head_dim % 2 != 0 || cfg->head_dim > KVS_MAX_HEAD_DIM) {
        kvs__dec_fmt(errbuf, errlen,
                     "bad header: head_dim %u must be even and at most %u",
                     cfg->head_dim, KVS_MAX_HEAD_DIM);
        return KVS_ECORRUPT;
    }
    cfg->kv_dim = cfg->n_kv_heads * cfg->head_dim;
    return 0;
}

/* Lay the weight views over the mapping; returns the float count the header
 * implies (or false on overflow). */
static bool layout(kvs_model_t *m, const float *base, uint64_t *n_floats) {
    const kvs_model_config_t *c = &m->cfg;
    uint64_t L = c->n_layers, d = c->dim, kv = c->kv_dim, hid = c->hidden_dim;
    uint64_t off = 0, n;
    const float *p[14];
    /* Sizes in order; each product fits in 64 bits given the header limits
     * (largest: 2^10 * 2^16 * 2^20), the running sum is checked. */
    uint64_t sizes[14] = {
        (uint64_t)c->vocab_size * d,                            /* tok_emb */
        L * d,                                                  /* rms_att */
        L * d * d,                                              /* wq */
        L * kv * d,                                             /* wk */
        L * kv * d,                                             /* wv */
        L * d * d,                                              /* wo */
        L * d,                                                  /* rms_ffn */
        L * hid * d,                                            /* w1 */
        L * d * hid,                                            /* w2 */
        L * hid * d,                                            /* w3 */
        d,                                                      /* rms_final */
        (uint64_t)c->seq_len * (c->head_dim / 2),               /* rope_cos */
        (uint64_t)c->seq_len * (c->head_dim / 2),               /* rope_sin */
        c->shared_classifier ? 0 : (uint64_t)c->vocab_size * d, /* wcls */
    };
    for (int i = 0; i < 14; i++) {
        p[i] = base ? base + off : NULL;
        if (!mul_add(1, sizes[i], off, &n))
            return false;
        off = n;
    }
    *n_floats = off;
    if (!base)
        return true;
    m->tok_emb = p[0];
    m->rms_att = p[1];
    m->wq = p[2];
    m->wk = p[3];
    m->wv = p[4];
    m->wo = p[5];
    m->rms_ffn = p[6];
    m->w1 = p[7];
    m->w2 = p[8];
    m->w3 = p[9];
    m->rms_final = p[10];
    m->rope_cos = p[11];
    m->rope_sin = p[12];
    m->wcls = c->shared_classifier ? p[0] : p[13];
    uint64_t params = 0;
    for (int i = 0; i < 14; i++)
        if (i != 11 && i != 12)
            params += sizes[i];
    m->cfg.n_params = params;
    return true;
}

/* Contents: finite weights, RoPE tables that are rotations. */
static int check_contents(const kvs_model_t *m, char *errbuf, size_t errlen) {
    const kvs_model_config_t *c = &m->cfg;
    uint64_t half = c->head_dim / 2;
    const float *w = m->tok_emb;
    /* Weights: everything before the tables, and the classifier. */
    uint64_t n_before = (uint64_t)(m->rope_cos - m->tok_emb);
    for (uint64_t i = 0; i < n_before; i++) {
        if (!isfinite(w[i])) {
            kvs__dec_fmt(errbuf, errlen,
                         "corrupt weights: non-finite value at float %llu",
                         (unsigned long long)i);
            return KVS_ECORRUPT;
        }
    }
    if (!c->shared_classifier) {
        uint64_t n = (uint64_t)c->vocab_size * c->dim;
        for (uint64_t i = 0; i < n; i++) {
            if (!isfinite(m->wcls[i])) {
                kvs__dec_fmt(errbuf, errlen,
                             "corrupt classifier: non-finite value at %llu",
                             (unsigned long long)i);
                return KVS_ECORRUPT;
            }
        }
    }
    for (uint64_t i = 0; i < half; i++) {
        if (m->rope_cos[i] != 1.0f || m->rope_sin[i] != 0.0f) {
            kvs__dec_fmt(errbuf, errlen,
                         "corrupt RoPE tables: position 0 is not the identity "
                         "(layout is not llama2.c v0?)");
            return KVS_ECORRUPT;
        }
    }
    uint64_t n = (uint64_t)c->seq_len * half;
    for (uint64_t i = 0; i < n; i++) {
        double cs = m->rope_cos[i], sn = m->rope_sin[i];
        /* fp32 rounding of cos and sin moves this by ~1e-7 at most. */
        if (!(fabs(cs * cs + sn * sn - 1.0) < 1e-5)) {
            kvs__dec_fmt(errbuf, errlen,
                         "corrupt RoPE tables: entry %llu (position %llu) is "
                         "not a rotation",
                         (unsigned long long)i, (unsigned long long)(i / half));
            return KVS_ECORRUPT;
        }
    }
    return 0;
}

int kvs_model_open(const char *path, kvs_model_t **out, char *errbuf,
                   size_t errlen) {
    kvs__dec_fmt(errbuf, errlen, "%s", "");
    if (!path || !out) {
        kvs__dec_fmt(errbuf, errlen, "NULL path or out");
        return KVS_EINVAL;
    }
    *out = NULL;
    int rc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = -errno;
        kvs__dec_fmt(errbuf, errlen, "%s: %s", path, strerror(errno));
        return rc;
    }
    kvs_model_t *m = calloc(1, sizeof(*m));
    if (!m) {
        close(fd);
        kvs__dec_fmt(errbuf, errlen, "out of memory");
        return KVS_ENOMEM;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = -errno;
        kvs__dec_fmt(errbuf, errlen, "%s: stat: %s", path, strerror(errno));
        goto err;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = KVS_ECORRUPT;
        kvs__dec_fmt(errbuf, errlen, "%s: not a regular file", path);
        goto err;
    }
    uint64_t fsize = (uint64_t)st.st_size;
    if (fsize < HEADER_BYTES) {
        rc = KVS_ECORRUPT;
        kvs__dec_fmt(errbuf, errlen,
                     "%s: truncated: %llu bytes, shorter than the 28-byte "
                     "header",
                     path, (unsigned long long)fsize);
        goto err;
    }
    int32_t h[7];
    ssize_t got = pread(fd, h, sizeof(h), 0);
    if (got != (ssize_t)sizeof(h)) {
        rc = got < 0 ? -errno : KVS_EIO;
        kvs__dec_fmt(errbuf, errlen, "%s: cannot read the header", path);
        goto err;
    }
    char why[256];
    rc = check_header(h, &m->cfg, why, sizeof(why));
    if (rc != 0) {
        kvs__dec_fmt(errbuf, errlen, "%s: %s", path, why);
        goto err;
    }
    uint64_t n_floats, need;
    if (!layout(m, NULL, &n_floats) ||
        !mul_add(n_floats, sizeof(float), HEADER_BYTES, &need)) {
        rc = KVS_ECORRUPT;
        kvs__dec_fmt(errbuf, errlen, "%s: header implies an impossible size",
                     path);
        goto err;
    }
    if (fsize != need) {
        /* Say which of the two legal sizes the file is nearest to: a file
         * that matches the other classifier choice has a flipped sign. */
        uint64_t cls = 4ull * m->cfg.vocab_size * m->cfg.dim;
        uint64_t other = m->cfg.shared_classifier ? need + cls : need - cls;
        rc = KVS_ECORRUPT;
        if (fsize == other)
            kvs__dec_fmt(errbuf, errlen,
                         "%s: size %llu fits a %s classifier but vocab_size "
                         "%d says %s",
                         path, (unsigned long long)fsize,
                         m->cfg.shared_classifier ? "separate" : "shared", h[5],
                         m->cfg.shared_classifier ? "shared" : "separate");
        else
            kvs__dec_fmt(errbuf, errlen,
                         "%s: %s: %llu bytes, the header implies %llu", path,
                         fsize < need ? "truncated" : "trailing bytes",
                         (unsigned long long)fsize, (unsigned long long)need);
        goto err;
    }
    if (need > SIZE_MAX) {
        rc = KVS_ENOMEM;
        kvs__dec_fmt(errbuf, errlen, "%s: too large to map", path);
        goto err;
    }
    m->map_size = (size_t)need;
    m->map = mmap(NULL, m->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m->map == MAP_FAILED) {
        rc = -errno;
        m->map = NULL;
        kvs__dec_fmt(errbuf, errlen, "%s: mmap: %s", path, strerror(errno));
        goto err;
    }
    close(fd);
    fd = -1;
    /* The whole file is read by the checks below and at every token. */
    (void)madvise(m->map, m->map_size, MADV_WILLNEED);
    layout(m, (const float *)((const char *)m->map + HEADER_BYTES), &n_floats);
    rc = check_contents(m, why, sizeof(why));
    if (rc != 0) {
        kvs__dec_fmt(errbuf, errlen, "%s: %s", path, why);
        goto err;
    }
    *out = m;
    return 0;
err:
    if (fd >= 0)
        close(fd);
    kvs_model_close(m);
    return rc;
}

void kvs_model_close(kvs_model_t *model) {
    if (!model)
        return;
    if (model->map)
        munmap(model->map, model->map_size);
    free(model);
}

const kvs_model_config_t *kvs_model_config(const kvs_model_t *model) {
    return &model->cfg;
}
