"""One decoder block: collect its layers' Hessians on the calibration activations, then prune each layer with
SparseGPT (or a baseline). The block loop of :func:`sparsegpt_kernels.prune_model` calls :func:`prune_block` once per
block; how the block is run on the activations comes from the caller (``run_block``), and with several processes
the work is shared as :mod:`.distributed` describes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..api import prune_layer
from ..hessian import HessianAccumulator
from ..settings import Setting
from . import baselines
from .blocks import PrunableLayer
from .distributed import DistContext
from .hessians import HessianCollector
from .report import LayerReport
from .timing import Timings


@dataclass(frozen=True)
class LayerOptions:
    """Options passed to every layer's pruning (see :func:`sparsegpt_kernels.prune_layer`)."""

    method: str = "sparsegpt"
    quant_bits: int | None = None
    quant_group_size: int | None = None
    block_size: int = 128
    damp: float = 0.01
    backend: str = "auto"


def progress_bar(iterable, *, desc: str, total: int | None = None, enabled: bool, leave: bool = True, position=0):
    """``iterable`` wrapped in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is not worth failing for
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, position=position, dynamic_ncols=True)


def layer_cost(t: PrunableLayer) -> float:
    """Rough FLOPs of pruning one layer: the Cholesky (⅓c³) and the lazy updates (r·c²)."""
    rows, cols = t.shape
    return cols**3 / 3 + rows * cols**2


def prune_block(prefix: str, items: list[tuple[PrunableLayer, Setting]], opts: LayerOptions,
                run_block: Callable[[HessianCollector | None], object], device: torch.device, *,
                true_sequential: bool = False, progress: bool = False,
                dist_ctx: DistContext | None = None, timings: Timings | None = None) -> list[LayerReport]:
    """Prune the (layer, setting) ``items`` of the block named ``prefix``; returns their reports in ``items`` order.

    ``run_block(collector)`` runs the dense block over this process's calibration batches with ``collector``'s hooks
    in place (calling ``collector.end_pass()`` after each batch). With ``dist_ctx`` (several processes), each set of
    layers sharing a Hessian is pruned by one owner process after the partial Hessians are reduced to it, and the
    pruned weights and the reports are then shared by every process (:mod:`.distributed`). ``timings`` gets the
    forward, Hessian, solve and communication time (:mod:`.timing`).
    """
    timings = timings if timings is not None else Timings(device)
    setting = {id(t): s for t, s in items}
    targets = [t for t, _ in items]
    by_name = {t.name: t for t in targets}
    reports: dict[str, LayerReport] = {}

    def prune(ts: list[PrunableLayer], acc: dict[str, HessianAccumulator]):
        for t in progress_bar(ts, desc=prefix.rsplit(".", 1)[-1].join(("block ", "")), enabled=progress,
                              leave=False, position=1):
            with timings.phase("solves"):
                reports[t.name] = prune_one(f"{prefix}.{t.name}", t, setting[id(t)], opts, acc.get(t.name))

    def prune_shared(ts: list[PrunableLayer], acc: dict[str, HessianAccumulator]):
        if dist_ctx is None:
            prune(ts, acc)
            return
        comm0 = dist_ctx.comm_seconds
        # units: the layers sharing one accumulator (or each layer, without Hessians), in a fixed order
        units: list[list[str]] = []
        index: dict[int, int] = {}
        for t in ts:
            key = id(acc[t.name]) if t.name in acc else id(t)
            if key not in index:
                index[key] = len(units)
                units.append([])
            units[index[key]].append(t.name)
        owners = dist_ctx.assign([sum(layer_cost(by_name[n]) for n in unit) for unit in units])
        comm: dict[str, float] = {}
        for unit, owner in zip(units, owners):
            if unit[0] in acc:
                c0 = dist_ctx.comm_seconds
                dist_ctx.reduce_hessian(acc[unit[0]], owner)
                comm.update({n: (dist_ctx.comm_seconds - c0) / len(unit) for n in unit})
        own = [n for unit, owner in zip(units, owners) if owner == dist_ctx.rank for n in unit]
        prune([by_name[n] for n in own], acc)
        for unit, owner in zip(units, owners):
            for n in unit:
                c0 = dist_ctx.comm_seconds
                dist_ctx.broadcast(by_name[n].weight(), owner)
                comm[n] = comm.get(n, 0.0) + dist_ctx.comm_seconds - c0
        # every process gets every report, as the owner saw it (its compute and communication times)
        shared = {n: {**asdict(reports[n]), "rank": dist_ctx.rank, "comm_seconds": comm.get(n, 0.0)} for n in own}
        for theirs in dist_ctx.gather(shared):
            for n, rep in theirs.items():
                reports[n] = LayerReport(**{**rep, "shape": tuple(rep["shape"])})
        timings.add("communication", dist_ctx.comm_seconds - comm0)

    def collect(ts: list[PrunableLayer]) -> HessianCollector:
        t0 = timings.now()
        with HessianCollector(ts, device) as col:
            run_block(col)
        elapsed = timings.now() - t0
        timings.add("hessians", col.seconds)
        timings.add("forward", elapsed - col.seconds)
        return col

    if opts.method == "magnitude":
        prune_shared(targets, {})
    else:
        col = collect(targets)
        missing = [t.name for t in targets if t.name not in col.acc]
        if missing:
            raise RuntimeError(f"{prefix}: layers {missing} never ran during the block's forward pass")
        if not true_sequential:
            prune_shared(targets, col.acc)
        else:
            for g, names in enumerate(col.groups):
                ts = [by_name[n] for n in names]
                prune_shared(ts, col.acc if g == 0 else collect(ts).acc)
    return [reports[t.name] for t in targets]


def prune_one(full: str, t: PrunableLayer, s: Setting, opts: LayerOptions,
              acc: HessianAccumulator | None) -> LayerReport:
    """Prune one weight matrix with ``opts.method`` at setting ``s``, given its Hessian (none for magnitude)."""
    W = t.weight()
    method = opts.method
    common = dict(name=full, shape=tuple(W.shape), method=method, pattern=s.pattern, target_sparsity=s.sparsity,
                  quant_bits=opts.quant_bits, tokens=0 if acc is None else acc.count)
    if method != "magnitude" and (acc is None or acc.count == 0):
        return LayerReport(loss=None, sparsity=float((W == 0).sum()) / W.numel(), damp=0.0, seconds=0.0,
                           backend="-", skipped="no calibration tokens reached this layer", mask_sparsity=0.0, **common)
    t0 = time.perf_counter()
    quant = dict(quant_bits=opts.quant_bits, quant_group_size=opts.quant_group_size)
    if method == "sparsegpt":
        r = prune_layer(W, acc.hessian.to(W.device), sparsity=s.sparsity, pattern=s.pattern,
                        block_size=opts.block_size, damp=opts.damp, backend=opts.backend, **quant)
        return LayerReport(loss=r.loss, sparsity=r.sparsity, damp=r.damp, seconds=r.seconds, backend=r.backend,
                           mask_sparsity=r.mask_sparsity, **common)
    if method == "wanda":
        sp = baselines.wanda_prune_(W, acc.hessian.diagonal(), sparsity=s.sparsity, pattern=s.pattern, **quant)
    else:
        sp = baselines.magnitude_prune_(W, sparsity=s.sparsity, pattern=s.pattern, **quant)
    mask = baselines.mask_fraction(tuple(W.shape), sparsity=s.sparsity, pattern=s.pattern, per_row=method == "wanda")
    return LayerReport(loss=None, sparsity=sp, damp=0.0, seconds=time.perf_counter() - t0, backend=method,
                       mask_sparsity=mask, **common)
