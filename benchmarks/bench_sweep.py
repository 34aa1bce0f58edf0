"""Time the column sweep: the Triton block kernels (+ torch.matmul lazy updates) vs the torch reference sweep.

The sweep prunes W in place; every timed call starts from a fresh copy (on the GPU the copy is inside the timed call:
a copy of r·c floats, negligible next to the sweep). Reports the median (20th/80th percentiles), the speedup over
torch in the same run and the fraction of the fp32 floor (r·c² FLOPs of the lazy updates at --peak-tflops). Writes
CSV rows to benchmarks/results/sweep.csv (benchmarks/out/sweep.csv with --quick). Without CUDA it runs tiny shapes
under Triton's interpreter so the script at least runs.

    python benchmarks/bench_sweep.py                           # 4096², 11008x4096, 4096x11008, 12288²; 50% and 2:4
    python benchmarks/bench_sweep.py --quick
    python benchmarks/bench_sweep.py --shapes 4096x4096 --modes 2:4 4bit:2:4
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
from sparsegpt_kernels.backends._triton import BACKEND as _triton  # noqa: E402
from sparsegpt_kernels.spec import SweepSpec  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "12288x12288"]
QUICK_SHAPES = ["64x128", "33x96"]
H200_FP32_TFLOPS = 67.0


def parse_mode(mode: str, W: torch.Tensor, block: int) -> SweepSpec:
    """"0.5" (unstructured), "2:4" (N kept of every M), optionally prefixed "4bit:" for joint quantization."""
    quant = None
    if mode.startswith(("2bit:", "3bit:", "4bit:", "8bit:")):
        bits, mode = mode.split(":", 1)
        quant = reference.make_quant_grid(W, int(bits[:-3]))
    if ":" in mode:
        n, m = (int(v) for v in mode.split(":"))
        return SweepSpec(sparsity=1 - n / m, n=n, m=m, block_size=block, quant=quant)
    return SweepSpec(sparsity=float(mode), n=None, m=None, block_size=block, quant=quant)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="ROWSxCOLS (out x in)")
    p.add_argument("--modes", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="CPU timer repeats (the GPU uses do_bench)")
    p.add_argument("--peak-tflops", type=float, default=H200_FP32_TFLOPS, help="fp32 peak for the floor")
    p.add_argument("--skip-torch", action="store_true", help="do not time the (slow) torch reference")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or (QUICK_SHAPES if args.quick or device.type == "cpu" else SHAPES)
    block = args.block_size if device.type == "cuda" or args.block_size != 128 else 64
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"peak {args.peak_tflops} TFLOP/s")
    rows = []
    for shape in shapes:
        r, c = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        X = torch.randn(max(c // 2, 16), c, generator=g).to(device)
        H = X.T @ X * (2.0 / X.shape[0])
        U = reference.inverse_factor(H, 0.01).contiguous()
        W0 = (torch.randn(r, c, generator=g) * 0.02).to(device)
        for mode in args.modes:
            spec = parse_mode(mode, W0, min(block, c))
            W = W0.clone()
            floor = r * c**2 / (args.peak_tflops * 1e12)
            impls = [("triton", _triton.sweep)] + ([] if args.skip_torch else [("torch", reference.sweep)])
            times = {}
            losses = {}
            for name, fn in impls:

                def run(fn=fn, W=W, W0=W0, U=U, spec=spec, name=name, losses=losses):
                    W.copy_(W0)
                    losses[name] = fn(W, U, spec)

                times[name] = bench(run, device, args.repeats)
            base = times.get("torch")
            for name, t in times.items():
                rows.append({
                    "op": "sweep", "shape": f"{r}x{c}", "mode": mode, "block": spec.block_size, "impl": name,
                    "seconds": f"{t[0]:.5f}", "p20_s": f"{t[1]:.5f}", "p80_s": f"{t[2]:.5f}",
                    "speedup_vs_torch": f"{base[0] / t[0]:.2f}" if base else "-", "floor_s": f"{floor:.5f}",
                    "frac_of_floor": f"{floor / t[0]:.3f}",
                    "loss_vs_torch": f"{losses[name] / losses['torch']:.5f}" if base and losses["torch"] else "-",
                    **info,
                })
                print(rows[-1]["shape"], mode, name, rows[-1]["seconds"], flush=True)
    print_table(rows, ["shape", "mode", "impl", "seconds", "p20_s", "p80_s", "speedup_vs_torch", "frac_of_floor",
                       "loss_vs_torch"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, "sweep.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
