"""The Hessians' products on the tensor cores (``hessian_products="input"``) against float32 products and a float64
Hessian on the embedded model's real activations, and what the choice changes in the pruned model (issue 26).

1. Block 0 of the model, in ``--dtype`` on ``--device``: each linear layer's Hessian from the calibration
   activations three ways (float32 products, input products, float64 of the same inputs); the largest entry error of
   the first two relative to the float64 Hessian's largest entry, and their Frobenius-norm error.
2. The whole model pruned (``--setting``) with each kind of products, from the same weights and windows: the
   fraction of the pruned layers' weights whose mask differs from the float32 products' run, held-out perplexity.

The product of two bfloat16 or float16 numbers is exact in float32, so only the order of the float32 sums differs;
on a CPU, or with float32 activations, "input" is the float32 path and both rows agree exactly.
Writes ``benchmarks/results/hessian_products_<device>.csv`` (or ``--csv``).

    python benchmarks/bench_hessian_products.py --device cuda            # bfloat16 activations on the GPU
    python benchmarks/bench_hessian_products.py --device cpu --quick     # 2 blocks, tiny windows (smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, add_heldout_args, heldout_bed, meta, print_table, write_csv  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import calibration_windows, load_model  # noqa: E402
from sparsegpt_kernels.model.blocks import find_decoder_layers, find_prunable_layers  # noqa: E402
from sparsegpt_kernels.model.evaluate import perplexity  # noqa: E402
from sparsegpt_kernels.options import parse_setting  # noqa: E402

COLUMNS = ["part", "name", "products", "rel_max_err", "rel_fro_err", "mask_differs", "perplexity", "prune_s"]


@torch.no_grad()
def block0_hessians(model, calib: torch.Tensor, device: torch.device) -> list[dict]:
    """Rows of part 1: per linear layer of block 0, the errors of both kinds of products against float64."""
    _, layers = find_decoder_layers(model)
    targets = [t for t in find_prunable_layers(layers[0]) if t.expert is None]
    accs, native = {}, {}  # native: whether the input products' accumulator multiplied the layer's inputs as they are
    handles = []
    for t in targets:
        cols = t.module.in_features
        accs[t.name] = {"float32": sk.HessianAccumulator(cols), "input": sk.HessianAccumulator(cols, products="input"),
                        "float64": sk.HessianAccumulator(cols, dtype=torch.float64)}

        def hook(module, args, name=t.name):
            for acc in accs[name].values():
                acc.update(args[0])
            native[name] = accs[name]["input"].uses_input_products(args[0])

        handles.append(t.module.register_forward_pre_hook(hook))
    try:
        for i in range(calib.shape[0]):
            model(calib[i : i + 1].to(device))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, a in accs.items():
        ref = a["float64"].hessian
        top = float(ref.abs().max())
        for products in ("float32", "input"):
            d = a[products].hessian.double() - ref
            rows.append({"part": "hessian", "name": name, "products": products,
                         "rel_max_err": f"{float(d.abs().max()) / top:.3g}",
                         "rel_fro_err": f"{float(d.norm() / ref.norm()):.3g}",
                         "uses_input_products": str(products == "input" and native[name])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--setting", default="50%")
    add_heldout_args(p, nsamples=16, seqlen=512)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tok = load_model(args.model)
    model = model.to(device, dtype).eval()
    ids, ev, blocks = heldout_bed(args, tok)
    calib = calibration_windows(ids, args.nsamples, args.seqlen, seed=0)
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  {args.model} in {args.dtype}: "
          f"{args.nsamples} x {args.seqlen} calibration tokens", flush=True)

    rows = block0_hessians(model, calib, device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    setting = parse_setting(args.setting)
    masks = {}
    for products in ("float32", "input"):
        model.load_state_dict(state)
        t0 = time.perf_counter()
        report = sk.prune_model(model, calib, device=device, blocks=blocks, hessian_products=products,
                                **setting.prune_kwargs())
        seconds = time.perf_counter() - t0
        _, layers = find_decoder_layers(model)
        masks[products] = [t.module.weight.detach() == 0 for b in report.blocks_pruned
                           for t in find_prunable_layers(layers[b]) if t.expert is None]
        differ = sum(int((m != r).sum()) for m, r in zip(masks[products], masks["float32"]))
        total = sum(m.numel() for m in masks[products])
        rows.append({"part": "model", "name": f"{args.model} {args.setting}", "products": products,
                     "mask_differs": f"{differ / total:.3g}", "perplexity": f"{perplexity(model, ev):.3f}",
                     "prune_s": f"{seconds:.1f}"})
        print(f"{products:>8}: {rows[-1]['perplexity']} held-out perplexity, masks differ {rows[-1]['mask_differs']}, "
              f"{seconds:.1f} s", flush=True)
    rows = [{**{c: r.get(c, "") for c in COLUMNS}, "uses_input_products": r.get("uses_input_products", ""),
             "dtype": args.dtype, **info} for r in rows]
    print()
    print_table(rows, COLUMNS)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"hessian_products_{device.type}.csv")
    write_csv(out, rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
