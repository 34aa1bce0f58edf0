#!/usr/bin/env bash
# Set up from scratch and run every test: the C++ unit tests and CUDA compile check (CMake), then pytest.
# Triton kernels run on the CPU under the Triton interpreter. On a machine with a CUDA GPU, a second pytest process
# without the interpreter then runs the tests marked `gpu`: the compiled Triton kernels and the CUDA extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if [ -f scripts/ci_native.sh ]; then
  bash scripts/ci_native.sh
fi
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  rc=0
  TRITON_INTERPRET=1 "$PY" -m pytest tests -q --durations=25 -m "not gpu" "$@" || rc=$?
  TRITON_INTERPRET=0 "$PY" -m pytest tests -q --durations=25 -m gpu "$@" || rc=$?
  exit "$rc"
fi
export TRITON_INTERPRET=1
exec "$PY" -m pytest tests -q --durations=25 "$@"
