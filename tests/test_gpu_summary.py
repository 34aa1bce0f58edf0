"""benchmarks/gpu_summary.py reads the CSVs the benchmark scripts write (column names included) and marks each GPU
target met or missed; checked here on CPU-sized runs of the same scripts with stand-in backend names."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(*args: str, env=None) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _rename_backend(path: str, old: str, new: str, shape: str | None = None) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["backend"] == old:
            r["backend"] = new
        if shape is not None:
            r["shape"] = shape
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _rewrite(path: str, edit) -> None:
    """Rewrite a CSV's rows with ``edit(rows) -> rows``."""
    with open(path, newline="") as f:
        rows = edit(list(csv.DictReader(f)))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _cells(out: str, prefix: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def test_phase_a_summary(tmp_path):
    """The summary reads the benchmarks' CSVs as they write them, and marks each target both ways: a backend that
    meets it ("yes") and one that misses it ("**NO**"), from the numbers of the same run."""
    d = str(tmp_path)
    csv_path = os.path.join(d, "prune_layer_triton.csv")
    _run(os.path.join(BENCH, "bench_prune_layer.py"), "--device", "cpu", "--shapes", "64x128", "--modes", "0.5",
         "--backends", "torch", "cpp", "--repeats", "1", "--peak-tflops", "1", "--csv", csv_path)
    _rename_backend(csv_path, "cpp", "triton", shape="4096x4096")  # a target shape: the marks must be filled

    def two_targets(rows):  # 4096x4096 meets both targets (25x torch, 2x the floor), 11008x4096 misses both
        tri = next(r for r in rows if r["backend"] == "triton")
        tri.update(speedup_vs_torch="25", frac_of_floor="0.5", loss_vs_torch="1.0001")
        return rows + [{**tri, "shape": "11008x4096", "speedup_vs_torch": "5", "frac_of_floor": "0.1",
                        "loss_vs_torch": "1.01"}]

    _rewrite(csv_path, two_targets)
    pub_path = os.path.join(d, "prune_layer_published.csv")
    _run(os.path.join(BENCH, "bench_prune_layer.py"), "--device", "cpu", "--shapes", "64x128", "--modes", "2:4",
         "--backends", "torch", "--repeats", "1", "--peak-tflops", "1", "--csv", pub_path)

    def faster_and_slower(rows):
        torch_row = next(r for r in rows if r["backend"] == "torch")
        torch_row["speedup_vs_published"] = "1.5"
        return rows + [{**torch_row, "shape": "128x128", "speedup_vs_published": "0.8"}]

    _rewrite(pub_path, faster_and_slower)
    with open(os.path.join(d, "steps.tsv"), "w") as f:
        f.write("triton_tests\tok\t12\t150\nprune_layer\tFAILED\t91\t90\n")
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "A", d)
    assert _cells(out, "| 64x128 | 2:4 |")[4:6] == ["1.50x", "yes"]  # torch vs the published loop
    assert _cells(out, "| 128x128 | 2:4 |")[4:6] == ["0.80x", "**NO**"]
    assert os.path.exists(os.path.join(d, "summary.md"))
    assert "| prune_layer | FAILED | 91 | 90 |" in out
    meets = _cells(out, "| 4096x4096 | 0.5 |")
    assert meets[4:] == ["25.0x", "yes", "2.00x", "yes", "1.0e-04", "yes"]
    misses = _cells(out, "| 11008x4096 | 0.5 |")
    assert misses[4:] == ["5.0x", "**NO**", "10.00x", "**NO**", "1.0e-02", "**NO**"]
    assert "(no profile.csv)" in out
    _run(os.path.join(BENCH, "profile_prune_layer.py"), "--device", "cpu", "--shape", "64x128", "--modes", "0.5",
         "2:4", "--backends", "torch", "--top", "3", "--csv", os.path.join(d, "profile.csv"))
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "A", d)
    prof = out.split("## Where a triton prune_layer call")[1]
    assert "| torch | 0.5 |" in prof and "| torch | 2:4 |" in prof


def test_phase_a_refine_table(tmp_path):
    """The refinement's table: each refined call against the same backend's call without refinement in the phase,
    from the CSVs bench_prune_layer.py writes with and without --refine."""
    d = str(tmp_path)
    for name, extra in (("prune_layer_triton.csv", []), ("prune_layer_refine.csv", ["--refine", "admm"])):
        path = os.path.join(d, name)
        _run(os.path.join(BENCH, "bench_prune_layer.py"), "--device", "cpu", "--shapes", "64x128", "--modes", "2:4",
             "--backends", "torch", "cpp", "--repeats", "1", "--peak-tflops", "1", "--no-published", *extra,
             "--csv", path)
        _rename_backend(path, "cpp", "triton")
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "A", d)
    table = out.split('## refine="admm" on the GPU, per layer')[1].split("##")[0]
    rows = {}
    with open(os.path.join(d, "prune_layer_refine.csv"), newline="") as f:
        for r in csv.DictReader(f):
            rows[r["backend"]] = r
    with open(os.path.join(d, "prune_layer_triton.csv"), newline="") as f:
        sweep = {r["backend"]: r for r in csv.DictReader(f)}
    cells = _cells(table.strip(), "| 64x128 | 2:4 | triton |")
    assert cells[3:5] == [sweep["triton"]["seconds"], rows["triton"]["seconds"]]
    assert cells[5] == f"{float(rows['triton']['seconds']) / float(sweep['triton']['seconds']):.2f}x"
    assert cells[6] == rows["triton"]["refined_vs_sweep"] and float(cells[6]) < 1  # the refinement gains
    assert rows["triton"]["refine"] == "admm" and sweep["triton"]["refine"] == "none"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "(no prune_layer_refine.csv)" in _run(os.path.join(BENCH, "gpu_summary.py"), "A", str(empty))


def test_phase_b_summary(tmp_path):
    d = str(tmp_path)
    csv_path = os.path.join(d, "prune_layer_cuda.csv")
    _run(os.path.join(BENCH, "bench_prune_layer.py"), "--device", "cpu", "--shapes", "64x128", "--modes", "2:4",
         "--backends", "torch", "cpp", "--repeats", "1", "--peak-tflops", "1", "--csv", csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append({**rows[-1], "backend": "triton", "seconds": "1e9"})  # a slower triton: cuda is "faster"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _rename_backend(csv_path, "cpp", "cuda")
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "B", d)
    prune, auto = out.split("## triton or cuda")[0], out.split("## triton or cuda")[1].split("## 2:4")[0]
    assert "| 64x128 | 2:4 |" in prune
    row = next(ln for ln in auto.splitlines() if ln.startswith("| 64x128 | 2:4 |"))
    assert row.split("|")[-2].strip() == "cuda"
    assert "(no sparse timings in sparse_matmul.csv)" in out


def test_gpu_check_phases_fit_five_minutes():
    """The step limits of each phase of benchmarks/gpu_check.sh add up to at most 300 s (a phase's whole budget)."""
    import re

    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        text = f.read()
    a_part, rest = text.split('if [ "$PHASE" = "A" ]; then', 1)[1].split('elif [ "$PHASE" = "C" ]; then', 1)
    c_part, b_part = rest.split("\nelse\n", 1)
    b_part = b_part.split("\nfi\n", 1)[0]
    for part, least in ((a_part, 4), (b_part, 4), (c_part, 2)):
        limits = [int(x) for x in re.findall(r"^\s*step \w+ (\d+) ", part, flags=re.M)]
        assert len(limits) >= least and sum(limits) <= 300, limits


def test_phase_c_summary(tmp_path):
    """The whole-model table from bench_prune_model.py's --random-weights CSV (a toy config on the CPU)."""
    d = str(tmp_path)
    _run(os.path.join(BENCH, "bench_prune_model.py"), "--device", "cpu", "--config", "tiny", "--random-weights",
         "--quick", "--settings", "50%", "--csv", os.path.join(d, "prune_model_7b_50.csv"))
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "C", d)
    with open(os.path.join(d, "prune_model_7b_50.csv"), newline="") as f:
        (rec,) = list(csv.DictReader(f))
    assert rec["config"] == "tiny" and rec["blocks"] == "2" and float(rec["published_loop_s"]) >= 0
    row = next(ln for ln in out.splitlines() if ln.startswith("| 50% |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # the table is the CSV's: total (one decimal), phases, the published loop's time for the same layers, the mark
    assert cells[2] == rec["hessian_products"] == "float32"
    assert cells[3] == f"{float(rec['total']):.1f}" and cells[4:7] == [rec["forward"], rec["hessians"], rec["solves"]]
    assert cells[7] == rec["published_loop_s"] and cells[8] == rec["vs_published"]
    assert cells[10] == "yes"  # a toy model: well under the 60 s target


def test_phase_c_hessian_products_table(tmp_path):
    """bench_hessian_products.py on the CPU (where the input products are the float32 path: the same Hessians, masks
    and perplexity) and its table in the phase C summary."""
    d = str(tmp_path)
    _run(os.path.join(BENCH, "bench_hessian_products.py"), "--device", "cpu", "--quick", "--csv",
         os.path.join(d, "hessian_products.csv"))
    with open(os.path.join(d, "hessian_products.csv"), newline="") as f:
        recs = list(csv.DictReader(f))
    layers = [r for r in recs if r["part"] == "hessian"]
    assert len(layers) == 2 * 7 and all(float(r["rel_max_err"]) < 1e-6 for r in layers)
    assert all(r["uses_input_products"] == "False" for r in layers)  # no CUDA here
    by = {r["products"]: r for r in recs if r["part"] == "model"}
    assert by["input"]["perplexity"] == by["float32"]["perplexity"] and float(by["input"]["mask_differs"]) == 0
    out = _run(os.path.join(BENCH, "gpu_summary.py"), "C", d)
    assert "## Hessian products on the tensor cores" in out
    row = next(ln for ln in out.splitlines() if ln.startswith("| model |") and "| input |" in ln)
    assert by["input"]["perplexity"] in row
