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
from ..options import PruneOptions


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


def _keep_mask(scores: torch.Tensor, opts: PruneOptions, per_row: bool) -> torch.Tensor:
    if opts.nm is not None:
        return nm_keep_mask(scores, *opts.nm)
    if per_row:
        k = reference.n_pruned(opts.fraction, scores.shape[1])
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, idx, False)
        return keep
    return ~unstructured_prune_mask(scores, reference.n_pruned(opts.fraction, scores.numel()))


def _options(W: torch.Tensor, method: str, **kw) -> PruneOptions:
    """The settings checked as prune_layer checks them (both ``sparsity`` and ``pattern`` given is an error)."""
    if W.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    opts = PruneOptions(method=method, **kw)
    opts.check_layer(W.shape[1])
    return opts


@torch.no_grad()
def magnitude_prune_(W: torch.Tensor, *, sparsity: float | None = None, pattern: str | None = None,
                     quant_bits: int | None = None, quant_group_size: int | None = None) -> float:
    """Prune the (out, in) weight ``W`` in place by |W| (layer-wide threshold; ``sparsity`` default 0.5, or an N:M
    ``pattern``); returns the achieved sparsity."""
    opts = _options(W, "magnitude", sparsity=sparsity, pattern=pattern, quant_bits=quant_bits,
                    quant_group_size=quant_group_size)
    keep = _keep_mask(W.float().abs(), opts, per_row=False)
    return _apply(W, keep, quant_bits, quant_group_size)


@torch.no_grad()
def wanda_prune_(W: torch.Tensor, hessian_diag: torch.Tensor, *, sparsity: float | None = None,
                 pattern: str | None = None, quant_bits: int | None = None,
                 quant_group_size: int | None = None) -> float:
    """Prune the (out, in) weight ``W`` in place by |W_ij|·||X_j|| per output row; returns the achieved sparsity.

    ``hessian_diag``: diag(H) = (2/n) Σ x_j², proportional to the squared input norms Wanda uses.
    """
    opts = _options(W, "wanda", sparsity=sparsity, pattern=pattern, quant_bits=quant_bits,
                    quant_group_size=quant_group_size)
    norms = hessian_diag.to(device=W.device, dtype=torch.float32).clamp(min=0).sqrt()
    keep = _keep_mask(W.float().abs() * norms[None, :], opts, per_row=True)
    return _apply(W, keep, quant_bits, quant_group_size)
