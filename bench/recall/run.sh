#!/usr/bin/env bash
# bench/recall/run.sh BUILD_DIR OUT_JSON [--quick] [recall_bench options]:
# the `recall` benchmark, called by bench/run.sh recall.
#
# 1. builds recall_bench and kvdecode in BUILD_DIR (unless KVS_BENCH_NO_BUILD
#    is set and both exist);
# 2. makes the text: C headers of the machine (/usr/include/*.h, sorted),
#    which tinycode128 never saw (it was trained on Python and a dictionary);
# 3. dumps real post-RoPE queries/keys of every layer and head with
#    `kvdecode --dump` over the first CTX bytes (tinycode128, 32K: ~770 MB
#    in fp32, in a temporary directory removed afterwards; KVS_RECALL_DUMP=
#    FILE reuses or keeps a dump instead);
# 4. runs recall_bench at 2K, 8K and 32K (32 decode queries per head at the
#    end of each context, with the codes ablations; --quick: 2K, 2 layers,
#    16 queries, coarse sweeps: well under a minute on 2 cores), which writes
#    OUT_JSON; later options win (e.g. --contexts 32768 --no-hnsw);
# 5. full runs only: draws bench/recall/recall.png with plot.sh (gnuplot).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: bench/recall/run.sh BUILD_DIR OUT_JSON [--quick]" >&2; exit 2; }
build=$1 out=$2
shift 2
quick=0
extra=()
for a in "$@"; do
    if [ "$a" = --quick ]; then quick=1; else extra+=("$a"); fi
done
model=${KVS_RECALL_MODEL:-../shared/data/tinycode128.bin}
[ -f "$model" ] || { echo "bench/recall: model $model not found" >&2; exit 1; }

bench_bin=$build/bench/recall/recall_bench
dec_bin=$build/tools/kvdecode/kvdecode
if [ -z "${KVS_BENCH_NO_BUILD:-}" ] || [ ! -x "$bench_bin" ] || [ ! -x "$dec_bin" ]; then
    if [ ! -f "$build/CMakeCache.txt" ] || [ ! -d "$build/bench/recall" ]; then
        cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    fi
    cmake --build "$build" -j "${KVS_BENCH_JOBS:-2}" --target recall_bench kvdecode >/dev/null
fi

if [ $quick = 1 ]; then
    ctxs=2048 args=(--queries 16 --layers 2 --quick)
else
    ctxs=2048,8192,32768 args=(--queries 32 --ablations)
fi
max_ctx=${ctxs##*,}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The model reads bytes; BOS takes position 0, so max_ctx bytes are plenty.
{ find /usr/include -maxdepth 1 -name '*.h' -type f -print0 | LC_ALL=C sort -z |
      xargs -0 cat 2>/dev/null || true; } | head -c "$max_ctx" > "$tmp/text.txt"
src="C headers /usr/include/*.h (sorted, first $max_ctx bytes)"
if [ "$(wc -c < "$tmp/text.txt")" -lt "$max_ctx" ]; then
    # A machine with few headers: this project's own C sources follow.
    { cat "$tmp/text.txt"; find common engine index kernels server client -name '*.[ch]' -print0 |
          LC_ALL=C sort -z | xargs -0 cat || true; } | head -c "$max_ctx" > "$tmp/text2.txt"
    mv "$tmp/text2.txt" "$tmp/text.txt"
    src="$src + kvstore C sources"
fi

dump=${KVS_RECALL_DUMP:-$tmp/qkv.bin}
if [ ! -s "$dump" ]; then
    "$dec_bin" "$model" --text "$tmp/text.txt" --ctx "$max_ctx" --dump "$dump" \
        --quiet --threads "${KVS_BENCH_THREADS:-2}" >&2
fi

# FAISS warns on stderr that few points per IVF list were given (16 keys
# per list is the point of the comparison); keep the log short.
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} "$bench_bin" --dump "$dump" \
    --contexts "$ctxs" "${args[@]}" "${extra[@]}" \
    --input-desc "$(basename "$model"), $src" --json "$out" 2>&1 |
    grep -v '^WARNING clustering' >&2

if [ $quick = 0 ] && command -v gnuplot >/dev/null; then
    bash bench/recall/plot.sh "$out" bench/recall/recall.png >&2 || true
fi
