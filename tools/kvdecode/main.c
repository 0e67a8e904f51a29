/*
 * main.c: kvdecode, the command line of kvs_decoder. It feeds a token stream
 * (raw bytes of a file for byte models, or token ids) through a llama2.c
 * model with the chosen attention mode, optionally generates, and writes
 * what the benchmarks need: the logits of every position (for comparisons
 * with PyTorch and between modes), per-head query/key/value dumps, and a
 * one-line summary with throughput and how much of the context the store
 * attended exactly. With --store URL the store modes talk to a kvstored
 * through libkvsclient instead of an in-process store. Run with --help for
 * the options.
 */
#include "kvs_client.h"
#include "kvs_decoder.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* From OpenBLAS; the decoder's matmuls are its sgemm calls. */
void openblas_set_num_threads(int num_threads);

#define LOGITS_MAGIC "KVSLOGT1"

/* The store's messages (kvs_options_t.log): this program owns stderr. */
static void log_stderr(void *ctx, int level, const char *msg) {
    (void)ctx, (void)level;
    fprintf(stderr, "kvstore: %s\n", msg);
}

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: kvdecode MODEL.bin [options]\n"
        "input (default: BOS alone):\n"
        "  --text FILE         bytes of FILE as tokens (byte models: vocab "
        "256)\n"
        "  --offset B          skip the first B bytes of --text\n"
        "  --token-ids LIST    comma-separated token ids\n"
        "  --token-file FILE   little-endian int32 token ids\n"
        "  --no-bos            do not prepend BOS (token 1)\n"
        "  --ctx N             keep the first N tokens (BOS included)\n"
        "generation and scoring:\n"
        "  --gen N             generate N tokens after the input (default "
        "0)\n"
        "  --gen-out FILE      write the generated token ids, one per line\n"
        "  --follow FILE       teacher-force generation on the token ids of "
        "FILE\n"
        "                      (a --gen-out of another run; --gen defaults "
        "to their\n"
        "                      count) and print how often this run's greedy "
        "choice\n"
        "                      agrees with them\n"
        "  --temp T            sampling temperature; 0 = greedy (default)\n"
        "  --seed S            sampling seed (default 42)\n"
        "  --step-from P       feed input positions >= P as decode steps "
        "(store\n"
        "                      attention at each); earlier ones by batched "
        "prefill.\n"
        "                      Default: all input by prefill\n"
        "  --score             print bits per token of the input "
        "(teacher-forced)\n"
        "attention:\n"
        "  --attn MODE         full | store-exact | store-wave (default "
        "full)\n"
        "  --kv-dtype T        f32 | f16 | bf16 in the store (default f32)\n"
        "  --store URL         store modes use the kvstored at URL "
        "(tcp://host:port,\n"
        "                      host:port or unix:///path) instead of an "
        "in-process\n"
        "                      store; index options are then the daemon's\n"
        "  --seq-id N          sequence id in the store (default 1)\n"
        "  --keep              do not drop the sequence at the end\n"
        "  --segment-tokens N  --cluster-tokens N  --kmeans-iters N\n"
        "  --sink N  --window N  (steady zone)   --store-threads N\n"
        "  --retrieval F       retrieval fraction of clusters\n"
        "  --estimation F      estimation fraction of clusters\n"
        "  --epsilon E         accuracy-bounded budget with this epsilon\n"
        "                      (ranks by centroid)\n"
        "  --rank R            codes | centroid: how keys are ranked "
        "(default:\n"
        "                      the store's, codes where segments have them)\n"
        "  --wait-indexed      after prefill, wait for index builds\n"
        "                      (the in-process store is deterministic: each\n"
        "                      attend waits for its layer's builds; for a\n"
        "                      daemon, start it with --deterministic yes)\n"
        "  --cuda-device N     in-process store: wave attends (and index\n"
        "                      builds) on this CUDA device when usable\n"
        "                      (needs --kv-dtype f16|bf16); else the CPU\n"
        "  --profile FILE      kvtune profile (docs/kvtune.md): index options "
        "and\n"
        "                      budget; flags after it override it\n"
        "output:\n"
        "  --logits-out FILE   logits of every position (bench/README.md)\n"
        "  --dump FILE         per-head q/k/v of the input positions "
        "(bench/README.md)\n"
        "  --dump-dtype T      f32 (default) | f16\n"
        "  --print-tokens      print generated token ids, not bytes\n"
        "  --quiet             no generated text on stdout\n"
        "performance:\n"
        "  --chunk N           prefill chunk (default 256)\n"
        "  --observe-every K   store modes: show the store the prefill's\n"
        "                      queries of every K-th position (per-head\n"
        "                      budgets; default 0: none; 64 is what\n"
        "                      bench/accuracy measures)\n"
        "  --threads N         OpenBLAS threads (default 2)\n");
}

typedef struct tokbuf_s {
    int32_t *v;
    size_t n, cap;
} tokbuf_t;

static int tok_push(tokbuf_t *t, int32_t x) {
    if (t->n == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 1024;
        int32_t *v = realloc(t->v, cap * sizeof(int32_t));
        if (!v)
            return KVS_ENOMEM;
        t->v = v;
        t->cap = cap;
    }
    t->v[t->n++] = x;
    return 0;
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvdecode: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    unsigned char *b = malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap)
            break;
        unsigned char *nb = realloc(b, cap * 2);
        if (!nb) {
            free(b);
            b = NULL;
            break;
        }
        b = nb;
        cap *= 2;
    }
    if (b && ferror(f)) {
        fprintf(stderr, "kvdecode: %s: read error\n", path);
        free(b);
        b = NULL;
    }
    fclose(f);
    *len = n;
    return b;
}

static int parse_u32(const char *s, const char *what, uint32_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || end == s || v > UINT32_MAX) {
        fprintf(stderr, "kvdecode: bad %s: %s\n", what, s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int parse_f(const char *s, const char *what, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || *end || end == s || !isfinite(v)) {
        fprintf(stderr, "kvdecode: bad %s: %s\n", what, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_dtype(const char *s, kvs_dtype_t *out) {
    static const kvs_dtype_t all[] = {KVS_DTYPE_F32, KVS_DTYPE_F16,
                                      KVS_DTYPE_BF16};
    for (int i = 0; i < 3; i++)
        if (strcmp(s, kvs_dtype_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    fprintf(stderr, "kvdecode: bad dtype: %s\n", s);
    return -1;
}

/* Mean -log2 p(next token) over positions 0..n-2 of logits [n][V]. */
static double bits_per_token(const float *logits, const int32_t *tok, size_t n,
                             uint32_t V) {
    double sum = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        const float *l = logits + i * V;
        double mx = l[0], z = 0;
        for (uint32_t j = 1; j < V; j++)
            mx = l[j] > mx ? l[j] : mx;
        for (uint32_t j = 0; j < V; j++)
            z += exp((double)l[j] - mx);
        sum += (log(z) + mx - l[tok[i + 1]]) / log(2.0);
    }
    return n > 1 ? sum / (double)(n - 1) : 0.0;
}

static int write_logits(const char *path, const int32_t *tok, size_t n,
                        uint32_t V, const float *logits) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "kvdecode: %s: %s\n", path, strerror(errno));
        return -1;
    }
    uint32_t hdr[2] = {(uint32_t)n, V};
    int ok = fwrite(LOGITS_MAGIC, 1, 8, f) == 8 &&
             fwrite(hdr, sizeof(hdr), 1, f) == 1 &&
             fwrite(tok, sizeof(int32_t), n, f) == n &&
             fwrite(logits, sizeof(float) * V, n, f) == n;
    if (fclose(f) != 0)
        ok = 0;
    if (!ok) {
        fprintf(stderr, "kvdecode: %s: write failed\n", path);
        remove(path);
        return -1;
    }
    return 0;
}

enum {
    O_TEXT = 256,
    O_OFFSET,
    O_IDS,
    O_TOKFILE,
    O_NOBOS,
    O_CTX,
    O_GEN,
    O_TEMP,
    O_SEED,
    O_STEPFROM,
    O_SCORE,
    O_ATTN,
    O_KVDT,
    O_SEG,
    O_CLU,
    O_KMI,
    O_SINK,
    O_WIN,
    O_STHR,
    O_RET,
    O_EST,
    O_EPS,
    O_WAIT,
    O_LOGITS,
    O_DUMP,
    O_DUMPDT,
    O_PRINTTOK,
    O_QUIET,
    O_CHUNK,
    O_THREADS,
    O_HELP,
    O_STORE,
    O_SEQID,
    O_KEEP,
    O_GENOUT,
    O_FOLLOW,
    O_CUDA,
    O_RANK,
    O_OBSERVE
};
/* --profile, numbered apart from the list above. */
enum { O_PROFILE = 1024 };

/* ---- the kvstored backend: the decoder's store calls via libkvsclient -- */

static int cl_create(void *ctx, uint64_t seq, const kvs_geometry_t *geo) {
    return kvs_client_seq_create(ctx, seq, geo);
}
static int cl_append(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                     const void *k, const void *v, size_t kv_bytes) {
    return kvs_client_seq_append(ctx, seq, layer, n, k, v, kv_bytes);
}
/* The geometry is fixed per run; the attend call needs the query size. */
static size_t cl_query_floats;
static int cl_attend(void *ctx, uint64_t seq, uint32_t layer, const float *q,
                     const kvs_query_params_t *qp, float *out,
                     kvs_attend_stats_t *st) {
    return kvs_client_seq_attend(ctx, seq, layer, q, cl_query_floats, qp, out,
                                 st);
}
static int cl_drop(void *ctx, uint64_t seq) {
    return kvs_client_seq_drop(ctx, seq);
}
static const char *cl_errmsg(void *ctx) {
    return kvs_client_errmsg(ctx);
}
static int cl_observe(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                      const float *q) {
    return kvs_client_seq_observe_queries(ctx, seq, layer, n, q,
                                          n * cl_query_floats);
}
static const kvs_decoder_backend_t client_backend = {
    cl_create, cl_append, cl_attend, cl_drop, cl_errmsg, cl_observe};

/* kvs_seq_wait_indexed over the wire: poll the sequence's pending builds. */
static int cl_wait_indexed(kvs_client_t *c, uint64_t seq) {
    for (;;) {
        kvs_seq_info_t info;
        int rc = kvs_client_seq_info(c, seq, &info);
        if (rc != 0 || info.builds_pending == 0)
            return rc;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Token ids of a --gen-out file (whitespace-separated decimal). */
static int read_token_list(const char *path, tokbuf_t *t) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvdecode: %s: %s\n", path, strerror(errno));
        return -1;
    }
    long v;
    int rc = 0;
    while (rc == 0 && fscanf(f, "%ld", &v) == 1)
        rc = tok_push(t, (int32_t)v);
    if (rc == 0 && !feof(f)) {
        fprintf(stderr, "kvdecode: %s: not a list of token ids\n", path);
        rc = -1;
    }
    fclose(f);
    return rc;
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {{"text", 1, 0, O_TEXT},
                                             {"offset", 1, 0, O_OFFSET},
                                             {"token-ids", 1, 0, O_IDS},
                                             {"token-file", 1, 0, O_TOKFILE},
                                             {"no-bos", 0, 0, O_NOBOS},
                                             {"ctx", 1, 0, O_CTX},
                                             {"gen", 1, 0, O_GEN},
                                             {"temp", 1, 0, O_TEMP},
                                             {"seed", 1, 0, O_SEED},
                                             {"step-from", 1, 0, O_STEPFROM},
                                             {"score", 0, 0, O_SCORE},
                                             {"attn", 1, 0, O_ATTN},
                                             {"kv-dtype", 1, 0, O_KVDT},
                                             {"segment-tokens", 1, 0, O_SEG},
                                             {"cluster-tokens", 1, 0, O_CLU},
                                             {"kmeans-iters", 1, 0, O_KMI},
                                             {"sink", 1, 0, O_SINK},
                                             {"window", 1, 0, O_WIN},
                                             {"store-threads", 1, 0, O_STHR},
                                             {"retrieval", 1, 0, O_RET},
                                             {"estimation", 1, 0, O_EST},
                                             {"epsilon", 1, 0, O_EPS},
                                             {"profile", 1, 0, O_PROFILE},
                                             {"wait-indexed", 0, 0, O_WAIT},
                                             {"logits-out", 1, 0, O_LOGITS},
                                             {"dump", 1, 0, O_DUMP},
                                             {"dump-dtype", 1, 0, O_DUMPDT},
                                             {"print-tokens", 0, 0, O_PRINTTOK},
                                             {"quiet", 0, 0, O_QUIET},
                                             {"chunk", 1, 0, O_CHUNK},
                                             {"threads", 1, 0, O_THREADS},
                                             {"help", 0, 0, O_HELP},
                                             {"store", 1, 0, O_STORE},
                                             {"seq-id", 1, 0, O_SEQID},
                                             {"keep", 0, 0, O_KEEP},
                                             {"gen-out", 1, 0, O_GENOUT},
                                             {"follow", 1, 0, O_FOLLOW},
                                             {"cuda-device", 1, 0, O_CUDA},
                                             {"rank", 1, 0, O_RANK},
                                             {"observe-every", 1, 0, O_OBSERVE},
                                             {0, 0, 0, 0}};
    const char *text = NULL, *ids = NULL, *tokfile = NULL, *logits_out = NULL,
               *dump_path = NULL, *store_url = NULL, *gen_out = NULL,
               *follow_path = NULL;
    bool gen_set = false, index_opts = false;
    uint32_t seq_id = 1;
    uint32_t offset = 0, ctx = 0, gen = 0, seed = 42, chunk = 0, threads = 2;
    uint32_t observe_every = 0;
    uint32_t step_from = UINT32_MAX;
    float temp = 0;
    bool bos = true, score = false, wait_indexed = false, print_tokens = false,
         quiet = false;
    kvs_decoder_options_t dopt;
    kvs_decoder_options_default(&dopt);
    kvs_options_t sopt;
    kvs_options_default(&sopt);
    sopt.log = log_stderr;
    /* A measurement tool: the same input must give the same tokens, never
     * depend on when a background build finished. */
    sopt.deterministic = 1;
    kvs_dtype_t dump_dtype = KVS_DTYPE_F32;
    int c, bad = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case O_TEXT:
            text = optarg;
            break;
        case O_OFFSET:
            bad |= parse_u32(optarg, "offset", &offset);
            break;
        case O_IDS:
            ids = optarg;
            break;
        case O_TOKFILE:
            tokfile = optarg;
            break;
        case O_NOBOS:
            bos = false;
            break;
        case O_CTX:
            bad |= parse_u32(optarg, "ctx", &ctx);
            break;
        case O_GEN:
            bad |= parse_u32(optarg, "gen", &gen);
            gen_set = true;
            break;
        case O_STORE:
            store_url = optarg;
            break;
        case O_SEQID:
            bad |= parse_u32(optarg, "seq-id", &seq_id);
            break;
        case O_KEEP:
            dopt.keep_seq = true;
            break;
        case O_GENOUT:
            gen_out = optarg;
            break;
        case O_FOLLOW:
            follow_path = optarg;
            break;
        case O_CUDA: {
            uint32_t dev = 0;
            bad |= parse_u32(optarg, "cuda-device", &dev);
            sopt.cuda_device = (int32_t)dev;
            break;
        }
        case O_PROFILE: {
            /* Applied where it stands, so later flags override it. The
             * decoder passes explicit query params, so the profile's budget
             * goes there too (the store's defaults alone would not reach
             * its calls); the mode stays --attn's. */
            char perr[256];
            int prc =
                kvs_options_load_profile(&sopt, optarg, perr, sizeof perr);
            if (prc) {
                fprintf(stderr, "kvdecode: --profile: %s\n", perr);
                bad = 1;
                break;
            }
            index_opts = true;
            dopt.query.budget = sopt.defaults.budget;
            dopt.query.retrieval_fraction = sopt.defaults.retrieval_fraction;
            dopt.query.estimation_fraction = sopt.defaults.estimation_fraction;
            dopt.query.epsilon = sopt.defaults.epsilon;
            break;
        }
        case O_TEMP:
            bad |= parse_f(optarg, "temp", &temp);
            break;
        case O_SEED:
            bad |= parse_u32(optarg, "seed", &seed);
            break;
        case O_STEPFROM:
            bad |= parse_u32(optarg, "step-from", &step_from);
            break;
        case O_SCORE:
            score = true;
            break;
        case O_ATTN:
            if (kvs_attn_parse(optarg, &dopt.attn) != 0) {
                fprintf(stderr, "kvdecode: bad --attn: %s\n", optarg);
                bad = 1;
            }
            break;
        case O_KVDT:
            bad |= parse_dtype(optarg, &dopt.kv_dtype);
            break;
        case O_SEG:
            index_opts = true;
            bad |= parse_u32(optarg, "segment-tokens", &sopt.segment_tokens);
            break;
        case O_CLU:
            index_opts = true;
            bad |= parse_u32(optarg, "cluster-tokens", &sopt.cluster_tokens);
            break;
        case O_KMI:
            index_opts = true;
            bad |= parse_u32(optarg, "kmeans-iters", &sopt.kmeans_iters);
            break;
        case O_SINK:
            index_opts = true;
            bad |= parse_u32(optarg, "sink", &sopt.sink_tokens);
            break;
        case O_WIN:
            index_opts = true;
            bad |= parse_u32(optarg, "window", &sopt.window_tokens);
            break;
        case O_STHR:
            index_opts = true;
            bad |= parse_u32(optarg, "store-threads", &sopt.n_threads);
            break;
        case O_RET:
            bad |= parse_f(optarg, "retrieval", &dopt.query.retrieval_fraction);
            break;
        case O_EST:
            bad |=
                parse_f(optarg, "estimation", &dopt.query.estimation_fraction);
            break;
        case O_EPS:
            bad |= parse_f(optarg, "epsilon", &dopt.query.epsilon);
            dopt.query.budget = KVS_BUDGET_BOUNDED;
            break;
        case O_RANK:
            if (!strcmp(optarg, "codes")) {
                dopt.query.rank = KVS_RANK_CODES;
            } else if (!strcmp(optarg, "centroid")) {
                dopt.query.rank = KVS_RANK_CENTROID;
            } else {
                fprintf(stderr, "kvdecode: bad --rank: %s\n", optarg);
                bad = 1;
            }
            break;
        case O_WAIT:
            wait_indexed = true;
            break;
        case O_LOGITS:
            logits_out = optarg;
            break;
        case O_DUMP:
            dump_path = optarg;
            break;
        case O_DUMPDT:
            bad |= parse_dtype(optarg, &dump_dtype);
            break;
        case O_PRINTTOK:
            print_tokens = true;
            break;
        case O_QUIET:
            quiet = true;
            break;
        case O_CHUNK:
            bad |= parse_u32(optarg, "chunk", &chunk);
            break;
        case O_THREADS:
            bad |= parse_u32(optarg, "threads", &threads);
            break;
        case O_OBSERVE:
            bad |= parse_u32(optarg, "observe-every", &observe_every);
            break;
        case O_HELP:
        case 'h':
            usage(stdout);
            return 0;
        default:
            bad = 1;
        }
    }
    if (bad || optind != argc - 1 || (!!text + !!ids + !!tokfile) > 1) {
        usage(stderr);
        return 2;
    }
    openblas_set_num_threads(threads ? (int)threads : 1);
    dopt.prefill_chunk = chunk;
    dopt.observe_every = observe_every;

    char err[512];
    kvs_model_t *model = NULL;
    int rc = kvs_model_open(argv[optind], &model, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "kvdecode: %s (%s)\n", err, kvs_err_name(rc));
        return 1;
    }
    const kvs_model_config_t *cfg = kvs_model_config(model);
    uint32_t V = cfg->vocab_size;

    /* ---- the input token stream ---- */
    tokbuf_t tok = {0};
    int status = 1;
    kvs_store_t *store = NULL;
    kvs_client_t *client = NULL;
    tokbuf_t follow = {0};
    uint64_t agree = 0;
    FILE *gen_f = NULL;
    kvs_decoder_t *dec = NULL;
    kvs_qkv_dump_t *dump = NULL;
    float *logits = NULL;
    if (bos)
        tok_push(&tok, KVS_TOKEN_BOS);
    if (text) {
        if (V != 256) {
            fprintf(stderr,
                    "kvdecode: --text needs a byte model (vocab 256), "
                    "this one has %u; pass token ids\n",
                    V);
            goto out;
        }
        size_t len;
        unsigned char *b = read_file(text, &len);
        if (!b)
            goto out;
        for (size_t i = offset; i < len; i++) {
            if (ctx && tok.n >= ctx)
                break;
            if (tok_push(&tok, b[i]) != 0)
                break;
        }
        free(b);
    } else if (ids) {
        for (const char *p = ids; *p;) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p) {
                fprintf(stderr, "kvdecode: bad --token-ids near \"%s\"\n", p);
                goto out;
            }
            tok_push(&tok, (int32_t)v);
            p = *end == ',' ? end + 1 : end;
        }
    } else if (tokfile) {
        size_t len;
        unsigned char *b = read_file(tokfile, &len);
        if (!b)
            goto out;
        for (size_t i = 0; i + 4 <= len; i += 4) {
            int32_t v;
            memcpy(&v, b + i, 4);
            tok_push(&tok, v);
        }
        free(b);
    }
    if (ctx && tok.n > ctx)
        tok.n = ctx;
    if (tok.n == 0) {
        fprintf(stderr, "kvdecode: empty input\n");
        goto out;
    }
    if (follow_path) {
        if (read_token_list(follow_path, &follow) != 0)
            goto out;
        if (!gen_set)
            gen = (uint32_t)follow.n;
        if (gen > follow.n) {
            fprintf(stderr, "kvdecode: --gen %u but %s has %zu tokens\n", gen,
                    follow_path, follow.n);
            goto out;
        }
        for (size_t i = 0; i < follow.n; i++)
            if (follow.v[i] < 0 || (uint32_t)follow.v[i] >= V) {
                fprintf(stderr, "kvdecode: %s: token %d outside vocab %u\n",
                        follow_path, follow.v[i], V);
                goto out;
            }
    }
    if (gen_out && !(gen_f = fopen(gen_out, "w"))) {
        fprintf(stderr, "kvdecode: %s: %s\n", gen_out, strerror(errno));
        goto out;
    }
    size_t n_in = tok.n;
    size_t total = n_in + gen;
    if (total > UINT32_MAX) {
        fprintf(stderr, "kvdecode: too many tokens\n");
        goto out;
    }
    for (size_t i = 0; i < n_in; i++) {
        if (tok.v[i] < 0 || (uint32_t)tok.v[i] >= V) {
            fprintf(stderr, "kvdecode: token %d at %zu outside vocab %u\n",
                    tok.v[i], i, V);
            goto out;
        }
    }

    /* ---- store, decoder, dump ---- */
    if (dopt.attn != KVS_ATTN_FULL && store_url) {
        if (index_opts)
            fprintf(stderr, "kvdecode: note: index options are the "
                            "daemon's with --store; ignoring them\n");
        kvs_client_options_t copt;
        kvs_client_options_default(&copt);
        copt.addrs = &store_url;
        copt.n_addrs = 1;
        copt.client_name = "kvdecode";
        rc = kvs_client_open(&copt, &client);
        if (rc == 0)
            rc = kvs_client_ping(client, 0);
        if (rc != 0) {
            fprintf(stderr, "kvdecode: %s: %s: %s\n", store_url,
                    kvs_strerror(rc),
                    client ? kvs_client_errmsg(client) : "bad address");
            goto out;
        }
        cl_query_floats = (size_t)cfg->n_heads * cfg->head_dim;
        dopt.backend = &client_backend;
        dopt.backend_ctx = client;
        dopt.seq_id = seq_id;
    } else if (dopt.attn != KVS_ATTN_FULL) {
        rc = kvs_store_open(&sopt, &store);
        if (rc != 0) {
            fprintf(stderr, "kvdecode: kvs_store_open: %s\n", kvs_strerror(rc));
            goto out;
        }
        dopt.store = store;
        dopt.seq_id = seq_id;
        if (sopt.cuda_device >= 0)
            fprintf(stderr, "kvdecode: attend path: %s\n",
                    kvs_store_gpu_info(store));
    }
    if (dump_path) {
        rc = kvs_qkv_dump_open(dump_path, cfg, tok.v, (uint32_t)n_in,
                               dump_dtype, &dump, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "kvdecode: %s\n", err);
            goto out;
        }
        dopt.observe = kvs_qkv_dump_observe;
        dopt.observe_ctx = dump;
    }
    rc = kvs_decoder_new(model, &dopt, &dec, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "kvdecode: %s\n", err);
        goto out;
    }
    bool keep_all = logits_out || score;
    logits = malloc((keep_all ? total : 1) * (size_t)V * sizeof(float));
    if (!logits) {
        fprintf(stderr, "kvdecode: out of memory\n");
        goto out;
    }
/* Logits row of position i: all rows kept, or one reused row. */
#define ROW(i) (logits + (keep_all ? (size_t)(i)*V : 0))

    /* ---- input: prefill, then decode steps from step_from ---- */
    size_t n_pre = step_from < n_in ? step_from : n_in;
    if (n_pre > 0) {
        rc = kvs_decoder_prefill(dec, tok.v, (uint32_t)n_pre,
                                 keep_all ? logits : ROW(n_pre - 1), keep_all);
        if (rc != 0)
            goto dec_err;
    }
    if (wait_indexed && store && (rc = kvs_seq_wait_indexed(store, seq_id))) {
        fprintf(stderr, "kvdecode: wait indexed: %s\n", kvs_strerror(rc));
        goto out;
    }
    if (wait_indexed && client && (rc = cl_wait_indexed(client, seq_id))) {
        fprintf(stderr, "kvdecode: wait indexed: %s\n", kvs_strerror(rc));
        goto out;
    }
    for (size_t i = n_pre; i < n_in; i++) {
        rc = kvs_decoder_step(dec, tok.v[i], ROW(i));
        if (rc != 0)
            goto dec_err;
    }
    /* ---- generation ---- */
    uint64_t rng = seed;
    for (uint32_t g = 0; g < gen; g++) {
        int32_t next = kvs_sample(ROW(tok.n - 1), V, temp, &rng);
        if (follow.v) {
            agree += next == follow.v[g];
            next = follow.v[g];
        }
        if (gen_f)
            fprintf(gen_f, "%d\n", next);
        if (tok_push(&tok, next) != 0)
            goto out;
        if (!quiet) {
            if (print_tokens || V != 256)
                printf("%d ", next);
            else
                putchar(next);
            fflush(stdout);
        }
        rc = kvs_decoder_step(dec, next, ROW(tok.n - 1));
        if (rc != 0)
            goto dec_err;
    }
    if (!quiet && gen)
        putchar('\n');

    /* The dump ignores generated positions; it stays open until here
     * because the decoder's observer points at it. */
    if (dump) {
        rc = kvs_qkv_dump_close(dump);
        dump = NULL;
        if (rc != 0) {
            fprintf(stderr, "kvdecode: dump %s: %s\n", dump_path,
                    kvs_strerror(rc));
            goto out;
        }
    }

    /* ---- report ---- */
    kvs_decoder_stats_t st;
    kvs_decoder_stats(dec, &st);
    fprintf(
        stderr,
        "kvdecode: %s attn=%s%s%s tokens=%zu prefill=%llu (%.1f tok/s, "
        "%.2f s) steps=%llu (%.2f tok/s, %.2f s)",
        argv[optind], kvs_attn_name(dopt.attn), client ? " store=" : "",
        client ? store_url : "", tok.n, (unsigned long long)st.prefill_tokens,
        st.prefill_seconds > 0 ? st.prefill_tokens / st.prefill_seconds : 0.0,
        st.prefill_seconds, (unsigned long long)st.step_tokens,
        st.step_seconds > 0 ? st.step_tokens / st.step_seconds : 0.0,
        st.step_seconds);
    if (st.attend_calls && st.attend.keys_total)
        fprintf(stderr,
                " attend: %.1f%% keys exact, %llu/%llu clusters retrieved, "
                "%llu estimated, %.3f ms/call",
                100.0 * (double)st.attend.keys_exact / st.attend.keys_total,
                (unsigned long long)st.attend.clusters_retrieved,
                (unsigned long long)st.attend.clusters_total,
                (unsigned long long)st.attend.clusters_estimated,
                1e3 * st.attend_seconds / st.attend_calls);
    if (tok.n > cfg->seq_len)
        fprintf(stderr, " (positions beyond trained seq_len %u)", cfg->seq_len);
    fprintf(stderr, "\n");
    if (follow.v)
        printf("agreement %llu/%u %.6f\n", (unsigned long long)agree, gen,
               gen ? (double)agree / gen : 1.0);
    if (gen_f) {
        int bad_close = fclose(gen_f) != 0;
        gen_f = NULL;
        if (bad_close) {
            fprintf(stderr, "kvdecode: %s: write failed\n", gen_out);
            goto out;
        }
    }
    if (score)
        printf("bits_per_token %.6f over %zu predictions\n",
               bits_per_token(logits, tok.v, n_in, V), n_in - 1);
    if (logits_out && write_logits(logits_out, tok.v, tok.n, V, logits) != 0)
        goto out;
    status = 0;
    goto out;
dec_err:
    fprintf(stderr, "kvdecode: %s (%s)\n", kvs_decoder_errmsg(dec),
            kvs_err_name(rc));
out:
    if (dump)
        kvs_qkv_dump_close(dump);
    kvs_decoder_free(dec);
    kvs_client_close(client);
    kvs_store_close(store);
    if (gen_f)
        fclose(gen_f);
    free(follow.v);
    kvs_model_close(model);
    free(logits);
    free(tok.v);
    return status;
}
