#!/usr/bin/env bash
# bench/engine_gpu/run.sh BUILD OUT [--quick] [args]: the `engine_gpu`
# benchmark, called by bench/run.sh engine_gpu: kvs_seq_attend on the GPU
# path vs the CPU path in one process (needs a CUDA build and a GPU; where
# a CUDA build cannot be made, tests/gpu/pack.sh packs the binary).
set -euo pipefail
build=$1; out=$2; shift 2
"$build/bench/engine_gpu/bench_engine_gpu" --json "$out" "$@"
