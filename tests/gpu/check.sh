#!/usr/bin/env bash
# tests/gpu/check.sh: on a machine with a GPU, in one go: build the GPU targets
# (kernels/cuda/build.sh), run the kernel tests, run them again under
# compute-sanitizer memcheck and racecheck, and (unless KVS_NO_BENCH=1)
# the quick benchmark. Logs go to $KVS_GPU_LOGS (or build-gpu/logs). Exit status is
# non-zero when a test or sanitizer failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${KVS_GPU_BUILD:-build-gpu}
L=${KVS_GPU_LOGS:-$B/logs}
mkdir -p "$L"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv 2>&1 | tee "$L/device.txt"
kernels/cuda/build.sh "$B" 2>&1 | tee "$L/build.log" || exit 1
fail=0
"$B/test_gpu" 2>&1 | tee "$L/test.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || [ "$rc" = 77 ] || fail=1
CS=${COMPUTE_SANITIZER:-compute-sanitizer}
for tool in memcheck racecheck; do
    extra=""
    [ "$tool" = memcheck ] && extra="--leak-check full"
    timeout ${KVS_SANITIZER_TIMEOUT:-400} "$CS" --tool "$tool" $extra \
        --error-exitcode 9 "$B/test_gpu" >"$L/$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY' "$L/$tool.log" | tr '\n' ' ')"
    [ "$rc" = 0 ] || fail=1
done
if [ -z "${KVS_NO_BENCH:-}" ]; then
    KVS_GPU_LOGS="$L" bench/gpu/run.sh --quick 2>&1 | tee "$L/bench_quick.log"
fi
exit $fail
