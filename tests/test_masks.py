"""sparsegpt_kernels.nm_keep_mask / unstructured_prune_mask: every implementation they dispatch to gives the
reference's masks exactly (ties included), and "auto" picks the compiled one where it runs."""

from __future__ import annotations

import pytest
import torch

import sparsegpt_kernels as sk
from sparsegpt_kernels import masks, reference


def _scores(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "ties":
        return torch.randint(0, 3, (37, 64), generator=g).float()
    return torch.randn(37, 64, generator=g)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_nm_keep_mask_every_backend(backend, kind):
    s = _scores(kind)
    for n, m in [(2, 4), (1, 4), (4, 8)]:
        assert torch.equal(sk.nm_keep_mask(s, n, m, backend=backend), reference.nm_keep_mask(s, n, m))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_unstructured_prune_mask_every_backend(backend, kind):
    s = _scores(kind)
    for k in (0, 1, 1000, s.numel() // 2, s.numel()):
        got = sk.unstructured_prune_mask(s, k, backend=backend)
        assert torch.equal(got, reference.unstructured_prune_mask(s, k)) and int(got.sum()) == k


def test_auto_uses_the_compiled_kernels_where_they_run(monkeypatch):
    from sparsegpt_kernels.backends import extension

    calls = []
    real = extension.ops

    def spy():
        calls.append("ext")
        return real()

    monkeypatch.setattr(extension, "ops", spy)
    s = _scores("randn")
    assert torch.equal(masks.nm_keep_mask(s, 2, 4), reference.nm_keep_mask(s, 2, 4))
    assert calls == ["ext"]  # on the CPU: the C++ extension (Triton's interpreter is never picked by auto)
    s16 = s.half()
    assert torch.equal(masks.nm_keep_mask(s16, 2, 4), reference.nm_keep_mask(s16, 2, 4))  # a dtype it lacks
    assert calls == ["ext"]
