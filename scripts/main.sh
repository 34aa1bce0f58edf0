#!/usr/bin/env bash
# Set up from scratch and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PY" python/prune_synthetic.py "$@"
