"""How far whole-model perplexity after pruning moves with float32 rounding: several calibration seeds, each backend,
the published loop and a float64 pipeline, at 50%, 2:4 and 4:8 (issue 25, part 0).

The test bed of bench_refine.py (Shakespeare, calibration windows from the first 80% of the plays, 32 x 256 tokens,
held-out windows from the rest, 16 x 512, no BOS). Per calibration seed and setting, every implementation prunes a
fresh copy of the model with the same windows:

- ``cpp``, ``torch``: ``prune_model(..., backend=...)`` in float32, as a user runs it;
- ``published``: the same block loop with each layer pruned by the published SparseGPT loop
  (benchmarks/published_loop.py, float32);
- ``float64``: the model, its forwards, its Hessians and the torch backend's solves all in float64.

Besides perplexity, each run records the summed OBS loss of its layers (on the Hessians that implementation saw:
they differ from block 1 on, because the inputs of each block come from the pruned blocks before it). Writes
``benchmarks/results/drift_<model>.csv`` and prints the spread per setting.

    python benchmarks/bench_drift.py                               # seeds 0 1 2, 50% 2:4 4:8, all four
    python benchmarks/bench_drift.py --seeds 0 --settings 2:4 --impls cpp float64
    python benchmarks/bench_drift.py --quick                       # 2 blocks, tiny windows (smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, add_heldout_args, heldout_bed, meta, print_table, write_csv  # noqa: E402
from published_loop import published_prune  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import (  # noqa: E402
    calibration_windows,
    hessian_hooks,
    load_model,
    prune_block,
)
from sparsegpt_kernels.model.evaluate import perplexity  # noqa: E402
from sparsegpt_kernels.options import parse_setting  # noqa: E402

IMPLS = ("cpp", "torch", "published", "float64")


@contextlib.contextmanager
def published_layers():
    """Make prune_model prune every layer with the published loop (float32, in place) instead of a backend."""
    original = prune_block.prune_layer_with

    def published(W, H, opts, **kw):
        t0 = time.perf_counter()
        n, m = opts.nm or (0, 0)
        loss = published_prune(W.data, H.to(torch.float32), sparsity=opts.fraction or 0.0, prune_n=m - n if m else 0,
                               prune_m=m, blocksize=opts.block_size, percdamp=opts.damp)
        return sk.PruneResult(loss=loss, sparsity=float((W == 0).sum()) / W.numel(), damp=opts.damp,
                              backend="published", seconds=time.perf_counter() - t0, shape=tuple(W.shape),
                              pattern=opts.pattern, quant_bits=None, dead_columns=0, mask_sparsity=opts.fraction or 0.0)

    prune_block.prune_layer_with = published
    try:
        yield
    finally:
        prune_block.prune_layer_with = original


@contextlib.contextmanager
def float64_hessians():
    """Make the pipeline's Hessian accumulators sum in float64 (the float64 pipeline's inputs are float64 already)."""
    original = hessian_hooks.HessianAccumulator
    hessian_hooks.HessianAccumulator = functools.partial(original, dtype=torch.float64)
    try:
        yield
    finally:
        hessian_hooks.HessianAccumulator = original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--settings", nargs="+", default=["50%", "2:4", "4:8"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    add_heldout_args(p)
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    model = model.to(torch.float32)
    ids, ev, blocks = heldout_bed(args, tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = meta(torch.device("cpu"))
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"drift_{args.model}.csv")

    rows = []
    model.load_state_dict(state)
    dense = perplexity(model, ev)
    print(f"dense perplexity {dense:.3f}", flush=True)
    for seed in args.seeds:
        calib = calibration_windows(ids, args.nsamples, args.seqlen, seed=seed)
        for label in args.settings:
            setting = parse_setting(label)
            for impl in args.impls:
                model.load_state_dict(state)
                m = model.to(torch.float64) if impl == "float64" else model
                c = calib.to(torch.float64) if impl == "float64" and calib.is_floating_point() else calib
                with (published_layers() if impl == "published" else
                      float64_hessians() if impl == "float64" else contextlib.nullcontext()):
                    t0 = time.perf_counter()
                    report = sk.prune_model(m, c, **setting.prune_kwargs(), blocks=blocks,
                                            backend="torch" if impl in ("float64", "published") else impl)
                    seconds = time.perf_counter() - t0
                ppl = perplexity(m, ev)
                loss = sum(r.loss for r in report.layers if r.loss is not None)
                model = m.to(torch.float32)
                rows.append({"model": args.model, "seed": seed, "setting": label, "impl": impl,
                             "perplexity": f"{ppl:.3f}", "dense": f"{dense:.3f}", "layer_loss": f"{loss:.6g}",
                             "prune_s": f"{seconds:.1f}", "calibration": f"{args.nsamples}x{args.seqlen}",
                             "evaluation": f"{args.eval_windows}x{args.eval_seqlen}", **info})
                print(f"seed {seed} {label:>4} {impl:<9} perplexity {ppl:9.3f}  layer loss {loss:12.6g}  "
                      f"prune {seconds:6.1f} s", flush=True)
                write_csv(out, rows)  # after every run: a long run that is stopped keeps what it measured
    print_table(rows, ["seed", "setting", "impl", "perplexity", "layer_loss", "prune_s"])
    print("\nspread per setting (perplexity over the float64 pipeline's, same seed):")
    for label in args.settings:
        for impl in args.impls:
            ratios = [float(r["perplexity"]) / float(f["perplexity"]) for r in rows if r["setting"] == label
                      and r["impl"] == impl for f in rows if f["setting"] == label and f["impl"] == "float64"
                      and f["seed"] == r["seed"]]
            if ratios:
                print(f"  {label:>4} {impl:<9} mean {statistics.mean(ratios):.4f}  min {min(ratios):.4f}  "
                      f"max {max(ratios):.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
