"""Per-call overhead of the binding: the same attend calls (full mode, one
sequence of 32 q heads x 128 over TOKENS keys, out= given) from Python and
from C (overhead.c, built against the same library), three times each,
interleaved; prints the fastest round of each and their difference in us
per call. Fastest, not median: the call itself (~40 us) moves by several
us between processes on a shared machine, more than the overhead measured
(medians of single runs gave -2.5 to +4 us in one minute).

Usage: python overhead.py OVERHEAD_C_BINARY [TOKENS] [ITERS] [--json OUT]
"""
import json
import subprocess
import sys
import time

import numpy as np

import kvstore


def main():
    args = sys.argv[1:]
    out_json = None
    if "--json" in args:
        i = args.index("--json")
        out_json = args[i + 1]
        del args[i:i + 2]
    cbin = args[0]
    tokens = int(args[1]) if len(args) > 1 else 64
    iters = int(args[2]) if len(args) > 2 else 20000
    rng = np.random.default_rng(15)
    py_rounds, c_runs = [], []
    with kvstore.Store(n_threads=1) as s:
        s.create(1, layers=1, q_heads=32, kv_heads=8, head_dim=128)
        k = (rng.random((tokens, 8, 128), np.float32) - 0.5)
        s.append(1, 0, k, k)
        q = (rng.random((32, 128), np.float32) - 0.5)
        out = np.empty((32, 128), np.float32)
        for _ in range(3):
            c_runs.append(float(subprocess.run(
                [cbin, str(tokens), str(iters)], check=True,
                capture_output=True, text=True).stdout))
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(iters):
                    s.attend(1, 0, q, mode="full", out=out)
                py_rounds.append((time.perf_counter() - t0) / iters * 1e6)
    py, c = min(py_rounds), min(c_runs)
    print(f"tokens {tokens}: python {py:.2f} us/call, C {c:.2f} us/call, "
          f"binding overhead {py - c:.2f} us/call")
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"tokens": tokens, "iters": iters, "python_us": py,
                       "c_us": c, "overhead_us": py - c,
                       "python_rounds_us": py_rounds, "c_runs_us": c_runs},
                      f)


if __name__ == "__main__":
    main()
