"""Export 2:4-pruned linear layers to PyTorch semi-structured sparse tensors (cuSPARSELt / CUTLASS) for inference.

Pruning alone makes a model neither faster nor smaller: the zeros are still stored and multiplied. On GPUs with sparse
tensor cores (compute capability 8.0 and newer) PyTorch can store a 2:4 weight compressed (half the values plus 2-bit
metadata) and multiply it with cuSPARSELt or CUTLASS kernels. :func:`to_semi_structured` swaps the weights of every
eligible ``nn.Linear`` for such a tensor and reports, per layer, what it did and why a layer stayed dense.

Works on any ``nn.Module`` (no transformers import). Nothing here touches CUDA at import; support is queried when
:func:`semi_structured_support` or :func:`to_semi_structured` is called. Where support is missing (CPU, an old GPU,
a torch without the feature) the model is left exactly as it was and the report says why.

A dense ``save_pretrained`` checkpoint of the pruned model remains the portable output: convert after loading.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger("sparsegpt_kernels")

#: Minimum compute capability with sparse tensor cores.
MIN_CAPABILITY = (8, 0)

# Used only when the running torch does not expose its own table (``_DTYPE_SHAPE_CONSTRAINTS``):
# (sparse_min_rows, sparse_min_cols) per dtype; both dimensions of the weight must be multiples of these.
_FALLBACK_CONSTRAINTS = {
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32), torch.int8: (16, 128)},
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
}


class ExportError(RuntimeError):
    """``strict=True`` and at least one selected layer could not be converted."""


def _accepts_deprecated_backend(fn):
    """Let ``fn`` take its ``kernels`` argument under the old keyword ``backend`` too, with a DeprecationWarning.

    The sparse kernels ("cusparselt", "cutlass") were once chosen with ``backend=``, the keyword that picks the pruning
    backend (torch, triton, cpp, cuda) of :func:`prune_layer`; callers that still pass it keep working. Passing both
    keywords raises ``TypeError``, as passing any argument twice does.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "backend" in kwargs:
            value = kwargs.pop("backend")
            if "kernels" in signature.bind_partial(*args, **kwargs).arguments:
                raise TypeError(f"{fn.__name__}() got both kernels= and its deprecated alias backend=; "
                                "pass only kernels=")
            warnings.warn(f"{fn.__name__}(backend=...) is deprecated; use kernels=... (same values)",
                          DeprecationWarning, stacklevel=2)
            kwargs["kernels"] = value
        return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Pattern validation
# ----------------------------------------------------------------------------------------------------------------
def nm_violations(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of groups of ``m`` consecutive input columns holding more than ``n`` non-zeros.

    ``weight`` is (out_features, in_features); groups run along the input (last) dimension, which is the dimension
    the sparse kernels compress. -0.0 counts as zero. ``in_features`` must be a multiple of ``m``.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M (N kept of every M), got {n}:{m}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(f"in_features={weight.shape[1]} is not a multiple of M={m}")
    nnz = (weight != 0).reshape(weight.shape[0], weight.shape[1] // m, m).sum(dim=-1)
    return int((nnz > n).sum())


def validate_nm(weight: torch.Tensor, n: int = 2, m: int = 4, *, raise_error: bool = False) -> bool:
    """True when every group of ``m`` consecutive input columns of ``weight`` has at most ``n`` non-zeros.

    "N kept of every M": a 1:4 weight is also a valid 2:4 weight, a 2:4 weight is not 1:4, and a 4:8 weight is
    usually not 2:4. With ``raise_error=True`` a violation (or an in_features that is not a multiple of ``m``)
    raises ``ValueError`` naming the first offending row and group instead of returning False.
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        if raise_error:
            raise ValueError(f"weight of shape {tuple(weight.shape)} cannot hold an {n}:{m} pattern along its "
                             f"input dimension (needs 2-D with in_features a multiple of {m})")
        return False
    bad = nm_violations(weight, n, m)
    if bad and raise_error:
        nnz = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
        row, grp = (int(v) for v in (nnz > n).nonzero()[0])
        raise ValueError(f"weight is not {n}:{m} along the input dimension: {bad} of {nnz.numel()} groups have more "
                         f"than {n} non-zeros (first: row {row}, columns {grp * m}..{grp * m + m - 1} have "
                         f"{int(nnz[row, grp])})")
    return bad == 0


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the sparse compressors need it: contiguous, with every -0.0 rewritten to +0.0.

    The CUTLASS compressor reads zeros by bit pattern, so a -0.0 in a pruned position looks like a third non-zero
    of its group and the conversion fails or silently keeps the wrong values. Returns a new tensor (never a view).
    """
    w = weight.detach()
    return torch.where(w == 0, torch.zeros((), dtype=w.dtype, device=w.device), w).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Support and constraints, queried from torch at run time
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SemiStructuredSupport:
    """Whether semi-structured sparse matmuls can run on a device, with which kernels and under which constraints.

    Attributes:
        available: conversion and matmul are supported here.
        reason: why not, when ``available`` is False ("" otherwise).
        kernels: "cusparselt" or "cutlass" (``None`` when unavailable).
        constraints: dtype -> (min_rows, min_cols); a weight's (out, in) must be multiples of these.
        device: the device queried.
    """

    available: bool
    reason: str = ""
    kernels: str | None = None
    constraints: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def backend(self) -> str | None:
        """Deprecated (warns): the old name of :attr:`kernels`, read-only."""
        warnings.warn("SemiStructuredSupport.backend is deprecated; use SemiStructuredSupport.kernels",
                      DeprecationWarning, stacklevel=2)
        return self.kernels


def semi_structured_class(kernels: str):
    """torch's semi-structured sparse tensor class of ``kernels`` ("cusparselt" or "cutlass"); ``None`` if absent."""
    name = "SparseSemiStructuredTensorCUSPARSELT" if kernels == "cusparselt" else "SparseSemiStructuredTensorCUTLASS"
    return getattr(torch.sparse, name, None)


def _constraints(kernels: str) -> dict:
    """dtype -> (min_rows, min_cols) of ``kernels``: torch's own table, or ours where the running torch has none."""
    cls = semi_structured_class(kernels)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) if cls is not None else None
    if not table:
        return dict(_FALLBACK_CONSTRAINTS[kernels])
    return {dt: (int(c.sparse_min_rows), int(c.sparse_min_cols)) for dt, c in table.items()}


def _cusparselt_available() -> bool:
    mod = getattr(torch.backends, "cusparselt", None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # noqa: BLE001 - a broken cuSPARSELt install means: use CUTLASS
        return False


@_accepts_deprecated_backend
def semi_structured_support(device: torch.device | str | None = None, kernels: str = "auto") -> SemiStructuredSupport:
    """Query (without converting anything) whether 2:4 semi-structured sparsity runs on ``device``.

    ``device``: default the current CUDA device, or the CPU without CUDA. ``kernels``: "auto" (cuSPARSELt when torch
    has it, else CUTLASS), "cusparselt" or "cutlass"; ``backend=`` is its deprecated alias.
    """
    if kernels not in ("auto", "cusparselt", "cutlass"):
        raise ValueError(f"kernels must be 'auto', 'cusparselt' or 'cutlass', got {kernels!r}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if not hasattr(torch.sparse, "to_sparse_semi_structured") or semi_structured_class("cutlass") is None:
        return SemiStructuredSupport(False, f"torch {torch.__version__} has no semi-structured sparse tensors",
                                     device=str(dev))
    if dev.type != "cuda":
        return SemiStructuredSupport(False, f"semi-structured sparse tensors need a CUDA GPU; device is {dev.type}",
                                     device=str(dev))
    if torch.version.hip is not None:
        return SemiStructuredSupport(False, "semi-structured sparse tensors are not supported on ROCm builds",
                                     device=str(dev))
    if not torch.cuda.is_available():
        return SemiStructuredSupport(False, "CUDA is not available", device=str(dev))
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        return SemiStructuredSupport(False, f"compute capability {cap[0]}.{cap[1]} has no sparse tensor cores "
                                            f"(needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+)", device=str(dev))
    if kernels == "auto":
        kernels = "cusparselt" if _cusparselt_available() else "cutlass"
    elif kernels == "cusparselt" and not _cusparselt_available():
        return SemiStructuredSupport(False, "this torch build has no cuSPARSELt", device=str(dev))
    return SemiStructuredSupport(True, "", kernels, _constraints(kernels), str(dev))


def keep_dense_reason(weight: torch.Tensor, support: SemiStructuredSupport) -> str | None:
    """Why this (out, in) weight must stay dense under ``support``, or ``None`` when it can be converted.

    Checks, in order: support, device, dtype (float16/bfloat16; float32 is refused even where CUTLASS takes it,
    because it would silently compute in TF32), shape multiples, the 2:4 pattern along the input dimension.
    """
    if not support.available:
        return f"unsupported: {support.reason}"
    if weight.dim() != 2:
        return f"weight is {weight.dim()}-D, not 2-D"
    if weight.device.type != "cuda":
        return f"weight is on {weight.device}, not on a CUDA device"
    if weight.dtype == torch.float32:
        return "float32 would run on the sparse kernels in TF32 only; cast the model to float16 or bfloat16 first"
    if weight.dtype not in support.constraints:
        names = ", ".join(str(d).replace("torch.", "") for d in support.constraints)
        return f"dtype {str(weight.dtype).replace('torch.', '')} not supported by {support.kernels} ({names})"
    min_r, min_c = support.constraints[weight.dtype]
    rows, cols = weight.shape
    if rows < min_r or rows % min_r or cols < min_c or cols % min_c:
        return (f"shape {rows}x{cols} (out x in) is not a multiple of {min_r}x{min_c} "
                f"required by {support.kernels} for {str(weight.dtype).replace('torch.', '')}")
    bad = nm_violations(weight, 2, 4)
    if bad:
        groups = rows * cols // 4
        return f"not 2:4 along the input dimension ({bad} of {groups} groups have more than 2 non-zeros)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerExport:
    name: str
    shape: tuple[int, int]
    dtype: str
    converted: bool
    reason: str | None = None


@dataclass
class ExportReport:
    """What :func:`to_semi_structured` did: one :class:`LayerExport` per selected ``nn.Linear``."""

    support: SemiStructuredSupport
    layers: list[LayerExport] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [x.name for x in self.layers if x.converted]

    @property
    def kept_dense(self) -> dict[str, str]:
        return {x.name: x.reason or "" for x in self.layers if not x.converted}

    @property
    def supported(self) -> bool:
        return self.support.available

    def __str__(self) -> str:
        head = (f"semi-structured export ({self.support.kernels} kernels): {len(self.converted)} of "
                f"{len(self.layers)} linear layers converted" if self.support.available else
                f"semi-structured export not supported here: {self.support.reason}; model left dense "
                f"({len(self.layers)} linear layers)")
        lines = [head]
        if self.support.available:
            lines += [f"  kept dense {name}: {why}" for name, why in self.kept_dense.items()]
        return "\n".join(lines)


#: One entry of a conversion plan: (module name, the layer, the support on its device, why it stays dense or None).
_Planned = tuple[str, nn.Linear, SemiStructuredSupport, str | None]


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _select_linears(model: nn.Module, layers: Iterable[str] | str | None) -> list[tuple[str, nn.Linear]]:
    """The (name, module) of every ``nn.Linear`` of ``model`` that ``layers`` (names or fnmatch patterns) selects."""
    patterns = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and _selected(name, patterns)]


def _count_owners(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many module attributes hold it; above 1 for tied weights, which must stay dense (swapping
    one holder's weight would untie it from the others)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def _query_support(named: list[tuple[str, nn.Linear]],
                   kernels: str) -> tuple[SemiStructuredSupport, dict[str, SemiStructuredSupport]]:
    """(the support the report describes, str(device) -> support for every device the selected weights are on).

    The report describes the first CUDA device holding a selected weight, else the device of any of them (the CPU
    when nothing is selected); every other device is queried once, in the order the layers come.
    """
    devices = {mod.weight.device for _, mod in named}
    cuda_devs = sorted((d for d in devices if d.type == "cuda"), key=str)
    query_dev = cuda_devs[0] if cuda_devs else (next(iter(devices)) if devices else torch.device("cpu"))
    support = semi_structured_support(query_dev, kernels=kernels)
    per_device = {str(query_dev): support}
    for _, mod in named:
        if str(mod.weight.device) not in per_device:
            per_device[str(mod.weight.device)] = semi_structured_support(mod.weight.device, kernels=kernels)
    return support, per_device


def _plan(named: list[tuple[str, nn.Linear]], owners: dict[int, int],
          per_device: dict[str, SemiStructuredSupport]) -> list[_Planned]:
    """Decide, before converting anything, which selected layers stay dense and why (``None``: convert it).

    In order: no support on the weight's device, a weight that is already semi-structured, a weight shared with
    another module, then :func:`keep_dense_reason` (device, dtype, shape, the 2:4 pattern).
    """
    plan = []
    for name, mod in named:
        w = mod.weight
        sup = per_device[str(w.device)]
        if not sup.available:
            reason = f"unsupported: {sup.reason}"
        elif isinstance(w, getattr(torch.sparse, "SparseSemiStructuredTensor", ())):
            reason = "already semi-structured"
        elif owners.get(id(w), 1) > 1:
            reason = "weight is shared with another module (tied weights)"
        else:
            reason = keep_dense_reason(w.detach(), sup)
        plan.append((name, mod, sup, reason))
    return plan


def _check_plan(plan: list[_Planned]) -> None:
    """``strict=True``: raise :class:`ExportError` naming the layers (the first 8) that the plan keeps dense."""
    bad = [(name, reason) for name, _, _, reason in plan if reason is not None]
    if bad:
        listing = "; ".join(f"{n}: {r}" for n, r in bad[:8])
        listing += f"; ... ({len(bad)} in all)" if len(bad) > 8 else ""
        raise ExportError(f"{len(bad)} selected linear layers cannot be converted: {listing}")


def _check_conversion(sparse: torch.Tensor, dense: torch.Tensor) -> str | None:
    """Multiply a small probe with the sparse and the dense weight; a reason when they disagree."""
    g = torch.Generator(device=dense.device).manual_seed(0)
    x = torch.randn(16, dense.shape[1], generator=g, device=dense.device, dtype=torch.float32).to(dense.dtype)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.float(), dense.float())
        got = torch.nn.functional.linear(x, sparse).float()
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max()) + 1e-6
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dense.dtype, 1e-3)
    if not err <= tol * scale:
        return f"conversion check failed: probe output differs by {err:.3g} (|y|max {scale:.3g})"
    return None


def _convert(w: torch.Tensor, sup: SemiStructuredSupport, verify: bool) -> tuple[torch.Tensor | None, str | None]:
    """(the semi-structured copy of ``w``, None), or (None, why it could not be made)."""
    dense = prepare_weight(w)
    try:
        sparse = semi_structured_class(sup.kernels).from_dense(dense)
        reason = _check_conversion(sparse, dense) if verify else None
    except (RuntimeError, NotImplementedError) as e:
        sparse, reason = None, f"conversion failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (sparse, None) if reason is None else (None, reason)


def _layer_export(name: str, w: torch.Tensor, reason: str | None) -> LayerExport:
    """The report line of a layer whose weight (before any swap) is ``w``: converted when ``reason`` is None."""
    shape = (int(w.shape[0]), int(w.shape[1])) if w.dim() == 2 else tuple(int(s) for s in w.shape)
    return LayerExport(name, shape, str(w.dtype).replace("torch.", ""), reason is None, reason)


def _convert_planned(plan: list[_Planned], *, strict: bool, verify: bool) -> list[LayerExport]:
    """Convert (and with ``verify`` check) every layer the plan converts, swap the copies in, and report every layer.

    In strict mode nothing is swapped until every conversion has succeeded, so a failure late in the model raises
    :class:`ExportError` and leaves it untouched (the converted copies are held meanwhile: up to ~0.6x the selected
    weights in extra memory). Otherwise each layer is swapped as soon as it is converted, and a failed one stays dense.
    """
    staged, done = [], []
    for name, mod, sup, reason in plan:
        w = mod.weight
        sparse = None
        if reason is None:
            sparse, reason = _convert(w, sup, verify)
        if strict and reason is not None:
            raise ExportError(f"{name}: {reason}; no layer was converted")
        if sparse is not None:
            if strict:
                staged.append((mod, sparse))
            else:
                _swap_in(mod, sparse)
        done.append(_layer_export(name, w, reason))
    for mod, sparse in staged:
        _swap_in(mod, sparse)
    return done


@_accepts_deprecated_backend
def to_semi_structured(model: nn.Module, *, layers: Iterable[str] | str | None = None, strict: bool = False,
                       kernels: str = "auto", verify: bool = True) -> ExportReport:
    """Swap the weights of 2:4-pruned ``nn.Linear`` layers of ``model`` for semi-structured sparse tensors, in place.

    Args:
        model: any module; every ``nn.Linear`` in it (or those named by ``layers``) is considered.
        layers: module names or fnmatch patterns (e.g. ``"model.layers.*.mlp.*"``); default: all linear layers.
        strict: raise :class:`ExportError` (before changing anything) when a selected layer cannot be converted.
        kernels: "auto", "cusparselt" or "cutlass" (see :func:`semi_structured_support`); ``backend=`` is its
            deprecated alias.
        verify: after converting a layer, compare a small probe product with the dense weight and keep the layer
            dense on mismatch.

    Returns:
        :class:`ExportReport`. Layers that are not 2:4 along the input dimension, have shapes or dtypes the kernels
        do not take, or share their weight with another module (tied embeddings) stay dense, with the reason. Where
        semi-structured sparsity is not supported at all the model is not modified.

    The converted weights are frozen (``requires_grad=False``); the model is for inference. Convert after moving the
    model to its device and dtype.
    """
    named = _select_linears(model, layers)
    owners = _count_owners(model)
    support, per_device = _query_support(named, kernels)
    plan = _plan(named, owners, per_device)
    if strict:
        _check_plan(plan)
    report = ExportReport(support=support, layers=_convert_planned(plan, strict=strict, verify=verify))
    if not support.available:
        logger.warning("sparsegpt_kernels: %s", str(report).splitlines()[0])
    return report


_HOOK_ATTR = "_sparsegpt_kernels_input_hook"


def _canonical_input(module: nn.Module, args: tuple):
    """Forward pre-hook of a converted layer: give a 3-D or higher input the strides of a contiguous tensor.

    ``F.linear`` on an N-D input goes through ``matmul``, which folds it into one ``mm`` only when its leading
    dimensions can be merged by a view; otherwise it expands the weight for a ``bmm``, and the semi-structured tensor
    has no ``expand``. A tensor that ``is_contiguous()`` can still fail that test through the stride of a size-1
    dimension: ``hidden[:, -1:, :]`` (the last position of a sequence), or what a decode step's attention returns.
    For a contiguous tensor, only the strides of its size-1 dimensions can differ from the canonical ones, so the
    re-strided view addresses the same elements; anything else is made contiguous (a copy) first.
    """
    x = args[0] if args else None  # called with the input as a keyword: left as it is
    if not isinstance(x, torch.Tensor) or x.dim() <= 2:
        return None
    x = x.contiguous()
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= max(int(size), 1)
    strides.reverse()
    if list(x.stride()) != strides:
        x = x.as_strided(x.shape, strides)
    return (x, *args[1:])


def _swap_in(mod: nn.Module, sparse: torch.Tensor) -> None:
    mod.weight = nn.Parameter(sparse, requires_grad=False)
    if getattr(mod, _HOOK_ATTR, None) is None:
        setattr(mod, _HOOK_ATTR, mod.register_forward_pre_hook(_canonical_input))


def to_dense(model: nn.Module) -> int:
    """Give ``model`` plain dense linear layers again: undo :func:`to_semi_structured` (every semi-structured weight
    back to its dense tensor) and :func:`sparsegpt_kernels.to_sparse` (every
    :class:`~sparsegpt_kernels.SparseLinear` back to an ``nn.Linear`` with the same bits). Returns how many layers
    changed. The result saves with ``save_pretrained`` as a checkpoint any tool reads."""
    from .sparse.checkpoint import sparse_to_dense

    count = sparse_to_dense(model)
    cls = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    if cls is None:
        return count
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and isinstance(w, cls):
            mod.weight = nn.Parameter(w.to_dense(), requires_grad=False)
            handle = getattr(mod, _HOOK_ATTR, None)
            if handle is not None:
                handle.remove()
                delattr(mod, _HOOK_ATTR)
            count += 1
    return count
