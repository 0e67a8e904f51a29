"""kvstore.llama2c: llama2.c checkpoints (../shared/data) for PyTorch.

`Llama2c(path)` reads a checkpoint (header of 7 int32: dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size -- negative when the classifier
is not shared -- seq_len; then fp32 weights and the two RoPE tables) and
runs its forward pass with a pluggable attention, so the same model can
decode through kvstore or through torch's own attention:

    m = Llama2c("tinycode128.bin")
    logits = m.forward(tokens, pos0, attn)  # attn(layer, q, k, v, pos0)

`to_transformers(path)` converts it to a Hugging Face `LlamaConfig`
keyword dict and a state dict for `LlamaForCausalLM` (the query and key
rows permuted from llama2.c's interleaved RoPE pairs to transformers'
rotate-half layout; the RoPE tables checked against theta).
"""
import numpy as np
import torch

__all__ = ["Llama2c", "to_transformers", "sdpa_attention"]


def _read(path):
    h = np.fromfile(path, np.int32, 7)
    if h.size != 7:
        raise ValueError(f"{path}: not a llama2.c checkpoint (short header)")
    dim, hid, L, H, KVH, vocab, seq_len = (int(x) for x in h)
    if min(dim, hid, L, H, KVH, seq_len) <= 0 or dim % H or H % KVH:
        raise ValueError(f"{path}: bad header {h.tolist()}")
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // H
    w = torch.from_numpy(np.fromfile(path, np.float32, offset=28))
    sizes = [vocab * dim, L * dim, L * dim * dim, L * KVH * hd * dim,
             L * KVH * hd * dim, L * dim * dim, L * dim, L * hid * dim,
             L * dim * hid, L * hid * dim, dim,
             seq_len * hd // 2, seq_len * hd // 2]
    need = sum(sizes) + (0 if shared else vocab * dim)
    if w.numel() < need:
        raise ValueError(f"{path}: {w.numel()} floats, header needs {need}")
    parts, off = [], 0
    for n in sizes:
        parts.append(w[off:off + n])
        off += n
    cls = None if shared else w[off:off + vocab * dim].view(vocab, dim)
    return (dim, hid, L, H, KVH, vocab, seq_len, hd), parts, cls


def sdpa_attention(q, k, v, chunk=1024, heads_first=False):
    """Causal grouped-query attention, softmax(q K^T / sqrt(D)) V, computed
    independently of the store (numpy over OpenBLAS: Debian's torch 1.13
    has no fused attention and copies strided tensors slowly): q [T, H, D]
    are the last T positions of k, v [N, KV, D] (float32 tensors or
    arrays). Queries go in chunks so that a long prefill does not hold a
    T x N score matrix. heads_first: k and v are [KV, N, D] instead.
    Returns [T, H, D] as a float32 tensor."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    if not heads_first:
        k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    t, h, d = q.shape
    kvh, n, _ = k.shape
    g = h // kvh
    out = np.empty((t, h, d), np.float32)
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        last = n - t + b  # keys any query of the chunk can see
        for j in range(kvh):
            kj, vj = k[j, :last], v[j, :last]  # [last, D]
            # the group's queries as rows: [c * g, D]
            qj = q[a:b, j * g:(j + 1) * g].reshape(-1, d)
            s = (qj @ kj.T) * np.float32(1.0 / d ** 0.5)
            if b - a > 1:
                # row r is query a + r // g, absolute n - t + a + r // g
                lim = n - t + a + np.arange(b - a).repeat(g)
                s[np.arange(last)[None, :] > lim[:, None]] = -np.inf
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=1, keepdims=True)
            out[a:b, j * g:(j + 1) * g] = (s @ vj).reshape(b - a, g, d)
    return torch.from_numpy(out)


class Llama2c:
    """A llama2.c checkpoint in torch (fp32, CPU)."""

    def __init__(self, path):
        (dim, hid, L, H, KVH, vocab, self.seq_len, hd), p, cls = _read(path)
        self.emb = p[0].view(vocab, dim)
        self.rms_att = p[1].view(L, dim)
        self.wq = p[2].view(L, dim, dim)
        self.wk = p[3].view(L, KVH * hd, dim)
        self.wv = p[4].view(L, KVH * hd, dim)
        self.wo = p[5].view(L, dim, dim)
        self.rms_ffn = p[6].view(L, dim)
        self.w1 = p[7].view(L, hid, dim)
        self.w2 = p[8].view(L, dim, hid)
        self.w3 = p[9].view(L, hid, dim)
        self.rms_final = p[10]
        self.cos = p[11].view(self.seq_len, hd // 2)
        self.sin = p[12].view(self.seq_len, hd // 2)
        self.wcls = self.emb if cls is None else cls
        self.dim, self.hidden, self.vocab = dim, hid, vocab
        self.L, self.H, self.KVH, self.hd = L, H, KVH, hd

    @staticmethod
    def rmsnorm(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))

    def _tables(self, pos0, t):
        if pos0 + t <= self.seq_len:
            return self.cos[pos0:pos0 + t], self.sin[pos0:pos0 + t]
        # past the stored tables: the same formula (theta 10000)
        j = torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd
        ang = torch.outer(torch.arange(pos0, pos0 + t, dtype=torch.float64),
                          1.0 / 10000.0 ** j)
        return ang.cos().float(), ang.sin().float()

    def rope(self, x, cos, sin):
        """x [T, heads, hd], interleaved pairs (llama2.c)."""
        c, s = cos[:, None, :], sin[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def forward(self, tokens, pos0, attn):
        """Logits [T, vocab] after tokens (ints) at positions pos0 ..;
        attn(layer, q [T, H, hd], k [T, KV, hd], v [T, KV, hd], pos0) gives
        the attention output [T, H, hd] of those T queries over every key
        of the sequence so far (these T included, causally)."""
        tok = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        t = tok.numel()
        cos, sin = self._tables(pos0, t)
        x = self.emb[tok]
        for l in range(self.L):
            xb = self.rmsnorm(x, self.rms_att[l])
            q = self.rope((xb @ self.wq[l].T).view(t, self.H, self.hd), cos,
                          sin)
            k = self.rope((xb @ self.wk[l].T).view(t, self.KVH, self.hd),
                          cos, sin)
            v = (xb @ self.wv[l].T).view(t, self.KVH, self.hd)
            o = attn(l, q, k, v, pos0)
            x = x + o.reshape(t, -1) @ self.wo[l].T
            xb = self.rmsnorm(x, self.rms_ffn[l])
            h = torch.nn.functional.silu(xb @ self.w1[l].T) * \
                (xb @ self.w3[l].T)
            x = x + h @ self.w2[l].T
        return self.rmsnorm(x, self.rms_final) @ self.wcls.T


class TorchCache:
    """The model's own KV cache and attention: the reference."""

    def __init__(self, model, capacity=1024):
        # [layer][KV head][position][D]: each head's keys contiguous
        self.k = np.empty((model.L, model.KVH, capacity, model.hd), np.float32)
        self.v = np.empty_like(self.k)
        self.n = [0] * model.L

    def __call__(self, l, q, k, v, pos0):
        n, t = self.n[l], k.shape[0]
        if n + t > self.k.shape[2]:
            cap = max(2 * self.k.shape[2], n + t)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = np.empty(old.shape[:2] + (cap, old.shape[3]), np.float32)
                new[:, :, :old.shape[2]] = old
                setattr(self, name, new)
        self.k[l, :, n:n + t] = k.numpy().transpose(1, 0, 2)
        self.v[l, :, n:n + t] = v.numpy().transpose(1, 0, 2)
        self.n[l] = n + t
        return sdpa_attention(q, self.k[l, :, :n + t], self.v[l, :, :n + t],
                              heads_first=True)


def _permute_rope(w, heads, hd):
    """Rows of each head from interleaved pairs (2i, 2i+1) to halves
    (i, i + hd/2): what transformers' rotate_half expects."""
    return w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(
        heads * hd, -1)


def to_transformers(path):
    """(config kwargs for transformers.LlamaConfig, state dict for
    LlamaForCausalLM) of a llama2.c checkpoint. Raises ValueError when its
    RoPE tables are not theta-10000 tables (the layout could not be
    trusted)."""
    (dim, hid, L, H, KVH, vocab, seq_len, hd), p, cls = _read(path)
    cos = p[11].view(seq_len, hd // 2).double()
    sin = p[12].view(seq_len, hd // 2).double()
    j = torch.arange(0, hd, 2, dtype=torch.float64) / hd
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64),
                      1.0 / 10000.0 ** j)
    err = max((cos - ang.cos()).abs().max().item(),
              (sin - ang.sin()).abs().max().item())
    if err > 1e-4:
        raise ValueError(f"{path}: RoPE tables are not theta 10000 "
                         f"(max deviation {err:.3g})")
    sd = {"model.embed_tokens.weight": p[0].view(vocab, dim).clone(),
          "model.norm.weight": p[10].clone()}
    for l in range(L):
        pre = f"model.layers.{l}."
        wq = p[2].view(L, dim, dim)[l]
        wk = p[3].view(L, KVH * hd, dim)[l]
        sd[pre + "self_attn.q_proj.weight"] = _permute_rope(wq, H, hd)
        sd[pre + "self_attn.k_proj.weight"] = _permute_rope(wk, KVH, hd)
        sd[pre + "self_attn.v_proj.weight"] = \
            p[4].view(L, KVH * hd, dim)[l].clone()
        sd[pre + "self_attn.o_proj.weight"] = p[5].view(L, dim, dim)[l].clone()
        sd[pre + "input_layernorm.weight"] = p[1].view(L, dim)[l].clone()
        sd[pre + "post_attention_layernorm.weight"] = \
            p[6].view(L, dim)[l].clone()
        sd[pre + "mlp.gate_proj.weight"] = p[7].view(L, hid, dim)[l].clone()
        sd[pre + "mlp.down_proj.weight"] = p[8].view(L, dim, hid)[l].clone()
        sd[pre + "mlp.up_proj.weight"] = p[9].view(L, hid, dim)[l].clone()
    sd["lm_head.weight"] = (p[0].view(vocab, dim) if cls is None
                            else cls).clone()
    config = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=hid,
                  num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=KVH, head_dim=hd,
                  max_position_embeddings=seq_len, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=cls is None,
                  hidden_act="silu", attention_bias=False, mlp_bias=False,
                  bos_token_id=1, eos_token_id=None, pad_token_id=None)
    return config, sd
