"""The benchmark suite runs end to end at tiny sizes and writes its CSV, PNG and markdown files."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
from helpers import require_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(ROOT, "benchmarks", "run_all.py")


def test_run_all_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    out = tmp_path / "suite"
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nhand-written notes stay.\n\n"
                  "<!-- suite:begin:cpu -->\nold\n<!-- suite:end:cpu -->\ntail\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # compiled backends only: the Triton interpreter has its own tests
    proc = subprocess.run([sys.executable, RUN_ALL, "--quick", "--device", "cpu", "--out-dir", str(out),
                           "--results-md", str(md), "--perplexity-md", str(tmp_path / "absent.md")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("prune_layer_cpu.csv", "sparse_matmul_cpu.csv", "e2e_cpu.csv", "sparse_matmul_cpu.md", "e2e_cpu.md",
                 "prune_time_cpu.png", "sparse_matmul_cpu.png", "e2e_cpu.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    for name in ("prune_time_cpu.png", "sparse_matmul_cpu.png", "e2e_cpu.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "sparse_matmul_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["speedup"] == "" and "unsupported" in r["status"] for r in rows)
    assert all(float(r["dense_ms"]) > 0 for r in rows)
    with open(out / "e2e_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert all(r["converted"].startswith("0/") and r["sparse_ms"] == "" for r in rows)
    with open(out / "prune_layer_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"published", "torch"} <= {r["backend"] for r in rows} and all(r["date"] and r["device"] for r in rows)
    secs = {(r["shape"], r["mode"], r["backend"]): float(r["seconds"]) for r in rows}
    for r in rows:  # every backend against the published loop and torch, from the same run's times, same quality
        published, torch_s = secs[(r["shape"], r["mode"], "published")], secs[(r["shape"], r["mode"], "torch")]
        assert float(r["speedup_vs_published"]) == pytest.approx(published / float(r["seconds"]), rel=0.02, abs=0.006)
        assert float(r["speedup_vs_torch"]) == pytest.approx(torch_s / float(r["seconds"]), rel=0.02, abs=0.006)
        assert abs(float(r["recon_vs_torch"]) - 1) < 0.05, r

    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written notes stay.")
    assert text.rstrip().endswith("tail") and "\nold\n" not in text
    assert text.count("<!-- suite:begin:cpu -->") == 1 and text.count("<!-- suite:end:cpu -->") == 1
    for needle in ("### 1.", "### 2.", "### 3.", "### 4.", "torch 2", "prune_time_cpu.png", "_missing: absent.md",
                   "No 2:4 sparse matmul on this device"):
        assert needle in text, needle


def test_the_sparse_linear_plot_is_drawn_from_the_benchmarks_csv(tmp_path, monkeypatch):
    """bench_sparse_linear.py --quick's CSV (a tiny layer, its three settings, 1, 5 and 40 tokens) gives a PNG beside
    it, and plot_dir draws nothing else from that directory."""
    pytest.importorskip("matplotlib")
    require_extension()
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_sparse_linear
    import plot

    csv_path = tmp_path / "sparse_linear_cpu.csv"
    assert bench_sparse_linear.main(["--quick", "--csv", str(csv_path)]) == 0
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["setting"], r["tokens"]) for r in rows} == {(s, t) for s in ("50%", "2:4", "50%+4bit")
                                                           for t in ("1", "5", "40")}
    # times and ratios as numbers (their values depend on the machine's load: a stalled call prints a ratio of 0.00)
    keys = ["dense_fp32_ms", "dense_bf16_ms", "sparse_ms", "speedup", "sparse_vs_floor", "prefill_ms", "layer_ms",
            "layer_speedup"]
    from sparsegpt_kernels.backends import extension

    panel = bool(extension.ops().ext_cpu_has_panel())
    assert all(math.isfinite(float(r[k])) and float(r[k]) >= 0 for r in rows
               for k in keys + (["panel_ms", "panel_speedup"] if panel else []))
    # the layer's path: the row kernel for decode; for 40 tokens the panel or the decompressed weight, as this
    # process measured them (only the decompressed weight without the panel)
    assert {r["path"] for r in rows if r["tokens"] == "1"} == {"kernel"}
    assert {r["path"] for r in rows if r["tokens"] == "40"} <= ({"panel", "prefill"} if panel else {"prefill"})
    written = plot.plot_dir(str(tmp_path))
    assert written == [str(tmp_path / "sparse_linear_cpu.png")]
    assert (tmp_path / "sparse_linear_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
