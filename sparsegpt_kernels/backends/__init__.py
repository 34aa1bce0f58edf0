"""Backend registry and the one dispatch point.

A backend is a :class:`~sparsegpt_kernels.backends.base.Backend` (the protocol and what each step must do are in
:mod:`.base`), one instance per module ``sparsegpt_kernels.backends._<name>``, imported on first use: a backend whose
dependencies are missing is unavailable, never an import error of the package.

:func:`select_backend` is where every caller gets its backend: ``prune_layer``, the mask functions
(:mod:`sparsegpt_kernels.masks`) and, through :func:`value_checks`, the zero counts of whole models.
``select_backend("auto", device)`` honours ``SPARSEGPT_KERNELS_BACKEND`` and otherwise takes the available,
auto-selectable backend of highest priority; a name that cannot run raises :class:`BackendUnavailableError`.

Considering the ``cpp`` or ``cuda`` backend loads the compiled extension, and where it was not built at install
time, builds it (once, about a minute, with a log line saying so; :mod:`.extension`).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from ..options import BACKENDS
from .base import Backend

logger = logging.getLogger("sparsegpt_kernels")

ENV_VAR = "SPARSEGPT_KERNELS_BACKEND"

#: Every backend this package knows, in no particular order (priorities live in the backends).
KNOWN_BACKENDS = BACKENDS


class BackendUnavailableError(RuntimeError):
    """Raised when a backend asked for by name cannot run here."""


_backends: dict[str, Backend | None] = {}
_import_errors: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()


def get_backend(name: str) -> Backend | None:
    """The backend called ``name`` (``None`` when its module cannot be imported here); no availability check."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(KNOWN_BACKENDS)}")
    if name not in _backends:
        try:
            _backends[name] = importlib.import_module(f"{__name__}._{name}").BACKEND
        except ImportError as e:
            _backends[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _backends[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` if it can)."""
    be = get_backend(name)
    if be is None:
        return f"backend {name!r} could not be imported ({_import_errors[name]})"
    return be.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here, best first. Asking about ``cpp`` or ``cuda`` loads the compiled
    extension, building it on first use where the installation has none (about a minute, logged)."""
    device = torch.device(device)
    usable = [n for n in KNOWN_BACKENDS if unavailable_reason(n, device) is None]
    return sorted(usable, key=lambda n: -_backends[n].priority)


def select_backend(name: str, device: torch.device | str) -> Backend:
    """Resolve ``name`` ("auto" or a backend name) to the backend for tensors on ``device``."""
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
        chosen = next(n for n in available_backends(device) if _backends[n].auto_selectable(device))
    key = (chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("sparsegpt_kernels: using backend %r for %s tensors", chosen, device.type)
    return _backends[chosen]


def value_checks(t: torch.Tensor) -> Backend:
    """The backend whose value checks (zero counts, finiteness) read ``t`` fastest without loading anything: the cpp
    backend's compiled checks for a CPU tensor when the extension is loaded already, else the torch ones."""
    from . import extension

    if t.device.type == "cpu" and extension.is_loaded():
        return get_backend("cpp")
    return get_backend("torch")


__all__ = ["Backend", "BackendUnavailableError", "KNOWN_BACKENDS", "available_backends", "get_backend",
           "select_backend", "unavailable_reason", "value_checks"]
