"""tinycode128 decoding through kvstore.torch vs its own attention.

For each prompt length: the prompt (the first CTX bytes of TEXT, BOS
first) through the model (kvstore.llama2c, its own attention); STEPS greedy
tokens with the model's own attention (the reference: tokens, logits,
time); then the same tokens (teacher forcing) with every decode step's
attention from an in-process kvstore (wave, deterministic, the prompt's
K/V appended per layer): greedy agreement with the reference, attention
rel. L2 error over the first 32 steps, tokens/s of both decode loops (the
model's forward pass in torch included in both).

Usage: python decode.py MODEL TEXT --ctx N [N ...] --steps S --json OUT
"""
import argparse
import json
import time

import numpy as np
import torch

import kvstore
from kvstore.llama2c import Llama2c, TorchCache
from kvstore.torch import StoreAttention


def one(model, text, ctx, steps):
    toks = [1] + list(text[:ctx - 1])
    if len(toks) < ctx:
        raise SystemExit(f"decode.py: text has {len(text)} bytes, need {ctx}")
    ref = TorchCache(model, capacity=ctx + steps)
    t0 = time.perf_counter()
    with torch.no_grad():
        last = model.forward(toks, 0, ref)[-1]
    t_prompt = time.perf_counter() - t0
    kv = [(torch.from_numpy(ref.k[l, :, :ctx].transpose(1, 0, 2).copy()),
           torch.from_numpy(ref.v[l, :, :ctx].transpose(1, 0, 2).copy()))
          for l in range(model.L)]
    gen, ref_logits = [int(last.argmax())], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            lg = model.forward([gen[-1]], ctx + i, ref)[0]
            ref_logits.append(lg)
            gen.append(int(lg.argmax()))
    t_ref = time.perf_counter() - t0
    ref_logits = torch.stack(ref_logits)

    with kvstore.Store(deterministic=True) as s:
        back = StoreAttention(s, layers=model.L, q_heads=model.H,
                              kv_heads=model.KVH, head_dim=model.hd,
                              mode="wave")
        seq = back.open()
        own = TorchCache(model, capacity=ctx + steps)
        for l, (k, v) in enumerate(kv):
            s.append(seq, l, k.contiguous(), v.contiguous())
            own.k[l, :, :ctx] = k.numpy().transpose(1, 0, 2)
            own.v[l, :, :ctx] = v.numpy().transpose(1, 0, 2)
            own.n[l] = ctx
        rels, logits = [], []
        compare = 32

        def attn(l, q, k, v, pos0):
            o = back.step(seq, l, q[0], k[0], v[0])
            if pos0 < ctx + compare:
                r = own(l, q, k, v, pos0)[0]
                rels.append(((o - r).norm(dim=-1) / r.norm(dim=-1)).numpy())
            return o[None]

        t_store = 0.0
        with torch.no_grad():
            for i in range(steps):
                t0 = time.perf_counter()
                lg = model.forward([gen[i]], ctx + i, attn)[0]
                if i >= compare:  # the comparison's own attention excluded
                    t_store += time.perf_counter() - t0
                logits.append(lg)
        st = s.stats()
        back.close(seq)
    logits = torch.stack(logits)
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    rel = np.concatenate(rels)
    timed = max(1, steps - compare)
    return {
        "ctx": ctx, "steps": steps, "greedy_agreement": agree,
        "rel_l2_median": float(np.median(rel)),
        "rel_l2_p90": float(np.quantile(rel, 0.9)),
        "tokens_per_s_store": timed / t_store if t_store else 0.0,
        "tokens_per_s_model": steps / t_ref,
        "prompt_s": t_prompt, "builds": st["builds_done"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = Llama2c(a.model)
    text = open(a.text, "rb").read()
    rows = []
    for ctx in a.ctx:
        r = one(model, text, ctx, a.steps)
        print(json.dumps(r), flush=True)
        rows.append(r)
    m = {}
    for r in rows:
        tag = f"{r['ctx'] // 1024}k"
        m[f"greedy_agreement_{tag}"] = r["greedy_agreement"]
        m[f"rel_l2_median_{tag}"] = r["rel_l2_median"]
    m["tokens_per_s_store"] = rows[-1]["tokens_per_s_store"]
    m["tokens_per_s_sdpa"] = rows[-1]["tokens_per_s_model"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"metrics": m, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
