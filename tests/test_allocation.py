"""Non-uniform sparsity (allocation="owl" | "error") and sweeps, on tiny models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_model_pipeline import calib, tiny_llama, weights  # noqa: E402

from sparsegpt_kernels.model import allocation as alloc  # noqa: E402
from sparsegpt_kernels.model import prune_model  # noqa: E402


def _weighted_target(report) -> float:
    p = [r.shape[0] * r.shape[1] for r in report.layers]
    return sum(r.target_sparsity * n for r, n in zip(report.layers, p)) / sum(p)


def test_uniform_is_the_default_pipeline_bit_for_bit():
    a, b = tiny_llama(), tiny_llama()
    prune_model(a, calib(), sparsity=0.6, device="cpu")
    prune_model(b, calib(), sparsity=0.6, device="cpu", allocation="uniform")
    for (k, x), y in zip(weights(a).items(), weights(b).values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("allocation", ["owl", "error"])
@pytest.mark.parametrize("S", [0.5, 0.7, 0.95])
def test_global_budget_and_bounds(allocation, S):
    model = tiny_llama(layers=4)
    report = prune_model(model, calib(8), sparsity=S, allocation=allocation, device="cpu")
    targets = [r.target_sparsity for r in report.layers]
    assert abs(_weighted_target(report) - S) < 1e-6
    assert abs(report.mask_sparsity - S) <= 1e-3  # achieved, after the per-block rounding of the selection
    assert all(0 <= t <= 0.99 for t in targets) and len(set(round(t, 6) for t in targets)) > 1  # not uniform
    assert report.settings["allocation"] == allocation
    for r in report.layers:  # each layer reaches its own target
        assert abs(r.mask_sparsity - r.target_sparsity) <= 2 / (r.shape[0] * min(128, r.shape[1])) + 1e-9


def test_overrides_win_and_stay_out_of_the_budget():
    model = tiny_llama(layers=4)
    report = prune_model(model, calib(8), sparsity=0.7, allocation="owl", layer_sparsity={"*down_proj": 0.3},
                         device="cpu")
    downs = [r for r in report.layers if r.name.endswith("down_proj")]
    rest = [r for r in report.layers if not r.name.endswith("down_proj")]
    assert downs and all(r.target_sparsity == 0.3 for r in downs)
    p = [r.shape[0] * r.shape[1] for r in rest]
    assert abs(sum(r.target_sparsity * n for r, n in zip(rest, p)) / sum(p) - 0.7) < 1e-6


def test_patterns_are_refused():
    with pytest.raises(ValueError, match="N:M pattern '2:4' fixes every layer's sparsity"):
        prune_model(tiny_llama(), calib(), pattern="2:4", allocation="owl", device="cpu")
    with pytest.raises(ValueError, match="allocation must be one of"):
        prune_model(tiny_llama(), calib(), sparsity=0.5, allocation="random", device="cpu")


def test_owl_follows_the_outlier_ranking():
    """Outlier weights planted in block 2 (and fewer in block 0): those blocks are pruned least, in that order."""
    model = tiny_llama(layers=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b, count in ((2, 400), (0, 150)):
            for lin in (model.model.layers[b].mlp.up_proj, model.model.layers[b].self_attn.q_proj):
                idx = torch.randperm(lin.weight.numel(), generator=g)[:count]
                lin.weight.view(-1)[idx] *= 40
    report = prune_model(model, calib(8), sparsity=0.6, allocation="owl", device="cpu")
    per_block = {}
    for r in report.layers:
        per_block.setdefault(int(r.name.split(".")[2]), set()).add(r.target_sparsity)
    assert all(len(v) == 1 for v in per_block.values())  # one sparsity per block
    s = {b: v.pop() for b, v in per_block.items()}
    assert s[2] < s[0] < min(s[1], s[3]), s
    assert max(s.values()) - min(s.values()) == pytest.approx(2 * 0.08, abs=1e-6)  # the span is 2 lambda


def test_error_targets_equalise_marginal_costs():
    """Two layers with convex costs a·s² and b·s²: the optimum under the budget has 2a·s1 = 2b·s2 (equal params)."""
    xs = [0.4 + 0.05 * i for i in range(5)]
    curves = {"a": (xs, [1.0 * x * x for x in xs]), "b": (xs, [3.0 * x * x for x in xs])}
    sol = alloc.error_targets(curves, {"a": 100, "b": 100}, 0.5)
    assert sol["a"] + sol["b"] == pytest.approx(1.0, abs=1e-9)
    assert sol["a"] == pytest.approx(0.6, abs=0.01) and sol["b"] == pytest.approx(0.4, abs=0.01)


def test_grid_resumes_and_plots(tmp_path, monkeypatch):
    from sparsegpt_kernels.model import grid as grid_mod

    model = tiny_llama()
    ids = calib(4)
    ev = calib(2, seed=9)
    kw = dict(sparsities=[0.5, 0.7], methods=["magnitude", "sparsegpt"], allocations=["uniform", "owl"],
              device="cpu")
    rows = grid_mod.sparsity_grid(model, ids, ev, str(tmp_path), **kw)
    assert len(rows) == 1 + 2 * 2 * 2 and (tmp_path / "grid.csv").exists()
    calls = []
    real = grid_mod.prune_model
    monkeypatch.setattr(grid_mod, "prune_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = grid_mod.sparsity_grid(model, ids, ev, str(tmp_path), **kw)
    assert calls == [] and len(again) == len(rows)  # finished cells are not redone
    more = grid_mod.sparsity_grid(model, ids, ev, str(tmp_path), **{**kw, "sparsities": [0.5, 0.7, 0.8]})
    assert len(calls) == 4 and len(more) == len(rows) + 4
    grid_mod.plot(more, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 1000
    table = grid_mod.format_table(more)
    assert "| sparsegpt | owl |" in table and "80%" in table and "dense:" in table


def test_grid_refine_axis(tmp_path):
    """The refine axis: SparseGPT once per refinement, the other methods once; a grid.csv from before the refine
    column is still read (its rows have no refinement); an unknown refinement is refused."""
    from sparsegpt_kernels.model import grid as grid_mod

    model = tiny_llama()
    ids, ev = calib(4), calib(2, seed=9)
    kw = dict(sparsities=[0.7], methods=["magnitude", "sparsegpt"], allocations=["uniform"], device="cpu")
    rows = grid_mod.sparsity_grid(model, ids, ev, str(tmp_path), refines=["none", "admm"], **kw)
    got = {(r["method"], r["refine"]) for r in rows}
    assert got == {("dense", "none"), ("magnitude", "none"), ("sparsegpt", "none"), ("sparsegpt", "admm")}
    by = {(r["method"], r["refine"]): float(r["perplexity"]) for r in rows}
    assert by[("sparsegpt", "admm")] != by[("sparsegpt", "none")]  # the refinement ran
    table = grid_mod.format_table(rows)
    assert "| sparsegpt + admm | uniform |" in table and "| sparsegpt | uniform |" in table
    old = tmp_path / "old"
    old.mkdir()
    fields = [f for f in grid_mod.FIELDS if f != "refine"]
    lines = [",".join(fields)] + [",".join(r[f] for f in fields) for r in rows if r["refine"] == "none"]
    (old / "grid.csv").write_text("\n".join(lines) + "\n")
    again = grid_mod.sparsity_grid(model, ids, ev, str(old), **kw)  # nothing to redo
    assert len(again) == 3 and "| sparsegpt | uniform |" in grid_mod.format_table(again)
    more = grid_mod.sparsity_grid(model, ids, ev, str(old), refines=["admm"], **kw)  # one cell more, same columns
    assert len(more) == 4 and grid_mod._read(str(old / "grid.csv")) == more
    with pytest.raises(ValueError, match="unknown refinement 'bfgs'"):
        grid_mod.sparsity_grid(model, ids, ev, str(tmp_path), refines=["bfgs"], **kw)
