"""Soft loader of the compiled operators (the optional extension ``sparsegpt_kernels._C``).

Nothing is imported at package import: the first call of :func:`load` (made when a backend is considered) imports
``sparsegpt_kernels._C``, which registers ``torch.ops.sparsegpt_kernels.ext_*``. Where it was not built at install
time (a plain ``pip install``, whose isolated build cannot see torch), the same sources, shipped in the package, are
built once on first use with ``torch.utils.cpp_extension.load`` and ninja, into ``$SPARSEGPT_KERNELS_CACHE/extension``
(one build per torch version, Python, machine and source set; ``SPARSEGPT_KERNELS_NO_JIT=1`` turns this off). If
neither works, one log line says why and the ``cpp``/``cuda`` backends report it as their reason; the torch backend
keeps working.

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
``ext_hessian_stats(H) -> [min, max, max |H - Hᵀ|, finite]``, ``ext_nonzeros_finite(t) -> [non-zeros, finite]`` (CPU)
    prune_layer's value checks in one pass each (:mod:`sparsegpt_kernels.checks`).
``ext_release_cpu_cache() -> bytes``, ``ext_cpu_cache_idle_bytes() -> bytes``
    The big CPU buffers (the working copy, the factor, the sweep's scratch) go back to a cache when freed and are
    reused for the next request of the same size, up to ``SPARSEGPT_KERNELS_CPU_CACHE_MB`` megabytes idle (default
    2048; 0 keeps none); these free them / tell how much is kept.
``ext_last_sweep_phases() -> [seconds]``, ``ext_cpu_simd() -> str``
    Where the last CPU sweep's time went, and which instruction set its in-block steps use here.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import sys
import threading
from types import ModuleType
from unittest import mock

import torch

from ..cache_dir import cache_dir
from ..spec import SweepSpec
from . import toolchain
from .base import Backend

logger = logging.getLogger("sparsegpt_kernels")

MODULE = "sparsegpt_kernels._C"
#: Set to 1 to never build the extension on first use (the cpp/cuda backends are then off without an installed _C).
NO_JIT_ENV = "SPARSEGPT_KERNELS_NO_JIT"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_error: str | None = None


def source_dir() -> str | None:
    """The C++/CUDA sources: shipped inside the package (``_csrc``, wheels and sdists) or the repository's ``csrc``."""
    for d in (os.path.join(_PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(d, "sources.txt")):
            return d
    return None


def _jit_sources(src: str) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) of the extension, from sources.txt (paths there are relative to the repository)."""
    groups: dict[str, list[str]] = {}
    with open(os.path.join(src, "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                group, path = (p.strip() for p in line.split(":", 1))
                rel = path.split("/", 1)[1] if path.startswith("csrc/") else path
                groups.setdefault(group, []).append(os.path.join(src, rel))
    return groups["ext"], groups.get("cuda", []) + groups.get("cuda_ext", [])


def _jit_build() -> ModuleType:
    """Build the extension with torch.utils.cpp_extension.load into the cache (once per torch version, Python,
    machine and source set) and import it."""
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources are not part of this installation")
    cpp, cu = _jit_sources(src)
    with_cuda = bool(cu) and torch.version.cuda is not None and torch.cuda.is_available() and (
        cpp_extension.CUDA_HOME is not None)
    sources = cpp + (cu if with_cuda else [])
    digest = hashlib.sha256()
    for path in sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names):
        with open(path, "rb") as f:
            digest.update(path[len(src):].encode() + f.read())
    tag = (f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}-"
           f"{'cuda' + str(torch.version.cuda) if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}")
    build_dir = os.path.join(cache_dir(), "extension", tag.replace("+", "_"))
    os.makedirs(build_dir, exist_ok=True)
    logger.warning("sparsegpt_kernels: building the compiled extension for this machine (once, about a minute; "
                   "cached in %s; %s=1 skips this)", build_dir, NO_JIT_ENV)
    cflags = ["-O3", "-g0", "-ffp-contract=off"]
    ldflags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if with_cuda:
        cflags.append("-DSPARSEGPT_KERNELS_WITH_CUDA=1")
    chosen, message = toolchain.choose_cxx()
    if message:
        logger.warning("sparsegpt_kernels: %s", message)
    with mock.patch.dict(os.environ, chosen):  # the compiler for this build only
        return cpp_extension.load(name="sparsegpt_kernels_C", sources=sources, extra_cflags=cflags,
                                  extra_ldflags=ldflags, extra_cuda_cflags=["-O3", "-DSPARSEGPT_KERNELS_WITH_CUDA=1"],
                                  extra_include_paths=[src], build_directory=build_dir, with_cuda=with_cuda,
                                  verbose=False)


def load() -> ModuleType | None:
    """The compiled module, loaded once: the installed ``sparsegpt_kernels._C``, else built on first use from the
    shipped sources (unless ``SPARSEGPT_KERNELS_NO_JIT=1``); ``None`` (and one log line) if neither works."""
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
            if _module is None and os.environ.get(NO_JIT_ENV, "").strip() not in ("1", "true", "yes", "on"):
                try:
                    _module = _jit_build()
                except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error: report, fall back
                    _error += f"; building it on first use failed: {type(e).__name__}: {str(e)[-600:]}"
            if _module is None:
                logger.warning(
                    "sparsegpt_kernels: compiled extension %s is not available (%s); the 'cpp' and 'cuda' backends "
                    "are disabled. Build it with `pip install --no-build-isolation .`",
                    MODULE,
                    _error,
                )
            _loaded = True
    return _module


def is_loaded() -> bool:
    """Whether the extension is loaded already (never loads or builds it)."""
    return _loaded and _module is not None


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


def factor(op: str, H: torch.Tensor, damp: float, backend: str) -> torch.Tensor | None:
    """``op`` (``ext_inverse_factor`` or ``ext_cholesky_factor``) with the backend protocol's contract: the factor,
    or ``None`` when the factorisation failed."""
    _check_dtype(H, "H", backend)
    F, info = getattr(ops(), op)(H, float(damp))
    return F if int(info) == 0 else None


def sweep(op: str, W: torch.Tensor, F: torch.Tensor, spec: SweepSpec, backend: str) -> float:
    """``op`` (``ext_sweep`` on U or ``ext_sweep_cholesky`` on R) for a :class:`SweepSpec`, in place on ``W``;
    returns the loss."""
    _check_dtype(W, "W", backend)
    return float(getattr(ops(), op)(W, F, *sweep_args(W, spec)))


def rule(name: str) -> int:
    """A limit of csrc/core/rules.h as the compiled extension has it (e.g. ``CUDA_MAX_BLOCK``)."""
    mod = load()
    if mod is None:
        raise RuntimeError(missing_reason())
    return int(getattr(mod, name))


class ExtensionBackend(Backend):
    """What the two backends of the compiled extension (cpp, cuda) share: the extension's N:M mask kernel, and on
    the CPU its unstructured one for the refinement."""

    def nm_keep_mask(self, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        if scores.dtype in _DTYPES:
            return ops().ext_nm_keep_mask(scores, int(n), int(m))
        return super().nm_keep_mask(scores, n, m)

    def unstructured_keep_mask(self, scores: torch.Tensor, sparsity: float, block_size: int) -> torch.Tensor:
        if scores.dtype in _DTYPES and scores.device.type == "cpu" and scores.dim() == 2:
            return ops().ext_unstructured_keep_mask(scores, float(sparsity), int(block_size))
        return super().unstructured_keep_mask(scores, sparsity, block_size)


def release_cpu_cache() -> int:
    """Frees the big CPU buffers the cpp backend keeps idle for reuse (``BigCache`` in csrc/core/big_buffer.h);
    returns the bytes freed. 0 where the extension is not loaded (it is never loaded for this)."""
    if not is_loaded():
        return 0
    return int(torch.ops.sparsegpt_kernels.ext_release_cpu_cache())
