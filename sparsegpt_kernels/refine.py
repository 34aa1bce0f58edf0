"""Weight refinement after SparseGPT (``refine="admm"``): a better solution of the layer's least-squares problem
under the same sparsity pattern, shared by every backend (pure PyTorch, any device, float32 or float64 in the dtype
given; every heavy step is a GEMM).

With ``W0`` the weight before the sweep (dead columns zeroed) and ``Hd`` the damped Hessian the sweep used, the
objective is ``f(Ŵ) = ½·tr((W0 − Ŵ) Hd (W0 − Ŵ)ᵀ)`` (the sweep's OBS loss is ``f`` of its result). Two phases, as in
ALPS (Meng et al., 2024) and Boža (2024):

A. ADMM on ``min f(W) s.t. Z has the pattern, W = Z``, started at SparseGPT's result, with the penalty ρ growing
   geometrically; the W-update is an exact solve through a Cholesky factor of ``Hd + ρI`` (two triangular solves per
   iteration), the Z-update a projection onto the pattern, so the mask may move.
B. Preconditioned conjugate gradients on the final support (one GEMM per iteration); with a fixed mask, phase B
   alone.

With joint quantization the mask stays SparseGPT's and the result of phase B is rounded onto the same grid by a
column sweep with error compensation. The result is returned only where it lowers ``f``. docs/algorithm.md, section
13, has the derivation.
"""

from __future__ import annotations

import logging
import time

import torch

from . import reference
from .spec import QuantGrid, SweepSpec

logger = logging.getLogger("sparsegpt_kernels")

#: Phase A's penalty: ρ starts at RHO_START · mean(diag Hd) and is multiplied by RHO_GROWTH after every iteration
#: (tuned on correlated 576x576 problems at 70% and 2:4; docs/algorithm.md, section 13).
RHO_START = 0.1
RHO_GROWTH = 1.15


def objective(W0: torch.Tensor, W: torch.Tensor, Hd: torch.Tensor) -> float:
    """f(W) = ½·tr((W0 − W) Hd (W0 − W)ᵀ), summed in float64."""
    D = W0 - W
    return 0.5 * float((D * (D @ Hd)).sum(dtype=torch.float64))


def keep_mask(scores: torch.Tensor, spec: SweepSpec, select=reference) -> torch.Tensor:
    """Keep-mask (True = kept) of the highest ``scores`` with exactly the counts of ``spec``: N of every M consecutive
    columns of a row, or, unstructured, ``n_pruned(sparsity, rows·B)`` pruned in every block of ``block_size``
    columns over all rows; ties as in :mod:`sparsegpt_kernels.reference` (the earlier entry is pruned first).
    ``select``'s ``nm_keep_mask`` and ``unstructured_keep_mask`` choose (the reference's, or a backend's kernels,
    which give the same masks)."""
    if spec.m is not None:
        return select.nm_keep_mask(scores, spec.n, spec.m)
    return select.unstructured_keep_mask(scores, spec.sparsity, spec.block_size)


def sweep_keep_mask(W_s: torch.Tensor, W0: torch.Tensor, spec: SweepSpec, select=reference) -> torch.Tensor:
    """The sweep's mask from its result ``W_s``: every pruned weight is 0, but a kept one can be 0 too (rounded to 0,
    or 0 before), so of the zeros exactly the pattern's count is taken as pruned, the smallest in ``|W0|`` first."""
    return keep_mask(torch.where(W_s != 0, torch.inf, W0.abs()), spec, select)


def penalised_factor(Hd: torch.Tensor, rho: float) -> torch.Tensor:
    """The lower Cholesky factor L of Hd + ρI (L Lᵀ); raises ``torch.linalg.LinAlgError`` if it fails."""
    A = Hd.clone()
    A.diagonal().add_(rho)
    L, info = torch.linalg.cholesky_ex(A)
    info = int(info)  # one host synchronisation
    if info != 0:
        raise torch.linalg.LinAlgError(f"the Cholesky factorisation of Hd + rho*I failed (info {info})")
    return L


def admm(W0: torch.Tensor, Hd: torch.Tensor, Z: torch.Tensor, spec: SweepSpec, *, iters: int, tol: float,
         dead: torch.Tensor | None = None, select=reference) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Phase A from ``Z`` (on the pattern), ``iters`` >= 1 iterations at most; returns (Z, its mask, iterations run,
    G0 = W0 Hd, which phase B reuses).

    W = (G0 + ρ(Z − V))(Hd + ρI)⁻¹ by a Cholesky factor Hd + ρI = L Lᵀ (two triangular solves from the right); Z =
    the projection of W + V onto the pattern (the highest |W + V| kept; weights of ``dead`` columns, which change
    nothing, pruned first); V += W − Z (the scaled dual, rescaled when ρ grows). Stops when ||W − Z|| < tol·||Z||.
    Raises ``torch.linalg.LinAlgError`` if a factorisation fails.
    """
    G0 = W0 @ Hd
    rho = RHO_START * float(Hd.diagonal().mean())
    V = torch.zeros_like(Z)
    done = 0
    while done < iters:
        done += 1
        L = penalised_factor(Hd, rho)
        Y = torch.linalg.solve_triangular(L.T, G0 + rho * (Z - V), upper=True, left=False)  # Y Lᵀ = B
        W = torch.linalg.solve_triangular(L, Y, upper=False, left=False)  # W L = Y
        X = W + V
        scores = X.abs() if dead is None else X.abs().masked_fill_(dead, -1)
        keep = keep_mask(scores, spec, select)
        Z = X * keep
        V = X - Z
        if float(torch.linalg.vector_norm(W - Z)) < tol * float(torch.linalg.vector_norm(Z)):
            break
        V /= RHO_GROWTH  # the scaled dual is y/ρ
        rho *= RHO_GROWTH
    return Z, keep, done, G0


def solve_on_support(W0: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor, X: torch.Tensor, *, iters: int,
                     tol: float, G0: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Phase B: min f over the weights that are 0 outside ``keep``, by conjugate gradients from ``X`` with the Jacobi
    preconditioner diag(Hd), every row its own system (α, β per row); returns (weights, iterations run). The gradient
    is ((X − W0) Hd) ⊙ S; stops when the residual ||((W0 − X) Hd) ⊙ S|| < tol·||(W0 Hd) ⊙ S||. ``G0``: W0 Hd if
    known."""
    S = keep.to(X.dtype)
    dinv = 1 / Hd.diagonal()
    X = X * S
    if G0 is None:
        G0 = W0 @ Hd
    r = (G0 - X @ Hd) * S
    stop = tol * float(torch.linalg.vector_norm(G0 * S))
    z = r * dinv
    p = z
    rz = (r * z).sum(1, keepdim=True)
    done = 0
    while done < iters and float(torch.linalg.vector_norm(r)) >= stop:
        done += 1
        q = (p @ Hd) * S
        pq = (p * q).sum(1, keepdim=True)
        alpha = torch.where(pq > 0, rz / pq, 0)
        X = X + alpha * p
        r = r - alpha * q
        z = r * dinv
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + torch.where(rz > 0, rz_next / rz, 0) * p
        rz = rz_next
    return X, done


def round_on_mask(W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, grid: QuantGrid, block_size: int) -> None:
    """Round ``W`` onto ``grid`` in place with OBS error compensation over the given mask: :func:`reference.sweep`
    with the pruned set ``~keep`` instead of one it selects (U: the upper Cholesky factor of Hd⁻¹)."""
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Wt = W[:, i1:i2].T.contiguous()
        pruned = (~keep[:, i1:i2]).T
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        E = torch.empty_like(Wt)
        for j in range(i2 - i1):
            w = Wt[j]
            g = (i1 + j) // grid.group_size
            q = reference.quantize(w.masked_fill(pruned[j], 0), grid.scale[:, g], grid.zero[:, g], grid.maxq)
            err = torch.sub(w, q, out=E[j]).div_(d[j])
            w.copy_(q)
            Wt[j + 1 :].sub_(U1[j, j + 1 :, None] * err[None, :])
        W[:, i1:i2] = Wt.T
        if i2 < cols:
            W[:, i2:].sub_(E.T @ U[i1:i2, i2:])


def refine(W0: torch.Tensor, W_s: torch.Tensor, Hd: torch.Tensor, spec: SweepSpec, *, iters: int, cg_iters: int,
           tol: float, move: bool = True, U: torch.Tensor | None = None, dead: torch.Tensor | None = None,
           select=reference) -> tuple[torch.Tensor, dict]:
    """Refine SparseGPT's result ``W_s`` (pruned, and quantized with ``spec.quant``, as ``spec`` says) of the weight
    ``W0`` on the damped Hessian ``Hd``; returns (weights, stats).

    ``iters`` ADMM iterations (phase A), then ``cg_iters`` conjugate-gradient iterations (phase B), ``tol`` the
    relative tolerance of both. With a fixed mask (``move=False``, and always with ``spec.quant``) the problem is
    convex and phase B alone solves it: phase A is skipped and phase B gets its GEMMs (``cg_iters + 2·iters``
    iterations). With ``spec.quant`` the result is then rounded onto the grid through ``U`` (the upper Cholesky factor
    of Hd⁻¹, needed then). ``dead`` columns (bool, per column) are pruned first and set to 0. ``select`` chooses the
    masks (:func:`keep_mask`). If the weights on ADMM's mask do not lower f, phase B runs again on SparseGPT's mask
    (from ``W_s``). The refined weights are returned if they lower f, else ``W_s``.

    Stats: ``loss_before`` (f of ``W_s``), ``loss_after`` (f of the weights returned), ``admm_iters`` and
    ``cg_iters`` (run), ``mask_changed`` (the fraction of the weights whose kept/pruned status the returned weights
    changed), ``kept`` (whether the refined weights were returned) and ``seconds``.
    """
    t0 = time.perf_counter()
    sparsegpt_keep = sweep_keep_mask(W_s, W0, spec, select)
    Z, keep, n_admm, G0 = W_s, sparsegpt_keep, 0, None
    if move and spec.quant is None and iters > 0:
        try:
            Z, keep, n_admm, G0 = admm(W0, Hd, W_s, spec, iters=iters, tol=tol, dead=dead, select=select)
        except torch.linalg.LinAlgError as e:  # a factorisation failed: refine on SparseGPT's mask
            logger.warning("sparsegpt_kernels: refine: %s; keeping SparseGPT's mask", e)
    else:
        cg_iters += 2 * iters

    def phase_b(keep: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, int]:
        W, n = solve_on_support(W0, Hd, keep, X, iters=cg_iters, tol=tol, G0=G0)
        if spec.quant is not None:
            round_on_mask(W, U, keep, spec.quant, spec.block_size)
        if dead is not None:
            W[:, dead] = 0
        return W, n

    W, n_cg = phase_b(keep, Z)
    before, after = objective(W0, W_s, Hd), objective(W0, W, Hd)
    if after >= before and n_admm > 0:
        # the moved mask lost (ADMM stopped far from a good pattern): phase B on SparseGPT's mask, which lowers f
        # wherever SparseGPT's weights are not already the least-squares ones on their support
        keep = sparsegpt_keep
        W, n_fixed = phase_b(keep, W_s)
        n_cg += n_fixed
        after = objective(W0, W, Hd)
    kept = after < before
    stats = {"loss_before": before, "loss_after": after if kept else before, "admm_iters": n_admm, "cg_iters": n_cg,
             "mask_changed": float((keep != sparsegpt_keep).sum()) / keep.numel() if kept else 0.0, "kept": kept,
             "seconds": time.perf_counter() - t0}
    return (W.contiguous() if kept else W_s), stats
