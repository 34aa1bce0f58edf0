"""How pruning scales with processes: per-block costs of published model shapes, measured on the device at hand, and
the whole-model time projected for 1..N processes (the distributed prune_model of sparsegpt_kernels.model).

Per decoder block, with T calibration tokens shared by W processes:
  forward    2 passes (Hessian collection, propagation) x 2·T·P_block FLOPs / W, at the measured GEMM rate;
  Hessians   2·T·c² FLOPs per distinct layer input / W, at the measured GEMM rate;
  reduction  4·c² bytes per distinct input, (W-1)/W of it over the link (0 for W = 1);
  solves     prune_layer of every layer, timed on the device at reduced width and scaled by (⅓c³ + r·c²) to the real
             width; the layers go to W processes by the same greedy balance as prune_model (the time is the busiest
             process's);
  broadcast  2 bytes per pruned weight (fp16), (W-1)/W of it over the link.
Nothing is downloaded or written to disk: the blocks are random tensors built from a seed.

    python benchmarks/bench_scale.py                       # CPU: width / 16, link: measured gloo between 2 processes
    python benchmarks/bench_scale.py --profile h200        # assumed H200 rates (printed) instead of measured ones:
                                                           # results/scale_h200_assumed.csv, a projection
    python benchmarks/bench_scale.py --quick               # smoke run
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

#: published shapes: hidden, MLP width, layers, key/value width (GQA), experts (0: dense), experts per token, MLP kind
MODELS = {
    "opt-175b": dict(hidden=12288, ffn=49152, layers=96, kv=12288, experts=0, topk=0, gated=False),
    "llama3-70b": dict(hidden=8192, ffn=28672, layers=80, kv=1024, experts=0, topk=0, gated=True),
    "llama3-405b": dict(hidden=16384, ffn=53248, layers=126, kv=1024, experts=0, topk=0, gated=True),
    "mixtral-8x22b": dict(hidden=6144, ffn=16384, layers=56, kv=1024, experts=8, topk=2, gated=True),
}
#: assumed rates of one H200 (not measured here): bf16 GEMM (the calibration forward), fp32 GEMM (Hessians), the
#: solves at 3x the fp32 floor (the Triton target), NVLink bus bandwidth for NCCL collectives
H200 = dict(fwd_tflops=700.0, hess_tflops=50.0, solve_tflops=50.0 / 3, link_gbps=300.0)


def block_layers(m: dict) -> list[tuple[str, int, int, float]]:
    """(name, rows, cols, share of the tokens it sees) of one decoder block."""
    h, f, kv = m["hidden"], m["ffn"], m["kv"]
    layers = [("q", h, h, 1.0), ("k", kv, h, 1.0), ("v", kv, h, 1.0), ("o", h, h, 1.0)]
    mlp = [("gate", f, h), ("up", f, h), ("down", h, f)] if m["gated"] else [("fc1", f, h), ("fc2", h, f)]
    if m["experts"]:
        share = m["topk"] / m["experts"]
        for e in range(m["experts"]):
            layers += [(f"e{e}.{n}", r, c, share) for n, r, c in mlp]
    else:
        layers += [(n, r, c, 1.0) for n, r, c in mlp]
    return layers


def distinct_inputs(m: dict) -> list[tuple[int, float]]:
    """(width, token share) of each Hessian of a block: q/k/v share one, o has one; the MLP input (gate/up, or fc1)
    and the down projection's input, per expert."""
    h, f = m["hidden"], m["ffn"]
    experts, share = (m["experts"], m["topk"] / m["experts"]) if m["experts"] else (1, 1.0)
    return [(h, 1.0), (h, 1.0)] + [(h, share), (f, share)] * experts


def solve_flops(rows: int, cols: int) -> float:
    return cols**3 / 3 + rows * cols**2


def measure_rates(device: torch.device, quick: bool) -> dict:
    """GEMM rates (forward dtype and fp32) on ``device``, TFLOP/s."""
    n = 512 if quick else (2048 if device.type == "cpu" else 8192)
    out = {}
    for key, dtype in (("fwd_tflops", torch.float32 if device.type == "cpu" else torch.bfloat16),
                       ("hess_tflops", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[key] = 3 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
    return out


def measure_solve(rows: int, cols: int, device: torch.device, backend: str) -> float:
    """Seconds of prune_layer (50%) on a (rows, cols) layer with a synthetic Hessian."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(max(2 * cols, 256), cols, generator=g)
    H = (2.0 / X.shape[0] * X.T @ X).to(device)
    W = torch.randn(rows, cols, generator=g).to(device)
    sk.prune_layer(W.clone(), H, sparsity=0.5, backend=backend)  # warm-up (kernels, autotuning)
    t0 = time.perf_counter()
    sk.prune_layer(W, H, sparsity=0.5, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _bandwidth_worker(rank: int, port: int, nbytes: int, result) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.zeros(nbytes // 4)
    dist.broadcast(buf, 0)
    t0 = time.perf_counter()
    for _ in range(3):
        dist.broadcast(buf, 0)
    if rank == 1:
        result.value = 3 * nbytes / (time.perf_counter() - t0) / 1e9
    dist.destroy_process_group()


def measure_link_gbps(nbytes: int) -> float:
    """Broadcast bandwidth between two gloo processes on this machine (GB/s)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_bandwidth_worker, args=(r, port, nbytes, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return float(result.value)


def project(m: dict, tokens: int, ranks: int, rates: dict, solve_s: dict) -> dict:
    """Seconds per block, by component, and for the whole model, with ``ranks`` processes."""
    layers = block_layers(m)
    fwd_flops = sum(2 * tokens * share * r * c for _, r, c, share in layers)
    hess_flops = sum(2 * tokens * share * c * c for c, share in distinct_inputs(m))
    link = rates["link_gbps"] * 1e9
    frac = (ranks - 1) / ranks
    loads = [0.0] * ranks
    for t in sorted((solve_s[(r, c)] for _, r, c, _ in layers), reverse=True):
        loads[loads.index(min(loads))] += t
    t = {
        "forward_s": 2 * fwd_flops / ranks / (rates["fwd_tflops"] * 1e12),
        "hessian_s": hess_flops / ranks / (rates["hess_tflops"] * 1e12),
        "reduce_s": frac * sum(4 * c * c for c, _ in distinct_inputs(m)) / link,
        "solve_s": max(loads),
        "broadcast_s": frac * sum(2 * r * c for _, r, c, _ in layers) / link,
    }
    t["block_s"] = sum(t.values())
    t["model_min"] = t["block_s"] * m["layers"] / 60
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (default 128 x 2048)")
    p.add_argument("--shrink", type=int, default=None, help="width divisor of the timed solves (CPU default 16)")
    p.add_argument("--profile", choices=["measured", "h200"], default="measured")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink = args.shrink or (1 if device.type == "cuda" else (64 if args.quick else 16))
    models = args.models[:1] if args.quick else args.models
    if args.profile == "h200":
        rates, source = dict(H200), "assumed H200 rates"
    else:
        rates = measure_rates(device, args.quick)
        rates["solve_tflops"] = None
        rates["link_gbps"] = measure_link_gbps(1 << (20 if args.quick else 26))
        source = f"measured on {meta(device)['device']}"
    print(f"# rates ({source}): " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items() if v is not None))
    rows = []
    for name in models:
        m = MODELS[name]
        solve_s = {}
        for _, r, c, _ in block_layers(m):
            if (r, c) in solve_s:
                continue
            if args.profile == "h200":
                solve_s[(r, c)] = solve_flops(r, c) / (rates["solve_tflops"] * 1e12)
            else:  # timed at reduced width, scaled by the FLOP count to the real one
                rs, cs = max(r // shrink, 8), max(c // shrink, 8)
                solve_s[(r, c)] = measure_solve(rs, cs, device, args.backend) * solve_flops(r, c) / solve_flops(rs, cs)
        for w in args.ranks:
            t = project(m, args.tokens, w, rates, solve_s)
            rows.append({"model": name, "ranks": w, "profile": args.profile, "shrink": shrink if args.profile ==
                         "measured" else "-", **{k: f"{v:.4g}" for k, v in t.items()}, **meta(device)})
            print(f"{name:>14} {w:>2} ranks: {t['model_min']:9.1f} min (block {t['block_s']:.3g} s)", flush=True)
    print_table(rows, ["model", "ranks", "forward_s", "hessian_s", "reduce_s", "solve_s", "broadcast_s", "block_s",
                       "model_min"])
    # the h200 profile projects from assumed rates: its file says so (it is not a measurement on an H200)
    name = "scale_h200_assumed.csv" if args.profile == "h200" else "scale_measured.csv"
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, name)
    write_csv(out, rows)
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, png, source)
    print(f"wrote {out} and {png}")
    return 0


def plot(rows: list[dict], path: str, source: str) -> None:
    """Projected whole-model minutes against processes, one line per model (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(int(r["ranks"]), float(r["model_min"])) for r in rows if r["model"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("processes")
    ax.set_ylabel("projected minutes, whole model")
    ax.set_title(f"prune time vs processes ({source})", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
