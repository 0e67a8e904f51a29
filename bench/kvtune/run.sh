#!/usr/bin/env bash
# bench/kvtune/run.sh BUILD_DIR OUT_JSON [--quick] [kvtune options]: the
# `kvtune` benchmark, called by bench/run.sh kvtune (docs/kvtune.md).
#
# 1. builds kvtune and kvdecode in BUILD_DIR (unless KVS_BENCH_NO_BUILD is
#    set and both exist);
# 2. dumps tinycode128's post-RoPE queries/keys/values with `kvdecode --dump`
#    over the machine's C headers (as bench/recall does): 32K tokens, or 2K
#    with --quick; KVS_KVTUNE_DUMP=FILE reuses (or keeps) a dump instead;
# 3. runs kvtune on it, which writes the profile (bench/kvtune/kvtune.profile,
#    a temporary file with --quick), its plot and OUT_JSON. Full run: every
#    layer, 8 decode queries per head, the whole sweep (tens of minutes on
#    2 shared cores). --quick: 2 layers,
#    8 queries, the coarse sweep (well under a minute on 2 cores). Later
#    options win (e.g. --layers 2 --queries 8).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: bench/kvtune/run.sh BUILD_DIR OUT_JSON [--quick]" >&2; exit 2; }
build=$1 out=$2
shift 2
quick=0
extra=()
for a in "$@"; do
    if [ "$a" = --quick ]; then quick=1; else extra+=("$a"); fi
done
model=${KVS_KVTUNE_MODEL:-../shared/data/tinycode128.bin}
[ -f "$model" ] || { echo "bench/kvtune: model $model not found" >&2; exit 1; }

tune_bin=$build/tools/kvtune/kvtune
dec_bin=$build/tools/kvdecode/kvdecode
if [ -z "${KVS_BENCH_NO_BUILD:-}" ] || [ ! -x "$tune_bin" ] || [ ! -x "$dec_bin" ]; then
    if [ ! -f "$build/CMakeCache.txt" ] || [ ! -d "$build/tools/kvtune" ]; then
        cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    fi
    cmake --build "$build" -j "${KVS_BENCH_JOBS:-2}" --target kvtune kvdecode >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ $quick = 1 ]; then
    ctx=2048 args=(--quick --layers 2 --queries 8 --profile "$tmp/kvtune.profile" --plot none)
else
    ctx=32768 args=(--queries 8 --profile bench/kvtune/kvtune.profile
                    --plot bench/kvtune/kvtune.png)
fi

dump=${KVS_KVTUNE_DUMP:-$tmp/qkv.bin}
if [ ! -s "$dump" ]; then
    { find /usr/include -maxdepth 1 -name '*.h' -type f -print0 | LC_ALL=C sort -z |
          xargs -0 cat 2>/dev/null || true; } | head -c "$ctx" > "$tmp/text.txt"
    "$dec_bin" "$model" --text "$tmp/text.txt" --ctx "$ctx" --dump "$dump" \
        --quiet --threads "${KVS_BENCH_THREADS:-2}" >&2
fi

"$tune_bin" --dump "$dump" "${args[@]}" "${extra[@]}" --json "$out" >&2
