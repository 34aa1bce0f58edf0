"""Shared test utilities: synthetic layers with realistic inputs and the reconstruction-error metric."""

from __future__ import annotations

import pytest
import torch


def correlated_inputs(n: int, cols: int, *, outliers: int = 4, outlier_scale: float = 20.0, seed: int = 0,
                      dtype=torch.float32) -> torch.Tensor:
    """Inputs like a transformer's: strongly correlated features plus a few outlier features of large magnitude."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, cols // 4)
    Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    A = torch.randn(rank, cols, generator=g, dtype=torch.float64) / rank**0.5
    X = Z @ A + 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)
    idx = torch.randperm(cols, generator=g)[:outliers]
    X[:, idx] *= outlier_scale
    return X.to(dtype)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    """H = (2/n) XᵀX, as HessianAccumulator computes it."""
    return 2.0 / X.shape[0] * (X.T @ X)


def recon_error(X: torch.Tensor, W_dense: torch.Tensor, W_pruned: torch.Tensor) -> float:
    """||X Wᵀ − X Ŵᵀ||² in float64."""
    X = X.double()
    return float(((X @ W_dense.double().T - X @ W_pruned.double().T) ** 2).sum())


# prune_layer modes every compiled backend is checked in against the torch reference (cols must be a multiple of 40)
PRUNE_MODES = [
    pytest.param({"sparsity": 0.5}, id="50%"),
    pytest.param({"pattern": "2:4"}, id="2:4"),
    pytest.param({"pattern": "4:8"}, id="4:8"),
    pytest.param({"pattern": "1:4"}, id="1:4"),
    pytest.param({"pattern": "2:8"}, id="2:8"),
    pytest.param({"sparsity": 0.5, "quant_bits": 4}, id="50%-q4"),
    pytest.param({"sparsity": 0.5, "quant_bits": 4, "quant_group_size": 40}, id="50%-q4g40"),
    pytest.param({"pattern": "2:4", "quant_bits": 4, "quant_group_size": 40}, id="2:4-q4g40"),
]
