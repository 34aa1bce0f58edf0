"""Where the time of a :func:`sparsegpt_kernels.prune_model` run goes.

Phases (seconds, summed over the run; ``PruneReport.timings``):

- ``calibration``: tokenizing the calibration text and cutting its windows;
- ``allocation``: the per-layer sparsities of a non-uniform allocation (its own forward passes and solves);
- ``forward``: the model's forward passes: up to the first block, then each block twice (dense, to collect its
  Hessians; pruned, to make the next block's inputs), without the Hessian updates;
- ``hessians``: the Hessian updates in the forward hooks (one GEMM per layer input and batch);
- ``solves``: pruning the layers (``prune_layer``: checks, factorisation, sweep; or a baseline);
- ``communication``: reducing Hessians and broadcasting pruned weights between processes;
- ``other``: everything else: moving blocks between devices, checkpoints, counting zeros.

On CUDA the clock is read after a device synchronisation, so that queued kernels count in their phase.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("calibration", "allocation", "forward", "hessians", "solves", "communication", "other")


class Timings:
    """Seconds per phase of one run (see the module docstring)."""

    def __init__(self, device: torch.device | None = None):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._cuda = device is not None and device.type == "cuda"

    def now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def split(self, total: float) -> dict[str, float]:
        """Every phase, ``other`` being what ``total`` (the run's wall time) leaves, and ``total`` itself."""
        out = {k: v for k, v in self.seconds.items() if k != "other"}
        out["other"] = max(0.0, total - sum(out.values()))
        out["total"] = total
        return out


def format_timings(t: dict[str, float]) -> str:
    """One line: the phases that took time, with their share of the total."""
    total = t.get("total") or sum(v for k, v in t.items() if k != "total")
    parts = [f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in t.items()
             if k != "total" and (v >= 0.05 or k in ("forward", "hessians", "solves"))] if total else []
    return "time: " + ", ".join(parts)
