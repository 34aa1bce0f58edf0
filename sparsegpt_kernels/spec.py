"""Plain data passed from the public API to every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantGrid:
    """Asymmetric min/max integer grid per output channel (and per group of ``group_size`` input columns).

    ``scale`` and ``zero`` are (rows, cols // group_size) tensors in the compute dtype; ``zero`` holds integers in
    ``[0, maxq]``. A weight ``w`` in column ``j`` maps to
    ``scale[:, g] * (clamp(round(w / scale[:, g]) + zero[:, g], 0, maxq) - zero[:, g])`` with ``g = j // group_size``;
    0 maps to exactly 0.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int
    group_size: int


@dataclass(frozen=True)
class SweepSpec:
    """What the column sweep must do.

    ``n``/``m`` set: "N kept of every M" consecutive input columns; otherwise ``sparsity`` is the fraction pruned in
    every column block (the count per block is :func:`sparsegpt_kernels.reference.n_pruned`).
    """

    sparsity: float
    n: int | None
    m: int | None
    block_size: int
    quant: QuantGrid | None = None
