"""kvstore.torch: a PyTorch forward pass of stories260K (llama2.c format,
../shared/data) written here, whose attention goes through the store, is
compared with the same model using torch's own attention."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvstore  # noqa: E402
from kvstore.torch import StoreAttention, reference_attention  # noqa: E402

DATA = os.environ.get("KVS_SHARED_DATA", os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
MODEL = os.path.join(DATA, "stories260K.bin")
STEPS = 300  # positions decoded (seq_len is 512)


class Llama2c:
    """The llama2.c checkpoint (see tools/kvdecode/model.c), in torch."""

    def __init__(self, path):
        h = np.fromfile(path, np.int32, 7)
        dim, hid, L, H, KVH, vocab, self.seq_len = (int(x) for x in h)
        shared = vocab > 0
        vocab = abs(vocab)
        hd = dim // H
        w = torch.from_numpy(np.fromfile(path, np.float32, offset=28))
        sizes = [vocab * dim, L * dim, L * dim * dim, L * KVH * hd * dim,
                 L * KVH * hd * dim, L * dim * dim, L * dim, L * hid * dim,
                 L * dim * hid, L * hid * dim, dim,
                 self.seq_len * hd // 2, self.seq_len * hd // 2]
        parts, off = [], 0
        for n in sizes:
            parts.append(w[off:off + n])
            off += n
        self.emb = parts[0].view(vocab, dim)
        self.rms_att = parts[1].view(L, dim)
        self.wq = parts[2].view(L, dim, dim)
        self.wk = parts[3].view(L, KVH * hd, dim)
        self.wv = parts[4].view(L, KVH * hd, dim)
        self.wo = parts[5].view(L, dim, dim)
        self.rms_ffn = parts[6].view(L, dim)
        self.w1 = parts[7].view(L, hid, dim)
        self.w2 = parts[8].view(L, dim, hid)
        self.w3 = parts[9].view(L, hid, dim)
        self.rms_final = parts[10]
        self.cos = parts[11].view(self.seq_len, hd // 2)
        self.sin = parts[12].view(self.seq_len, hd // 2)
        self.wcls = self.emb if shared else \
            w[off:off + vocab * dim].view(vocab, dim)
        self.L, self.H, self.KVH, self.hd = L, H, KVH, hd

    @staticmethod
    def rmsnorm(x, w):
        return w * (x * torch.rsqrt((x * x).mean() + 1e-5))

    def rope(self, x, pos):
        c, s = self.cos[pos], self.sin[pos]
        x0, x1 = x[:, 0::2], x[:, 1::2]
        out = torch.empty_like(x)
        out[:, 0::2] = x0 * c - x1 * s
        out[:, 1::2] = x0 * s + x1 * c
        return out

    def forward(self, tok, pos, attn):
        """Logits after token `tok` at `pos`; attn(layer, q, k, v) -> o."""
        x = self.emb[tok].clone()
        for l in range(self.L):
            xb = self.rmsnorm(x, self.rms_att[l])
            q = self.rope((self.wq[l] @ xb).view(self.H, self.hd), pos)
            k = self.rope((self.wk[l] @ xb).view(self.KVH, self.hd), pos)
            v = (self.wv[l] @ xb).view(self.KVH, self.hd)
            x = x + self.wo[l] @ attn(l, q, k, v).reshape(-1)
            xb = self.rmsnorm(x, self.rms_ffn[l])
            h = torch.nn.functional.silu(self.w1[l] @ xb) * (self.w3[l] @ xb)
            x = x + self.w2[l] @ h
        return self.wcls @ self.rmsnorm(x, self.rms_final)


@pytest.fixture(scope="module")
def model():
    if not os.path.exists(MODEL):
        pytest.fail(f"{MODEL} missing (../shared/data)")
    torch.set_num_threads(1)
    return Llama2c(MODEL)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy decode from BOS with torch's own attention: the tokens, the
    logits and every attention output."""
    kc = [torch.empty(0, model.KVH, model.hd) for _ in range(model.L)]
    vc = [torch.empty(0, model.KVH, model.hd) for _ in range(model.L)]
    outs = []

    def attn(l, q, k, v):
        kc[l] = torch.cat([kc[l], k[None]])
        vc[l] = torch.cat([vc[l], v[None]])
        o = reference_attention(q[None], kc[l], vc[l])[0]
        outs.append(o)
        return o

    toks, logits = [1], []
    with torch.no_grad():
        for pos in range(STEPS):
            lg = model.forward(toks[-1], pos, attn)
            logits.append(lg)
            toks.append(int(lg.argmax()))
    return toks, torch.stack(logits), torch.stack(outs)


def run_store(model, toks, store, mode, **params):
    """The same token stream (teacher forcing) with attention from the
    store: the logits and every attention output."""
    back = StoreAttention(store, layers=model.L, q_heads=model.H,
                          kv_heads=model.KVH, head_dim=model.hd, mode=mode,
                          **params)
    seq = back.open()
    outs, refs, logits = [], [], []
    kc = [torch.empty(0, model.KVH, model.hd) for _ in range(model.L)]
    vc = [torch.empty(0, model.KVH, model.hd) for _ in range(model.L)]

    def attn(l, q, k, v):
        o = back.step(seq, l, q, k, v)
        # torch's attention on the very same q, K, V, for the per-call check
        kc[l] = torch.cat([kc[l], k[None]])
        vc[l] = torch.cat([vc[l], v[None]])
        refs.append(reference_attention(q[None], kc[l], vc[l])[0])
        outs.append(o)
        return o

    with torch.no_grad():
        for pos in range(STEPS):
            logits.append(model.forward(toks[pos], pos, attn))
    back.close(seq)
    assert store.list() == []
    return torch.stack(logits), torch.stack(outs), torch.stack(refs)


def test_exact_mode_equals_torch_attention(model, reference):
    toks, ref_logits, ref_outs = reference
    with kvstore.Store(deterministic=True) as s:
        logits, outs, same = run_store(model, toks, s, "exact")
    assert outs.shape == ref_outs.shape == (STEPS * model.L, model.H,
                                            model.hd)
    # Each call against torch's attention of the same q, K, V.
    call = (outs - same).abs().max().item()
    # The whole run against the model's own run (differences compound
    # through the layers and positions).
    run = (outs - ref_outs).abs().max().item()
    lg = (logits - ref_logits).abs().max().item()
    print(f"exact: per call max |store - torch| = {call:.3g}; over the run "
          f"attention {run:.3g}, logits {lg:.3g}")
    assert call <= 1e-5
    assert lg <= 1e-3
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


def test_wave_mode_through_the_adapter(model, reference):
    toks, ref_logits, _ = reference
    # Small segments so that most of the 300 positions are indexed.
    opts = dict(deterministic=True, segment_tokens=96, cluster_tokens=8,
                window_tokens=16)
    # Every cluster in the retrieval zone: wave must then equal attention.
    with kvstore.Store(**opts) as s:
        logits, outs, same = run_store(model, toks, s, "wave",
                                       retrieval_fraction=1.0,
                                       estimation_fraction=0.0,
                                       epsilon=0.02)
        assert s.stats()["builds_done"] > 0
    full = (outs - same).abs().max().item()
    assert full <= 1e-4
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    # The accuracy-bounded budget: measured and reported. At head_dim 8 and
    # 300 tokens this model is far from what the wave index is tuned for
    # (tinycode128 at 8K+ is), so only a floor is asserted.
    with kvstore.Store(**opts) as s:
        logits, outs, same = run_store(model, toks, s, "wave",
                                       budget="bounded")
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    print(f"wave: all clusters retrieved, per call max |store - torch| = "
          f"{full:.3g}; bounded budget: greedy agreement "
          f"{agree.item():.3f} over {STEPS} positions")
    assert agree >= 0.5


def test_backend_refuses_wrong_dtype(model):
    with kvstore.Store() as s:
        back = StoreAttention(s, layers=1, q_heads=2, kv_heads=1, head_dim=4)
        seq = back.open()
        with pytest.raises(TypeError, match="k: dtype"):
            back.step(seq, 0, torch.zeros(2, 4), torch.zeros(1, 4,
                      dtype=torch.float64), torch.zeros(1, 4))
        # prefill: every output from the store, causal
        q, k, v = torch.randn(5, 2, 4), torch.randn(5, 1, 4), \
            torch.randn(5, 1, 4)
        back.close(seq)
        back2 = StoreAttention(s, layers=1, q_heads=2, kv_heads=1,
                               head_dim=4, mode="exact", first_seq=100)
        seq = back2.open()
        o = back2.prefill(seq, 0, q, k, v)
        torch.testing.assert_close(o, reference_attention(q, k, v),
                                   atol=1e-5, rtol=1e-5)
        back2.close_all()


def test_step_batch_rows_equal_single_steps():
    """step_batch (one Store.attend_batch for the rows) answers each row as
    step does for it alone; a Client, which has no attend_batch, row by
    row."""
    g = torch.Generator().manual_seed(8)
    with kvstore.Store(deterministic=True) as a, \
            kvstore.Store(deterministic=True) as b:
        kw = dict(layers=1, q_heads=4, kv_heads=2, head_dim=32, mode="wave")
        one, many = StoreAttention(a, **kw), StoreAttention(b, **kw)
        sa = [one.open() for _ in range(3)]
        sb = [many.open() for _ in range(3)]
        for t in range(300):
            q = torch.randn(3, 4, 32, generator=g)
            k = torch.randn(3, 2, 32, generator=g)
            v = torch.randn(3, 2, 32, generator=g)
            got = many.step_batch(sb, 0, q, k, v)
            want = torch.stack([one.step(sa[i], 0, q[i], k[i], v[i])
                                for i in range(3)])
            assert got.shape == (3, 4, 32)
            assert torch.equal(got, want), t


def test_bf16_tensors_and_their_int16_bits():
    """A bf16 sequence takes torch bf16 tensors and their bits viewed as
    int16 (what kvstore.torch passes: torch has no uint16 before 2.3), by
    DLPack; both give the same keys."""
    s = kvstore.Store()
    s.create(1, layers=1, q_heads=4, kv_heads=2, head_dim=64, dtype="bf16")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(10, 2, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(10, 2, 64, generator=g).to(torch.bfloat16)
    s.append(1, 0, k.view(torch.int16), v.view(torch.int16))
    s.append(1, 0, k, v)
    q = torch.randn(4, 64, generator=g)
    out, _ = s.attend(1, 0, q.numpy(), mode="exact")
    kk = torch.cat([k, k]).float().repeat_interleave(2, dim=1)  # [T, 4, D]
    vv = torch.cat([v, v]).float().repeat_interleave(2, dim=1)
    w = torch.softmax(torch.einsum("hd,thd->ht", q, kk) / 8.0, dim=1)
    want = torch.einsum("ht,thd->hd", w, vv)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-4)
    s.close()


def test_append_chunked_splits_a_prefill_into_frames(client, store):
    """A prefill larger than a frame reaches kvstored in runs of whole
    tokens, in order: the daemon's sequence equals one appended in
    process at once (exact attention over both agrees to float rounding)."""
    from kvstore.torch import append_chunked
    g = torch.Generator().manual_seed(7)
    k = torch.randn(700, 2, 64, generator=g)
    v = torch.randn(700, 2, 64, generator=g)
    q = torch.randn(4, 64, generator=g).numpy()
    for h in (client, store):
        h.create(91, layers=1, q_heads=4, kv_heads=2, head_dim=64)
    # 2 x 2 x 64 x 4 = 1 KiB per token: runs of 100 tokens, 7 appends.
    append_chunked(client, 91, 0, k, v, max_bytes=100 * 1024)
    store.append(91, 0, k.contiguous(), v.contiguous())
    assert client.info(91).tokens_min == 700
    got, _ = client.attend(91, 0, q, mode="exact")
    want, _ = store.attend(91, 0, q, mode="exact")
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    # the order of the runs is the order of the tokens: the last key is
    # the last position
    pos, _ = client.search(91, 0, k[-1, 0:1].repeat(4, 1).numpy() * 50, 1,
                           mode="exact")
    assert pos[0, 0] == 699
    for h in (client, store):
        h.drop(91)


NO_CUDA = "no CUDA device: the binding's GPU path (CUDA tensors by DLPack, " \
    "a Store with cuda_device) runs on the GPU machine (tests/gpu/hf-check.sh)"


def gpu_store():
    s = kvstore.Store(cuda_device=0, deterministic=True, segment_tokens=1024)
    if s.stats()["gpu_device"] != 0:
        s.close()
        pytest.skip("the store has no GPU path here (a build without CUDA)")
    return s


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_queries_answer_as_host_queries():
    """A Store's GPU path takes CUDA queries and writes a CUDA output in
    place: the same answers as host queries (within 1e-6 where the GPU step
    serves, wave; bit for bit where the CPU does, exact), from one call to
    the next too, writes pending on another stream are seen, and host/CUDA
    arrays are not mixed."""
    g = torch.Generator().manual_seed(5)
    with gpu_store() as s:
        qh, kvh, d, n = 8, 2, 128, 5000
        s.create(1, layers=1, q_heads=qh, kv_heads=kvh, head_dim=d,
                 dtype="bf16")
        k = torch.randn(n, kvh, d, generator=g).to(torch.bfloat16)
        v = torch.randn(n, kvh, d, generator=g).to(torch.bfloat16)
        s.append(1, 0, k.view(torch.int16), v.view(torch.int16))
        before = s.stats()["gpu_attends"]
        for mode, tol in (("wave", 1e-6), ("exact", 0.0)):
            for _ in range(3):
                q = torch.randn(qh, d, generator=g)
                want, _ = s.attend(1, 0, q.numpy(), mode=mode)
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):  # pending on another stream
                    torch.cuda._sleep(20_000_000)  # the write comes late
                    qc = q.cuda(non_blocking=True) * 1.0
                    got, st = s.attend(1, 0, qc, mode=mode)
                assert got.is_cuda and got.dtype == torch.float32
                err = (got.cpu() - torch.from_numpy(want)).norm() / \
                    torch.from_numpy(want).norm()
                assert err <= tol, (mode, float(err))
                assert st.keys_total == n * kvh
                mine = torch.full((qh, d), 7.0, device="cuda")
                s.attend(1, 0, qc, mode=mode, out=mine)
                # every element written, and visible on this stream with
                # no synchronisation of the caller's
                assert not bool((mine == 7.0).any())
                # the same call again: the same answer within tol (the
                # GPU step's sums are not bit for bit the same from one
                # call to the next: on the H100 this failed as
                # torch.equal, the CPU's exact mode passes as equal)
                diff = float((mine - got).norm() / got.norm())
                assert diff <= tol, (mode, diff)
        # wave only: want, got and mine per query
        assert s.stats()["gpu_attends"] - before == 3 * 3
        with pytest.raises(ValueError, match="out: must be where queries"):
            s.attend(1, 0, qc, out=torch.empty(qh, d))
        with pytest.raises(ValueError, match="out: must be where queries"):
            s.attend(1, 0, qc.cpu(), out=torch.empty(qh, d, device="cuda"))
        with pytest.raises(ValueError, match="keys: device must be the CPU"):
            s.append(1, 0, k[:1].cuda().view(torch.int16),
                     v[:1].view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_backend_keeps_cuda_tensors_on_the_gpu():
    """StoreAttention with CUDA tensors: keys/values to the host, queries
    and outputs on the GPU with a GPU store; the answers of CPU tensors."""
    g = torch.Generator().manual_seed(6)
    with gpu_store() as s, kvstore.Store(deterministic=True,
                                         segment_tokens=1024) as cpu:
        kw = dict(layers=1, q_heads=8, kv_heads=2, head_dim=128,
                  dtype=torch.bfloat16, mode="exact")
        a, b = StoreAttention(s, **kw), StoreAttention(cpu, **kw)
        assert a.gpu_device == 0 and b.gpu_device == -1
        sa, sb = a.open(), b.open()
        t = 300
        q = torch.randn(t, 8, 128, generator=g)
        k = torch.randn(t, 2, 128, generator=g).to(torch.bfloat16)
        v = torch.randn(t, 2, 128, generator=g).to(torch.bfloat16)
        oa = a.prefill(sa, 0, q.cuda(), k.cuda(), v.cuda())
        ob = b.prefill(sb, 0, q, k, v)
        assert oa.is_cuda and not ob.is_cuda
        torch.testing.assert_close(oa.cpu(), ob, rtol=0, atol=0)
        o = b.step(sb, 0, q[0].cuda(), k[0].cuda(), v[0].cuda())
        assert o.is_cuda  # copied back to where the queries were
