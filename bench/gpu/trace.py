#!/usr/bin/env python3
"""trace.py: a real decode trace of tinycode128 for the GPU benchmark
(`bench_gpu --trace DIR`).

Runs the model on the GPU over real text -- the .py sources of this
Python's standard library (the model was trained on the 3.11 standard
library), sorted by path, concatenated, bytes = token ids, BOS (1) first --
and keeps, for PAIRS = (layer, KV head) pairs of the chosen layers:

  k.bin     post-RoPE keys  [pairs][N][128] bf16, positions 0 .. N-1
  v.bin     values          [pairs][N][128] bf16
  q_trace.bin post-RoPE decode queries [S][pairs][2][128] fp32 at
            positions N .. N+S-1 (the trace proper: context N)
  q_CTX.bin the same at positions CTX+256 .. CTX+256+S-1 for each prefix
            context CTX (32768, 131072): queries of a decode step at that
            context, for the KV-on-GPU part over prefixes of k/v
  meta.json what was run, timings, bits per byte at the decode positions

Decode is teacher-forced: step s feeds the text's next byte, so its query
is the decoder's query at that position over the real text. That is
exactly what one causal forward pass over the N + S tokens computes, so
the "prefill" and the "decode steps" are one pass: per layer one SDPA call
over the whole sequence (flash backend, bf16 Q/K/V, causal; flash tiles
the sequence, nothing quadratic is held), projections and FFN in row
chunks in fp32. Positions past the model's 32768 extrapolate RoPE (angles
in fp64 beyond the file's table, as bench/torch_ref.py and the C decoder
do): queries and keys there are real vectors of the real weights, but the
model was never trained at those distances. Layers after the last kept
layer are run only with --bpb (default on) to score the next byte.

File format (little-endian): a 64-byte header -- magic "KVSTRAC1",
u32 dtype (kvs_dtype_t: 0 fp32, 1 fp16, 2 bf16), u32 ndim, u64 dims[6]
(unused dims 0) -- then the array, row-major, no padding. Query rows:
pair p = (layers[p // n_kv], KV head p % n_kv), query head i of the pair
is the model's query head kv * group + i (query head h reads KV head
h // group, as in torch_ref.py).

Usage: python3 bench/gpu/trace.py MODEL.half OUTDIR [--tokens N]
       [--steps S] [--layers 1,2,3,4] [--contexts 32768,131072]
       [--text-dir DIR] [--device cuda] [--check]
MODEL is the compact half file of `torch_ref.py --make-half`. --check
compares this chunked forward with torch_ref.forward on the first 1024
tokens (fp32) before the run.
"""
import argparse
import json
import math
import os
import struct
import sys
import sysconfig
import time

# bench/ instead of this script's folder: torch_ref importable, and this
# file does not shadow the standard library's `trace` module.
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
import torch_ref  # noqa: E402  (the loader and the reference forward)

MAGIC = b"KVSTRAC1"
DT_F32, DT_F16, DT_BF16 = 0, 1, 2
BOS = 1
CHUNK = 65536  # rows per projection/FFN chunk


def header(dtype, dims):
    """The 64-byte header of a trace file."""
    assert len(dims) <= 6
    d = list(dims) + [0] * (6 - len(dims))
    return MAGIC + struct.pack("<II6Q", dtype, len(dims), *d)


def read_header(raw):
    if raw[:8] != MAGIC:
        raise ValueError("not a KVSTRAC1 file")
    dtype, ndim = struct.unpack_from("<II", raw, 8)
    dims = struct.unpack_from("<6Q", raw, 16)[:ndim]
    return dtype, list(dims)


def stdlib_files(text_dir=None):
    """Sorted .py files of the standard library (site-packages left out)."""
    root = text_dir or sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs
                         if x not in ("site-packages", "dist-packages",
                                      "__pycache__"))
        out.extend(os.path.join(d, f) for f in files if f.endswith(".py"))
    return root, sorted(out, key=lambda p: os.path.relpath(p, root))


def token_stream(n, text_dir=None):
    """BOS then the bytes of the stdlib sources, n tokens (list of bytes)."""
    root, files = stdlib_files(text_dir)
    buf = bytearray([BOS])
    used = 0
    for p in files:
        if len(buf) >= n:
            break
        with open(p, "rb") as f:
            buf += f.read()
        used += 1
    if len(buf) < n:
        raise SystemExit("only %d bytes of text under %s, %d needed"
                         % (len(buf), root, n))
    return bytes(buf[:n]), dict(text_root=root, files_used=used,
                                files_total=len(files),
                                first_file=os.path.relpath(files[0], root))


def chunked_forward(cfg, w, tokens, keep, q_pos, bpb_pos, run_all, dev, torch,
                    on_kv, log):
    """One causal pass over `tokens`. For each layer in `keep` calls
    on_kv(layer, k, v) with k, v [KV][T][hd] bf16 (post-RoPE k) and collects
    fp32 post-RoPE queries at positions q_pos (LongTensor) -> [len][H][hd].
    With run_all, the remaining layers run too and the next-byte negative
    log-likelihood (nats) at bpb_pos is returned."""
    import torch.nn.functional as F
    dim, H, KV, hd, L = cfg["dim"], cfg["H"], cfg["KV"], cfg["hd"], cfg["L"]
    T = len(tokens)
    grp = H // KV
    last = L - 1 if run_all else max(keep)
    g = {k: v.to(dev, torch.float32) for k, v in w.items()
         if not k.startswith("rope_")}
    cos, sin = torch_ref.rope_tables(cfg, w, T, torch.float32, torch)
    cos, sin = cos.to(dev), sin.to(dev)
    tok = torch.frombuffer(bytearray(tokens), dtype=torch.uint8).to(dev).long()
    x = g["tok_emb"][tok]  # [T, dim] fp32 residual stream
    q_out = {}

    def rms(a, weight):
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(a, c, s):  # [n, heads, hd], adjacent pairs, as torch_ref
        c, s = c[:, None, :], s[:, None, :]
        ar, ai = a[..., 0::2], a[..., 1::2]
        return torch.stack([ar * c - ai * s, ar * s + ai * c],
                           dim=-1).flatten(-2)

    for l in range(last + 1):
        t0 = time.time()
        q = torch.empty(H, T, hd, device=dev, dtype=torch.bfloat16)
        k = torch.empty(KV, T, hd, device=dev, dtype=torch.bfloat16)
        v = torch.empty(KV, T, hd, device=dev, dtype=torch.bfloat16)
        qk = []
        for a in range(0, T, CHUNK):
            b = min(T, a + CHUNK)
            h = rms(x[a:b], g["rms_att"][l])
            qa = rope((h @ g["wq"][l].T).view(b - a, H, hd), cos[a:b], sin[a:b])
            ka = rope((h @ g["wk"][l].T).view(b - a, KV, hd), cos[a:b],
                      sin[a:b])
            va = (h @ g["wv"][l].T).view(b - a, KV, hd)
            q[:, a:b] = qa.transpose(0, 1)
            k[:, a:b] = ka.transpose(0, 1)
            v[:, a:b] = va.transpose(0, 1)
            if l in keep:
                sel = q_pos[(q_pos >= a) & (q_pos < b)]
                if len(sel):
                    qk.append(qa[sel - a])
        if l in keep:
            q_out[l] = torch.cat(qk).cpu()
            on_kv(l, k, v)
        t1 = time.time()
        ke = k.repeat_interleave(grp, dim=0)[None]
        ve = v.repeat_interleave(grp, dim=0)[None]
        o = attend(q[None], ke, ve, torch, F)[0]  # [H, T, hd]
        del ke, ve, q, k, v
        torch.cuda.synchronize() if dev.startswith("cuda") else None
        t2 = time.time()
        for a in range(0, T, CHUNK):
            b = min(T, a + CHUNK)
            x[a:b] += (o[:, a:b].transpose(0, 1).reshape(b - a, dim).float()
                       @ g["wo"][l].T)
            h = rms(x[a:b], g["rms_ffn"][l])
            x[a:b] += (F.silu(h @ g["w1"][l].T) * (h @ g["w3"][l].T)) \
                @ g["w2"][l].T
        del o
        torch.cuda.synchronize() if dev.startswith("cuda") else None
        log("layer %d: qkv %.2f s, attention %.2f s, out+ffn %.2f s"
            % (l, t1 - t0, t2 - t1, time.time() - t2))
    nll = None
    if run_all:
        logits = rms(x[bpb_pos], g["rms_final"]) @ g["wcls"].T
        nll = F.cross_entropy(logits, tok[bpb_pos + 1],
                              reduction="none").cpu()
    return q_out, nll


_backend = []


def attend(q, k, v, torch, F):
    """Causal attention [1, H, T, hd] bf16 -> same; flash when it takes it."""
    if not hasattr(F, "scaled_dot_product_attention"):  # old torch: small T
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        T = q.shape[2]
        s = s + torch.full((T, T), float("-inf"), device=q.device).triu(1)
        return (torch.softmax(s, -1) @ v.float()).to(q.dtype)
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        if _backend and _backend[0] != name:
            continue
        try:
            with sdpa_kernel(be):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if not _backend:
                _backend.append(name)
            return out
        except RuntimeError as e:
            print("# SDPA %s refused: %s" % (name, str(e)[:160]),
                  file=sys.stderr)
    raise SystemExit("no SDPA backend took the causal shape")


def write_array(path, dtype, dims, t, torch):
    """Header + tensor bytes (bf16 written through an int16 view)."""
    with open(path, "wb") as f:
        f.write(header(dtype, dims))
        if t is not None:
            arr = t.contiguous().cpu()
            if arr.dtype == torch.bfloat16:
                arr = arr.view(torch.int16)
            f.write(arr.numpy().tobytes())


def check(cfg, w, tokens, dev, torch, log):
    """This forward's bytes-to-logits against torch_ref.forward (fp32)."""
    n = min(1024, len(tokens))
    pos = torch.arange(0, n - 1)
    _, nll = chunked_forward(cfg, w, tokens[:n], [0], pos.to(dev), pos.to(dev),
                             True, dev, torch, lambda *a: None, lambda s: None)
    with torch.no_grad():
        ref = torch_ref.forward(cfg, w, list(tokens[:n]), torch.float32, dev,
                                torch).float()
    import torch.nn.functional as F
    tgt = torch.tensor(list(tokens[1:n]), device=dev)
    ref_nll = F.cross_entropy(ref[:n - 1], tgt, reduction="none").cpu()
    d = (nll - ref_nll).abs().max().item()
    log("check vs torch_ref.forward over %d tokens: bpb %.4f (ref %.4f), "
        "max |nll diff| %.4f nats (bf16 attention)"
        % (n, nll.mean().item() / math.log(2),
           ref_nll.mean().item() / math.log(2), d))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("outdir")
    ap.add_argument("--tokens", type=int, default=1048576 + 256,
                    help="context N (BOS included)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", default="1,2,3,4")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--text-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-bpb", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.time()

    def log(s):
        print("[%7.1f s] %s" % (time.time() - t_start, s), flush=True)

    N, S = args.tokens, args.steps
    layers = [int(x) for x in args.layers.split(",")]
    ctxs = [int(x) for x in args.contexts.split(",") if x]
    T = N + S
    tokens, text = token_stream(T + 1, args.text_dir)  # +1: last target
    log("text: %d bytes from %d of %d .py files under %s (python %s)"
        % (T + 1, text["files_used"], text["files_total"], text["text_root"],
           sys.version.split()[0]))
    cfg, w = torch_ref.load_model(args.model, torch)
    KV, H, hd = cfg["KV"], cfg["H"], cfg["hd"]
    grp = H // KV
    assert hd == 128 and max(layers) < cfg["L"]
    log("model: dim %d, %d layers, %d query / %d KV heads, head_dim %d, "
        "trained seq_len %d" % (cfg["dim"], cfg["L"], H, KV, hd, cfg["S"]))
    if T > cfg["S"]:
        log("positions %d .. %d are past the trained %d: RoPE extrapolated"
            % (cfg["S"], T - 1, cfg["S"]))
    check_diff = check(cfg, w, tokens, dev, torch, log) if args.check else None

    ranges = {"trace": (N, S)}
    for c in ctxs:
        assert c + 256 + S <= N, "prefix context too long for the trace"
        ranges[str(c)] = (c + 256, S)
    q_pos = torch.cat([torch.arange(a, a + n) for a, n in ranges.values()])
    q_pos = torch.unique(q_pos)  # sorted
    os.makedirs(args.outdir, exist_ok=True)
    P = len(layers) * KV
    kf = open(os.path.join(args.outdir, "k.bin"), "wb")
    vf = open(os.path.join(args.outdir, "v.bin"), "wb")
    kf.write(header(DT_BF16, [P, N, hd]))
    vf.write(header(DT_BF16, [P, N, hd]))
    t_write = [0.0]

    def on_kv(l, k, v):
        t0 = time.time()
        for f, a in ((kf, k), (vf, v)):
            a[:, :N].contiguous().view(torch.int16).cpu().numpy().tofile(f)
        t_write[0] += time.time() - t0

    t0 = time.time()
    with torch.no_grad():
        q_out, nll = chunked_forward(
            cfg, w, tokens, layers, q_pos.to(dev), q_pos.to(dev),
            not args.no_bpb, dev, torch, on_kv, log)
    kf.close()
    vf.close()
    t_fwd = time.time() - t0
    log("forward over %d tokens: %.1f s (%.1f s of it writing K/V), SDPA "
        "backend %s" % (len(tokens), t_fwd, t_write[0],
                        _backend[0] if _backend else "-"))
    bpb = {}
    index = {int(p): i for i, p in enumerate(q_pos.tolist())}
    for name, (a, n) in ranges.items():
        rows = [index[p] for p in range(a, a + n)]
        # [S][pairs][group][hd]: pair (layer, kv), query head kv * grp + i
        qs = torch.stack([q_out[l][rows] for l in layers], dim=1)
        qs = qs.view(n, len(layers), KV, grp, hd).reshape(n, P, grp, hd)
        write_array(os.path.join(args.outdir, "q_%s.bin" % name), DT_F32,
                    [n, P, grp, hd], qs.float(), torch)
        if nll is not None:
            bpb[name] = nll[rows].mean().item() / math.log(2)
            log("queries %s: positions %d .. %d, next-byte bpb %.3f"
                % (name, a, a + n - 1, bpb[name]))
    meta = dict(
        model=os.path.basename(args.model), tokens=N, steps=S,
        layers=layers, kv_heads=KV, group=grp, head_dim=hd, pairs=P,
        pair_order="layer-major: pair = layer_index * kv_heads + kv_head",
        decode="teacher-forced (next byte of the text; one causal pass)",
        rope="positions >= %d extrapolated (fp64 angles)" % cfg["S"],
        python=sys.version.split()[0], device=torch.cuda.get_device_name(0)
        if dev.startswith("cuda") else dev,
        sdpa_backend=_backend[0] if _backend else "-",
        query_ranges={k: [a, n] for k, (a, n) in ranges.items()},
        bpb=bpb, forward_s=t_fwd, write_s=t_write[0],
        check_max_nll_diff=check_diff, **text)
    with open(os.path.join(args.outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log("wrote %s (k/v %.2f GB)" % (args.outdir, 2 * P * N * hd * 2 / 1e9))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
