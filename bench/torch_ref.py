#!/usr/bin/env python3
"""torch_ref.py: an independent PyTorch forward pass of a llama2.c checkpoint,
to prove kvdecode's logits right.

It reads the logits file that `kvdecode --logits-out` writes (tokens and the C
decoder's fp32 logits, format in bench/README.md), runs the same tokens through
the same weights in PyTorch, written from the llama2.c model.py recipe (RMSNorm
eps 1e-5, RoPE on adjacent pairs from the checkpoint's tables, grouped-query
attention, SwiGLU), once in fp32 and once in fp64, and prints the largest
absolute logit difference of the C decoder against each, plus argmax
agreement. fp64 is the closest thing to exact; fp32 is the comparison the
project's goal names (below 1e-4).

    python3 bench/torch_ref.py MODEL.bin LOGITS.bin [LOGITS2.bin ...] [--json OUT]

MODEL is a llama2.c v0 file or a compact half file (below). Positions beyond
the tables' length use angles computed in fp64, as the C decoder does.

tinycode128.bin (88 MB) is too big to carry to the GPU machine, so
`--make-half IN OUT_HALF OUT_ROUNDED [--rope-positions N]` (standard library
only, run where the checkpoint is) writes two files with the same weights
rounded to fp16: OUT_ROUNDED, a valid llama2.c file (fp32 holding the rounded
values) for kvdecode, and OUT_HALF, a compact file for this script: magic
KVSHALF1, the 7 int32 header, u32 rope positions N, fp16 weights in llama2.c
order (tables left out), then fp32 cos and sin tables of N x head_dim/2.
Both runs then use bit-identical weights and tables.
"""
import argparse
import array
import json
import math
import os
import struct
import sys

HEADER = struct.Struct("<7i")


def _sizes(dim, hid, L, H, KV, V, S):
    """Float counts of the checkpoint's tensors, in file order."""
    hd = dim // H
    kvd = KV * hd
    return [
        ("tok_emb", V * dim), ("rms_att", L * dim), ("wq", L * dim * dim),
        ("wk", L * kvd * dim), ("wv", L * kvd * dim), ("wo", L * dim * dim),
        ("rms_ffn", L * dim), ("w1", L * hid * dim), ("w2", L * dim * hid),
        ("w3", L * hid * dim), ("rms_final", dim),
        ("rope_cos", S * hd // 2), ("rope_sin", S * hd // 2),
    ]


def make_half(src, out_half, out_rounded, rope_positions):
    with open(src, "rb") as f:
        raw = f.read()
    hdr = HEADER.unpack_from(raw, 0)
    dim, hid, L, H, KV, V, S = hdr
    shared = V > 0
    sizes = _sizes(dim, hid, L, H, KV, abs(V), S)
    if not shared:
        sizes.append(("wcls", abs(V) * dim))
    floats = array.array("f")
    floats.frombytes(raw[HEADER.size:])
    if sys.byteorder != "little":
        floats.byteswap()
    assert len(floats) == sum(n for _, n in sizes), "size mismatch"
    hd = dim // H
    npos = min(rope_positions or S, S)
    off = 0
    rounded = array.array("f")
    half_w = bytearray()
    tables = {}
    for name, n in sizes:
        part = floats[off:off + n]
        off += n
        if name.startswith("rope_"):
            rounded.extend(part)
            tables[name] = part[:npos * hd // 2]
            continue
        step = 1 << 20
        for i in range(0, n, step):
            chunk = part[i:i + step]
            b = struct.pack("<%de" % len(chunk), *chunk)
            half_w += b
            rounded.extend(struct.unpack("<%de" % len(chunk), b))
    with open(out_rounded, "wb") as f:
        f.write(HEADER.pack(*hdr))
        f.write(rounded.tobytes())
    with open(out_half, "wb") as f:
        f.write(b"KVSHALF1")
        f.write(HEADER.pack(*hdr))
        f.write(struct.pack("<I", npos))
        f.write(half_w)
        f.write(tables["rope_cos"].tobytes())
        f.write(tables["rope_sin"].tobytes())
    print("wrote %s (%d bytes) and %s (%d bytes), rope positions %d"
          % (out_half, os.path.getsize(out_half), out_rounded,
             os.path.getsize(out_rounded), npos))


def load_model(path, torch):
    """Weights as fp32 torch tensors, plus the header."""
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    half = raw[:8] == b"KVSHALF1"
    base = 8 if half else 0
    dim, hid, L, H, KV, V, S = HEADER.unpack_from(raw, base)
    shared = V > 0
    V = abs(V)
    hd = dim // H
    sizes = _sizes(dim, hid, L, H, KV, V, S)
    if not shared:
        sizes.append(("wcls", V * dim))
    w = {}
    if half:
        npos = struct.unpack_from("<I", raw, base + HEADER.size)[0]
        off = base + HEADER.size + 4
        for name, n in sizes:
            if name.startswith("rope_"):
                continue
            w[name] = np.frombuffer(raw, "<f2", n, off).astype(np.float32)
            off += 2 * n
        for name in ("rope_cos", "rope_sin"):
            n = npos * hd // 2
            w[name] = np.frombuffer(raw, "<f4", n, off).copy()
            off += 4 * n
        assert off == len(raw), "half file size mismatch"
    else:
        off = HEADER.size
        for name, n in sizes:
            w[name] = np.frombuffer(raw, "<f4", n, off).copy()
            off += 4 * n
        assert off == len(raw), "checkpoint size mismatch"
        npos = S
    if shared:
        w["wcls"] = w["tok_emb"]
    kvd = KV * hd
    shapes = {
        "tok_emb": (V, dim), "rms_att": (L, dim), "wq": (L, dim, dim),
        "wk": (L, kvd, dim), "wv": (L, kvd, dim), "wo": (L, dim, dim),
        "rms_ffn": (L, dim), "w1": (L, hid, dim), "w2": (L, dim, hid),
        "w3": (L, hid, dim), "rms_final": (dim,), "wcls": (V, dim),
        "rope_cos": (npos, hd // 2), "rope_sin": (npos, hd // 2),
    }
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).reshape(shapes[k])
         for k, v in w.items()}
    cfg = dict(dim=dim, hid=hid, L=L, H=H, KV=KV, V=V, S=S, hd=hd, npos=npos)
    return cfg, t


def rope_tables(cfg, w, T, dtype, torch):
    """cos/sin [T, hd/2]: the file's tables, then fp64 angles beyond."""
    hd, npos = cfg["hd"], cfg["npos"]
    cos = w["rope_cos"][:min(T, npos)].double()
    sin = w["rope_sin"][:min(T, npos)].double()
    if T > npos:
        i = torch.arange(hd // 2, dtype=torch.float64)
        freq = 10000.0 ** (-(2 * i) / hd)
        pos = torch.arange(npos, T, dtype=torch.float64)
        ang = pos[:, None] * freq[None, :]
        # The C decoder rounds cos/sin of the fp64 angle to fp32.
        cos = torch.cat([cos, torch.cos(ang).float().double()])
        sin = torch.cat([sin, torch.sin(ang).float().double()])
    return cos.to(dtype), sin.to(dtype)


def forward(cfg, w, tokens, dtype, device, torch):
    """Logits [T, V] of the causal forward pass over `tokens`."""
    dim, H, KV, hd, L = cfg["dim"], cfg["H"], cfg["KV"], cfg["hd"], cfg["L"]
    T = len(tokens)
    g = {k: v.to(device=device, dtype=dtype) for k, v in w.items()}
    cos, sin = rope_tables(cfg, w, T, dtype, torch)
    cos, sin = cos.to(device)[:, None, :], sin.to(device)[:, None, :]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x):  # [T, heads, hd], adjacent pairs
        xr, xi = x[..., 0::2], x[..., 1::2]
        return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos],
                           dim=-1).flatten(-2)

    mask = torch.full((T, T), float("-inf"), device=device, dtype=dtype)
    mask = torch.triu(mask, diagonal=1)
    tok = torch.tensor(tokens, device=device, dtype=torch.long)
    x = g["tok_emb"][tok]
    for l in range(L):
        h = rms(x, g["rms_att"][l])
        q = rope((h @ g["wq"][l].T).view(T, H, hd))
        k = rope((h @ g["wk"][l].T).view(T, KV, hd))
        v = (h @ g["wv"][l].T).view(T, KV, hd)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        a = torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v)
        x = x + a.reshape(T, dim) @ g["wo"][l].T
        h = rms(x, g["rms_ffn"][l])
        x = x + (torch.nn.functional.silu(h @ g["w1"][l].T) *
                 (h @ g["w3"][l].T)) @ g["w2"][l].T
    return rms(x, g["rms_final"]) @ g["wcls"].T


def read_logits(path):
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != b"KVSLOGT1":
        raise SystemExit("%s: not a kvdecode logits file" % path)
    n, V = struct.unpack_from("<2I", raw, 8)
    tokens = np.frombuffer(raw, "<i4", n, 16).tolist()
    logits = np.frombuffer(raw, "<f4", n * V, 16 + 4 * n).reshape(n, V)
    return tokens, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-half", nargs=3,
                    metavar=("IN", "OUT_HALF", "OUT_ROUNDED"))
    ap.add_argument("--rope-positions", type=int, default=0)
    ap.add_argument("model", nargs="?")
    ap.add_argument("logits", nargs="*")
    ap.add_argument("--json", help="append one JSON line per logits file")
    ap.add_argument("--device", default=None, help="cpu or cuda")
    args = ap.parse_args()
    if args.make_half:
        make_half(*args.make_half, args.rope_positions)
        return
    if not args.model or not args.logits:
        ap.error("MODEL and LOGITS are required")
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    cfg, w = load_model(args.model, torch)
    devices = [args.device] if args.device else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for path in args.logits:
        tokens, ours = read_logits(path)
        ours = torch.from_numpy(ours.copy()).double()
        row = {"model": os.path.basename(args.model),
               "logits": os.path.basename(path), "tokens": len(tokens),
               "max_abs_logit": float(ours.abs().max())}
        for dev in devices:
            name = {"cpu": "torch_cpu", "cuda": "torch_cuda"}[dev]
            if dev == "cuda":
                row["device"] = torch.cuda.get_device_name(0)
            refs = {}
            for dt, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
                with torch.no_grad():
                    ref = forward(cfg, w, tokens, dt, dev, torch).double().cpu()
                refs[tag] = ref
                d = (ref - ours).abs()
                row["%s_%s_max_abs_diff" % (name, tag)] = float(d.max())
                row["%s_%s_argmax_agree" % (name, tag)] = float(
                    (ref.argmax(-1) == ours.argmax(-1)).double().mean())
            # How far fp32 PyTorch itself is from fp64: the noise floor.
            row["%s_fp32_vs_fp64_max_abs_diff" % name] = float(
                (refs["fp32"] - refs["fp64"]).abs().max())
        print(json.dumps(row))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
