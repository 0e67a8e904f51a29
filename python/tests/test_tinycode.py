"""tinycode128 (../shared/data: 6 layers, 4 query heads, 2 KV heads,
head_dim 128, trained at 32K) decoding through kvstore.torch after an 8K
prompt: its forward pass in torch (kvstore.llama2c), the prompt's
attention computed by the model, every decode step's attention from the
store, against the model's own attention (kvstore.llama2c.TorchCache).
KVS_TINYCODE_STEPS sets the decode steps (default 500)."""
import glob
import os
import sysconfig
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvstore  # noqa: E402
from kvstore.llama2c import Llama2c, TorchCache  # noqa: E402
from kvstore.torch import StoreAttention  # noqa: E402

DATA = os.environ.get("KVS_SHARED_DATA", os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data"))
MODEL = os.path.join(DATA, "tinycode128.bin")
PROMPT = 8192
STEPS = int(os.environ.get("KVS_TINYCODE_STEPS", "500"))


def prompt_bytes(n):
    """n bytes of real text the model can read: this Python's standard
    library sources in name order (the model is byte-level and was trained
    on such text), BOS first."""
    out = bytearray([1])
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"],
                                              "*.py"))):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= n:
            break
    return list(out[:n])


@pytest.fixture(scope="module")
def model():
    if not os.path.exists(MODEL):
        pytest.fail(f"{MODEL} missing (../shared/data)")
    torch.set_num_threads(1)
    return Llama2c(MODEL)


@pytest.fixture(scope="module")
def reference(model):
    """The prompt through the model, then STEPS greedy tokens with its own
    attention: the prompt's K/V per layer, the tokens, the logits."""
    cache = TorchCache(model)
    toks = prompt_bytes(PROMPT)
    t0 = time.perf_counter()
    with torch.no_grad():
        last = model.forward(toks, 0, cache)[-1]
        kv = [(torch.from_numpy(cache.k[l, :, :PROMPT].transpose(1, 0, 2)
                                .copy()),
               torch.from_numpy(cache.v[l, :, :PROMPT].transpose(1, 0, 2)
                                .copy())) for l in range(model.L)]
        t1 = time.perf_counter()
        gen, logits = [int(last.argmax())], []
        for i in range(STEPS):
            lg = model.forward([gen[-1]], PROMPT + i, cache)[0]
            logits.append(lg)
            gen.append(int(lg.argmax()))
    t2 = time.perf_counter()
    print(f"reference: prompt {PROMPT} in {t1 - t0:.1f} s, {STEPS} steps in "
          f"{t2 - t1:.1f} s")
    return kv, gen, torch.stack(logits)


def run_store(model, kv, gen, store, mode, steps=STEPS, compare=None,
              **params):
    """The reference's tokens (teacher forcing) with every decode step's
    attention from the store; returns the logits, the store's attention
    outputs beside the model's own over the same q, K, V (for the first
    `compare` steps, default all), and the decode time."""
    compare = steps if compare is None else compare
    back = StoreAttention(store, layers=model.L, q_heads=model.H,
                          kv_heads=model.KVH, head_dim=model.hd, mode=mode,
                          **params)
    seq = back.open()
    own = TorchCache(model, capacity=PROMPT + steps)
    for l, (k, v) in enumerate(kv):
        store.append(seq, l, k.contiguous(), v.contiguous())
        own.k[l, :, :PROMPT] = k.numpy().transpose(1, 0, 2)
        own.v[l, :, :PROMPT] = v.numpy().transpose(1, 0, 2)
        own.n[l] = PROMPT
    outs, refs, logits = [], [], []

    def attn(l, q, k, v, pos0):
        o = back.step(seq, l, q[0], k[0], v[0])
        if pos0 < PROMPT + compare:
            outs.append(o)
            refs.append(own(l, q, k, v, pos0)[0])
        return o[None]

    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            logits.append(model.forward([gen[i]], PROMPT + i, attn)[0])
    dt = time.perf_counter() - t0
    back.close(seq)
    return torch.stack(logits), torch.stack(outs), torch.stack(refs), dt


def test_exact_mode_equals_model_attention(model, reference):
    kv, gen, ref_logits = reference
    steps = min(STEPS, 16)
    with kvstore.Store(deterministic=True) as s:
        logits, outs, own, _ = run_store(model, kv, gen, s, "exact",
                                         steps=steps)
    err = (outs - own).abs().max().item()
    lg = (logits - ref_logits[:steps]).abs().max().item()
    print(f"exact over {PROMPT + steps} tokens: max |store - model| "
          f"{err:.3g} per call, logits {lg:.3g}")
    assert err <= 1e-5
    assert lg <= 1e-3
    assert torch.equal(logits.argmax(-1), ref_logits[:steps].argmax(-1))


def test_wave_greedy_agreement_8k(model, reference):
    kv, gen, ref_logits = reference
    with kvstore.Store(deterministic=True) as s:
        logits, outs, own, dt = run_store(model, kv, gen, s, "wave",
                                          compare=32)
        st = s.stats()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    rel = ((outs - own).norm(dim=-1) / own.norm(dim=-1)).flatten()
    print(f"wave, {PROMPT}-token prompt, {STEPS} steps: greedy agreement "
          f"{agree.item():.4f}, attention rel. L2 (first 32 steps) median "
          f"{rel.median().item():.4f} p90 {rel.quantile(0.9).item():.4f}, "
          f"{STEPS / dt:.1f} tokens/s, builds {st['builds_done']}")
    assert st["builds_done"] > 0
    assert agree >= 0.99
