"""benchmarks/bench_scale.py: the projection model and a measured smoke run."""

from __future__ import annotations

import csv
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import bench_scale  # noqa: E402


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_projection_with_assumed_rates(tmp_path):
    out = tmp_path / "scale.csv"
    assert bench_scale.main(["--profile", "h200", "--csv", str(out)]) == 0
    rows = _rows(out)
    assert {r["model"] for r in rows} == set(bench_scale.MODELS) and (tmp_path / "scale.png").exists()
    for name in bench_scale.MODELS:
        mine = sorted((int(r["ranks"]), r) for r in rows if r["model"] == name)
        times = [float(r["model_min"]) for _, r in mine]
        assert all(a >= b for a, b in zip(times, times[1:])), (name, times)  # more processes never slower
        one = mine[0][1]
        assert float(one["reduce_s"]) == 0 and float(one["broadcast_s"]) == 0  # no communication alone
        # the busiest process never does less than the largest single layer: speed-up is capped by it
        assert float(mine[-1][1]["solve_s"]) >= max(bench_scale.solve_flops(r, c) for _, r, c, _ in
                                                    bench_scale.block_layers(bench_scale.MODELS[name])) / (
            bench_scale.H200["solve_tflops"] * 1e12) * 0.999


def test_block_shapes():
    layers = bench_scale.block_layers(bench_scale.MODELS["llama3-70b"])
    assert [(n, r, c) for n, r, c, _ in layers] == [
        ("q", 8192, 8192), ("k", 1024, 8192), ("v", 1024, 8192), ("o", 8192, 8192),
        ("gate", 28672, 8192), ("up", 28672, 8192), ("down", 8192, 28672)]
    moe = bench_scale.block_layers(bench_scale.MODELS["mixtral-8x22b"])
    assert len(moe) == 4 + 8 * 3 and {s for *_, s in moe[4:]} == {2 / 8}


def test_measured_quick_run(tmp_path):
    out = tmp_path / "scale.csv"
    assert bench_scale.main(["--quick", "--csv", str(out)]) == 0
    rows = _rows(out)
    assert rows and all(float(r["model_min"]) > 0 for r in rows)
