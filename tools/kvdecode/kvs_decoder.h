/*
 * kvs_decoder.h: a small real-model decoder whose attention can run through
 * kvstore. It loads a llama2.c checkpoint (legacy "v0" layout, fp32), runs the
 * Llama forward pass (RMSNorm, RoPE on adjacent pairs, grouped-query
 * attention, SwiGLU, shared or separate classifier) and gives logits. It is
 * the project's source of honest test data: real decoder queries are out of
 * distribution with respect to real keys, and random vectors hide that.
 *
 * Conventions (those of kvstore.h):
 * - Opaque handles; every fallible function returns int, 0 on success, a
 *   negative KVS_E* code or -errno on failure. kvs_model_open() writes its
 *   message into a caller buffer (there is no handle yet); a decoder keeps
 *   the message of its last failure (kvs_decoder_errmsg()).
 * - Token ids are int32; logits are fp32 arrays of vocab_size per token,
 *   caller-allocated.
 *
 * Attention modes. `full` is the decoder's own exact attention over its own
 * fp32 K/V arrays: the reference (its decode steps accumulate attention in
 * double and round once, so they are within an ulp of exact). In `store-exact`
 * and `store-wave` every layer also appends its post-RoPE keys and values to a
 * kvstore sequence, and each decode step (kvs_decoder_step) gets its attention
 * output from kvs_seq_attend() in KVS_MODE_EXACT or KVS_MODE_WAVE. Batched
 * prefill (kvs_decoder_prefill) always computes its causal attention itself,
 * exactly, in every mode: kvs_seq_attend attends to everything appended so far,
 * so a chunk of tokens cannot attend causally through it without appending
 * token by token, which would make long prefills take hours. The store still
 * receives every prefilled key and value, so the decode steps after it run
 * over the whole context. To score a text with store attention at every
 * position, feed it through kvs_decoder_step one token at a time.
 *
 * Thread-safety: a model is read-only after kvs_model_open() and may be
 * shared by any number of decoders and threads. A decoder is used by one
 * thread at a time.
 */
#ifndef KVS_DECODER_H
#define KVS_DECODER_H

#include "kvstore.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Token id of beginning-of-sequence in llama2.c models (also byte models). */
#define KVS_TOKEN_BOS 1

/* Sanity limits of the loader: a header outside them is a corrupt file. */
#define KVS_MODEL_MAX_DIM 65536
#define KVS_MODEL_MAX_HIDDEN (1u << 20)
#define KVS_MODEL_MAX_LAYERS 1024
#define KVS_MODEL_MAX_HEADS 1024
#define KVS_MODEL_MAX_VOCAB (1u << 24)
#define KVS_MODEL_MAX_SEQ_LEN (1u << 24)

/* The checkpoint header, checked, plus what follows from it. */
typedef struct kvs_model_config_s {
    uint32_t dim;
    uint32_t hidden_dim;
    uint32_t n_layers;
    uint32_t n_heads;    /* query heads */
    uint32_t n_kv_heads; /* n_heads is a multiple of it */
    uint32_t vocab_size;
    uint32_t seq_len;       /* trained context; RoPE table rows in the file */
    uint32_t head_dim;      /* dim / n_heads, even */
    uint32_t kv_dim;        /* n_kv_heads * head_dim */
    bool shared_classifier; /* output matrix = token embedding */
    uint64_t n_params;      /* weights, RoPE tables not counted */
} kvs_model_config_t;

typedef struct kvs_model_s kvs_model_t;

/*
 * Map and validate the llama2.c checkpoint at `path`: header values within
 * the limits above, dim divisible by n_heads, n_heads by n_kv_heads, even
 * head_dim, file size exactly that implied by the header (with a classifier
 * when vocab_size is negative, without one otherwise), every weight finite,
 * and RoPE tables that are rotations (cos^2 + sin^2 = 1, identity at
 * position 0), which catches a shifted layout.
 * On success *out is a model to release with kvs_model_close().
 * On failure *out is NULL and, when errbuf is not NULL, errbuf (errlen
 * bytes, NUL-terminated) says what is wrong.
 * Errors: -errno (open, stat, mmap), KVS_ECORRUPT (bad header, size or
 * contents), KVS_ENOMEM, KVS_EINVAL (NULL path or out).
 */
int kvs_model_open(const char *path, kvs_model_t **out, char *errbuf,
                   size_t errlen);
/* Unmap and free. NULL is a no-op. No decoder may still use the model. */
void kvs_model_close(kvs_model_t *model);
/* The model's configuration; valid while the model is open. */
const kvs_model_config_t *kvs_model_config(const kvs_model_t *model);

typedef enum kvs_attn_e {
    KVS_ATTN_FULL = 0,        /* own exact attention: the reference */
    KVS_ATTN_STORE_EXACT = 1, /* decode steps via kvs_seq_attend, EXACT */
    KVS_ATTN_STORE_WAVE = 2,  /* decode steps via kvs_seq_attend, WAVE */
} kvs_attn_t;

/* "full", "store-exact", "store-wave"; "?" otherwise. */
const char *kvs_attn_name(kvs_attn_t attn);
/* Parse one of the names above. Errors: KVS_EINVAL. */
int kvs_attn_parse(const char *name, kvs_attn_t *out);

/*
 * Called once per layer for every batch of tokens the decoder processes,
 * after RoPE, before attention. q is [n_tokens][n_heads * head_dim], k and v
 * are [n_tokens][kv_dim]; token i is at position pos + i. The arrays are
 * valid during the call only. A nonzero return stops the forward pass and is
 * returned by kvs_decoder_prefill/step.
 */
typedef int (*kvs_qkv_observer_fn)(void *ctx, uint32_t layer, uint32_t pos,
                                   uint32_t n_tokens, const float *q,
                                   const float *k, const float *v);

/*
 * Where store modes send their sequence operations when they do not go to an
 * in-process kvs_store_t: e.g. libkvsclient to a kvstored (kvdecode --store),
 * or a benchmark that compares several attend variants per call. The
 * functions have the contracts of kvs_seq_create/append/attend/drop in
 * kvstore.h (keys/values: kv_bytes bytes each in the sequence dtype;
 * queries/out: n_q_heads * head_dim floats); errmsg (may be NULL) gives the
 * detail of the last failed call. ctx is kvs_decoder_options_t.backend_ctx.
 */
typedef struct kvs_decoder_backend_s {
    int (*create)(void *ctx, uint64_t seq, const kvs_geometry_t *geo);
    int (*append)(void *ctx, uint64_t seq, uint32_t layer, uint32_t n_tokens,
                  const void *keys, const void *values, size_t kv_bytes);
    int (*attend)(void *ctx, uint64_t seq, uint32_t layer, const float *queries,
                  const kvs_query_params_t *params, float *out,
                  kvs_attend_stats_t *stats);
    int (*drop)(void *ctx, uint64_t seq);
    const char *(*errmsg)(void *ctx);
    /* kvs_seq_observe_queries (queries [n][n_q_heads * head_dim]); NULL:
     * the backend takes none and observe_every is ignored. */
    int (*observe_queries)(void *ctx, uint64_t seq, uint32_t layer, uint32_t n,
                           const float *queries);
} kvs_decoder_backend_t;

typedef struct kvs_decoder_options_s {
    kvs_attn_t attn;
    /* Store modes: the store (borrowed; it must outlive the decoder) and the
     * id of the sequence that kvs_decoder_new creates there and
     * kvs_decoder_free drops. Ignored in full mode. */
    kvs_store_t *store;
    uint64_t seq_id;
    /* Store modes, instead of `store`: a backend (borrowed, with its ctx;
     * both must outlive the decoder). When set, `store` is ignored. */
    const kvs_decoder_backend_t *backend;
    void *backend_ctx;
    /* Keep the sequence when the decoder is freed (default: drop it). */
    bool keep_seq;
    kvs_dtype_t kv_dtype; /* dtype of the store sequence; default f32 */
    /* Store modes: passed to kvs_seq_attend; `mode` is set from attn. */
    kvs_query_params_t query;
    /* Tokens per batched prefill chunk; 0 = 256. */
    uint32_t prefill_chunk;
    /* Store modes: the prefill shows the store the queries of every
     * observe_every-th position, per layer (kvs_seq_observe_queries, so
     * that it sizes per-head budgets for them); 0: none. */
    uint32_t observe_every;
    /* Optional: sees every layer's q/k/v (see kvs_qkv_observer_fn). */
    kvs_qkv_observer_fn observe;
    void *observe_ctx;
} kvs_decoder_options_t;

/* Full mode, f32, default query params, chunk 256, no observer. */
void kvs_decoder_options_default(kvs_decoder_options_t *opts);

typedef struct kvs_decoder_s kvs_decoder_t;

/*
 * A decoder at position 0 over `model` (borrowed; it must outlive the
 * decoder). `opts` is copied; NULL means the defaults.
 * Errors: KVS_EINVAL (bad option; store mode without a store or backend),
 * KVS_ENOMEM, and kvs_seq_create's errors in store modes (e.g. KVS_EEXIST).
 * When `errbuf` is not NULL it receives the message.
 */
int kvs_decoder_new(const kvs_model_t *model, const kvs_decoder_options_t *opts,
                    kvs_decoder_t **out, char *errbuf, size_t errlen);
/* Free the decoder and drop its store sequence (unless keep_seq). NULL is a
 * no-op. */
void kvs_decoder_free(kvs_decoder_t *dec);

/* The message of the last failed call on `dec` ("" if none). Valid until
 * the next call on it. */
const char *kvs_decoder_errmsg(const kvs_decoder_t *dec);
/* Tokens consumed so far = position of the next token. */
uint32_t kvs_decoder_pos(const kvs_decoder_t *dec);

/*
 * Consume `n` tokens with batched matmuls and the decoder's own exact causal
 * attention (whatever the mode; store modes also append every key and value
 * to the store). `logits`, if not NULL, receives [n][vocab_size] floats when
 * `all_logits`, else the [vocab_size] logits after the last token.
 * Errors: KVS_EINVAL (n 0, token out of the vocabulary: nothing consumed),
 * KVS_ENOMEM, the observer's return, store errors. After an error other
 * than KVS_EINVAL the decoder's state is undefined; free it.
 */
int kvs_decoder_prefill(kvs_decoder_t *dec, const int32_t *tokens, uint32_t n,
                        float *logits, bool all_logits);

/*
 * Consume one token as a decode step: in store modes its attention output
 * comes from kvs_seq_attend over every token appended so far (this one
 * included). `logits` ([vocab_size]) may be NULL. Errors as for prefill.
 */
int kvs_decoder_step(kvs_decoder_t *dec, int32_t token, float *logits);

/* What a decoder has done so far. */
typedef struct kvs_decoder_stats_s {
    uint64_t prefill_tokens;
    double prefill_seconds;
    uint64_t step_tokens;
    double step_seconds;
    double attend_seconds;     /* in kvs_seq_attend (store modes), summed */
    uint64_t attend_calls;     /* one per layer per step */
    kvs_attend_stats_t attend; /* summed over calls (seconds too) */
} kvs_decoder_stats_t;

void kvs_decoder_stats(const kvs_decoder_t *dec, kvs_decoder_stats_t *stats);

/*
 * Pick a token from `logits` ([n]): the argmax (lowest id on ties) when
 * temperature <= 0, else a draw from softmax(logits / temperature) with the
 * xorshift state *rng (any value; 0 is remapped), which it advances.
 */
int32_t kvs_sample(const float *logits, uint32_t n, float temperature,
                   uint64_t *rng);

/*
 * Query/key/value dumps (format: bench/README.md, "Dump format"). A dump is
 * opened for `n_tokens` tokens and filled by passing kvs_qkv_dump_observe as
 * the decoder's observer with the dump as context; tokens at positions
 * >= n_tokens are ignored. dtype is KVS_DTYPE_F32 or KVS_DTYPE_F16.
 * Errors (open): KVS_EINVAL, -errno, KVS_ENOMEM; errbuf gets the message.
 */
typedef struct kvs_qkv_dump_s kvs_qkv_dump_t;
int kvs_qkv_dump_open(const char *path, const kvs_model_config_t *cfg,
                      const int32_t *tokens, uint32_t n_tokens,
                      kvs_dtype_t dtype, kvs_qkv_dump_t **out, char *errbuf,
                      size_t errlen);
int kvs_qkv_dump_observe(void *dump, uint32_t layer, uint32_t pos,
                         uint32_t n_tokens, const float *q, const float *k,
                         const float *v);
/* Flush and close. Returns the first write error, KVS_EINVAL when fewer
 * than n_tokens tokens were observed for every layer, or 0; frees the dump
 * either way, and on error removes the partial file. */
int kvs_qkv_dump_close(kvs_qkv_dump_t *dump);

#ifdef __cplusplus
}
#endif
#endif /* KVS_DECODER_H */
