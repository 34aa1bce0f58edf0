"""Value checks over whole tensors: finiteness, zero counts and the Hessian's properties, each through a backend
(:mod:`sparsegpt_kernels.backends.base` has the pure-PyTorch forms, the cpp backend compiled one-pass forms).

On large CPU layers the checks are a visible part of a call (torch's ``count_nonzero`` alone took longer than the
rest of prune_layer's bookkeeping on 11008x4096), so :func:`count_nonzero` and :func:`all_finite`, used outside a
solve, take the compiled checks where the extension is loaded already (:func:`~sparsegpt_kernels.backends.value_checks`;
they never load or build it).
"""

from __future__ import annotations

import math

import torch

from .backends import Backend, value_checks


def count_nonzero(t: torch.Tensor) -> int:
    return value_checks(t).nonzeros_and_finite(t)[0]


def all_finite(t: torch.Tensor) -> bool:
    return value_checks(t).nonzeros_and_finite(t)[1]


def check_finite(t: torch.Tensor, what: str, backend: Backend) -> None:
    if not backend.nonzeros_and_finite(t)[1]:
        raise ValueError(f"{what} contains NaN or Inf")


def check_hessian_values(H: torch.Tensor, backend: Backend) -> None:
    """Finite, symmetric (to 1e-4 of its largest entry in float32, 1e-10 in float64), a non-negative diagonal and not
    all zero, in one pass where ``backend`` has one."""
    lo, hi, asym, neg_diag = backend.hessian_stats(H)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("hessian contains NaN or Inf")
    scale = max(abs(lo), abs(hi))
    if scale == 0:
        raise ValueError("hessian is all zeros: the layer saw no inputs, or only zeros (was the accumulator fed?); "
                         "every column would be dead and the whole weight would be set to 0")
    tol = (1e-4 if H.dtype == torch.float32 else 1e-10) * scale
    if asym > tol:
        raise ValueError(f"hessian is not symmetric (max |H - Hᵀ| = {asym:.3g}, |H|max = {scale:.3g})")
    if neg_diag:
        raise ValueError("hessian has negative diagonal entries; it is not a Gram matrix of real inputs")
