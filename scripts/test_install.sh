#!/usr/bin/env bash
# Packaging as a user meets it: build an sdist and a wheel with `python -m build`, install each into a fresh virtual
# environment with no access to the source tree, and run scripts/smoke_installed.py there.
#   - the wheel (a plain `pip install`: no compiled extension inside): the cpp backend must come from the extension
#     built on first use from the sources shipped in the wheel;
#   - the sdist with `pip install --no-build-isolation` (torch present at build time): the extension is built at
#     install time from the sdist, which must hold everything that needs.
# Both environments get the CPU build of torch 2.13 first (the same file as scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export SPARSEGPT_KERNELS_CACHE="$WORK/cache" PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install --quiet build
# the isolated build cannot see torch: the wheel is pure Python plus the sources (the CI's REQUIRE_EXT is not for it)
env -u SPARSEGPT_KERNELS_REQUIRE_EXT "$WORK/tools/bin/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
  || { tail -n 30 "$WORK/build.log"; exit 1; }
wheel=$(ls "$WORK"/dist/*.whl)
sdist=$(ls "$WORK"/dist/*.tar.gz)
echo "test_install: built $(basename "$wheel") and $(basename "$sdist")"
# the sdist holds what building the extension needs, and nothing of the benchmarks
tar tzf "$sdist" >"$WORK/sdist.txt"
for f in csrc/sources.txt csrc/module.cpp csrc/core/rules.h csrc/core/sweep_core.h csrc/aten/aten_ops.cpp \
  CMakeLists.txt setup.py; do
  grep -q "^[^/]*/$f$" "$WORK/sdist.txt" || { echo "test_install: $f missing from the sdist"; exit 1; }
done
if grep -q "^[^/]*/benchmarks/" "$WORK/sdist.txt"; then
  echo "test_install: the sdist contains benchmarks/"
  exit 1
fi

cp scripts/smoke_installed.py "$WORK/"
for route in wheel sdist; do
  venv="$WORK/venv-$route"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  if [ "$route" = wheel ]; then
    "$venv/bin/python" -m pip install --quiet "$wheel"
    mode=jit
  else
    "$venv/bin/python" -m pip install --quiet setuptools wheel ninja
    SPARSEGPT_KERNELS_REQUIRE_EXT=1 "$venv/bin/python" -m pip install --quiet --no-build-isolation "$sdist"
    mode=aot
  fi
  echo "test_install: $route installed; smoke check ($mode extension)"
  (cd "$WORK" && PATH="$venv/bin:$PATH" "$venv/bin/python" smoke_installed.py --extension "$mode" \
    --source-tree "$ROOT")
done
echo "test_install: OK"
