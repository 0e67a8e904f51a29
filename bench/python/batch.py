"""bench/python/batch.py: one decode step of a batch through
Store.attend_batch (kvs_seq_attend_batch: the sequences in parallel on the
store's threads) against a loop of Store.attend over the same sequences,
same store, same queries, interleaved rounds (fastest round of each).

    batch.py --batch 8 --ctx 8192 --kv-heads 1 2 --rounds 20 --json OUT

Sequences: random bf16 keys/values of one layer, head_dim 128, 4 query
heads per KV head (GQA); the store is deterministic (the index a call sees
does not depend on build timing) and waits for its builds before timing.
The ratio is what a batch buys where one sequence has fewer KV heads than
the machine has cores (a sequence's attend is spread over its KV heads).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import kvstore


def one(kv_heads, batch, ctx, rounds, rng):
    qh, d = 4 * kv_heads, 128
    with kvstore.Store(deterministic=True) as s:
        ids = list(range(1, batch + 1))
        for i in ids:
            s.create(i, layers=1, q_heads=qh, kv_heads=kv_heads, head_dim=d,
                     dtype="bf16")
            k = rng.standard_normal((ctx, kv_heads, d), np.float32)
            v = rng.standard_normal((ctx, kv_heads, d), np.float32)
            # bf16 bits: the upper half of each float32
            kb = (k.view(np.uint32) >> 16).astype(np.uint16)
            vb = (v.view(np.uint32) >> 16).astype(np.uint16)
            s.append(i, 0, kb, vb)
            s.wait_indexed(i)
        q = rng.standard_normal((batch, qh, d)).astype(np.float32)
        out = np.empty_like(q)
        loop_s, batch_s = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for r, i in enumerate(ids):
                s.attend(i, 0, q[r], out=out[r])
            loop_s.append(time.perf_counter() - t0)
            ref = out.copy()
            t0 = time.perf_counter()
            s.attend_batch(ids, 0, q, out=out)
            batch_s.append(time.perf_counter() - t0)
            if not np.array_equal(out, ref):
                raise SystemExit("attend_batch differs from attend")
        return {"kv_heads": kv_heads, "q_heads": qh, "batch": batch,
                "context": ctx, "rounds": rounds,
                "loop_ms": 1e3 * min(loop_s), "batch_ms": 1e3 * min(batch_s),
                "speedup": min(loop_s) / min(batch_s),
                "cpus": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    rng = np.random.default_rng(3)
    rows = [one(h, a.batch, a.ctx, a.rounds, rng) for h in a.kv_heads]
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    metrics = {f"attend_batch_speedup_kv{r['kv_heads']}": r["speedup"]
               for r in rows}
    with open(a.json, "w") as f:
        json.dump({"bench": "python_batch", "metrics": metrics, "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
