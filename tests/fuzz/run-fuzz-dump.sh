#!/bin/sh
# run-fuzz-dump.sh [SECONDS] [extra libFuzzer args]: build
# tests/fuzz/fuzz_dump.c with clang (libFuzzer + ASan + UBSan) outside the
# CMake tree and fuzz the kvdecode --dump reader (tools/kvdecode/dump_read.c)
# for SECONDS (default 120) from the committed corpus. New inputs land in
# build-fuzz/corpus-dump.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${KVS_FUZZ_DIR:-$root/build-fuzz}
secs=${1:-120}
[ $# -gt 0 ] && shift
mkdir -p "$out/corpus-dump"
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
inc="-I$root/include -I$root/common -I$root/kernels -I$root/tools/kvdecode"
# The AVX2 kernels need their own flags, as in kernels/CMakeLists.txt.
clang -O1 -g $san $inc -mavx2 -mfma -mf16c -c "$root/kernels/kernels_avx2.c" -o "$out/kernels_avx2.o"
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $inc \
    "$here/fuzz_dump.c" "$root/tools/kvdecode/dump_read.c" \
    "$root/kernels/kernels.c" "$out/kernels_avx2.o" \
    "$root/common/error.c" -lm -lpthread -o "$out/fuzz_dump"
exec "$out/fuzz_dump" -max_total_time="$secs" -max_len=65536 \
    -print_final_stats=1 "$@" "$out/corpus-dump" "$here/corpus/dump"
