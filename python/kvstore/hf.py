"""kvstore.hf: Hugging Face transformers decoding through kvstore.

An unmodified Llama-style model (`LlamaForCausalLM` and the others built on
transformers' attention interface, transformers >= 4.48) selects kvstore
as its attention implementation; each request is a kvstore sequence:

    import kvstore, kvstore.hf
    kvstore.hf.register()                       # once: "kvstore"
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="kvstore")
    with kvstore.Store() as store, kvstore.hf.Session(store, model) as s:
        out = model.generate(ids, max_new_tokens=500, do_sample=False)

Inside a Session every attention call of the model appends that call's new
keys/values (the last T of what the model's cache hands over) to the
request's sequence; a decode step (one query per row) takes its output
from the store (wave by default; Session(mode="exact") for exact), a
prefill (T > 1) is computed by torch's own attention over the keys it was
given, as an engine computes its prompt. Rows of a batch are separate
sequences. Outside a Session the model falls back to torch's attention.

The model's own cache still holds a copy of the keys/values (transformers
gives the attention function the whole history); pass
`past_key_values=kvstore.hf.NewTokensCache()` to `generate` where the
installed transformers accepts a custom cache, so that only the store
holds them.
"""
import contextvars

import torch

from kvstore.torch import StoreAttention, append_chunked

__all__ = ["register", "Session", "attention", "NAME"]

NAME = "kvstore"
_current = contextvars.ContextVar("kvstore_hf_session", default=None)


# Query rows per block of a prefill's attention: the score block is
# heads x block x keys floats (4 x 512 x 32K x 4 B = 256 MiB at 32K for
# tinycode128), where the whole prompt at once was 16 GiB.
PREFILL_BLOCK = 512


def _torch_attention(query, key, value, attention_mask, scaling,
                     block=PREFILL_BLOCK, fused=True):
    """Causal attention in torch for a prefill: query [B, H, T, D], key and
    value [B, KV, N, D]; returns [B, T, H, D]. torch's fused
    scaled_dot_product_attention where it exists (torch >= 2.1: it skips
    the masked half and never holds the score matrix), else `block` query
    rows at a time (each row's softmax is its own, so blocks change nothing
    but the memory: a 32K prompt's whole score matrix is 16 GiB)."""
    b, h, t, d = query.shape
    g = h // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    n = k.shape[2]
    sdpa = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
    if fused and sdpa is not None and (attention_mask is not None or n == t):
        try:
            if attention_mask is None:
                o = sdpa(query, k, v, is_causal=True, scale=scaling)
            else:
                o = sdpa(query, k, v, attn_mask=attention_mask[..., :n],
                         scale=scaling)
            return o.transpose(1, 2).contiguous()
        except TypeError:  # torch 2.0: no scale= argument
            pass
    kt = k.transpose(-1, -2)
    out = torch.empty(b, h, t, v.shape[-1], dtype=v.dtype, device=v.device)
    for r0 in range(0, t, block):
        r1 = min(t, r0 + block)
        s = torch.matmul(query[:, :, r0:r1], kt) * scaling
        if attention_mask is not None:
            m = attention_mask[..., :n]
            if m.shape[-2] != 1:  # one row per query, else broadcast
                m = m[..., r0:r1, :]
            if m.dtype == torch.bool:
                s = s.masked_fill(~m, float("-inf"))
            else:
                s = s + m
        else:
            rows = torch.arange(r0, r1, device=s.device).unsqueeze(1) + \
                (n - t)
            cols = torch.arange(n, device=s.device).unsqueeze(0)
            s = s.masked_fill(cols > rows, float("-inf"))
        out[:, :, r0:r1] = torch.matmul(torch.softmax(s.float(), dim=-1)
                                        .to(v.dtype), v)
    return out.transpose(1, 2).contiguous()


class Session:
    """Binds a model's attention calls to kvstore sequences (one per batch
    row) for the duration of a `with` block; the sequences are dropped on
    exit. handle: kvstore.Store or kvstore.Client; dtype: how the store
    keeps keys/values (float32, or torch.bfloat16/float16: half the bytes,
    and what a Store's GPU path serves); mode/query params as for
    kvstore.torch.StoreAttention. A model on a GPU works as is: keys and
    values are copied to the host, and a Store opened with cuda_device on
    the model's device takes the queries and writes the outputs in GPU
    memory."""

    def __init__(self, handle, model, *, batch=1, mode="wave",
                 first_seq=1, dtype=torch.float32, **query_params):
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or \
            cfg.hidden_size // cfg.num_attention_heads
        self.backend = StoreAttention(
            handle, layers=cfg.num_hidden_layers,
            q_heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads",
                             cfg.num_attention_heads),
            head_dim=hd, dtype=dtype, mode=mode, first_seq=first_seq,
            **query_params)
        self.batch = batch
        self.seqs = []
        self.decode_calls = 0
        self._token = None

    def __enter__(self):
        self.seqs = [self.backend.open() for _ in range(self.batch)]
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        self.backend.close_all()
        return False

    def __call__(self, module, query, key, value, attention_mask, scaling):
        b, h, t, d = query.shape
        if b != len(self.seqs):
            raise ValueError(f"query: batch {b}, but the session has "
                             f"{len(self.seqs)} sequences")
        layer = module.layer_idx
        dt = self.backend.dtype
        new_k = key[:, :, -t:].transpose(1, 2).to(dt)  # [B, T, KV, D]
        new_v = value[:, :, -t:].transpose(1, 2).to(dt)
        if t > 1:
            for i, seq in enumerate(self.seqs):
                append_chunked(self.backend.handle, seq, layer,
                               self.backend.to_store(new_k[i], "keys"),
                               self.backend.to_store(new_v[i], "values"))
            return _torch_attention(query, key, value, attention_mask,
                                    scaling)
        # the batch's rows in one call where the store takes it (parallel)
        o = self.backend.step_batch(self.seqs, layer, query[:, :, 0],
                                    new_k[:, 0], new_v[:, 0])
        self.decode_calls += 1
        return o.to(query.dtype).unsqueeze(1)  # [B, 1, H, D]


def attention(module, query, key, value, attention_mask, scaling=None,
              dropout=0.0, **kwargs):
    """The attention function registered as "kvstore": transformers'
    interface (query [B, H, T, D], key/value [B, KV, N, D]; returns
    ([B, T, H, D], None))."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    session = _current.get()
    if session is None:
        return _torch_attention(query, key, value, attention_mask,
                                scaling), None
    return session(module, query, key, value, attention_mask, scaling), None


def register():
    """Registers "kvstore" with transformers.AttentionInterface."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attention)


class NewTokensCache:
    """A cache object for generate() that keeps no keys/values: it hands
    each layer only the new ones and counts the length (the store holds the
    history). Built on transformers.DynamicCache so that generate() accepts
    it; created lazily because transformers is optional."""

    def __new__(cls):
        from transformers import DynamicCache

        class _NewTokens(DynamicCache):
            def __init__(self):
                super().__init__()
                self._len = {}

            def update(self, key_states, value_states, layer_idx,
                       cache_kwargs=None):
                self._len[layer_idx] = self._len.get(layer_idx, 0) + \
                    key_states.shape[-2]
                return key_states, value_states

            def get_seq_length(self, layer_idx=0):
                return self._len.get(layer_idx, 0)

        return _NewTokens()
