"""The compressed sparse linear kernel (ext_sparse_linear, csrc/core/sparse_linear.h) against torch's dense F.linear,
per layer, on the CPU, with the memory floor of both.

For every (shape, setting, token count) it times, in the same process and with the same threads:
- dense: torch's F.linear with the dense weight in float32 and in bfloat16 (the better of the two is "dense");
- sparse: the kernel on the compressed weight (bfloat16 values and a bitmask; bfloat16 activations), called directly;
  for the "+4bit" settings the weight is on a 4-bit grid with groups of 128 columns (64 where 128 does not divide
  the columns) and the kernel reads its packed
  codes and group scales (ext_sparse_codes_linear);
- panel: the panel kernel for prompts (ext_sparse_linear_panel / ext_sparse_codes_linear_panel,
  csrc/core/sparse_panel.h), called directly, on CPUs whose SIMD it has (AVX-512 or AVX2; empty elsewhere);
- prefill: SparseLinear's other prefill path, the weight decompressed for the call (ext_sparse_to_dense /
  ext_sparse_codes_to_dense) and torch's dense product in the activations' dtype (prefill_kernel = False: what CPUs
  without AVX2 run, and the others where it measured faster than the panel);
- layer: the SparseLinear module as a model calls it, on the path it picks for the token count ("path": kernel,
  panel or prefill; between the last two as the process measured them, prefill_probe_ratio: the panel's time over
  the dense product's at the probe, sparsegpt_kernels.sparse.linear.prefill_ratio); layer_speedup is the better
  dense product's time over it (what bench_generate's users get);
- the floor: the bytes each must read (sparse: values + mask + offsets + x; dense: the bfloat16 weight + x) at the
  read bandwidth measured in the same run (the sum of a tensor far larger than the caches, the best of 5).
The weights are random with random masks of the setting's sparsity (an exact N:M pattern for "2:4"). Writes CSV
(benchmarks/results/sparse_linear_cpu.csv) and prints a table; SparseLinear runs the kernel up to
its decode limit (DECODE_MAX_TOKENS, DECODE_MAX_TOKENS_BF16 in sparsegpt_kernels.sparse.linear), the panel above it,
and the rows show why.

    python benchmarks/bench_sparse_linear.py            # the embedded model's and LLaMA-7B's shapes
    python benchmarks/bench_sparse_linear.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta, print_table, time_fn, write_csv  # noqa: E402

from sparsegpt_kernels.backends import extension  # noqa: E402
from sparsegpt_kernels.sparse import CompressedWeight, SparseLinear  # noqa: E402

SHAPES = {"smollm2 q/o": (576, 576), "smollm2 up/gate": (1536, 576), "smollm2 down": (576, 1536),
          "llama-7b q/o": (4096, 4096), "llama-7b up/gate": (11008, 4096), "llama-7b down": (4096, 11008)}
SETTINGS = ("50%", "60%", "70%", "80%", "2:4", "50%+4bit", "70%+4bit", "2:4+4bit")
QUANT_GROUPS = (128, 64, 32, 8)  # the first that divides the columns (SmolLM2's 576 columns take 64)


def read_gbps(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes read per second by the sum of a tensor of ``nbytes`` (the best of ``repeats``), in GB/s."""
    a = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    _, best, _ = time_fn(lambda: a.sum(), torch.device("cpu"), repeats=repeats)
    return nbytes / best / 1e9


def random_weight(rows: int, cols: int, setting: str, seed: int = 0):
    """A random bfloat16 weight with a random mask of the setting ("50%", "2:4", "50%+4bit", ...) and, for "+4bit",
    the 4-bit grid (groups of the first of QUANT_GROUPS that divides ``cols``) its values lie on, else ``None``."""
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.spec import QuantGrid

    base, _, quant = setting.partition("+")
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    grid = None
    if quant:
        bits = int(quant.rstrip("bit"))
        raw = reference.make_quant_grid(W, bits, next(q for q in QUANT_GROUPS if cols % q == 0))
        gs = raw.group_size
        W = reference.quantize(W, raw.scale.repeat_interleave(gs, 1), raw.zero.repeat_interleave(gs, 1), raw.maxq)
        grid = QuantGrid(raw.scale, raw.zero, raw.maxq, gs)
    if base == "2:4":
        scores = torch.rand(rows, cols // 4, 4, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
        return (W * keep.reshape(rows, cols)).to(torch.bfloat16), grid
    s = float(base.rstrip("%")) / 100
    return (W * (torch.rand(rows, cols, generator=g) >= s)).to(torch.bfloat16), grid


def kernel_call(lin: SparseLinear, x: torch.Tensor):
    """The compressed kernel SparseLinear runs for decode, called directly (no module overhead)."""
    ops = torch.ops.sparsegpt_kernels
    if lin.bits:
        return partial(ops.ext_sparse_codes_linear, x, lin.weight_mask, lin.weight_codes, lin.weight_code_offsets,
                       lin.weight_scale_bits.view(torch.float32), lin.weight_zero, lin.bits, lin.group_size,
                       lin.weight_dtype, None)
    return partial(ops.ext_sparse_linear, x, lin.weight_mask, lin.weight_values, lin.weight_offsets, None)


def panel_call(lin: SparseLinear, x: torch.Tensor):
    """The panel kernel SparseLinear runs for prefill where it measured faster, called directly."""
    ops = torch.ops.sparsegpt_kernels
    if lin.bits:
        return partial(ops.ext_sparse_codes_linear_panel, x, lin.weight_mask, lin.weight_codes,
                       lin.weight_code_offsets, lin.weight_scale_bits.view(torch.float32), lin.weight_zero, lin.bits,
                       lin.group_size, lin.weight_dtype, None)
    return partial(ops.ext_sparse_linear_panel, x, lin.weight_mask, lin.weight_values, lin.weight_offsets, None)


def prefill_call(lin: SparseLinear, x: torch.Tensor):
    """SparseLinear's decompressing prefill path (the weight decompressed for the call, then a dense product), taken
    at any token count: a copy of the layer with decode limit 0 and without the panel kernel."""
    import copy

    pre = copy.copy(lin)  # shares the buffers
    pre._plans = {}
    pre.decode_max_tokens = 0
    pre.prefill_kernel = False
    return partial(pre, x)


def layer_path(lin: SparseLinear, x: torch.Tensor) -> str:
    return "kernel" if lin.uses_kernel(x) else "panel" if lin.uses_panel(x) else "prefill"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 32, 128, 512])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if extension.load() is None:
        print(f"the compiled extension is not available: {extension.missing_reason()}")
        return 1
    ops = torch.ops.sparsegpt_kernels
    cpu = torch.device("cpu")
    shapes = {"tiny": (40, 72)} if args.quick else {k: SHAPES[k] for k in args.shapes}
    tokens = [1, 5, 40] if args.quick else args.tokens
    settings = ["50%", "2:4", "50%+4bit"] if args.quick else args.settings
    repeats = 2 if args.quick else args.repeats
    bw = read_gbps(1 << 22 if args.quick else 1 << 28)
    info = meta(cpu)
    simd = ops.ext_cpu_simd()
    has_panel = bool(ops.ext_cpu_has_panel())
    from sparsegpt_kernels.sparse.linear import prefill_ratio

    ratio = prefill_ratio(torch.bfloat16)  # what SparseLinear measured to choose its prefill path
    print(f"# {info['device']}, {simd}, panel kernel {'yes' if has_panel else 'no'}, read bandwidth {bw:.1f} GB/s, "
          f"torch {info['torch']}, bfloat16 prompts: panel / dense product {ratio:.2f} at the probe")
    rows = []
    for name, (r, c) in shapes.items():
        for setting in settings:
            W, grid = random_weight(r, c, setting)
            pattern = "2:4" if setting.startswith("2:4") else None
            lin = SparseLinear(CompressedWeight.compress(W, pattern=pattern, quant=grid))
            assert bool(lin.bits) == (grid is not None), "the quantized weight is not stored as codes"
            W32 = W.float()
            sparse_bytes = lin.nbytes() + 8 * (r + 1)
            for T in tokens:
                x = torch.randn(T, c, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
                x32 = x.float()
                d32 = time_fn(partial(F.linear, x32, W32), cpu, repeats=repeats)[0]
                d16 = time_fn(partial(F.linear, x, W), cpu, repeats=repeats)[0]
                sp = time_fn(kernel_call(lin, x), cpu, repeats=repeats)[0]
                pan = time_fn(panel_call(lin, x), cpu, repeats=repeats)[0] if has_panel else None
                pre = time_fn(prefill_call(lin, x), cpu, repeats=repeats)[0]
                path = layer_path(lin, x)
                layer = time_fn(partial(lin, x), cpu, repeats=repeats)[0]
                dense = min(d32, d16)
                floor_sparse = (sparse_bytes + 2 * T * c) / (bw * 1e9)
                floor_dense = (2 * r * c + 2 * T * c) / (bw * 1e9)
                rows.append({
                    "shape": name, "rows": r, "cols": c, "setting": setting, "tokens": T,
                    "dense_fp32_ms": f"{1e3 * d32:.3f}", "dense_bf16_ms": f"{1e3 * d16:.3f}",
                    "sparse_ms": f"{1e3 * sp:.3f}", "speedup": f"{dense / sp:.2f}",
                    "panel_ms": "" if pan is None else f"{1e3 * pan:.3f}",
                    "panel_speedup": "" if pan is None else f"{dense / pan:.2f}",
                    "prefill_ms": f"{1e3 * pre:.3f}", "prefill_vs_dense_bf16": f"{pre / d16:.2f}",
                    "path": path, "layer_ms": f"{1e3 * layer:.3f}", "layer_speedup": f"{dense / layer:.2f}",
                    "sparse_floor_ms": f"{1e3 * floor_sparse:.3f}", "sparse_vs_floor": f"{sp / floor_sparse:.2f}",
                    "dense_floor_ms": f"{1e3 * floor_dense:.3f}", "bytes_vs_dense": f"{lin.nbytes() / (2 * r * c):.4f}",
                    "group": lin.group_size or "", "simd": simd, "read_gbps": f"{bw:.1f}",
                    "prefill_probe_ratio": f"{ratio:.2f}", **info,
                })
                ptxt = "" if pan is None else f"  panel {1e3 * pan:8.3f} ms"
                print(f"{name:>16} {setting:>4} T={T:<4} dense {1e3 * dense:8.3f} ms  sparse {1e3 * sp:8.3f} ms  "
                      f"x{dense / sp:5.2f}  floor x{sp / floor_sparse:5.2f}{ptxt}  prefill {1e3 * pre:8.3f} ms  "
                      f"layer ({path}) x{dense / layer:5.2f}", flush=True)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, "sparse_linear_cpu.csv")
    write_csv(out, rows)
    print_table(rows, ["shape", "setting", "tokens", "dense_fp32_ms", "dense_bf16_ms", "sparse_ms", "speedup",
                       "sparse_vs_floor", "panel_ms", "prefill_ms", "path", "layer_speedup", "bytes_vs_dense"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
