"""What :func:`sparsegpt_kernels.prune_model` reports: one :class:`LayerReport` per weight matrix and the
:class:`PruneReport` of a run (totals, a plain-text table, JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .timing import format_timings


@dataclass
class LayerReport:
    """What happened to one weight matrix.

    ``loss`` is SparseGPT's OBS estimate (``None`` for the baselines, which have none); ``sparsity`` is the fraction
    of zeros in the weight afterwards and ``mask_sparsity`` the fraction the mask pruned (they differ when joint
    quantization rounds kept weights to zero, or a weight was zero already); ``tokens`` is how many calibration tokens
    its Hessian saw; ``skipped`` says why a layer was left dense. With ``refine="admm"``, ``refine`` holds the
    refinement's stats (loss before and after, ADMM and CG iterations, the fraction of the mask that moved, whether the
    refined weights were kept, seconds; see :func:`sparsegpt_kernels.refine.refine`) and ``refined_loss`` is the loss
    of the weights written. With several processes, ``rank`` is the process that pruned it,
    ``seconds`` its compute time there and ``comm_seconds`` the time spent reducing its Hessian and broadcasting its
    weights.
    """

    name: str
    shape: tuple[int, int]
    loss: float | None
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
    mask_sparsity: float | None = None
    rank: int | None = None  # the process that pruned it (several processes; see .distributed)
    comm_seconds: float = 0.0  # its share of the Hessian reduction and weight broadcast
    refine: dict | None = None

    @property
    def refined_loss(self) -> float | None:
        """The loss of the weights written, with ``refine="admm"`` (``refine["loss_after"]``), else ``None``."""
        return None if self.refine is None else self.refine["loss_after"]


@dataclass
class PruneReport:
    """Per-layer reports and totals of one :func:`prune_model` run.

    Totals come twice: over the pruned weight matrices (``sparsity``) and over the whole model (``model_sparsity``,
    every parameter counted once, tied embeddings included), which is what the saved checkpoint holds.
    """

    layers: list[LayerReport] = field(default_factory=list)
    method: str = "sparsegpt"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    blocks_pruned: list[int] = field(default_factory=list)
    resumed_from_block: int | None = None
    model_params: int = 0
    model_zeros: int = 0
    processes: int = 1
    #: seconds per phase of this run in this process (forward, hessians, solves, ...; see .timing)
    timings: dict[str, float] = field(default_factory=dict)

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
    def mask_sparsity(self) -> float | None:
        """Fraction pruned by the masks over every reported weight matrix (``None`` if a layer does not say)."""
        if any(r.mask_sparsity is None for r in self.layers) or not self.layers:
            return None
        return sum(r.mask_sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(1, self.total_params)

    @property
    def model_sparsity(self) -> float | None:
        """Fraction of zeros over every parameter of the model, shared ones counted once."""
        return self.model_zeros / self.model_params if self.model_params else None

    @property
    def total_loss(self) -> float | None:
        """Sum of the layers' OBS losses; ``None`` when no layer has one (the baselines)."""
        losses = [r.loss for r in self.layers if r.loss is not None]
        return float(sum(losses)) if losses else None

    @property
    def total_refined_loss(self) -> float | None:
        """Sum of the layers' losses after refinement (a layer without one counts its OBS loss); ``None`` when no
        layer was refined."""
        if all(r.refined_loss is None for r in self.layers):
            return None
        return float(sum(r.loss if r.refined_loss is None else r.refined_loss for r in self.layers
                         if r.loss is not None))

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
            "timings": self.timings,
            "totals": {
                "layers": len(self.layers),
                "params": self.total_params,
                "zeros": self.total_zeros,
                "sparsity": self.sparsity,
                "mask_sparsity": self.mask_sparsity,
                "loss": self.total_loss,
                "refined_loss": self.total_refined_loss,
                "skipped": len(self.skipped),
                "layer_seconds": sum(r.seconds for r in self.layers),
                "comm_seconds": sum(r.comm_seconds for r in self.layers),
                "processes": self.processes,
                "model_params": self.model_params,
                "model_zeros": self.model_zeros,
                "model_sparsity": self.model_sparsity,
            },
            "layers": [asdict(r) for r in self.layers],
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """The report as JSON that a strict parser reads (no NaN/Infinity)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    def format_table(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        head = f"{'layer':<48} {'shape':>12} {'loss':>11} {'sparsity':>8} {'damp':>7} {'sec':>6} backend"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            loss = "-" if r.loss is None else f"{r.loss:.4g}"
            extra = f"  (skipped: {r.skipped})" if r.skipped else ""
            lines.append(f"{r.name[-48:]:<48} {shape:>12} {loss:>11} {r.sparsity:>8.4f} {r.damp:>7.3g} "
                         f"{r.seconds:>6.2f} {r.backend}{extra}")
        lines.append("-" * len(head))
        loss = "-" if self.total_loss is None else f"{self.total_loss:.4g}"
        if self.total_refined_loss is not None:
            loss += f" (refined: {self.total_refined_loss:.4g})"
        mask = self.mask_sparsity
        masked = f" (masks: {mask:.4f})" if mask is not None and abs(mask - self.sparsity) > 5e-5 else ""
        lines.append(f"pruned layers: {len(self.layers)} matrices, {self.total_params:,} weights, zeros "
                     f"{self.sparsity:.4f}{masked}, total loss {loss}, {self.seconds:.1f} s ({self.method})")
        if self.processes > 1:
            lines.append(f"{self.processes} processes: compute {sum(r.seconds for r in self.layers):.1f} s, "
                         f"communication {sum(r.comm_seconds for r in self.layers):.1f} s (summed over layers)")
        if self.model_params:
            lines.append(f"whole model: {self.model_params:,} parameters (shared ones once), zeros "
                         f"{self.model_sparsity:.4f}")
        if self.timings:
            lines.append(format_timings(self.timings))
        return "\n".join(lines)
