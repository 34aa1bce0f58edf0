"""Time prune_layer per backend on real layer shapes, given a Hessian, against the published SparseGPT loop.

Prints a table and writes CSV (benchmarks/results/prune_layer_shapes_<device>.csv; the suite, run_all.py, writes its
own prune_layer_<device>.csv at the sizes it picks). Every backend is compared in the same run with
- the published loop (``published_loop.py``: the paper's algorithm as its reference code runs it; speedup_vs_published),
- the torch reference of this package (speedup_vs_torch),
- the compute floor: (⅓c³ + r·c²) FLOPs at the fp32 matmul rate of the device (or --peak-tflops), measured again
  before every shape (the best of 5 runs; column floor_tflops), so that a machine whose speed drifts during the run
  is compared with itself,
and its result with torch's: the OBS loss and the reconstruction error tr(ΔW H ΔWᵀ) (ratios; 1.0 = the same).

    python benchmarks/bench_prune_layer.py                 # all shapes, all backends available here
    python benchmarks/bench_prune_layer.py --quick         # tiny shapes (smoke run)
    python benchmarks/bench_prune_layer.py --shapes 4096x4096 --backends torch triton --device cuda
    python benchmarks/bench_prune_layer.py --refine admm --no-published    # each call with refine="admm"

With ``--refine admm`` every backend's call refines after its sweep (the published loop stays SparseGPT as
published); ``loss`` stays the sweep's and ``refined_loss`` is the refined one (``refined_vs_sweep`` their ratio).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, measured_matmul_tflops, meta, print_table, prune_flops, time_fn, write_csv  # noqa: E402
from published_loop import published_prune_mode  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402

SHAPES = ["1024x1024", "2048x2048", "4096x4096", "4096x11008", "11008x4096"]
QUICK_SHAPES = ["128x256", "96x384"]
PROGRESS = [("shape", 11), ("mode", 5), ("backend", 9), ("seconds", 9), ("speedup_vs_published", 20),
            ("speedup_vs_torch", 16), ("frac_of_floor", 13)]
PUBLISHED = "published"


def synthetic_hessian(cols: int, device: torch.device, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """H = (2/n) XᵀX of correlated inputs with a few outlier features (computed in chunks to bound memory)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rank = min(cols, 256)
    A = (torch.randn(rank, cols, generator=g) / rank**0.5).to(device)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[: max(1, cols // 256)]] = 20.0
    scale = scale.to(device)
    H = torch.zeros(cols, cols, device=device)
    for _ in range(0, tokens, 256):
        Z = torch.randn(256, rank, generator=g).to(device)
        X = (Z @ A + 0.1 * torch.randn(256, cols, generator=g).to(device)) * scale
        H.addmm_(X.T, X)
    return H * (2.0 / tokens)


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.4f}" if y else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=None, help="ROWSxCOLS (out x in); default: real layer shapes")
    p.add_argument("--backends", nargs="+", default=None, help="default: every backend available on the device")
    p.add_argument("--modes", nargs="+", default=["0.5", "2:4"], help="sparsity fractions or N:M patterns")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="fp32 peak for the floor (default: measured)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    p.add_argument("--no-published", action="store_true", help="leave out the published loop (the anchor)")
    p.add_argument("--refine", default="none", choices=["none", "admm"], help="refine after each backend's sweep")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    repeats = 1 if args.quick else args.repeats
    backends = args.backends or sk.available_backends(device)
    backends = [b for b in backends if b not in ("torch", PUBLISHED)]
    # the anchors first: the published loop, then this package's reference
    backends = ([] if args.no_published else [PUBLISHED]) + ["torch"] + backends
    def floor_rate() -> float:
        return args.peak_tflops or measured_matmul_tflops(device, 512 if args.quick else None, repeats=5)

    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"fp32 floor rate {floor_rate():.2f} TFLOP/s (measured again before every shape)")

    print("  ".join(f"{k:>{w}}" for k, w in PROGRESS))
    rows = []
    for shape in shapes:
        r, c = (int(v) for v in shape.lower().split("x"))
        H = synthetic_hessian(c, device)
        W0 = (torch.randn(r, c, generator=torch.Generator().manual_seed(1)) * 0.02).to(device)  # reproducible
        peak = floor_rate()
        for mode in args.modes:
            kw = {"pattern": mode} if ":" in mode else {"sparsity": float(mode)}
            times, losses, recon = {}, {}, {}
            for be in backends:
                W = W0.clone()
                result = {}

                def run(W=W, H=H, kw=kw, be=be, result=result, mode=mode):
                    if be == PUBLISHED:
                        result["loss"] = published_prune_mode(W, H, mode)
                    else:
                        res = sk.prune_layer(W, H, backend=be, refine=args.refine, **kw)
                        result["loss"], result["refined"] = res.loss, res.refined_loss

                med, lo, hi = time_fn(run, device, repeats=repeats, setup=lambda W=W, W0=W0: W.copy_(W0))
                times[be], losses[be] = med, result["loss"]
                D = (W0 - W).double()
                recon[be] = float(((D @ H.double()) * D).sum())
                floor = prune_flops(r, c) / (peak * 1e12)
                rows.append({
                    "shape": f"{r}x{c}", "mode": mode, "backend": be,
                    # significant digits, so that ratios recomputed from the times agree with the written ones
                    "seconds": f"{med:.6g}", "min_s": f"{lo:.6g}", "max_s": f"{hi:.6g}",
                    "speedup_vs_published": f"{times[PUBLISHED] / med:.2f}" if PUBLISHED in times else "-",
                    "speedup_vs_torch": f"{times['torch'] / med:.2f}" if "torch" in times else "-",  # (see below)
                    "floor_tflops": f"{peak:.3f}", "floor_s": f"{floor:.4f}", "frac_of_floor": f"{floor / med:.4g}",
                    "loss": f"{losses[be]:.6g}",
                    "loss_vs_torch": _ratio(losses[be], losses["torch"]) if "torch" in losses else "-",
                    "recon_vs_torch": _ratio(recon[be], recon["torch"]) if "torch" in recon else "-",
                    "sparsity": f"{float((W == 0).float().mean()):.4f}", "refine": args.refine if be != PUBLISHED
                    else "none",
                    "refined_loss": f"{result['refined']:.6g}" if result.get("refined") is not None else "-",
                    "refined_vs_sweep": _ratio(result["refined"], losses[be]) if result.get("refined") is not None
                    else "-", **info,
                })
                print("  ".join(f"{rows[-1][k]:>{w}}" for k, w in PROGRESS), flush=True)
            for row in rows[-len(backends):]:  # the anchors' own ratios, now that every backend ran
                be = row["backend"]
                if "torch" in times:
                    row["speedup_vs_torch"] = f"{times['torch'] / times[be]:.2f}"
                    row["loss_vs_torch"] = _ratio(losses[be], losses["torch"])
                    row["recon_vs_torch"] = _ratio(recon[be], recon["torch"])
    print()
    print_table(rows, ["shape", "mode", "backend", "seconds", "speedup_vs_published", "speedup_vs_torch", "floor_s",
                       "frac_of_floor", "loss_vs_torch", "recon_vs_torch"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"prune_layer_shapes_{device.type}.csv")
    write_csv(out, rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
