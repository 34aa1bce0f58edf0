"""The Triton column sweep and its unstructured selection against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import correlated_inputs, hessian_of, recon_error

from sparsegpt_kernels import reference
from sparsegpt_kernels.ops.sweep import sweep_triton, unstructured_prune_mask_triton
from sparsegpt_kernels.spec import SweepSpec


# --------------------------------------------------------------------------------------------------------------------
# Unstructured selection: exact k, ties in row-major order
# --------------------------------------------------------------------------------------------------------------------
def _scores(kind: str, shape) -> torch.Tensor:
    if kind == "randn":  # negative scores too: the selection handles any float order
        return torch.randn(shape)
    if kind == "ties":
        return torch.randint(0, 3, shape).float()
    if kind == "zeros_and_signed_zero":
        s = torch.where(torch.rand(shape) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        s[..., ::3] = 1.0
        return s
    if kind == "tiny_and_inf":
        s = torch.randn(shape).abs() * 1e-38
        s.view(-1)[::5] = float("inf")
        return s
    raise ValueError(kind)


@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (129, 40), (300, 64)])
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros_and_signed_zero", "tiny_and_inf"])
def test_unstructured_mask_matches_reference(shape, kind, poison_empty):
    """(300, 64) is 150 rows of the op's 128-wide layout: three row tiles under the interpreter, so ties are ranked
    across tiles."""
    s = _scores(kind, shape)
    n = s.numel()
    for k in sorted({0, 1, n // 3, reference.n_pruned(0.5, n), n - 1, n}):
        got = unstructured_prune_mask_triton(s, k)
        assert torch.equal(got, reference.unstructured_prune_mask(s, k)), k
        assert int(got.sum()) == k


@pytest.mark.parametrize("sum_ties_max", [0, 1024])
def test_tie_ranks_summed_in_kernel_or_on_the_stream(sum_ties_max, monkeypatch, poison_empty):
    """The mask kernel adds up the tie counts of the tiles before its own (up to SUM_TIES_MAX tiles) or reads them
    as prefix sums computed before it: the same mask either way, with ties in every tile (5 tiles here)."""
    from sparsegpt_kernels.ops import sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "SUM_TIES_MAX", sum_ties_max)
    s = torch.randint(0, 3, (600, 64), generator=torch.Generator().manual_seed(4)).float()
    for k in (1, 9000, reference.n_pruned(0.5, s.numel()), 26000):
        got = unstructured_prune_mask_triton(s, k)
        assert torch.equal(got, reference.unstructured_prune_mask(s, k)), k


# --------------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------------
def _problem(rows: int, cols: int, dead: int = 0, seed: int = 0):
    X = correlated_inputs(4 * cols, cols, seed=seed)
    if dead:
        X[:, torch.randperm(cols)[:dead]] = 0
    H = hessian_of(X)
    W = torch.randn(rows, cols)
    W[:, H.diagonal() == 0] = 0  # as prune_layer does before the sweep
    U = reference.inverse_factor(H, 0.01).contiguous()
    return X, W, U


MODES = {
    "50%": dict(sparsity=0.5, n=None, m=None),
    "30%": dict(sparsity=0.3, n=None, m=None),
    "2:4": dict(sparsity=0.5, n=2, m=4),
    "1:4": dict(sparsity=0.75, n=1, m=4),
    "2:8": dict(sparsity=0.75, n=2, m=8),
    "4:8": dict(sparsity=0.5, n=4, m=8),
}


def _run_both(W, U, mode, block, quant=None):
    spec = SweepSpec(block_size=block, quant=quant, **mode)
    Wr = W.clone()
    loss_ref = reference.sweep(Wr, U, spec)
    Wk = W.clone()
    kw = {}
    if quant is not None:
        kw = dict(qscale=quant.scale, qzero=quant.zero, maxq=quant.maxq, qgroup=quant.group_size)
    loss = float(sweep_triton(Wk, U, sparsity=mode["sparsity"], n=mode["n"], m=mode["m"], block_size=block, **kw))
    return Wr, loss_ref, Wk, loss


def _check(X, W, Wr, loss_ref, Wk, loss, mode, block):
    rows, cols = W.shape
    assert bool(torch.isfinite(Wk).all())
    if mode["m"] is None:  # exact count per block
        for i1 in range(0, cols, block):
            blk = Wk[:, i1 : i1 + block]
            assert int((blk == 0).sum()) >= reference.n_pruned(mode["sparsity"], blk.numel())
    else:  # exact pattern: at most N nonzeros (exactly N unless a kept weight is itself 0) per group
        kept = (Wk != 0).reshape(rows, cols // mode["m"], mode["m"]).sum(-1)
        assert bool((kept <= mode["n"]).all())
    assert abs(loss - loss_ref) <= 1e-3 * abs(loss_ref) + 1e-6
    e_ref, e = recon_error(X, W, Wr), recon_error(X, W, Wk)
    assert e <= 1.01 * e_ref + 1e-9
    # same selection as the reference on the same float32 inputs (it shares the tie-breaking rules)
    assert float(((Wk == 0) != (Wr == 0)).float().mean()) <= 0.01


@pytest.mark.parametrize("rows", [1, 7, 129])
@pytest.mark.parametrize("mode", ["50%", "2:4", "4:8"])
def test_sweep_matches_reference(rows, mode, poison_empty):
    X, W, U = _problem(rows, 96, dead=3, seed=rows)  # 96 = 64 + a partial block of 32
    Wr, loss_ref, Wk, loss = _run_both(W, U, MODES[mode], 64)
    _check(X, W, Wr, loss_ref, Wk, loss, MODES[mode], 64)


@pytest.mark.parametrize("mode", ["30%", "1:4", "2:8"])
def test_sweep_other_patterns(mode, poison_empty):
    X, W, U = _problem(9, 80, seed=3)  # 80 = 64 + 16
    Wr, loss_ref, Wk, loss = _run_both(W, U, MODES[mode], 64)
    _check(X, W, Wr, loss_ref, Wk, loss, MODES[mode], 64)


@pytest.mark.parametrize("mode,group", [("2:4", None), ("50%", 16)])
def test_sweep_joint_quantization(mode, group, poison_empty):
    X, W, U = _problem(17, 64, dead=2, seed=4)
    grid = reference.make_quant_grid(W, 4, group)
    Wr, loss_ref, Wk, loss = _run_both(W, U, MODES[mode], 32, quant=grid)
    _check(X, W, Wr, loss_ref, Wk, loss, MODES[mode], 32)
    g = grid.group_size
    idx = torch.arange(64) // g
    levels = torch.round(Wk / grid.scale[:, idx]) + grid.zero[:, idx]  # every weight is on the grid
    assert torch.allclose(grid.scale[:, idx] * (levels - grid.zero[:, idx]), Wk, atol=1e-5)


def test_sweep_single_column_blocks_and_all_dead():
    X, W, U = _problem(5, 16, dead=16)
    Wr, loss_ref, Wk, loss = _run_both(W, U, MODES["50%"], 16)
    assert torch.equal(Wk, torch.zeros_like(Wk)) and loss == 0.0


def test_sweep_block_rejects_bad_input():
    W = torch.randn(4, 8)
    U = torch.eye(8)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.sparsegpt_kernels.sweep_block(W.double(), U.double(), 0, 8, 0.5, 0, 0, None, None, 0, 0)
    with pytest.raises(ValueError, match="N:M"):
        torch.ops.sparsegpt_kernels.sweep_block(W, U, 0, 6, 0.5, 2, 4, None, None, 0, 0)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_opcheck_sweep_block(n, m):
    _, W, U = _problem(6, 32)
    grid = reference.make_quant_grid(W, 4, 16)
    args = (W.clone(), U, 0, 16, 0.5, n, m, grid.scale, grid.zero, grid.maxq, grid.group_size)
    torch.library.opcheck(torch.ops.sparsegpt_kernels.sweep_block.default, args)


def test_opcheck_unstructured_prune_mask():
    torch.library.opcheck(torch.ops.sparsegpt_kernels.unstructured_prune_mask.default, (torch.randn(6, 10), 17))
