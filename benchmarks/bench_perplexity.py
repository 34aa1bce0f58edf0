"""Held-out perplexity of the embedded model (SmolLM2-135M) pruned by magnitude, Wanda and SparseGPT.

Writes ``benchmarks/results/perplexity.csv`` and ``perplexity.md`` (dense, then every method at 50%, 4:8, 2:4 and
50% + 4-bit), with the calibration settings and wall times.

    python benchmarks/bench_perplexity.py            # 32 x 512 calibration, 8 x 512 evaluation windows
    python benchmarks/bench_perplexity.py --quick    # a smoke run: 2 blocks, 4 x 128 calibration, 2 windows
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch

from sparsegpt_kernels.model import calibration_windows, eval_windows, load_model, load_text, tokenize
from sparsegpt_kernels.model.compare import compare, format_rows

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--methods", default="dense,sparsegpt,wanda,magnitude")
    p.add_argument("--settings", default="50%,4:8,2:4,50%+4bit")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (2 blocks); writes nothing unless --out")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results, none with --quick)")
    args = p.parse_args(argv)

    blocks = None
    if args.quick:
        args.nsamples, args.seqlen, args.eval_windows, blocks = 4, 128, 2, [0, 1]
    out_dir = args.out if args.out is not None else (None if args.quick else os.path.join(HERE, "results"))

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    splits = load_text(args.data)
    calib = calibration_windows(tokenize(tok, splits.calibration), args.nsamples, args.seqlen, seed=args.seed)
    ev = eval_windows(tokenize(tok, splits.evaluation), args.seqlen, args.eval_windows)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = (f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, device {dev}")

    def write(rows, final=False):
        if not out_dir:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "perplexity.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "data", "method", "setting", "perplexity", "sparsity", "prune_seconds",
                        "eval_seconds", "calib_nsamples", "seqlen", "eval_windows", "seed", "env"])
            for r in rows:
                w.writerow([args.model, args.data, r.method, r.setting, f"{r.perplexity:.4f}", f"{r.sparsity:.4f}",
                            f"{r.prune_seconds:.1f}", f"{r.eval_seconds:.1f}", args.nsamples, args.seqlen,
                            ev.shape[0], args.seed, env])
        total = time.perf_counter() - t0
        with open(os.path.join(out_dir, "perplexity.md"), "w") as f:
            f.write("# Held-out perplexity of the embedded model, pruned\n\n")
            f.write(f"Model: SmolLM2-135M-Instruct (`--model {args.model}`, float32). Text: {args.data} (calibration "
                    "and evaluation from disjoint parts).\n")
            f.write(f"Calibration: {args.nsamples} random windows of {args.seqlen} tokens (seed {args.seed}). "
                    f"Evaluation: {ev.shape[0]} non-overlapping windows of {args.seqlen} held-out tokens, "
                    "exp(mean token NLL).\n")
            state = "Total" if final else "Partial run so far"
            f.write(f"Environment: {env}. {state} wall time {total / 60:.1f} min.\n\n")
            f.write(format_rows(rows, markdown=True) + "\n\n")
            f.write("`prune s` is the wall time of `prune_model` (calibration forward passes included; magnitude "
                    "needs none), `eval s` that of the perplexity run. Produced by "
                    "`python benchmarks/bench_perplexity.py` "
                    f"`--nsamples {args.nsamples} --seqlen {args.seqlen} --eval-windows {args.eval_windows}`.\n")

    rows = compare(model, calib, ev, methods=methods, settings=settings, device=args.device, blocks=blocks,
                   seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=write)
    write(rows, final=True)
    print(format_rows(rows))
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    if out_dir:
        print(f"wrote {out_dir}/perplexity.csv and perplexity.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
