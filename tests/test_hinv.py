"""The Triton Hessian-inverse factor against the reference, on good, dead-column and ill-conditioned Hessians."""

from __future__ import annotations

import pytest
import torch
from helpers import correlated_inputs, hessian_of

import sparsegpt_kernels as sk
from sparsegpt_kernels import reference
from sparsegpt_kernels.ops.hinv import hinv_factor, hinv_factor_launch


def _hessian(c: int, dead: int = 0, seed: int = 0) -> torch.Tensor:
    X = correlated_inputs(max(4 * c, 16), c, seed=seed, dtype=torch.float64)
    if dead:
        X[:, torch.randperm(c)[:dead]] = 0  # dead inputs: zero rows/columns and H_jj = 0
    return hessian_of(X)


def _check_close(U: torch.Tensor, H64: torch.Tensor, damp: float) -> None:
    """Kernel error vs. the float64 truth is at most a few times torch's own float32 error (plus a tiny floor)."""
    truth = reference.inverse_factor(H64, damp)
    ref32 = reference.inverse_factor(H64.float(), damp)
    scale = truth.abs().max()
    torch_err = float((ref32.double() - truth).abs().max() / scale)
    err = float((U.double() - truth).abs().max() / scale)
    assert err <= 4 * torch_err + 1e-6, (err, torch_err)
    assert torch.equal(U.tril(-1), torch.zeros_like(U).tril(-1))
    assert bool((U.diagonal() > 0).all())


@pytest.mark.parametrize("c,dead", [(1, 0), (7, 0), (33, 2), (130, 5)])
def test_matches_reference(c, dead, poison_empty):
    H = _hessian(c, dead)
    H32 = H.float()
    before = H32.clone()
    U = hinv_factor(H32, 0.01)
    assert U is not None and U.dtype == torch.float32 and U.shape == (c, c)
    assert torch.equal(H32, before)  # H is not modified
    _check_close(U, H, 0.01)


@pytest.mark.parametrize("bs,bt,bk", [(16, 32, 16), (64, 64, 16)])
def test_block_configs(bs, bt, bk, poison_empty):
    """Many diagonal/panel/update/inverse steps with a partial last block (100 = 6·16 + 4), and the GPU's
    configuration (BS 64, BT 64, the dot products in K chunks of 16)."""
    H = _hessian(100, dead=3, seed=1)
    U, info = hinv_factor_launch(H.float(), 0.01, BS=bs, BT=bt, BK=bk)
    assert int(info) == 0
    _check_close(U, H, 0.01)


def test_float64_input_gives_float64():
    H = _hessian(20)
    U = hinv_factor(H, 0.01)
    assert U.dtype == torch.float64
    _check_close(U, H, 0.01)


@pytest.mark.parametrize("make", ["negative_diag", "indefinite"])
def test_failure_is_reported(make):
    if make == "negative_diag":
        H = -torch.eye(10)
    else:  # a Gram matrix minus a large rank-one term: a clearly negative eigenvalue
        H = _hessian(40).float()
        v = torch.randn(40)
        H = H - 50 * H.diagonal().mean() * torch.outer(v, v) / v.dot(v)
    assert reference.inverse_factor(H, 0.01) is None
    assert hinv_factor(H, 0.01) is None


def test_nan_hessian_fails():
    H = _hessian(12).float()
    H[3, 3] = float("nan")
    assert hinv_factor(H, 0.01) is None


def test_damping_escalation_through_prune_layer():
    """Slightly indefinite H: fails at damp=0.01, works after escalation; triton escalates exactly like torch."""
    H = _hessian(48, seed=2).float()
    evals, evecs = torch.linalg.eigh(H.double())
    shift = 0.05 * float(H.diagonal().mean())
    H = (H.double() - (evals[0] + shift) * torch.outer(evecs[:, 0], evecs[:, 0])).float()  # λ_min ≈ -shift
    H = (H + H.T) / 2
    W = torch.randn(8, 48)
    Wt, Wr = W.clone(), W.clone()
    rt = sk.prune_layer(Wt, H, sparsity=0.5, block_size=16, backend="torch")
    rr = sk.prune_layer(Wr, H, sparsity=0.5, block_size=16, backend="triton")
    assert rt.damp > 0.01 and rr.damp == rt.damp
    assert rr.backend == "triton" and rr.sparsity == 0.5


def test_opcheck():
    H = _hessian(20).float()
    torch.library.opcheck(torch.ops.sparsegpt_kernels.hinv_factor.default, (H, 0.01))
