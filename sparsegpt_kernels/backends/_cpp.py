"""The ``cpp`` backend: the compiled CPU operators of ``sparsegpt_kernels._C`` (csrc/cpu, csrc/core).

The sweep processes tiles of rows through a whole column block while they sit in cache, in parallel over tiles
(ATen's thread pool), with the lazy batch update as one BLAS GEMM per block; the inverse factor uses one LAPACK
Cholesky and a GEMM-based triangular inverse (the reversal identity). float32 and float64 run natively.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..spec import SweepSpec

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
