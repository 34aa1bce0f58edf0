"""Pruning computes with IEEE float32 products whatever the process-wide TF32 / bfloat16 matmul setting, and leaves
that setting exactly as it found it.

On a GPU the setting decides whether float32 GEMMs use TF32; on a CPU with bfloat16 units, "medium" lets float32
matmuls run in bfloat16. The checks below look at the setting seen inside the computation (any machine), at the
result (which "medium" changes on CPUs with bfloat16 matmul units), and at the setting afterwards.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import correlated_inputs, hessian_of

import sparsegpt_kernels as sk
from sparsegpt_kernels import precision
from sparsegpt_kernels.backends._torch import BACKEND as torch_backend

HAS_BACKEND_SETTINGS = bool(precision._matmul_settings())


@pytest.fixture(autouse=True)
def _restore_global_precision():
    handles = precision._matmul_settings()
    saved = [h.fp32_precision for h in handles]
    yield
    torch.set_float32_matmul_precision("highest")
    for h, value in zip(handles, saved):
        h.fp32_precision = value


def _state() -> tuple:
    """Every float32 matmul setting, as a user would read them."""
    per_backend = tuple(h.fp32_precision for h in precision._matmul_settings())
    try:
        legacy = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError as e:  # torch >= 2.9 refuses to read the legacy view of mixed settings
        legacy = ("mixed", str(e)[:40])
    return per_backend, legacy


def _set_user_setting(kind: str) -> None:
    if kind == "legacy allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif kind == "medium":
        torch.set_float32_matmul_precision("medium")
    elif kind == "high":
        torch.set_float32_matmul_precision("high")
    elif kind == "per-backend tf32":
        if not HAS_BACKEND_SETTINGS:
            pytest.skip("this torch has no per-backend fp32_precision settings (torch < 2.9)")
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    else:
        raise ValueError(kind)


def _problem(seed: int = 0):
    X = correlated_inputs(1024, 256, seed=seed)
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(seed))
    return hessian_of(X), W


def _seen_inside() -> tuple:
    per_backend = tuple(h.fp32_precision for h in precision._matmul_settings())
    return per_backend, torch.get_float32_matmul_precision()


USER_SETTINGS = ["legacy allow_tf32", "medium", "high", "per-backend tf32"]


@pytest.mark.parametrize("setting", USER_SETTINGS)
def test_sweep_runs_at_ieee_precision_and_the_setting_is_restored(setting, monkeypatch):
    H, W = _problem()
    _set_user_setting(setting)
    before = _state()
    seen = []
    real_sweep = torch_backend.sweep

    def spy(W_, U_, spec):
        seen.append(_seen_inside())
        return real_sweep(W_, U_, spec)

    monkeypatch.setattr(torch_backend, "sweep", spy)
    sk.prune_layer(W, H, sparsity=0.5, backend="torch")
    assert seen and all(p == "highest" and all(v == "ieee" for v in pb) for pb, p in seen), seen
    assert _state() == before


@pytest.mark.parametrize("setting", ["medium", "legacy allow_tf32"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_result_does_not_depend_on_the_global_setting(setting, backend):
    H, W = _problem(1)
    if backend not in sk.available_backends("cpu"):
        pytest.fail(f"backend {backend} is not available here")
    W_ref = W.clone()
    r_ref = sk.prune_layer(W_ref, H, pattern="2:4", backend=backend)
    _set_user_setting(setting)
    W_user = W.clone()
    r_user = sk.prune_layer(W_user, H, pattern="2:4", backend=backend)
    assert torch.equal(W_user, W_ref) and r_user.loss == r_ref.loss


def test_setting_restored_when_pruning_fails(monkeypatch):
    H, W = _problem()
    _set_user_setting("medium")
    before = _state()
    W0 = W.clone()

    def boom(*args):
        raise RuntimeError("sweep failed")

    monkeypatch.setattr(torch_backend, "sweep", boom)
    with pytest.raises(RuntimeError, match="sweep failed"):
        sk.prune_layer(W, H, sparsity=0.5, backend="torch")
    assert _state() == before and torch.equal(W, W0)


def test_hessian_products_at_ieee_precision(monkeypatch):
    _set_user_setting("medium")
    before = _state()
    seen = []
    real_addmm_ = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_addmm_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    acc = sk.HessianAccumulator(64)
    X = torch.randn(300, 64)
    acc.update(X)
    monkeypatch.undo()
    assert seen == ["highest"] and _state() == before
    torch.set_float32_matmul_precision("highest")
    torch.testing.assert_close(acc.hessian, 2.0 / 300 * (X.T @ X), rtol=1e-6, atol=1e-6)


def test_nested_and_concurrent_scopes_restore_once():
    _set_user_setting("high")
    before = _state()
    inside = threading.Barrier(2)

    def worker():
        with precision.ieee_float32_matmul():
            inside.wait(timeout=10)  # both threads in the scope at once
            assert torch.get_float32_matmul_precision() == "highest"
            inside.wait(timeout=10)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    with precision.ieee_float32_matmul():
        with precision.ieee_float32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "highest"
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    assert _state() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (TF32)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tf32_does_not_change_the_result_on_a_gpu(backend):
    """With TF32 on, cuBLAS float32 GEMMs round their inputs to 10-bit mantissas; inside prune_layer they must not."""
    import os

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the triton case needs the compiled kernels (TRITON_INTERPRET=0 on a CUDA GPU)")
    H, W = _problem(2)
    H, W = H.cuda(), W.cuda()
    W_ref = W.clone()
    r_ref = sk.prune_layer(W_ref, H, pattern="2:4", backend=backend)
    torch.backends.cuda.matmul.allow_tf32 = True
    W_tf32 = W.clone()
    r_tf32 = sk.prune_layer(W_tf32, H, pattern="2:4", backend=backend)
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.equal(W_tf32, W_ref) and r_tf32.loss == r_ref.loss
