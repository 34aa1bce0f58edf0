"""Where the time of pruning a whole model goes: the embedded model (SmolLM2-135M) pruned end to end with
``prune_model``, split into forward passes, Hessian updates, solves and the rest (``PruneReport.timings``).

Tokenizing the calibration text is timed once on its own (the first run of a text; later runs read the ids from the
cache directory), then each setting runs from fresh weights with the same calibration windows.

Writes ``benchmarks/results/prune_model_<device>.csv`` (one row per setting and backend: the phases in seconds).

    python benchmarks/bench_prune_model.py                       # 32 x 256 calibration tokens, 50% and 2:4
    python benchmarks/bench_prune_model.py --backends cpp torch  # the layer solves on each backend
    python benchmarks/bench_prune_model.py --quick               # 2 blocks, 4 x 64 tokens (smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta, print_table, write_csv  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import calibration_windows, load_model, load_text  # noqa: E402
from sparsegpt_kernels.model import data as _data  # noqa: E402
from sparsegpt_kernels.model.timing import PHASES, format_timings  # noqa: E402

COLUMNS = ["setting", "backend", "total", *PHASES]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=["50%", "2:4"])
    p.add_argument("--backends", nargs="+", default=["auto"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="2 blocks, 4 x 64 calibration tokens")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    blocks = [0, 1] if args.quick else None
    if args.quick:
        args.nsamples, args.seqlen = 4, 64

    device = torch.device(args.device)
    info = meta(device)
    model, tok = load_model(args.model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    splits = load_text(args.data)
    with _TokenCacheOff():
        t0 = time.perf_counter()
        ids = _data.tokenize(tok, splits.calibration)
        tokenize_s = time.perf_counter() - t0
    calib = calibration_windows(ids, args.nsamples, args.seqlen, seed=0)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  {args.model}: {args.nsamples} x {args.seqlen} "
          f"calibration tokens of {args.data}; tokenizing its {ids.numel():,} tokens (first run): {tokenize_s:.1f} s")

    rows = []
    for setting in args.settings:
        kw = {"pattern": setting} if ":" in setting else {"sparsity": float(setting.rstrip("%")) / 100}
        for backend in args.backends:
            model.load_state_dict(original)
            report = sk.prune_model(model, calib, device=device, backend=backend, blocks=blocks, **kw)
            t = report.timings
            used = sorted({r.backend for r in report.layers})
            rows.append({"setting": setting, "backend": f"{backend} ({'/'.join(used)})",
                         **{k: f"{t.get(k, 0.0):.2f}" for k in ["total", *PHASES]},
                         "tokenize_first_run": f"{tokenize_s:.2f}", "nsamples": args.nsamples,
                         "seqlen": args.seqlen, "blocks": len(report.blocks_pruned), **info})
            print(f"{setting:>5} {backend:>5}: {report.seconds:.1f} s  {format_timings(t)}",
                  flush=True)
    print()
    print_table(rows, COLUMNS)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"prune_model_{device.type}.csv")
    write_csv(out, rows)
    print(f"\nwrote {out}")
    return 0


class _TokenCacheOff:
    """Tokenize for real (no cached ids from disk or memory) inside the block."""

    def __enter__(self):
        self._env = os.environ.get(_data.TOKEN_CACHE_ENV)
        os.environ[_data.TOKEN_CACHE_ENV] = "0"
        _data._TOKEN_CACHE.clear()

    def __exit__(self, *exc):
        if self._env is None:
            os.environ.pop(_data.TOKEN_CACHE_ENV, None)
        else:
            os.environ[_data.TOKEN_CACHE_ENV] = self._env


if __name__ == "__main__":
    sys.exit(main())
