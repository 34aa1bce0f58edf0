#!/usr/bin/env bash
# The GPU machine's software versions, checked on a CPU machine: torch 2.11.0 (its CUDA 13.0 build, which runs CPU
# code without a GPU), triton 3.6.0 and transformers 5.17.0, in a virtual environment of their own, so that a version
# difference shows up here and not on the GPU. Builds the extension (the CPU part and, when nvcc is found, the CUDA
# part for torch's own architectures, since no GPU is visible), compiles every Triton kernel for sm_90, and runs the
# reference/API/cpp/torch.library tests, the Triton numerics under triton 3.6's interpreter and the model-family tests.
#
#   VENV (default .venv-gpu-versions), PYTHON (default python3)
#
# Triton 3.6's interpreter converts loop bounds with int() on one-element numpy arrays, which numpy >= 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.7 fixed it. Compiled kernels do not
# use numpy, so only the interpreter needs numpy < 2.4 here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu-versions}
TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
TRANSFORMERS_VERSION=5.17.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
V="$(cd "$VENV" && pwd)/bin/python"
"$V" -m pip install --quiet --upgrade pip
"$V" -m pip install --quiet "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "transformers==$TRANSFORMERS_VERSION" \
  "numpy<2.4" accelerate safetensors gguf tqdm packaging pytest setuptools wheel ninja
"$V" - "$TORCH_VERSION" "$TRITON_VERSION" <<'EOF'
import sys, torch, triton
want_torch, want_triton = sys.argv[1:]
got = (torch.__version__.split("+")[0], triton.__version__)
assert got == (want_torch, want_triton), f"expected torch {want_torch} / triton {want_triton}, got {got}"
print(f"test_gpu_versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF

# Build in a scratch copy of the tree: an in-place build here would replace the main environment's _C.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$SRC"
cd "$SRC"

nvcc_found=0  # where torch.utils.cpp_extension looks: CUDA_HOME, then nvcc on PATH, then /usr/local/cuda
if [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1 \
  || [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc_found=1
fi
SPARSEGPT_KERNELS_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-2} "$V" -m pip install --quiet --no-build-isolation --no-deps -e .
"$V" - "$nvcc_found" <<'EOF'
import sys
from sparsegpt_kernels.backends import extension as _ext
assert _ext.load() is not None, _ext.missing_reason()
if sys.argv[1] == "1":
    assert _ext.has_cuda(), "nvcc was found but the extension has no CUDA part"
print(f"test_gpu_versions: extension built (CUDA part: {_ext.has_cuda()})")
EOF

export TRITON_INTERPRET=1 SPARSEGPT_KERNELS_REQUIRE_EXT=1 SPARSEGPT_KERNELS_STRICT_TESTS=1
"$V" -m pytest -q -p no:cacheprovider \
  tests/test_reference.py tests/test_prune_layer.py tests/test_hessian.py tests/test_precision.py \
  tests/test_helpers.py tests/test_cpp_backend.py tests/test_compile.py tests/test_rules.py tests/test_nm_mask.py \
  tests/test_sweep.py tests/test_autotune.py tests/test_triton_backend.py tests/test_cuda_backend.py \
  tests/test_model_families.py tests/test_distributed.py tests/test_streaming.py tests/test_sparse.py \
  -k "not embedded_model and not torchrun_cli and not cli_stream" "$@"  # those need the offline model packages
echo "test_gpu_versions: OK"
