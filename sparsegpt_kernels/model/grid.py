"""The sparsity grid (``sparsegpt-kernels grid``): held-out perplexity over sparsities x methods x refinements x
allocations, as a table, a CSV and a plot (perplexity against sparsity, log scale, one line per method, refinement
and allocation, dense as a horizontal line). A refinement other than "none" applies to SparseGPT only. Not to be
confused with the column sweep of the solver (:mod:`sparsegpt_kernels.ops.sweep`).

Every cell prunes a fresh copy of the model with the same calibration and evaluation windows. Finished cells are
kept in ``<output>/grid.csv``: a rerun with the same output directory skips them.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from ..options import ALLOCATIONS, METHODS, REFINES, check_sparsity
from .evaluate import perplexity
from .pipeline import prune_model

#: the files a grid writes in its output directory
CSV, TABLE, PLOT = "grid.csv", "grid.md", "grid.png"
FIELDS = ["method", "refine", "allocation", "sparsity", "perplexity", "achieved", "prune_seconds", "eval_seconds"]


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(method: str, refine: str, allocation: str, sparsity: float) -> tuple:
    return method, refine, allocation, f"{sparsity:.4f}"


def _line(r: dict) -> tuple[str, str]:
    """A row's line of the table and the plot: (method, or "method + refinement", allocation). Rows of a grid.csv
    written before the refine column have no refinement."""
    refine = r.get("refine") or "none"
    return (r["method"] if refine == "none" else f"{r['method']} + {refine}"), r["allocation"]


def sparsity_grid(model: nn.Module, calibration: torch.Tensor, eval_ids: torch.Tensor, out_dir: str, *,
                  sparsities: list[float], methods: list[str], allocations: list[str], refines=("none",), device=None,
                  progress: bool = False, log: Callable[[str], None] | None = None, **prune_kwargs) -> list[dict]:
    """Run the grid (dense first), appending each finished cell to ``<out_dir>/grid.csv``; returns every row."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}: expected one of {', '.join(METHODS)}")
    for a in allocations:
        if a not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {a!r}: expected one of {', '.join(ALLOCATIONS)}")
    for r in refines:
        if r not in REFINES:
            raise ValueError(f"unknown refinement {r!r}: expected one of {', '.join(REFINES)}")
    for s in sparsities:
        check_sparsity(s)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CSV)
    rows = _read(path)
    if rows and "refine" not in rows[0]:  # a grid.csv from before the refine column: rewritten with it
        rows = [{**r, "refine": "none"} for r in rows]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    done = {_key(r["method"], r.get("refine") or "none", r["allocation"], float(r["sparsity"])) for r in rows}

    def emit(row: dict) -> None:
        rows.append(row)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        if log is not None:
            log(f"{' + '.join(_line(row)):>24} {float(row['sparsity']):>5.2f}  ppl "
                f"{float(row['perplexity']):10.3f}  achieved {float(row['achieved']):.4f}  prune "
                f"{float(row['prune_seconds']):6.1f} s")

    if _key("dense", "none", "-", 0.0) not in done:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, device=device, progress=progress)
        emit({"method": "dense", "refine": "none", "allocation": "-", "sparsity": f"{0.0:.4f}",
              "perplexity": f"{ppl:.6g}", "achieved": "0", "prune_seconds": "0",
              "eval_seconds": f"{time.perf_counter() - t0:.1f}"})
    for s in sparsities:
        for m in methods:
            for rf in refines if m == "sparsegpt" else ("none",):
                for a in allocations:
                    if _key(m, rf, a, s) in done:
                        continue
                    work = copy.deepcopy(model)
                    rep = prune_model(work, calibration, method=m, sparsity=s, allocation=a, refine=rf,
                                      device=device, progress=progress, **prune_kwargs)
                    t0 = time.perf_counter()
                    ppl = perplexity(work, eval_ids, device=device, progress=progress)
                    emit({"method": m, "refine": rf, "allocation": a, "sparsity": f"{s:.4f}",
                          "perplexity": f"{ppl:.6g}", "achieved": f"{rep.mask_sparsity:.6f}",
                          "prune_seconds": f"{rep.seconds:.1f}", "eval_seconds": f"{time.perf_counter() - t0:.1f}"})
                    del work
    return rows


def format_table(rows: list[dict], markdown: bool = True) -> str:
    """Perplexity, one row per method (and refinement) and allocation, one column per sparsity."""
    sparsities = sorted({float(r["sparsity"]) for r in rows if r["method"] != "dense"})
    dense = next((float(r["perplexity"]) for r in rows if r["method"] == "dense"), None)
    lines = ["| method | allocation | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    for m, a in dict.fromkeys(_line(r) for r in rows if r["method"] != "dense"):
        cells = []
        for s in sparsities:
            r = next((r for r in rows if _line(r) == (m, a) and float(r["sparsity"]) == s), None)
            cells.append("-" if r is None else f"{float(r['perplexity']):.2f}")
        lines.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    if dense is not None:
        lines.append(f"\ndense: {dense:.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> None:
    """Perplexity against sparsity (log scale), one line per method (and refinement) and allocation, dense as a
    horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"uniform": "-", "owl": "--", "error": ":"}
    for m, a in dict.fromkeys(_line(r) for r in rows if r["method"] != "dense"):
        pts = sorted((float(r["sparsity"]), float(r["perplexity"])) for r in rows
                     if _line(r) == (m, a) and math.isfinite(float(r["perplexity"])))
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle=styles.get(a, "-"), label=f"{m} ({a})")
    dense = next((float(r["perplexity"]) for r in rows if r["method"] == "dense"), None)
    if dense is not None:
        ax.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("held-out perplexity")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
