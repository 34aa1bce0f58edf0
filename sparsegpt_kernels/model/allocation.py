"""Non-uniform sparsity: how a global budget S is spread over the layers before :func:`prune_model` prunes them.

* ``"uniform"``: every layer gets S (SparseGPT as published; the default).
* ``"owl"``: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024). For each decoder block, the share of its
  weights whose Wanda score |W_ij|·||X_j|| exceeds ``owl_m`` times the block's mean score (its layerwise outlier
  distribution, LOD) is measured on the dense model; blocks with more outliers are pruned less: the LODs are mapped
  linearly onto a span of 2λ (λ = ``owl_lambda``), the most outlier-rich block lowest, then shifted together so that
  their parameter-weighted mean is S (the paper's mean-centred [S - λ, S + λ]).
* ``"error"``: the increase of the calibration loss each layer's pruning would cause, estimated to second order and
  minimised under the budget. A layer's OBS loss L(s) (the solver's own estimate of (1/n)·||X ΔWᵀ||², the energy of
  the change of its output) is measured with the real solver, on a copy, at S - 0.1, S and S + 0.1. The loss of the
  model moves by about ½·δyᵀ F δy for a change δy of the layer's output, with F the Fisher information of that output;
  with F ≈ (E||g||² / d_out)·I, where g is the gradient of the calibration loss with respect to the layer's output
  (one backward pass over at most ``FISHER_SAMPLES`` calibration sequences), the cost of sparsity s is
  w·L(s), w = E||g||² / d_out. The sparsities minimising Σ w·L(s) under the budget come from a Lagrangian search (each
  layer minimises w·L(s) - μ·params·s on its piecewise-linear curve; μ is bisected until the budget is met). The
  weights carry what a layer-local loss cannot see: an error early in the network travels through every later block
  (on SmolLM2-135M the early blocks get 0.6 at S = 0.7, the late ones 0.72). This uses what only a fast solver can
  afford: three extra solves per layer.

Both measure on the dense model in one extra pass over the calibration data, block by block (the statistics of block
b come from the dense outputs of block b - 1), before the pruning pass; "error" adds the backward pass. In every mode
the parameter-weighted sparsity over the allocated layers is exactly S up to the per-block rounding of the selection
(well within 0.1%), every layer's sparsity lies in [0, 0.99], and ``layer_sparsity`` overrides are kept (and left out
of the budget).
Allocations distribute an unstructured sparsity; N:M patterns fix the sparsity of their layers and are refused here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..api import prune_layer_with
from ..options import Setting
from .block_loop import InMemoryWeights, run_blocks
from .blocks import capture_block_inputs
from .hessian_hooks import HessianCollector

ERROR_OFFSETS = (-0.1, 0.0, 0.1)
FISHER_SAMPLES = 8
MAX_SPARSITY = 0.99


def _bounded(s: float) -> float:
    return min(MAX_SPARSITY, max(0.0, s))


def _meet_budget(targets: dict, params: dict, S: float, lo: dict | None = None, hi: dict | None = None) -> dict:
    """Shift the targets equally (within their bounds) until their parameter-weighted mean is S."""
    lo = lo or {k: 0.0 for k in targets}
    hi = hi or {k: MAX_SPARSITY for k in targets}
    total = sum(params.values())
    out = dict(targets)
    for _ in range(50):
        gap = S - sum(out[k] * params[k] for k in out) / total
        if abs(gap) < 1e-9:
            break
        free = [k for k in out if (gap > 0 and out[k] < hi[k]) or (gap < 0 and out[k] > lo[k])]
        if not free:
            raise ValueError(f"sparsity {S} cannot be met within the per-layer bounds")
        share = gap * total / sum(params[k] for k in free)
        for k in free:
            out[k] = min(hi[k], max(lo[k], out[k] + share))
    return out


def owl_targets(lod: dict[int, float], block_params: dict[int, int], S: float, lam: float) -> dict[int, float]:
    """Per-block sparsities from the blocks' outlier ratios (linear map onto [S - λ, S + λ], then the exact budget)."""
    lo_v, hi_v = min(lod.values()), max(lod.values())
    if hi_v - lo_v <= 0:
        return {b: S for b in lod}
    raw = {b: S + lam - 2 * lam * (lod[b] - lo_v) / (hi_v - lo_v) for b in lod}  # most outliers: S - λ
    return _meet_budget({b: _bounded(s) for b, s in raw.items()}, block_params, S)


def error_targets(curves: dict, params: dict, S: float) -> dict:
    """Per-layer sparsities minimising Σ cost_l(s_l) under Σ p_l s_l = S Σ p_l; ``curves[k]`` = (sparsities, costs)."""
    grid = {}
    for k, (xs, ys) in curves.items():
        fine = torch.linspace(xs[0], xs[-1], 81, dtype=torch.float64)
        grid[k] = (fine, torch.from_numpy(np.interp(fine.numpy(), xs, ys)))

    def choose(mu: float) -> dict:
        return {k: float(f[torch.argmin(c - mu * params[k] * f)]) for k, (f, c) in grid.items()}

    def mean(sol: dict) -> float:
        return sum(sol[k] * params[k] for k in sol) / sum(params.values())

    lo, hi = 0.0, 1.0
    while mean(choose(hi)) < S and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(choose(mid)) < S else (lo, mid)
    sol = choose(hi)
    bounds_lo = {k: float(grid[k][0][0]) for k in grid}
    bounds_hi = {k: float(grid[k][0][-1]) for k in grid}
    return _meet_budget(sol, params, S, bounds_lo, bounds_hi)


def _layer_cost_curve(W: torch.Tensor, H: torch.Tensor, S: float, opts) -> tuple[list[float], list[float]]:
    """(sparsities, OBS loss) of pruning a copy of ``W`` with the real solver (``opts``' block size, damping and
    backend; no quantization, no refinement: the probes measure SparseGPT's errors)."""
    xs, ys = [], []
    for off in ERROR_OFFSETS:
        s = _bounded(S + off)
        if xs and s <= xs[-1]:
            continue
        res = prune_layer_with(W.detach().clone(), H, replace(opts, sparsity=s, pattern=None, quant_bits=None,
                                                               quant_group_size=None, allocation="uniform",
                                                               refine="none"))
        xs.append(s)
        ys.append(res.loss)
    return xs, ys


def fisher_weights(model: nn.Module, plan, ids: torch.Tensor, keys: list) -> dict:
    """w = E||g||² / d_out per layer, g the gradient of the calibration loss with respect to the layer's output (one
    backward pass per sequence, over at most FISHER_SAMPLES sequences, where the model is)."""
    layers_of = {(b, t.name): t for b in plan.blocks for t, _ in plan.items[b]}
    hooked: dict[int, list] = {}  # module -> keys whose output it produces (an experts module: every expert)
    for k in keys:
        hooked.setdefault(id(layers_of[k].module), []).append(k)
    sums = {k: 0.0 for k in keys}
    tokens = 0
    modules = {id(layers_of[k].module): layers_of[k].module for k in keys}

    def hook(mod, args, out):
        y = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(y, torch.Tensor) and y.requires_grad:
            ks = hooked[id(mod)]

            def grad(g):
                total = float((g.float() ** 2).sum())
                for k in ks:
                    sums[k] += total

            y.register_hook(grad)

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for i in range(min(ids.shape[0], FISHER_SAMPLES)):
                seq = ids[i : i + 1].to(dev)
                x = emb(seq).detach().requires_grad_(True)
                model(inputs_embeds=x, labels=seq, use_cache=False).loss.backward()
                tokens += seq.numel()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    return {k: sums[k] / max(tokens, 1) / layers_of[k].shape[0] for k in keys}


@torch.no_grad()
def allocate(model: nn.Module, plan, ids: torch.Tensor, device: torch.device, *, progress: bool = False) -> dict:
    """Per-layer sparsities ``{(block, layer name): s}`` for the plan's allocated layers (see the module docstring),
    by ``plan.options.allocation``, measured on the dense model with the same block loop as the pruning."""
    opts = plan.options
    allocation, S = opts.allocation, opts.fraction
    keys = [(b, t.name) for b in plan.blocks for t, _ in plan.items[b] if (b, t.name) not in plan.overridden]
    if not keys:
        return {}
    layers_of = {(b, t.name): t for b in plan.blocks for t, _ in plan.items[b]}
    params = {k: layers_of[k].shape[0] * layers_of[k].shape[1] for k in keys}
    fisher = fisher_weights(model, plan, ids, keys) if allocation == "error" else {}
    inputs = capture_block_inputs(model, plan.layers, ids)
    lod: dict[int, float] = {}
    curves: dict = {}

    def measure(b, runner):
        mine = [layers_of[k] for k in keys if k[0] == b]
        if not mine:
            return
        with HessianCollector(mine, device, opts.hessian_products) as col:
            runner(col)
        if allocation == "owl":
            scores = [(t.weight().abs().float() * col.acc[t.name].hessian.diagonal().clamp(min=0).sqrt()[None, :])
                      .flatten() for t in mine]
            flat = torch.cat(scores)
            lod[b] = float((flat > opts.owl_m * flat.mean()).float().mean())
        else:
            for t in mine:
                xs, ys = _layer_cost_curve(t.weight(), col.acc[t.name].hessian.to(device), S, opts)
                curves[(b, t.name)] = (xs, [fisher[(b, t.name)] * y for y in ys])

    acts = inputs.hidden
    run_blocks(plan.layers, inputs, acts, start=0, last=plan.last, device=device, store=acts[0].device,
               source=InMemoryWeights(), visit=measure, progress=progress, desc=f"{allocation} statistics")
    if allocation == "owl":
        block_params = {b: sum(p for k, p in params.items() if k[0] == b) for b in lod}
        per_block = owl_targets(lod, block_params, S, opts.owl_lambda)
        return {k: per_block[k[0]] for k in keys}
    return error_targets(curves, params, S)


def apply(plan, targets: dict) -> None:
    """Replace the plan's settings with the allocated sparsities."""
    for b in plan.blocks:
        plan.items[b] = [(t, Setting(targets[(b, t.name)]) if (b, t.name) in targets else s)
                         for t, s in plan.items[b]]
