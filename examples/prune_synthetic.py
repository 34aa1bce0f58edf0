"""Prune a synthetic linear layer that sees realistic inputs and compare SparseGPT with magnitude and Wanda pruning.

The inputs are strongly correlated and have a few outlier features, like the activations inside a transformer.
Prints the relative reconstruction error ||XWᵀ − XŴᵀ||² / ||XWᵀ||² of each method at 50%, 4:8 and 2:4.

    python examples/prune_synthetic.py [--rows 1024] [--cols 1024] [--tokens 4096] [--backend auto]
"""

from __future__ import annotations

import argparse
import time

import torch

import sparsegpt_kernels as sk


def realistic_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = max(1, cols // 8)
    X = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, cols, generator=g) / rank**0.5)
    X += 0.1 * torch.randn(tokens, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[: max(1, cols // 128)]] *= 25.0  # outlier features
    return X


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()

    torch.manual_seed(0)
    X = realistic_inputs(args.tokens, args.cols)
    W = torch.randn(args.rows, args.cols) * args.cols**-0.5
    acc = sk.HessianAccumulator(args.cols)
    for chunk in X.split(512):
        acc.update(chunk)
    ref = X @ W.T

    def rel_err(Wp: torch.Tensor) -> float:
        return float(((X @ Wp.T - ref) ** 2).sum() / (ref**2).sum())

    print(f"layer {args.rows}x{args.cols}, {args.tokens} calibration tokens")
    print(f"{'mode':>5}  {'magnitude':>10}  {'wanda':>10}  {'sparsegpt':>10}  {'gain vs wanda':>13}  {'time':>7}  "
          "backend")
    for mode in ["0.5", "4:8", "2:4"]:
        Wp = W.clone()
        kw = {"pattern": mode} if ":" in mode else {"sparsity": float(mode)}
        t0 = time.perf_counter()
        res = sk.prune_layer(Wp, acc, backend=args.backend, **kw)
        dt = time.perf_counter() - t0
        Wm, Ww = W.clone(), W.clone()
        sk.magnitude_prune_(Wm, **kw)
        sk.wanda_prune_(Ww, acc.hessian.diagonal(), **kw)  # |w|·||x||: diag(H) ∝ squared input norms
        e_mag, e_wanda, e_sgpt = rel_err(Wm), rel_err(Ww), rel_err(Wp)
        label = "50%" if mode == "0.5" else mode
        print(f"{label:>5}  {e_mag:10.4f}  {e_wanda:10.4f}  {e_sgpt:10.4f}  {e_wanda / e_sgpt:12.1f}x  {dt:6.2f}s  "
              f"{res.backend}")


if __name__ == "__main__":
    main()
