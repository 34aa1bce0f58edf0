"""Where one prune_layer call spends its time: torch.profiler over a single call, after warm-up runs.

For each backend and mode it prints the wall time, the device time (the sum of kernel times; on a CPU the operators'
self time), the number of kernel launches, and the kernels (or operators) that take the most time, and writes one
CSV row per (backend, mode, kernel). On a GPU the gap between the wall time and the device time is host cost
(launches, Python, synchronisation); that and the top kernels say which part of a backend to work on.

    python benchmarks/profile_prune_layer.py --device cuda --shape 4096x4096 --backends triton cuda --csv out.csv
    python benchmarks/profile_prune_layer.py --device cpu --shape 256x256 --backends torch      # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prune_layer import synthetic_hessian  # noqa: E402
from common import OUT_DIR, meta, sync, write_csv  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.backends import unavailable_reason  # noqa: E402


def profile_one(W: torch.Tensor, H: torch.Tensor, backend: str, mode: str, top: int) -> tuple[dict, list[dict]]:
    kw = {"pattern": mode} if ":" in mode else {"sparsity": float(mode)}
    device = W.device
    for _ in range(2):  # compiles, autotunes, fills caches
        sk.prune_layer(W.clone(), H, backend=backend, **kw)
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    Wc = W.clone()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        sk.prune_layer(Wc, H, backend=backend, **kw)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        timed = [(e.key, e.self_device_time_total / 1e6, e.count) for e in kernels]
    else:
        timed = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events]
    timed.sort(key=lambda t: -t[1])
    busy = sum(t[1] for t in timed)
    launches = sum(t[2] for t in timed) if device.type == "cuda" else 0
    summary = {"backend": backend, "mode": mode, "wall_s": f"{wall:.4f}", "device_s": f"{busy:.4f}",
               "launches": launches}
    rows = [{**summary, "kernel": name[:120], "kernel_s": f"{sec:.5f}", "calls": n,
             "share_of_device": f"{sec / busy:.3f}" if busy else ""} for name, sec, n in timed[:top]]
    return summary, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="4096x4096", help="ROWSxCOLS")
    p.add_argument("--modes", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    p.add_argument("--top", type=int, default=8, help="kernels listed per run")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    rows_n, cols_n = (int(v) for v in args.shape.lower().split("x"))
    H = synthetic_hessian(cols_n, device)
    W = torch.randn(rows_n, cols_n, generator=torch.Generator().manual_seed(0)).to(device)
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  prune_layer {args.shape}, one profiled call")
    out = []
    for backend in args.backends:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        for mode in args.modes:
            summary, rows = profile_one(W, H, backend, mode, args.top)
            out += [{**r, "shape": args.shape, **info} for r in rows]
            print(f"\n{backend} {mode}: wall {summary['wall_s']} s, device {summary['device_s']} s, "
                  f"{summary['launches']} kernel launches")
            for r in rows:
                print(f"  {r['kernel_s']:>9} s  {r['calls']:>5}x  {r['share_of_device']:>6}  {r['kernel']}")
    path = args.csv or os.path.join(OUT_DIR, f"profile_prune_layer_{device.type}.csv")
    write_csv(path, out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
