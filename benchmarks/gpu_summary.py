"""The short table benchmarks/gpu_check.sh prints last: each step's status and the GPU targets, measured against what
the same run measured.

    python benchmarks/gpu_summary.py A|B|C DIR     # DIR holds steps.tsv and the phase's CSVs; writes DIR/summary.md

Targets (same card, same run):
  A  Triton prune_layer >= 20x the torch backend at 4096x4096 and 11008x4096 (50% and 2:4), within 3x of the fp32
     floor ((1/3 c^3 + r c^2) FLOPs at the card's measured fp32 matmul rate); losses within 1e-3 of torch's; the
     torch backend never slower than the published loop.
  B  cuda backend >= 10x the torch backend at the same shapes; which of triton / cuda is faster per shape (what
     backend="auto" should pick); 2:4 semi-structured matmul and end-to-end speedups over dense.
"""

from __future__ import annotations

import csv
import os
import sys

TARGET_SHAPES = ("4096x4096", "11008x4096")


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**NO**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _steps(d: str) -> list[str]:
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(d, "steps.tsv"))] if os.path.exists(
        os.path.join(d, "steps.tsv")) else []
    return _table(["step", "status", "seconds", "limit s"], rows)


def _prune(d: str, fname: str, backend: str, speedup_target: float, floor_target: float | None) -> list[str]:
    rows = _read(os.path.join(d, fname))
    if not rows:
        return [f"(no {fname})"]
    by = {(r["shape"], r["mode"], r["backend"]): r for r in rows}
    out = []
    for (shape, mode, be), r in by.items():
        if be != backend:
            continue
        t = by.get((shape, mode, "torch"))
        sp = float(r["speedup_vs_torch"])
        target = shape in TARGET_SHAPES
        frac = float(r["frac_of_floor"])
        over = 1 / frac if frac > 0 else float("inf")  # time / floor
        loss_rel = abs(float(r["loss_vs_torch"]) - 1) if r.get("loss_vs_torch", "-") != "-" else float("nan")
        out.append([
            shape, mode, t["seconds"] if t else "-", r["seconds"], f"{sp:.1f}x",
            _mark(sp >= speedup_target) if target else "-", f"{over:.2f}x",
            _mark(over <= floor_target) if (target and floor_target) else "-",
            f"{loss_rel:.1e}", _mark(loss_rel <= 1e-3),
        ])
    head = ["shape", "mode", "torch s", f"{backend} s", "speedup", f">= {speedup_target:g}x",
            "time / floor", f"<= {floor_target:g}x" if floor_target else "floor target", "loss vs torch", "<= 1e-3"]
    return _table(head, out)


def _refine(d: str) -> list[str]:
    """refine="admm" per layer (prune_layer_refine.csv) against the same backend's sweep alone in this phase
    (prune_layer_triton.csv): the time with refinement over the time without, and the refined loss over the
    sweep's."""
    rows = _read(os.path.join(d, "prune_layer_refine.csv"))
    if not rows:
        return ["(no prune_layer_refine.csv)"]
    sweep = {(r["shape"], r["mode"], r["backend"]): r for r in _read(os.path.join(d, "prune_layer_triton.csv"))}
    out = []
    for r in rows:
        if r.get("refine", "none") == "none":
            continue
        s = sweep.get((r["shape"], r["mode"], r["backend"]))
        ratio = f"{float(r['seconds']) / float(s['seconds']):.2f}x" if s else "-"
        out.append([r["shape"], r["mode"], r["backend"], s["seconds"] if s else "-", r["seconds"], ratio,
                    r["refined_vs_sweep"]])
    return _table(["shape", "mode", "backend", "sweep s", "sweep + refine s", "time ratio", "refined / sweep loss"],
                  out)


def _auto(d: str) -> list[str]:
    rows = _read(os.path.join(d, "prune_layer_cuda.csv"))
    by = {(r["shape"], r["mode"], r["backend"]): float(r["seconds"]) for r in rows}
    out = []
    for shape, mode in sorted({(s, m) for s, m, _ in by}):
        t, c = by.get((shape, mode, "triton")), by.get((shape, mode, "cuda"))
        if t is not None and c is not None:
            out.append([shape, mode, f"{t:.4f}", f"{c:.4f}", "triton" if t <= c else "cuda"])
    return _table(["shape", "mode", "triton s", "cuda s", "faster"], out) if out else ["(no triton/cuda pair)"]


def _speedups(d: str, fname: str, keys: list[str]) -> list[str]:
    rows = [r for r in _read(os.path.join(d, fname)) if r.get("speedup")]
    if not rows:
        return [f"(no sparse timings in {fname})"]
    cols = {"dense_ms": "dense ms", "sparse_ms": "sparse ms", "speedup": "speedup"}
    if "speedup_graph" in rows[0]:  # sparse_matmul.csv: the same products replayed from CUDA graphs
        cols.update(dense_graph_ms="dense graph ms", sparse_graph_ms="sparse graph ms", speedup_graph="graph speedup")
    return _table([*keys, *cols.values()], [[r[k] for k in [*keys, *cols]] for r in rows])


def _published(d: str) -> list[str]:
    """The torch backend against the published loop (it must never be slower)."""
    rows = [r for r in _read(os.path.join(d, "prune_layer_published.csv")) if r["backend"] == "torch"]
    if not rows:
        return ["(no prune_layer_published.csv)"]
    out = []
    for r in rows:
        sp = float(r["speedup_vs_published"])
        out.append([r["shape"], r["mode"], f"{float(r['seconds']) * sp:.4f}", r["seconds"], f"{sp:.2f}x",
                    _mark(sp >= 1.0)])
    return _table(["shape", "mode", "published s", "torch s", "speedup", ">= 1x"], out)


def _profile(d: str) -> list[str]:
    """One profiled prune_layer call per backend and mode: wall vs device time, launches, the top kernel."""
    rows = _read(os.path.join(d, "profile.csv"))
    if not rows:
        return ["(no profile.csv)"]
    out, seen = [], set()
    for r in rows:  # rows come biggest kernel first within each (backend, mode)
        key = (r["backend"], r["mode"])
        if key in seen:
            continue
        seen.add(key)
        wall, dev = float(r["wall_s"]), float(r["device_s"])
        out.append([r["backend"], r["mode"], r["wall_s"], r["device_s"], f"{dev / wall:.2f}" if wall else "-",
                    r["launches"], f"{r['kernel'][:60]} ({r['share_of_device']})"])
    return _table(["backend", "mode", "wall s", "device s", "device / wall", "launches", "top kernel (share)"], out)


def _whole_model(d: str) -> list[str]:
    rows = []
    for name in sorted(f for f in os.listdir(d) if f.startswith("prune_model_") and f.endswith(".csv")):
        for r in _read(os.path.join(d, name)):
            total = float(r["total"])
            rows.append([r["setting"], r["backend"], r.get("hessian_products", "float32"), f"{total:.1f}",
                         r["forward"], r["hessians"], r["solves"],
                         r.get("published_loop_s") or "-", r.get("vs_published") or "-", r.get("peak_gib", "-"),
                         _mark(total < 60)])
    if not rows:
        return ["_no prune_model CSV_"]
    return _table(["setting", "backend", "Hessian products", "total s", "forward", "hessians", "solves",
                   "published loop s",
                   "vs published", "peak GiB", "< 60 s"], rows)


def _hessian_products(d: str) -> list[str]:
    path = os.path.join(d, "hessian_products.csv")
    if not os.path.exists(path):
        return ["_no hessian_products.csv_"]
    rows = [[r["part"], r["name"], r["products"], r["rel_max_err"] or "-", r["rel_fro_err"] or "-",
             r["mask_differs"] or "-", r["perplexity"] or "-"] for r in _read(path)]
    return _table(["part", "layer / model", "products", "max err / max |H|", "Frobenius err", "masks differ",
                   "perplexity"], rows)


def main(argv: list[str]) -> int:
    phase, d = argv
    lines = [f"# GPU check, phase {phase}", ""]
    machine = os.path.join(d, "machine.txt")
    if os.path.exists(machine):
        lines += ["```", open(machine).read().strip(), "```", ""]
    lines += ["## Steps", "", *_steps(d), ""]
    if phase == "A":
        lines += ["## prune_layer: triton vs torch", "", *_prune(d, "prune_layer_triton.csv", "triton", 20, 3), ""]
        lines += ["## torch backend vs the published loop", "", *_published(d), ""]
        lines += ["## refine=\"admm\" on the GPU, per layer", "", *_refine(d), ""]
        lines += ["## Where a triton prune_layer call spends its time (4096x4096)", "", *_profile(d), ""]
    elif phase == "C":
        lines += ["## A LLaMA-2-7B-shaped model pruned end to end (target: < 60 s)", "", *_whole_model(d), ""]
        lines += ["## Hessian products on the tensor cores against float32 and float64 (SmolLM2-135M)", "",
                  *_hessian_products(d), ""]
    else:
        lines += ["## prune_layer: cuda vs torch", "", *_prune(d, "prune_layer_cuda.csv", "cuda", 10, None), ""]
        lines += ["## triton or cuda (what backend=\"auto\" should pick)", "", *_auto(d), ""]
        lines += ["## Where a cuda prune_layer call spends its time (4096x4096)", "", *_profile(d), ""]
        lines += ["## 2:4 semi-structured matmul vs dense", "",
                  *_speedups(d, "sparse_matmul.csv", ["model", "layer", "dtype", "tokens"]), ""]
        lines += ["## End to end (2:4 exported vs dense)", "",
                  *_speedups(d, "e2e.csv", ["model", "phase", "batch", "prompt"]), ""]
    text = "\n".join(lines)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
