"""The pure-PyTorch reference of SparseGPT: the specification every other backend is tested against.

Shapes: ``W`` is (rows, cols) = (out_features, in_features); ``H`` and ``U`` are (cols, cols).
Everything here works in the dtype it is given (float32 or float64) and on any device.

Tie-breaking, shared by every backend: when scores are equal, the element that comes first (lower column index for
N:M, lower row-major index within the block for unstructured) is pruned first.
"""

from __future__ import annotations

import torch

from .spec import QuantGrid, SweepSpec


# --------------------------------------------------------------------------------------------------------------------
# Inverse factor
# --------------------------------------------------------------------------------------------------------------------
def damped_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """A copy of ``H`` with dead columns fixed (``H[j, j] = 1`` where it was 0) and ``damp * mean(diag)`` added."""
    H = H.clone()
    diag = H.diagonal()
    diag[diag == 0] = 1
    diag += damp * diag.mean()
    return H


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = Uᵀ U) with one Cholesky and one triangular inverse.

    With J the index reversal: factor J H J = L Lᵀ; R = J L J is upper triangular with H = R Rᵀ, so U = R⁻¹.
    Returns ``None`` if H (after the dead-column fix and damping) is not positive definite in floating point.
    """
    Hd = damped_hessian(H, damp)
    L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
    if int(info) != 0:
        return None
    R = L.flip(0, 1)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    U = torch.linalg.solve_triangular(R, eye, upper=True)
    if not bool(torch.isfinite(U).all()) or not bool((U.diagonal() > 0).all()):
        return None
    return U


# --------------------------------------------------------------------------------------------------------------------
# Mask selection
# --------------------------------------------------------------------------------------------------------------------
def n_pruned(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights an unstructured block prunes: round-half-up of ``sparsity * numel``."""
    return min(numel, int(sparsity * numel + 0.5))


def mask_fraction(rows: int, cols: int, *, sparsity: float, nm: tuple[int, int] | None = None,
                  per: str | int = "matrix") -> float:
    """The fraction of a (rows, cols) weight that a mask prunes: exactly 1 - N/M for an N:M pattern ``nm``; for
    unstructured ``sparsity``, :func:`n_pruned` of every unit of selection, ``per``: "matrix" (one selection over the
    whole weight: magnitude), "row" (each row on its own: Wanda) or a column block width B (each block of B columns
    on its own: the SparseGPT sweep)."""
    if nm is not None:
        return 1.0 - nm[0] / nm[1]
    if per == "matrix":
        pruned = n_pruned(sparsity, rows * cols)
    elif per == "row":
        pruned = rows * n_pruned(sparsity, cols)
    elif isinstance(per, int) and not isinstance(per, bool) and per >= 1:
        pruned = sum(n_pruned(sparsity, rows * min(per, cols - i1)) for i1 in range(0, cols, per))
    else:
        raise ValueError(f"per must be 'matrix', 'row' or a positive block width, got {per!r}")
    return pruned / (rows * cols)


def unstructured_prune_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (True = pruned) of exactly the ``k`` lowest entries of ``scores``, ties pruned in row-major order.

    Uses a selection (``kthvalue``), not a sort: entries strictly below the k-th smallest value are pruned, then
    the first entries equal to it in row-major order until ``k`` are pruned.
    """
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    thresh = flat.kthvalue(k).values
    below = flat < thresh
    tied = flat == thresh
    need = k - int(below.sum())
    take = tied & (torch.cumsum(tied, 0) <= need)
    return (below | take).reshape(scores.shape)


def unstructured_keep_mask(scores: torch.Tensor, sparsity: float, block_size: int,
                           prune_mask=unstructured_prune_mask) -> torch.Tensor:
    """Keep-mask (True = kept) of a (rows, cols) score matrix with the sweep's unstructured counts:
    ``n_pruned(sparsity, rows·B)`` of the lowest scores pruned in every block of ``block_size`` columns over all rows
    (the last block narrower), ties in the block's row-major order; scores may be negative. ``prune_mask`` selects
    within a block (:func:`unstructured_prune_mask`, or a backend's kernel with the same result)."""
    keep = torch.empty_like(scores, dtype=torch.bool)
    for i1 in range(0, scores.shape[1], block_size):
        blk = scores[:, i1 : i1 + block_size].contiguous()
        keep[:, i1 : i1 + block_size] = ~prune_mask(blk, n_pruned(sparsity, blk.numel()))
    return keep


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (True = kept) with exactly ``n`` kept of every ``m`` consecutive entries along the last dimension.

    The ``m - n`` lowest scores of each group are pruned; among equal scores the earlier column is pruned first.
    ``scores.shape[-1]`` must be a multiple of ``m``.

    Each entry's rank in its group is counted directly, rank(i) = #{j : s_j < s_i, or s_j == s_i and j < i} (its
    position in a stable ascending sort), and the ``m - n`` lowest ranks are pruned: m² comparisons per group, which
    for the small M of N:M patterns is far cheaper than a sort.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if scores.shape[-1] % m:
        raise ValueError(f"last dimension {scores.shape[-1]} is not a multiple of M={m}")
    g = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    si, sj = g[..., :, None], g[..., None, :]  # [..., i, j]
    earlier = torch.ones(m, m, dtype=torch.bool, device=scores.device).tril_(-1)  # j < i
    rank = ((sj < si) | ((sj == si) & earlier)).sum(-1)
    return (rank >= m - n).reshape(scores.shape)


# --------------------------------------------------------------------------------------------------------------------
# Quantization grid
# --------------------------------------------------------------------------------------------------------------------
def make_quant_grid(W: torch.Tensor, bits: int, group_size: int | None = None) -> QuantGrid:
    """Asymmetric min/max grid per row (and per ``group_size`` columns) fixed from ``W``; 0 is on the grid."""
    rows, cols = W.shape
    g = cols if group_size is None else group_size
    maxq = 2**bits - 1
    Wg = W.reshape(rows, cols // g, g)
    xmin = Wg.amin(dim=-1).clamp(max=0)
    xmax = Wg.amax(dim=-1).clamp(min=0)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return QuantGrid(scale=scale, zero=zero, maxq=maxq, group_size=g)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``w`` onto the grid (elementwise; ``scale``/``zero`` broadcast against ``w``)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


# --------------------------------------------------------------------------------------------------------------------
# Column sweep
# --------------------------------------------------------------------------------------------------------------------
def sweep(W: torch.Tensor, U: torch.Tensor, spec: SweepSpec, *, observe=None) -> float:
    """Blocked column sweep with lazy batch updates; prunes (and quantizes) ``W`` in place, returns the OBS loss.

    Each block is worked on transposed, (B, rows), so that column j of the block is the contiguous row ``Wt[j]``
    and every per-column step is a few whole-vector operations (the arithmetic of each weight is the same either
    way: the rank-1 update is one multiply and one subtract per weight).

    ``observe`` (optional) is told every decision as it is made, with what decides it: ``observe("block", scores,
    k)`` for an unstructured block ((rows, B) scores, the ``k`` lowest pruned), ``observe("group", scores)`` for the
    N:M groups of ``m`` columns ((rows, m) scores), ``observe("round", q, scale)`` before each column's values ``q``
    are rounded onto the grid of step ``scale`` (the tests measure how close each decision is to a tie with it).
    """
    rows, cols = W.shape
    B = spec.block_size
    quant = spec.quant
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        Wt = W[:, i1:i2].T.contiguous()  # (B, rows): Wt[j] is column i1 + j
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        E = torch.empty_like(Wt)  # E[j] = err of column i1 + j
        if spec.m is None:
            # the block's scores in (rows, B) order: ties are pruned in row-major order of the block
            scores = W[:, i1:i2] ** 2 / d**2
            k = n_pruned(spec.sparsity, scores.numel())
            if observe is not None:
                observe("block", scores, k)
            pruned = unstructured_prune_mask(scores, k).T.contiguous()
        else:
            pruned = torch.empty_like(Wt, dtype=torch.bool)
        for j in range(i2 - i1):
            if spec.m is not None and j % spec.m == 0:
                grp = slice(j, j + spec.m)
                scores = (Wt[grp] ** 2 / d[grp, None] ** 2).T
                if observe is not None:
                    observe("group", scores)
                pruned[grp] = ~nm_keep_mask(scores, spec.n, spec.m).T
            w = Wt[j]
            q = w.masked_fill(pruned[j], 0)
            if quant is not None:
                g = (i1 + j) // quant.group_size
                if observe is not None:
                    observe("round", q, quant.scale[:, g])
                q = quantize(q, quant.scale[:, g], quant.zero[:, g], quant.maxq)
            # (w - q) / d, divided by a tensor: with a Python number CUDA would multiply by its reciprocal instead
            err = torch.sub(w, q, out=E[j]).div_(d[j])
            w.copy_(q)
            Wt[j + 1 :].sub_(U1[j, j + 1 :, None] * err[None, :])  # w_k -= err * U_jk for the block's later columns
        loss += (E**2).sum() / 2
        W[:, i1:i2] = Wt.T
        if i2 < cols:
            W[:, i2:].sub_(E.T @ U[i1:i2, i2:])
    return float(loss)
