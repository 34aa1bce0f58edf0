"""The Triton N:M keep-mask ("N kept of every M") against reference.nm_keep_mask: exact, including ties."""

from __future__ import annotations

import pytest
import torch

from sparsegpt_kernels import reference
from sparsegpt_kernels.ops.nm_mask import nm_keep_mask_triton

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (3, 5)]  # 1:4 and 2:8 tell "N kept" from "N pruned"


def _scores(kind: str, rows: int, cols: int) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(rows, cols)
    if kind == "ties":  # many equal scores inside each group
        return torch.randint(0, 3, (rows, cols)).float()
    if kind == "constant":
        return torch.ones(rows, cols)
    if kind == "signed_zero":  # -0.0 and +0.0 are equal scores
        return torch.where(torch.rand(rows, cols) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    raise ValueError(kind)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,groups", [(1, 1), (7, 3), (129, 70)])
@pytest.mark.parametrize("kind", ["randn", "ties", "constant", "signed_zero"])
def test_matches_reference(n, m, rows, groups, kind, poison_empty):
    s = _scores(kind, rows, groups * m)
    keep = nm_keep_mask_triton(s, n, m)
    assert keep.dtype == torch.bool and keep.shape == s.shape
    assert torch.equal(keep, reference.nm_keep_mask(s, n, m))
    assert bool((keep.reshape(rows, groups, m).sum(-1) == n).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_and_batch_dims(dtype):
    s = torch.randint(0, 4, (3, 5, 16)).to(dtype)
    assert torch.equal(nm_keep_mask_triton(s, 2, 4), reference.nm_keep_mask(s, 2, 4))


def test_non_contiguous_input():
    s = torch.randn(24, 9).T  # (9, 24), column stride 9
    assert torch.equal(nm_keep_mask_triton(s, 2, 4), reference.nm_keep_mask(s, 2, 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_keep_mask_triton(torch.randn(2, 8), 4, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        nm_keep_mask_triton(torch.randn(2, 10), 2, 4)


def test_opcheck():
    torch.library.opcheck(torch.ops.sparsegpt_kernels.nm_keep_mask.default, (torch.randn(5, 16), 2, 4))
