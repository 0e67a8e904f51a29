#!/usr/bin/env bash
# bench/gpu/run.sh: the GPU benchmark. Two ways in:
#   bench/gpu/run.sh [--quick]               standalone (on a machine with a GPU)
#   bench/run.sh gpu [--quick]               via bench/run.sh, which calls
#       bench/gpu/run.sh BUILD TMP_JSON [--quick]; on a machine with a GPU set
#       KVS_BENCH_NO_BUILD=1 (the full CMake build needs faiss/rocksdb).
# Builds the GPU targets with kernels/cuda/build.sh (nvcc only), times torch
# SDPA (sdpa.py) and then bench_gpu on this machine's GPU in the same run,
# and writes gpu.json in the ../shared/BENCH.md format: to TMP_JSON when
# called by bench/run.sh, else to $KVS_GPU_LOGS (when set) and bench/results/.
# Without a GPU it prints "SKIP: no CUDA device" (empty metrics) and exits 0.
# The same benchmark on a real tinycode128 decode trace: bench/gpu/run_trace.sh
# (gpu_trace.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
json=""
if [ $# -ge 2 ] && [ "${1#--}" = "$1" ]; then
    json=$2
    shift 2
fi
quick=""
for a in "$@"; do [ "$a" = --quick ] && quick="--quick"; done
B=${KVS_GPU_BUILD:-build-gpu}
kernels/cuda/build.sh "$B" >/dev/null
dest=${KVS_GPU_LOGS:-bench/results}
mkdir -p "$dest" bench/results
[ -n "$json" ] || json="$dest/gpu.json"
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "SKIP: no CUDA device"
    echo '{"bench": "gpu", "metrics": {}, "rows": []}' >"$json"
    exit 0
fi
sdpa="$dest/sdpa.txt"
python3 bench/gpu/sdpa.py $quick >"$sdpa" 2>"$dest/sdpa.log" ||
    echo "sdpa.py failed (see $dest/sdpa.log)"
cat "$dest/sdpa.log"
"$B/bench_gpu" $quick --sdpa "$sdpa" --json "$json"
if [ "$json" = "$dest/gpu.json" ] && [ "$dest" != bench/results ]; then
    cp "$json" bench/results/gpu.json
fi
echo "gpu.json: $json"
