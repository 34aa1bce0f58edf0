#!/usr/bin/env bash
# Native checks without Python: configure and build csrc/ with CMake (C++ unit tests of the CPU core; the CUDA
# kernels compiled with plain nvcc for sm_90 when nvcc is found), then run ctest. Fails on any failure.
#   BUILD_DIR (default cmake-build-ci), JOBS (default 2), CUDA_ARCHS (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-cmake-build-ci}
JOBS=${JOBS:-2}
CUDA_ARCHS=${CUDA_ARCHS:-90}

args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DSPARSEGPT_CUDA_ARCHS="$CUDA_ARCHS")
if command -v ninja >/dev/null 2>&1; then
  args+=(-G Ninja)
fi
nvcc_bin=""
if [ -n "${CUDACXX:-}" ]; then
  nvcc_bin=$CUDACXX
elif command -v nvcc >/dev/null 2>&1; then
  nvcc_bin=$(command -v nvcc)
elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -n "$nvcc_bin" ]; then
  echo "ci_native: CUDA compile check with $nvcc_bin (sm_$CUDA_ARCHS)"
  args+=(-DCMAKE_CUDA_COMPILER="$nvcc_bin" -DSPARSEGPT_REQUIRE_CUDA=ON)
else
  echo "ci_native: nvcc not found; the CUDA compile check is skipped"
  args+=(-DSPARSEGPT_CUDA_CHECK=OFF)
fi

cmake "${args[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure
echo "ci_native: OK"
