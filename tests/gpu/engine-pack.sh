#!/usr/bin/env bash
# tests/gpu/engine-pack.sh: build the engine's GPU tests HERE (CUDA plus our
# Debian libraries) and pack them for a machine with a GPU, which has CUDA but
# none of RocksDB/OpenBLAS/...: the binaries, their shared libraries
# (lib/), and this machine's glibc with its loader (glibc/, used only if the
# target machine's own glibc is too old) go into build-cuda/pack/ (git-ignored,
# ~20 MB compressed). Then, on a machine with a GPU, with build-cuda/pack copied along:
#   tests/gpu/engine-check.sh
# Environment: KVS_GPU_BUILD (build folder, default build-cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${KVS_GPU_BUILD:-build-cuda}
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DKVS_CUDA=ON >/dev/null
cmake --build "$B" -j"$(nproc)" --target test_engine_gpu test_gpu bench_engine_gpu
out=build-cuda/pack
rm -rf "$out"
mkdir -p "$out/pack/lib" "$out/pack/glibc"
cp "$B/tests/gpu/test_engine_gpu" "$B/tests/gpu/test_gpu" \
    "$B/bench/engine_gpu/bench_engine_gpu" "$out/pack/"
for bin in "$out"/pack/test_* "$out"/pack/bench_*; do
    ldd "$bin" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*)
        cp -L "$lib" "$out/pack/glibc/" ;;
    *) cp -L "$lib" "$out/pack/lib/" ;;
    esac
done
cp -L /lib64/ld-linux-x86-64.so.2 "$out/pack/glibc/"
tar -C "$out/pack" -cJf "$out/engine.tar.xz" .
rm -rf "$out/pack"
ls -la "$out"
