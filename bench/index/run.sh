#!/usr/bin/env bash
# bench/index/run.sh BUILD OUT [--quick] [args]: the `index` benchmark, called
# by bench/run.sh index. Wave vs full attention per layer at 32K and 128K,
# index build rate and memory overhead (bench/index/index_bench.c).
set -euo pipefail
build=$1; out=$2; shift 2
"$build/bench/index/index_bench" --json "$out" "$@"
