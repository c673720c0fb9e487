#!/usr/bin/env bash
# Installs a CUDA compiler and libraries from NVIDIA's PyPI wheels into a folder, for machines
# without a system CUDA toolkit, and prints the environment that `cargo build --release
# --features cuda` (or `--features nccl`) needs. No GPU is needed to build: candle's kernels are
# compiled here and the binary is linked against cuBLAS, cuRAND, NVRTC, the CUDA runtime, NCCL
# (these wheels, also usable at run time through LD_LIBRARY_PATH) and a stub of the driver.
#
#   scripts/cuda-toolchain.sh DIR            # install (once), then print the exports
#   eval "$(scripts/cuda-toolchain.sh DIR)"  # ... into the current shell
#
# Only the CUDA 13 wheels carry `nvcc` (the -cu12 ones hold `ptxas` alone). PTX made by nvcc 13.0
# loads on drivers from 580 on. Versions are pinned; override with CUDA_WHEEL_VERSION (nvcc, crt,
# nvvm, nvrtc), CUDA_RUNTIME_WHEEL_VERSION, CCCL_WHEEL_VERSION, CUBLAS_WHEEL_VERSION,
# CURAND_WHEEL_VERSION and NCCL_WHEEL_VERSION. About 1.5 GB on disk. CUDA_COMPUTE_CAP defaults to 90
# (H100); set it to the GPU you run on (80 for A100, 89 for L40/4090, ...).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR   (installs the CUDA compiler wheels into DIR, prints the exports)" >&2
    exit 2
fi
dir=$(mkdir -p "$1" && cd "$1" && pwd)
cuda=${CUDA_WHEEL_VERSION:-13.0.88}
runtime=${CUDA_RUNTIME_WHEEL_VERSION:-13.0.96}
cccl=${CCCL_WHEEL_VERSION:-13.0.85}
nccl=${NCCL_WHEEL_VERSION:-2.28.9}
cublas=${CUBLAS_WHEEL_VERSION:-13.0.2.14}
curand=${CURAND_WHEEL_VERSION:-10.4.0.35}
py=${PYTHON:-python3}

root="$dir/nvidia/cu13"
stamp="$dir/.installed-$cuda-$runtime-$cccl-$nccl-$cublas-$curand"
if [ ! -e "$stamp" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$dir" \
        "nvidia-cuda-nvcc==$cuda" "nvidia-cuda-crt==$cuda" "nvidia-nvvm==$cuda" \
        "nvidia-cuda-runtime==$runtime" "nvidia-cuda-cccl==$cccl" \
        "nvidia-cublas==$cublas" "nvidia-cuda-nvrtc==$cuda" "nvidia-curand==$curand" \
        "nvidia-nccl-cu13==$nccl" >&2
    if [ ! -x "$root/bin/nvcc" ]; then
        echo "error: no nvcc under $root/bin after installing nvidia-cuda-nvcc==$cuda" >&2
        exit 1
    fi
    # The layout of a toolkit that nvcc, bindgen_cuda and cudarc's build scripts expect:
    # bin/ include/ lib64/ nvvm/ under one root.
    ln -sfn lib "$root/lib64"
    # NCCL's header and library next to the toolkit's (cudarc loads libnccl.so.2 at run time).
    nccl_root="$dir/nvidia/nccl"
    if [ -d "$nccl_root/include" ]; then
        for f in "$nccl_root"/include/*; do ln -sfn "$f" "$root/include/$(basename "$f")"; done
        for f in "$nccl_root"/lib/libnccl*; do ln -sfn "$f" "$root/lib/$(basename "$f")"; done
    fi
    # candle links the CUDA libraries (cudarc's `dynamic-linking`): the linker wants the
    # unversioned names.
    for l in libnccl.so.2 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10 libcudart.so.13; do
        ln -sfn "$l" "$root/lib/${l%.so.*}.so"
    done
    # The driver library comes with the driver, not with a wheel: link against a stub that
    # defines every driver function of cuda.h (as the toolkit's lib64/stubs/libcuda.so does);
    # at run time the driver's own libcuda.so.1 is loaded.
    mkdir -p "$root/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u \
        | sed 's/.*/void &(void) {}/' >"$root/lib/stubs/libcuda-stub.c"
    ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda-stub.c"
    touch "$stamp"
fi

cat <<EOF
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export CUDA_HOME="$root"
export PATH="$root/bin:\$PATH"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
EOF
