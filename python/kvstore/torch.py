"""kvstore.torch: an attention backend for PyTorch decoders (pure Python).

A decoder keeps one kvstore sequence per request. At each position of each
layer it hands the backend that token's rotated keys/values and its queries;
the backend appends the keys/values to the store and returns the attention
output computed by the store (wave by default, exact on request) over every
token of that request so far. Nothing of the KV cache stays in the model.

    from kvstore.torch import StoreAttention
    attn = StoreAttention(kvstore.Store(), layers=L, q_heads=H, kv_heads=KV,
                          head_dim=D, mode="wave")
    seq = attn.open()                      # one per request
    o = attn.step(seq, layer, q, k, v)     # q [H, D]; k, v [KV, D] -> [H, D]
    o = attn.step_batch(seqs, layer, q, k, v)  # a batch: [B, ...] -> [B, H, D]
    o = attn.prefill(seq, layer, q, k, v)  # q [T, H, D]; k, v [T, KV, D]
    attn.close(seq)

Tensors go in by DLPack without a copy (CPU tensors; float32 queries, keys
and values in the sequence's dtype); outputs are float32 CPU tensors that
share memory with the numpy arrays the store wrote. CUDA tensors work too:
their keys/values are copied to the host (where the store keeps them); with
a Store opened with `cuda_device` on the queries' device, queries and
outputs stay on the GPU (kvs_seq_attend_device), otherwise they are copied
down and the output back up. `reference_attention` is the same computation
in torch, what a model's own attention gives.
"""
import itertools
import math

import torch

import kvstore

__all__ = ["StoreAttention", "reference_attention", "append_chunked"]

# Bytes of keys + values per append call of append_chunked: a quarter of
# kvstored's default max_frame_bytes (64 MiB), so a frame never reaches it.
APPEND_CHUNK_BYTES = 16 << 20


def append_chunked(handle, seq, layer, keys, values,
                   max_bytes=APPEND_CHUNK_BYTES):
    """handle.append of keys/values [T, KV, D] in runs of whole tokens of
    at most max_bytes (keys and values together), in order. A kvstore.Client
    refuses a request above the daemon's max_frame_bytes (TooBigError: a
    32K-token prefill of one layer is 64 MiB at 8 KV heads, fp32); a Store
    takes any size, so this only splits work. Not atomic across runs: a
    failure leaves the runs before it appended (the sequence's token count
    says how many)."""
    t = keys.shape[0]
    per_token = (keys[0].numel() * keys.element_size() +
                 values[0].numel() * values.element_size()) if t else 1
    run = max(1, max_bytes // per_token)
    for i in range(0, t, run):
        handle.append(seq, layer, keys[i:i + run], values[i:i + run])

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def reference_attention(q, k, v, scale=None, causal_offset=None):
    """softmax(scale q.K^T) V in torch, grouped-query heads.

    q [T, H, D], k and v [N, KV, D] (float32): the T queries are the last T
    positions of the N keys when causal_offset is None (causal mask), else
    each attends the first causal_offset + t + 1 keys. Returns [T, H, D].
    """
    t, h, d = q.shape
    n, kvh, _ = k.shape
    group = h // kvh
    scale = scale if scale else 1.0 / math.sqrt(d)
    kk = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H,N,D]
    vv = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(q.float().transpose(0, 1), kk.transpose(1, 2)) * scale
    first = n - t if causal_offset is None else causal_offset
    pos = torch.arange(n)
    mask = pos[None, :] > (first + torch.arange(t))[:, None]  # [T, N]
    s = s.masked_fill(mask[None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vv).transpose(0, 1)


class StoreAttention:
    """One kvstore sequence per request; attention served by the store.

    handle: a kvstore.Store or kvstore.Client (not closed by this object).
    mode: "wave" (default), "exact" or "full"; query_params: more keyword
    arguments for attend (budget=, retrieval_fraction=, ...).
    """

    def __init__(self, handle, *, layers, q_heads, kv_heads, head_dim,
                 dtype=torch.float32, mode="wave", scale=0.0, first_seq=1,
                 **query_params):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {list(_DTYPES)}")
        self.handle = handle
        self.layers, self.q_heads = layers, q_heads
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype = dtype
        self.mode, self.scale = mode, scale
        self.query_params = query_params
        # the CUDA device whose queries the store takes in place (-1: none)
        self.gpu_device = -1
        if isinstance(handle, kvstore.Store):
            self.gpu_device = handle.stats().get("gpu_device", -1)
        self._ids = itertools.count(first_seq)
        self._open = set()

    def open(self, seq=None):
        """Start a request: create its sequence (id `seq` or the next one)."""
        seq = next(self._ids) if seq is None else seq
        self.handle.create(seq, layers=self.layers, q_heads=self.q_heads,
                           kv_heads=self.kv_heads, head_dim=self.head_dim,
                           dtype=_DTYPES[self.dtype])
        self._open.add(seq)
        return seq

    def close(self, seq):
        """End a request: drop its sequence."""
        self._open.discard(seq)
        self.handle.drop(seq)

    def close_all(self):
        for seq in list(self._open):
            self.close(seq)

    def to_store(self, x, name):
        """x as the store takes keys/values: this backend's dtype (else
        TypeError naming x), in host memory, C-contiguous; bf16 as its
        int16 bits (numpy has no bfloat16)."""
        if x.dtype != self.dtype:
            raise TypeError(f"{name}: dtype must be {self.dtype}, "
                            f"got {x.dtype}")
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()  # the store keeps keys/values in host memory
        if self.dtype == torch.bfloat16:
            # numpy has no bfloat16: the store takes its bits.
            x = x.view(torch.int16)
        return x.contiguous()

    def step(self, seq, layer, q, k, v):
        """Append one token's k, v [KV, D] to `layer`, then attend q [H, D]
        over every token so far; returns [H, D] float32."""
        k = self.to_store(k, "k").reshape(1, self.kv_heads, self.head_dim)
        v = self.to_store(v, "v").reshape(1, self.kv_heads, self.head_dim)
        self.handle.append(seq, layer, k, v)
        return self._attend(seq, layer, q)

    def step_batch(self, seqs, layer, q, k, v):
        """One decode step of a batch: row i appends k[i], v[i] [KV, D] to
        seqs[i] and attends q[i] [H, D]; returns [B, H, D] float32 on q's
        device. A Store on host tensors attends all rows in one call
        (Store.attend_batch: in parallel on its threads); otherwise row by
        row, as step does. Each row's answer is step's."""
        b = len(seqs)
        if len(set(seqs)) != b:
            raise ValueError("seqs: a sequence appears twice (each row "
                             "appends a token to its own sequence)")
        for i, seq in enumerate(seqs):
            self.handle.append(
                seq, layer,
                self.to_store(k[i], "k").reshape(1, self.kv_heads,
                                                 self.head_dim),
                self.to_store(v[i], "v").reshape(1, self.kv_heads,
                                                 self.head_dim))
        batched = getattr(self.handle, "attend_batch", None)
        if b > 1 and batched is not None and q.device.type == "cpu":
            qq = q.detach().float().contiguous().reshape(b, self.q_heads,
                                                         self.head_dim)
            out, _ = batched(list(seqs), layer, qq, mode=self.mode,
                             scale=self.scale, **self.query_params)
            return torch.from_numpy(out)
        return torch.stack([self._attend(seq, layer, q[i])
                            for i, seq in enumerate(seqs)])

    def _attend(self, seq, layer, q):
        q = q.detach().float().contiguous().reshape(self.q_heads,
                                                    self.head_dim)
        if q.is_cuda and q.device.index == self.gpu_device:
            # torch orders the queries' pending writes (DLPack stream 1)
            # from the current device's stream: make it the queries'
            with torch.cuda.device(q.device):
                out, _ = self.handle.attend(seq, layer, q, mode=self.mode,
                                            scale=self.scale,
                                            **self.query_params)
            return out  # a CUDA tensor the store wrote
        dev = q.device
        out, _ = self.handle.attend(seq, layer, q.cpu(), mode=self.mode,
                                    scale=self.scale, **self.query_params)
        return torch.from_numpy(out).to(dev)

    def prefill(self, seq, layer, q, k, v):
        """T tokens at once: q [T, H, D], k and v [T, KV, D]. Each query
        attends causally (its own token and those before): the keys are
        appended and attended one position at a time, so every output
        comes from the store. Returns [T, H, D] float32."""
        t = q.shape[0]
        out = torch.empty((t, self.q_heads, self.head_dim), device=q.device)
        k = self.to_store(k, "k").reshape(t, self.kv_heads, self.head_dim)
        v = self.to_store(v, "v").reshape(t, self.kv_heads, self.head_dim)
        for i in range(t):
            self.handle.append(seq, layer, k[i:i + 1], v[i:i + 1])
            out[i] = self._attend(seq, layer, q[i])
        return out
