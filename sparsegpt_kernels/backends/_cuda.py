"""The ``cuda`` backend: the CUDA operators of ``sparsegpt_kernels._C`` (csrc/cuda), for CUDA tensors.

The sweep runs one fused kernel per column block (a warp per row, the row's block in registers for all of its
rank-1 updates), N:M selection inside that kernel, unstructured selection with ATen (the k-th value of a sort,
row-major tie-breaking) and the lazy batch update as one cuBLAS GEMM per block. The inverse factor uses ATen's
cuSOLVER-backed Cholesky with the reversal identity and a GEMM-based triangular inverse. float32 and float64.
Block sizes above the kernel's limit (1024 columns, defined in csrc/core/rules.h and read from the extension) are
refused; the reference's default is 128.
"""

from __future__ import annotations

import torch

from ..spec import SweepSpec
from . import extension as _ext

NAME = "cuda"
#: Above the Triton backend's 30: on the H200 (2026-11-30, benchmarks/results/gpu_h200/2026-11-30b/B, both backends
#: timed in one run) this backend's prune_layer was faster at every shape and mode, 50% and 2:4, 4096x4096 to
#: 12288x12288: 0.029 vs 0.045 s ... 0.240 vs 0.257 s unstructured, 0.025 vs 0.029 s ... 0.234 vs 0.247 s for 2:4.
PRIORITY = 40


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, not {device.type}"
    missing = _ext.missing_reason()
    if missing is not None:
        return missing
    if not _ext.has_cuda():
        return "the compiled extension was built without CUDA (needs a CUDA build of torch and nvcc at build time)"
    return None


def max_block_size() -> int:
    """The widest column block of the fused CUDA sweep kernel (a warp per row, the row's block in registers)."""
    mod = _ext.load()
    if mod is None:
        raise RuntimeError(_ext.missing_reason())
    return int(mod.CUDA_MAX_BLOCK)


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    return _ext.inverse_factor(H, damp, NAME)


def sweep(W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
    limit = max_block_size()
    if min(spec.block_size, W.shape[1]) > limit:
        raise ValueError(f"the cuda backend supports block_size <= {limit}, got {spec.block_size}")
    return _ext.sweep(W, U, spec, NAME)
