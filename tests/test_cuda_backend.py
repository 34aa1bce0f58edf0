"""The ``cuda`` backend (CUDA operators of sparsegpt_kernels._C) against the reference, on a CUDA device.

Skipped only when torch.cuda.is_available() is False. On a CUDA machine a missing (or CPU-only) extension fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PRUNE_MODES,
    assert_exact_sparsity,
    check_backend_like_torch,
    correlated_inputs,
    hessian_of,
    recon_error,
)

import sparsegpt_kernels as sk
from sparsegpt_kernels import reference
from sparsegpt_kernels.backends import extension as _ext
from sparsegpt_kernels.spec import SweepSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _need_cuda_extension():
    reason = _ext.missing_reason()
    assert reason is None, reason
    assert _ext.has_cuda(), "sparsegpt_kernels._C was built without CUDA"


def ops():
    return _ext.ops()


MODES = PRUNE_MODES


def _problem(rows, cols, dtype=torch.float32, seed=0):
    X = correlated_inputs(1024, cols, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype)
    return X, W, hessian_of(X).to(dtype)


@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("block", [128, 40])
def test_prune_layer_like_torch(kw, rows, block, poison_cuda_allocator):
    """Same masks, exact counts, same loss as the torch backend on layers without near-ties; one dead column."""
    check_backend_like_torch("cuda", DEV, kw, rows=rows, cols=200, block_size=block, dead=1, seed=rows)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_many_rows(pattern, poison_cuda_allocator):
    """1031 rows at the default block size: exact counts and loss; masks may differ from the torch backend's in at
    most 0.1% of the weights (near-ties among this many decisions)."""
    X, W, H = _problem(1031, 512, seed=3)
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    Wg, Wt = W.to(DEV), W.clone()
    rg = sk.prune_layer(Wg, H.to(DEV), backend="cuda", **kw)
    rt = sk.prune_layer(Wt, H, backend="torch", **kw)
    assert_exact_sparsity(Wg, block_size=128, pattern=pattern)
    assert abs(rg.loss - rt.loss) <= 1e-3 * rt.loss
    assert float(((Wg.cpu() == 0) != (Wt == 0)).float().mean()) <= 1e-3


def test_float64_matches_reference_closely(poison_cuda_allocator):
    X, W, H = _problem(33, 96, dtype=torch.float64, seed=5)
    Wg, Wt = W.to(DEV), W.clone()
    sk.prune_layer(Wg, H.to(DEV), block_size=32, backend="cuda", pattern="2:4")
    sk.prune_layer(Wt, H, block_size=32, backend="torch", pattern="2:4")
    torch.testing.assert_close(Wg.cpu(), Wt, rtol=1e-9, atol=1e-12)


def test_ties_broken_like_the_reference(poison_cuda_allocator):
    """A diagonal Hessian (no updates between columns) and integer weights: many scores are equal, so the tie rules
    alone decide, and the sweep must equal the reference's bit for bit. Both sweeps get the same factor: the CUDA
    backend's own (cuSOLVER) can differ from LAPACK's in the last bit of one diagonal entry (column 0 on the H200),
    which turns those exact ties into near-ties decided by rounding."""
    cols = 64
    H = torch.diag(torch.tensor([4.0, 1.0] * (cols // 2)))
    U = reference.inverse_factor(H, 0.01)
    for seed in range(4):
        W = torch.randint(-2, 3, (9, cols), generator=torch.Generator().manual_seed(seed)).float()
        for spec in (SweepSpec(0.5, None, None, 32), SweepSpec(0.3, None, None, 32), SweepSpec(0.5, 2, 4, 32),
                     SweepSpec(0.75, 1, 4, 32)):
            Wg, Wt = W.to(DEV), W.clone()
            loss_g = _ext.sweep(Wg, U.to(DEV), spec, "cuda")
            loss_t = reference.sweep(Wt, U, spec)
            assert torch.equal(Wg.cpu(), Wt), (seed, spec)
            assert loss_g == pytest.approx(loss_t, rel=1e-6), (seed, spec)


def test_dead_columns(poison_cuda_allocator):
    X = correlated_inputs(512, 64, seed=1)
    dead = [0, 7, 63]
    X[:, dead] = 0
    H = hessian_of(X)
    W = torch.randn(16, 64)
    Wg = W.to(DEV)
    res = sk.prune_layer(Wg, H.to(DEV), sparsity=0.5, backend="cuda")
    assert res.dead_columns == 3 and bool((Wg[:, dead] == 0).all()) and bool(torch.isfinite(Wg).all())


def test_bad_input_weight_untouched():
    W = torch.randn(4, 16, device=DEV)
    W0 = W.clone()
    with pytest.raises(RuntimeError):
        ops().ext_sweep(W, torch.eye(15, device=DEV), 0.5, 0, 0, 16, None, None, 0, 0)
    with pytest.raises(RuntimeError):
        ops().ext_sweep(W, torch.eye(16, device=DEV), 0.5, 2, 4, 6, None, None, 0, 0)
    with pytest.raises(ValueError):
        sk.prune_layer(W, torch.eye(16, device=DEV), pattern="2:3", backend="cuda")
    assert torch.equal(W.view(torch.int32), W0.view(torch.int32))


@pytest.mark.parametrize("cols", [64, 700])
def test_inverse_factor_against_reference(cols, poison_cuda_allocator):
    X = correlated_inputs(2 * cols, cols, seed=cols, dtype=torch.float64)
    H = hessian_of(X).float().to(DEV)
    U, info = ops().ext_inverse_factor(H, 0.01)
    assert int(info) == 0
    truth = reference.inverse_factor(H.double().cpu(), 0.01)
    Uref = reference.inverse_factor(H, 0.01)
    err = float((U.double().cpu() - truth).abs().max())
    err_ref = float((Uref.double().cpu() - truth).abs().max())
    assert err <= 2 * err_ref + 8 * torch.finfo(torch.float32).eps * float(truth.abs().max())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (2, 8)])
def test_nm_keep_mask_exact(n, m, poison_cuda_allocator):
    scores = torch.rand(13, 5 * m, device=DEV)
    assert torch.equal(ops().ext_nm_keep_mask(scores, n, m), reference.nm_keep_mask(scores, n, m))
    ties = torch.randint(0, 3, (3, 7, 4 * m), device=DEV).float()
    assert torch.equal(ops().ext_nm_keep_mask(ties, n, m), reference.nm_keep_mask(ties, n, m))


@pytest.mark.parametrize("spec_kw", [{"sparsity": 0.5, "n": None, "m": None}, {"sparsity": 0.5, "n": 2, "m": 4}])
def test_sweep_against_reference(spec_kw, poison_cuda_allocator):
    X, W, H = _problem(37, 80, seed=7)
    U = reference.inverse_factor(H, 0.01)
    spec = SweepSpec(block_size=32, **spec_kw)
    Wg, Wr = W.to(DEV), W.clone()
    from sparsegpt_kernels.backends._cuda import BACKEND as _cuda

    lg = _cuda.sweep(Wg, U.to(DEV), spec)
    lr = reference.sweep(Wr, U, spec)
    assert lg == pytest.approx(lr, rel=1e-3)
    torch.testing.assert_close(Wg.cpu(), Wr, rtol=1e-3, atol=1e-4)


def test_opcheck():
    X, W, H = _problem(6, 32, seed=4)
    U = reference.inverse_factor(H, 0.01)
    torch.library.opcheck(ops().ext_inverse_factor.default, (H.to(DEV), 0.01))
    torch.library.opcheck(ops().ext_nm_keep_mask.default, (torch.rand(6, 16, device=DEV), 2, 4))
    torch.library.opcheck(ops().ext_sweep.default, (W.to(DEV), U.to(DEV), 0.5, 0, 0, 16, None, None, 0, 0))
    torch.library.opcheck(ops().ext_sweep.default, (W.to(DEV), U.to(DEV), 0.5, 2, 4, 16, None, None, 0, 0))


def test_large_layer_matches_torch(poison_cuda_allocator):
    X, W, H = _problem(1024, 1024, seed=9)
    Wg, Wt = W.to(DEV), W.to(DEV)
    rg = sk.prune_layer(Wg, H.to(DEV), sparsity=0.5, backend="cuda")
    rt = sk.prune_layer(Wt, H.to(DEV), sparsity=0.5, backend="torch")
    assert_exact_sparsity(Wg, block_size=128, sparsity=0.5)
    assert abs(rg.loss - rt.loss) <= 1e-3 * rt.loss
    e_g, e_t = recon_error(X, W, Wg.cpu()), recon_error(X, W, Wt.cpu())
    assert abs(e_g - e_t) <= 0.01 * e_t
