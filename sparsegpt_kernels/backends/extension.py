"""Soft loader of the compiled operators (the optional extension ``sparsegpt_kernels._C``).

Nothing is imported at package import: the first call of :func:`load` (made when a backend is considered) imports
``sparsegpt_kernels._C``, which registers ``torch.ops.sparsegpt_kernels.ext_*``. If it is missing, one log line says
so and the ``cpp``/``cuda`` backends report it as their reason; the torch backend keeps working.

Operators (all in the ``sparsegpt_kernels`` namespace; float32 and float64):

``ext_inverse_factor(H, damp) -> (U, info)``
    U = upper Cholesky factor of (H + damping)⁻¹ by the reversal identity; ``info`` (int32, 0-dim) is 0 on success.
``ext_nm_keep_mask(scores, n, m) -> keep``
    Same contract as :func:`sparsegpt_kernels.reference.nm_keep_mask` (bool, True = kept).
``ext_sweep(W!, U, sparsity, n, m, block_size, scale?, zero?, maxq, group_size) -> loss``
    The blocked column sweep in place on ``W`` (``n = m = 0``: unstructured); returns the OBS loss as a 0-dim tensor.
``ext_cholesky_factor(H, damp) -> (R, info)`` (CPU)
    R = the upper triangular factor with H + damping = R Rᵀ (so that U = R⁻¹), one Cholesky and no inverse;
    ``info`` as above.
``ext_sweep_cholesky(W!, R, sparsity, n, m, block_size, scale?, zero?, maxq, group_size) -> loss`` (CPU)
    The same sweep driven by R (csrc/core/sweep_core.h explains how): the block couplings go through R itself and
    only the (B, B) diagonal blocks of U are formed, so the factorisation costs c³/3 instead of ⅔c³.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

import torch

from .spec import SweepSpec

logger = logging.getLogger("sparsegpt_kernels")

MODULE = "sparsegpt_kernels._C"

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """Import the compiled module once; ``None`` (and one log line) if it is not there."""
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                _module = importlib.import_module(MODULE)
            except (ImportError, OSError) as e:  # not built, or built against another torch
                _module = None
                _error = f"{type(e).__name__}: {e}"
                logger.warning(
                    "sparsegpt_kernels: compiled extension %s is not available (%s); the 'cpp' and 'cuda' backends "
                    "are disabled. Build it with `pip install --no-build-isolation .`",
                    MODULE,
                    _error,
                )
            _loaded = True
    return _module


def missing_reason() -> str | None:
    """``None`` if the extension loads, otherwise why not (one line)."""
    if load() is None:
        return f"the compiled extension {MODULE} is not available ({_error})"
    return None


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA implementations."""
    mod = load()
    return bool(mod is not None and getattr(mod, "WITH_CUDA", 0))


def ops():
    """``torch.ops.sparsegpt_kernels`` after making sure the extension is loaded (raises if it is missing)."""
    if load() is None:
        raise RuntimeError(missing_reason())
    return torch.ops.sparsegpt_kernels


def sweep_args(W: torch.Tensor, spec: SweepSpec) -> tuple:
    """The arguments of ``ext_sweep`` after ``W`` and ``U`` for a :class:`SweepSpec`."""
    q = spec.quant
    n, m = (spec.n, spec.m) if spec.m is not None else (0, 0)
    if q is None:
        return float(spec.sparsity), n, m, int(spec.block_size), None, None, 0, 0
    scale = q.scale.to(W.dtype).contiguous()
    zero = q.zero.to(W.dtype).contiguous()
    return float(spec.sparsity), n, m, int(spec.block_size), scale, zero, int(q.maxq), int(q.group_size)


_DTYPES = (torch.float32, torch.float64)


def _check_dtype(t: torch.Tensor, what: str, backend: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"the {backend} backend computes in float32 or float64; {what} is {t.dtype}")


def _factor(op: str, H: torch.Tensor, damp: float, backend: str) -> torch.Tensor | None:
    _check_dtype(H, "H", backend)
    F, info = getattr(ops(), op)(H, float(damp))
    return F if int(info) == 0 else None


def _sweep(op: str, W: torch.Tensor, F: torch.Tensor, spec: SweepSpec, backend: str) -> float:
    _check_dtype(W, "W", backend)
    return float(getattr(ops(), op)(W, F, *sweep_args(W, spec)))


def inverse_factor(H: torch.Tensor, damp: float, backend: str) -> torch.Tensor | None:
    """``ext_inverse_factor`` with the backend interface's contract (``None`` on failure)."""
    return _factor("ext_inverse_factor", H, damp, backend)


def sweep(W: torch.Tensor, U: torch.Tensor, spec: SweepSpec, backend: str) -> float:
    """``ext_sweep`` on a :class:`SweepSpec`, in place on ``W``; returns the loss."""
    return _sweep("ext_sweep", W, U, spec, backend)


def cholesky_factor(H: torch.Tensor, damp: float, backend: str) -> torch.Tensor | None:
    """``ext_cholesky_factor`` with the backend interface's contract (``None`` on failure)."""
    return _factor("ext_cholesky_factor", H, damp, backend)


def sweep_cholesky(W: torch.Tensor, R: torch.Tensor, spec: SweepSpec, backend: str) -> float:
    """``ext_sweep_cholesky`` on a :class:`SweepSpec`, in place on ``W``; returns the loss."""
    return _sweep("ext_sweep_cholesky", W, R, spec, backend)
