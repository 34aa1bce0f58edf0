"""Helpers shared by the benchmark scripts: timing, machine description, CSV output, the compute floor."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # committed numbers
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # smoke runs (not committed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, repeats: int = 3, warmup: int = 1,
            setup: Callable[[], object] | None = None) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn()`` over ``repeats`` runs; ``setup()`` runs untimed before each.

    On CUDA each run is timed with CUDA events recorded on the current stream around it (which also counts the time
    the GPU waits for the host, as a user does); elsewhere with the wall clock.
    """
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times), min(times), max(times)


def bench(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) seconds: ``triton.testing.do_bench`` on CUDA, :func:`time_fn` (median, min, max) elsewhere."""
    if device.type == "cuda":
        import triton

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med / 1e3, lo / 1e3, hi / 1e3
    return time_fn(fn, device, repeats=repeats)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "-"
    return out


def meta(device: torch.device) -> dict[str, str]:
    return {"date": _dt.date.today().isoformat(), "device": device_name(device), **versions()}


def measured_matmul_tflops(device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """Measured float32 matmul rate on ``device`` (TFLOP/s): the floor the pruning FLOPs are compared to. The best of
    ``repeats`` runs: on a shared machine a median can catch a slow moment and make every fraction look better."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    _, best, _ = time_fn(lambda: a @ b, device, repeats=repeats)
    return 2 * n**3 / best / 1e12


def prune_flops(rows: int, cols: int) -> float:
    """The dense work no SparseGPT implementation avoids: one Cholesky of H (⅓c³ FLOPs; the sweep can run on the
    Cholesky factor itself, without an inverse) + r·c² for the lazy batch updates (GEMMs with K = block size)."""
    return cols**3 / 3 + rows * cols**2


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(widths[c]) for c in cols))


def add_heldout_args(p, *, nsamples: int = 32, seqlen: int = 256, eval_windows: int = 16,
                     eval_seqlen: int = 512) -> None:
    """The held-out test bed's flags (calibration and evaluation windows, --quick, --csv)."""
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=seqlen)
    p.add_argument("--eval-windows", type=int, default=eval_windows)
    p.add_argument("--eval-seqlen", type=int, default=eval_seqlen)
    p.add_argument("--quick", action="store_true", help="2 blocks, 2 x 64 calibration tokens, 2 x 64 held out")
    p.add_argument("--csv", default=None)


def heldout_bed(args, tok) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """The test bed of issue 25 for ``args`` of :func:`add_heldout_args`: (the calibration split's token ids, the
    held-out windows, the blocks to prune). Shakespeare's plays: calibration windows are drawn from the first 80%,
    held-out windows are the rest's first ``eval_windows`` of ``eval_seqlen`` tokens, no BOS; ``--quick`` shrinks
    both and prunes 2 blocks."""
    from sparsegpt_kernels.model import eval_windows, load_text, tokenize

    if args.quick:
        args.nsamples, args.seqlen, args.eval_windows, args.eval_seqlen = 2, 64, 2, 64
    splits = load_text("shakespeare")
    ev = eval_windows(tokenize(tok, splits.evaluation), args.eval_seqlen, args.eval_windows)
    return tokenize(tok, splits.calibration), ev, [0, 1] if args.quick else None
