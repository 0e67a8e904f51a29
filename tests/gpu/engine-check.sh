#!/usr/bin/env bash
# tests/gpu/engine-check.sh [--bench]: on a machine with a GPU, run the engine's GPU
# tests packed by tests/gpu/engine-pack.sh:
# test_engine_gpu (the engine's GPU attend path against its CPU path),
# test_gpu (the kernels), compute-sanitizer memcheck on a short
# test_engine_gpu run; with --bench also bench_engine_gpu (engine_gpu.json).
# Logs go to $KVS_GPU_LOGS (or ./gpu-engine-logs). Exit status: that of the first
# failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${KVS_GPU_LOGS:-$PWD/gpu-engine-logs}
mkdir -p "$out"
work=$(mktemp -d)
tar -C "$work" -xJf build-cuda/pack/engine.tar.xz
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/device.txt" 2>&1
cat "$out/device.txt"
# Our libraries on the machine's glibc if it is new enough, else our glibc
# and loader as well.
# KVS_GPU_LIB_PATH: more folders of libraries (a pack that leaves out what
# another pack beside it carries, to fit one device call)
libs="$work/lib${KVS_GPU_LIB_PATH:+:$KVS_GPU_LIB_PATH}"
run=(env LD_LIBRARY_PATH="$libs")
if LD_LIBRARY_PATH="$libs" ldd "$work/test_engine_gpu" 2>&1 |
    grep -q "GLIBC.*not found"; then
    run=("$work/glibc/ld-linux-x86-64.so.2" --library-path "$work/glibc:$libs")
    echo "using the packed glibc"
fi
status=0
step() {
    local name=$1
    shift
    echo "== $name"
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/$name.log"
    echo "== $name: exit $rc, $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
step test_engine_gpu "${run[@]}" "$work/test_engine_gpu"
step test_gpu "${run[@]}" "$work/test_gpu"
if command -v compute-sanitizer >/dev/null; then
    step memcheck_engine env KVS_TEST_QUICK=1 compute-sanitizer --tool memcheck \
        --error-exitcode 9 "${run[@]}" "$work/test_engine_gpu"
fi
if [ "${1:-}" = --bench ]; then
    step bench_engine_gpu "${run[@]}" "$work/bench_engine_gpu" \
        --json "$out/engine_gpu.json"
fi
exit $status
