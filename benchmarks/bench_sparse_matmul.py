"""2:4 semi-structured sparse matmul versus the dense matmul, on the linear-layer shapes of OPT and LLaMA models.

For every (model, layer, dtype, token count) it times y = x Wᵀ (+ no bias) with the dense weight (cuBLAS) and with
the same weight, 2:4-pruned, as a semi-structured sparse tensor (cuSPARSELt or CUTLASS via
sparsegpt_kernels.export), and writes CSV (benchmarks/results/sparse_matmul_<device>.csv) plus a markdown summary
with a per-layer recommendation (sparse_matmul_<device>.md). Sizes where sparse is slower are kept: they are the
point. On CUDA each product is also timed as the replay of a CUDA graph (columns *_graph_ms): the GPU work alone,
without the host cost of a call (torch 2.11 with cuSPARSELt 0.8 spends 0.5-0.9 ms of host time in every sparse call,
measured on an H200, more than the kernel itself at these sizes). On a device without semi-structured support (any
CPU) the dense times are measured and every row says why the sparse side is missing.

    python benchmarks/bench_sparse_matmul.py                    # GPU: every shape, tokens 1..8192, fp16 and bf16
    python benchmarks/bench_sparse_matmul.py --quick            # tiny smoke run
    python benchmarks/bench_sparse_matmul.py --models llama-7b --tokens 1 4096 --dtypes float16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta, print_table, time_fn, write_csv  # noqa: E402

from sparsegpt_kernels.export import keep_dense_reason, prepare_weight, semi_structured_class, semi_structured_support  # noqa: E402
from sparsegpt_kernels.reference import nm_keep_mask  # noqa: E402


def _opt(d: int) -> dict[str, tuple[int, int]]:
    return {"qkv/out_proj": (d, d), "fc1": (4 * d, d), "fc2": (d, 4 * d)}


def _llama(d: int, ffn: int, kv: int | None = None) -> dict[str, tuple[int, int]]:
    shapes = {"q/o_proj": (d, d)}
    if kv is not None and kv != d:
        shapes["k/v_proj"] = (kv, d)
    shapes.update({"gate/up_proj": (ffn, d), "down_proj": (d, ffn)})
    return shapes


#: model -> layer -> (out_features, in_features)
MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "opt-125m": _opt(768),
    "opt-1.3b": _opt(2048),
    "opt-6.7b": _opt(4096),
    "opt-13b": _opt(5120),
    "opt-30b": _opt(7168),
    "opt-66b": _opt(9216),
    "llama-7b": _llama(4096, 11008),
    "llama-13b": _llama(5120, 13824),
    "llama-70b": _llama(8192, 28672, kv=1024),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
CPU_MODELS = ["opt-125m", "llama-7b"]
CPU_TOKENS = [1, 16, 64, 256]
QUICK_MODELS = {"tiny": {"proj": (128, 128), "ffn": (256, 128)}}
QUICK_TOKENS = [1, 16]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _bench(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn(). On CUDA: triton's do_bench (L2 flushed between runs) or CUDA events."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
        except ImportError:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(5):
                fn()
            times = []
            for _ in range(max(repeats, 20)):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    med, _, _ = time_fn(fn, device, repeats=repeats, warmup=1)
    return med


def _graph_bench(fn, device: torch.device, repeats: int) -> float | None:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph; None off CUDA or where it cannot be captured."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the capture: workspaces, plans, lazy initialisation
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except (RuntimeError, NotImplementedError) as e:
        print(f"  (no CUDA graph: {str(e).splitlines()[0][:80]})", flush=True)
        return None
    return _bench(graph.replay, device, repeats)


def run(models: dict[str, dict[str, tuple[int, int]]], tokens: list[int], dtypes: list[str], device: torch.device,
        repeats: int, backend: str = "auto") -> list[dict]:
    support = semi_structured_support(device, kernels=backend)
    info = meta(device)
    rows = []
    seen: dict[tuple, dict] = {}
    for model, layers in models.items():
        for layer, (out_f, in_f) in layers.items():
            for dname in dtypes:
                dtype = DTYPES[dname]
                torch.manual_seed(0)
                # generated on the device: masking the big shapes on a CPU is slow
                W = torch.randn(out_f, in_f, device=device).mul_(0.02)
                W = (W * nm_keep_mask(W.abs(), 2, 4)).to(dtype)
                W = prepare_weight(W)
                reason = keep_dense_reason(W, support)
                Ws = None
                if reason is None:
                    try:
                        Ws = semi_structured_class(support.kernels).from_dense(W)
                    except (RuntimeError, NotImplementedError) as e:
                        reason = f"conversion failed: {str(e).splitlines()[0]}"
                for t in tokens:
                    key = (out_f, in_f, dname, t)
                    base = {"model": model, "layer": layer, "out_features": out_f, "in_features": in_f,
                            "dtype": dname, "tokens": t}
                    if key in seen:  # the same shape in another model: reuse the measurement
                        rows.append({**seen[key], **base})
                        continue
                    x = torch.randn(t, in_f, device=device, dtype=dtype)
                    dense = lambda x=x, W=W: torch.nn.functional.linear(x, W)  # noqa: E731
                    dense_s, dense_g = _bench(dense, device, repeats), _graph_bench(dense, device, repeats)
                    sparse_s, sparse_g, err, status = None, None, None, "ok"
                    if Ws is not None:
                        try:
                            y_sparse = torch.nn.functional.linear(x, Ws)
                            y_dense = torch.nn.functional.linear(x, W)
                            err = float((y_sparse.float() - y_dense.float()).abs().max()
                                        / (y_dense.float().abs().max() + 1e-6))
                            sparse = lambda x=x, Ws=Ws: torch.nn.functional.linear(x, Ws)  # noqa: E731
                            sparse_s, sparse_g = _bench(sparse, device, repeats), _graph_bench(sparse, device, repeats)
                        except (RuntimeError, NotImplementedError) as e:
                            status = f"sparse matmul failed: {str(e).splitlines()[0]}"
                    else:
                        status = f"sparse skipped: {reason}"
                    flops = 2.0 * t * out_f * in_f
                    row = {**base,
                           "dense_ms": f"{dense_s * 1e3:.4f}",
                           "sparse_ms": f"{sparse_s * 1e3:.4f}" if sparse_s else "",
                           "speedup": f"{dense_s / sparse_s:.3f}" if sparse_s else "",
                           "dense_graph_ms": f"{dense_g * 1e3:.4f}" if dense_g else "",
                           "sparse_graph_ms": f"{sparse_g * 1e3:.4f}" if sparse_g else "",
                           "speedup_graph": f"{dense_g / sparse_g:.3f}" if dense_g and sparse_g else "",
                           "dense_tflops": f"{flops / dense_s / 1e12:.2f}",
                           "sparse_tflops_eff": f"{flops / sparse_s / 1e12:.2f}" if sparse_s else "",
                           "rel_err": f"{err:.2e}" if err is not None else "",
                           "sparse_backend": support.kernels or "-", "status": status, **info}
                    seen[key] = row
                    rows.append(row)
                    print(f"{model:>10} {layer:>13} {out_f:>6}x{in_f:<6} {dname:>8} t={t:<5} dense "
                          f"{row['dense_ms']:>9} ms  sparse {row['sparse_ms'] or '-':>9} ms  "
                          f"speedup {row['speedup'] or '-':>6}  graphs {row['speedup_graph'] or '-':>6}  "
                          f"{'' if status == 'ok' else status[:60]}",
                          flush=True)
    return rows


def recommend(rows: list[dict]) -> list[dict]:
    """Per (model, layer, dtype): the token counts where 2:4 wins, and a one-line verdict."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["layer"], r["out_features"], r["in_features"], r["dtype"]), []).append(r)
    out = []
    for (model, layer, o, i, dt), rs in groups.items():
        rs = sorted(rs, key=lambda r: int(r["tokens"]))
        measured = [r for r in rs if r["speedup"]]
        if not measured:
            verdict, wins = "no sparse kernel here: " + rs[0]["status"].replace("sparse skipped: ", ""), ""
        else:
            sp = {int(r["tokens"]): float(r["speedup"]) for r in measured}
            win = [t for t, s in sp.items() if s >= 1.05]
            wins = " ".join(str(t) for t in win)
            best_t = max(sp, key=sp.get)
            if not win:
                verdict = f"keep dense (never ≥5% faster; best {sp[best_t]:.2f}x at {best_t} tokens)"
            elif len(win) == len(sp):
                verdict = f"sparse wins at every token count (best {sp[best_t]:.2f}x at {best_t})"
            else:
                lo = [t for t in sp if t not in win]
                verdict = (f"sparse for {min(win)}–{max(win)} tokens (best {sp[best_t]:.2f}x at {best_t}); "
                           f"dense at {', '.join(map(str, lo))}")
        out.append({"model": model, "layer": layer, "shape": f"{o}x{i}", "dtype": dt, "wins_at_tokens": wins,
                    "recommendation": verdict})
    return out


def markdown(rows: list[dict], recs: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    r0 = rows[0]
    lines = [f"2:4 sparse vs dense matmul on {r0['device']} ({r0['date']}, torch {r0['torch']}, "
             f"sparse kernels: {r0['sparse_backend']}).", ""]
    if not any(r["speedup"] for r in rows):
        lines += [f"**No 2:4 sparse matmul on this device**: {rows[0]['status'].replace('sparse skipped: ', '')}. "
                  "Dense times only; see the GPU results for speedups.", ""]
    tokens = sorted({int(r["tokens"]) for r in rows})
    lines.append("| model | layer | out x in | dtype | " + " | ".join(f"t={t}" for t in tokens) + " |")
    lines.append("|" + "---|" * (4 + len(tokens)))
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["layer"], f"{r['out_features']}x{r['in_features']}", r["dtype"]),
                          {})[int(r["tokens"])] = r
    for (model, layer, shape, dt), by_t in groups.items():
        cells = []
        for t in tokens:
            r = by_t.get(t)
            if r is None:
                cells.append("")
            elif r["speedup"]:
                s = float(r["speedup"])
                cells.append(f"**{s:.2f}x**" if s >= 1.05 else f"{s:.2f}x")
            else:
                cells.append(f"{float(r['dense_ms']):.3g} ms")
        lines.append(f"| {model} | {layer} | {shape} | {dt} | " + " | ".join(cells) + " |")
    lines += ["", ("Cells: dense time / 2:4 time (bold: ≥1.05x, sparse faster)." if any(r["speedup"] for r in rows)
                   else "Cells: dense matmul time."), ""]
    if any(r["speedup"] for r in rows):
        lines += ["Recommendation (which layers gain):", "", "| model | layer | dtype | recommendation |",
                  "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['layer']} | {r['dtype']} | {r['recommendation']} |" for r in recs]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS), help="default: all (CPU: two)")
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--backend", default="auto", choices=["auto", "cusparselt", "cutlass"])
    p.add_argument("--repeats", type=int, default=3, help="CPU repeats (CUDA uses do_bench's own count)")
    p.add_argument("--quick", action="store_true", help="one tiny shape, two token counts")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type != "cuda"
    if args.quick:
        models, tokens, repeats = QUICK_MODELS, args.tokens or QUICK_TOKENS, 1
    else:
        names = args.models or (CPU_MODELS if cpu else list(MODELS))
        models = {n: MODELS[n] for n in names}
        tokens, repeats = args.tokens or (CPU_TOKENS if cpu else TOKENS), args.repeats
    support = semi_structured_support(device, kernels=args.backend)
    info = meta(device)
    print(f"# {info['date']}  {info['device']}  torch {info['torch']}  semi-structured: "
          f"{support.kernels if support.available else 'unsupported (' + support.reason + ')'}")
    rows = run(models, tokens, args.dtypes, device, repeats, args.backend)
    recs = recommend(rows)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"sparse_matmul_{device.type}.csv")
    write_csv(out, rows)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(rows, recs))
    print()
    print_table(recs, ["model", "layer", "dtype", "recommendation"])
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
