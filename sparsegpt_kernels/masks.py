"""Mask selection on its own (used by the magnitude and Wanda baselines, and for 2:4 checks), with the kernels of the
compiled backends where they run:

* :func:`nm_keep_mask` — "N kept of every M" consecutive entries along the last dimension; the Triton kernel on CUDA
  tensors, the C++ extension's on CPU tensors, else the reference.
* :func:`unstructured_prune_mask` — exactly the ``k`` lowest scores of a tensor; the Triton radix select on CUDA
  tensors, else the reference (``kthvalue``).

Every implementation gives the reference's result exactly, ties included (:mod:`sparsegpt_kernels.reference`:
among equal scores the earlier column, resp. the earlier entry in row-major order, is pruned first).
``backend`` ("auto", "torch", "triton", "cpp" or "cuda") picks one explicitly; "auto" never picks Triton's CPU
interpreter.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import select_backend


def _implementation(scores: torch.Tensor, backend: str) -> str:
    name = select_backend(backend, scores.device).NAME
    if name in ("cpp", "cuda"):
        return "ext"
    return name


def nm_keep_mask(scores: torch.Tensor, n: int, m: int, *, backend: str = "auto") -> torch.Tensor:
    """Keep-mask (True = kept) with exactly ``n`` kept of every ``m`` consecutive entries along the last dimension.

    The ``m - n`` lowest scores of each group are pruned; among equal scores the earlier column is pruned first.
    ``scores.shape[-1]`` must be a multiple of ``m``.
    """
    impl = _implementation(scores, backend)
    if impl == "triton":
        from .ops.nm_mask import nm_keep_mask_triton

        return nm_keep_mask_triton(scores, n, m)
    if impl == "ext" and scores.dtype in (torch.float32, torch.float64):
        from .backends.extension import ops

        return ops().ext_nm_keep_mask(scores, int(n), int(m))
    return reference.nm_keep_mask(scores, n, m)


def unstructured_prune_mask(scores: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """Boolean mask (True = pruned) of exactly the ``k`` lowest entries of ``scores``, ties in row-major order."""
    if _implementation(scores, backend) == "triton":
        from .ops.sweep import unstructured_prune_mask_triton

        return unstructured_prune_mask_triton(scores, k)
    return reference.unstructured_prune_mask(scores, k)
