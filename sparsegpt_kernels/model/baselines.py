"""Magnitude and Wanda pruning of one weight matrix, for side-by-side comparison with SparseGPT.

Both prune in place without any weight update. Magnitude (unstructured) compares |W| over the whole layer; Wanda
(Sun et al., 2023) scores |W_ij|·||X_j|| and compares within each output row. N:M uses :func:`nm_keep_mask`
("N kept of every M consecutive input columns"). The selections run on the compiled kernels where they can
(:mod:`sparsegpt_kernels.masks`). With ``quant_bits`` the kept weights are then rounded to the same
per-channel asymmetric grid SparseGPT uses (fixed from the dense weight; zeros stay zero).
"""

from __future__ import annotations

import torch

from .. import reference
from ..masks import nm_keep_mask, unstructured_prune_mask
from ..settings import parse_pattern


def _apply(W: torch.Tensor, keep: torch.Tensor, quant_bits: int | None, quant_group_size: int | None) -> float:
    Wf = W.float()
    new = torch.where(keep, Wf, torch.zeros_like(Wf))
    if quant_bits is not None:
        grid = reference.make_quant_grid(Wf, quant_bits, quant_group_size)
        g = grid.group_size
        scale = grid.scale.repeat_interleave(g, dim=1)
        zero = grid.zero.repeat_interleave(g, dim=1)
        new = torch.where(keep, reference.quantize(new, scale, zero, grid.maxq), new)
    W.copy_(new.to(W.dtype))
    return float((W == 0).sum()) / W.numel()


def _keep_mask(scores: torch.Tensor, sparsity: float, pattern: str | None, per_row: bool) -> torch.Tensor:
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return nm_keep_mask(scores, n, m)
    if per_row:
        k = reference.n_pruned(sparsity, scores.shape[1])
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, idx, False)
        return keep
    return ~unstructured_prune_mask(scores, reference.n_pruned(sparsity, scores.numel()))


def mask_fraction(shape: tuple[int, int], *, sparsity: float, pattern: str | None, per_row: bool) -> float:
    """The fraction of a weight of ``shape`` that the baselines' masks prune (N:M exactly 1 - N/M; unstructured
    ``reference.n_pruned`` of the whole matrix, or of every row for Wanda)."""
    rows, cols = shape
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return 1.0 - n / m
    if per_row:
        return reference.n_pruned(sparsity, cols) / cols
    return reference.n_pruned(sparsity, rows * cols) / (rows * cols)


@torch.no_grad()
def magnitude_prune_(W: torch.Tensor, *, sparsity: float = 0.5, pattern: str | None = None,
                     quant_bits: int | None = None, quant_group_size: int | None = None) -> float:
    """Prune the (out, in) weight ``W`` in place by |W| (layer-wide threshold); returns the achieved sparsity."""
    keep = _keep_mask(W.float().abs(), sparsity, pattern, per_row=False)
    return _apply(W, keep, quant_bits, quant_group_size)


@torch.no_grad()
def wanda_prune_(W: torch.Tensor, hessian_diag: torch.Tensor, *, sparsity: float = 0.5, pattern: str | None = None,
                 quant_bits: int | None = None, quant_group_size: int | None = None) -> float:
    """Prune the (out, in) weight ``W`` in place by |W_ij|·||X_j|| per output row; returns the achieved sparsity.

    ``hessian_diag``: diag(H) = (2/n) Σ x_j², proportional to the squared input norms Wanda uses.
    """
    norms = hessian_diag.to(device=W.device, dtype=torch.float32).clamp(min=0).sqrt()
    keep = _keep_mask(W.float().abs() * norms[None, :], sparsity, pattern, per_row=True)
    return _apply(W, keep, quant_bits, quant_group_size)
