#!/usr/bin/env bash
# bench/gpu/step.sh: on a machine with a GPU, with binaries built elsewhere and copied (no
# rebuild): the wave tests, the 128K batch-1 step for each select variant
# (KVS_CUDA_SELECT=cluster|block, KVS_CUDA_PDL=0|1) and a baseline build
# ($KVS_GPU_BASE/bench_gpu) when given, then the full benchmark (torch SDPA
# + bench_gpu) with the fastest variant, the full test suite, and
# compute-sanitizer memcheck/racecheck on the wave tests. Every step has a
# timeout. Logs in a work folder; gpu.json, bench.log, sdpa.txt/.log,
# test_all.log and logs.tar.gz (everything) copied to $KVS_GPU_LOGS (or $B/logs) at
# the end; a summary on stdout.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${KVS_GPU_BUILD:-build-gpu}
BASE=${KVS_GPU_BASE:-}
D=${KVS_GPU_LOGS:-$B/logs}
O=$(mktemp -d /tmp/gpu-step.XXXXXX)
mkdir -p "$D"
trap 'cp "$O"/gpu.json "$O"/bench.log "$O"/sdpa.txt "$O"/sdpa.log "$O"/test_all.log "$D"/ 2>/dev/null; tar -czf "$D/logs.tar.gz" -C "$O" . 2>/dev/null' EXIT
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 90 "$B/test_gpu" wave >"$O/test_wave.log" 2>&1
echo "test_gpu wave (select=cluster): exit $? ($(grep -E '^(OK|FAILED)' "$O/test_wave.log"))"
BENCH="--ctx 131072 --batch 1 --no-offload --breakdown"
wave_ms() { grep -oE 'wave [0-9.]+ ms' "$1" | head -1 | awk '{print $2}'; }
best=""; best_ms=9
for v in cluster:0 cluster:1 block:0; do
    sel=${v%:*}; pdl=${v#*:}
    KVS_CUDA_SELECT=$sel KVS_CUDA_PDL=$pdl timeout 45 "$B/bench_gpu" $BENCH \
        >"$O/step_${sel}_$pdl.log" 2>&1
    ms=$(wave_ms "$O/step_${sel}_$pdl.log")
    echo "select=$sel pdl=$pdl: $(grep breakdown "$O/step_${sel}_$pdl.log")"
    if [ -n "$ms" ] && awk "BEGIN{exit !($ms < $best_ms)}"; then
        best=$v; best_ms=$ms
    fi
done
if [ -n "$BASE" ]; then
    timeout 45 "$BASE/bench_gpu" $BENCH >"$O/step_base.log" 2>&1
    echo "baseline build: $(grep breakdown "$O/step_base.log")"
fi
echo "fastest: $best ($best_ms ms)"
export KVS_CUDA_SELECT=${best%:*} KVS_CUDA_PDL=${best#*:}
PYTHONUNBUFFERED=1 timeout 150 python3 bench/gpu/sdpa.py >"$O/sdpa.txt" 2>"$O/sdpa.log"
echo "sdpa.py: exit $?"
timeout 240 "$B/bench_gpu" --sdpa "$O/sdpa.txt" --json "$O/gpu.json" >"$O/bench.log" 2>&1
echo "bench_gpu: exit $?"
grep -E '^ctx|^offload|copy' "$O/bench.log" | sed 's/ | /\n    /g' | grep -E '^ctx|wave|^offload|copy'
timeout 150 "$B/test_gpu" >"$O/test_all.log" 2>&1
echo "test_gpu (all, select=$KVS_CUDA_SELECT): exit $? ($(grep -E '^(OK|FAILED)' "$O/test_all.log"))"
KVS_CUDA_SELECT=block timeout 60 "$B/test_gpu" wave >"$O/test_wave_block.log" 2>&1
echo "test_gpu wave (select=block): exit $? ($(grep -E '^(OK|FAILED)' "$O/test_wave_block.log"))"
for tool in memcheck racecheck; do
    timeout 75 compute-sanitizer --tool $tool --error-exitcode 9 \
        "$B/test_gpu" wave >"$O/$tool.log" 2>&1
    echo "compute-sanitizer $tool (select=$KVS_CUDA_SELECT): exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$O/$tool.log" | tr '\n' ' ')"
done
