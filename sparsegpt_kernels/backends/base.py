"""The backend protocol: what :func:`sparsegpt_kernels.prune_layer` and the mask functions ask of a backend.

A backend is one instance of a :class:`Backend` subclass (``BACKEND`` in ``sparsegpt_kernels.backends._<name>``). The
base class is the pure-PyTorch implementation of every step except the solve itself, so a backend overrides only
what it does differently: the ``torch`` backend is this class plus the reference sweep, the ``cpp`` backend replaces
every step with compiled operators, the GPU backends replace the factor or the sweep and the masks.

The steps, in the order :func:`sparsegpt_kernels.prune_layer` runs them:

``hessian_stats(H)`` and ``nonzeros_and_finite(t)``
    The value checks of the inputs and the output (one pass each where the backend can).
``working_copy(W0, dtype)``
    A new contiguous (r, c) tensor of ``dtype`` holding ``W0``'s values, in memory the sweep prefers; the user's
    weight is never written until the result is known to be finite.
``factor(H, damp) -> F | None``
    ``H``: (c, c) symmetric float32/float64, the raw Hessian (dead columns still have ``H[j, j] == 0``). Applies the
    dead-column fix (``H[j, j] = 1``) and damping (``+ damp * mean(diag)``) and returns the factor the sweep takes,
    same dtype and device as ``H``, or ``None`` when the factorisation fails (a non-positive pivot or a non-finite
    result), so that the caller can retry with more damping. Must not modify ``H``. Which factor is the backend's
    choice (``FACTOR``): "inverse" is U, the upper Cholesky factor of the inverse (``H⁻¹ = Uᵀ U``, the reference's);
    "cholesky" is R, the upper triangular factor with ``H = R Rᵀ`` (``U = R⁻¹``), for a sweep that never forms U.
``sweep(W, F, spec) -> loss``
    ``W``: (r, c) contiguous, same dtype and device as ``F``, dead columns already zeroed; pruned (and, with
    ``spec.quant``, quantized) in place following docs/algorithm.md ("The blocked sweep"). Returns the OBS loss.
``max_block_size() -> int | None``
    The widest column block the sweep supports (``None``: no limit); a wider ``block_size`` (after clamping it to the
    layer's width) is refused with a ``ValueError`` before any work.
``nm_keep_mask(scores, n, m)`` and ``unstructured_prune_mask(scores, k)``
    Mask selection on its own (:mod:`sparsegpt_kernels.masks`), with the reference's results exactly, ties included.

Availability: ``unavailable_reason(device)`` is ``None`` when the backend can run on tensors of ``device`` in this
process, else a one-line reason (shown to a user who asked for the backend by name); it must be cheap and must not
initialise CUDA beyond what tensors on ``device`` already did. ``auto_selectable(device)`` says whether
``backend="auto"`` may pick it there (Triton's interpreter runs on CPU tensors, but only for tests). Among the
available, auto-selectable backends the highest ``priority`` wins.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from ..spec import SweepSpec

#: Side of the square tiles of H compared with their mirror images in the CPU symmetry check (both fit in cache).
SYM_TILE = 256
#: Elements of the temporary difference per step of the GPU symmetry check (64 MiB in float32).
SYM_PANEL_ELEMS = 1 << 24


class Backend:
    """The pure-PyTorch implementation of every step (see the module docstring); subclasses override what they
    implement otherwise."""

    name: str = "torch"
    priority: int = 0
    #: "inverse" (the factor is U) or "cholesky" (the factor is R); see :meth:`factor`.
    FACTOR = "inverse"

    def __repr__(self) -> str:
        return f"<sparsegpt_kernels backend {self.name!r}>"

    # ------------------------------------------------------------------------------------------------ availability
    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def auto_selectable(self, device: torch.device) -> bool:
        return True

    def max_block_size(self) -> int | None:
        return None

    # ------------------------------------------------------------------------------------------------ the solve
    def working_copy(self, W0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return W0.to(dtype).clone().contiguous()

    def factor(self, H: torch.Tensor, damp: float) -> torch.Tensor | None:
        return reference.inverse_factor(H, damp)

    def sweep(self, W: torch.Tensor, F: torch.Tensor, spec: SweepSpec) -> float:
        return reference.sweep(W, F, spec)

    # ------------------------------------------------------------------------------------------------ masks
    def nm_keep_mask(self, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        return reference.nm_keep_mask(scores, n, m)

    def unstructured_prune_mask(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return reference.unstructured_prune_mask(scores, k)

    def unstructured_keep_mask(self, scores: torch.Tensor, sparsity: float, block_size: int) -> torch.Tensor:
        return reference.unstructured_keep_mask(scores, sparsity, block_size, self.unstructured_prune_mask)

    # ------------------------------------------------------------------------------------------------ value checks
    def hessian_stats(self, H: torch.Tensor) -> tuple[float, float, float, bool]:
        """(min, max, max |H − Hᵀ|, whether a diagonal entry is negative) of ``H``; NaN or Inf shows in min/max."""
        if H.device.type == "cpu":
            return _hessian_stats_cpu(H)
        return _hessian_stats_device(H)

    def nonzeros_and_finite(self, t: torch.Tensor) -> tuple[int, bool]:
        """(number of non-zero entries, whether every entry is finite)."""
        t = t.detach()
        if t.numel() == 0:
            return 0, True
        lo, hi = torch.aminmax(t)
        # one host synchronisation (a GPU tensor would otherwise pay three); counts below 2**53 are exact in float64
        nonzeros, lo, hi = torch.stack((torch.count_nonzero(t).double(), lo.double(), hi.double())).tolist()
        return int(nonzeros), math.isfinite(lo) and math.isfinite(hi)


def max_asymmetry(H: torch.Tensor) -> float:
    """max |H − Hᵀ| over the upper triangle, tile by tile: each (T, T) tile against the transpose of its mirror tile,
    so the transposed read stays in cache (3–4.5x faster than row panels on 4096² and 11008² Hessians)."""
    n = H.shape[0]
    worst = 0.0
    for i in range(0, n, SYM_TILE):
        for j in range(i, n, SYM_TILE):
            lo, hi = torch.aminmax(H[i : i + SYM_TILE, j : j + SYM_TILE] - H[j : j + SYM_TILE, i : i + SYM_TILE].T)
            worst = max(worst, float(hi), -float(lo))
    return worst


def _hessian_stats_cpu(H: torch.Tensor) -> tuple[float, float, float, bool]:
    lo, hi = (float(x) for x in torch.aminmax(H))  # NaN and Inf propagate: this doubles as the finiteness check
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return lo, hi, math.nan, False
    return lo, hi, max_asymmetry(H), bool((H.diagonal() < 0).any())


def _hessian_stats_device(H: torch.Tensor) -> tuple[float, float, float, bool]:
    """The same as device reductions read back in one host synchronisation: the CPU's tile loop would cost two
    launches and two synchronisations per tile on a GPU (136 tiles at c = 4096)."""
    n = H.shape[0]
    lo, hi = torch.aminmax(H)
    step = max(1, SYM_PANEL_ELEMS // n)
    asym = torch.zeros((), dtype=H.dtype, device=H.device)
    for i in range(0, n, step):
        asym = torch.maximum(asym, torch.sub(H[i : i + step], H[:, i : i + step].T).abs_().amax())
    neg = (H.diagonal() < 0).any().to(H.dtype)
    lo, hi, asym, neg = torch.stack((lo, hi, asym, neg)).tolist()
    return lo, hi, asym, neg != 0
