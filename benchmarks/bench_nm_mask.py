"""Time the N:M keep-mask ("N kept of every M"): the Triton kernel vs reference.nm_keep_mask (argsort + scatter).

A memory-bound op: the floor is reading the scores and writing the mask once at --peak-gbps (default: H200 HBM3e,
~4300 GB/s measured copy rate). Reports the median (20th/80th percentiles), the speedup over torch in the same run and
the fraction of that floor. Writes CSV rows to benchmarks/results/nm_mask.csv (benchmarks/out/nm_mask.csv with
--quick). Without CUDA it runs tiny shapes under Triton's interpreter so the script at least runs.

    python benchmarks/bench_nm_mask.py
    python benchmarks/bench_nm_mask.py --quick
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
from sparsegpt_kernels.ops.nm_mask import nm_keep_mask_triton  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "12288x12288"]
QUICK_SHAPES = ["64x128", "7x40"]
PATTERNS = ["2:4", "4:8", "1:4"]
H200_GBPS = 4300.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="ROWSxCOLS")
    p.add_argument("--patterns", nargs="+", default=PATTERNS)
    p.add_argument("--repeats", type=int, default=3, help="CPU timer repeats (the GPU uses do_bench)")
    p.add_argument("--peak-gbps", type=float, default=H200_GBPS, help="memory bandwidth for the floor")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (QUICK_SHAPES if args.quick or device.type == "cpu" else SHAPES)
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"peak {args.peak_gbps} GB/s")
    rows = []
    for shape in shapes:
        r, c = (int(v) for v in shape.lower().split("x"))
        s = torch.randn(r, c, device=device) ** 2
        for pat in args.patterns:
            n, m = (int(v) for v in pat.split(":"))
            if c % m:
                continue
            same = torch.equal(nm_keep_mask_triton(s, n, m), reference.nm_keep_mask(s, n, m))
            t_ref = bench(lambda s=s, n=n, m=m: reference.nm_keep_mask(s, n, m), device, args.repeats)
            t_tri = bench(lambda s=s, n=n, m=m: nm_keep_mask_triton(s, n, m), device, args.repeats)
            floor = r * c * (s.element_size() + 1) / (args.peak_gbps * 1e9)
            for name, t in (("torch", t_ref), ("triton", t_tri)):
                rows.append({
                    "op": "nm_mask", "shape": f"{r}x{c}", "pattern": pat, "impl": name, "seconds": f"{t[0]:.6f}",
                    "p20_s": f"{t[1]:.6f}", "p80_s": f"{t[2]:.6f}", "speedup_vs_torch": f"{t_ref[0] / t[0]:.2f}",
                    "floor_s": f"{floor:.6f}", "frac_of_floor": f"{floor / t[0]:.3f}", "same_as_torch": same, **info,
                })
    print_table(rows, ["shape", "pattern", "impl", "seconds", "p20_s", "p80_s", "speedup_vs_torch", "frac_of_floor",
                       "same_as_torch"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, "nm_mask.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
