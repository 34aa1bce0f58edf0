"""Time the Hessian-inverse factor: the Triton kernels vs the torch reference (cholesky + triangular solve) and vs
torch's ``linalg.cholesky`` + ``cholesky_inverse`` (the yardstick of the GPU targets: what the paper's code calls before
its final Cholesky).

Reports the median time (20th/80th percentiles), the speedup over the torch reference in the same run, the time
relative to cholesky + cholesky_inverse, and the fraction of the fp32 floor (⅔c³ FLOPs at --peak-tflops, default H200
plain fp32). Writes CSV rows to benchmarks/results/hinv.csv
(benchmarks/out/hinv.csv with --quick). On a machine without CUDA it runs tiny sizes under Triton's interpreter, so the
script at least runs; those numbers mean nothing.

    python benchmarks/bench_hinv.py                  # c = 1024, 4096, 11008, 12288 on the GPU
    python benchmarks/bench_hinv.py --quick          # tiny sizes (smoke run)
    python benchmarks/bench_hinv.py --sizes 4096 49152
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, bench, meta, print_table, write_csv  # noqa: E402

from sparsegpt_kernels import reference  # noqa: E402
from sparsegpt_kernels.ops.hinv import hinv_factor  # noqa: E402

SIZES = [1024, 4096, 11008, 12288]
QUICK_SIZES = [64, 96]
H200_FP32_TFLOPS = 67.0


def spd_hessian(c: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(c // 2, 16)
    X = torch.randn(n, c, generator=g).to(device)
    X[:, : max(1, c // 256)] *= 20.0  # a few outlier features
    X[:, -max(1, c // 512) :] = 0  # and dead inputs (H_jj = 0)
    return X.T @ X * (2.0 / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3, help="CPU timer repeats (the GPU uses do_bench)")
    p.add_argument("--peak-tflops", type=float, default=H200_FP32_TFLOPS, help="fp32 peak for the floor")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or (QUICK_SIZES if args.quick or device.type == "cpu" else SIZES)
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"peak {args.peak_tflops} TFLOP/s")
    rows = []
    for c in sizes:
        H = spd_hessian(c, device)
        ref = reference.inverse_factor(H, args.damp)
        got = hinv_factor(H, args.damp)
        err = float((got - ref).abs().max() / ref.abs().max()) if got is not None and ref is not None else float("nan")
        Hd = reference.damped_hessian(H, args.damp)
        t_ref = bench(lambda H=H: reference.inverse_factor(H, args.damp), device, args.repeats)
        t_ci = bench(lambda Hd=Hd: torch.cholesky_inverse(torch.linalg.cholesky(Hd)), device, args.repeats)
        t_tri = bench(lambda H=H: hinv_factor(H, args.damp), device, args.repeats)
        floor = 2 / 3 * c**3 / (args.peak_tflops * 1e12)
        for name, t in (("torch", t_ref), ("torch_cholesky_inverse", t_ci), ("triton", t_tri)):
            rows.append({
                "op": "hinv", "c": c, "impl": name, "seconds": f"{t[0]:.5f}", "p20_s": f"{t[1]:.5f}",
                "p80_s": f"{t[2]:.5f}", "speedup_vs_torch": f"{t_ref[0] / t[0]:.2f}",
                "vs_cholesky_inverse": f"{t[0] / t_ci[0]:.2f}", "floor_s": f"{floor:.5f}",
                "frac_of_floor": f"{floor / t[0]:.3f}",
                "max_rel_diff_vs_torch": f"{err:.2e}" if name == "triton" else "-",
                **info,
            })
    print_table(rows, ["c", "impl", "seconds", "p20_s", "p80_s", "speedup_vs_torch", "vs_cholesky_inverse",
                       "frac_of_floor", "max_rel_diff_vs_torch"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, "hinv.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
