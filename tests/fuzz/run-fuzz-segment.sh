#!/bin/sh
# run-fuzz-segment.sh [SECONDS] [extra libFuzzer args]: build
# tests/fuzz/fuzz_segment.c with clang (libFuzzer + ASan + UBSan) outside the
# CMake tree and fuzz the stored-segment decoder, and the attention and
# search that run over whatever it accepts, for SECONDS (default 120) from
# the committed corpus. New inputs land in build-fuzz/corpus-segment.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${KVS_FUZZ_DIR:-$root/build-fuzz}
secs=${1:-120}
[ $# -gt 0 ] && shift
mkdir -p "$out/corpus-segment"
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
inc="-I$root/include -I$root"
# The AVX2 kernels need their own flags, as in kernels/CMakeLists.txt.
clang -O1 -g $san $inc -mavx2 -mfma -mf16c -c "$root/kernels/kernels_avx2.c" -o "$out/kernels_avx2.o"
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $inc \
    "$here/fuzz_segment.c" "$root/index/segment_io.c" "$root/index/wave.c" \
    "$root/index/segment.c" "$root/kernels/kernels.c" "$out/kernels_avx2.o" \
    "$root/common/error.c" "$root/common/crc32c.c" -lopenblas -lm -lpthread \
    -o "$out/fuzz_segment"
exec "$out/fuzz_segment" -max_total_time="$secs" -max_len=65536 \
    -print_final_stats=1 "$@" "$out/corpus-segment" "$here/corpus/segment"
