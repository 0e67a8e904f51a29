/*
 * decoder_internal.h: what the decoder's files share and nobody else sees:
 * the model's weight pointers into the mapped checkpoint.
 */
#ifndef KVS_DECODER_INT_H
#define KVS_DECODER_INT_H

#include "kvs_decoder.h"

#include "kvs_errf.h"

#include <stdarg.h>

struct kvs_model_s {
    kvs_model_config_t cfg;
    void *map;
    size_t map_size;
    /* Views into the mapping, llama2.c v0 order; matrices are [out][in]. */
    const float *tok_emb;   /* [vocab][dim] */
    const float *rms_att;   /* [layers][dim] */
    const float *wq;        /* [layers][dim][dim] */
    const float *wk;        /* [layers][kv_dim][dim] */
    const float *wv;        /* [layers][kv_dim][dim] */
    const float *wo;        /* [layers][dim][dim] */
    const float *rms_ffn;   /* [layers][dim] */
    const float *w1;        /* [layers][hidden][dim] */
    const float *w2;        /* [layers][dim][hidden] */
    const float *w3;        /* [layers][hidden][dim] */
    const float *rms_final; /* [dim] */
    const float *rope_cos;  /* [seq_len][head_dim / 2] */
    const float *rope_sin;  /* [seq_len][head_dim / 2] */
    const float *wcls;      /* [vocab][dim]; tok_emb when shared */
};

/* snprintf into errbuf when it is not NULL. */
#define kvs__dec_fmt(errbuf, errlen, ...)                                      \
    ((void)kvs__errf((errbuf), (errlen), 0, __VA_ARGS__))

#endif /* KVS_DECODER_INT_H */
