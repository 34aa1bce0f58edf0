"""The published SparseGPT loop (Frantar & Alistarh, 2023), as the paper and its reference code describe it, written
here as the anchor the benchmarks measure every backend against.

What makes it "the published loop" (and not this package's reference, sparsegpt_kernels/reference.py):

- the inverse: Cholesky of the damped H, ``cholesky_inverse``, then the upper Cholesky factor of that inverse
  (three O(c³) steps, where the reference does one Cholesky and one triangular inverse);
- unstructured masks: per block of columns, a full sort of the block's scores w²/[H⁻¹]ᵢᵢ² and ``score <= threshold``
  at position ``int(numel * sparsity)`` of the sorted scores;
- N:M masks: one ``topk`` (the M - N smallest scores) per group of M columns, scattered into the block's mask;
- per column: prune, error, rank-1 update of the rest of the block as an outer-product matmul; lazy batch update
  of the columns right of the block with one GEMM;
- damping: ``percdamp * mean(diag H)``, dead columns (zero diagonal) set to 1 in H and to 0 in W.

It works in float32 on the device of its inputs and prunes ``W`` in place. Returns the OBS loss (Σ err²/2).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def published_prune(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01) -> float:
    """Prune ``W`` (rows, cols) in place given H (cols, cols); ``prune_n`` of every ``prune_m`` columns (N:M with
    N = prune_m - prune_n kept) when ``prune_m``, else ``sparsity`` unstructured."""
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)

    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_m == 0:
            tmp = W1**2 / torch.diag(Hinv1).reshape((1, -1)) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_m != 0 and i % prune_m == 0:
                tmp = W1[:, i:i + prune_m] ** 2 / torch.diag(Hinv1)[i:i + prune_m].reshape((1, -1)) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return float(losses.sum())


def published_prune_mode(W: torch.Tensor, H: torch.Tensor, mode: str, blocksize: int = 128) -> float:
    """:func:`published_prune` for a benchmark mode: a sparsity fraction ("0.5") or an N:M pattern ("2:4")."""
    if ":" in mode:
        n, m = (int(v) for v in mode.split(":"))
        return published_prune(W, H, prune_n=m - n, prune_m=m, blocksize=blocksize)
    return published_prune(W, H, sparsity=float(mode), blocksize=blocksize)
