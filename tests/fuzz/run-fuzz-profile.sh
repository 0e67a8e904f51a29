#!/bin/sh
# run-fuzz-profile.sh [SECONDS] [extra libFuzzer args]: build
# tests/fuzz/fuzz_profile.c with engine/profile.c (the tuning-profile parser,
# which needs nothing else) with clang (libFuzzer + ASan + UBSan) outside
# the CMake tree, and fuzz it for SECONDS (default 120) from the committed
# corpus. New inputs land in build-fuzz/corpus-profile; merge the ones worth
# keeping into tests/fuzz/corpus/profile with -merge=1.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${KVS_FUZZ_DIR:-$root/build-fuzz}
secs=${1:-120}
[ $# -gt 0 ] && shift
mkdir -p "$out/corpus-profile"
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -D_GNU_SOURCE -I"$root/include" \
    "$here/fuzz_profile.c" "$root/engine/profile.c" -lm -o "$out/fuzz_profile"
exec "$out/fuzz_profile" -max_total_time="$secs" -max_len=4096 \
    -print_final_stats=1 "$@" "$out/corpus-profile" "$here/corpus/profile"
