/*
 * ingest_bench.c: the `ingest` benchmark's client (bench/run.sh ingest):
 * appends through kvstored over loopback with libkvsclient, as an
 * inference engine's prefill would, and times them.
 *
 *   ingest_bench --addr HOST:PORT [--layers 32] [--tokens 32768]
 *                [--chunk 1024] [--pipeline 8] [--timeline FILE]
 *                [--no-index-wait] [--label TEXT]
 *
 * One sequence of Llama-3-8B geometry (32 query heads, 8 KV heads,
 * head_dim 128, bf16) and `--layers` layers; the prompt arrives in chunks
 * of `--chunk` tokens and each chunk is appended layer by layer (chunked
 * prefill order), `--pipeline` appends in flight. Prints one JSON line:
 * - acked_s / gb_s: until the last append was acknowledged (K+V bytes);
 * - first_search_s: until a search over the last layer (top-100 of every
 *   query head) is answered after that: the context is queryable (the
 *   unindexed tail is searched exactly);
 * - flushed_s: until the Flush barrier returns (what `--sync async` still
 *   owed the disk; ~acked_s in the synchronous modes);
 * - indexed_s: until no segment build is pending: every token is in the
 *   wave index (unless --no-index-wait).
 * --timeline writes `t acked_gb rate_gb_s builds_pending indexed_frac`
 * lines every ~100 ms (gnuplot input: bench/ingest/plot.gp).
 */
#include "kvs_client.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Finite bf16 in [-1, 1): the top half of an fp32. */
static void fill_bf16(uint16_t *p, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        float f = (float)((double)(*s >> 11) / (double)(1ull << 53)) * 2 - 1;
        uint32_t u;
        memcpy(&u, &f, 4);
        p[i] = (uint16_t)(u >> 16);
    }
}

typedef struct timeline_s {
    FILE *f;
    double t0, last_t;
    uint64_t last_bytes;
} timeline_t;

static void sample(timeline_t *tl, double t, uint64_t bytes,
                   const kvs_seq_info_t *in, uint64_t total_tokens) {
    if (!tl->f)
        return;
    double dt = t - tl->last_t;
    /* A window under 50 ms gives no meaningful rate (the last append's
     * answer would read as a spike): fold it into the next one. */
    if (dt < 0.05 && bytes != tl->last_bytes)
        return;
    double rate = dt > 0 ? (double)(bytes - tl->last_bytes) / dt / 1e9 : 0;
    fprintf(tl->f, "%.3f %.4f %.4f %" PRIu64 " %.4f\n", t - tl->t0,
            (double)bytes / 1e9, rate, in ? in->builds_pending : 0,
            in && total_tokens
                ? (double)in->indexed_tokens / (double)total_tokens
                : 0.0);
    tl->last_t = t;
    tl->last_bytes = bytes;
}

int main(int argc, char **argv) {
    const char *addr = NULL, *timeline = NULL, *label = "";
    uint32_t layers = 32, tokens = 32768, chunk = 1024, pipeline = 8;
    bool index_wait = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--addr") && v)
            addr = argv[++i];
        else if (!strcmp(a, "--layers") && v)
            layers = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--tokens") && v)
            tokens = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--chunk") && v)
            chunk = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--pipeline") && v)
            pipeline = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(a, "--timeline") && v)
            timeline = argv[++i];
        else if (!strcmp(a, "--label") && v)
            label = argv[++i];
        else if (!strcmp(a, "--no-index-wait"))
            index_wait = false;
        else {
            fprintf(stderr, "ingest_bench: bad argument %s\n", a);
            return 2;
        }
    }
    if (!addr || !layers || !tokens || !chunk || !pipeline || tokens % chunk) {
        fprintf(stderr, "usage: ingest_bench --addr HOST:PORT [--layers N] "
                        "[--tokens N] [--chunk N (divides tokens)] "
                        "[--pipeline N] [--timeline FILE]\n");
        return 2;
    }
    enum { KVH = 8, QH = 32, D = 128 };
    kvs_geometry_t g = {.n_layers = layers,
                        .n_q_heads = QH,
                        .n_kv_heads = KVH,
                        .head_dim = D,
                        .dtype = KVS_DTYPE_BF16};
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = &addr;
    o.n_addrs = 1;
    o.request_timeout_ms = 600000;
    kvs_client_t *c;
    if (kvs_client_open(&o, &c)) {
        fprintf(stderr, "ingest_bench: cannot open client\n");
        return 1;
    }
    uint64_t seq = 0x696e67657374ull ^ (uint64_t)time(NULL);
    int rc = kvs_client_seq_create(c, seq, &g);
    if (rc) {
        fprintf(stderr, "ingest_bench: create: %s\n", kvs_client_errmsg(c));
        return 1;
    }
    /* A few distinct chunks, rotated, so that segments differ. */
    enum { VARIANTS = 4 };
    size_t elems = (size_t)chunk * KVH * D, kv_bytes = elems * 2;
    uint16_t *buf[VARIANTS][2];
    uint64_t s = 42;
    for (int v = 0; v < VARIANTS; v++)
        for (int kv = 0; kv < 2; kv++) {
            buf[v][kv] = malloc(kv_bytes);
            if (!buf[v][kv])
                return 1;
            fill_bf16(buf[v][kv], elems, &s);
        }
    kvs_client_op_t *ops = calloc(pipeline, sizeof(*ops));
    kvs_client_op_t **done = calloc(pipeline, sizeof(*done));
    if (!ops || !done)
        return 1;
    uint64_t n_appends = (uint64_t)(tokens / chunk) * layers;
    uint64_t total_bytes = n_appends * 2 * kv_bytes;
    uint64_t total_tokens = (uint64_t)tokens * layers;
    timeline_t tl = {0};
    if (timeline && !(tl.f = fopen(timeline, "w"))) {
        fprintf(stderr, "ingest_bench: cannot write %s\n", timeline);
        return 1;
    }
    double t0 = now_s(), next_sample = t0 + 0.1;
    tl.t0 = tl.last_t = t0;
    sample(&tl, t0, 0, NULL, total_tokens);
    uint64_t submitted = 0, acked = 0, errors = 0;
    int first_err = 0;
    /* Append number i: chunk i / layers, layer i % layers. */
    for (uint32_t p = 0; p < pipeline && submitted < n_appends; p++) {
        kvs_client_op_t *op = &ops[p];
        memset(op, 0, sizeof(*op));
        op->type = KVS_CLIENT_APPEND;
        op->seq = seq;
        op->layer = (uint32_t)(submitted % layers);
        op->n_tokens = chunk;
        int v = (int)((submitted / layers) % VARIANTS);
        op->keys = buf[v][0];
        op->values = buf[v][1];
        op->kv_bytes = kv_bytes;
        if ((rc = kvs_client_submit(c, op)))
            goto fail;
        submitted++;
    }
    while (acked < submitted) {
        size_t nd = 0;
        kvs_client_poll(c, done, pipeline, &nd, 100);
        double t = now_s();
        for (size_t d = 0; d < nd; d++) {
            kvs_client_op_t *op = done[d];
            if (op->status && errors++ == 0)
                first_err = op->status;
            acked++;
            if (submitted >= n_appends)
                continue;
            op->layer = (uint32_t)(submitted % layers);
            int v = (int)((submitted / layers) % VARIANTS);
            op->keys = buf[v][0];
            op->values = buf[v][1];
            if ((rc = kvs_client_submit(c, op)))
                goto fail;
            submitted++;
        }
        if (t >= next_sample) {
            sample(&tl, t, acked * 2 * kv_bytes, NULL, total_tokens);
            next_sample = t + 0.1;
        }
    }
    double t_acked = now_s() - t0;
    sample(&tl, now_s(), total_bytes, NULL, total_tokens);

    /* Queryable: a search over the last layer, all query heads, top 100. */
    float *q = malloc((size_t)QH * D * sizeof(float));
    int64_t *pos = malloc((size_t)QH * 100 * sizeof(int64_t));
    float *sc = malloc((size_t)QH * 100 * sizeof(float));
    if (!q || !pos || !sc)
        return 1;
    for (size_t i = 0; i < (size_t)QH * D; i++)
        q[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    int src = kvs_client_seq_search(c, seq, layers - 1, q, (size_t)QH * D, 100,
                                    NULL, pos, sc, (size_t)QH * 100);
    double t_search = now_s() - t0;
    uint64_t persisted = 0;
    int frc = kvs_client_seq_flush(c, seq, &persisted);
    double t_flushed = now_s() - t0;
    sample(&tl, now_s(), total_bytes, NULL, total_tokens);
    double t_indexed = -1;
    kvs_seq_info_t in = {0};
    while (index_wait) {
        int irc = kvs_client_seq_info(c, seq, &in);
        double t = now_s();
        sample(&tl, t, total_bytes, irc ? NULL : &in, total_tokens);
        /* Builds are queued by the appends that complete a segment, so
         * once every append is answered none pending means all done. */
        if (irc || in.builds_pending == 0) {
            t_indexed = t - t0;
            break;
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (tl.f)
        fclose(tl.f);
    printf(
        "{\"label\":\"%s\",\"layers\":%u,\"tokens\":%u,\"chunk\":%u,"
        "\"pipeline\":%u,\"appends\":%" PRIu64 ",\"bytes\":%" PRIu64
        ",\"errors\":%" PRIu64 ",\"first_error\":\"%s\","
        "\"acked_s\":%.3f,\"gb_s\":%.4f,\"first_search_s\":%.3f,"
        "\"search_ok\":%s,\"flushed_s\":%.3f,\"flush_ok\":%s,"
        "\"gb_s_flushed\":%.4f,\"indexed_s\":%.3f,\"indexed_tokens\":%" PRIu64
        ",\"segments\":%" PRIu64 "}\n",
        label, layers, tokens, chunk, pipeline, n_appends, total_bytes, errors,
        first_err ? kvs_strerror(first_err) : "", t_acked,
        (double)total_bytes / t_acked / 1e9, t_search, src ? "false" : "true",
        t_flushed, frc ? "false" : "true",
        (double)total_bytes / t_flushed / 1e9, t_indexed, in.indexed_tokens,
        in.segments);
    kvs_client_seq_drop(c, seq);
    kvs_client_close(c);
    return errors || src || frc ? 1 : 0;
fail:
    fprintf(stderr, "ingest_bench: submit: %s\n", kvs_client_errmsg(c));
    return 1;
}
