#!/usr/bin/env bash
# Set up from scratch and run every test: the C++ unit tests and CUDA compile check (CMake), then pytest.
# Triton kernels run on the CPU under the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if [ -f scripts/ci_native.sh ]; then
  bash scripts/ci_native.sh
fi
export TRITON_INTERPRET=1
exec "$PY" -m pytest tests -q "$@"
