"""The ``triton`` backend: the fused Triton sweep and mask kernels (``sparsegpt_kernels.ops``) on CUDA tensors; the
inverse factor is ATen's (cuSOLVER's Cholesky and cuBLAS's triangular inverse on CUDA tensors), which was faster on an
H200 than a Triton factor kernel (benchmarks/RESULTS.md).

CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).

Precision: the kernels compute in float32. A float64 problem (the API computes in float64 when the user passes a
float64 weight or Hessian) is converted to float32, solved, and the result cast back to float64: the answer has float32
accuracy, not float64. Use the ``torch`` backend when float64 accuracy matters.
"""

from __future__ import annotations

import os

import torch

from ..spec import SweepSpec
from .base import Backend

try:  # triton is an optional dependency; its absence makes the backend unavailable, not the package unimportable
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


class TritonBackend(Backend):
    name = "triton"
    priority = 30

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return f"triton is not importable ({_IMPORT_ERROR}); install the [triton] extra"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return None
            return "the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter)"
        return f"the Triton backend needs CUDA tensors, got {device.type}"

    def auto_selectable(self, device: torch.device) -> bool:
        """Only on CUDA: on the CPU it runs through Triton's interpreter, which is for tests and far slower than the
        torch backend."""
        return device.type == "cuda"

    def max_block_size(self) -> int:
        """The widest column block the sweep kernel holds in registers."""
        from ..ops.sweep import SWEEP_MAX_BLOCK

        return SWEEP_MAX_BLOCK

    def sweep(self, W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
        from ..ops.sweep import sweep_triton

        W32 = W if W.dtype == torch.float32 else W.to(torch.float32)
        q = spec.quant
        loss = sweep_triton(
            W32,
            U.to(torch.float32),
            sparsity=spec.sparsity,
            n=spec.n,
            m=spec.m,
            block_size=spec.block_size,
            qscale=None if q is None else q.scale.to(torch.float32).contiguous(),
            qzero=None if q is None else q.zero.to(torch.float32).contiguous(),
            maxq=0 if q is None else q.maxq,
            qgroup=0 if q is None else q.group_size,
        )
        if W32 is not W:
            W.copy_(W32)
        return float(loss)

    def nm_keep_mask(self, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        from ..ops.nm_mask import nm_keep_mask_triton

        return nm_keep_mask_triton(scores, n, m)

    def unstructured_prune_mask(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        from ..ops.sweep import unstructured_prune_mask_triton

        return unstructured_prune_mask_triton(scores, k)


BACKEND = TritonBackend()
