#!/usr/bin/env bash
# tests/gpu/hf-check.sh: on the GPU machine, with build-cuda/hfpack carried
# (tests/gpu/hf-pack.sh): build kvstore._kvstore against this machine's
# Python with gcc, then run the transformers adapter's tests
# (python/tests/test_hf.py, test_torch.py) on it. Logs to $KVS_GPU_LOGS.
# With KVS_HF_BENCH="8192 32768" (contexts) it then runs
# bench/python/hf_decode.py on tinycode128 (build-cuda/hfmodel, written by
# hf-pack.sh) into $KVS_GPU_LOGS/python_hf.json; KVS_HF_STEPS sets the decode
# steps (default 500), KVS_HF_SKIP_TESTS=1 skips the tests. KVS_HF_BENCH_CUDA
# (contexts) runs it again with the models on the GPU and the in-process
# store on its GPU path, into $KVS_GPU_LOGS/python_hf_cuda.json.
# KVS_HF_NEWTOKENS=1 adds the CPU run's --new-tokens-cache row.
set -uo pipefail
cd "$(dirname "$0")/../.."
pack=$(mktemp -d)
tar -C "$pack" -xJf build-cuda/hfpack/hfpack.tar.xz
out=${KVS_GPU_LOGS:-$PWD/gpu-hf-logs}
mkdir -p "$out"
py=${PYTHON:-python3}
"$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee "$out/python.txt"
"$py" -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tee -a "$out/python.txt"
ldd --version | head -1 | tee -a "$out/python.txt"
lib=$pack/prefix/lib
ext=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
pkg=$(mktemp -d)/kvstore
mkdir -p "$pkg"
cp python/kvstore/*.py python/kvstore/*.pyi "$pkg/"
gcc -O2 -fPIC -shared -std=c11 -I"$inc" -I"$pack/prefix/include" \
    -DKVS_PY_VERSION='"gpu-check"' -DKVS_PY_HAVE_CUDA=1 \
    python/src/_kvstore.c python/src/arrays.c -L"$lib" -lkvstore -lkvsclient \
    -Wl,-rpath,"$lib:$pack/deps" -o "$pkg/_kvstore$ext" 2>&1 | tail -20
export LD_LIBRARY_PATH="$lib:$pack/deps${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH=$(dirname "$pkg") KVS_SHARED_DATA=$pack/data
# the daemon some tests start (CTest sets it on the build machine)
export KVS_KVSTORED=$pack/prefix/bin/kvstored
"$py" -m kvstore 2>&1 | tee -a "$out/python.txt"
rc=0
if [ -z "${KVS_HF_SKIP_TESTS:-}" ]; then
    "$py" -m pytest -x -q python/tests/test_hf.py python/tests/test_torch.py \
        -k "not tinycode" 2>&1 | tee "$out/pytest.log" | tail -30
    rc=${PIPESTATUS[0]}
fi
if [ -n "${KVS_HF_BENCH:-}${KVS_HF_BENCH_CUDA:-}" ]; then
    # The prompt of both benchmarks: this Python's standard library sources
    # in name order (real code, which the byte-level model was trained on).
    "$py" - "$out/text.txt" <<'PY'
import glob, os, sys, sysconfig
out = bytearray()
for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
    out += open(p, "rb").read()
    if len(out) > 40000:
        break
open(sys.argv[1], "wb").write(bytes(out))
PY
fi
if [ -n "${KVS_HF_BENCH:-}" ]; then
    # shellcheck disable=SC2086
    "$py" bench/python/hf_decode.py build-cuda/hfmodel/tinycode128_bf16.pt \
        "$out/text.txt" --ctx $KVS_HF_BENCH --steps "${KVS_HF_STEPS:-500}" \
        --kvstored "$pack/prefix/bin/kvstored" ${KVS_HF_NEWTOKENS:+--new-tokens-cache} \
        --json "$out/python_hf.json" 2>&1 | tee "$out/hf_decode.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ -n "${KVS_HF_BENCH_CUDA:-}" ]; then
    # The models on the GPU; the in-process store on its GPU path (bf16
    # sequences), kvstored on the CPU as above.
    # shellcheck disable=SC2086
    "$py" bench/python/hf_decode.py build-cuda/hfmodel/tinycode128_bf16.pt \
        "$out/text.txt" --ctx $KVS_HF_BENCH_CUDA \
        --steps "${KVS_HF_STEPS:-500}" --device cuda --cuda-store 0 \
        --store-dtype bf16 --kvstored "$pack/prefix/bin/kvstored" \
        --json "$out/python_hf_cuda.json" 2>&1 |
        tee "$out/hf_decode_cuda.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit "$rc"
