"""Plots of the benchmark CSVs (needs matplotlib: the ``dev``/``test`` extras).

Reads, from one directory, whichever of these exist and writes a PNG beside each:
  prune_layer_<device>.csv   -> prune_time_<device>.png     prune time vs layer size per backend (log-log)
  sparse_matmul_<device>.csv -> sparse_matmul_<device>.png  2:4 speedup vs token count per layer shape
  e2e_<device>.csv           -> e2e_<device>.png            prefill/decode latency, dense vs 2:4
  sparse_linear_<device>.csv -> sparse_linear_<device>.png  compressed kernel's speedup over dense vs token count

    python benchmarks/plot.py                       # benchmarks/results, every device found
    python benchmarks/plot.py --dir benchmarks/out --device cpu
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import prune_flops  # noqa: E402


def _read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(rows: list[dict]) -> str:
    r = rows[0]
    return f"{r.get('device', '?')} · torch {r.get('torch', '?')} · {r.get('date', '')}"


def _prune_flops(shape: str) -> float:
    r, c = (int(v) for v in shape.split("x"))
    return prune_flops(r, c)


def plot_prune(rows: list[dict], out: str) -> str:
    """Prune time vs layer cost (⅓c³ + r·c² FLOPs, so the compute floor is a straight line), per backend, log-log."""
    plt = _plt()
    modes = sorted({r["mode"] for r in rows})
    backends = sorted({r["backend"] for r in rows}, key=lambda b: (b != "torch", b))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.8 * len(modes), 4.6), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes):
        mrows = [r for r in rows if r["mode"] == mode]
        for k, be in enumerate(backends):
            pts = sorted((_prune_flops(r["shape"]), float(r["seconds"])) for r in mrows if r["backend"] == be)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[k % len(colors)], label=be,
                        lw=2, ms=6)
        floor = sorted({(_prune_flops(r["shape"]), float(r["floor_s"])) for r in mrows})
        if floor:
            ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", lw=1, label="compute floor (fp32 matmul rate)")
        top: dict[float, tuple[float, str]] = {}
        for r in mrows:
            x = _prune_flops(r["shape"])
            top[x] = (max(top.get(x, (0.0, ""))[0], float(r["seconds"])), r["shape"])
        for x, (sec, shape) in top.items():
            ax.annotate(shape, (x, sec), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7,
                        color="0.35", rotation=30)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(y=0.2)
        ax.set_title(f"sparsity {mode}" if ":" not in mode else f"pattern {mode}")
        ax.set_xlabel("layer size: ⅓c³ + r·c² FLOPs (r × c = out × in)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("prune_layer time (s)")
    fig.suptitle(f"SparseGPT prune time per layer · {_subtitle(rows)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_sparse_matmul(rows: list[dict], out: str) -> str:
    """One panel per model; a line per layer shape (colour) and dtype (line style): 2:4 speedup vs token count."""
    plt = _plt()
    from matplotlib.ticker import FixedLocator, NullLocator

    has_sparse = any(r["speedup"] for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    dtypes = sorted({r["dtype"] for r in rows})
    styles = {dt: ls for dt, ls in zip(dtypes, ["-", "--", ":", "-."])}
    markers = {dt: m for dt, m in zip(dtypes, ["o", "s", "^", "v"])}
    ncol = min(3, len(models))
    nrow = (len(models) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow), squeeze=False, sharex=True,
                             sharey=has_sparse)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tokens = sorted({int(r["tokens"]) for r in rows})
    vals = [float(r["speedup"]) for r in rows if r["speedup"]]
    for k, model in enumerate(models):
        ax = axes[k // ncol][k % ncol]
        mrows = [r for r in rows if r["model"] == model]
        layers = list(dict.fromkeys((r["layer"], r["out_features"], r["in_features"]) for r in mrows))
        for c, (layer, o, i) in enumerate(layers):
            for dt in dtypes:
                pts = sorted((int(r["tokens"]), r) for r in mrows if r["layer"] == layer and r["dtype"] == dt)
                ys = [(t, float(r["speedup"] if has_sparse else r["dense_ms"])) for t, r in pts
                      if (r["speedup"] if has_sparse else r["dense_ms"])]
                if ys:
                    ax.plot([t for t, _ in ys], [y for _, y in ys], linestyle=styles[dt], marker=markers[dt], ms=4,
                            lw=1.6, color=colors[c % len(colors)],
                            label=f"{layer} {o}×{i}" if dt == dtypes[0] else None)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(tokens))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(tokens, [str(t) for t in tokens], fontsize=8)
        if has_sparse:
            ax.axhline(1.0, color="k", lw=1)
            lo = min(vals + [1.0]) * 0.95
            ax.axhspan(lo, 1.0, color="red", alpha=0.06, lw=0)
            ax.set_ylim(lo, max(vals + [1.0]) * 1.05)
        else:
            ax.set_yscale("log")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
        if k % ncol == 0:
            ax.set_ylabel("speedup of 2:4 over dense (×)" if has_sparse else "dense matmul time (ms)")
        if k // ncol == nrow - 1 or k + ncol >= len(models):
            ax.set_xlabel("tokens (rows of the activation)")
    for k in range(len(models), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    what = ("2:4 semi-structured vs dense linear (above 1 = sparse faster; shaded = sparse slower)" if has_sparse
            else "dense linear (2:4 semi-structured unsupported on this device)")
    style = ", ".join(f"{dt}: {'solid' if ls == '-' else 'dashed' if ls == '--' else 'dotted'}"
                      for dt, ls in styles.items())
    fig.suptitle(f"{what}\n{_subtitle(rows)} · {style}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_e2e(rows: list[dict], out: str) -> str:
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    phases = [ph for ph in ("prefill", "decode") if any(r["phase"] == ph for r in rows)]
    fig, axes = plt.subplots(len(models), len(phases), figsize=(5.2 * len(phases), 3.8 * len(models)), squeeze=False)
    w = 0.38
    for i, model in enumerate(models):
        for j, phase in enumerate(phases):
            ax = axes[i][j]
            prow = [r for r in rows if r["model"] == model and r["phase"] == phase]
            xs = list(range(len(prow)))
            dense = [float(r["dense_ms"]) for r in prow]
            sparse = [float(r["sparse_ms"]) if r["sparse_ms"] else 0.0 for r in prow]
            ax.bar([x - w / 2 for x in xs], dense, w, label="dense", color="tab:gray")
            ax.bar([x + w / 2 for x in xs], sparse, w, label="2:4 semi-structured", color="tab:green")
            for x, r, d, sp in zip(xs, prow, dense, sparse):
                txt = f"{float(r['speedup']):.2f}×" if r["speedup"] else "2:4 n/a"
                ax.text(x + w / 2 if sp else x, max(d, sp) * 1.02, txt, ha="center", va="bottom", fontsize=8)
            ax.set_xticks(xs, [f"batch {r['batch']}\nprompt {r['prompt']}" for r in prow], fontsize=8)
            ax.set_ylabel("ms per forward" if phase == "prefill" else "ms per token step")
            ax.margins(y=0.15)
            r0 = prow[0] if prow else rows[0]
            ax.set_title(f"{model} ({r0['params_m']} M, {r0['dtype']}, {r0['converted']} converted): {phase}",
                         fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"End-to-end latency, dense vs 2:4\n{_subtitle(rows)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_sparse_linear(rows: list[dict], out: str) -> str:
    """One panel per layer shape; a line per setting: the SparseLinear layer's speedup (its row kernel, panel kernel
    or decompressed weight, as it picks; the row kernel's in CSVs from before the panel kernel) over the better of
    torch's dense float32 and bfloat16 products against the token count (bench_sparse_linear.py's CSV)."""
    plt = _plt()
    from matplotlib.ticker import FixedLocator, NullLocator

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    tokens = sorted({int(r["tokens"]) for r in rows})
    key = "layer_speedup" if rows and rows[0].get("layer_speedup") else "speedup"
    vals = [float(r[key]) for r in rows]
    ncol = min(3, len(shapes))
    nrow = (len(shapes) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.9 * nrow), squeeze=False, sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, shape in enumerate(shapes):
        ax = axes[k // ncol][k % ncol]
        srows = [r for r in rows if r["shape"] == shape]
        for c, setting in enumerate(settings):
            pts = sorted((int(r["tokens"]), float(r[key])) for r in srows if r["setting"] == setting)
            if pts:
                ax.plot([t for t, _ in pts], [y for _, y in pts], marker="o", ms=4, lw=1.6,
                        linestyle="--" if "bit" in setting else "-", color=colors[c % len(colors)], label=setting)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(tokens))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(tokens, [str(t) for t in tokens], fontsize=8)
        ax.axhline(1.0, color="k", lw=1)
        lo = min(vals + [1.0]) * 0.95
        ax.axhspan(lo, 1.0, color="red", alpha=0.06, lw=0)
        ax.set_ylim(lo, max(vals + [1.0]) * 1.05)
        r0 = srows[0]
        ax.set_title(f"{shape} ({r0['rows']}×{r0['cols']})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.7, ncol=2)
        if k % ncol == 0:
            ax.set_ylabel("speedup over dense (×)")
        if k // ncol == nrow - 1 or k + ncol >= len(shapes):
            ax.set_xlabel("tokens (rows of the activation)")
    for k in range(len(shapes), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    r = rows[0]
    fig.suptitle("compressed sparse linear (ext_sparse_linear / ext_sparse_codes_linear) vs the better of dense "
                 f"float32 and bfloat16\n{_subtitle(rows)} · {r.get('simd', '?')}, read {r.get('read_gbps', '?')} "
                 "GB/s · above 1 = sparse faster; dashed = 4-bit codes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_dir(directory: str, devices: list[str] | None = None) -> list[str]:
    """Write every plot whose CSV exists in ``directory``; returns the PNG paths."""
    written = []
    found = devices or sorted({os.path.basename(p).rsplit("_", 1)[1][:-4]
                               for p in glob.glob(os.path.join(directory, "*_*.csv"))})
    for dev in found:
        for csv_name, png_name, fn in (("prune_layer", "prune_time", plot_prune),
                                       ("sparse_matmul", "sparse_matmul", plot_sparse_matmul),
                                       ("e2e", "e2e", plot_e2e),
                                       ("sparse_linear", "sparse_linear", plot_sparse_linear)):
            path = os.path.join(directory, f"{csv_name}_{dev}.csv")
            if not os.path.exists(path):
                continue
            rows = _read(path)
            if csv_name == "e2e":
                rows = [r for r in rows if r.get("phase")]
            if rows:
                written.append(fn(rows, os.path.join(directory, f"{png_name}_{dev}.png")))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(HERE, "results"))
    p.add_argument("--device", nargs="+", default=None, help="device suffixes (cpu, cuda); default: all found")
    args = p.parse_args(argv)
    for path in plot_dir(args.dir, args.device):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
