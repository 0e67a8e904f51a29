"""kvstore.llama2c.to_transformers and kvstore.hf: the converted checkpoint
in transformers' layout (rotate-half RoPE) gives the llama2.c model's
logits; with transformers installed, an unmodified LlamaForCausalLM
decodes through kvstore (skipped where transformers is not installed:
Debian 12 does not package it)."""
import os

import pytest

torch = pytest.importorskip("torch")

import kvstore  # noqa: E402
from kvstore.llama2c import Llama2c, TorchCache, sdpa_attention, \
    to_transformers  # noqa: E402

DATA = os.environ.get("KVS_SHARED_DATA", os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data"))


def rotate_half_forward(cfg, sd, tokens):
    """transformers' Llama forward (rotate_half RoPE, theta from cfg), written
    out over the converted state dict: logits [T, vocab]."""
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    KVH, hd = cfg["num_key_value_heads"], cfg["head_dim"]
    t = len(tokens)
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    ang = torch.outer(torch.arange(t).double(), inv)
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def norm(x, w):
        return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5))

    x = sd["model.embed_tokens.weight"][torch.tensor(tokens)]
    for l in range(L):
        p = f"model.layers.{l}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(t, H, hd))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(t, KVH, hd))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(t, KVH, hd)
        o = sdpa_attention(q, k, v).reshape(t, -1)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (h @ sd[p + "mlp.up_proj.weight"].T)) @ \
            sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def _naive_causal(q, k, v, mask, scaling):
    """The prefill attention written plainly in double: [B, T, H, D]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1).double()
    v = v.repeat_interleave(g, dim=1).double()
    s = torch.matmul(q.double(), k.transpose(-1, -2)) * scaling
    t, n = q.shape[2], k.shape[2]
    if mask is None:
        keep = torch.ones(t, n, dtype=torch.bool).tril(n - t)
        s = s.masked_fill(~keep, float("-inf"))
    elif mask.dtype == torch.bool:
        s = s.masked_fill(~mask[..., :n], float("-inf"))
    else:
        s = s + mask[..., :n].double()
    return torch.matmul(torch.softmax(s, -1), v).transpose(1, 2)


@pytest.mark.parametrize("block,fused", [(1, False), (3, False),
                                         (7, False), (512, False),
                                         (512, True)])
def test_prefill_attention_in_row_blocks(block, fused):
    """kvstore.hf's prefill attention, in blocks of query rows (a 32K
    prompt's whole score matrix is 16 GiB): the same output whatever the
    block, with the causal default, a boolean mask, an additive mask
    (one row per query or one broadcast row) and keys beyond the prompt
    (a cache that already held some); fused: torch's own
    scaled_dot_product_attention where this torch has it."""
    import kvstore.hf as hf
    g = torch.Generator().manual_seed(5)
    b, h, kv, t, n, d = 2, 4, 2, 9, 13, 8
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kv, n, d, generator=g)
    v = torch.randn(b, kv, n, d, generator=g)
    rows = torch.arange(t).unsqueeze(1) + (n - t)
    causal = (torch.arange(n + 3).unsqueeze(0) <= rows)  # 3 padded columns
    causal = causal.expand(b, 1, t, n + 3)
    additive = torch.zeros(b, 1, t, n + 3).masked_fill(~causal, -1e9)
    broadcast = torch.randn(b, 1, 1, n, generator=g)
    for mask in (None, causal, additive, broadcast):
        got = hf._torch_attention(q, k, v, mask, 0.3, block=block,
                                  fused=fused)
        want = _naive_causal(q, k, v, mask, 0.3)
        assert got.shape == (b, t, h, d)
        assert torch.allclose(got.double(), want, atol=1e-5), block


@pytest.mark.parametrize("name", ["stories260K.bin", "tinycode128.bin"])
def test_converted_layout_gives_the_same_logits(name):
    path = os.path.join(DATA, name)
    cfg, sd = to_transformers(path)
    m = Llama2c(path)
    toks = [1] + list(range(40, 40 + 47))
    with torch.no_grad():
        want = m.forward(toks, 0, TorchCache(m))
        got = rotate_half_forward(cfg, sd, toks)
    err = (got - want).abs().max().item()
    print(f"{name}: max |converted - llama2.c| logits {err:.3g}")
    assert err <= 1e-3 * max(1.0, want.abs().max().item())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_converter_refuses_wrong_rope_tables(tmp_path):
    import numpy as np
    src = os.path.join(DATA, "stories260K.bin")
    raw = np.fromfile(src, np.uint8).copy()
    # the last floats of the file belong to the RoPE sin table (shared
    # classifier): make one wrong
    f = raw[-4:].view(np.float32)
    f[0] += 0.5
    bad = tmp_path / "bad.bin"
    raw.tofile(bad)
    with pytest.raises(ValueError, match="RoPE"):
        to_transformers(str(bad))


def stories_llama():
    """stories260K as an unmodified LlamaForCausalLM whose attention is
    "kvstore" (skips without transformers); eval mode, on the CPU."""
    transformers = pytest.importorskip("transformers")
    import kvstore.hf
    cfg, sd = to_transformers(os.path.join(DATA, "stories260K.bin"))
    kvstore.hf.register()
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**cfg, attn_implementation="kvstore"))
    model.load_state_dict(sd, strict=False)
    return model.eval()


def test_llama_for_causal_lm_decodes_through_kvstore():
    import kvstore.hf
    model = stories_llama()
    ids = torch.tensor([[1] + list(range(40, 72))])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=48, do_sample=False)
        with kvstore.Store() as s, \
                kvstore.hf.Session(s, model, mode="exact") as sess:
            got = model.generate(ids, max_new_tokens=48, do_sample=False)
            assert sess.decode_calls > 0
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the model on a GPU runs on the "
                    "GPU machine (tests/gpu/hf-check.sh)")
def test_llama_on_the_gpu_decodes_through_a_gpu_store():
    """The model on CUDA with a Store opened on its device: keys/values go
    to the host, queries and outputs stay CUDA tensors; exact mode gives
    the model's own greedy tokens. (head_dim 8 and this short prompt keep
    every call on the CPU path of kvs_seq_attend_device; the GPU step
    itself is bench/python/hf_decode.py --device cuda with tinycode128.)"""
    import kvstore.hf
    model = stories_llama().cuda()
    ids = torch.tensor([[1] + list(range(40, 72))]).cuda()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=48, do_sample=False)
        with kvstore.Store(cuda_device=0) as s:
            if s.stats()["gpu_device"] != 0:
                pytest.skip("the store has no GPU path (no CUDA in the build)")
            with kvstore.hf.Session(s, model, mode="exact") as sess:
                got = model.generate(ids, max_new_tokens=48, do_sample=False)
                assert sess.decode_calls > 0
    assert got.is_cuda
    agree = (got[0, 33:] == want[0, 33:]).float().mean().item()
    assert agree >= 0.95, agree
