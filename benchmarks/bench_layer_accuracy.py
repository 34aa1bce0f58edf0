"""Per-layer accuracy of a backend on the real Hessians of the embedded model, against the float64 reference.

The embedded model (SmolLM2-135M) is pruned block by block with ``--backend``; every layer, on the Hessian and weight
that backend sees, is also pruned by the torch reference in float32 and in float64 (on copies), and the three OBS
losses (the estimated output-error increase) are recorded. Writes ``benchmarks/results/layer_accuracy.{csv,md}``.

Whole-model perplexity after pruning is a chaotic function of rounding (a near-tie flipped in block 0 changes the
inputs of every later block), so two float32 implementations can differ by a few percent in perplexity while agreeing
layer by layer; this benchmark measures the layer-level agreement directly.

    python benchmarks/bench_layer_accuracy.py                       # cpp vs torch fp32 vs torch fp64, 2:4
    python benchmarks/bench_layer_accuracy.py --pattern 0.5 --quick # 2 blocks, 4 x 128 calibration
    python benchmarks/bench_layer_accuracy.py --pattern 0.7 --refine # + the loss after refine="admm" on each layer

With ``--refine`` every layer is also pruned with ``refine="admm"`` (on a copy, same backend, Hessian and weight)
and its loss before and after refinement (both computed directly, ½·tr(ΔHΔᵀ) on the damped Hessian) is recorded;
the files are then ``layer_accuracy_refine_<pattern>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import calibration_windows, load_model, load_text, prune_block, tokenize  # noqa: E402


@contextlib.contextmanager
def recording(backend: str, rows: list[dict], refine: bool = False):
    """Make prune_model's per-layer prune_layer call also run the float32/float64 references and record losses."""
    original = prune_block.prune_layer_with

    def prune_and_compare(W, H, opts, **kw):
        ref = {}
        for name, dtype in (("torch_fp32", torch.float32), ("torch_fp64", torch.float64)):
            Hc = H.to(dtype)
            Hc = (Hc + Hc.T) / 2  # a float32-accumulated H is symmetric to float32 precision only
            ref[name] = original(W.detach().clone().to(dtype), Hc, dataclasses.replace(opts, backend="torch")).loss
        if refine:
            st = original(W.detach().clone(), H, dataclasses.replace(opts, backend=backend, refine="admm")).refine
            ref.update(before=st["loss_before"], refined=st["loss_after"], admm_iters=st["admm_iters"],
                       mask_changed=st["mask_changed"], refine_s=st["seconds"])
        res = original(W, H, dataclasses.replace(opts, backend=backend), **kw)
        rows.append({"layer": len(rows), "shape": "x".join(map(str, res.shape)), "backend": res.backend,
                     "loss": res.loss, **ref})
        return res

    prune_block.prune_layer_with = prune_and_compare
    try:
        yield
    finally:
        prune_block.prune_layer_with = original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpp")
    p.add_argument("--pattern", default="2:4", help="N:M pattern or an unstructured sparsity fraction")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="2 blocks, 4 x 128 calibration, output to benchmarks/out")
    p.add_argument("--refine", action="store_true", help="also record each layer's loss after refine='admm'")
    p.add_argument("--out-dir", default=None, help="where layer_accuracy.csv/.md go (default: benchmarks/results, "
                                                    "benchmarks/out with --quick)")
    args = p.parse_args(argv)
    blocks = [0, 1] if args.quick else None
    if args.quick:
        args.nsamples, args.seqlen = 4, 128

    model, tok = load_model("embedded")
    calib = calibration_windows(tokenize(tok, load_text("shakespeare").calibration), args.nsamples, args.seqlen)
    kw = {"pattern": args.pattern} if ":" in args.pattern else {"sparsity": float(args.pattern)}
    rows: list[dict] = []
    with recording(args.backend, rows, args.refine):
        sk.prune_model(model, calib, blocks=blocks, backend=args.backend, **kw)

    be = "/".join(sorted({r["backend"] for r in rows}))
    ratio = {k: [r[k] / r["torch_fp64"] for r in rows if r["torch_fp64"] > 0] for k in ("loss", "torch_fp32")}
    total = {k: sum(r[k] for r in rows) for k in ("loss", "torch_fp32", "torch_fp64")}
    worse = sum(r["loss"] > r["torch_fp32"] for r in rows)
    info = meta(torch.device("cpu"))
    name = f"layer_accuracy_refine_{args.pattern.replace(':', '-')}" if args.refine else "layer_accuracy"
    out = os.path.join(args.out_dir or (OUT_DIR if args.quick else RESULTS_DIR), name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "## Per-layer accuracy on the embedded model (`benchmarks/bench_layer_accuracy.py`)",
        "",
        f"{info['date']}, {info['device']}, torch {info['torch']}. SmolLM2-135M pruned {args.pattern} with "
        f"`backend={args.backend}` (ran: {be}; {args.nsamples} x {args.seqlen} Shakespeare calibration tokens); "
        f"each of its {len(rows)} layers also pruned by the torch reference in float32 and float64 on the same "
        "Hessian and weight. OBS loss = estimated increase of the layer's output error.",
        "",
        f"| | {be} (float32) | torch (float32) | torch (float64) |",
        "| --- | ---: | ---: | ---: |",
        f"| total OBS loss | {total['loss']:.2f} | {total['torch_fp32']:.2f} | {total['torch_fp64']:.2f} |",
        f"| median loss / float64 | {statistics.median(ratio['loss']):.5f} | "
        f"{statistics.median(ratio['torch_fp32']):.5f} | 1 |",
        f"| max loss / float64 | {max(ratio['loss']):.5f} | {max(ratio['torch_fp32']):.5f} | 1 |",
        "",
        f"Layers where {be}'s loss exceeds the float32 reference's: {worse} of {len(rows)}.",
        "",
    ]
    if args.refine:
        gain = [r["refined"] / r["before"] for r in rows if r["before"] > 0]
        before, after = sum(r["before"] for r in rows), sum(r["refined"] for r in rows)
        lines += [
            f"refine='admm' (defaults): loss after / before, median {statistics.median(gain):.3f}, best "
            f"{min(gain):.3f}, worst {max(gain):.3f}; total {after:.2f} against {before:.2f} ({after / before:.3f}x); "
            f"mask moved for {statistics.mean(r['mask_changed'] for r in rows):.2%} of the weights on average; "
            f"{sum(r['refine_s'] for r in rows):.1f} s of refinement in all.",
            "",
        ]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}.csv and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
