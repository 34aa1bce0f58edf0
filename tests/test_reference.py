"""The torch reference (backend="torch") against a float64 brute-force sequential OBS, and its invariants."""

from __future__ import annotations

import pytest
import torch
from helpers import correlated_inputs, hessian_of, recon_error

import sparsegpt_kernels as sk
from sparsegpt_kernels import reference


# --------------------------------------------------------------------------------------------------------------------
# Brute-force oracle: explicit inverse of the Hessian of the remaining columns at every column; no Cholesky, no
# blocking of updates. Written independently of sparsegpt_kernels.reference.
# --------------------------------------------------------------------------------------------------------------------
def brute_force_obs(W, H, *, damp=0.01, sparsity=0.5, nm=None, block=128, bits=None, group=None):
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    H += damp * diag.mean() * torch.eye(cols, dtype=torch.float64)
    hinv_diag = torch.tensor([torch.linalg.inv(H[k:, k:])[0, 0] for k in range(cols)], dtype=torch.float64)

    if bits is not None:
        maxq = 2**bits - 1
        gs = group or cols
        scale = torch.empty(rows, cols // gs, dtype=torch.float64)
        zero = torch.empty_like(scale)
        for r in range(rows):
            for gi in range(cols // gs):
                seg = W[r, gi * gs:(gi + 1) * gs]
                lo, hi = min(float(seg.min()), 0.0), max(float(seg.max()), 0.0)
                if lo == 0 and hi == 0:
                    lo, hi = -1.0, 1.0
                scale[r, gi] = (hi - lo) / maxq
                zero[r, gi] = round(-lo / float(scale[r, gi]))

    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    loss = 0.0
    for j in range(cols):
        if nm is None and j % block == 0:
            b = range(j, min(j + block, cols))
            entries = sorted(
                (float(W[r, k] ** 2 / hinv_diag[k]), r * len(b) + (k - j), r, k) for r in range(rows) for k in b
            )
            k_prune = int(sparsity * rows * len(b) + 0.5)
            for _, _, r, k in entries[:k_prune]:
                pruned[r, k] = True
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            for r in range(rows):
                sc = sorted((float(W[r, k] ** 2 / hinv_diag[k]), k) for k in range(j, j + m))
                for _, k in sc[: m - n]:
                    pruned[r, k] = True
        Hinv = torch.linalg.inv(H[j:, j:])
        w = W[:, j].clone()
        q = torch.where(pruned[:, j], torch.zeros_like(w), w)
        if bits is not None:
            gi = j // (group or cols)
            s, z = scale[:, gi], zero[:, gi]
            q = s * (torch.clamp(torch.round(q / s) + z, 0, maxq) - z)
        err = w - q
        W[:, j:] -= err[:, None] * Hinv[0, :][None, :] / Hinv[0, 0]
        W[:, j] = q  # exact (the update above already makes it q up to rounding)
        loss += float((err**2).sum() / Hinv[0, 0] / 2)
    return W, loss, pruned


def _tiny(rows=6, cols=24, n=80, seed=0, dead=()):
    X = correlated_inputs(n, cols, outliers=2, seed=seed, dtype=torch.float64)
    X[:, list(dead)] = 0
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, hessian_of(X)


CASES = [
    dict(sparsity=0.5, block=8),
    dict(sparsity=0.5, block=7),   # cols not a multiple of the block
    dict(sparsity=0.3, block=128),  # one block covers every column
    dict(sparsity=0.75, block=5),
    dict(nm=(2, 4), block=8),
    dict(nm=(1, 4), block=4),
    dict(nm=(2, 8), block=8),
    dict(nm=(3, 4), block=12),
    dict(sparsity=0.5, block=8, bits=4),
    dict(nm=(2, 4), block=8, bits=3, group=8),
    dict(sparsity=0.5, block=6, dead=(0, 5, 13)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_equals_bruteforce_obs(case):
    case = dict(case)
    dead = case.pop("dead", ())
    W, H = _tiny(dead=dead)
    W_bf, loss_bf, pruned_bf = brute_force_obs(W, H, **case)
    kw = {}
    if "nm" in case:
        kw["pattern"] = f"{case['nm'][0]}:{case['nm'][1]}"
    else:
        kw["sparsity"] = case["sparsity"]
    if "bits" in case:
        kw["quant_bits"] = case["bits"]
        kw["quant_group_size"] = case.get("group")
    Wr = W.clone()
    res = sk.prune_layer(Wr, H, block_size=case["block"], backend="torch", **kw)
    assert torch.equal(Wr == 0, pruned_bf | (W_bf == 0)), "masks differ"
    assert torch.allclose(Wr, W_bf, rtol=0, atol=1e-10 * float(W.abs().max()))
    assert res.loss == pytest.approx(loss_bf, rel=1e-10)
    assert res.dead_columns == len(dead)
    if dead:
        assert bool((Wr[:, list(dead)] == 0).all())


def test_inverse_factor_reversal_identity_float64():
    W, H = _tiny(cols=40)
    damp = 0.01
    U = reference.inverse_factor(H, damp)
    Hd = reference.damped_hessian(H, damp)
    assert torch.equal(U, torch.triu(U))
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-10, atol=1e-12)
    # the three-step path of the paper's code gives the same factor
    U3 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    assert torch.allclose(U, U3, rtol=1e-9, atol=1e-12)


def test_inverse_factor_float32_accuracy_not_worse_than_three_step():
    X = correlated_inputs(4096, 256, seed=3)
    H = hessian_of(X)
    Hd64 = reference.damped_hessian(H.double(), 0.01)
    truth = torch.linalg.cholesky(torch.linalg.inv(Hd64), upper=True)
    U = reference.inverse_factor(H, 0.01)
    Hd = reference.damped_hessian(H, 0.01)
    U3 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    e1 = float((U.double() - truth).norm() / truth.norm())
    e3 = float((U3.double() - truth).norm() / truth.norm())
    assert e1 <= 2 * e3 + 1e-7, (e1, e3)


def test_inverse_factor_reports_failure():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    H[0, 1] = H[1, 0] = 5.0  # indefinite
    assert reference.inverse_factor(H, 0.01) is None
    assert reference.inverse_factor(H, 10.0) is not None


# --------------------------------------------------------------------------------------------------------------------
# Invariants of the sweep
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_block_size_invariance(pattern):
    X = correlated_inputs(512, 64, seed=1, dtype=torch.float64)
    H = hessian_of(X)
    W = torch.randn(9, 64, dtype=torch.float64)
    outs = []
    for bs in (8, 16, 24, 64, 128):
        Wc = W.clone()
        sk.prune_layer(Wc, H, pattern=pattern, block_size=bs, backend="torch")
        outs.append(Wc)
    for o in outs[1:]:
        assert torch.equal(o == 0, outs[0] == 0)
        assert torch.allclose(o, outs[0], rtol=1e-9, atol=1e-9)


def test_unstructured_block_size_invariance_when_block_covers_all_columns():
    X = correlated_inputs(512, 48, seed=2)
    H = hessian_of(X)
    W = torch.randn(10, 48)
    outs = []
    for bs in (48, 64, 128, 1000):
        Wc = W.clone()
        sk.prune_layer(Wc, H, sparsity=0.6, block_size=bs, backend="torch")
        outs.append(Wc)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("rows,cols,bs,sp", [(7, 50, 16, 0.5), (1, 33, 8, 0.3), (129, 100, 32, 0.9), (5, 20, 128, 0.0)])
def test_unstructured_exact_sparsity_per_block(rows, cols, bs, sp):
    X = correlated_inputs(256, cols, seed=4)
    W = torch.randn(rows, cols)
    res = sk.prune_layer(W, hessian_of(X), sparsity=sp, block_size=bs, backend="torch")
    total = 0
    for i1 in range(0, cols, bs):
        blk = W[:, i1:i1 + bs]
        k = int(sp * blk.numel() + 0.5)
        assert int((blk == 0).sum()) == k, (i1, int((blk == 0).sum()), k)
        total += k
    assert res.sparsity == pytest.approx(total / W.numel())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:8", "3:4"])
def test_nm_pattern_in_every_group_of_every_row(pattern):
    n, m = map(int, pattern.split(":"))
    X = correlated_inputs(256, 96, seed=5)
    W = torch.randn(13, 96)
    res = sk.prune_layer(W, hessian_of(X), pattern=pattern, block_size=48 if 48 % m == 0 else 96, backend="torch")
    kept = (W != 0).reshape(13, 96 // m, m).sum(-1)
    assert bool((kept == n).all()), f"{pattern}: kept per group {kept.unique().tolist()}"
    assert res.sparsity == pytest.approx(1 - n / m)
    assert res.pattern == pattern


def test_nm_keep_mask_ties_and_reading():
    # all ties: the earlier columns are pruned first, so the last N of each group are kept
    s = torch.zeros(2, 8)
    keep = sk.nm_keep_mask(s, 1, 4)
    assert keep.tolist() == [[False, False, False, True] * 2] * 2
    # "N kept of every M": 1:4 keeps the single largest
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert sk.nm_keep_mask(s, 1, 4).tolist() == [[False, True, False, False]]
    assert sk.nm_keep_mask(s, 3, 4).tolist() == [[False, True, True, True]]


def test_unstructured_mask_ties_exact_count():
    s = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    mask = reference.unstructured_prune_mask(s, 3)
    assert mask.tolist() == [[True, True, True], [False, False, False]]
    mask = reference.unstructured_prune_mask(s, 4)
    assert mask.tolist() == [[True, True, True], [True, False, False]]


# --------------------------------------------------------------------------------------------------------------------
# Quality against simple baselines on realistic inputs
# --------------------------------------------------------------------------------------------------------------------
def _baseline(prune_, W, *args, pattern=None):
    Wb = W.clone()
    prune_(Wb, *args, **({"pattern": pattern} if pattern else {"sparsity": 0.5}))
    return Wb


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_beats_magnitude_and_wanda(pattern):
    X = correlated_inputs(4096, 256, outliers=6, seed=7)
    W = torch.randn(96, 256) * 0.05
    Wp = W.clone()
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    sk.prune_layer(Wp, hessian_of(X), backend="torch", **kw)
    e_sgpt = recon_error(X, W, Wp)
    e_mag = recon_error(X, W, _baseline(sk.magnitude_prune_, W, pattern=pattern))
    e_wanda = recon_error(X, W, _baseline(sk.wanda_prune_, W, hessian_of(X).diagonal(), pattern=pattern))
    assert e_sgpt < 0.7 * e_wanda, (e_sgpt, e_wanda)
    assert e_sgpt < 0.7 * e_mag, (e_sgpt, e_mag)
