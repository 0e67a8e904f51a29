/*
 * sample.c: the dump reader and statistics of sample.h.
 */
#include "sample.h"

#include "kvs_kernels.h"
#include "kvs_common.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int kvt_dump_open(const char *path, kvt_dump_t *dp) {
    memset(dp, 0, sizeof *dp);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) || st.st_size < 64) {
        close(fd);
        return KVS_ECORRUPT;
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (m == MAP_FAILED)
        return -e;
    const uint8_t *b = m;
    uint32_t h[16];
    memcpy(h, b, sizeof h);
    uint64_t off;
    memcpy(&off, b + 48, 8);
    uint32_t n_layers = h[4], n_q = h[5], n_kv = h[6], d = h[7], n_tok = h[8],
             dtype = h[9];
    uint64_t esz = dtype == 0 ? 4 : 2;
    /* Every factor is bounded before the product, so it cannot wrap. */
    int ok = !memcmp(b, "KVSDUMP1", 8) && h[2] == 1 && h[3] == 64 &&
             dtype <= 1 && n_layers && n_layers <= 4096 && n_kv && n_q &&
             n_q <= 4096 && n_q % n_kv == 0 && d && d <= 4096 && n_tok &&
             off >= 64 && off <= (uint64_t)st.st_size &&
             off + (uint64_t)n_layers * (n_q + 2 * n_kv) * n_tok * d * esz ==
                 (uint64_t)st.st_size;
    if (!ok) {
        munmap(m, (size_t)st.st_size);
        return KVS_ECORRUPT;
    }
    dp->map = b;
    dp->size = (size_t)st.st_size;
    dp->n_layers = n_layers;
    dp->n_q = n_q;
    dp->n_kv = n_kv;
    dp->d = d;
    dp->n_tokens = n_tok;
    dp->dtype = dtype;
    dp->data_off = off;
    return 0;
}

void kvt_dump_close(kvt_dump_t *dp) {
    if (dp->map)
        munmap((void *)dp->map, dp->size);
    memset(dp, 0, sizeof *dp);
}

void kvt_dump_rows(const kvt_dump_t *dp, uint32_t layer, uint32_t arr,
                   uint32_t pos, uint32_t n, float *out) {
    size_t e = dp->dtype == 0 ? 4 : 2;
    size_t head = (size_t)dp->n_tokens * dp->d * e;
    const uint8_t *p = dp->map + dp->data_off +
                       ((size_t)layer * (dp->n_q + 2 * dp->n_kv) + arr) * head +
                       (size_t)pos * dp->d * e;
    size_t cnt = (size_t)n * dp->d;
    if (e == 4) {
        memcpy(out, p, cnt * 4);
    } else {
        const uint16_t *s = (const uint16_t *)p;
        for (size_t i = 0; i < cnt; i++)
            out[i] = kvs_f16_to_f32(s[i]);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double kvt_pct(double *v, size_t n, double p) {
    if (!n)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    size_t r = (size_t)ceil(p * (double)n);
    if (r < 1)
        r = 1;
    return v[r - 1];
}

double kvt_recall(const int64_t *truth, const int64_t *got, uint32_t k) {
    uint32_t want = 0, hit = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (truth[i] < 0)
            continue;
        want++;
        for (uint32_t j = 0; j < k; j++)
            if (got[j] == truth[i]) {
                hit++;
                break;
            }
    }
    return want ? (double)hit / want : 1.0;
}
