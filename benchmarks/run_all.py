"""The whole benchmark suite in one command, at sizes that fit the device, with CSV, PNG plots and a RESULTS.md section.

  1. pruning speed per layer shape, every available backend vs the published loop and the torch reference
     (bench_prune_layer.py);
  2. 2:4 semi-structured sparse matmul vs dense, OPT/LLaMA linear shapes, tokens 1..8192 (bench_sparse_matmul.py);
  3. end-to-end prefill/decode latency, dense vs 2:4 exported (bench_e2e.py);
  4. accuracy: the perplexity table of benchmarks/results/perplexity.md (written by bench_perplexity.py), if present.

Then plots (plot.py) and the section of RESULTS.md between ``<!-- suite:begin:<device> -->`` and
``<!-- suite:end:<device> -->`` (the rest of the file is kept; each device has its own section).

    python benchmarks/run_all.py                  # default sizes for the device -> benchmarks/results, RESULTS.md
    python benchmarks/run_all.py --quick          # tiny sizes (CI) -> benchmarks/out (not committed)
    python benchmarks/run_all.py --quick --out-dir /tmp/suite
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_e2e  # noqa: E402
import bench_prune_layer  # noqa: E402
import bench_sparse_matmul  # noqa: E402
import plot  # noqa: E402
from common import OUT_DIR, RESULTS_DIR, meta  # noqa: E402

#: Layer shapes (out x in) for the pruning benchmark on a CPU: SmolLM2-135M's plus square sizes for the trend.
CPU_PRUNE_SHAPES = ["256x256", "576x576", "1536x576", "576x1536", "1024x1024", "1024x2048"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "-"
    out["cuda"] = torch.version.cuda or "-"
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def _csv_table(path: str, cols: list[str]) -> str:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _img(png: str, md_path: str, alt: str) -> str:
    return f"![{alt}]({os.path.relpath(png, os.path.dirname(os.path.abspath(md_path)))})"


def update_section(md_path: str, device: str, body: str) -> None:
    """Replace (or append) the section between the device's markers, keeping the rest of the file."""
    begin, end = f"<!-- suite:begin:{device} -->", f"<!-- suite:end:{device} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = _read(md_path) + "\n" if os.path.exists(md_path) else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run), written under benchmarks/out")
    p.add_argument("--out-dir", default=None,
                   help="where CSV/PNG/markdown go (default: results/, or out/ with --quick)")
    p.add_argument("--results-md", default=None,
                   help="markdown file to update (default: benchmarks/RESULTS.md; <out-dir>/RESULTS.md with --quick)")
    p.add_argument("--perplexity-md", default=os.path.join(RESULTS_DIR, "perplexity.md"))
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded model in the end-to-end part")
    p.add_argument("--skip", nargs="+", default=[], choices=["prune", "matmul", "e2e"], help="parts to leave out")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dev = device.type
    gpu = dev == "cuda"
    out_dir = os.path.abspath(args.out_dir or (OUT_DIR if args.quick else RESULTS_DIR))
    md_path = args.results_md or (os.path.join(out_dir, "RESULTS.md") if args.quick
                                  else os.path.join(HERE, "RESULTS.md"))
    os.makedirs(out_dir, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    common = ["--device", args.device]
    files = {k: os.path.join(out_dir, f"{k}_{dev}.csv") for k in ("prune_layer", "sparse_matmul", "e2e")}

    steps = []
    if "prune" not in args.skip:
        sizes = [] if (args.quick or gpu) else ["--shapes", *CPU_PRUNE_SHAPES, "--repeats", "2"]
        steps.append(("1. pruning speed", bench_prune_layer.main,
                      [*common, *quick, *sizes, "--csv", files["prune_layer"]]))
    if "matmul" not in args.skip:
        steps.append(("2. sparse matmul", bench_sparse_matmul.main, [*common, *quick, "--csv", files["sparse_matmul"]]))
    if "e2e" not in args.skip:
        emb = [] if (args.quick or args.no_embedded) else ["--embedded"]
        steps.append(("3. end-to-end", bench_e2e.main, [*common, *quick, *emb, "--csv", files["e2e"]]))

    status: dict[str, str] = {}
    t_all = time.perf_counter()
    for name, fn, argv_ in steps:
        print(f"\n===== {name}: {' '.join(argv_)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = fn(argv_)
            status[name] = "ok" if not rc else f"exit code {rc}"
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' results
            traceback.print_exc()
            status[name] = f"failed: {type(e).__name__}: {e}"
        status[name] += f" ({time.perf_counter() - t0:.0f} s)"

    pngs = []
    try:
        pngs = plot.plot_dir(out_dir, [dev])
    except ImportError as e:
        status["plots"] = f"not drawn: {e} (install matplotlib)"
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        status["plots"] = f"failed: {type(e).__name__}: {e}"
    png = {os.path.basename(x).rsplit("_", 1)[0]: x for x in pngs}

    info, ver = meta(device), _versions()
    cmd = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + (f" --device {args.device}")
    body = [f"## Benchmark suite: {dev}{' (quick smoke run)' if args.quick else ''}", "",
            f"- date: {info['date']}; machine: {info['device']}; platform: {platform.platform(terse=True)}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + f"; commit {_commit()}",
            f"- command: `{cmd}` ({time.perf_counter() - t_all:.0f} s)", ""]
    body += [f"- {k}: {v}" for k, v in status.items()] + [""]

    body += ["### 1. Pruning speed per layer (prune_layer, every backend vs the published loop and the torch "
             "reference)", ""]
    if os.path.exists(files["prune_layer"]):
        body += [_csv_table(files["prune_layer"], ["shape", "mode", "backend", "seconds", "speedup_vs_published",
                                                   "speedup_vs_torch", "floor_s", "frac_of_floor", "loss_vs_torch",
                                                   "recon_vs_torch"]), "",
                 "published: the published SparseGPT loop (benchmarks/published_loop.py); speedup_vs_published / "
                 "speedup_vs_torch: its time / the backend's time, the same for the torch reference; frac_of_floor: "
                 "(⅓c³ + r·c²) FLOPs at the measured fp32 matmul rate / measured time (1.0 = at the compute floor); "
                 "recon_vs_torch: reconstruction error tr(ΔW H ΔWᵀ) over the torch backend's.", ""]
        if "prune_time" in png:
            body += [_img(png["prune_time"], md_path, "prune time vs layer size"), ""]
    else:
        body += ["_not run_", ""]

    body += ["### 2. 2:4 sparse matmul vs dense", ""]
    sm_md = os.path.splitext(files["sparse_matmul"])[0] + ".md"
    body += [_read(sm_md) if os.path.exists(sm_md) else "_not run_", ""]
    if "sparse_matmul" in png:
        body += [_img(png["sparse_matmul"], md_path, "2:4 speedup vs tokens"), ""]

    body += ["### 3. End-to-end latency, dense vs 2:4", ""]
    e2e_md = os.path.splitext(files["e2e"])[0] + ".md"
    body += [_read(e2e_md) if os.path.exists(e2e_md) else "_not run_", ""]
    if "e2e" in png:
        body += [_img(png["e2e"], md_path, "end-to-end latency"), ""]

    body += ["### 4. Accuracy (perplexity: dense / magnitude / Wanda / SparseGPT)", ""]
    if os.path.exists(args.perplexity_md):
        body += [_read(args.perplexity_md), ""]
    else:
        body += [f"_missing: {os.path.basename(args.perplexity_md)} was not found next to the committed results; "
                 "run benchmarks/bench_perplexity.py to produce it._", ""]

    update_section(md_path, dev, "\n".join(body))
    print(f"\nwrote {md_path}" + "".join(f"\n      {x}" for x in pngs))
    failed = [k for k, v in status.items() if not v.startswith("ok")]
    if failed:
        print(f"FAILED parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
