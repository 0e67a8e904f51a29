#!/bin/sh
# run-fuzz.sh [SECONDS] [extra libFuzzer args]: build tests/fuzz/fuzz_frame.c
# with clang (libFuzzer + ASan + UBSan) outside the CMake tree, so it works
# next to a gcc build, and fuzz the frame/message decoders for SECONDS
# (default 120) starting from the committed corpus. New interesting inputs
# land in build-fuzz/corpus; merge the ones worth keeping into
# tests/fuzz/corpus/frame with -merge=1.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${KVS_FUZZ_DIR:-$root/build-fuzz}
secs=${1:-120}
[ $# -gt 0 ] && shift
mkdir -p "$out/gen" "$out/corpus"
protoc-c --c_out="$out/gen" -I"$root/proto" "$root/proto/kvstore.proto"
clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/include" -I"$root/proto" -I"$out/gen" \
    "$here/fuzz_frame.c" "$root/proto/kvs_frame.c" "$out/gen/kvstore.pb-c.c" \
    "$root/common/error.c" -lprotobuf-c -o "$out/fuzz_frame"
exec "$out/fuzz_frame" -max_total_time="$secs" -max_len=4096 \
    -print_final_stats=1 "$@" "$out/corpus" "$here/corpus/frame"
