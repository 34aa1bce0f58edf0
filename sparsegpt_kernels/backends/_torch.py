"""The ``torch`` backend: the pure-PyTorch reference, on any device."""

from __future__ import annotations

import torch

from .. import reference
from ..spec import SweepSpec

NAME = "torch"
PRIORITY = 0


def unavailable_reason(device: torch.device) -> str | None:
    return None


def inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    return reference.inverse_factor(H, damp)


def sweep(W: torch.Tensor, U: torch.Tensor, spec: SweepSpec) -> float:
    return reference.sweep(W, U, spec)
