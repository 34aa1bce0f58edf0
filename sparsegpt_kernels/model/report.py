"""What :func:`sparsegpt_kernels.prune_model` reports: one :class:`LayerReport` per weight matrix and the
:class:`PruneReport` of a run (totals, a plain-text table, JSON)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """What happened to one weight matrix. ``loss`` is SparseGPT's OBS estimate (NaN for the baselines);
    ``tokens`` is how many calibration tokens its Hessian saw; ``skipped`` says why a layer was left dense."""

    name: str
    shape: tuple[int, int]
    loss: float
    sparsity: float
    damp: float
    seconds: float
    backend: str
    method: str
    pattern: str | None = None
    target_sparsity: float | None = None
    quant_bits: int | None = None
    tokens: int = 0
    skipped: str | None = None


@dataclass
class PruneReport:
    """Per-layer reports and totals of one :func:`prune_model` run."""

    layers: list[LayerReport] = field(default_factory=list)
    method: str = "sparsegpt"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    blocks_pruned: list[int] = field(default_factory=list)
    resumed_from_block: int | None = None

    @property
    def total_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def total_zeros(self) -> int:
        return int(round(sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)))

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every reported weight matrix."""
        return self.total_zeros / max(1, self.total_params)

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self.layers if not math.isnan(r.loss)))

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "settings": self.settings,
            "seconds": self.seconds,
            "blocks_pruned": self.blocks_pruned,
            "resumed_from_block": self.resumed_from_block,
            "totals": {
                "layers": len(self.layers),
                "params": self.total_params,
                "zeros": self.total_zeros,
                "sparsity": self.sparsity,
                "loss": self.total_loss,
                "skipped": len(self.skipped),
                "layer_seconds": sum(r.seconds for r in self.layers),
            },
            "layers": [asdict(r) for r in self.layers],
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=True)

    def format_table(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        head = f"{'layer':<48} {'shape':>12} {'loss':>11} {'sparsity':>8} {'damp':>7} {'sec':>6} backend"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            loss = "-" if math.isnan(r.loss) else f"{r.loss:.4g}"
            extra = f"  (skipped: {r.skipped})" if r.skipped else ""
            lines.append(f"{r.name[-48:]:<48} {shape:>12} {loss:>11} {r.sparsity:>8.4f} {r.damp:>7.3g} "
                         f"{r.seconds:>6.2f} {r.backend}{extra}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} matrices, {self.total_params:,} weights, sparsity {self.sparsity:.4f}, "
                     f"total loss {self.total_loss:.4g}, {self.seconds:.1f} s ({self.method})")
        return "\n".join(lines)
