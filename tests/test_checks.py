"""The compiled value checks (``ext_hessian_stats``, ``ext_nonzeros_finite``) against torch, and prune_layer's
errors through them: odd sizes (partial tiles), NaN/Inf in any position, asymmetry at the edges, every dtype."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import require_extension

import sparsegpt_kernels as sk
from sparsegpt_kernels import checks
from sparsegpt_kernels.backends import extension as _ext


@pytest.fixture(autouse=True)
def _need_extension():
    require_extension()


def ops():
    return _ext.ops()


def _sym(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(c, c, generator=g, dtype=torch.float64)
    return ((A + A.T) / 2).to(dtype)


@pytest.mark.parametrize("c", [1, 7, 255, 256, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_stats_match_torch(c, dtype):
    H = _sym(c, dtype, seed=c)
    lo, hi, asym, finite = ops().ext_hessian_stats(H)
    assert (lo, hi) == (float(H.min()), float(H.max())) and finite == 1.0 and asym == 0.0
    # one asymmetric pair, in the last (partial) tile row and column
    H[c - 1, 0] += 0.5
    lo, hi, asym, finite = ops().ext_hessian_stats(H)
    want = float((H - H.T).abs().max())
    assert asym == pytest.approx(want, rel=1e-6) and (lo, hi) == (float(H.min()), float(H.max()))
    # all-negative: min/max must not pick up padding zeros
    N = -H.abs() - 1
    lo, hi, _, _ = ops().ext_hessian_stats(N)
    assert (lo, hi) == (float(N.min()), float(N.max())) and hi < 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 0), (3, 259), (299, 299), (299, 0)])
def test_hessian_stats_see_non_finite_anywhere(bad, where):
    H = _sym(300)
    H[where] = bad
    assert ops().ext_hessian_stats(H)[3] == 0.0


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100_003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonzeros_finite_match_torch(n, dtype):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g).to(dtype)
    t[torch.rand(n, generator=g) < 0.5] = 0
    if n:
        t[-1] = -0.0  # negative zero is zero
    nz, finite = ops().ext_nonzeros_finite(t)
    assert nz == int(torch.count_nonzero(t)) and finite == 1
    assert checks.count_nonzero(t) == nz and checks.all_finite(t)
    from sparsegpt_kernels.backends._torch import BACKEND as torch_backend

    assert torch_backend.nonzeros_and_finite(t) == (nz, True)
    if n:
        for i in {0, n // 2, n - 1}:
            u = t.clone()
            u[i] = float("nan") if i % 2 else float("inf")
            assert ops().ext_nonzeros_finite(u)[1] == 0 and not checks.all_finite(u)


def test_nonzeros_finite_of_a_strided_view():
    t = torch.randn(64, 48)
    t[:, ::3] = 0
    v = t.T  # not contiguous
    assert ops().ext_nonzeros_finite(v)[0] == int(torch.count_nonzero(v))


def test_checks_fall_back_to_torch_for_other_tensors():
    """Outside a solve the compiled checks read CPU tensors once the extension is loaded; dtypes they do not take
    (integers) go to torch's, with the same answers."""
    from sparsegpt_kernels.backends import value_checks
    from sparsegpt_kernels.backends._cpp import BACKEND as cpp

    assert value_checks(torch.ones(3)) is cpp
    assert checks.count_nonzero(torch.tensor([0, 2, 0, 5], dtype=torch.int32)) == 2
    assert cpp.nonzeros_and_finite(torch.tensor([0, 2, 0, 5], dtype=torch.int32)) == (2, True)
    assert checks.count_nonzero(torch.tensor([0.0, -0.0, 1e-45, float("nan")])) == 2
    assert not checks.all_finite(torch.tensor([0.0, float("-inf")])) and checks.all_finite(torch.zeros(2))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_prune_layer_rejects_bad_hessians_through_either_path(backend):
    """With the extension loaded (cpp, and torch after it) the compiled checks give prune_layer's messages."""
    W = torch.randn(8, 300)
    H = _sym(300) @ _sym(300).T / 300 + torch.eye(300)
    Hbad = H.clone()
    Hbad[299, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        sk.prune_layer(W.clone(), Hbad, backend=backend)
    Hbad = H.clone()
    Hbad[5, 290] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sk.prune_layer(W.clone(), Hbad, backend=backend)
    Wbad = W.clone()
    Wbad[7, 299] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        sk.prune_layer(Wbad, H, backend=backend)
    assert math.isinf(float(Wbad[7, 299]))  # left as it was
    res = sk.prune_layer(W, H, backend=backend)
    assert res.sparsity == 1 - int(torch.count_nonzero(W)) / W.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_working_copy_is_a_new_contiguous_copy(dtype):
    """The cpp backend's working copy of W (huge pages): same values in the requested dtype, contiguous, never
    sharing memory with the weight, from a transposed (Conv1D-style) view too."""
    from sparsegpt_kernels.backends._cpp import BACKEND as _cpp

    for W0 in (torch.randn(600, 1100, dtype=torch.float16), torch.randn(1100, 600).T, torch.randn(3, 5)):
        W = _cpp.working_copy(W0, dtype)
        assert W.dtype == dtype and W.is_contiguous() and W.shape == W0.shape
        assert torch.equal(W, W0.to(dtype))
        W.zero_()
        assert bool(W0.ne(0).any())
    assert ops().ext_empty_big([0, 7], torch.float32).shape == (0, 7)
    with pytest.raises(RuntimeError, match="negative size"):
        ops().ext_empty_big([-1, 3], torch.float32)


def _prune_in_subprocess(tmp_path, cache_mb: str) -> torch.Tensor:
    """prune_layer on a fixed problem in a new process with SPARSEGPT_KERNELS_CPU_CACHE_MB=cache_mb, twice (the second
    call on buffers the first one left dirty, where they are cached); returns the second result."""
    out = tmp_path / f"w{cache_mb}.pt"
    code = (
        "import torch, sparsegpt_kernels as sk\n"
        "g = torch.Generator().manual_seed(3)\n"
        "X = torch.randn(2048, 700, generator=g)\n"
        "H = X.T @ X / 2048\n"
        "for s in (1, 2):\n"
        "    W = torch.randn(900, 700, generator=torch.Generator().manual_seed(s))\n"
        "    sk.prune_layer(W, H, sparsity=0.6, block_size=64, backend='cpp')\n"
        f"torch.save(W, {str(out)!r})\n"
    )
    env = {**os.environ, "SPARSEGPT_KERNELS_CPU_CACHE_MB": cache_mb}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return torch.load(out)


def test_cpu_cache_reuses_buffers_and_is_freed(tmp_path):
    """The cpp backend's big buffers go back to the cache and are taken again for the next layer of the same shape:
    the result is the same bits as with no cache (the reused memory is dirty), idle memory stays under the cap, and
    empty_cache frees it."""
    sk.empty_cache()
    assert ops().ext_cpu_cache_idle_bytes() == 0
    H = _sym(700).abs() + 700 * torch.eye(700)
    W = torch.randn(900, 700)
    sk.prune_layer(W.clone(), H, backend="cpp")
    idle = ops().ext_cpu_cache_idle_bytes()
    assert idle >= 2 * 900 * 700 * 4  # at least the working copy and the sweep's scratch (both of W's size)
    sk.prune_layer(W.clone(), H, backend="cpp")
    assert ops().ext_cpu_cache_idle_bytes() == idle  # the same buffers again, none new
    assert sk.empty_cache() == idle
    assert ops().ext_cpu_cache_idle_bytes() == 0
    assert torch.equal(_prune_in_subprocess(tmp_path, "2048"), _prune_in_subprocess(tmp_path, "0"))


def test_cpu_cache_cap(tmp_path):
    """SPARSEGPT_KERNELS_CPU_CACHE_MB caps what is kept idle: 0 keeps nothing, 5 one of the three 4 MiB buffers (the
    working copy, the sweep's lazy updates and its group of changes, each (900, 700)), the default all three; a value
    that is not a number is an error that names it."""
    code = (
        "import torch, sparsegpt_kernels as sk\n"
        "H = torch.eye(700) * 3\n"
        "sk.prune_layer(torch.randn(900, 700), H, backend='cpp')\n"
        "print(torch.ops.sparsegpt_kernels.ext_cpu_cache_idle_bytes())\n"
    )
    for mb, check in (("0", lambda b: b == 0), ("5", lambda b: b == 4 << 20), ("", lambda b: b == 12 << 20)):
        env = {**os.environ, "SPARSEGPT_KERNELS_CPU_CACHE_MB": mb}
        res = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        assert check(int(res.stdout.strip().splitlines()[-1])), (mb, res.stdout)
    env = {**os.environ, "SPARSEGPT_KERNELS_CPU_CACHE_MB": "lots"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "SPARSEGPT_KERNELS_CPU_CACHE_MB=lots is not a whole number" in res.stderr
