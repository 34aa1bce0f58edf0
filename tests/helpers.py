"""Shared test utilities: synthetic layers with realistic inputs and the reconstruction-error metric."""

from __future__ import annotations

import os

import pytest
import torch


def require_extension() -> None:
    """Skip (with the reason) when the compiled extension does not load; with SPARSEGPT_KERNELS_REQUIRE_EXT=1 (set
    by CI, which builds it) fail instead. Loads it as a side effect."""
    from sparsegpt_kernels.backends import extension

    reason = extension.missing_reason()
    if reason is not None:
        if os.environ.get("SPARSEGPT_KERNELS_REQUIRE_EXT", "").strip() == "1":
            pytest.fail(f"SPARSEGPT_KERNELS_REQUIRE_EXT=1 but {reason}")
        pytest.skip(reason)


def correlated_inputs(n: int, cols: int, *, outliers: int = 4, outlier_scale: float = 20.0, seed: int = 0,
                      dtype=torch.float32) -> torch.Tensor:
    """Inputs like a transformer's: strongly correlated features plus a few outlier features of large magnitude."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, cols // 4)
    Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    A = torch.randn(rank, cols, generator=g, dtype=torch.float64) / rank**0.5
    X = Z @ A + 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)
    idx = torch.randperm(cols, generator=g)[:outliers]
    X[:, idx] *= outlier_scale
    return X.to(dtype)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    """H = (2/n) XᵀX, as HessianAccumulator computes it."""
    return 2.0 / X.shape[0] * (X.T @ X)


def recon_error(X: torch.Tensor, W_dense: torch.Tensor, W_pruned: torch.Tensor) -> float:
    """||X Wᵀ − X Ŵᵀ||² in float64."""
    X = X.double()
    return float(((X @ W_dense.double().T - X @ W_pruned.double().T) ** 2).sum())


# prune_layer modes every compiled backend is checked in against the torch reference (cols must be a multiple of 40)
PRUNE_MODES = [
    pytest.param({"sparsity": 0.5}, id="50%"),
    pytest.param({"pattern": "2:4"}, id="2:4"),
    pytest.param({"pattern": "4:8"}, id="4:8"),
    pytest.param({"pattern": "1:4"}, id="1:4"),
    pytest.param({"pattern": "2:8"}, id="2:8"),
    pytest.param({"sparsity": 0.5, "quant_bits": 4}, id="50%-q4"),
    pytest.param({"sparsity": 0.5, "quant_bits": 4, "quant_group_size": 40}, id="50%-q4g40"),
    pytest.param({"pattern": "2:4", "quant_bits": 4, "quant_group_size": 40}, id="2:4-q4g40"),
]


# --------------------------------------------------------------------------------------------------------------------
# Checks that fail both ways: exact pattern counts, and masks equal to the reference's where no decision is a near-tie
# --------------------------------------------------------------------------------------------------------------------
def assert_exact_sparsity(W: torch.Tensor, *, block_size: int, sparsity: float = 0.5, pattern: str | None = None,
                          quantized: bool = False) -> None:
    """Exactly the zeros the spec asks for: ``m - n`` per group of every row for N:M, ``n_pruned(sparsity, ·)`` per
    column block for unstructured (too many zeros fails as well as too few). With joint quantization a kept weight can
    round to 0, so only "at least" is checked there."""
    from sparsegpt_kernels import reference
    from sparsegpt_kernels.options import parse_pattern

    W = W.detach().cpu()
    rows, cols = W.shape
    if pattern is not None:
        n, m = parse_pattern(pattern)
        zeros = (W == 0).reshape(rows, cols // m, m).sum(-1)
        bad = (zeros < m - n) if quantized else (zeros != m - n)
        assert not bool(bad.any()), f"{int(bad.sum())} groups of {m} without exactly {m - n} zeros"
        return
    for i1 in range(0, cols, block_size):
        blk = W[:, i1 : i1 + block_size]
        want = reference.n_pruned(sparsity, blk.numel())
        got = int((blk == 0).sum())
        assert (got >= want) if quantized else (got == want), f"block at column {i1}: {got} zeros, want {want}"


def decision_margin(W: torch.Tensor, U: torch.Tensor, spec) -> float:
    """The smallest relative gap, over every decision the reference sweep makes on (W, U) in float64, between the
    scores (or quantization levels) that decide it: for an unstructured block the k-th and (k+1)-th smallest scores,
    for an N:M group the largest pruned and the smallest kept score, for a quantized weight the distance of w / scale
    from the nearest rounding boundary. Exact ties between exact zeros (dead columns) are not near-ties: every
    implementation sees the same zeros. A float32 implementation whose relative error is well below this margin must
    make every decision as the reference does. The decisions are the reference's own (its ``observe`` hook)."""
    import dataclasses

    from sparsegpt_kernels import reference
    from sparsegpt_kernels.spec import QuantGrid

    margin = float("inf")

    def gap(lo: torch.Tensor, hi: torch.Tensor) -> float:
        both_zero = (lo == 0) & (hi == 0)
        rel = (hi - lo) / hi.abs().clamp_min(1e-300)
        rel = torch.where(both_zero, torch.full_like(rel, float("inf")), rel)
        return float(rel.min()) if rel.numel() else float("inf")

    def observe(kind: str, *args) -> None:
        nonlocal margin
        if kind == "block":
            scores, k = args
            if 0 < k < scores.numel():
                srt = torch.sort(scores.reshape(-1)).values
                margin = min(margin, gap(srt[k - 1 : k], srt[k : k + 1]))
        elif kind == "group":
            srt = torch.sort(args[0], dim=1).values
            cut = spec.m - spec.n
            margin = min(margin, gap(srt[:, cut - 1], srt[:, cut]))
        else:  # "round": a pruned weight is exactly 0, on the grid in every implementation
            q, scale = args
            x = q / scale
            live = q != 0
            if bool(live.any()):
                margin = min(margin, float((x - torch.floor(x) - 0.5).abs()[live].min()))

    q = spec.quant
    spec64 = spec if q is None else dataclasses.replace(
        spec, quant=QuantGrid(q.scale.double().cpu(), q.zero.double().cpu(), q.maxq, q.group_size))
    reference.sweep(W.detach().double().cpu().clone(), U.detach().double().cpu(), spec64, observe=observe)
    return margin


def problem_without_near_ties(rows: int, cols: int, spec, *, tol: float = 1e-4, dead: int = 0, seed: int = 0,
                              tries: int = 200, quant_bits: int | None = None, quant_group: int | None = None):
    """A layer (X, W, H) whose reference sweep under ``spec`` has no decision closer than ``tol`` (relative) to a tie
    (:func:`decision_margin`), searched over seeds; ``spec.quant`` is replaced by the layer's own grid when
    ``quant_bits`` is given. Returns (X, W, H, U, spec) with U the float64 inverse factor, all float64 on the CPU."""
    import dataclasses

    from sparsegpt_kernels import reference

    for attempt in range(tries):
        s = seed + 1000 * attempt
        X = correlated_inputs(max(4 * cols, 256), cols, seed=s, dtype=torch.float64)
        if dead:
            X[:, torch.randperm(cols, generator=torch.Generator().manual_seed(s))[:dead]] = 0
        H = hessian_of(X)
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(s + 1), dtype=torch.float64)
        W[:, H.diagonal() == 0] = 0
        grid = reference.make_quant_grid(W.float(), quant_bits, quant_group) if quant_bits else None
        sp = dataclasses.replace(spec, quant=grid)
        U = reference.inverse_factor(H, 0.01)
        if decision_margin(W.float(), reference.inverse_factor(H.float(), 0.01), sp) >= tol:
            return X, W, H, U, sp
    raise AssertionError(f"no seed in {tries} tries gives a {rows}x{cols} problem without near-ties at {tol}")


def spec_of(kw: dict, block_size: int):
    """The SweepSpec that ``prune_layer(**kw, block_size=...)`` runs (without its quantization grid)."""
    from sparsegpt_kernels.options import parse_pattern
    from sparsegpt_kernels.spec import SweepSpec

    if "pattern" in kw:
        n, m = parse_pattern(kw["pattern"])
        return SweepSpec(sparsity=1 - n / m, n=n, m=m, block_size=block_size)
    return SweepSpec(sparsity=kw.get("sparsity", 0.5), n=None, m=None, block_size=block_size)


def check_backend_like_torch(backend: str, device: str, kw: dict, *, rows: int, cols: int, block_size: int,
                             dead: int = 0, seed: int = 0, tol: float = 3e-4) -> None:
    """prune_layer on ``backend``/``device`` against the torch backend (float32, CPU) on a layer without near-ties:
    the same zeros (masks), exactly the zero counts the spec asks for, the same loss and weights up to float32
    rounding, and a reconstruction error within 1% either way."""
    import sparsegpt_kernels as sk

    spec = spec_of(kw, min(block_size, cols))
    X, W, H, _, _ = problem_without_near_ties(rows, cols, spec, tol=tol, dead=dead, seed=seed,
                                              quant_bits=kw.get("quant_bits"), quant_group=kw.get("quant_group_size"))
    W32, H32 = W.float(), H.float()
    Wt = W32.clone()
    rt = sk.prune_layer(Wt, H32, block_size=block_size, backend="torch", **kw)
    Wk = W32.to(device, copy=True)
    rk = sk.prune_layer(Wk, H32.to(device), block_size=block_size, backend=backend, **kw)
    Wk = Wk.cpu()
    assert rk.backend == backend and rk.dead_columns == dead
    assert torch.equal(Wk == 0, Wt == 0), f"{int(((Wk == 0) != (Wt == 0)).sum())} zeros differ from the torch backend's"
    assert_exact_sparsity(Wk, block_size=min(block_size, cols), sparsity=spec.sparsity, pattern=kw.get("pattern"),
                          quantized="quant_bits" in kw)
    assert rk.sparsity == rt.sparsity
    assert abs(rk.loss - rt.loss) <= 1e-3 * rt.loss + 1e-9, (rk.loss, rt.loss)
    scale = float(Wt.abs().max())
    assert float((Wk - Wt).abs().max()) <= 1e-3 * scale, float((Wk - Wt).abs().max())
    e_k, e_t = recon_error(X, W32, Wk), recon_error(X, W32, Wt)
    assert abs(e_k - e_t) <= 0.01 * e_t + 1e-9, (e_k, e_t)
