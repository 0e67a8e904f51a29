#!/usr/bin/env bash
# tests/gpu/hf-pack.sh: pack the C library (built HERE with CUDA, installed
# into a prefix: headers, libkvstore.so, libkvsclient.so), the shared
# libraries they need from this machine (RocksDB, OpenBLAS, ...) and the
# small llama2.c checkpoint into build-cuda/hfpack/ (git-ignored), for a GPU
# machine that has Python, torch and transformers but none of our Debian
# libraries. There, tests/gpu/hf-check.sh builds the extension against its
# own Python and runs python/tests/test_hf.py and test_torch.py.
# Environment: KVS_GPU_BUILD (build folder, default build-cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${KVS_GPU_BUILD:-build-cuda}
out=build-cuda/hfpack
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DKVS_CUDA=ON >/dev/null
cmake --build "$B" -j"$(nproc)" --target kvstore_shared kvsclient_shared kvstored
rm -rf "$out"
mkdir -p "$out/prefix" "$out/deps" "$out/glibc" "$out/data"
# What `cmake --install` puts under a prefix for these two libraries (it
# would also want every program built).
mkdir -p "$out/prefix/lib" "$out/prefix/include"
cp -a "$B"/lib/libkvstore.so* "$B"/lib/libkvsclient.so* "$out/prefix/lib/"
cp include/kvstore.h include/kvs_common.h client/kvs_client.h \
    "$out/prefix/include/"
# kvstored, for the transformers run through the daemon (hf_decode.py
# --kvstored).
mkdir -p "$out/prefix/bin"
cp "$B/server/kvstored" "$out/prefix/bin/"
for lib in "$out"/prefix/lib/libkvstore.so "$out"/prefix/lib/libkvsclient.so \
    "$out"/prefix/bin/kvstored; do
    ldd "$lib" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*)
        cp -L "$lib" "$out/glibc/" ;;
    libcuda.so.*|libcudart.so.*) ;; # the GPU machine's own
    *) cp -L "$lib" "$out/deps/" ;;
    esac
done
cp ../shared/data/stories260K.bin "$out/data/"
# Compressed, to travel within the device's 64 MiB.
tar -C "$out" -cJf build-cuda/hfpack.tar.xz .
rm -rf "$out"
mkdir -p "$out"
mv build-cuda/hfpack.tar.xz "$out/"
ls -la "$out"
# tinycode128 converted to transformers' layout, in bf16 (36 MB: the fp32
# checkpoint would not fit the carry beside the packs), for
# bench/python/hf_decode.py (KVS_HF_BENCH in hf-check.sh).
mkdir -p build-cuda/hfmodel
"${KVS_PYTHON:-/usr/bin/python3}" - <<'PY'
import sys
import torch
sys.path.insert(0, "python/kvstore")  # llama2c.py alone: no extension needed
from llama2c import to_transformers
cfg, sd = to_transformers("../shared/data/tinycode128.bin")
torch.save((cfg, {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}),
           "build-cuda/hfmodel/tinycode128_bf16.pt")
PY
ls -la build-cuda/hfmodel
