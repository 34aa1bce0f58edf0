"""The blocked column sweep of SparseGPT: mask selection, OBS updates, joint quantization and the lazy batch update.

Per column block [i1, i1 + nb) (docs/algorithm.md, "The blocked sweep"):

* unstructured sparsity: an exact selection finds the k-th smallest score s = w²/d² of the rows × nb block
  (k = ``reference.n_pruned(p, rows·nb)``) with a 4-pass radix select on order-preserving integer keys of the float
  bits: ``_radix_hist_kernel`` builds a 256-bin histogram of the next 8 bits among the candidates, one histogram per
  pass, and every later kernel picks the bins holding the k-th key again from those histograms (``_radix_state``, a
  few hundred integers per program) instead of a one-program launch per pass. Then ``_tie_count_kernel`` and
  ``_prune_mask_kernel`` prune everything below the threshold plus the first ties in row-major order, exactly as
  ``reference.unstructured_prune_mask`` (the mask kernel adds up the tie counts of the tiles before its own). Seven
  launches per block with the histograms' zeroing (fourteen with a pick launch per pass and a separate prefix sum).
* ``_sweep_block_kernel``: one launch per block; a program owns a tile of BR rows for the whole block, keeps the
  rows × nb tile in registers, reads the block's rows of U as it goes (nb·nb floats, cache resident), and for each
  column computes the N:M selection at each group start (with the current, updated weights), the masked (and
  quantized) value, the error, the loss and the rank-1 update of the block's remaining columns. It writes the block
  back, the error matrix E and each row's loss (per row, so that whichever row tile the autotuner picks writes all
  of it).
* the lazy update of the columns to the right, W[:, i2:] −= E · U[i1:i2, i2:], is a torch.matmul (cuBLAS fp32).

Numerics: float32. Scores, errors and quantization use the correctly rounded ``div_rn`` (the plain ``/`` is approximate
on NVIDIA GPUs) in the reference's order of operations, and rounding is round-half-to-even like ``torch.round``, so
selections agree with the reference on identical inputs.

Registered ops: ``torch.ops.sparsegpt_kernels.sweep_block`` (mutates W) and
``torch.ops.sparsegpt_kernels.unstructured_prune_mask``.
"""

# (no `from __future__ import annotations`: torch.library infers the op schemas from real annotations)
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import autotune, interpreting, launchable, next_pow2, register_op
from .nm_mask import nm_group_rank

# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------
# The sweep kernel (autotuned on a GPU). Its register tile is BR x BP (BP = next_pow2(block width) >= 16) with a few
# temporaries of that shape, which must stay in registers. ptxas (sm_90) register use of these candidates: up to 16
# tile elements per thread they spill nothing or a few bytes (at most 52, at BP = 128 in some modes); above 16, they
# spill hundreds of bytes (BP = 256 with BR = 32 / 8 warps or BR = 16 / 4 warps), and at BP = 512 nearly all of them
# do. So the autotuner tries only the candidates with at most 16 elements per thread, and blocks wider than
# SWEEP_MAX_BLOCK are refused (tests/test_triton_backend.py compiles the 256-wide tile of each candidate that is tried
# there and checks that it does not spill).
# With several warps, Triton spreads a row's BP columns over the warps (warpsPerCTA = [1, num_warps]), so each of the
# per-column row reductions crosses warps through shared memory: the sm_90 code of BR = 16 / 4 warps has 9 barriers in
# every column step (23 in all for 2:4). One-warp programs reduce with shuffles only (no barrier in the kernel) and
# need no more registers (BR = 2: 83-159 at BP = 128, 152-238 at BP = 256, nothing spilled); the autotuner picks
# between both kinds on the card (benchmarks/RESULTS.md has what was measured).
SWEEP_CONFIGS = [
    triton.Config({"BR": 2}, num_warps=1),
    triton.Config({"BR": 4}, num_warps=1),
    triton.Config({"BR": 16}, num_warps=4),
    triton.Config({"BR": 16}, num_warps=8),
    triton.Config({"BR": 8}, num_warps=4),
    triton.Config({"BR": 8}, num_warps=2),
    triton.Config({"BR": 32}, num_warps=8),
]
SWEEP_MAX_BLOCK = 256
SWEEP_MAX_TILE_PER_THREAD = 16


def sweep_config_fits(cfg: triton.Config, bp: int) -> bool:
    """Whether ``cfg``'s BR x ``bp`` register tile stays within SWEEP_MAX_TILE_PER_THREAD elements per thread."""
    return cfg.kwargs["BR"] * bp <= SWEEP_MAX_TILE_PER_THREAD * 32 * cfg.num_warps


def _fitting_sweep_configs(configs, named_args, **kwargs):
    return [c for c in configs if sweep_config_fits(c, kwargs["BP"])]


# Under the interpreter: few, large programs.
SWEEP_INTERPRET_CONFIG = triton.Config({"BR": 256}, num_warps=4)
# Rows per program of the selection kernels (memory bound; not worth tuning).
SELECT_BR_GPU = 16
SELECT_BR_INTERPRET = 64
# The radix select: 8 bits per pass (4 passes over a 32-bit key), a histogram of 2⁸ bins; SIGN_BIT flips the key's
# top bit to read signed int32 order as unsigned.
HIST_BINS: tl.constexpr = tl.constexpr(256)
SIGN_BIT: tl.constexpr = tl.constexpr(-2147483648)


#: Up to this many row tiles, each program of the mask kernel adds up the tie counts of the tiles before it (a
#: 16-row tile: blocks of up to 16384 rows); above that, a separate prefix sum (three launches) costs less.
SUM_TIES_MAX = 1024


def _select_br() -> int:
    return SELECT_BR_INTERPRET if interpreting() else SELECT_BR_GPU


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------
@triton.jit
def _score(w, d):
    """s = w² / d², in the reference's order of operations, correctly rounded."""
    return tl.math.div_rn(w * w, d * d)


@triton.jit
def _rint(x):
    """Round half to even (torch.round)."""
    f = tl.floor(x)
    diff = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (diff > 0.5) | ((diff == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _load_scores(src_ptr, d_ptr, rows, ncols, stride_s, stride_d, pid, HAS_D: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr):
    """Scores of a BR-row tile of the (rows, ncols) block, their signed-order int32 keys and the validity mask."""
    r = pid * BR + tl.arange(0, BR)
    cidx = tl.arange(0, BC)
    valid = (r[:, None] < rows) & (cidx[None, :] < ncols)
    s = tl.load(src_ptr + r[:, None].to(tl.int64) * stride_s + cidx[None, :], mask=valid, other=0.0).to(tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + cidx.to(tl.int64) * stride_d, mask=cidx < ncols, other=1.0).to(tl.float32)
        s = _score(s, d[None, :])
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 are equal scores: give them the same key
    b = s.to(tl.int32, bitcast=True)
    key = b ^ ((b >> 31) & 0x7FFFFFFF)  # signed int32 order == float order
    return key, valid


@triton.jit
def _radix_state(hist_ptr, k, NPASS: tl.constexpr):
    """After passes 0..NPASS-1: (the bits of the k-th smallest key found so far, the rank of the k-th among the
    candidates left). Each pass's pick (the first bin whose cumulative count reaches the rank) is replayed from its
    histogram (row p of ``hist_ptr``)."""
    bins = tl.arange(0, HIST_BINS)
    prefix = tl.zeros((), dtype=tl.int32)
    krem = tl.zeros((), dtype=tl.int32) + k
    for p in tl.static_range(NPASS):
        h = tl.load(hist_ptr + p * HIST_BINS + bins)
        b = tl.sum((tl.cumsum(h, 0) < krem).to(tl.int32), axis=0)
        prefix = prefix | (b << (24 - 8 * p))
        krem = krem - tl.sum(tl.where(bins < b, h, 0), axis=0)
    return prefix, krem


@triton.jit(do_not_specialize=["rows", "ncols", "k"])
def _radix_hist_kernel(src_ptr, d_ptr, hist_ptr, rows, ncols, stride_s, stride_d, k,
                       PASS: tl.constexpr, HAS_D: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Row PASS of ``hist_ptr`` (zeroed before the first pass): the histogram of the PASS-th 8 bits of the keys that
    share the first PASS bytes of the k-th smallest one."""
    pid = tl.program_id(0)
    key, valid = _load_scores(src_ptr, d_ptr, rows, ncols, stride_s, stride_d, pid, HAS_D, BR, BC)
    u = key ^ SIGN_BIT  # unsigned order as bits
    ok = valid
    if PASS > 0:
        prefix, _ = _radix_state(hist_ptr, k, PASS)
        ok = ok & ((u >> (32 - 8 * PASS)) == (prefix >> (32 - 8 * PASS)))
    digit = (u >> (24 - 8 * PASS)) & 0xFF
    flat_ok = tl.reshape(ok, (BR * BC,))
    flat_digit = tl.reshape(tl.where(ok, digit, 0), (BR * BC,))
    h = tl.histogram(flat_digit, HIST_BINS)
    bins = tl.arange(0, HIST_BINS)
    n_out = tl.sum((flat_ok == 0).to(tl.int32), axis=0)
    h = h - tl.where(bins == 0, n_out, 0)  # the masked-out entries were counted in bin 0
    tl.atomic_add(hist_ptr + PASS * HIST_BINS + bins, h, mask=h != 0)


@triton.jit(do_not_specialize=["rows", "ncols", "k"])
def _tie_count_kernel(src_ptr, d_ptr, hist_ptr, ties_ptr, rows, ncols, stride_s, stride_d, k,
                      HAS_D: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    key, valid = _load_scores(src_ptr, d_ptr, rows, ncols, stride_s, stride_d, pid, HAS_D, BR, BC)
    prefix, _ = _radix_state(hist_ptr, k, 4)
    tie = valid & (key == (prefix ^ SIGN_BIT))
    tl.store(ties_ptr + pid, tl.sum(tl.sum(tie.to(tl.int32), axis=1), axis=0))


@triton.jit(do_not_specialize=["rows", "ncols", "k", "n_tiles"])
def _prune_mask_kernel(src_ptr, d_ptr, hist_ptr, ties_ptr, mask_ptr, rows, ncols, stride_s, stride_d, stride_m, k,
                       n_tiles, HAS_D: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SUM_TIES: tl.constexpr):
    """``ties_ptr``: each row tile's count of keys equal to the threshold (SUM_TIES > 0, a power of two >= the
    number of tiles: this program adds up those of the tiles before it) or already their exclusive prefix sums."""
    pid = tl.program_id(0)
    key, valid = _load_scores(src_ptr, d_ptr, rows, ncols, stride_s, stride_d, pid, HAS_D, BR, BC)
    prefix, need = _radix_state(hist_ptr, k, 4)  # need: how many keys equal to the threshold are pruned
    t = prefix ^ SIGN_BIT
    if SUM_TIES > 0:
        prev = tl.arange(0, SUM_TIES)
        before = tl.sum(tl.load(ties_ptr + prev, mask=(prev < pid) & (prev < n_tiles), other=0), axis=0)
    else:
        before = tl.load(ties_ptr + pid)
    tie = (valid & (key == t)).to(tl.int32)
    per_row = tl.sum(tie, axis=1)
    row_before = tl.cumsum(per_row, 0) - per_row
    in_row_before = tl.cumsum(tie, 1) - tie
    rank = before + row_before[:, None] + in_row_before
    pruned = (key < t) | ((tie != 0) & (rank < need))
    r = pid * BR + tl.arange(0, BR)
    cidx = tl.arange(0, BC)
    tl.store(mask_ptr + r[:, None].to(tl.int64) * stride_m + cidx[None, :], pruned.to(tl.int8), mask=valid)


# Trial launches of the autotuner run on the real arguments: W is restored after each; E and the per-row losses are
# written in full by every config (any BR), so nothing a trial leaves behind survives the chosen launch.
@autotune(SWEEP_CONFIGS, key=["rows", "BP", "N", "M", "UNSTRUCT", "QUANT"], interpret=SWEEP_INTERPRET_CONFIG,
          restore_value=["w_ptr"], prune_configs_by={"early_config_prune": _fitting_sweep_configs})
@triton.jit(do_not_specialize=["rows", "i1", "nb", "stride_w", "stride_u", "stride_q", "maxq", "qgroup"])
def _sweep_block_kernel(
    w_ptr, u_ptr, mask_ptr, e_ptr, loss_ptr, qs_ptr, qz_ptr,
    rows, stride_w, stride_u, i1, nb, stride_q, maxq, qgroup,
    N: tl.constexpr, M: tl.constexpr, UNSTRUCT: tl.constexpr, QUANT: tl.constexpr,
    BR: tl.constexpr, BP: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    cidx = tl.arange(0, BP)
    rmask = r < rows
    cmask = cidx < nb
    tmask = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    w_ptrs = w_ptr + r64[:, None] * stride_w + (i1 + cidx)[None, :]
    Wt = tl.load(w_ptrs, mask=tmask, other=0.0)
    d = tl.load(u_ptr + (i1 + cidx).to(tl.int64) * (stride_u + 1), mask=cmask, other=1.0)
    if UNSTRUCT:
        pruned = tl.load(mask_ptr + r64[:, None] * nb + cidx[None, :], mask=tmask, other=0) != 0
    else:
        pruned = tl.zeros((BR, BP), dtype=tl.int1)
    Et = tl.zeros((BR, BP), dtype=tl.float32)
    lacc = tl.zeros((BR,), dtype=tl.float32)
    for j in range(nb):
        if M > 0:
            if j % M == 0:
                s = _score(Wt, d[None, :])
                in_group = (cidx >= j) & (cidx < j + M)
                rank = tl.zeros((BR, BP), dtype=tl.int32)
                for k in tl.static_range(M):
                    s_k = tl.sum(tl.where(cidx[None, :] == j + k, s, 0.0), axis=1)
                    rank += nm_group_rank(s, s_k[:, None], j + k, cidx[None, :])
                pruned = tl.where(in_group[None, :], rank < (M - N), pruned)
        sel = cidx[None, :] == j
        w = tl.sum(tl.where(sel, Wt, 0.0), axis=1)
        p_j = tl.sum(tl.where(sel & pruned, 1, 0), axis=1) != 0
        q = tl.where(p_j, 0.0, w)
        if QUANT:
            g = (i1 + j) // qgroup
            sc = tl.load(qs_ptr + r64 * stride_q + g, mask=rmask, other=1.0)
            zr = tl.load(qz_ptr + r64 * stride_q + g, mask=rmask, other=0.0)
            qi = tl.minimum(tl.maximum(_rint(tl.math.div_rn(q, sc)) + zr, 0.0), maxq * 1.0)
            q = sc * (qi - zr)
        d_j = tl.sum(tl.where(cidx == j, d, 0.0), axis=0)
        err = tl.math.div_rn(w - q, d_j + tl.zeros_like(w))
        err = tl.where(rmask, err, 0.0)
        lacc += err * err
        u_row = tl.load(u_ptr + (i1 + j).to(tl.int64) * stride_u + i1 + cidx, mask=(cidx > j) & cmask, other=0.0)
        Wt = tl.where(sel, q[:, None], Wt - err[:, None] * u_row[None, :])
        Et = tl.where(sel, err[:, None], Et)
    tl.store(w_ptrs, Wt, mask=tmask)
    tl.store(e_ptr + r64[:, None] * nb + cidx[None, :], Et, mask=tmask)
    tl.store(loss_ptr + r64, lacc * 0.5, mask=rmask)  # OBS loss: half the sum (halving is exact)


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------
def _select_into(mask: torch.Tensor, src: torch.Tensor, d_src: torch.Tensor | None, d_stride: int, rows: int,
                 ncols: int, stride_s: int, k: int) -> None:
    """Fill ``mask`` (rows, ncols) int8 with 1 for exactly the k lowest scores of the block, ties in row-major order.

    ``src`` points at element (0, 0) of the block (row stride ``stride_s``); scores are ``src²/d²`` with
    ``d[c] = d_src[c * d_stride]`` when ``d_src`` is given, else ``src`` itself.
    """
    numel = rows * ncols
    if k <= 0:
        mask.zero_()
        return
    if k >= numel:
        mask.fill_(1)
        return
    dev = src.device
    BR = _select_br()
    BC = max(16, next_pow2(ncols))
    grid = (triton.cdiv(rows, BR),)
    has_d = d_src is not None
    d_arg = d_src if has_d else src
    hist = torch.zeros((4, HIST_BINS.value), dtype=torch.int32, device=dev)
    for p in range(4):
        _radix_hist_kernel[grid](src, d_arg, hist, rows, ncols, stride_s, d_stride, k,
                                 PASS=p, HAS_D=has_d, BR=BR, BC=BC)
    ties = torch.empty(grid[0], dtype=torch.int32, device=dev)
    _tie_count_kernel[grid](src, d_arg, hist, ties, rows, ncols, stride_s, d_stride, k, HAS_D=has_d, BR=BR, BC=BC)
    sum_ties = next_pow2(grid[0]) if grid[0] <= SUM_TIES_MAX else 0
    if not sum_ties:  # many tiles (a whole-matrix mask): three launches cost less than each program reading them all
        ties = (torch.cumsum(ties, 0) - ties).to(torch.int32)
    _prune_mask_kernel[grid](src, d_arg, hist, ties, mask, rows, ncols, stride_s, d_stride, mask.stride(0), k,
                             grid[0], HAS_D=has_d, BR=BR, BC=BC, SUM_TIES=sum_ties)


_PAD_COLS = 128


@register_op("unstructured_prune_mask")
def _unstructured_prune_mask_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1).to(torch.float32)
    numel = flat.numel()
    rows = triton.cdiv(numel, _PAD_COLS)
    padded = torch.full((rows * _PAD_COLS,), float("inf"), dtype=torch.float32, device=scores.device)
    padded[:numel] = flat  # +inf padding comes after every real entry in row-major order: never selected first
    mask = torch.empty((rows, _PAD_COLS), dtype=torch.int8, device=scores.device)
    if numel:
        _select_into(mask, padded.view(rows, _PAD_COLS), None, 0, rows, _PAD_COLS, _PAD_COLS, min(k, numel))
    return mask.view(-1)[:numel].view(torch.bool).reshape(scores.shape).clone()


@_unstructured_prune_mask_op.register_fake
def _(scores, k):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def unstructured_prune_mask_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (True = pruned) of exactly the ``k`` lowest ``scores``, ties pruned in row-major order.

    The Triton counterpart of :func:`sparsegpt_kernels.reference.unstructured_prune_mask` (scores are compared in
    float32).
    """
    return torch.ops.sparsegpt_kernels.unstructured_prune_mask(scores, int(k))


def _check_block(W, U, i1, nb, n, m, qscale, qzero, qgroup):
    if W.dtype != torch.float32 or U.dtype != torch.float32:
        raise TypeError(f"sweep_block computes in float32; got W {W.dtype}, U {U.dtype}")
    if W.dim() != 2 or U.dim() != 2 or U.shape[0] != U.shape[1] or U.shape[0] != W.shape[1]:
        raise ValueError(f"shapes do not fit: W {tuple(W.shape)}, U {tuple(U.shape)}")
    if W.stride(1) != 1 or U.stride(1) != 1:
        raise ValueError("W and U must have unit column stride")
    cols = W.shape[1]
    if not (0 <= i1 and 0 < nb and i1 + nb <= cols):
        raise ValueError(f"block [{i1}, {i1 + nb}) is outside 0..{cols}")
    if nb > SWEEP_MAX_BLOCK:
        raise ValueError(f"the Triton sweep holds a block in registers: block width {nb} is above its limit of "
                         f"{SWEEP_MAX_BLOCK} columns")
    if m:
        if not 0 < n < m or nb % m or i1 % m:
            raise ValueError(f"N:M block needs 0 < N < M and M dividing the block start and width; got {n}:{m}")
    if (qscale is None) != (qzero is None):
        raise ValueError("qscale and qzero go together")
    if qscale is not None:
        if qscale.dtype != torch.float32 or qzero.dtype != torch.float32 or qscale.shape != qzero.shape:
            raise TypeError("qscale/qzero must be float32 tensors of one shape")
        if qscale.shape[0] != W.shape[0] or qgroup < 1 or qscale.shape[1] * qgroup < cols:
            raise ValueError(f"quantization grid {tuple(qscale.shape)} with group {qgroup} does not fit W")


def _sweep_block(W: torch.Tensor, U: torch.Tensor, i1: int, nb: int, sparsity: float, n: int, m: int,
                 qscale: Optional[torch.Tensor], qzero: Optional[torch.Tensor],  # noqa: UP045 (schema inference of older torch)
                 maxq: int, qgroup: int) -> torch.Tensor:
    _check_block(W, U, i1, nb, n, m, qscale, qzero, qgroup)
    rows, cols = W.shape
    dev = W.device
    unstruct = m == 0
    mask = torch.empty((rows, nb), dtype=torch.int8, device=dev) if unstruct else W.new_empty((1,), dtype=torch.int8)
    if unstruct:
        k = reference.n_pruned(sparsity, rows * nb)
        _select_into(mask, W[:, i1:], U[i1:, i1:], U.stride(0) + 1, rows, nb, W.stride(0), k)
    E = torch.empty((rows, nb), dtype=torch.float32, device=dev)
    quant = qscale is not None
    qs = qscale.contiguous() if quant else W
    qz = qzero.contiguous() if quant else W
    loss = torch.empty((rows,), dtype=torch.float32, device=dev)  # per row: every config writes all of it
    kernel, meta = launchable(_sweep_block_kernel)
    kernel[lambda meta_: (triton.cdiv(rows, meta_["BR"]),)](
        W, U, mask, E, loss, qs, qz,
        rows, W.stride(0), U.stride(0), i1, nb, qs.stride(0), maxq, max(qgroup, 1),
        N=n, M=m, UNSTRUCT=unstruct, QUANT=quant, BP=max(16, next_pow2(nb)), **meta,
    )
    i2 = i1 + nb
    if i2 < cols:
        W[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1.0)
    return loss.sum()


_sweep_block_op = register_op("sweep_block", mutates_args=("W",))(_sweep_block)


@_sweep_block_op.register_fake
def _(W, U, i1, nb, sparsity, n, m, qscale, qzero, maxq, qgroup):
    _check_block(W, U, i1, nb, n, m, qscale, qzero, qgroup)
    return W.new_empty((), dtype=torch.float32)


def _sweep_eager(W, U, sparsity, n, m, block_size, qscale, qzero, maxq, qgroup) -> torch.Tensor:
    cols = W.shape[1]
    losses = []
    # Outside torch.compile the blocks call the op's implementation directly: the custom-op dispatcher costs tens of
    # microseconds per call on a CPU core (benchmarks/RESULTS.md), and a layer has cols / block_size blocks.
    block = torch.ops.sparsegpt_kernels.sweep_block if torch.compiler.is_compiling() else _sweep_block
    for i1 in range(0, cols, block_size):
        nb = min(block_size, cols - i1)
        losses.append(block(W, U, i1, nb, float(sparsity), int(n or 0), int(m or 0), qscale, qzero, int(maxq),
                            int(qgroup)))
    return torch.stack(losses).sum() if losses else W.new_zeros(())


#: Opt-in: replay a layer's per-block launches as one CUDA graph when a layer of the same shape and settings comes
#: again (a model has many). Off by default.
CUDA_GRAPH_ENV = "SPARSEGPT_KERNELS_CUDA_GRAPHS"
_GRAPH_CACHE_SIZE = 4


class _SweepGraph:
    """A captured sweep of one layer shape/spec on static buffers: copy in, replay, copy out."""

    def __init__(self, W, U, qscale, qzero, args):
        self.args = args
        self.W = W.clone()
        self.U = U.clone()
        self.qs = None if qscale is None else qscale.clone()
        self.qz = None if qzero is None else qzero.clone()
        # the first run (compiles and autotunes the kernels) is the real computation of this call: keep its result
        side = torch.cuda.Stream(device=W.device)
        side.wait_stream(torch.cuda.current_stream(W.device))
        with torch.cuda.stream(side):
            self.first_loss = _sweep_eager(self.W, self.U, *args[:4], self.qs, self.qz, *args[4:])
            self.first_W = self.W.clone()
        torch.cuda.current_stream(W.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = _sweep_eager(self.W, self.U, *args[:4], self.qs, self.qz, *args[4:])

    def first(self, W) -> torch.Tensor:
        W.copy_(self.first_W)
        self.first_W = None
        return self.first_loss

    def replay(self, W, U, qscale, qzero) -> torch.Tensor:
        self.W.copy_(W)
        self.U.copy_(U)
        if qscale is not None:
            self.qs.copy_(qscale)
            self.qz.copy_(qzero)
        self.graph.replay()
        W.copy_(self.W)
        return self.loss.clone()


_graphs: dict[tuple, _SweepGraph] = {}


def _sweep_graphed(W, U, args, qscale, qzero) -> torch.Tensor:
    key = (W.device, tuple(W.shape), args, None if qscale is None else tuple(qscale.shape))
    g = _graphs.pop(key, None)
    if g is None:
        g = _SweepGraph(W, U, qscale, qzero, args)
        loss = g.first(W)
    else:
        loss = g.replay(W, U, qscale, qzero)
    _graphs[key] = g  # most recently used last
    while len(_graphs) > _GRAPH_CACHE_SIZE:
        _graphs.pop(next(iter(_graphs)))
    return loss


def sweep_triton(W: torch.Tensor, U: torch.Tensor, *, sparsity: float, n: int | None, m: int | None,
                 block_size: int, qscale: torch.Tensor | None = None, qzero: torch.Tensor | None = None,
                 maxq: int = 0, qgroup: int = 0, cuda_graph: bool | None = None) -> torch.Tensor:
    """Run the whole sweep on float32 ``W`` (rows, cols) in place; returns the OBS loss as a 0-dim device tensor.

    ``cuda_graph`` (default: environment variable ``SPARSEGPT_KERNELS_CUDA_GRAPHS=1``; CUDA tensors only): capture the
    layer's launches once per shape/settings and replay them for later layers of the same kind (cuts the host
    overhead of ~10 launches per column block).
    """
    U = U.contiguous()
    if cuda_graph is None:
        cuda_graph = os.environ.get(CUDA_GRAPH_ENV) == "1"
    if cuda_graph and W.is_cuda and not interpreting():
        args = (float(sparsity), int(n or 0), int(m or 0), int(block_size), int(maxq), int(qgroup))
        return _sweep_graphed(W, U, args, qscale, qzero)
    return _sweep_eager(W, U, sparsity, n, m, block_size, qscale, qzero, maxq, qgroup)
