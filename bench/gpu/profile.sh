#!/usr/bin/env bash
# bench/gpu/profile.sh: on a machine with a GPU, where the wave step's time goes at
# 128K batch 1, for binaries built here or carried (no rebuild):
#   1. the wave tests (test_gpu wave), then compute-sanitizer memcheck and
#      racecheck on them (KVS_NO_SANITIZER=1 skips);
#   2. bench_gpu --ctx 131072 --batch 1 --breakdown for KVS_CUDA_PDL = 3, 1
#      and 0 (step, select alone, attend alone), and for a baseline build
#      ($KVS_GPU_BASE/bench_gpu) when given;
#   3. Nsight Compute (ncu, clocks not locked, caches flushed before each
#      kernel) on the first step's kernels, new and baseline.
# Logs in $KVS_GPU_LOGS (or $B/logs); a short table on stdout. Every step has a
# timeout so that a hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${KVS_GPU_BUILD:-build-gpu}
BASE=${KVS_GPU_BASE:-}
O=${KVS_GPU_LOGS:-$B/logs}
mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 90 "$B/test_gpu" wave >"$O/test_wave.log" 2>&1
echo "test_gpu wave: exit $? ($(grep -E '^(OK|FAILED)' "$O/test_wave.log"))"
grep -E "^wave|rel L2|FAIL|CHECK" "$O/test_wave.log" | head -40
BENCH="--ctx 131072 --batch 1 --no-offload --breakdown"
for pdl in 3 1 0; do
    KVS_CUDA_PDL=$pdl timeout 45 "$B/bench_gpu" $BENCH >"$O/bench_pdl$pdl.log" 2>&1
    echo "new PDL=$pdl (exit $?): $(grep -E 'breakdown|wave [0-9.]+ ms' "$O/bench_pdl$pdl.log" | sed 's/|/\n   /g' | grep -E 'breakdown|wave|rel L2' | tr '\n' ' ')"
done
if [ -n "$BASE" ]; then
    timeout 45 "$BASE/bench_gpu" $BENCH >"$O/bench_base.log" 2>&1
    echo "baseline (exit $?): $(grep -E 'breakdown|wave [0-9.]+ ms' "$O/bench_base.log" | sed 's/|/\n   /g' | grep -E 'breakdown|wave|rel L2' | tr '\n' ' ')"
fi
NCU="ncu --clock-control none --graph-profiling node -c 4
     -k regex:^(score_kernel|select_kernel|zone_kernel|merge_kernel)
     --section SpeedOfLight --section LaunchStats --section Occupancy
     --section WarpStateStats --section MemoryWorkloadAnalysis"
for v in new base; do
    bin=$B/bench_gpu
    [ $v = base ] && { [ -n "$BASE" ] || continue; bin=$BASE/bench_gpu; }
    KVS_CUDA_PDL=0 timeout 75 $NCU "$bin" --ctx 131072 --batch 1 --no-offload \
        >"$O/ncu_$v.txt" 2>&1
    echo "ncu $v (exit $?):"
    grep -E '^  [a-z_]+_kernel|Duration|Registers Per|Achieved Occupancy|Memory Throughput|DRAM Throughput|Grid Size|Block Size' "$O/ncu_$v.txt" | head -60
done
if [ -z "${KVS_NO_SANITIZER:-}" ]; then
    for tool in memcheck racecheck; do
        timeout ${KVS_SANITIZER_TIMEOUT:-60} compute-sanitizer --tool $tool \
            --error-exitcode 9 "$B/test_gpu" wave >"$O/$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$O/$tool.log" | tr '\n' ' ')"
    done
fi
