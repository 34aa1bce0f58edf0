"""The ``cpp`` backend (compiled CPU operators of sparsegpt_kernels._C) against the reference.

Skipped with a reason when the extension is not built; with SPARSEGPT_KERNELS_REQUIRE_EXT=1 (set by CI, which
builds it) a missing extension is a failure instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import PRUNE_MODES, correlated_inputs, hessian_of, recon_error, require_extension

import sparsegpt_kernels as sk
from sparsegpt_kernels import reference
from sparsegpt_kernels.backends import ENV_VAR, BackendUnavailableError, select_backend
from sparsegpt_kernels.backends import extension as _ext
from sparsegpt_kernels.spec import SweepSpec


@pytest.fixture(autouse=True)
def _need_extension():
    require_extension()


def ops():
    return _ext.ops()


# tolerances travel with the dtype: relative excess of reconstruction error over the torch backend's
RECON_SLACK = {torch.float32: 1e-2, torch.float64: 1e-6}

MODES = [*PRUNE_MODES, pytest.param({"pattern": "4:8", "quant_bits": 3}, id="4:8-q3")]


def _problem(rows, cols, dtype=torch.float32, seed=0):
    X = correlated_inputs(1024, cols, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    return X, W, hessian_of(X).to(dtype)


def _check_pattern(W, kw, block):
    rows, cols = W.shape
    zeros = W == 0
    exact = "quant_bits" not in kw  # quantization may round a kept weight to 0 as well
    if "pattern" in kw:
        n, m = sk.parse_pattern(kw["pattern"])
        pruned = zeros.reshape(rows, cols // m, m).sum(-1)
        assert bool((pruned == m - n).all()) if exact else bool((pruned >= m - n).all())
    else:
        for i1 in range(0, cols, block):
            blk = zeros[:, i1 : i1 + block]
            want = reference.n_pruned(kw["sparsity"], blk.numel())
            got = int(blk.sum())
            assert got == want if exact else got >= want


# --------------------------------------------------------------------------------------------------------------------
# prune_layer(backend="cpp") against backend="torch"
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("rows", [1, 7, 129])
def test_prune_layer_matches_torch(kw, rows):
    cols, block = 200, 128  # the last block has 72 columns
    X, W, H = _problem(rows, cols)
    Wc, Wt = W.clone(), W.clone()
    rc = sk.prune_layer(Wc, H, block_size=block, backend="cpp", **kw)
    rt = sk.prune_layer(Wt, H, block_size=block, backend="torch", **kw)
    assert rc.backend == "cpp" and rt.backend == "torch"
    ec, et = recon_error(X, W, Wc), recon_error(X, W, Wt)
    assert ec <= et * (1 + RECON_SLACK[torch.float32]) + 1e-9, (ec, et)
    assert rc.loss == pytest.approx(rt.loss, rel=1e-3, abs=1e-6)
    _check_pattern(Wc, kw, block)
    assert rc.sparsity == pytest.approx(rt.sparsity, abs=1.0 / W.numel() + 1e-12)


@pytest.mark.parametrize(
    "kw", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.5, "quant_bits": 4, "quant_group_size": 32}]
)
def test_float64(kw):
    X, W, H = _problem(33, 96, dtype=torch.float64, seed=5)
    Wc, Wt = W.clone(), W.clone()
    rc = sk.prune_layer(Wc, H, block_size=32, backend="cpp", **kw)
    rt = sk.prune_layer(Wt, H, block_size=32, backend="torch", **kw)
    assert Wc.dtype == torch.float64
    ec, et = recon_error(X, W, Wc), recon_error(X, W, Wt)
    assert ec <= et * (1 + RECON_SLACK[torch.float64]) + 1e-12
    assert rc.loss == pytest.approx(rt.loss, rel=1e-9)
    torch.testing.assert_close(Wc, Wt, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block", [1, 16, 64, 1000])
def test_block_sizes(block):
    X, W, H = _problem(20, 96, seed=2)
    Wc, Wt = W.clone(), W.clone()
    sk.prune_layer(Wc, H, block_size=block, backend="cpp", sparsity=0.6)
    sk.prune_layer(Wt, H, block_size=block, backend="torch", sparsity=0.6)
    assert recon_error(X, W, Wc) <= recon_error(X, W, Wt) * 1.01
    _check_pattern(Wc, {"sparsity": 0.6}, min(block, 96))


def test_dead_columns():
    X = correlated_inputs(512, 64, seed=1)
    dead = [0, 7, 63]
    X[:, dead] = 0
    H = hessian_of(X)
    W = torch.randn(16, 64)
    Wc, Wt = W.clone(), W.clone()
    rc = sk.prune_layer(Wc, H, sparsity=0.5, backend="cpp")
    sk.prune_layer(Wt, H, sparsity=0.5, backend="torch")
    assert rc.dead_columns == 3
    assert bool((Wc[:, dead] == 0).all()) and bool(torch.isfinite(Wc).all())
    assert recon_error(X, W, Wc) <= recon_error(X, W, Wt) * 1.01 + 1e-9


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"sparsity": 0.3}, {"pattern": "2:4"}, {"pattern": "1:4"}])
def test_ties_broken_like_the_reference(kw):
    # a diagonal Hessian gives U diagonal (no updates), and integer weights with few distinct magnitudes tie a lot
    cols = 64
    H = torch.diag(torch.tensor([4.0, 1.0] * (cols // 2)))
    W = torch.randint(-2, 3, (9, cols)).float()
    Wc, Wt = W.clone(), W.clone()
    sk.prune_layer(Wc, H, block_size=32, backend="cpp", **kw)
    sk.prune_layer(Wt, H, block_size=32, backend="torch", **kw)
    assert torch.equal(Wc == 0, Wt == 0)
    assert torch.equal(Wc, Wt)


def test_rank_deficient_hessian_escalates_like_torch():
    X = torch.randn(256, 8) @ torch.randn(8, 64)
    H = hessian_of(X)
    H -= 1e-3 * H.diagonal().mean() * torch.eye(64)
    H = (H + H.T) / 2
    W = torch.randn(16, 64)
    rc = sk.prune_layer(W.clone(), H, sparsity=0.5, damp=1e-6, backend="cpp")
    rt = sk.prune_layer(W.clone(), H, sparsity=0.5, damp=1e-6, backend="torch")
    assert rc.damp == rt.damp > 1e-6


# --------------------------------------------------------------------------------------------------------------------
# bad input: rejected, weight untouched bit for bit
# --------------------------------------------------------------------------------------------------------------------
def _nan_weight(W, H, kw):
    W[0, 0] = float("nan")
    return W, H, kw


def _nan_hessian(W, H, kw):
    H[3, 5] = H[5, 3] = float("nan")
    return W, H, kw


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda W, H, kw: (W, H[:-1, :-1], kw), id="hessian-shape"),
        pytest.param(_nan_hessian, id="hessian-nan"),
        pytest.param(_nan_weight, id="weight-nan"),
        pytest.param(lambda W, H, kw: (W, H.half(), kw), id="hessian-dtype"),
        pytest.param(lambda W, H, kw: (W, H, {"pattern": "2:3"}), id="cols%M"),  # 64 columns
        pytest.param(lambda W, H, kw: (W, H, {"pattern": "4:2"}), id="N>M"),
        pytest.param(lambda W, H, kw: (W, H, {"pattern": "2:4", "block_size": 6}), id="block%M"),
        pytest.param(lambda W, H, kw: (W, H, {"sparsity": 1.0}), id="sparsity"),
        pytest.param(lambda W, H, kw: (W, H, {"block_size": 0}), id="block0"),
        pytest.param(lambda W, H, kw: (W, H, {"quant_bits": 1}), id="bits"),
        pytest.param(lambda W, H, kw: (W, H, {"quant_bits": 4, "quant_group_size": 48}), id="group"),
    ],
)
def test_bad_input_rejected_weight_untouched(make_bad):
    _, W, H = _problem(8, 64)
    W, H, kw = make_bad(W, H, {})
    W0 = W.clone()
    with pytest.raises((ValueError, TypeError)):
        sk.prune_layer(W, H, backend="cpp", **kw)
    assert torch.equal(W.view(torch.int32), W0.view(torch.int32))


def _sweep_args(W, **over):
    rows, cols = W.shape
    a = {"sparsity": 0.5, "n": 0, "m": 0, "block_size": 16, "scale": None, "zero": None, "maxq": 0, "group_size": 0}
    a.update(over)
    return a


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda W, U, a: (W, U[:-1], a), id="U-shape"),
        pytest.param(lambda W, U, a: (W, U.double(), a), id="U-dtype"),
        pytest.param(lambda W, U, a: (W.t(), U, a), id="W-noncontiguous"),
        pytest.param(lambda W, U, a: (W, U, {**a, "n": 2, "m": 2}), id="n>=m"),
        pytest.param(lambda W, U, a: (W, U, {**a, "n": 2, "m": 5}), id="cols%m"),
        pytest.param(lambda W, U, a: (W, U, {**a, "n": 1, "m": 4, "block_size": 6}), id="block%m"),
        pytest.param(lambda W, U, a: (W, U, {**a, "block_size": 0}), id="block0"),
        pytest.param(lambda W, U, a: (W, U, {**a, "sparsity": 1.5}), id="sparsity"),
        pytest.param(lambda W, U, a: (W, U, {**a, "scale": torch.ones(4, 2)}), id="scale-without-zero"),
        pytest.param(lambda W, U, a: (W, U, {**a, "scale": torch.ones(4, 3), "zero": torch.ones(4, 3),
                                              "maxq": 15, "group_size": 8}), id="scale-shape"),
        pytest.param(lambda W, U, a: (W, U, {**a, "scale": torch.ones(4, 2), "zero": torch.ones(4, 2),
                                              "maxq": 15, "group_size": 7}), id="group-size"),
    ],
)
@pytest.mark.parametrize("op", ["ext_sweep", "ext_sweep_cholesky"])
def test_sweep_op_rejects_bad_args_untouched(mutate, op):
    W = torch.randn(4, 16)
    U = torch.eye(16)
    W0 = W.clone()
    Wx, Ux, a = mutate(W, U, _sweep_args(W))
    with pytest.raises(RuntimeError):
        getattr(ops(), op)(Wx, Ux, **a)
    assert torch.equal(W.view(torch.int32), W0.view(torch.int32))


@pytest.mark.parametrize("op", ["ext_sweep", "ext_sweep_cholesky"])
def test_sweep_op_rejects_integer_weight(op):
    W = torch.ones(4, 16, dtype=torch.int32)
    W0 = W.clone()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        getattr(ops(), op)(W, torch.eye(16), **_sweep_args(W))
    assert torch.equal(W, W0)


@pytest.mark.parametrize("op", ["ext_inverse_factor", "ext_cholesky_factor"])
def test_factor_op_rejects_bad_args(op):
    f = getattr(ops(), op)
    with pytest.raises(RuntimeError, match="square"):
        f(torch.eye(3)[:2], 0.01)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        f(torch.eye(3, dtype=torch.float16), 0.01)
    with pytest.raises(RuntimeError, match="damp"):
        f(torch.eye(3), -1.0)
    with pytest.raises(RuntimeError, match="damp"):
        f(torch.eye(3), float("nan"))


def test_error_messages_are_whole():
    """The numbers in an operator's error message are formatted: a build that carries its own copy of libstdc++ (a
    compiler wrapper adding -static-libstdc++) cut this message after "(" on gcc 12 and crashed the process instead
    of raising on the H200 machine (gcc 13); setup.py and the build on first use now avoid such a compiler
    (sparsegpt_kernels/backends/toolchain.py)."""
    with pytest.raises(RuntimeError, match=r"the factor must be \(16, 16\), got \[15, 15\]"):
        ops().ext_sweep(torch.randn(4, 16), torch.eye(15), **_sweep_args(torch.randn(4, 16)))
    with pytest.raises(RuntimeError, match="got 3:2$"):
        ops().ext_nm_keep_mask(torch.rand(2, 8), 3, 2)


def test_nm_op_rejects_bad_args():
    with pytest.raises(RuntimeError, match="0 < N < M"):
        ops().ext_nm_keep_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(RuntimeError, match="multiple of M"):
        ops().ext_nm_keep_mask(torch.rand(2, 6), 2, 4)


# --------------------------------------------------------------------------------------------------------------------
# each operator against its reference function
# --------------------------------------------------------------------------------------------------------------------
def _run_factor(op, cols, dtype):
    """(H, factor) for a correlated Hessian with a dead column; checks status, shape, layout and that H is kept."""
    X = correlated_inputs(max(2 * cols, 64), cols, seed=cols, dtype=torch.float64)
    X[:, :1] = 0  # a dead column
    H = hessian_of(X).to(dtype)
    H0 = H.clone()
    F, info = getattr(ops(), op)(H, 0.01)
    assert int(info) == 0 and F.dtype == dtype and F.shape == (cols, cols) and F.is_contiguous()
    assert torch.equal(H, H0), "H was modified"
    assert bool((F.tril(-1) == 0).all()) and bool((F.diagonal() > 0).all())
    return H, F


@pytest.mark.parametrize("cols", [1, 64, 300, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_factor_against_reference(cols, dtype):
    H, U = _run_factor("ext_inverse_factor", cols, dtype)
    Uref = reference.inverse_factor(H, 0.01)
    truth = reference.inverse_factor(H.double(), 0.01)
    err = float((U.double() - truth).abs().max())
    err_ref = float((Uref.double() - truth).abs().max())
    scale = float(truth.abs().max())
    eps = torch.finfo(dtype).eps
    assert err <= 2 * err_ref + 8 * eps * scale, (err, err_ref)


@pytest.mark.parametrize("op", ["inverse_factor", "cholesky_factor"])
def test_factor_failure_matches_reference(op):
    H = -torch.ones(4, 4) + 5 * torch.eye(4)
    H[0, 1] = H[1, 0] = 100.0
    assert reference.inverse_factor(H, 1e-3) is None
    F, info = getattr(ops(), f"ext_{op}")(H, 1e-3)
    assert int(info) != 0
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    factor = _cpp.inverse_factor if op == "inverse_factor" else _cpp.factor  # the backend's own factor is R
    assert factor(H, 1e-3) is None
    assert reference.inverse_factor(H, 100.0) is not None  # enough damping makes it positive definite
    assert factor(H, 100.0) is not None


@pytest.mark.parametrize("where", [0, 290, 599])
def test_cholesky_factor_failure_in_any_block(where):
    # the factorisation recurses from the bottom-right corner (leaves of at most 256 columns): a pair of columns that
    # makes H indefinite fails it whichever leaf it lands in, and enough damping repairs it, as for the reference
    X = correlated_inputs(1200, 600, seed=3, dtype=torch.float64)
    H = hessian_of(X).float()
    other = (where + 1) % 600
    big = 5 * float(H[where, where] * H[other, other]) ** 0.5  # the 2x2 minor is negative
    H[where, other] = H[other, where] = big
    assert reference.inverse_factor(H, 1e-3) is None
    _, info = ops().ext_cholesky_factor(H, 1e-3)
    assert int(info) != 0
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    assert _cpp.factor(H, 1e-3) is None
    assert reference.inverse_factor(H, 100.0) is not None
    R = _cpp.factor(H, 100.0)
    assert R is not None and torch.equal(R, R.triu())


# 300 and 700: leaves of odd sizes at two levels; 1300: the symmetric update splits too (its block has 532 columns)
@pytest.mark.parametrize("cols", [1, 64, 300, 700, 1300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_factor_against_reference(cols, dtype):
    H, R = _run_factor("ext_cholesky_factor", cols, dtype)
    eps = torch.finfo(dtype).eps
    # R Rᵀ is the damped Hessian (dead column fixed), to Cholesky's backward error
    Hd = reference.damped_hessian(H.double(), 0.01)
    Rd = R.double()
    resid = float((Rd @ Rd.T - Hd).abs().max())
    assert resid <= 4 * cols * eps * float(Hd.diagonal().max()), resid
    # R⁻¹ is U, the factor the reference sweeps with; R's error, seen through U, is no worse than the reference's
    # own (float32), or within the rounding of the triangular solve done here (float64)
    truth = reference.inverse_factor(H.double(), 0.01)
    U = torch.linalg.solve_triangular(Rd, torch.eye(cols, dtype=torch.float64), upper=True)
    err = float((U - truth).abs().max())
    err_ref = float((reference.inverse_factor(H, 0.01).double() - truth).abs().max())
    assert err <= 2 * err_ref + cols * eps * float(truth.abs().max()), (err, err_ref)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (2, 8), (3, 4), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nm_keep_mask_exact(n, m, dtype):
    scores = torch.rand(13, 5 * m, dtype=dtype)
    assert torch.equal(ops().ext_nm_keep_mask(scores, n, m), reference.nm_keep_mask(scores, n, m))
    ties = torch.randint(0, 3, (3, 7, 4 * m)).to(dtype)  # many ties, 3-D
    assert torch.equal(ops().ext_nm_keep_mask(ties, n, m), reference.nm_keep_mask(ties, n, m))
    strided = torch.rand(4 * m, 11, dtype=dtype).T  # non-contiguous input
    strided = strided[:, : 4 * m] if strided.shape[1] >= 4 * m else strided
    assert torch.equal(ops().ext_nm_keep_mask(strided, n, m), reference.nm_keep_mask(strided, n, m))


def _unstructured_cases():
    g = torch.Generator().manual_seed(5)
    yield "random", torch.rand(37, 300, generator=g)
    yield "ties", torch.randint(0, 3, (64, 130), generator=g).float()  # ties at every threshold
    signed = torch.randn(29, 77, generator=g)
    signed[:, ::5] = -1  # the refinement's dead columns: below every other score
    signed[3, 4] = -0.0  # the same as +0.0
    signed[4, :] = 0.0
    yield "signed", signed
    yield "one row", torch.rand(1, 513, generator=g)
    yield "one column", torch.rand(200, 1, generator=g)
    yield "empty", torch.rand(0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [1, 16, 128, 4096])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.999])
def test_unstructured_keep_mask_is_the_references(sparsity, block_size, dtype):
    """ext_unstructured_keep_mask (the refinement's projection) gives exactly the reference's per-block masks: the
    same counts in every block, ties in row-major order, negative scores first."""
    for name, scores in _unstructured_cases():
        scores = scores.to(dtype)
        got = ops().ext_unstructured_keep_mask(scores, sparsity, block_size)
        want = reference.unstructured_keep_mask(scores, sparsity, block_size)
        assert got.dtype == torch.bool and torch.equal(got, want), name
    strided = torch.rand(300, 40, dtype=dtype).T  # non-contiguous input
    assert torch.equal(ops().ext_unstructured_keep_mask(strided, sparsity, block_size),
                       reference.unstructured_keep_mask(strided, sparsity, block_size))


def test_unstructured_keep_mask_counts():
    """Both directions on one matrix: exactly round(sparsity * rows * B) pruned per block, not one more or less."""
    scores = torch.rand(33, 250)
    keep = ops().ext_unstructured_keep_mask(scores, 0.6, 64)
    for i1 in range(0, 250, 64):
        blk = keep[:, i1 : i1 + 64]
        assert int((~blk).sum()) == reference.n_pruned(0.6, blk.numel())
        # the pruned ones are the lowest: every pruned score <= every kept one in the block
        assert float(scores[:, i1 : i1 + 64][~blk].max()) <= float(scores[:, i1 : i1 + 64][blk].min())


def test_unstructured_keep_mask_rejects_bad_args():
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops().ext_unstructured_keep_mask(torch.rand(2, 3, 4), 0.5, 2)
    with pytest.raises(RuntimeError, match=r"sparsity must be in \[0, 1\), got 1"):
        ops().ext_unstructured_keep_mask(torch.rand(2, 8), 1.0, 4)
    with pytest.raises(RuntimeError, match="block_size must be >= 1, got 0"):
        ops().ext_unstructured_keep_mask(torch.rand(2, 8), 0.5, 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops().ext_unstructured_keep_mask(torch.rand(2, 8).half(), 0.5, 4)


@pytest.mark.parametrize(
    "spec_kw",
    [
        {"sparsity": 0.5, "n": None, "m": None},
        {"sparsity": 0.25, "n": None, "m": None},
        {"sparsity": 0.5, "n": 2, "m": 4},
        {"sparsity": 0.75, "n": 1, "m": 4},
    ],
)
@pytest.mark.parametrize("quant", [None, (4, 16)])
def test_sweep_against_reference(spec_kw, quant):
    X, W, H = _problem(37, 80, seed=7)
    U = reference.inverse_factor(H, 0.01)
    grid = reference.make_quant_grid(W, *quant) if quant else None
    spec = SweepSpec(block_size=32, quant=grid, **spec_kw)
    Wc, Wr = W.clone(), W.clone()
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    lc = _cpp.sweep_inverse(Wc, U, spec)
    lr = reference.sweep(Wr, U, spec)
    assert lc == pytest.approx(lr, rel=1e-4)
    torch.testing.assert_close(Wc, Wr, rtol=1e-4, atol=1e-5)
    assert torch.equal(Wc == 0, Wr == 0)


@pytest.mark.parametrize(
    "spec_kw",
    [
        pytest.param({"sparsity": 0.5, "n": None, "m": None, "block_size": 32}, id="50%"),
        pytest.param({"sparsity": 0.3, "n": None, "m": None, "block_size": 40}, id="30%-partial-block"),
        pytest.param({"sparsity": 0.5, "n": 2, "m": 4, "block_size": 32}, id="2:4"),
        pytest.param({"sparsity": 0.5, "n": 4, "m": 8, "block_size": 32}, id="4:8"),
        pytest.param({"sparsity": 2 / 3, "n": 1, "m": 3, "block_size": 48}, id="1:3"),
        pytest.param({"sparsity": 2 / 3, "n": 2, "m": 6, "block_size": 48}, id="2:6"),
        pytest.param({"sparsity": 0.5, "n": None, "m": None, "block_size": 96}, id="one-block"),
        pytest.param({"sparsity": 0.5, "n": None, "m": None, "block_size": 1}, id="B=1"),
    ],
)
@pytest.mark.parametrize("quant", [None, (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 37])
def test_sweep_cholesky_against_reference(spec_kw, quant, dtype, rows):
    """The sweep on R (what prune_layer runs here) against the reference sweep on U = R⁻¹: same masks, same weights
    to rounding (well-conditioned H, so that rounding cannot flip a decision)."""
    X, W, H = _problem(rows, 96, dtype=dtype, seed=11)
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    R = _cpp.factor(H, 0.01)
    U = reference.inverse_factor(H.double(), 0.01).to(dtype)
    grid = reference.make_quant_grid(W, *quant) if quant else None
    spec = SweepSpec(quant=grid, **spec_kw)
    Wc, Wr = W.clone(), W.clone()
    lc = _cpp.sweep(Wc, R, spec)
    lr = reference.sweep(Wr, U, spec)
    tol = {torch.float32: 2e-4, torch.float64: 1e-9}[dtype]
    assert torch.equal(Wc == 0, Wr == 0)
    assert lc == pytest.approx(lr, rel=tol)
    torch.testing.assert_close(Wc, Wr, rtol=tol, atol=tol)


@pytest.mark.parametrize("block_size", [128, 96, 200])
@pytest.mark.parametrize("kw", [{"sparsity": 0.5, "n": None, "m": None}, {"sparsity": 0.5, "n": 2, "m": 4}],
                         ids=["50%", "2:4"])
def test_sweep_cholesky_groups_of_blocks(block_size, kw):
    """Wider than the column groups whose lazy updates the Cholesky sweep defers to the group's end (kLazyWidth = 1024
    columns): several groups, a partial last group and (B = 96) a partial last block, against the reference."""
    X, W, H = _problem(37, 2300, dtype=torch.float64, seed=5)
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    R = _cpp.factor(H, 0.01)
    U = reference.inverse_factor(H, 0.01)
    spec = SweepSpec(block_size=block_size, **kw)
    Wc, Wr = W.clone(), W.clone()
    lc = _cpp.sweep(Wc, R, spec)
    lr = reference.sweep(Wr, U, spec)
    assert torch.equal(Wc == 0, Wr == 0)
    assert lc == pytest.approx(lr, rel=1e-9)
    torch.testing.assert_close(Wc, Wr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.6, "quant_bits": 4}])
@pytest.mark.parametrize("rows", [45, 300])
def test_wide_simd_tiles_give_the_same_bits(monkeypatch, kw, rows):
    """The in-block steps' AVX-512 (16-row tiles) and AVX2 copies (used where the CPU has them) and the baseline
    build's (8-row tiles) agree bit for bit, with full and partial tiles; what each level runs is reported."""
    X, W, H = _problem(rows, 300, seed=2)
    out = {}
    for simd in ("avx512", "avx2", "baseline"):
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
        used = ops().ext_cpu_simd()
        assert used in ("avx512", "avx2", "baseline")
        assert ("avx512", "avx2", "baseline").index(used) >= ("avx512", "avx2", "baseline").index(simd)
        Wc = W.clone()
        out[simd] = (sk.prune_layer(Wc, H, block_size=64, backend="cpp", **kw).loss, Wc)
    for simd in ("avx2", "baseline"):
        assert out[simd][0] == pytest.approx(out["avx512"][0], rel=1e-12)  # the loss: summed over other tiles
        assert torch.equal(out[simd][1], out["avx512"][1]), simd
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "baseline")
    assert ops().ext_cpu_simd() == "baseline"
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "sse9")
    with pytest.raises(RuntimeError, match="SPARSEGPT_KERNELS_CPU_SIMD=sse9"):
        ops().ext_cpu_simd()


def test_sweep_cholesky_tracks_float64_like_the_reference():
    """On a rank-deficient Hessian (condition number ~2e4 after damping) float32 results stay as close to the
    float64 result as the float32 reference's do."""
    cols, rank = 320, 8
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * cols, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=g, dtype=torch.float64
    ) + 1e-3 * torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    X[:, 3] *= 30
    H = hessian_of(X)
    W = torch.randn(64, cols, generator=g, dtype=torch.float64)
    for kw in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        truth = W.clone()
        sk.prune_layer(truth, H, backend="torch", **kw)
        pruned = {}
        for be in ("torch", "cpp"):
            W32 = W.float()
            sk.prune_layer(W32, H.float(), backend=be, **kw)
            pruned[be] = W32.double()
        # At this conditioning a few decisions are near-ties that float32 rounding (which differs between BLAS
        # builds and CPUs) can flip. Given its mask, each row's sweep is independent of the other rows, so compare
        # the rows whose masks agree with float64 for both; nearly all of them must.
        agree = torch.ones(W.shape[0], dtype=torch.bool)
        for Wb in pruned.values():
            agree &= ((Wb == 0) == (truth == 0)).all(1)
        assert int(agree.sum()) >= 0.9 * W.shape[0], (kw, int(agree.sum()))
        dev = {be: float((Wb[agree] - truth[agree]).abs().max()) for be, Wb in pruned.items()}
        assert dev["cpp"] <= 3 * dev["torch"], (kw, dev)


def test_prune_layer_runs_on_the_cholesky_factor(monkeypatch):
    """prune_layer(backend="cpp") never forms U: it factors H and sweeps on R."""
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    def no_inverse(*args):
        raise AssertionError("the U-driven path was used")

    monkeypatch.setattr(_cpp, "inverse_factor", no_inverse)
    monkeypatch.setattr(_cpp, "sweep_inverse", no_inverse)
    X, W, H = _problem(16, 64)
    Wt = W.clone()
    res = sk.prune_layer(W, H, backend="cpp", pattern="2:4")
    sk.prune_layer(Wt, H, backend="torch", pattern="2:4")
    assert res.backend == "cpp" and torch.equal(W == 0, Wt == 0)


# --------------------------------------------------------------------------------------------------------------------
# registration: opcheck, dispatch
# --------------------------------------------------------------------------------------------------------------------
def test_opcheck_inverse_factor():
    X = correlated_inputs(256, 48, seed=3)
    torch.library.opcheck(ops().ext_inverse_factor.default, (hessian_of(X), 0.01))


def test_opcheck_cholesky_factor():
    X = correlated_inputs(256, 48, seed=3)
    torch.library.opcheck(ops().ext_cholesky_factor.default, (hessian_of(X), 0.01))


def test_opcheck_nm_keep_mask():
    torch.library.opcheck(ops().ext_nm_keep_mask.default, (torch.rand(6, 16), 2, 4))


def test_opcheck_unstructured_keep_mask():
    torch.library.opcheck(ops().ext_unstructured_keep_mask.default, (torch.rand(6, 40), 0.5, 16))


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("nm", [False, True])
def test_opcheck_sweep(quant, nm):
    X, W, H = _problem(6, 32, seed=4)
    U = reference.inverse_factor(H, 0.01)
    grid = reference.make_quant_grid(W, 4, 16) if quant else None
    args = (
        W,
        U,
        0.5,
        2 if nm else 0,
        4 if nm else 0,
        16,
        grid.scale if quant else None,
        grid.zero if quant else None,
        grid.maxq if quant else 0,
        grid.group_size if quant else 0,
    )
    torch.library.opcheck(ops().ext_sweep.default, args)
    R, _ = ops().ext_cholesky_factor(H, 0.01)
    torch.library.opcheck(ops().ext_sweep_cholesky.default, (args[0], R, *args[2:]))


def test_auto_prefers_cpp_over_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    avail = sk.available_backends("cpu")
    assert "cpp" in avail and avail.index("cpp") < avail.index("torch")
    assert select_backend("auto", "cpu").priority >= 20


def test_cpp_refuses_other_devices():
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    assert "CPU tensors only" in _cpp.unavailable_reason(torch.device("meta"))


def test_missing_extension_is_reported(monkeypatch):
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    assert "simulated" in _cpp.unavailable_reason(torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="simulated"):
        sk.prune_layer(torch.randn(4, 8), torch.eye(8), backend="cpp")


def test_extension_not_loaded_at_import():
    import subprocess
    import sys

    code = "import sys, sparsegpt_kernels; print('sparsegpt_kernels._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rules_agree_with_python():
    """csrc/core/rules.h and the Python rules are one definition per language; they must agree."""
    from sparsegpt_kernels.backends._cuda import BACKEND as _cuda

    mod = _ext.load()
    assert mod is not None, _ext.missing_reason()
    cases = [(p, c) for p in (0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99, 1 - 1e-12)
             for c in (0, 1, 2, 3, 7, 10, 127, 128, 4097, 128 * 11008, 2**31 + 1)]
    assert [mod.n_pruned(p, c) for p, c in cases] == [reference.n_pruned(p, c) for p, c in cases]
    import re

    with open(os.path.join(_ext.source_dir(), "core", "rules.h")) as f:  # the rule as written, not a copy of it
        limit = int(re.search(r"\bkCudaMaxBlock = (\d+);", f.read()).group(1))
    assert mod.CUDA_MAX_BLOCK == limit and _cuda.max_block_size() == mod.CUDA_MAX_BLOCK


def _fresh_loader(monkeypatch):
    """The loader as in a new process where ``sparsegpt_kernels._C`` is not installed."""
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "MODULE", "sparsegpt_kernels._not_installed")


def test_no_jit_switch(monkeypatch, caplog):
    _fresh_loader(monkeypatch)
    monkeypatch.setenv(_ext.NO_JIT_ENV, "1")
    built = []
    monkeypatch.setattr(_ext, "_jit_build", lambda: built.append(1))
    assert _ext.load() is None and not built
    assert "not available" in _ext.missing_reason() and "_not_installed" in _ext.missing_reason()


def test_failed_jit_build_is_reported_once_and_falls_back(monkeypatch, caplog):
    _fresh_loader(monkeypatch)
    monkeypatch.delenv(_ext.NO_JIT_ENV, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    attempts = []

    def failing_build():
        attempts.append(1)
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(_ext, "_jit_build", failing_build)
    with caplog.at_level("WARNING", logger="sparsegpt_kernels"):
        for _ in range(3):
            assert "cpp" not in sk.available_backends("cpu")
        W = torch.randn(8, 16)
        res = sk.prune_layer(W, torch.eye(16), sparsity=0.5, backend="auto")
    assert res.backend != "cpp" and len(attempts) == 1
    warnings = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(warnings) == 1 and "simulated: no C++ compiler" in warnings[0].getMessage()
    assert "building it on first use failed" in _ext.missing_reason()


def test_jit_sources_are_the_extension_sources():
    """The first-use build compiles what setup.py compiles (csrc/sources.txt), from sources it can find."""
    src = _ext.source_dir()
    assert src is not None
    cpp, cu = _ext._jit_sources(src)
    names = sorted(os.path.relpath(p, src) for p in cpp + cu)
    assert "module.cpp" in names and "cpu/ops.cpp" in names and "cuda/sweep_kernels.cu" in names
    assert all(os.path.isfile(p) for p in cpp + cu)
