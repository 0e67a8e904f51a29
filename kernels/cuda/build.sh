#!/usr/bin/env bash
# kernels/cuda/build.sh [BUILD_DIR]: builds the GPU targets with nvcc and the C
# compiler alone -- no CMake project, no faiss/rocksdb/cmocka -- so that
# they build on a machine with a GPU. Outputs in BUILD_DIR (default build-gpu):
#   libkvs_cuda.a   kernels/cuda + buffer + common/error.c
#   test_gpu        every kernel vs the CPU reference (tests/gpu)
#   bench_gpu       the GPU benchmark (bench/gpu)
# Environment: NVCC (default nvcc on PATH or /usr/local/cuda/bin/nvcc),
# CC (default cc), GENCODE (default sm_90a), NVFLAGS_EXTRA (more nvcc
# flags, e.g. -DKVS_ZONE_MIN_BLOCKS=1 for a variant build).
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-build-gpu}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
CC=${CC:-cc}
GENCODE=${GENCODE:--gencode=arch=compute_90a,code=sm_90a}
INC="-Iinclude -Icommon -Ikernels/cuda -Ibuffer -Ibench/gpu"
NVFLAGS="-std=c++17 -O3 $GENCODE $INC -lineinfo -Xcompiler=-Wall,-Wextra ${NVFLAGS_EXTRA:-}"
CFLAGS="-std=c11 -O2 -g -Wall -Wextra -Werror -D_GNU_SOURCE $INC -I$CUDA_HOME/include"
mkdir -p "$B/obj"

cu_srcs=(kernels/cuda/score.cu kernels/cuda/attend.cu kernels/cuda/full.cu
         kernels/cuda/wave.cu kernels/cuda/kmeans.cu buffer/fill.cu
         bench/gpu/synth.cu)
c_srcs=(common/error.c kernels/cuda/cluster.c buffer/wave_buffer.c
        tests/gpu/test_gpu.c bench/gpu/bench_gpu.c)

# Rebuild an object only when its source or any header is newer.
newest_hdr=$(ls -t include/*.h kernels/cuda/*.h kernels/cuda/*.cuh buffer/*.h \
             buffer/*.cuh bench/gpu/*.cuh | head -1)
pids=()
for s in "${cu_srcs[@]}" "${c_srcs[@]}"; do
    o="$B/obj/$(echo "$s" | tr / _).o"
    if [ -f "$o" ] && [ "$o" -nt "$s" ] && [ "$o" -nt "$newest_hdr" ]; then
        continue
    fi
    case "$s" in
    *.cu) "$NVCC" $NVFLAGS -c "$s" -o "$o" & ;;
    *.c) "$CC" $CFLAGS -c "$s" -o "$o" & ;;
    esac
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

objs() { for s in "$@"; do echo "$B/obj/$(echo "$s" | tr / _).o"; done; }
rm -f "$B/libkvs_cuda.a"
ar rcs "$B/libkvs_cuda.a" $(objs kernels/cuda/score.cu kernels/cuda/attend.cu \
    kernels/cuda/full.cu kernels/cuda/wave.cu kernels/cuda/kmeans.cu \
    kernels/cuda/cluster.c buffer/fill.cu buffer/wave_buffer.c common/error.c)
"$NVCC" $GENCODE -o "$B/test_gpu" $(objs tests/gpu/test_gpu.c) \
    "$B/libkvs_cuda.a" -lm
"$NVCC" $GENCODE -o "$B/bench_gpu" $(objs bench/gpu/bench_gpu.c \
    bench/gpu/synth.cu) "$B/libkvs_cuda.a" -lm
echo "gpu-build: $B/test_gpu $B/bench_gpu"
