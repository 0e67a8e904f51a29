#!/usr/bin/env bash
# bench/index/run.sh BUILD OUT [--quick] [args]: the `index` benchmark, called
# by bench/run.sh index.
# 1. index_bench: wave vs full attention per layer at 32K and 128K, index
#    build rate through the engine and memory overhead (synthetic keys);
# 2. build_bench: the CPU segment build on real tinycode128 keys (a
#    `kvdecode --dump` of the first 8K bytes of the C headers, 2K with
#    --quick; KVS_INDEX_DUMP=FILE reuses one), the default (full) k-means
#    against the sample one (KVS_KMEANS=sample) in one process: keys per CPU-second
#    on one thread, quality of both. Skipped when the model is missing.
# Both land in OUT: build_bench's rows beside index_bench's, its headline
# numbers as build_* metrics.
set -euo pipefail
build=$1; out=$2; shift 2
quick=0
for a in "$@"; do [ "$a" = --quick ] && quick=1; done
"$build/bench/index/index_bench" --json "$out" "$@"

root=$(cd "$(dirname "$0")/../.." && pwd)
model=${KVS_INDEX_MODEL:-$root/../shared/data/tinycode128.bin}
[ -f "$model" ] || { echo "bench/index: $model not found, build_bench skipped" >&2; exit 0; }
ctx=8192
[ $quick = 1 ] && ctx=2048
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dump=${KVS_INDEX_DUMP:-$tmp/qkv.bin}
if [ ! -s "$dump" ]; then
    { find /usr/include -maxdepth 1 -name '*.h' -type f -print0 | LC_ALL=C sort -z |
          xargs -0 cat 2>/dev/null || true; } | head -c "$ctx" >"$tmp/text.txt"
    "$build/tools/kvdecode/kvdecode" "$model" --text "$tmp/text.txt" --ctx "$ctx" \
        --dump "$dump" --quiet --threads "${KVS_BENCH_THREADS:-2}" >&2
fi
# One BLAS thread: the rate is per core, as the engine runs one build per
# core (docs/index.md, "Threads"). Segments of the engine's default size
# (256; KVS_INDEX_SEGMENT_TOKENS to change it): with 1024, the size before
# 2026-12-07, a segment has 4x the clusters per key and k-means weighs
# 4x as much.
OPENBLAS_NUM_THREADS=1 "$build/bench/index/build_bench" --dump "$dump" \
    --segment-tokens "${KVS_INDEX_SEGMENT_TOKENS:-256}" \
    --reps "${KVS_INDEX_REPS:-3}" --json "$tmp/build.json"
python3 - "$out" "$tmp/build.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b = json.load(open(sys.argv[2]))
by = {x["kmeans"]: x for x in b["rows"]}
# The default is the full k-means; "sample" the alternative
# (KVS_KMEANS=sample), its speed and its quality relative to the default.
fast, full = by["sample"], by["full"]
r["metrics"].update({
    "build_keys_per_cpu_s": full["build_keys_per_s"],
    "build_keys_per_cpu_s_sample_kmeans": fast["build_keys_per_s"],
    "build_speedup_sample_vs_full_kmeans": round(fast["build_keys_per_s"] / full["build_keys_per_s"], 3),
    "build_keys_read_median_ratio_sample": round(fast["keys_read_median"] / full["keys_read_median"], 4),
    "build_keys_read_p90_ratio_sample": round(fast["keys_read_p90"] / full["keys_read_p90"], 4),
})
for x in b["rows"]:
    x = dict(x, bench="build", input="tinycode128 kvdecode dump",
             segment_tokens=b["segment_tokens"], cluster_tokens=b["cluster_tokens"],
             kmeans_iters=b["kmeans_iters"], keys=b["keys"])
    r["rows"].append(x)
json.dump(r, open(sys.argv[1], "w"), indent=2)
print("index build (one thread, CPU time): default (full k-means) %.0f keys/s, "
      "sample k-means %.0f keys/s (%.2fx); keys read to recall 0.95 median %.4f vs %.4f" % (
          full["build_keys_per_s"], fast["build_keys_per_s"],
          fast["build_keys_per_s"] / full["build_keys_per_s"],
          full["keys_read_median"], fast["keys_read_median"]), file=sys.stderr)
PY
