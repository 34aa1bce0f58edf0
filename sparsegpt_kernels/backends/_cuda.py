"""The ``cuda`` backend: the CUDA operators of ``sparsegpt_kernels._C`` (csrc/cuda), for CUDA tensors.

The sweep runs one fused kernel per column block (a warp per row, the row's block in registers for all of its
rank-1 updates), N:M selection inside that kernel, unstructured selection with ATen (the k-th value of a sort,
row-major tie-breaking) and the lazy batch update as one cuBLAS GEMM per block. The inverse factor uses ATen's
cuSOLVER-backed Cholesky with the reversal identity and a GEMM-based triangular inverse. float32 and float64.
Block sizes above the kernel's limit (``CUDA_MAX_BLOCK``, defined in csrc/core/rules.h and read from the extension)
are refused. Its priority is above Triton's: it was the faster of the two at every shape and mode measured on an
H200 (benchmarks/RESULTS.md, "Second GPU check").
"""

from __future__ import annotations

import torch

from ..spec import SweepSpec
from . import extension as _ext


class CudaBackend(_ext.ExtensionBackend):
    name = "cuda"
    priority = 40

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, not {device.type}"
        missing = _ext.missing_reason()
        if missing is not None:
            return missing
        if not _ext.has_cuda():
            return "the compiled extension was built without CUDA (needs a CUDA build of torch and nvcc at build time)"
        return None

    def max_block_size(self) -> int:
        """The widest column block of the fused CUDA sweep kernel (a warp per row, the row's block in registers)."""
        return _ext.rule("CUDA_MAX_BLOCK")

    def factor(self, H: torch.Tensor, damp: float) -> torch.Tensor | None:
        return _ext.factor("ext_inverse_factor", H, damp, self.name)

    def sweep(self, W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
        return _ext.sweep("ext_sweep", W, U, spec, self.name)


BACKEND = CudaBackend()
