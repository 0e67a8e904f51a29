"""sdpa.py: torch SDPA full-attention decode at the benchmark's shapes, the
baseline of bench_gpu (same run, same device).

One decode query per query head (32 query heads, 8 KV heads, head_dim 128,
bf16), K/V of context + 256 tokens, every SDPA backend that accepts the
shape (GQA through enable_gqa, or K/V expanded to 32 heads when a backend
needs it: that copy is not timed). Timed with CUDA events, median of
`reps`, a 256 MiB write between repetitions so that L2 holds no inputs.
Prints "context batch ms backend" lines (read by bench_gpu --sdpa).

Usage: python3 sdpa.py [--quick] > sdpa.txt
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TAIL = 256
quick = "--quick" in sys.argv
ctxs = [32768] if quick else [32768, 131072, 524288]
batches = [1] if quick else [1, 8]
reps = 10 if quick else 30
flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
backends = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}",
      file=sys.stderr)


def timed(fn):
    fn()
    torch.cuda.synchronize()
    ts = []
    for r in range(reps):
        flush.fill_(r & 0xFF)
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


for ctx in ctxs:
    for b in batches:
        n = ctx + TAIL
        g = torch.Generator(device="cuda").manual_seed(ctx + b)
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16,
                        generator=g)
        k = torch.randn(b, 8, n, 128, device="cuda", dtype=torch.bfloat16,
                        generator=g)
        v = torch.randn(b, 8, n, 128, device="cuda", dtype=torch.bfloat16,
                        generator=g)
        ref = None
        for name, be in backends.items():
            for gqa in (True, False):
                try:
                    if gqa:
                        kk, vv = k, v
                    else:
                        kk = k.repeat_interleave(4, dim=1)
                        vv = v.repeat_interleave(4, dim=1)

                    def fn():
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(
                                q, kk, vv, enable_gqa=gqa)

                    out = fn()
                    if ref is None:
                        ref = out.float()
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    ms = timed(fn)
                    tag = name + ("" if gqa else "_expanded")
                    print(f"{ctx} {b} {ms:.5f} {tag}", flush=True)
                    print(f"# {ctx} {b} {tag} {ms:.4f} ms (rel diff {err:.1e})",
                          file=sys.stderr)
                    del kk, vv
                    break
                except Exception as e:  # backend refuses this shape
                    print(f"# {ctx} {b} {name} gqa={gqa}: "
                          f"{type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()
