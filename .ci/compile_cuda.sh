#!/usr/bin/env bash
# Compiles every .cu under csrc/ with nvcc for sm_80 and sm_90 against torch 2.14.1's (CUDA 13.0 build) headers, so
# a change that breaks the CUDA build cannot land on a machine without a GPU, and checks that every .cpp compiles
# against the same headers (C++20, as a CUDA build with torch 2.14 compiles them). Only the wheels' include trees
# are unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t sources < <(find csrc -name '*.cu' | sort)
mapfile -t cpp_sources < <(find csrc -name '*.cpp' | sort)

NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -n "$NVCC" ] || { echo "nvcc not found: the CUDA compile check needs CUDA 13.0's nvcc on PATH" >&2; exit 1; }
NVCC_REAL=$(sed -n 's/^exec \(.*nvcc\) .*/\1/p' "$NVCC" 2>/dev/null || true)  # a wrapper script -> its target
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "${NVCC_REAL:-$(readlink -f "$NVCC")}")")}"
export CUDA_HOME

# torch 2.14.1's headers, and those of the CUDA libraries they include (cuBLAS, cuSPARSE, cuSOLVER, cuRAND), which
# torch's wheel takes from nvidia-* wheels (site-packages/nvidia/cu13/include) rather than from the toolkit.
cache="${DIN_EXT_CI_CACHE:-$HOME/.cache/din_ext_ci}/torch-2.14.1"
if [ ! -f "$cache/nvidia/cu13/include/cusparse.h" ] || [ ! -f "$cache/torch/include/torch/library.h" ]; then
  rm -rf "$cache" && mkdir -p "$cache/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$cache/wheels" torch==2.14.1 \
    "nvidia-cublas==13.1.1.3.*" "nvidia-cusparse==12.6.3.3.*" "nvidia-cusolver==12.0.4.66.*" "nvidia-curand==10.4.0.35.*"
  python3 - "$cache" <<'PY'
import glob, sys, zipfile
cache = sys.argv[1]
for path in glob.glob(f"{cache}/wheels/*.whl"):
    with zipfile.ZipFile(path) as wheel:
        wheel.extractall(cache, [n for n in wheel.namelist() if n.startswith(("torch/include/", "nvidia/cu13/include/"))])
PY
  rm -rf "$cache/wheels"
fi
inc="$cache/torch/include"
py_inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
for src in "${cpp_sources[@]}"; do
  echo "g++ -std=c++20 (torch 2.14.1 headers): $src"
  g++ -std=c++20 -fsyntax-only -D_GLIBCXX_USE_CXX11_ABI=1 -I csrc -I "$inc" -I "$inc/torch/csrc/api/include" \
    -I "$py_inc" "$src"
done
for src in "${sources[@]}"; do
  echo "nvcc sm_80 + sm_90: $src"
  # torch 2.14's headers require C++20. sm_80 too: the tensor-core path (csrc/cuda/mma.cuh) targets both.
  "$NVCC" -std=c++20 -O3 -c "$src" -o /dev/null --generate-code arch=compute_80,code=sm_80 \
    --generate-code arch=compute_90,code=sm_90 \
    --expt-relaxed-constexpr -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -DDIN_EXT_WITH_CUDA=1 \
    -I csrc -I "$inc" -I "$inc/torch/csrc/api/include" -I "$cache/nvidia/cu13/include" -I "$CUDA_HOME/include"
done
echo "checked ${#cpp_sources[@]} C++ source(s); compiled ${#sources[@]} CUDA source(s) for sm_80 and sm_90"
