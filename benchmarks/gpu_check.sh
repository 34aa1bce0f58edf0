#!/usr/bin/env bash
# The check of the GPU path on a CUDA machine (made for one H200 with 16 cores and no network), in three phases that
# each finish within 5 minutes of machine time, start-up not counted:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh A     # no compilation of the extension
#   OUT=/some/dir bash benchmarks/gpu_check.sh B     # builds the CUDA extension (sm_90 only)
#   OUT=/some/dir bash benchmarks/gpu_check.sh C     # a LLaMA-2-7B-shaped model pruned end to end (triton), torchrun
#
# Phase A: machine facts; the compiled Triton tests (pytest -m gpu: CUDA tensors, 50%, 70%, 2:4, 4:8, 4-bit with and
#   without groups, rows 1/7/33/777, odd column counts, ties, autotuned loss, CUDA graphs, Hessian-inverse factor,
#   masks, opcheck); prune_layer torch vs triton at 4096x4096, 11008x4096, 4096x11008 and 12288x12288, 50% and 2:4
#   (median of 3 runs after a warm-up, CUDA events); the Hessian-inverse factor vs torch.linalg.cholesky +
#   cholesky_inverse at c = 4096 and 12288; refine="admm" on the GPU (its tests, then triton with refinement at
#   4096x4096 and 11008x4096 against the same calls without); the torch backend against the published loop; a
#   profiled triton call.
# Phase B: builds the extension with its CUDA part (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS = the machine's cores); the
#   CUDA-backend tests, the 2:4 export tests and prune_model on a tiny LLaMA with every backend on the GPU;
#   prune_layer torch vs cuda vs triton at the same shapes; a profiled cuda call; 2:4 semi-structured matmul vs dense
#   (LLaMA-7B and OPT-6.7B layers; eager and CUDA-graph replays); prefill/decode of a LLaMA-7B-shaped model with 8
#   layers, dense vs 2:4.
# Phase C: LLaMA-2-7B's config with random bfloat16 weights built on the GPU, all 32 blocks pruned at 50% from 128 x
#   2048 random calibration tokens with the timings split, peak memory and the published loop's time for the same
#   layers (each of the 3 shapes timed once, multiplied out); then 50% and 2:4 with the Hessians' products on the
#   tensor cores (hessian_products="input": the bfloat16 activations multiplied as they are, float32 sums), without the
#   anchor, and between the two the accuracy of those products on the embedded model's real activations (block 0's
#   Hessians against float64, masks and held-out perplexity of the pruned model); then the embedded model pruned by
#   the CLI under torchrun with 1 process (the distributed path on NCCL).
#   Estimates (not yet run): build ~15 s; Hessian GEMMs ~2.9e15 FLOP of which one triangle plus a tile is done, ~35 s
#   at 51 TFLOP/s in float32, ~3 s on the tensor cores; forwards (bf16) ~5 s; solves 224 layers at ~30-60 ms ~10 s;
#   anchor 3 published calls ~10 s: about 80 s (limit 125), with input products about 35 s each (limits 55);
#   the products' accuracy ~30 s (limit 40, two prunes of SmolLM2-135M); torchrun ~20 s (limit 25).
#
# Time (16 cores, H200): the limits below are what each step may take: 300 s (A) and 295 s (B), plus ~5 s for the
# machine facts and the summary. Measured on 2026-11-30 (benchmarks/results/gpu_h200/2026-11-30b): A 228 s, B 213 s.
#   A: facts ~5 s; compiled Triton tests 128 s (about 70 kernel compilations, autotuning included; with the
#      refinement's few GPU tests since, limit 150); prune_layer 51 s (4 shapes x 2 modes x (1 + 3) runs of torch and
#      triton; limit 60); refine, not yet run: 2 shapes x 2 modes x (1 + 2) calls, estimated ~15 s (per 11008x4096
#      call about 21 GEMMs of 11008 x 4096^2 at ~50 TFLOP/s and 8 factorisations of 4096, ~0.3 s, on top of the
#      sweep; limit 25); Hessian-inverse factor
#      16 s (limit 20); the published loop (one host sync per column) and torch at 4096x4096 and 11008x4096, 2 modes
#      x (1 + 2) runs: 20 s (limit 30); one profiled triton call per mode after 2 warm-up calls: 13 s (limit 20).
#   B: build 52 s (limit 70; loading it, 4 s, limit 10); CUDA, export and whole-model tests 43 s (limit 55: the
#      pipeline on a tiny LLaMA, 4 backends x 2 modes x 2 placements, ~1 s each); prune_layer 59 s (limit 70); one
#      profiled cuda call per mode: 15 s (limit 20); 2:4 matmul, eager and as CUDA-graph replays: 6 layers x 3 token
#      counts 14 s (limit 25); end to end: stopped at its 25 s limit in that run after the conversion, so its limit
#      is now 45 s (it took ~20 s in an earlier run).
#
# Under $OUT/<phase> (at most 8 files): summary.md (the table printed last), log.txt (every step's output),
# steps.tsv, machine.txt and the CSVs (the markdown tables some benchmarks write next to their CSV are removed: the
# summary has them). A failing step is reported with the tail of its log and the phase goes on;
# the script exits 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-}
if [ "$PHASE" != "A" ] && [ "$PHASE" != "B" ] && [ "$PHASE" != "C" ]; then
  echo "usage: OUT=DIR bash benchmarks/gpu_check.sh A|B|C" >&2
  exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out/gpu}
D="$OUT/$PHASE"
mkdir -p "$D"
: >"$D/log.txt"
: >"$D/steps.tsv"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS log
  log=$(mktemp)
  echo "== $name (limit ${limit} s)"
  if timeout "$limit" "$@" >"$log" 2>&1; then
    status=ok
    echo "   ok ($((SECONDS - t0)) s)"
  else
    status=FAILED
    echo "   FAILED ($((SECONDS - t0)) s); tail of its log:"
    tail -n 15 "$log" | sed 's/^/   | /'
    failed+=("$name")
  fi
  { echo "===== $name: $status ($((SECONDS - t0)) s)"; cat "$log"; echo; } >>"$D/log.txt"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >>"$D/steps.tsv"
  rm -f "$log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "cores: $(nproc)"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version | tail -n 1
  git log -1 --format='commit %h %s' 2>/dev/null || true
} >"$D/machine.txt" 2>&1
cat "$D/machine.txt"
SHAPES=(4096x4096 11008x4096 4096x11008 12288x12288)

if [ "$PHASE" = "A" ]; then
  step triton_tests 150 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_triton_backend.py \
    tests/test_precision.py tests/test_prune_layer.py tests/test_refine.py
  step prune_layer 60 "$PY" benchmarks/bench_prune_layer.py --device cuda --shapes "${SHAPES[@]}" --modes 0.5 2:4 \
    --backends torch triton --repeats 3 --no-published --csv "$D/prune_layer_triton.csv"
  step refine 25 "$PY" benchmarks/bench_prune_layer.py --device cuda --shapes 4096x4096 11008x4096 --modes 0.5 2:4 \
    --backends triton --repeats 2 --no-published --refine admm --csv "$D/prune_layer_refine.csv"
  step published 30 "$PY" benchmarks/bench_prune_layer.py --device cuda --shapes 4096x4096 11008x4096 \
    --modes 0.5 2:4 --backends torch --repeats 2 --csv "$D/prune_layer_published.csv"
  step profile 20 "$PY" benchmarks/profile_prune_layer.py --device cuda --shape 4096x4096 --modes 0.5 2:4 \
    --backends triton --csv "$D/profile.csv"
elif [ "$PHASE" = "C" ]; then
  step prune_7b_50 125 "$PY" benchmarks/bench_prune_model.py --device cuda --config llama-2-7b --random-weights \
    --nsamples 128 --seqlen 2048 --settings 50% --backends triton --csv "$D/prune_model_7b_50.csv"
  step prune_7b_50_tc 55 "$PY" benchmarks/bench_prune_model.py --device cuda --config llama-2-7b --random-weights \
    --nsamples 128 --seqlen 2048 --settings 50% --backends triton --no-anchor --hessian-products input \
    --csv "$D/prune_model_7b_50_tc.csv"
  step hessian_products 40 "$PY" benchmarks/bench_hessian_products.py --device cuda --csv "$D/hessian_products.csv"
  step prune_7b_24_tc 55 "$PY" benchmarks/bench_prune_model.py --device cuda --config llama-2-7b --random-weights \
    --nsamples 128 --seqlen 2048 --settings 2:4 --backends triton --no-anchor --hessian-products input \
    --csv "$D/prune_model_7b_24_tc.csv"
  step torchrun_1 25 "$PY" -m torch.distributed.run --nproc-per-node 1 -m sparsegpt_kernels.cli prune \
    --model embedded --sparsity 0.5 --nsamples 16 --seqlen 256 --no-eval --quiet --device cuda
else
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)} SPARSEGPT_KERNELS_REQUIRE_EXT=1
  step build 70 "$PY" setup.py build_ext --inplace
  step ext_has_cuda 10 "$PY" -c "from sparsegpt_kernels.backends import extension as _ext; assert _ext.load() and _ext.has_cuda(), \
_ext.missing_reason() or 'built without CUDA'; print('CUDA extension loaded')"
  step cuda_tests 55 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_cuda_backend.py tests/test_export.py \
    tests/test_model_gpu.py
  step prune_layer 70 "$PY" benchmarks/bench_prune_layer.py --device cuda --shapes "${SHAPES[@]}" --modes 0.5 2:4 \
    --backends torch cuda triton --repeats 2 --no-published --csv "$D/prune_layer_cuda.csv"
  step profile 20 "$PY" benchmarks/profile_prune_layer.py --device cuda --shape 4096x4096 --modes 0.5 2:4 \
    --backends cuda --csv "$D/profile.csv"
  step sparse_matmul 25 "$PY" benchmarks/bench_sparse_matmul.py --device cuda --models llama-7b opt-6.7b \
    --tokens 16 512 4096 --dtypes float16 --csv "$D/sparse_matmul.csv"
  step e2e 45 "$PY" benchmarks/bench_e2e.py --device cuda --models llama-7b --layers 8 --workload gpu-short \
    --repeats 2 --csv "$D/e2e.csv"
fi

rm -f "$D/sparse_matmul.md" "$D/e2e.md"
echo
"$PY" benchmarks/gpu_summary.py "$PHASE" "$D"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
