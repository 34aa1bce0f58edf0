"""Mask selection on its own (used by the magnitude and Wanda baselines, and for 2:4 checks), with the kernels of the
backend that :func:`~sparsegpt_kernels.backends.select_backend` picks for the scores' device (``backend``: "auto",
"torch", "triton", "cpp" or "cuda"; "auto" never picks Triton's CPU interpreter):

* :func:`nm_keep_mask` — "N kept of every M" consecutive entries along the last dimension (Triton on CUDA tensors, the
  compiled extension's kernels on CPU tensors and for the cuda backend, else the reference).
* :func:`unstructured_prune_mask` — exactly the ``k`` lowest scores of a tensor (Triton's radix select, else the
  reference's ``kthvalue``).

Every implementation gives the reference's result exactly, ties included (:mod:`sparsegpt_kernels.reference`:
among equal scores the earlier column, resp. the earlier entry in row-major order, is pruned first).
"""

from __future__ import annotations

import torch

from .backends import select_backend


def nm_keep_mask(scores: torch.Tensor, n: int, m: int, *, backend: str = "auto") -> torch.Tensor:
    """Keep-mask (True = kept) with exactly ``n`` kept of every ``m`` consecutive entries along the last dimension.

    The ``m - n`` lowest scores of each group are pruned; among equal scores the earlier column is pruned first.
    ``scores.shape[-1]`` must be a multiple of ``m``.
    """
    return select_backend(backend, scores.device).nm_keep_mask(scores, n, m)


def unstructured_prune_mask(scores: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """Boolean mask (True = pruned) of exactly the ``k`` lowest entries of ``scores``, ties in row-major order."""
    return select_backend(backend, scores.device).unstructured_prune_mask(scores, k)
