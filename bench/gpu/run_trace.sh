#!/usr/bin/env bash
# bench/gpu/run_trace.sh [--quick]: the GPU benchmark on a real tinycode128
# decode trace (issue 7), on a machine with a GPU.
#   1. bench/gpu/trace.py runs the model over the Python standard library's
#      sources (1,048,576 + 256 tokens, then 300 teacher-forced decode
#      steps; --quick: 131,072 + 256 and 40) and writes K/V of 8 (layer,
#      KV head) pairs and the decode queries to $KVS_TRACE_DIR (default
#      /tmp/kvs_trace: ~4.3 GB, never the log folder). Skipped when that folder
#      already has meta.json and KVS_TRACE_REUSE=1.
#   2. bench_gpu --trace DIR: KV on the GPU at 32K / 128K / whole trace,
#      then the whole trace offloaded with LRU and clock.
# The model: $KVS_TRACE_MODEL (default build-cuda/trace/tinycode128.half), the
# compact file of `python3 bench/torch_ref.py --make-half
# ../shared/data/tinycode128.bin build-cuda/trace/tinycode128.half /tmp/r.bin
# --rope-positions 4096` (37.8 MB: it travels; positions past the table
# get fp64 angles, the same values to 3e-8).
# Binaries: $KVS_GPU_BUILD/bench_gpu (default build-gpu), built with
# kernels/cuda/build.sh unless KVS_BENCH_NO_BUILD=1.
# Writes gpu_trace.json (BENCH.md format, the trace's meta.json under
# "trace") to $KVS_GPU_LOGS when set, and to bench/results/; logs beside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
quick=""
for a in "$@"; do [ "$a" = --quick ] && quick="--quick"; done
B=${KVS_GPU_BUILD:-build-gpu}
[ -n "${KVS_BENCH_NO_BUILD:-}" ] || kernels/cuda/build.sh "$B" >/dev/null
model=${KVS_TRACE_MODEL:-build-cuda/trace/tinycode128.half}
dir=${KVS_TRACE_DIR:-/tmp/kvs_trace}
dest=${KVS_GPU_LOGS:-bench/results}
mkdir -p "$dest" bench/results
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "SKIP: no CUDA device"
    exit 0
fi
export PYTHONUNBUFFERED=1
if [ -z "${KVS_TRACE_REUSE:-}" ] || [ ! -f "$dir/meta.json" ]; then
    if [ -n "$quick" ]; then
        targs="--tokens 131328 --steps 40 --contexts 32768"
    else
        targs="--tokens 1048832 --steps 300 --contexts 32768,131072"
    fi
    python3 bench/gpu/trace.py "$model" "$dir" $targs --check 2>&1 |
        tee "$dest/trace.log"
fi
json="$dest/gpu_trace.json"
"$B/bench_gpu" --trace "$dir" $quick --json "$json" 2>&1 |
    tee "$dest/bench_trace.log"
python3 - "$json" "$dir/meta.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["trace"] = json.load(open(sys.argv[2]))
json.dump(r, open(sys.argv[1], "w"), indent=2)
EOF
[ "$dest" = bench/results ] || cp "$json" bench/results/gpu_trace.json
echo "gpu_trace.json: $json"
