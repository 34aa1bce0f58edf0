#!/usr/bin/env bash
# One script for a CUDA machine (no network needed): build the extension (CPU + CUDA), run the GPU tests, run the
# benchmarks at real shapes, and collect everything under $OUT (default: benchmarks/out/gpu).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [--quick]
#
# Each step's log goes to $OUT/logs; a failing step is reported and the script goes on, exiting 1 at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out/gpu}
QUICK=${1:-}
mkdir -p "$OUT/logs" "$OUT/results"
unset TRITON_INTERPRET
export TRITON_INTERPRET=0
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name"
  if timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s): tail of $OUT/logs/$name.log"
    tail -n 15 "$OUT/logs/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  nvcc --version | tail -n 1
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export SPARSEGPT_KERNELS_REQUIRE_EXT=1
step build 420 "$PY" -m pip install --no-deps --no-build-isolation -e .
step ext_has_cuda 60 "$PY" -c "import sparsegpt_kernels._ext as e; assert e.load() and e.has_cuda(), 'no CUDA in _C'"
step native 180 bash scripts/ci_native.sh
# Triton's CPU-tensor tests need the interpreter; here only its CUDA tests run (TRITON_INTERPRET=0).
step tests_triton_gpu 300 "$PY" -m pytest -q -rs tests/test_triton_backend.py -k "cuda or compile"
step tests_gpu 300 "$PY" -m pytest -q -rs tests/test_cuda_backend.py tests/test_cpp_backend.py tests/test_export.py \
  tests/test_prune_layer.py tests/test_reference.py
if [ "$QUICK" = "--quick" ]; then
  step bench_prune_layer 200 "$PY" benchmarks/bench_prune_layer.py --device cuda --shapes 4096x4096 --modes 0.5 2:4 \
    --csv "$OUT/results/prune_layer_cuda.csv"
else
  step bench_prune_layer 420 "$PY" benchmarks/bench_prune_layer.py --device cuda \
    --shapes 4096x4096 11008x4096 4096x11008 12288x12288 --modes 0.5 2:4 --backends torch triton cuda \
    --csv "$OUT/results/prune_layer_cuda.csv"
  step bench_hinv 200 "$PY" benchmarks/bench_hinv.py --sizes 1024 4096 12288
  step bench_sweep 300 "$PY" benchmarks/bench_sweep.py --shapes 4096x4096 11008x4096 4096x11008 --modes 0.5 2:4
  step bench_nm_mask 120 "$PY" benchmarks/bench_nm_mask.py --shapes 4096x4096 11008x4096
  step bench_sparse_matmul 300 "$PY" benchmarks/bench_sparse_matmul.py --device cuda
  step bench_e2e 300 "$PY" benchmarks/bench_e2e.py --device cuda
fi
cp benchmarks/results/*cuda* benchmarks/results/hinv.csv benchmarks/results/sweep.csv benchmarks/results/nm_mask.csv \
  "$OUT/results/" 2>/dev/null || true

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
