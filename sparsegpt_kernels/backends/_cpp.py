"""The ``cpp`` backend: the compiled CPU operators of ``sparsegpt_kernels._C`` (csrc/cpu, csrc/aten, csrc/core).

It factors H itself (``ext_cholesky_factor``: one LAPACK-based Cholesky and no triangular inverse) and sweeps on that
factor (``ext_sweep_cholesky``): the sweep reproduces the reference's weights at every block start through R and runs
the in-block steps with the block's own (B, B) piece of U. Tiles of 16 rows (AVX-512; 8 with AVX2 or the baseline
build) go through a whole column block while they sit in cache (the rows are the SIMD lanes of the in-block updates),
in parallel over tiles (ATen's thread pool), with the lazy batch update as one BLAS GEMM per block. The value checks
and the N:M mask are compiled too; float32 and float64 run natively.

:meth:`CppBackend.inverse_factor` and :meth:`CppBackend.sweep_inverse` are the same operators' U-driven forms
(``ext_inverse_factor``, ``ext_sweep``: step for step the reference), which the CUDA implementation shares.
"""

from __future__ import annotations

import torch

from ..spec import SweepSpec
from . import extension as _ext

#: dtypes the compiled value checks read
_CHECKED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class CppBackend(_ext.ExtensionBackend):
    name = "cpp"
    priority = 20
    FACTOR = "cholesky"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors only, not {device.type}"
        return _ext.missing_reason()

    def working_copy(self, W0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W0's values as a new contiguous tensor on huge pages (the sweep walks its rows a whole row apart)."""
        W = _ext.ops().ext_empty_big(list(W0.shape), dtype)
        return W.copy_(W0)

    def factor(self, H: torch.Tensor, damp: float) -> torch.Tensor | None:
        return _ext.factor("ext_cholesky_factor", H, damp, self.name)

    def sweep(self, W: torch.Tensor, R: torch.Tensor, spec: SweepSpec) -> float:
        return _ext.sweep("ext_sweep_cholesky", W, R, spec, self.name)

    def inverse_factor(self, H: torch.Tensor, damp: float) -> torch.Tensor | None:
        """U (the reference's factor) from ``ext_inverse_factor``."""
        return _ext.factor("ext_inverse_factor", H, damp, self.name)

    def sweep_inverse(self, W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
        """The sweep on U (``ext_sweep``), step for step the reference."""
        return _ext.sweep("ext_sweep", W, U, spec, self.name)

    def hessian_stats(self, H: torch.Tensor) -> tuple[float, float, float, bool]:
        lo, hi, asym, finite = _ext.ops().ext_hessian_stats(H)
        if not finite:
            return float("nan"), float("nan"), float("nan"), False
        return lo, hi, asym, bool((H.diagonal() < 0).any())

    def nonzeros_and_finite(self, t: torch.Tensor) -> tuple[int, bool]:
        if t.dtype not in _CHECKED_DTYPES:
            return super().nonzeros_and_finite(t)
        nonzeros, finite = _ext.ops().ext_nonzeros_finite(t.detach())
        return int(nonzeros), bool(finite)


BACKEND = CppBackend()
