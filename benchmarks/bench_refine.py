"""Held-out perplexity and prune time of SparseGPT with and without the ADMM refinement (``refine="admm"``), one
table: the same calibration and evaluation windows for every row, each row a fresh copy of the model.

The test bed of issue 25: Shakespeare's plays, calibration windows from the first 80% of the plays (32 x 256 tokens,
seed 0), held-out windows from the rest (16 x 512), no BOS token. Rows: dense, then every setting with
``refine="none"`` and ``refine="admm"`` (uniform allocation), and 70% with ``allocation="error"`` refined. Writes
``benchmarks/results/refine_<model>.csv`` and prints the table with the ratios against SparseGPT.

    python benchmarks/bench_refine.py                                  # SmolLM2-135M, 50%, 70%, 2:4
    python benchmarks/bench_refine.py --model embedded-gemma3 --settings 70% 2:4
    python benchmarks/bench_refine.py --quick                          # 2 blocks, tiny windows (smoke run)
    python benchmarks/bench_refine.py --model embedded-gemma3 --settings 70% 2:4 --seeds 0 1 2 --no-error-allocation

With several ``--seeds`` every setting is pruned once per calibration seed (the held-out windows stay the same) and
the table ends with the mean, min and max of the ratios over the seeds: held-out perplexity moves by a few percent
with the calibration draw and with float32 rounding, so one seed says little about a difference of that size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, add_heldout_args, heldout_bed, meta, print_table, write_csv  # noqa: E402

from sparsegpt_kernels import prune_model  # noqa: E402
from sparsegpt_kernels.model import calibration_windows, load_model  # noqa: E402
from sparsegpt_kernels.model.evaluate import perplexity  # noqa: E402
from sparsegpt_kernels.options import parse_setting  # noqa: E402


def seed_summary(rows: list[dict]) -> list[dict]:
    """Mean, min and max over the seeds of each refined row's ratios against SparseGPT."""
    groups: dict = {}
    for r in rows:
        if r["refine"] != "none":
            groups.setdefault((r["setting"], r["refine"], r["allocation"]), []).append(r)
    out = []
    for (setting, refine, allocation), rs in groups.items():
        ratios = [float(r["vs_sparsegpt"]) for r in rs]
        times = [float(r["time_vs_sparsegpt"]) for r in rs if r["time_vs_sparsegpt"]]
        out.append({"setting": setting, "refine": refine, "allocation": allocation, "seeds": len(rs),
                    "vs_sparsegpt_mean": f"{sum(ratios) / len(ratios):.3f}", "vs_sparsegpt_min": f"{min(ratios):.3f}",
                    "vs_sparsegpt_max": f"{max(ratios):.3f}",
                    "time_vs_sparsegpt_mean": f"{sum(times) / len(times):.2f}" if times else ""})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--settings", nargs="+", default=["50%", "70%", "2:4"])
    p.add_argument("--no-error-allocation", action="store_true", help="skip the 70%% allocation='error' row")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (one run per seed)")
    add_heldout_args(p)
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    ids, ev, blocks = heldout_bed(args, tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = meta(torch.device("cpu"))

    runs = [("dense", None, "none", "uniform", args.seeds[0])]
    for seed in args.seeds:
        for s in args.settings:
            runs += [(s, parse_setting(s), "none", "uniform", seed), (s, parse_setting(s), "admm", "uniform", seed)]
        if not args.no_error_allocation and not args.quick:
            runs.append(("70%", parse_setting("70%"), "admm", "error", seed))
    rows, base = [], {}
    for label, setting, refine, allocation, seed in runs:
        model.load_state_dict(state)
        seconds = 0.0
        if setting is not None:
            calib = calibration_windows(ids, args.nsamples, args.seqlen, seed=seed)
            t0 = time.perf_counter()
            prune_model(model, calib, **setting.prune_kwargs(), refine=refine, allocation=allocation, blocks=blocks)
            seconds = time.perf_counter() - t0
        ppl = perplexity(model, ev)
        if refine == "none":
            base[label, seed] = (ppl, seconds)
        ref_ppl, ref_s = base.get((label, seed), (ppl, seconds))
        rows.append({"model": args.model, "setting": label, "refine": refine, "allocation": allocation,
                     "seed": seed, "perplexity": f"{ppl:.3f}", "vs_sparsegpt": f"{ppl / ref_ppl:.3f}",
                     "prune_s": f"{seconds:.1f}", "time_vs_sparsegpt": f"{seconds / ref_s:.2f}" if ref_s else "",
                     "calibration": f"{args.nsamples}x{args.seqlen}",
                     "evaluation": f"{args.eval_windows}x{args.eval_seqlen}", **info})
        print(f"{label:>6} refine={refine:<4} allocation={allocation:<7} seed {seed} perplexity {ppl:9.3f}  "
              f"prune {seconds:6.1f} s", flush=True)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"refine_{args.model}.csv")
    write_csv(out, rows)
    print_table(rows, ["model", "setting", "refine", "allocation", "seed", "perplexity", "vs_sparsegpt", "prune_s",
                       "time_vs_sparsegpt"])
    if len(args.seeds) > 1:
        print_table(seed_summary(rows), ["setting", "refine", "allocation", "seeds", "vs_sparsegpt_mean",
                                         "vs_sparsegpt_min", "vs_sparsegpt_max", "time_vs_sparsegpt_mean"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
