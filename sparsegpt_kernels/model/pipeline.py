"""Model-level SparseGPT: :func:`prune_model` prunes a transformers causal LM in place, block by block.

The steps, one module each: :mod:`.plan` lists what each block prunes (the settings are a
:class:`~sparsegpt_kernels.options.PruneOptions`, checked when it is made); :mod:`.calibration` prepares the token ids;
:mod:`.allocation` spreads a global sparsity over the layers when asked; :mod:`.checkpoint` resumes a killed run;
:mod:`.blocks` captures what block 0 receives (hidden states and every keyword argument); :mod:`.block_loop` walks the
blocks, and per block :mod:`.prune_block` collects the Hessians (:mod:`.hessian_hooks`) and prunes each layer; the
pruned block then produces the next block's inputs. :mod:`.report` holds the results. docs/algorithm.md,
"Model-level flow", describes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..backends.extension import release_cpu_cache
from ..options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    DEFAULT_REFINE_CG_ITERS,
    DEFAULT_REFINE_ITERS,
    DEFAULT_REFINE_TOL,
    METHODS,
    OWL_LAMBDA,
    OWL_M,
    PruneOptions,
)
from .allocation import allocate
from .allocation import apply as apply_allocation
from .block_loop import InMemoryWeights, run_blocks
from .blocks import capture_block_inputs
from .calibration import prepare_calibration
from .checkpoint import Checkpoint, fingerprint
from .distributed import DistContext
from .plan import PrunePlan, build_plan
from .prune_block import prune_block
from .report import LayerReport, PruneReport
from .timing import Timings

__all__ = ["METHODS", "LayerReport", "PruneReport", "prepare_calibration", "prune_model"]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration=None,
    *,
    sparsity: float | None = None,
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
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    backend: str = "auto",
    progress: bool = False,
    on_block_end: Callable[[int, list[LayerReport]], None] | None = None,
    process_group=None,
    allocation: str = "uniform",
    owl_m: float = OWL_M,
    owl_lambda: float = OWL_LAMBDA,
    refine: str = "none",
    refine_iters: int = DEFAULT_REFINE_ITERS,
    refine_cg_iters: int = DEFAULT_REFINE_CG_ITERS,
    refine_tol: float = DEFAULT_REFINE_TOL,
    refine_mask: str = "move",
    hessian_products: str = "float32",
) -> PruneReport:
    """Prune a transformers causal LM in place, block by block, with SparseGPT (or a baseline).

    Args:
        model: a causal LM (``...ForCausalLM``); it may stay on the CPU: one block at a time moves to ``device``.
        calibration: (nsamples, seqlen) token ids (a tensor, a list of 1-D tensors or a dict with ``input_ids``) or
            text with ``tokenizer``; not needed for ``method="magnitude"``.
        sparsity: unstructured sparsity in [0, 1) (default 0.5); not together with ``pattern`` ("N:M", N kept of
            every M).
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
        allocation: how ``sparsity`` is spread over the layers: "uniform" (every layer the same), "owl" (blocks with
            more outlier weights pruned less; ``owl_m``, ``owl_lambda``) or "error" (per-layer sparsities that minimise
            the summed relative OBS loss measured with the solver); see :mod:`sparsegpt_kernels.model.allocation`.
            The parameter-weighted sparsity stays ``sparsity``; ``layer_sparsity`` overrides are kept.
        refine, refine_iters, refine_cg_iters, refine_tol, refine_mask: weight refinement after SparseGPT's sweep
            (see :func:`prune_layer`; method "sparsegpt" only); each layer's report has the loss before and after and
            the iterations (``LayerReport.refine``). The allocation measures SparseGPT's losses without it.
        hessian_products: "float32" (default: the activations cast to float32 before the Hessian's products) or
            "input" (bfloat16 / float16 activations on a CUDA device multiplied on its tensor cores with float32
            accumulation; the products are the same, exact in float32, only the order of the sums changes; on a CPU
            or with float32 activations the same as "float32"). See :data:`sparsegpt_kernels.options.HESSIAN_PRODUCTS`.

    Returns:
        :class:`PruneReport`. Bad input (no decoder blocks, empty calibration, too long sequences, a pattern that
        does not divide a layer's width, ...) raises before any weight changes.

    Models bigger than memory: :func:`sparsegpt_kernels.model.streaming.prune_checkpoint` runs the same with the
    weights streamed from and to safetensors files.
    """
    kwargs = {k: v for k, v in locals().items() if k not in ("model", "calibration")}
    return run_prune(model, calibration, InMemoryWeights(), **kwargs)


@dataclass(frozen=True)
class RunOptions:
    """How a :func:`prune_model` run goes, besides what it does to each layer (that is the
    :class:`~sparsegpt_kernels.options.PruneOptions`); see :func:`prune_model` for each field."""

    blocks: Iterable[int] | None = None
    include: Iterable[str] | str | None = None
    exclude: Iterable[str] | str | None = None
    layer_sparsity: Mapping[str, float | str] | None = None
    true_sequential: bool = False
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    tokenizer: object = None
    device: torch.device | str | None = None
    offload: bool | None = None
    checkpoint_dir: str | os.PathLike | None = None
    progress: bool = False
    on_block_end: Callable[[int, list[LayerReport]], None] | None = None
    process_group: object = None


_OPTION_FIELDS = {f.name for f in fields(PruneOptions) if f.init}


@torch.no_grad()
def run_prune(model: nn.Module, calibration, source, **kwargs) -> PruneReport:
    """:func:`prune_model` with the weights coming from and going to ``source`` (:mod:`.block_loop`); every keyword of
    :func:`prune_model` is accepted."""
    opts = PruneOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS})
    run = RunOptions(**kwargs)
    return _Pruning(model, calibration, opts, run, source).run()


class _Pruning:
    """One :func:`prune_model` run, in its steps: plan → calibrate (→ allocate) → resume → the block loop."""

    def __init__(self, model: nn.Module, calibration, opts: PruneOptions, run: RunOptions, source):
        self.t_start = time.perf_counter()
        self.model, self.opts, self.run_opts, self.source = model, opts, run, source
        # 1. The plan: every option checked against the model, and the calibration ids against it, before any change.
        self.plan = build_plan(model, opts, blocks=run.blocks, include=run.include, exclude=run.exclude,
                               layer_sparsity=run.layer_sparsity)
        self.dist = DistContext.current(run.process_group)
        if run.device is not None:
            self.dev = torch.device(run.device)
        elif torch.cuda.is_available():
            self.dev = torch.device("cuda", torch.cuda.current_device())
        else:
            self.dev = torch.device("cpu")
        if opts.allocation != "uniform" and (self.dist is not None or not source.in_memory):
            raise ValueError(f"allocation={opts.allocation!r} runs in one process on a model held in memory")
        self.settings = {**opts.record(), **self.plan.record(), "true_sequential": bool(run.true_sequential),
                         "seed": run.seed}
        if opts.allocation != "uniform":
            self.settings.update(allocation=opts.allocation, owl_m=opts.owl_m, owl_lambda=opts.owl_lambda)
        self.report = PruneReport(method=opts.method, settings=self.settings,
                                  processes=1 if self.dist is None else self.dist.world)
        self.timings = Timings(self.dev)
        self.needs_data = opts.method != "magnitude"
        self.ids = self._calibrate(calibration)

    def _calibrate(self, calibration) -> torch.Tensor | None:
        """2. The calibration ids (none for magnitude pruning without an allocation), then the allocation."""
        opts, run = self.opts, self.run_opts
        if not (self.needs_data or opts.allocation != "uniform"):
            return None
        if calibration is None:
            raise ValueError(f"method {opts.method!r} (allocation {opts.allocation!r}) needs calibration data")
        with self.timings.phase("calibration"):
            ids = prepare_calibration(self.model, calibration, nsamples=run.nsamples, seqlen=run.seqlen,
                                      seed=run.seed, tokenizer=run.tokenizer)
        self.settings.update(nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]))
        if opts.allocation != "uniform":
            with self.timings.phase("allocation"):
                targets = allocate(self.model, self.plan, ids, self.dev, progress=run.progress)
            apply_allocation(self.plan, targets)
            self.settings["allocated"] = {f"{self.plan.prefix}.{b}.{n}": s for (b, n), s in sorted(targets.items())}
        return ids

    def run(self) -> PruneReport:
        plan, run, report = self.plan, self.run_opts, self.report
        run_id = fingerprint(self.settings, self.model, len(plan.layers), self.ids)
        local_ids = self.ids
        if self.dist is not None:
            self.dist.check_same("arguments or calibration data", run_id)
            if self.ids is not None:
                local_ids = self.ids[self.dist.shard(self.ids.shape[0])]
        # 3. Resume: the blocks a checkpoint already holds are loaded back.
        ckpt = state = None
        if run.checkpoint_dir is not None:
            ckpt = Checkpoint(run.checkpoint_dir, run_id, self.dist, keep_weights=self.source.in_memory)
            state = ckpt.load()
        model = self.model
        was_training = model.training
        model.eval()
        cfg = getattr(model, "config", None)
        old_use_cache = getattr(cfg, "use_cache", None)
        if cfg is not None and old_use_cache is not None:
            cfg.use_cache = False
        try:
            start, prior_seconds = self._resume(state, ckpt)
            # 4. The activations entering the first block to do (captured, or from the checkpoint), then the loop.
            inputs, acts, store = None, [], self.dev
            if self.needs_data and start <= plan.last:
                self.source.ensure(0)  # the capture runs block 0 once
                with self.timings.phase("forward"):
                    inputs, acts, store = _first_activations(model, plan, local_ids, state, ckpt, self.dev,
                                                             run.offload)
                if start > 0:
                    self.source.drop(0)
            self._block_loop(inputs, acts, store, start, ckpt, prior_seconds)
            report.blocks_pruned = plan.blocks
            totals = self.source.totals(model)
            if totals is not None:
                report.model_params, report.model_zeros = totals
            report.seconds = prior_seconds + time.perf_counter() - self.t_start
            report.timings = self.timings.split(time.perf_counter() - self.t_start)  # this run, this process
            return report
        finally:
            if cfg is not None and old_use_cache is not None:
                cfg.use_cache = old_use_cache
            model.train(was_training)
            release_cpu_cache()  # the cpp backend's idle buffers, kept from layer to layer

    def _resume(self, state, ckpt) -> tuple[int, float]:
        """(first block to do, seconds spent before the resume); the finished blocks' weights restored."""
        if state is None:
            return 0, 0.0
        start = int(state["next_block"])
        self.report.resumed_from_block = start
        self.report.layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in state["reports"]]
        for b in range(start):
            if b in self.plan.items:
                self.source.restore(b, self.plan.layers[b], lambda b=b: ckpt.block_weights(b))
        return start, float(state["seconds"])

    def _block_loop(self, inputs, acts, store, start: int, ckpt, prior_seconds: float) -> None:
        """5. Block by block: prune its layers, then run the pruned block to make the next block's inputs."""
        plan, run, report = self.plan, self.run_opts, self.report
        reports: dict[int, list[LayerReport]] = {}

        def visit(b, runner):
            reports[b] = []
            if b in plan.items:
                reports[b] = prune_block(f"{plan.prefix}.{b}", plan.items[b], self.opts, runner, self.dev,
                                         true_sequential=run.true_sequential, progress=run.progress,
                                         dist_ctx=self.dist, timings=self.timings)
                report.layers.extend(reports[b])

        def after(b, block, next_acts):
            if ckpt is not None:
                ckpt.save(b, block, next_acts, report.layers, prior_seconds + time.perf_counter() - self.t_start)
            if run.on_block_end is not None:
                run.on_block_end(b, reports.pop(b))

        run_blocks(plan.layers, inputs, acts, start=start, last=plan.last, device=self.dev, store=store,
                   source=self.source, visit=visit, after=after, outputs=self.needs_data, timings=self.timings,
                   progress=run.progress)


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
