#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU and without a CUDA build of torch: nvcc -c of every
# csrc/cuda/*.cu with torch's include paths and BuildExtension's nvcc flags, for each architecture
# given (default: 80 90 100), printing ptxas register / spill reports. It cannot link (a CPU torch wheel
# has no libtorch_cuda): this checks that the code compiles, not that it runs.
# usage: bash csrc/cuda/compile_check.sh [ARCH ...]      (from the repository root, venv active)
# Fails when nvcc fails or reports a warning in csrc/cuda (warnings from torch's headers are shown
# but ignored). A CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build):
# a stand-in is written to a temporary include directory.
# Stable ABI: compiled with TORCH_TARGET_VERSION = torch 2.10 (as setup.py), and fails when the
# object needs a libtorch C++ symbol (nm -C --undefined-only: at::, c10::, torch::).
set -euo pipefail
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PY=${PYTHON:-python}
ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(80 90 100)
TI=$($PY -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PI=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ ! -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$TMP/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/inc/c10/cuda/impl/cuda_cmake_macros.h"
fi
status=0
for cu in csrc/cuda/*.cu; do
  for arch in "${ARCHS[@]}"; do
    echo "=== $cu sm_$arch"
    log="$TMP/$(basename "$cu").$arch.log"
    if ! "$NVCC" -c "$cu" -o "$TMP/out.o" -I"$TMP/inc" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PI" \
        -std=c++17 -O3 -lineinfo -gencode "arch=compute_$arch,code=sm_$arch" \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -Wall \
        -Xptxas -v -DTORCH_EXTENSION_NAME=_C_cuda -DUSE_CUDA -DTORCH_TARGET_VERSION=0x020a000000000000 \
        -DPy_LIMITED_API=0x030a0000 >"$log" 2>&1; then
      cat "$log"; status=1; continue
    fi
    grep -E "registers|spill" "$log" | sed 's/^ptxas info    : //' | sort | uniq -c
    if grep -E "^csrc/cuda/.*(warning|error)" "$log"; then status=1; fi
    if command -v nm >/dev/null; then
      bad=$(nm -C --undefined-only "$TMP/out.o" | grep -E '\b(at|c10|torch|caffe2)::' || true)
      if [ -n "$bad" ]; then echo "libtorch C++ symbols (not the stable ABI):"; echo "$bad" | head; status=1
      else echo "      stable ABI: no at:: / c10:: / torch:: symbols ($(nm --undefined-only "$TMP/out.o" | grep -c -E 'aoti_torch|torch_') shim calls)"; fi
    fi
  done
done
exit $status
