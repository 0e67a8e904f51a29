"""bench/python/hf_decode.py: an unmodified transformers LlamaForCausalLM
(tinycode128 converted by kvstore.llama2c.to_transformers) decoding through
kvstore (kvstore.hf, wave by default) against the same model with its own
SDPA attention, same weights, same prompt, same process.

    hf_decode.py WEIGHTS TEXT --ctx 8192 [32768 ...] --steps N --json OUT
                 [--threads T] [--device cuda] [--cuda-store DEV]
                 [--store-dtype f32|bf16] [--kvstored BINARY]

WEIGHTS: a llama2.c checkpoint, or a torch.save'd (config, state dict) pair
(tests/gpu/hf-pack.sh writes one in bf16 so that it fits a device carry;
both models load the same tensors, so the comparison is unaffected). TEXT:
bytes of real text (the model is byte-level); the prompt is BOS + its first
ctx - 1 bytes.

Per context: the SDPA model generates N greedy tokens (the reference);
then both models run the same teacher-forced decode over those tokens, one
forward per token with the KV cache, timed alike: SDPA's own, and kvstore's
(its prefill appends the prompt's keys/values to a store sequence, every
decode step's attention comes from the store). greedy_agreement is the
fraction of steps where kvstore's argmax equals the reference token.
The models run on the CPU, or on the GPU with --device cuda (both of
them: the store's keys/values are copied to the host, where it keeps
them). --cuda-store DEV opens the in-process store with cuda_device=DEV:
with the model on that GPU its queries and outputs stay there
(kvs_seq_attend_device). Its GPU path serves bf16/f16 sequences
(--store-dtype bf16; f32 by default) ranked by centroid, which is what
DEFAULT means on such a store; other calls attend on the CPU. The row says
how many attends the GPU served.
--new-tokens-cache adds an in-process run whose model keeps no K/V in its
own cache (kvstore.hf.NewTokensCache: transformers' DynamicCache
concatenates every layer's K/V at every step, which at 32K costs more than
the attention). --kvstored BINARY repeats the store run through a kvstored
started on a unix socket (in memory, deterministic), kvstore.Client as the handle: a row
with backend "kvstored".
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

import kvstore
import kvstore.hf
from kvstore.llama2c import to_transformers


def load(weights):
    if weights.endswith(".bin"):
        return to_transformers(weights)
    cfg, sd = torch.load(weights)
    return cfg, {k: v.float() for k, v in sd.items()}


def build(transformers, cfg, sd, impl):
    m = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**cfg, attn_implementation=impl))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if unexpected:
        raise SystemExit(f"unexpected weights: {unexpected[:4]}")
    return m.eval()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def teacher_forced(model, ids, gen, cache=None):
    """Prefill ids [1, P], then one forward per reference token; returns
    (argmax per step [N], prefill seconds, decode seconds). The argmax of
    each step is read back before the next (as a sampler would). cache:
    the past_key_values to start from (None: the model's own)."""
    sync(ids.device)
    t0 = time.perf_counter()
    o = model(input_ids=ids, past_key_values=cache, use_cache=True)
    picks = [int(o.logits[0, -1].argmax())]
    t1 = time.perf_counter()
    past = o.past_key_values
    for tok in gen[:-1]:
        o = model(input_ids=torch.tensor([[tok]], device=ids.device),
                  past_key_values=past, use_cache=True)
        past = o.past_key_values
        picks.append(int(o.logits[0, -1].argmax()))
    sync(ids.device)
    t2 = time.perf_counter()
    return picks, t1 - t0, t2 - t1


class Daemon:
    """kvstored on a unix socket in a temporary directory, in memory."""

    TOKEN = "hf-decode-token"

    def __init__(self, binary, threads):
        self.dir = tempfile.mkdtemp(prefix="kvs-hf-")
        self.sock = os.path.join(self.dir, "sock")
        port_file = os.path.join(self.dir, "port")
        self.log = open(os.path.join(self.dir, "log"), "wb")
        env = dict(os.environ, KVSTORED_AUTH_TOKEN=self.TOKEN)
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", "0", "--http-port", "0",
             "--port-file", port_file, "--data-dir", "",
             "--unix-socket", self.sock, "--workers", "2",
             "--engine-threads", str(threads), "--build-threads", "2",
             "--deterministic", "yes", "--log-level", "warn"],
            stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("kvstored did not start: " + open(
                    os.path.join(self.dir, "log")).read())
            time.sleep(0.02)
        self.addr = "unix:" + self.sock

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.log.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)
        return rc


def store_run(handle, kvs_model, ids, gen, dtype, new_tokens_cache=False):
    cache = kvstore.hf.NewTokensCache() if new_tokens_cache else None
    with kvstore.hf.Session(handle, kvs_model, dtype=dtype) as sess:
        got, pre, dec = teacher_forced(kvs_model, ids, gen, cache)
        try:
            st = handle.stats()
        except Exception:  # noqa: BLE001 (a client may not serve stats)
            st = {}
        return got, pre, dec, st, sess.decode_calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, nargs="+", default=[8192])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cuda-store", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--store-dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--new-tokens-cache", action="store_true",
                    help="also an in-process row whose model keeps no K/V "
                    "of its own (kvstore.hf.NewTokensCache): the store "
                    "holds the history")
    ap.add_argument("--kvstored", default=None)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    import transformers
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg, sd = load(a.weights)
    kvstore.hf.register()
    dev = torch.device(a.device)
    sdt = torch.bfloat16 if a.store_dtype == "bf16" else torch.float32
    ref_model = build(transformers, cfg, sd, "sdpa").to(dev)
    kvs_model = build(transformers, cfg, sd, "kvstore").to(dev)
    text = open(a.text, "rb").read()
    rows, metrics = [], {}
    # the models on a GPU: their own names beside the CPU run's
    pfx = "hf_" if dev.type == "cpu" else "hf_cuda_"
    for ctx in a.ctx:
        if len(text) < ctx - 1:
            print(f"ctx {ctx}: text has only {len(text)} bytes", file=sys.stderr)
            continue
        ids = torch.tensor([[1] + list(text[:ctx - 1])], device=dev)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = ref_model.generate(ids, max_new_tokens=a.steps,
                                     do_sample=False)
            gen_s = time.perf_counter() - t0
            gen = out[0, ctx:].tolist()
            own, own_pre, own_dec = teacher_forced(ref_model, ids, gen)
            opts = {} if a.cuda_store is None else {"cuda_device": a.cuda_store}
            runs = []
            with kvstore.Store(deterministic=True, **opts) as s:
                runs.append(("in-process",) +
                            store_run(s, kvs_model, ids, gen, sdt))
            if a.new_tokens_cache:
                try:
                    with kvstore.Store(deterministic=True, **opts) as s:
                        runs.append(("in-process-newtokens",) +
                                    store_run(s, kvs_model, ids, gen, sdt,
                                              new_tokens_cache=True))
                except Exception as e:  # noqa: BLE001 (reported, not fatal)
                    print(f"ctx {ctx}: NewTokensCache run failed: {e!r}",
                          file=sys.stderr)
            if a.kvstored:
                d = Daemon(a.kvstored, torch.get_num_threads())
                try:
                    with kvstore.Client(d.addr, token=Daemon.TOKEN) as c:
                        runs.append(("kvstored",) +
                                    store_run(c, kvs_model, ids, gen, sdt))
                finally:
                    d.stop()
        n = len(gen)
        own_agree = sum(int(x == y) for x, y in zip(own, gen)) / n
        tag = f"{ctx // 1024}k"
        for backend, got, kvs_pre, kvs_dec, st, calls in runs:
            agree = sum(int(x == y) for x, y in zip(got, gen)) / n
            row = {"context": ctx, "backend": backend, "steps": n,
                   "greedy_agreement": agree,
                   "sdpa_self_agreement": own_agree,
                   "tokens_per_s_store": n / kvs_dec,
                   "tokens_per_s_sdpa": n / own_dec,
                   "prefill_s_store": kvs_pre, "prefill_s_sdpa": own_pre,
                   "generate_s_sdpa": gen_s, "decode_calls": calls,
                   "store_stats": {k: st[k] for k in st
                                   if isinstance(st[k], (int, float))},
                   "threads": torch.get_num_threads(),
                   "cuda_store": a.cuda_store, "device": a.device,
                   "store_dtype": a.store_dtype,
                   "transformers": transformers.__version__,
                   "torch": torch.__version__}
            print(json.dumps({k: v for k, v in row.items()
                              if k != "store_stats"}), file=sys.stderr)
            rows.append(row)
            sfx = {"in-process": "", "kvstored": "_kvstored",
                   "in-process-newtokens": "_newtokens"}[backend]
            metrics[f"{pfx}greedy_agreement_{tag}{sfx}"] = agree
            metrics[f"{pfx}tokens_per_s_store_{tag}{sfx}"] = n / kvs_dec
        metrics[f"{pfx}tokens_per_s_sdpa_{tag}"] = n / own_dec
    with open(a.json, "w") as f:
        json.dump({"bench": "python_hf", "metrics": metrics, "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
    main()
