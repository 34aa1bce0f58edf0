"""One decoder block: collect its layers' Hessians on the calibration activations, then prune each layer with
SparseGPT (or a baseline). The block loop of :func:`sparsegpt_kernels.prune_model` calls :func:`prune_block` once per
block; how the block is run on the activations comes from the caller (``run_block``), and with several processes
the work is shared as :mod:`.distributed` describes (:func:`.distributed.prune_shared`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import reference
from ..api import prune_layer_with
from ..hessian import HessianAccumulator
from ..options import PruneOptions, Setting
from . import baselines
from .blocks import PrunableLayer
from .distributed import DistContext, prune_shared
from .hessian_hooks import HessianCollector
from .progress import progress_bar
from .report import LayerReport
from .timing import Timings


def prune_block(prefix: str, items: list[tuple[PrunableLayer, Setting]], opts: PruneOptions,
                run_block: Callable[[HessianCollector | None], object], device: torch.device, *,
                true_sequential: bool = False, progress: bool = False,
                dist_ctx: DistContext | None = None, timings: Timings | None = None) -> list[LayerReport]:
    """Prune the (layer, setting) ``items`` of the block named ``prefix``; returns their reports in ``items`` order.

    ``run_block(collector)`` runs the dense block over this process's calibration batches with ``collector``'s hooks
    in place (calling ``collector.end_pass()`` after each batch). With ``dist_ctx`` (several processes), each set of
    layers sharing a Hessian is pruned by one owner process (:func:`.distributed.prune_shared`). ``timings`` gets the
    forward, Hessian, solve and communication time (:mod:`.timing`).
    """
    timings = timings if timings is not None else Timings(device)
    setting = {id(t): s for t, s in items}
    targets = [t for t, _ in items]
    by_name = {t.name: t for t in targets}
    reports: dict[str, LayerReport] = {}

    def prune(ts: list[PrunableLayer], acc: dict[str, HessianAccumulator]) -> None:
        for t in progress_bar(ts, desc=prefix.rsplit(".", 1)[-1].join(("block ", "")), enabled=progress,
                              leave=False, position=1):
            with timings.phase("solves"):
                reports[t.name] = prune_one(f"{prefix}.{t.name}", t, setting[id(t)], opts, acc.get(t.name))

    def prune_group(ts: list[PrunableLayer], acc: dict[str, HessianAccumulator]) -> None:
        if dist_ctx is None:
            prune(ts, acc)
        else:
            prune_shared(dist_ctx, ts, acc, prune, reports, timings)

    def collect(ts: list[PrunableLayer]) -> HessianCollector:
        t0 = timings.now()
        with HessianCollector(ts, device, opts.hessian_products) as col:
            run_block(col)
        elapsed = timings.now() - t0
        timings.add("hessians", col.seconds)
        timings.add("forward", elapsed - col.seconds)
        return col

    if opts.method == "magnitude":
        prune_group(targets, {})
    else:
        col = collect(targets)
        missing = [t.name for t in targets if t.name not in col.acc]
        if missing:
            raise RuntimeError(f"{prefix}: layers {missing} never ran during the block's forward pass")
        if not true_sequential:
            prune_group(targets, col.acc)
        else:
            for g, names in enumerate(col.groups):
                ts = [by_name[n] for n in names]
                prune_group(ts, col.acc if g == 0 else collect(ts).acc)
    return [reports[t.name] for t in targets]


def _skip_reason(acc: HessianAccumulator | None) -> str | None:
    """Why a layer cannot be pruned with its Hessian: no calibration token reached it, or only zeros did (an all-zero
    Hessian makes every column dead, which would zero the whole weight)."""
    if acc is None or acc.count == 0:
        return "no calibration tokens reached this layer"
    if not bool(acc.hessian.diagonal().any()):
        return "every calibration input of this layer was zero"
    return None


def prune_one(full: str, t: PrunableLayer, s: Setting, opts: PruneOptions,
              acc: HessianAccumulator | None) -> LayerReport:
    """Prune one weight matrix with ``opts.method`` at setting ``s``, given its Hessian (none for magnitude)."""
    W = t.weight()
    lo = opts.at(s)
    method = opts.method
    common = dict(name=full, shape=tuple(W.shape), method=method, pattern=s.pattern, target_sparsity=s.sparsity,
                  quant_bits=opts.quant_bits, tokens=0 if acc is None else acc.count)
    skipped = _skip_reason(acc) if method != "magnitude" else None
    if skipped is not None:
        return LayerReport(loss=None, sparsity=float((W == 0).sum()) / W.numel(), damp=0.0, seconds=0.0,
                           backend="-", skipped=skipped, mask_sparsity=0.0, **common)
    t0 = time.perf_counter()
    if method == "sparsegpt":
        r = prune_layer_with(W, acc.hessian.to(W.device), lo)
        mark_pruned(t, lo.pattern, r.quant_grid)
        return LayerReport(loss=r.loss, sparsity=r.sparsity, damp=r.damp, seconds=r.seconds, backend=r.backend,
                           mask_sparsity=r.mask_sparsity, refine=r.refine, **common)
    quant = dict(quant_bits=lo.quant_bits, quant_group_size=lo.quant_group_size)
    which = dict(sparsity=lo.sparsity, pattern=lo.pattern, **quant)
    if method == "wanda":
        sp = baselines.wanda_prune_(W, acc.hessian.diagonal(), **which)
    else:
        sp = baselines.magnitude_prune_(W, **which)
    mark_pruned(t, lo.pattern, None)
    mask = reference.mask_fraction(*W.shape, sparsity=lo.fraction, nm=lo.nm,
                                   per="row" if method == "wanda" else "matrix")
    return LayerReport(loss=None, sparsity=sp, damp=0.0, seconds=time.perf_counter() - t0, backend=method,
                       mask_sparsity=mask, **common)


#: the attribute of a pruned linear module that says how it was pruned (:func:`sparsegpt_kernels.to_sparse` reads it)
PRUNED_ATTR = "sparsegpt_kernels_pruned"


def mark_pruned(t: PrunableLayer, pattern: str | None, grid) -> None:
    """Record on a pruned linear module its N:M pattern and, with joint quantization, the grid its weights are on (a
    compressed checkpoint stores the integer codes from it); experts of fused modules are not marked."""
    if t.expert is None:
        setattr(t.module, PRUNED_ATTR, {"pattern": pattern, "quant": grid})
