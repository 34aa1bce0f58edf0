"""Backend registry and dispatch.

A backend is a module ``sparsegpt_kernels.backends._<name>`` exposing:

``NAME: str`` and ``PRIORITY: int``
    Higher priority wins under ``backend="auto"``.
``auto_priority(device: torch.device, nm: bool) -> int`` (optional, default ``PRIORITY``)
    The priority for one kind of job (``nm``: an N:M pattern rather than unstructured sparsity), where measurements
    show that the best backend depends on it.
``unavailable_reason(device: torch.device) -> str | None``
    ``None`` when the backend can run on tensors of ``device`` in this process, otherwise a one-line reason
    (shown verbatim to a user who asked for the backend explicitly). Must be cheap and must not initialise CUDA
    beyond what the tensors on ``device`` already did.
``auto_selectable(device: torch.device) -> bool`` (optional, default True)
    Whether ``backend="auto"`` may pick it for ``device`` when it is available (the Triton interpreter can run on
    CPU tensors, but is far too slow to be chosen automatically).
``inverse_factor(H: Tensor, damp: float) -> Tensor | None``
    ``H``: (c, c) symmetric float32/float64, the raw Hessian (dead columns still have ``H[j, j] == 0``). Applies the
    dead-column fix (``H[j, j] = 1``) and damping (``+ damp * mean(diag)``) and returns ``U``, the upper Cholesky factor
    of the inverse (``H⁻¹ = Uᵀ U``), same dtype/device as ``H``; returns ``None`` when the factorisation fails
    (non-positive pivot / non-finite result) so that the caller can escalate ``damp``. Must not modify ``H``.
``sweep(W: Tensor, U: Tensor, spec: SweepSpec) -> float``
    ``W``: (r, c) contiguous, same dtype/device as ``U``, dead columns already zeroed; pruned (and, with
    ``spec.quant``, quantized) in place following docs/algorithm.md ("The blocked sweep"). Returns the OBS loss
    estimate.
``max_block_size() -> int`` (optional)
    The widest column block the backend's sweep supports; :func:`sparsegpt_kernels.prune_layer` refuses a wider
    ``block_size`` (after clamping it to the layer's width) with a ``ValueError`` before any work.
``cholesky_factor(H, damp) -> Tensor | None`` and ``sweep_cholesky(W, R, spec) -> float`` (optional, together)
    The same two steps on R, the upper triangular factor with ``H + damping = R Rᵀ`` (``U = R⁻¹``), for backends
    that never form U: :func:`sparsegpt_kernels.prune_layer` uses this pair when a backend has it. Same contracts
    otherwise (dead-column fix and damping inside, ``None`` on failure; same result as ``sweep`` on ``U`` up to
    rounding).
``working_copy(W0, dtype) -> Tensor`` (optional)
    A new contiguous (r, c) tensor of ``dtype`` holding ``W0``'s values, in memory the backend's sweep prefers (the
    cpp backend: huge pages); :func:`sparsegpt_kernels.prune_layer` prunes that copy, never the user's weight.

Choosing: ``select_backend("auto", device)`` honours ``SPARSEGPT_KERNELS_BACKEND`` and otherwise takes the available
backend of highest priority; an explicit name that cannot run raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("sparsegpt_kernels")

ENV_VAR = "SPARSEGPT_KERNELS_BACKEND"

# Every backend this package knows, in no particular order (priorities live in the modules).
KNOWN_BACKENDS = ("torch", "triton", "cpp", "cuda")


class BackendUnavailableError(RuntimeError):
    """Raised when a backend asked for by name cannot run here."""


_modules: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}._{name}")
        except ImportError as e:  # a backend whose dependencies are missing is simply unavailable
            _modules[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _modules[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` if it can)."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(KNOWN_BACKENDS)}")
    mod = _load(name)
    if mod is None:
        return f"backend {name!r} could not be imported ({_import_errors[name]})"
    return mod.unavailable_reason(torch.device(device))


def _priority(name: str, device: torch.device, nm: bool) -> int:
    mod = _modules[name]
    pick = getattr(mod, "auto_priority", None)
    return pick(device, nm) if pick is not None else mod.PRIORITY


def available_backends(device: torch.device | str = "cpu", *, nm: bool = False) -> list[str]:
    """Backends that can run on ``device`` here, best first (for N:M patterns when ``nm``)."""
    device = torch.device(device)
    usable = [n for n in KNOWN_BACKENDS if unavailable_reason(n, device) is None]
    return sorted(usable, key=lambda n: -_priority(n, device, nm))


def _yes(device: torch.device) -> bool:
    return True


def select_backend(name: str, device: torch.device | str, *, nm: bool = False) -> ModuleType:
    """Resolve ``name`` ("auto" or a backend name) to a backend module for tensors on ``device`` (``nm``: for an N:M
    pattern, which may change what "auto" picks)."""
    device = torch.device(device)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    requested = name
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            name = env
    if name != "auto":
        reason = unavailable_reason(name, device)  # raises ValueError for unknown names
        if reason is not None:
            src = f" (from {ENV_VAR})" if requested == "auto" else ""
            raise BackendUnavailableError(f"backend {name!r}{src} cannot run on {device.type}: {reason}")
        chosen = name
    else:
        usable = [n for n in available_backends(device, nm=nm)
                  if getattr(_modules[n], "auto_selectable", _yes)(device)]
        chosen = usable[0]  # the torch backend is always usable
    key = (chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("sparsegpt_kernels: using backend %r for %s tensors", chosen, device.type)
    return _modules[chosen]
