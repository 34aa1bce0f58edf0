"""Where the time of pruning a whole model goes: the embedded model (SmolLM2-135M) pruned end to end with
``prune_model``, split into forward passes, Hessian updates, solves and the rest (``PruneReport.timings``).

Tokenizing the calibration text is timed once on its own (the first run of a text; later runs read the ids from the
cache directory), then each setting runs from fresh weights with the same calibration windows.

Writes ``benchmarks/results/prune_model_<device>.csv`` (one row per setting and backend: the phases in seconds).

    python benchmarks/bench_prune_model.py                       # 32 x 256 calibration tokens, 50% and 2:4
    python benchmarks/bench_prune_model.py --backends cpp torch  # the layer solves on each backend
    python benchmarks/bench_prune_model.py --quick               # 2 blocks, 4 x 64 tokens (smoke run)

A model built from a config with random weights (no download; the time does not depend on the values), on the
device in bfloat16, calibrated on random token ids, with peak GPU memory and the published loop's time for the same
layers (each distinct layer shape timed once on the same device with a random Hessian, multiplied out) as anchor:

    python benchmarks/bench_prune_model.py --config llama-2-7b --random-weights --nsamples 128 --seqlen 2048
    python benchmarks/bench_prune_model.py --config tiny --random-weights --quick   # the same path, a toy size
    python benchmarks/bench_prune_model.py --config llama-2-7b --random-weights --hessian-products input  # (CUDA)
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
#: LLaMA configs by name for --random-weights (transformers.LlamaConfig fields)
CONFIGS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=256),
}


def random_model(name: str, device: torch.device):
    """A LlamaForCausalLM of config ``name`` with random weights, built on ``device`` in bfloat16."""
    import transformers

    cfg = transformers.LlamaConfig(**CONFIGS[name], tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def published_anchor(model, setting: str, device: torch.device, blocks) -> float:
    """Seconds the published loop would take for the pruned layers: each distinct (rows, cols) timed once on
    ``device`` (float32, a random positive-definite Hessian), times how many layers have it."""
    from published_loop import published_prune_mode

    from sparsegpt_kernels.model.blocks import find_prunable_layers

    layers = model.model.layers
    chosen = range(len(layers)) if blocks is None else blocks
    shapes: dict[tuple[int, int], int] = {}
    for b in chosen:
        for t in find_prunable_layers(layers[b]):
            shape = tuple(t.module.weight.shape)
            shapes[shape] = shapes.get(shape, 0) + 1
    mode = setting if ":" in setting else str(float(setting.rstrip("%")) / 100)
    total = 0.0
    for (r, c), n in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        X = torch.randn(2 * c, c, device=device, generator=g)
        H = X.T @ X / (2 * c)
        W = torch.randn(r, c, device=device, generator=g)
        _sync(device)
        t0 = time.perf_counter()
        published_prune_mode(W, H, mode)
        _sync(device)
        total += n * (time.perf_counter() - t0)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="build this config instead of loading --model (needs --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights and random calibration ids")
    p.add_argument("--no-anchor", action="store_true", help="skip timing the published loop (--random-weights)")
    p.add_argument("--hessian-products", default="float32", choices=("float32", "input"),
                   help="prune_model's hessian_products (input: bfloat16 activations on tensor cores on CUDA)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    blocks = [0, 1] if args.quick else None
    if args.quick:
        args.nsamples, args.seqlen = 4, 64

    device = torch.device(args.device)
    info = meta(device)
    if args.config or args.random_weights:
        if not (args.config and args.random_weights):
            p.error("--config and --random-weights go together")
        return _random_weights(args, device, info, blocks)
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
            report = sk.prune_model(model, calib, device=device, backend=backend, blocks=blocks,
                                    hessian_products=args.hessian_products, **kw)
            rows.append(_row(setting, backend, report, args, info, tokenize_first_run=f"{tokenize_s:.2f}"))
            print(f"{setting:>5} {backend:>5}: {report.seconds:.1f} s  {format_timings(report.timings)}",
                  flush=True)
    print()
    print_table(rows, COLUMNS)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"prune_model_{device.type}.csv")
    write_csv(out, rows)
    print(f"\nwrote {out}")
    return 0


def _row(setting: str, backend: str, report, args, info: dict, **extra) -> dict:
    """One CSV row: the setting, the backend asked for and those that ran, the phases in seconds, ``extra``."""
    used = sorted({r.backend for r in report.layers})
    return {"setting": setting, "backend": f"{backend} ({'/'.join(used)})",
            **{k: f"{report.timings.get(k, 0.0):.2f}" for k in ["total", *PHASES]}, **extra,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "blocks": len(report.blocks_pruned),
            "hessian_products": args.hessian_products, **info}


def _random_weights(args, device: torch.device, info: dict, blocks) -> int:
    """--config NAME --random-weights: build, prune each setting from the same random weights, report."""
    model = random_model(args.config, device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=g)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  {args.config} (random bfloat16 weights, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters): {args.nsamples} x {args.seqlen} "
          f"random calibration tokens")
    rows = []
    for setting in args.settings:
        kw = {"pattern": setting} if ":" in setting else {"sparsity": float(setting.rstrip("%")) / 100}
        anchor = None if args.no_anchor else published_anchor(model, setting, device, blocks)
        for backend in args.backends:
            model.load_state_dict(original)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            report = sk.prune_model(model, calib, device=device, backend=backend, blocks=blocks, progress=False,
                                    hessian_products=args.hessian_products, **kw)
            t = report.timings
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append(_row(setting, backend, report, args, info,
                             published_loop_s="" if anchor is None else f"{anchor:.2f}",
                             vs_published="" if anchor is None else f"{anchor / t['total']:.2f}",
                             peak_gib=f"{peak:.2f}", config=args.config))
            print(f"{setting:>5} {backend:>5}: {report.seconds:.1f} s  {format_timings(t)}"
                  + ("" if anchor is None else f"  (published loop, same layers: {anchor:.1f} s)"), flush=True)
    print()
    print_table(rows, [*COLUMNS, "published_loop_s", "vs_published", "peak_gib"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR,
                                   f"prune_model_{args.config}_{device.type}.csv")
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
