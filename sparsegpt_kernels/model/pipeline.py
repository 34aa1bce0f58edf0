"""Model-level SparseGPT: :func:`prune_model` prunes a transformers causal LM in place, block by block.

The steps, one module each: :mod:`.plan` checks every option and lists what each block prunes; :mod:`.calibration`
prepares the token ids; :mod:`.blocks` captures what block 0 receives (hidden states and every keyword argument);
:mod:`.checkpoint` resumes a killed run; per block, :mod:`.prune_block` collects the Hessians (:mod:`.hessians`) and
prunes each layer; the pruned block then produces the next block's inputs. :mod:`.report` holds the results.
docs/algorithm.md, "Model-level flow", describes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..backends.extension import release_cpu_cache
from ..checks import count_nonzero
from .allocation import OWL_LAMBDA, OWL_M, allocate, check_allocation
from .allocation import apply as apply_allocation
from .blocks import call_block, capture_block_inputs, map_tensors
from .calibration import prepare_calibration
from .checkpoint import Checkpoint, fingerprint
from .distributed import DistContext
from .hessians import HessianCollector
from .plan import METHODS, PrunePlan, build_plan
from .prune_block import LayerOptions, progress_bar, prune_block
from .report import LayerReport, PruneReport
from .timing import Timings

__all__ = ["METHODS", "LayerReport", "PruneReport", "prepare_calibration", "prune_model"]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration=None,
    *,
    sparsity: float = 0.5,
    pattern: str | None = None,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    method: str = "sparsegpt",
    blocks: Iterable[int] | None = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    layer_sparsity: Mapping[str, float | str] | None = None,
    true_sequential: bool = False,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    tokenizer=None,
    device: torch.device | str | None = None,
    offload: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    backend: str = "auto",
    progress: bool = False,
    on_block_end: Callable[[int, list[LayerReport]], None] | None = None,
    process_group=None,
    weight_source=None,
    allocation: str = "uniform",
    owl_m: float = OWL_M,
    owl_lambda: float = OWL_LAMBDA,
) -> PruneReport:
    """Prune a transformers causal LM in place, block by block, with SparseGPT (or a baseline).

    Args:
        model: a causal LM (``...ForCausalLM``); it may stay on the CPU: one block at a time moves to ``device``.
        calibration: (nsamples, seqlen) token ids (a tensor, a list of 1-D tensors or a dict with ``input_ids``) or
            text with ``tokenizer``; not needed for ``method="magnitude"``.
        sparsity: unstructured sparsity in [0, 1); ignored when ``pattern`` ("N:M", N kept of every M) is given.
        quant_bits, quant_group_size: joint quantization (see :func:`prune_layer`).
        method: "sparsegpt", "wanda" or "magnitude".
        blocks: indices of the decoder blocks to prune (default: all).
        include, exclude: glob patterns on layer names, full ("model.layers.3.mlp.up_proj") or relative to the block
            ("mlp.up_proj"); a layer is pruned if it matches an ``include`` pattern (default: all) and no ``exclude``.
        layer_sparsity: glob pattern → sparsity (float or "50%") or "N:M", overriding the default; first match wins.
        true_sequential: re-run the block between groups of layers (q/k/v, o, gate/up, down), so each group's
            Hessian sees the outputs of the already-pruned groups before it.
        nsamples, seqlen, seed: calibration count and length (a subset of given ids, or windows drawn from text).
        device: where blocks are processed (default: CUDA if available, else the CPU).
        offload: keep calibration activations on the CPU (``None``: only when they do not fit on ``device``).
        checkpoint_dir: save the state after every block; a rerun with the same settings resumes there.
        block_size, damp, backend: passed to :func:`prune_layer`.
        progress: tqdm bars per block and layer on stderr.
        on_block_end: called with (block index, its layer reports) after each block has been checkpointed.
        process_group: inside an initialised ``torch.distributed`` process group (``torchrun``), the processes share
            the work of every block (:mod:`sparsegpt_kernels.model.distributed`): each one runs its share of the
            calibration samples, each set of layers sharing a Hessian is pruned by one of them, and every process ends
            with the same pruned model and report. Default: the default group when one is initialised. Every
            process must call ``prune_model`` with the same arguments and calibration data (checked).
        weight_source: where the blocks' weights come from and go to when they do not all live in ``model``
            (:class:`sparsegpt_kernels.model.streaming.StreamedWeights`, made by :func:`prune_checkpoint`).
        allocation: how ``sparsity`` is spread over the layers: "uniform" (every layer the same), "owl" (blocks with
            more outlier weights pruned less; ``owl_m``, ``owl_lambda``) or "error" (per-layer sparsities that minimise
            the summed relative OBS loss measured with the solver); see :mod:`sparsegpt_kernels.model.allocation`.
            The parameter-weighted sparsity stays ``sparsity``; ``layer_sparsity`` overrides are kept.

    Returns:
        :class:`PruneReport`. Bad input (no decoder blocks, empty calibration, too long sequences, a pattern that
        does not divide a layer's width, ...) raises before any weight changes.
    """
    t_start = time.perf_counter()
    # 1. The plan: every option checked against the model, and the calibration ids against it, before any change.
    plan = build_plan(model, method=method, sparsity=sparsity, pattern=pattern, quant_bits=quant_bits,
                      quant_group_size=quant_group_size, blocks=blocks, include=include, exclude=exclude,
                      layer_sparsity=layer_sparsity, block_size=block_size)
    opts = LayerOptions(method=method, quant_bits=quant_bits, quant_group_size=quant_group_size,
                        block_size=block_size, damp=damp, backend=backend)
    dist_ctx = DistContext.current(process_group)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    check_allocation(allocation, plan)
    settings = _settings_record(plan, opts, true_sequential, seed)
    if allocation != "uniform":
        settings.update(allocation=allocation, owl_m=owl_m, owl_lambda=owl_lambda)
    report = PruneReport(method=method, settings=settings, processes=1 if dist_ctx is None else dist_ctx.world)
    timings = Timings(dev)
    needs_data = method != "magnitude"
    ids = None
    if needs_data or allocation != "uniform":
        if calibration is None:
            raise ValueError(f"method {method!r} (allocation {allocation!r}) needs calibration data")
        with timings.phase("calibration"):
            ids = prepare_calibration(model, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                      tokenizer=tokenizer)
        settings.update(nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]))

    if allocation != "uniform":
        if dist_ctx is not None or weight_source is not None:
            raise ValueError(f"allocation={allocation!r} runs in one process on a model held in memory")
        with timings.phase("allocation"):
            targets = allocate(model, plan, ids, dev, allocation=allocation, opts=opts, owl_m=owl_m,
                               owl_lambda=owl_lambda, progress=progress)
        apply_allocation(plan, targets)
        settings["allocated"] = {f"{plan.prefix}.{b}.{n}": s for (b, n), s in sorted(targets.items())}
    run_id = fingerprint(settings, model, len(plan.layers), ids)
    local_ids = ids
    if dist_ctx is not None:
        dist_ctx.check_same("arguments or calibration data", run_id)
        if ids is not None:
            local_ids = ids[dist_ctx.shard(ids.shape[0])]

    # 2. Resume: the blocks a checkpoint already holds are loaded back.
    ckpt = state = None
    if checkpoint_dir is not None:
        ckpt = Checkpoint(checkpoint_dir, run_id, dist_ctx, keep_weights=weight_source is None)
        state = ckpt.load()

    was_training = model.training
    model.eval()
    cfg = getattr(model, "config", None)
    old_use_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_use_cache is not None:
        cfg.use_cache = False
    try:
        start, prior_seconds = 0, 0.0
        if state is not None:
            start, prior_seconds = int(state["next_block"]), float(state["seconds"])
            report.resumed_from_block = start
            report.layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in state["reports"]]
            for b in range(start):
                if b in plan.items and weight_source is None:  # streamed blocks are in the output already
                    plan.layers[b].load_state_dict(ckpt.block_weights(b))

        # 3. The activations entering the first block to do (captured, or from the checkpoint).
        inputs, acts, store = None, [], dev
        if needs_data and start <= plan.last:
            if weight_source is not None:
                weight_source.ensure(0)  # the capture runs block 0 once
            with timings.phase("forward"):
                inputs, acts, store = _first_activations(model, plan, local_ids, state, ckpt, dev, offload)
            if weight_source is not None and start > 0:
                weight_source.drop(0)

        # 4. Block by block: prune its layers, then run the pruned block to make the next block's inputs.
        for b in progress_bar(range(start, plan.last + 1), desc="blocks", total=plan.last + 1 - start,
                              enabled=progress):
            if weight_source is not None:
                weight_source.ensure(b)
            block = plan.layers[b]
            home = _block_device(block)
            block.to(dev)
            kw = map_tensors(inputs.kwargs[b], lambda t: t.to(dev)) if inputs is not None else {}
            run = BlockRunner(block, kw, acts, dev, store)
            block_reports = []
            if b in plan.items:
                block_reports = prune_block(f"{plan.prefix}.{b}", plan.items[b], opts, run, dev,
                                            true_sequential=true_sequential, progress=progress, dist_ctx=dist_ctx,
                                            timings=timings)
                report.layers.extend(block_reports)
            if needs_data and b < plan.last:
                with timings.phase("forward"):
                    acts = run.outputs()
            block.to(home)
            if weight_source is not None:
                weight_source.release(b)
            if ckpt is not None:
                ckpt.save(b, block, acts if (needs_data and b < plan.last) else None, report.layers,
                          prior_seconds + time.perf_counter() - t_start)
            if on_block_end is not None:
                on_block_end(b, block_reports)
        report.blocks_pruned = plan.blocks
        if weight_source is None:
            report.model_params, report.model_zeros = _count_zeros(model)
        report.seconds = prior_seconds + time.perf_counter() - t_start
        report.timings = timings.split(time.perf_counter() - t_start)  # this process, this run (not resumed parts)
        return report
    finally:
        if cfg is not None and old_use_cache is not None:
            cfg.use_cache = old_use_cache
        model.train(was_training)
        release_cpu_cache()  # the cpp backend's idle buffers, kept from layer to layer


def _settings_record(plan: PrunePlan, opts: LayerOptions, true_sequential: bool, seed: int) -> dict:
    """The settings of a run as the report and the checkpoint fingerprint record them."""
    return {
        "method": opts.method, "sparsity": plan.default.sparsity, "pattern": plan.default.pattern,
        "quant_bits": opts.quant_bits, "quant_group_size": opts.quant_group_size, "blocks": plan.blocks,
        "include": plan.include, "exclude": plan.exclude,
        "layer_sparsity": {p: {"sparsity": s.sparsity, "pattern": s.pattern} for p, s in plan.overrides},
        "true_sequential": bool(true_sequential), "block_size": opts.block_size, "damp": opts.damp, "seed": seed,
    }


def _count_zeros(model: nn.Module) -> tuple[int, int]:
    """(parameters, zeros) over the whole model, every parameter once (tied embeddings are one tensor)."""
    params = zeros = 0
    for p in model.parameters():  # deduplicated by identity
        params += p.numel()
        zeros += p.numel() - count_nonzero(p)
    return params, zeros


def _block_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


def _fits_on_device(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


def _first_activations(model, plan: PrunePlan, ids, state, ckpt, dev, offload):
    """(block inputs, the hidden states entering the first block to do, where activations are kept)."""
    resumed_acts = state is not None and state.get("acts")
    inputs = capture_block_inputs(model, plan.layers, ids, keep_hidden=not resumed_acts)
    if resumed_acts:
        acts = list(ckpt.activations(state["acts"]).split(1))
    else:
        acts, inputs.hidden = inputs.hidden, []
    nbytes = 2 * sum(a.numel() * a.element_size() for a in acts)
    store = torch.device("cpu") if (offload or (offload is None and not _fits_on_device(dev, nbytes))) else dev
    return inputs, [a.to(store) for a in acts], store


class BlockRunner:
    """Runs one block over the calibration activations: with a Hessian collector's hooks (``runner(collector)``),
    or to produce the next block's inputs (:meth:`outputs`)."""

    def __init__(self, block: nn.Module, kwargs: dict, acts: list[torch.Tensor], device: torch.device,
                 store: torch.device):
        self.block, self.kwargs, self.acts, self.device, self.store = block, kwargs, acts, device, store

    def __call__(self, collector: HessianCollector | None = None) -> None:
        for a in self.acts:
            call_block(self.block, a.to(self.device), self.kwargs)
            if collector is not None:
                collector.end_pass()

    def outputs(self) -> list[torch.Tensor]:
        return [call_block(self.block, a.to(self.device), self.kwargs).to(self.store) for a in self.acts]
