"""Hessian-inverse Cholesky factor: U, the upper Cholesky factor of (H + λI)⁻¹ (H⁻¹ = Uᵀ U).

One Cholesky and one triangular inverse (docs/algorithm.md, "The inverse factor U"): with J the index reversal,
factor A = J H J = L Lᵀ (blocked, right-looking), invert X = L⁻¹ (blocked, in place), and U = J X J. Everything
happens inside the c×c output buffer plus a workspace of 2·c·BS floats:

1. ``_prepare_kernel``   A[i, j] = H[c-1-i, c-1-j] on the lower triangle, with the dead-column fix (H_jj = 0 → 1) and
                         the damping λ = damp · mean(diag) fused into the diagonal.
2. for each block column k (width BS):
   ``_chol_diag_kernel``   factors the BS×BS diagonal block in registers, inverts it (kept in the workspace ``Dinv``)
                           and flags a non-positive or non-finite pivot;
   ``_chol_panel_kernel``  L[I, k] = A[I, k] · Dinv[k]ᵀ (tl.dot);
   ``_chol_update_kernel`` A[I, J] −= L[I, k] · L[J, k]ᵀ on the lower trailing tiles (tl.dot).
3. for each block column j, right to left:
   ``_trinv_t_kernel``     T[I] = Σ_{j<K≤I} X[I, K] · L[K, j] (tl.dot), into the workspace ``T``;
   ``_trinv_apply_kernel`` X[I, j] = −T[I] · X_jj, and X_jj = Dinv[j] into the diagonal block.
4. ``_rotate_kernel``     U[i, j] = X[c-1-i, c-1-j] for i < j (reads only the strict lower triangle, writes only the
                         strict upper one); the diagonal and the zero lower triangle are set with two cheap torch ops.

Numerics: float32 throughout. ``tl.dot`` uses ``input_precision="ieee"``: on NVIDIA GPUs the default for fp32 operands
is TF32 (10-bit mantissa), whose error in a Cholesky of an ill-conditioned Hessian is far larger than the reference's;
IEEE fp32 keeps the factor as accurate as torch's float32 cholesky. Square roots and divisions use the correctly rounded
``sqrt_rn`` / ``div_rn`` (the plain operators are approximate on NVIDIA GPUs).

Also registered as ``torch.ops.sparsegpt_kernels.hinv_factor(H, damp) -> (U, info)``.
"""

# (no `from __future__ import annotations`: torch.library infers the op schemas from real annotations)
import torch
import triton
import triton.language as tl

from ._common import interpreting, register_op

# --------------------------------------------------------------------------------------------------------------------
# Configs. The kernels update their buffer in place, so they are not autotuned (every trial would need a copy of the
# c×c buffer); these were chosen for fp32 on Hopper from the compiled register use (sm_90, no spills): BS = 64 keeps
# the diagonal block and its inverse in registers, BT = 64 output tiles for the trailing update, and the K dimension of
# every IEEE fp32 tl.dot in chunks of BK = 16 (that dot runs on FMA units with its operands in registers; larger chunks
# spill). Under the interpreter: smaller blocks (tests still cover several block columns on small matrices) and one
# K chunk (fewer interpreted steps).
# --------------------------------------------------------------------------------------------------------------------
GPU_CONFIG = {"BS": 64, "BT": 64, "BK": 16, "num_warps_diag": 8, "num_warps_dot": 8}
INTERPRET_CONFIG = {"BS": 32, "BT": 64, "BK": 32, "num_warps_diag": 4, "num_warps_dot": 4}


def default_config() -> dict:
    return dict(INTERPRET_CONFIG if interpreting() else GPU_CONFIG)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["c"])
def _prepare_kernel(h_ptr, a_ptr, lam_ptr, c, stride_h, stride_a, BT: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if tj > ti:
        return
    i = ti * BT + tl.arange(0, BT)
    j = tj * BT + tl.arange(0, BT)
    valid = (i[:, None] < c) & (j[None, :] < c)
    src = h_ptr + (c - 1 - i)[:, None].to(tl.int64) * stride_h + (c - 1 - j)[None, :]
    h = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr)
    on_diag = i[:, None] == j[None, :]
    h = tl.where(on_diag, tl.where(h == 0.0, 1.0, h) + lam, h)
    tl.store(a_ptr + i[:, None].to(tl.int64) * stride_a + j[None, :], h, mask=valid)


@triton.jit(do_not_specialize=["c", "k0", "kblk"])
def _chol_diag_kernel(a_ptr, dinv_ptr, info_ptr, c, stride_a, k0, kblk, BS: tl.constexpr):
    r = tl.arange(0, BS)
    i = k0 + r
    valid = (i[:, None] < c) & (i[None, :] < c)
    lower = r[:, None] >= r[None, :]
    ptrs = a_ptr + i[:, None].to(tl.int64) * stride_a + i[None, :]
    a = tl.load(ptrs, mask=valid & lower, other=0.0)
    eye = r[:, None] == r[None, :]
    a = tl.where(eye & (i[:, None] >= c), 1.0, a)  # padding of the last block: identity
    # right-looking Cholesky in registers (only the lower triangle is read)
    L = tl.zeros((BS, BS), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)
    for p in range(BS):
        col = tl.sum(tl.where(r[None, :] == p, a, 0.0), axis=1)
        piv = tl.sum(tl.where(r == p, col, 0.0), axis=0)
        bad = bad | ((piv > 0.0) == 0).to(tl.int32)  # also catches NaN
        root = tl.sqrt_rn(tl.where(piv > 0.0, piv, 1.0))
        l_p = tl.where(r >= p, tl.math.div_rn(col, root + tl.zeros_like(col)), 0.0)
        L = tl.where(r[None, :] == p, l_p[:, None], L)
        a = a - l_p[:, None] * l_p[None, :]
    # X = L⁻¹ by forward substitution, one row at a time
    X = tl.zeros((BS, BS), dtype=tl.float32)
    for p in range(BS):
        lrow = tl.sum(tl.where(r[:, None] == p, L, 0.0), axis=0)
        lpp = tl.sum(tl.where(r == p, lrow, 0.0), axis=0)
        acc = tl.sum(lrow[:, None] * X, axis=0)
        e = tl.where(r == p, 1.0, 0.0)
        xrow = tl.math.div_rn(e - acc, lpp + tl.zeros_like(acc))
        X = tl.where(r[:, None] == p, xrow[None, :], X)
    tl.store(ptrs, L, mask=valid)
    d_ptrs = dinv_ptr + kblk.to(tl.int64) * BS * BS + r[:, None] * BS + r[None, :]
    tl.store(d_ptrs, X)
    tl.store(info_ptr, bad, mask=bad != 0)


@triton.jit(do_not_specialize=["c", "k0", "kblk"])
def _chol_panel_kernel(a_ptr, dinv_ptr, c, stride_a, k0, kblk, BS: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr):
    pid = tl.program_id(0)
    i = k0 + BS + pid * BM + tl.arange(0, BM)
    r = tl.arange(0, BS)
    t = tl.arange(0, BK)
    row_ok = i[:, None] < c
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    for kk in tl.static_range(0, BS, BK):  # K in chunks: the fp32 FMA dot keeps its operands in registers
        a = tl.load(a_ptr + i[:, None].to(tl.int64) * stride_a + (k0 + kk + t)[None, :],
                    mask=row_ok & ((k0 + kk + t)[None, :] < c), other=0.0)
        dinv_t = tl.load(dinv_ptr + kblk.to(tl.int64) * BS * BS + r[None, :] * BS + (kk + t)[:, None])  # Dinvᵀ rows
        acc += tl.dot(a, dinv_t, input_precision="ieee")
    j = k0 + r
    tl.store(a_ptr + i[:, None].to(tl.int64) * stride_a + j[None, :], acc, mask=row_ok & (j[None, :] < c))


@triton.jit(do_not_specialize=["c", "k0"])
def _chol_update_kernel(a_ptr, c, stride_a, k0, BS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if tj > ti:
        return
    t0 = k0 + BS
    i = t0 + ti * BT + tl.arange(0, BT)
    j = t0 + tj * BT + tl.arange(0, BT)
    t = tl.arange(0, BK)
    prod = tl.zeros((BT, BT), dtype=tl.float32)
    for kk in tl.static_range(0, BS, BK):
        col = k0 + kk + t
        kmask = col[None, :] < c
        li = tl.load(a_ptr + i[:, None].to(tl.int64) * stride_a + col[None, :], mask=(i[:, None] < c) & kmask,
                     other=0.0)
        lj = tl.load(a_ptr + j[:, None].to(tl.int64) * stride_a + col[None, :], mask=(j[:, None] < c) & kmask,
                     other=0.0)
        prod += tl.dot(li, tl.trans(lj), input_precision="ieee")
    mask = (i[:, None] < c) & (j[None, :] < c) & (i[:, None] >= j[None, :])
    ptrs = a_ptr + i[:, None].to(tl.int64) * stride_a + j[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) - prod, mask=mask)


@triton.jit(do_not_specialize=["c", "j0"])
def _trinv_t_kernel(a_ptr, t_ptr, c, stride_a, j0, BS: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    r0 = j0 + BS + pid * BS
    i = r0 + tl.arange(0, BS)
    r = tl.arange(0, BS)
    t = tl.arange(0, BK)
    jj = j0 + r
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for k0 in range(j0 + BS, r0 + BS, BK):
        kk = k0 + t
        x = tl.load(a_ptr + i[:, None].to(tl.int64) * stride_a + kk[None, :],
                    mask=(i[:, None] < c) & (kk[None, :] < c) & (i[:, None] >= kk[None, :]), other=0.0)
        lk = tl.load(a_ptr + kk[:, None].to(tl.int64) * stride_a + jj[None, :], mask=kk[:, None] < c, other=0.0)
        acc += tl.dot(x, lk, input_precision="ieee")
    tl.store(t_ptr + i[:, None].to(tl.int64) * BS + r[None, :], acc, mask=i[:, None] < c)


@triton.jit(do_not_specialize=["c", "j0", "jblk"])
def _trinv_apply_kernel(a_ptr, t_ptr, dinv_ptr, c, stride_a, j0, jblk, BS: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BS)
    jj = j0 + r
    d_base = dinv_ptr + jblk.to(tl.int64) * BS * BS
    if pid == 0:
        dinv = tl.load(d_base + r[:, None] * BS + r[None, :])
        tl.store(a_ptr + jj[:, None].to(tl.int64) * stride_a + jj[None, :], dinv,
                 mask=(jj[:, None] < c) & (jj[None, :] < c))
    else:
        i = j0 + pid * BS + r
        t = tl.arange(0, BK)
        x = tl.zeros((BS, BS), dtype=tl.float32)
        for kk in tl.static_range(0, BS, BK):
            tt = tl.load(t_ptr + i[:, None].to(tl.int64) * BS + (kk + t)[None, :], mask=i[:, None] < c, other=0.0)
            d_chunk = tl.load(d_base + (kk + t)[:, None] * BS + r[None, :])
            x -= tl.dot(tt, d_chunk, input_precision="ieee")
        tl.store(a_ptr + i[:, None].to(tl.int64) * stride_a + jj[None, :], x,
                 mask=(i[:, None] < c) & (jj[None, :] < c))


@triton.jit(do_not_specialize=["c"])
def _rotate_kernel(a_ptr, c, stride_a, BT: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if ti > tj:
        return
    i = ti * BT + tl.arange(0, BT)
    j = tj * BT + tl.arange(0, BT)
    mask = (i[:, None] < j[None, :]) & (j[None, :] < c)
    src = a_ptr + (c - 1 - i)[:, None].to(tl.int64) * stride_a + (c - 1 - j)[None, :]
    v = tl.load(src, mask=mask, other=0.0)
    tl.store(a_ptr + i[:, None].to(tl.int64) * stride_a + j[None, :], v, mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------
def _check(H: torch.Tensor) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if H.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"H must be float32 or float64, got {H.dtype}")


def hinv_factor_launch(H: torch.Tensor, damp: float, *, BS: int | None = None, BT: int | None = None,
                       BK: int | None = None):
    """Launch the kernels; returns ``(U, info)`` with ``U`` float32 (c, c) and ``info`` int32 (1,), nonzero on failure.

    ``BS``/``BT``/``BK`` override the block sizes (powers of two ≥ 16, BK ≤ BS; tests use them to cover many block
    columns and the chunked dot products).
    """
    _check(H)
    cfg = default_config()
    BS = BS or cfg["BS"]
    BT = BT or cfg["BT"]
    BK = min(BK or cfg["BK"], BS)
    c = H.shape[0]
    dev = H.device
    U = torch.empty((c, c), dtype=torch.float32, device=dev)
    info = torch.zeros((1,), dtype=torch.int32, device=dev)
    if c == 0:
        return U, info
    Hs = H if H.stride(1) == 1 else H.contiguous()
    # λ = damp · mean(diag H) after the dead-column fix, as in reference.damped_hessian (a device scalar: no sync)
    dg = Hs.diagonal().to(torch.float32)
    lam = (damp * torch.where(dg == 0, torch.ones_like(dg), dg).mean()).reshape(1)
    nb = triton.cdiv(c, BS)
    ntt = triton.cdiv(c, BT)
    dinv = torch.empty((nb, BS, BS), dtype=torch.float32, device=dev)
    T = torch.empty((c, BS), dtype=torch.float32, device=dev)
    wd, wm = cfg["num_warps_diag"], cfg["num_warps_dot"]
    sa = U.stride(0)

    _prepare_kernel[(ntt, ntt)](Hs, U, lam, c, Hs.stride(0), sa, BT=BT, num_warps=wm)
    for kb in range(nb):
        k0 = kb * BS
        _chol_diag_kernel[(1,)](U, dinv, info, c, sa, k0, kb, BS=BS, num_warps=wd)
        rest = c - (k0 + BS)
        if rest > 0:
            _chol_panel_kernel[(triton.cdiv(rest, BS),)](U, dinv, c, sa, k0, kb, BS=BS, BM=BS, BK=BK,
                                                         num_warps=wm)
            nt = triton.cdiv(rest, BT)
            _chol_update_kernel[(nt, nt)](U, c, sa, k0, BS=BS, BT=BT, BK=BK, num_warps=wm)
    for jb in range(nb - 1, -1, -1):
        j0 = jb * BS
        below = triton.cdiv(max(c - (j0 + BS), 0), BS)
        if below:
            _trinv_t_kernel[(below,)](U, T, c, sa, j0, BS=BS, BK=BK, num_warps=wm)
        _trinv_apply_kernel[(1 + below,)](U, T, dinv, c, sa, j0, jb, BS=BS, BK=BK, num_warps=wm)
    diag = U.diagonal().clone()
    _rotate_kernel[(ntt, ntt)](U, c, sa, BT=BT, num_warps=wm)
    U.triu_()
    U.diagonal().copy_(diag.flip(0))
    return U, info


@register_op("hinv_factor")
def _hinv_factor_op(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    return hinv_factor_launch(H, damp)


@_hinv_factor_op.register_fake
def _(H, damp):
    _check(H)
    c = H.shape[0]
    return H.new_empty((c, c), dtype=torch.float32), H.new_empty((1,), dtype=torch.int32)


def hinv_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """U, the upper Cholesky factor of (H + λI)⁻¹, or ``None`` if the damped H is not positive definite in float32.

    Args:
        H: (c, c) symmetric float32/float64 Hessian (dead columns with ``H[j, j] == 0`` are fixed on the fly; ``H`` is
            not modified).
        damp: relative damping, λ = damp · mean(diag H).

    Returns:
        (c, c) upper-triangular ``U`` with ``H⁻¹ = Uᵀ U`` in ``H``'s dtype (computed in float32), or ``None``.
    """
    U, info = torch.ops.sparsegpt_kernels.hinv_factor(H, float(damp))
    if int(info.item()) != 0 or not bool(torch.isfinite(U).all()) or not bool((U.diagonal() > 0).all()):
        return None
    return U.to(H.dtype)
