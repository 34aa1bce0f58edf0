"""N:M keep-mask selection ("N kept of every M" consecutive entries along the last dimension).

``nm_keep_mask_triton(scores, n, m)`` returns a boolean mask with exactly ``n`` True (kept) in every group of ``m``
consecutive entries of each row; the ``m - n`` lowest scores of a group are pruned, and among equal scores the earlier
column is pruned first — the tie-breaking of :func:`sparsegpt_kernels.reference.nm_keep_mask` (a stable ascending
sort). Each element's rank inside its group is counted directly (``m`` comparisons), so no sort is needed.

Also registered as the op ``torch.ops.sparsegpt_kernels.nm_keep_mask``.
"""

# (no `from __future__ import annotations`: torch.library infers the op schemas from real annotations)
import torch
import triton
import triton.language as tl

from ._common import autotune, launchable, register_op

# --------------------------------------------------------------------------------------------------------------------
# Configs: autotuned on a GPU; under the interpreter INTERPRET_CONFIG (big tiles, few programs)
# --------------------------------------------------------------------------------------------------------------------
CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_R": 16, "BLOCK_C": 256}, num_warps=4),
    triton.Config({"BLOCK_R": 8, "BLOCK_C": 512}, num_warps=8),
]
INTERPRET_CONFIG = triton.Config({"BLOCK_R": 128, "BLOCK_C": 256}, num_warps=4)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def nm_group_rank(s, s_k, k, pos):
    """Contribution of group member ``k`` (score ``s_k``) to the ascending stable rank of ``s`` at position ``pos``."""
    return ((s_k < s) | ((s_k == s) & (k < pos))).to(tl.int32)


# every config writes every output element (the grid covers the whole matrix): trial launches leave nothing stale
@autotune(CONFIGS, key=["cols", "N", "M"], interpret=INTERPRET_CONFIG)
@triton.jit(do_not_specialize=["rows"])
def _nm_keep_mask_kernel(
    s_ptr, out_ptr, rows, cols, stride_s, stride_o,
    N: tl.constexpr, M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    G: tl.constexpr = BLOCK_C // M  # whole groups per tile
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    local = tl.arange(0, BLOCK_C)
    offs_c = pid_c * (G * M) + local
    valid = (offs_r[:, None] < rows) & (offs_c[None, :] < cols) & (local[None, :] < G * M)
    row_s = s_ptr + offs_r[:, None].to(tl.int64) * stride_s
    s = tl.load(row_s + offs_c[None, :], mask=valid, other=0.0)
    pos = offs_c % M
    start = offs_c - pos
    rank = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    for k in tl.static_range(M):
        s_k = tl.load(row_s + (start + k)[None, :], mask=valid, other=0.0)
        rank += nm_group_rank(s, s_k, k, pos[None, :])
    keep = rank >= (M - N)
    tl.store(out_ptr + offs_r[:, None].to(tl.int64) * stride_o + offs_c[None, :], keep.to(tl.int8), mask=valid)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------
def _check(scores: torch.Tensor, n: int, m: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if m > 64:
        raise ValueError(f"M={m} is larger than this kernel supports (64)")
    if scores.dim() == 0 or scores.shape[-1] % m:
        raise ValueError(f"last dimension of shape {tuple(scores.shape)} is not a multiple of M={m}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")


@register_op("nm_keep_mask")
def _nm_keep_mask_op(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    _check(scores, n, m)
    cols = scores.shape[-1]
    s2 = scores.reshape(-1, cols)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    rows = s2.shape[0]
    out = torch.empty((rows, cols), dtype=torch.int8, device=scores.device)
    if rows and cols:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, (meta["BLOCK_C"] // m) * m))

        kernel, meta = launchable(_nm_keep_mask_kernel)
        kernel[grid](s2, out, rows, cols, s2.stride(0), out.stride(0), N=n, M=m, **meta)
    return out.view(torch.bool).reshape(scores.shape)


@_nm_keep_mask_op.register_fake
def _(scores, n, m):
    _check(scores, n, m)
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def nm_keep_mask_triton(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (True = kept) with exactly ``n`` kept of every ``m`` consecutive entries along the last dimension.

    Args:
        scores: (..., cols) floating tensor, ``cols % m == 0``; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        n, m: "N kept of every M" (``0 < n < m <= 64``).

    Returns:
        bool tensor of the shape of ``scores``; ties pruned in column order as in ``reference.nm_keep_mask``.
    """
    return torch.ops.sparsegpt_kernels.nm_keep_mask(scores, int(n), int(m))
