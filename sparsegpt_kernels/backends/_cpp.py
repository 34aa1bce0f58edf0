"""The ``cpp`` backend: the compiled CPU operators of ``sparsegpt_kernels._C`` (csrc/cpu, csrc/core).

:func:`sparsegpt_kernels.prune_layer` runs it on the Cholesky factor of H itself (``cholesky_factor`` +
``sweep_cholesky``): one LAPACK Cholesky and no triangular inverse; the sweep reproduces the reference's weights at
every block start through R and runs the in-block steps with the block's own (B, B) piece of U. Tiles of 16 rows
(AVX-512; 8 with AVX2 or the baseline build) go through a whole column block while they sit in cache (the rows are
the SIMD lanes of the in-block updates), in parallel over tiles (ATen's thread pool), with the lazy batch update as
one BLAS GEMM per block. ``inverse_factor`` /
``sweep`` (U-driven, step for step the reference) implement the plain backend interface. float32 and float64 run
natively.
"""

from __future__ import annotations

import torch

from ..spec import SweepSpec
from . import extension as _ext

NAME = "cpp"
PRIORITY = 20


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {device.type}"
    return _ext.missing_reason()


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    return _ext.inverse_factor(H, damp, NAME)


def sweep(W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
    return _ext.sweep(W, U, spec, NAME)


def cholesky_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    return _ext.cholesky_factor(H, damp, NAME)


def sweep_cholesky(W: torch.Tensor, R: torch.Tensor, spec: SweepSpec) -> float:
    return _ext.sweep_cholesky(W, R, spec, NAME)


def working_copy(W0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0's values as a new contiguous tensor on huge pages (the sweep walks its rows a whole row apart)."""
    W = _ext.ops().ext_empty_big(list(W0.shape), dtype)
    return W.copy_(W0)
