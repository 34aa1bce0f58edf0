"""HessianAccumulator: running mean, batching invariance, devices, errors."""

import pytest
import torch

import sparsegpt_kernels as sk


def test_running_mean_equals_batch_formula():
    X = torch.randn(3, 50, 16, dtype=torch.float64)
    acc = sk.HessianAccumulator(16, dtype=torch.float64)
    for b in X:
        acc.update(b)
    flat = X.reshape(-1, 16)
    assert acc.count == 150
    assert torch.allclose(acc.hessian, 2 / 150 * flat.T @ flat, rtol=1e-12)


def test_batching_invariance_and_shapes():
    X = torch.randn(4, 7, 24)
    a, b = sk.HessianAccumulator(24), sk.HessianAccumulator(24)
    a.update(X)
    for i in range(4):
        for j in range(7):
            b.update(X[i, j])
    assert torch.allclose(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)
    assert a.hessian.shape == (24, 24) and a.hessian.dtype == torch.float32


def test_low_precision_inputs_accumulate_in_float32():
    x = torch.randn(64, 8).to(torch.bfloat16)
    acc = sk.HessianAccumulator(8)
    acc.update(x)
    ref = 2 / 64 * x.float().T @ x.float()
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian, ref, rtol=1e-5, atol=1e-6)


def test_device_lazy_and_reset():
    acc = sk.HessianAccumulator(4)
    assert acc.device is None
    acc.update(torch.randn(3, 4))
    assert acc.device == torch.device("cpu")
    acc.reset()
    assert acc.count == 0 and float(acc.hessian.abs().sum()) == 0
    acc.update(torch.empty(0, 4))
    assert acc.count == 0


@pytest.mark.parametrize(
    "x,exc,msg",
    [
        (torch.randn(3, 5), ValueError, r"\(\.\.\., 4\)"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "floating"),
        (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), ValueError, "NaN"),
        ("x", TypeError, "tensor"),
    ],
)
def test_bad_updates(x, exc, msg):
    acc = sk.HessianAccumulator(4)
    acc.update(torch.randn(2, 4))
    before = acc.hessian.clone()
    with pytest.raises(exc, match=msg):
        acc.update(x)
    assert torch.equal(acc.hessian, before) and acc.count == 2


@pytest.mark.parametrize("kw", [dict(in_features=0), dict(in_features=4, dtype=torch.float16)])
def test_bad_construction(kw):
    with pytest.raises(ValueError):
        sk.HessianAccumulator(**kw)
