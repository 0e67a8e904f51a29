#!/usr/bin/env bash
# bench/python/run.sh BUILD_DIR OUT_JSON [--quick]: the Python binding's
# benchmark, called by bench/run.sh python (docs/python.md).
#
# 1. the binding's per-call overhead: the same attend calls from Python
#    (overhead.py) and from C (bench_python_overhead), same library;
# 2. tinycode128 (../shared/data) in torch (kvstore.llama2c) decoding
#    greedily after a prompt of the machine's C headers, its attention
#    through kvstore.torch (wave) vs the model's own attention: greedy
#    agreement (teacher forcing) and decode tokens/s, at 8K and 32K (--quick:
#    2K and 50 steps);
# 3. Store.attend_batch (8 sequences, the longest context) vs a loop of
#    attend, 1 and 2 KV heads (bench/python/batch.py). The interpreter is
#    Debian's /usr/bin/python3 (its
#    python3-torch and python3-numpy); KVS_PYTHON overrides.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: bench/python/run.sh BUILD_DIR OUT_JSON [--quick]" >&2; exit 2; }
build=$1 out=$2
shift 2
quick=0
for a in "$@"; do [ "$a" = --quick ] && quick=1; done
py=${KVS_PYTHON:-/usr/bin/python3}
if [ -z "${KVS_BENCH_NO_BUILD:-}" ] || [ ! -x "$build/bench/python/bench_python_overhead" ]; then
    cmake --build "$build" -j "${KVS_BENCH_JOBS:-2}" \
        --target kvs_python bench_python_overhead >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ $quick = 1 ]; then
    ctxs=(2048) steps=50 iters=2000
else
    ctxs=(8192 32768) steps=${KVS_PY_STEPS:-500} iters=20000
fi
{ find /usr/include -maxdepth 1 -name '*.h' -type f -print0 | LC_ALL=C sort -z |
      xargs -0 cat 2>/dev/null || true; } | head -c "${ctxs[-1]}" > "$tmp/text.txt"
export PYTHONPATH=$build/python
"$py" bench/python/overhead.py "$build/bench/python/bench_python_overhead" \
    64 "$iters" --json "$tmp/overhead.json" >&2
"$py" bench/python/decode.py ../shared/data/tinycode128.bin "$tmp/text.txt" \
    --ctx "${ctxs[@]}" --steps "$steps" --json "$tmp/decode.json" >&2
"$py" bench/python/batch.py --batch 8 --ctx "${ctxs[-1]}" --kv-heads 1 2 \
    --rounds "$([ $quick = 1 ] && echo 3 || echo 10)" \
    --json "$tmp/batch.json" >&2
"$py" - "$tmp/overhead.json" "$tmp/decode.json" "$tmp/batch.json" "$out" <<'PY'
import json, sys
o, d, b = (json.load(open(p)) for p in sys.argv[1:4])
m = dict(d["metrics"])
m["binding_overhead_us_per_call"] = o["overhead_us"]
m.update(b["metrics"])
rows = [dict(o, what="attend overhead, python vs C")] + d["rows"] + \
    [dict(r, what="attend_batch vs a loop of attend") for r in b["rows"]]
json.dump({"bench": "python", "metrics": m, "rows": rows},
          open(sys.argv[4], "w"), indent=2)
PY
