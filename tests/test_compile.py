"""The registered ops trace under torch.compile (fullgraph, no graph breaks) and give the eager results.

``aot_eager`` exercises Dynamo + AOTAutograd tracing through the fake (meta) implementations without generating
code, which is what makes an op usable inside a compiled model; the numbers come from the real kernels.
"""

from __future__ import annotations

import pytest
import torch

from sparsegpt_kernels import reference
from sparsegpt_kernels.backends import extension as _ext
from sparsegpt_kernels.ops.nm_mask import nm_keep_mask_triton


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _spd(c: int) -> torch.Tensor:
    X = torch.randn(4 * c, c)
    return X.T @ X / (4 * c)


def test_triton_nm_mask_under_compile():
    s = torch.randn(7, 64)
    got = _compiled(lambda x: nm_keep_mask_triton(x, 2, 4))(s)
    assert torch.equal(got, reference.nm_keep_mask(s, 2, 4))


@pytest.mark.parametrize("mode", [dict(sparsity=0.5, n=None, m=None), dict(sparsity=0.5, n=2, m=4)])
def test_triton_sweep_under_compile(mode):
    """Inside a compiled region the sweep goes through the registered op (eagerly it calls the op's implementation
    directly); both give the eager weights and loss, and the compiled call mutates its input like the eager one."""
    from sparsegpt_kernels.ops.sweep import sweep_triton

    U = reference.inverse_factor(_spd(80), 0.01).contiguous()
    W = torch.randn(20, 80, generator=torch.Generator().manual_seed(2))
    We, Wc = W.clone(), W.clone()
    loss_e = sweep_triton(We, U, block_size=32, **mode)
    loss_c = _compiled(lambda w, u: sweep_triton(w, u, block_size=32, **mode))(Wc, U)
    assert torch.equal(Wc, We) and not torch.equal(We, W)
    assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-6) and float(loss_e) > 0


@pytest.fixture
def ext_ops():
    if _ext.load() is None:
        pytest.skip(f"C++ extension not built: {_ext.missing_reason()}")
    return _ext.ops()


def test_cpp_ops_under_compile(ext_ops):
    H = _spd(64).double()
    s = torch.randn(5, 64, dtype=torch.float64)

    def f(h, x):
        U, info = ext_ops.ext_inverse_factor(h, 0.01)
        return U, info, ext_ops.ext_nm_keep_mask(x, 1, 4)

    U, info, keep = _compiled(f)(H, s)
    assert int(info) == 0
    assert torch.allclose(U, reference.inverse_factor(H, 0.01), rtol=1e-10, atol=1e-12)
    assert torch.equal(keep, reference.nm_keep_mask(s, 1, 4))
