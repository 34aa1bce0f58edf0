"""prune_layer: layer types, dtypes, damping escalation, joint quantization, backends, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import correlated_inputs, hessian_of, problem_without_near_ties, recon_error, spec_of
from torch import nn

import sparsegpt_kernels as sk
from sparsegpt_kernels import reference
from sparsegpt_kernels.backends import ENV_VAR, select_backend


def _layer(rows=32, cols=64, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=True).to(dtype)
    X = correlated_inputs(1024, cols, seed=seed)
    return lin, X, hessian_of(X)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_layers_keep_dtype_and_pattern(dtype):
    lin, X, H = _layer(dtype=dtype)
    dense = lin.weight.detach().clone()
    bias = lin.bias.detach().clone()
    res = sk.prune_layer(lin, H, pattern="2:4")
    assert lin.weight.dtype == dtype and lin.weight.device == dense.device
    assert torch.equal(lin.bias, bias)
    kept = (lin.weight != 0).reshape(32, 16, 4).sum(-1)
    assert bool((kept == 2).all())
    assert res.sparsity == 0.5 and res.backend in sk.available_backends("cpu")
    # the low-precision result is the float32 result rounded once
    W32 = dense.float().clone()
    sk.prune_layer(W32, H, pattern="2:4", backend=res.backend)
    assert torch.equal(lin.weight, W32.to(dtype))
    assert recon_error(X, dense, lin.weight.detach()) < recon_error(X, dense, dense * (lin.weight != 0))


def test_conv1d_matches_linear():
    pytest.importorskip("transformers", reason="transformers is an optional dependency ([hf] extra)")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=24, nx=40)  # weight (in=40, out=24)
    with torch.no_grad():
        conv.weight.normal_()
    X = correlated_inputs(512, 40, seed=3)
    H = hessian_of(X)
    W = conv.weight.detach().T.clone()
    res = sk.prune_layer(conv, H, sparsity=0.5, block_size=16)
    res_t = sk.prune_layer(W, H, sparsity=0.5, block_size=16)
    assert conv.weight.shape == (40, 24)
    assert torch.equal(conv.weight.T, W)
    assert res.loss == res_t.loss and res.shape == (24, 40)


def test_dead_columns_zeroed_and_finite():
    X = correlated_inputs(512, 64, seed=1)
    dead = [0, 7, 63]
    X[:, dead] = 0
    W = torch.randn(16, 64)
    res = sk.prune_layer(W, hessian_of(X), sparsity=0.5)
    assert res.dead_columns == 3
    assert bool((W[:, dead] == 0).all()) and bool(torch.isfinite(W).all())


def test_rank_deficient_hessian_escalates_damping():
    # rank 8 inputs in 64 dims, then pushed slightly indefinite: tiny damping cannot factorise it
    X = torch.randn(256, 8) @ torch.randn(8, 64)
    H = hessian_of(X)
    H -= 1e-3 * H.diagonal().mean() * torch.eye(64)
    H = (H + H.T) / 2
    assert reference.inverse_factor(H, 1e-6) is None
    W = torch.randn(16, 64)
    W0 = W.clone()
    res = sk.prune_layer(W, H, sparsity=0.5, damp=1e-6)
    assert res.damp > 1e-6 and math.isclose(math.log10(res.damp / 1e-6), round(math.log10(res.damp / 1e-6)))
    assert bool(torch.isfinite(W).all()) and not torch.equal(W, W0)
    assert reference.inverse_factor(H, res.damp) is not None
    assert reference.inverse_factor(H, res.damp / 10) is None


def test_factorization_failure_raises_and_leaves_weight(monkeypatch):
    from sparsegpt_kernels import api

    monkeypatch.setattr(api, "MAX_DAMP_RETRIES", 1)
    H = -torch.ones(4, 4) + 5 * torch.eye(4)  # diag 4, eigenvalues 5-4=1 and 5
    H[0, 1] = H[1, 0] = 100.0
    W = torch.randn(3, 4)
    W0 = W.clone()
    with pytest.raises(sk.FactorizationError, match="damp"):
        sk.prune_layer(W, H, sparsity=0.5, damp=1e-3)
    assert torch.equal(W, W0)


@pytest.mark.parametrize("bits,group,pattern", [(4, None, None), (3, 16, "2:4"), (8, 32, None), (2, None, "4:8")])
def test_joint_quantization_on_grid(bits, group, pattern):
    X = correlated_inputs(1024, 64, seed=2)
    W = torch.randn(24, 64)
    dense = W.clone()
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    res = sk.prune_layer(W, hessian_of(X), quant_bits=bits, quant_group_size=group, block_size=32, **kw)
    grid = reference.make_quant_grid(dense, bits, group)
    g = grid.group_size
    scale = grid.scale.repeat_interleave(g, dim=1)
    zero = grid.zero.repeat_interleave(g, dim=1)
    levels = W / scale + zero
    assert torch.allclose(levels, levels.round(), atol=1e-3), "a kept weight is off its grid"
    assert bool(((levels.round() >= 0) & (levels.round() <= 2**bits - 1)).all())
    assert res.sparsity >= 0.5 and res.quant_bits == bits
    if pattern:
        n, m = map(int, pattern.split(":"))
        assert bool(((W != 0).reshape(24, -1, m).sum(-1) <= n).all())


def test_joint_quantization_costs_more_than_pruning_alone():
    X = correlated_inputs(1024, 64, seed=2)
    W = torch.randn(24, 64)
    Wp, Wq = W.clone(), W.clone()
    sk.prune_layer(Wp, hessian_of(X), sparsity=0.5)
    sk.prune_layer(Wq, hessian_of(X), sparsity=0.5, quant_bits=3)
    assert recon_error(X, W, Wp) < recon_error(X, W, Wq)


def test_failure_during_sweep_leaves_weight(monkeypatch):
    from sparsegpt_kernels.backends._torch import BACKEND as _torch

    def boom(W, U, spec):
        W.zero_()
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(_torch, "sweep", boom)
    lin, X, H = _layer()
    w0 = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="kernel crashed"):
        sk.prune_layer(lin, H, backend="torch")
    assert torch.equal(lin.weight, w0)


def test_hessian_accumulator_accepted_directly():
    lin, X, _ = _layer()
    acc = sk.HessianAccumulator(64)
    for chunk in X.split(100):
        acc.update(chunk)
    W_acc = lin.weight.detach().clone()
    sk.prune_layer(W_acc, acc, sparsity=0.5)
    W_h = lin.weight.detach().clone()
    sk.prune_layer(W_h, acc.hessian, sparsity=0.5)
    assert torch.equal(W_acc, W_h)


def test_float64_layer_is_solved_in_float64():
    """A float64 weight stays float64 and is solved in float64: the result equals the float64 sweep of the same
    problem to 1e-12, far closer than the float32 solve of it (which is off by float32 rounding)."""
    spec = spec_of({"pattern": "2:4"}, 32)
    _, W, H, U, spec = problem_without_near_ties(8, 64, spec)
    truth = W.clone()
    reference.sweep(truth, U, spec)
    W64, W32 = W.clone(), W.float()
    res = sk.prune_layer(W64, H, pattern="2:4", block_size=32, backend="torch")
    sk.prune_layer(W32, H.float(), pattern="2:4", block_size=32, backend="torch")
    assert W64.dtype == torch.float64 and res.sparsity == 0.5
    scale = float(truth.abs().max())
    err64 = float((W64 - truth).abs().max()) / scale
    err32 = float((W32.double() - truth).abs().max()) / scale
    assert err64 <= 1e-12 and err32 >= 1e3 * max(err64, 1e-15), (err64, err32)


def test_zero_sparsity_is_close_to_identity():
    X = correlated_inputs(512, 32)
    W = torch.randn(8, 32)
    W0 = W.clone()
    res = sk.prune_layer(W, hessian_of(X), sparsity=0.0)
    assert res.loss == 0.0 and torch.allclose(W, W0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------
def test_unknown_backend():
    lin, _, H = _layer()
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        sk.prune_layer(lin, H, backend="fast")
    assert torch.equal(lin.weight, w0)


def test_cuda_backend_on_cpu_tensors_is_an_error():
    lin, _, H = _layer()
    w0 = lin.weight.detach().clone()
    with pytest.raises(sk.BackendUnavailableError, match="'cuda'"):
        sk.prune_layer(lin, H, backend="cuda")
    assert torch.equal(lin.weight, w0)


def test_env_override(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("auto", "cpu")
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(sk.BackendUnavailableError, match=ENV_VAR):
        select_backend("auto", "cpu")


def test_available_backends_lists_torch_last():
    names = sk.available_backends("cpu")
    assert names[-1] == "torch"


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the problem, the weight bit-for-bit unchanged
# --------------------------------------------------------------------------------------------------------------------
def _bad(**override):
    lin, _, H = _layer(rows=8, cols=32)
    args = dict(layer=lin, hessian=H)
    args.update(override)
    return args


def _nan_weight():
    lin, _, H = _layer(rows=8, cols=32)
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    return dict(layer=lin, hessian=H)


def _asym():
    args = _bad()
    H = args["hessian"].clone()
    H[0, 1] += 1.0
    args["hessian"] = H
    return args


def _inf_h():
    args = _bad()
    H = args["hessian"].clone()
    H[2, 2] = float("inf")
    args["hessian"] = H
    return args


def _asym_far():
    """One asymmetric pair far below the diagonal of a Hessian larger than the panels the check reads it in."""
    lin, _, H = _layer(rows=8, cols=600)
    H = H.clone()
    H[599, 3] += 1.0
    return dict(layer=lin, hessian=H)


def _nan_h_offdiag():
    args = _bad()
    H = args["hessian"].clone()
    H[5, 9] = H[9, 5] = float("nan")
    args["hessian"] = H
    return args


def _neg_inf_weight():
    lin, _, H = _layer(rows=8, cols=32)
    with torch.no_grad():
        lin.weight[7, 31] = -float("inf")
    return dict(layer=lin, hessian=H)


def _neg_diag():
    args = _bad()
    H = args["hessian"].clone()
    H[2, 2] = -1.0
    args["hessian"] = H
    return args


BAD = {
    "weight-3d": (lambda: dict(layer=torch.randn(2, 8, 32), hessian=torch.eye(32)), ValueError, "2-D"),
    "weight-int": (lambda: dict(layer=torch.ones(8, 32, dtype=torch.int32), hessian=torch.eye(32)), TypeError,
                   "dtype"),
    "not-a-layer": (lambda: dict(layer=nn.ReLU(), hessian=torch.eye(32)), TypeError, "nn.Linear"),
    "h-not-square": (lambda: _bad(hessian=torch.eye(32)[:16]), ValueError, "square"),
    "h-wrong-size": (lambda: _bad(hessian=torch.eye(16)), ValueError, "in_features=32"),
    "h-fp16": (lambda: _bad(hessian=torch.eye(32, dtype=torch.float16)), TypeError, "float32 or float64"),
    "h-not-tensor": (lambda: _bad(hessian=[[1.0]]), TypeError, "hessian"),
    "h-empty-acc": (lambda: _bad(hessian=sk.HessianAccumulator(32)), ValueError, "no inputs"),
    "h-asym": (_asym, ValueError, "symmetric"),
    "h-asym-far": (_asym_far, ValueError, "symmetric"),
    "h-inf": (_inf_h, ValueError, "hessian contains NaN or Inf"),
    "h-nan-offdiag": (_nan_h_offdiag, ValueError, "hessian contains NaN or Inf"),
    "w-neg-inf": (_neg_inf_weight, ValueError, "weight contains NaN or Inf"),
    "h-neg-diag": (_neg_diag, ValueError, "negative diagonal"),
    "w-nan": (_nan_weight, ValueError, "weight contains NaN"),
    "sparsity-1": (lambda: _bad(sparsity=1.0), ValueError, "sparsity"),
    "sparsity-neg": (lambda: _bad(sparsity=-0.1), ValueError, "sparsity"),
    "sparsity-str": (lambda: _bad(sparsity="half"), ValueError, "sparsity"),
    "pattern-malformed": (lambda: _bad(pattern="2-4"), ValueError, "malformed pattern"),
    "pattern-n-ge-m": (lambda: _bad(pattern="4:4"), ValueError, "0 < N < M"),
    "pattern-zero": (lambda: _bad(pattern="0:4"), ValueError, "0 < N < M"),
    "pattern-not-dividing": (lambda: _bad(pattern="2:5", block_size=10), ValueError,
                             "in_features=32 is not a multiple of M=5"),
    "sparsity-and-pattern": (lambda: _bad(sparsity=0.5, pattern="2:4"), ValueError, "not both"),
    "h-all-zero": (lambda: _bad(hessian=torch.zeros(32, 32)), ValueError, "all zeros"),
    "pattern-block": (lambda: _bad(pattern="4:8", block_size=12), ValueError, "block_size=12"),
    "pattern-type": (lambda: _bad(pattern=(2, 4)), TypeError, "pattern"),
    "block-0": (lambda: _bad(block_size=0), ValueError, "block_size"),
    "damp-0": (lambda: _bad(damp=0.0), ValueError, "damp"),
    "damp-nan": (lambda: _bad(damp=float("nan")), ValueError, "damp"),
    "bits-1": (lambda: _bad(quant_bits=1), ValueError, "quant_bits"),
    "bits-9": (lambda: _bad(quant_bits=9), ValueError, "quant_bits"),
    "group-not-dividing": (lambda: _bad(quant_bits=4, quant_group_size=5), ValueError, "quant_group_size"),
    "group-without-bits": (lambda: _bad(quant_group_size=8), ValueError, "needs quant_bits"),
    "h-other-dtype-device": (lambda: _bad(hessian=torch.eye(32, device="meta")), ValueError, "meta"),
    "backend-type": (lambda: _bad(backend=3), TypeError, "backend"),
    "backend-unknown": (lambda: _bad(backend="numpy"), ValueError, "unknown backend 'numpy'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_rejected_weight_untouched(name):
    make, exc, msg = BAD[name]
    args = make()
    layer = args.pop("layer")
    H = args.pop("hessian")
    w = layer if isinstance(layer, torch.Tensor) else getattr(layer, "weight", None)
    before = w.detach().clone() if w is not None else None
    with pytest.raises(exc, match=msg):
        sk.prune_layer(layer, H, **args)
    if before is not None:
        assert torch.equal(w.detach().view(torch.uint8), before.view(torch.uint8)), "weight changed"


HESSIAN_BAD = ["h-asym", "h-asym-far", "h-inf", "h-nan-offdiag", "h-neg-diag"]


@pytest.mark.parametrize("c", [1, 5, 64, 301])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_hessian_stats_match_torch(c, dtype, monkeypatch):
    """The GPU-side Hessian check (one host synchronisation), run here on CPU tensors: min, max, max |H - Hᵀ| and the
    sign of the diagonal equal plain torch's, in several panels (a partial last one at 5 and 64 columns), with the
    largest asymmetry in the last two rows."""
    from sparsegpt_kernels.backends import base

    monkeypatch.setattr(base, "SYM_PANEL_ELEMS", 7 * c)  # panels of 7 rows
    A = torch.randn(c, c, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    H = ((A + A.T) / 2).to(dtype)
    H.diagonal().abs_()
    assert base._hessian_stats_device(H) == (float(H.min()), float(H.max()), 0.0, False)
    H[0, c - 1] -= 0.25
    H[c - 1, c - 2] += 0.75  # the largest, seen only in the last two rows (the last panel)
    H[c // 2, c // 2] = -1.0
    lo, hi, asym, neg = base._hessian_stats_device(H)
    assert (lo, hi, neg) == (float(H.min()), float(H.max()), True)
    assert asym == float((H - H.T).abs().max())
    assert asym == 0.0 if c == 1 else asym == pytest.approx(0.75, rel=1e-6)
    H[c - 1, c // 3] = float("nan")
    assert math.isnan(base._hessian_stats_device(H)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", HESSIAN_BAD)
def test_cuda_bad_hessian_rejected_weight_untouched(name):
    """The same errors from the GPU-side check (the CPU runs the tile loop or the compiled check)."""
    make, exc, msg = BAD[name]
    args = make()
    W = args["layer"].weight.detach().cuda()
    before = W.clone()
    with pytest.raises(exc, match=msg):
        sk.prune_layer(W, args["hessian"].cuda(), backend="torch")
    assert torch.equal(W, before)


def test_mask_sparsity_is_reported_apart_from_zeros():
    """Joint quantization can round kept weights to 0: PruneResult.sparsity counts zeros, mask_sparsity what the
    mask pruned (exactly n_pruned per block, or 1 - N/M)."""
    from sparsegpt_kernels import reference

    X = torch.randn(512, 200, generator=torch.Generator().manual_seed(1))
    H = 2.0 / 512 * X.T @ X
    W = torch.randn(30, 200, generator=torch.Generator().manual_seed(2))
    res = sk.prune_layer(W.clone(), H, sparsity=0.5, quant_bits=2, block_size=64)
    want = sum(reference.n_pruned(0.5, 30 * min(64, 200 - i)) for i in range(0, 200, 64)) / (30 * 200)
    assert res.mask_sparsity == want and res.sparsity > res.mask_sparsity
    res = sk.prune_layer(W.clone(), H, pattern="2:8", block_size=64)
    assert res.mask_sparsity == 0.75 == res.sparsity


def test_auto_prefers_cuda_then_triton_on_cuda(monkeypatch):
    """On CUDA tensors "auto" takes the cuda backend where the extension has its CUDA part (faster than Triton at
    every shape and mode timed on an H200, benchmarks/RESULTS.md), else Triton, and never cpp. Only the choice is
    tested: nothing runs on a device."""
    from sparsegpt_kernels import backends
    from sparsegpt_kernels.backends._cuda import BACKEND as _cuda
    from sparsegpt_kernels.backends._triton import BACKEND as _triton

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(_cuda, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(_triton, "unavailable_reason", lambda device: None)
    dev = torch.device("cuda")
    assert select_backend("auto", dev) is _cuda
    assert backends.available_backends(dev) == ["cuda", "triton", "torch"]
    monkeypatch.setattr(_cuda, "unavailable_reason", lambda device: "not built")
    assert select_backend("auto", dev) is _triton
    assert backends.available_backends(dev) == ["triton", "torch"]
