"""Public entry point: :func:`prune_layer`, in four steps (validate, check the values, factor with retries, sweep and
write back); the settings are a :class:`~sparsegpt_kernels.options.PruneOptions`, the steps a backend's
(:mod:`sparsegpt_kernels.backends.base`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import reference
from . import refine as refinement
from .backends import Backend, select_backend
from .checks import check_finite, check_hessian_values
from .hessian import HessianAccumulator
from .options import (
    DAMP_GROWTH,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    DEFAULT_REFINE_CG_ITERS,
    DEFAULT_REFINE_ITERS,
    DEFAULT_REFINE_TOL,
    MAX_DAMP_RETRIES,
    PruneOptions,
)
from .precision import ieee_float32_matmul
from .spec import QuantGrid, SweepSpec

logger = logging.getLogger("sparsegpt_kernels")


class FactorizationError(RuntimeError):
    """The damped Hessian could not be factorised even at the largest damping tried."""


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_layer` did.

    Attributes:
        loss: the OBS loss the sweep accumulates, Σ err²/2 over every weight with err = (w − q)/U_jj: the increase
            of ½·Σ_rows (W − Ŵ) H (W − Ŵ)ᵀ on the damped Hessian, which for H = (2/n)·XᵀX is
            (1/n)·||XWᵀ − XŴᵀ||² (the mean over the n input vectors of the squared change of the output) up to the
            damping.
        sparsity: fraction of exact zeros in the weight after pruning.
        damp: the relative damping actually used (larger than requested if factorisation had to be retried).
        backend: the backend that ran.
        seconds: wall time of the whole call.
        shape: (out_features, in_features).
        pattern: "N:M" or ``None`` for unstructured.
        quant_bits: bits of joint quantization or ``None``.
        dead_columns: input columns whose Hessian diagonal was 0 (their weights are set to 0).
        mask_sparsity: fraction of the weights the mask pruned (``sparsity`` also counts kept weights that joint
            quantization rounded to 0, and zeros that were there before).
        quant_grid: with joint quantization, the grid the kept weights were rounded onto (per-row, per-group scale and
            zero point, float32 on the CPU): what a compressed checkpoint stores with the integer codes
            (:mod:`sparsegpt_kernels.sparse`).
        refine: with ``refine="admm"``, the refinement's stats (:func:`sparsegpt_kernels.refine.refine`:
            ``loss_before``, ``loss_after``, ``admm_iters``, ``cg_iters``, ``mask_changed``, ``kept``, ``seconds``);
            ``None`` without it. ``loss`` stays the sweep's.
    """

    loss: float
    sparsity: float
    damp: float
    backend: str
    seconds: float
    shape: tuple[int, int]
    pattern: str | None = None
    quant_bits: int | None = None
    dead_columns: int = 0
    mask_sparsity: float | None = None
    quant_grid: QuantGrid | None = field(default=None, repr=False, compare=False)
    refine: dict | None = None

    @property
    def refined_loss(self) -> float | None:
        """With ``refine="admm"``, ½·Σ_rows (W − Ŵ) H (W − Ŵ)ᵀ on the damped Hessian of the weight written
        (``refine["loss_after"]``; never above ``loss``, up to rounding: the refined weights are kept only where they
        lower it); ``None`` without it."""
        return None if self.refine is None else self.refine["loss_after"]


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored (in_features, out_features)."""
    return (isinstance(module, nn.Module) and type(module).__name__ == "Conv1D"
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _weight_of(layer) -> tuple[torch.Tensor, bool]:
    """The tensor holding the weight and whether it is stored transposed (in, out)."""
    if isinstance(layer, torch.Tensor):
        return layer, False
    if isinstance(layer, nn.Linear):
        return layer.weight, False
    if is_conv1d(layer):
        return layer.weight, True  # transformers' Conv1D stores (in_features, out_features)
    raise TypeError(
        "layer must be an nn.Linear, a transformers Conv1D or a 2-D weight tensor (out, in), "
        f"got {type(layer).__name__}"
    )


def _hessian_tensor(H, in_features: int, weight: torch.Tensor) -> torch.Tensor:
    """The Hessian as a tensor, with its type, shape, dtype and device checked (not its values)."""
    if isinstance(H, HessianAccumulator):
        if H.count == 0:
            raise ValueError("the HessianAccumulator has seen no inputs")
        H = H.hessian
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"hessian must be a tensor or a HessianAccumulator, got {type(H).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {tuple(H.shape)}")
    if H.shape[0] != in_features:
        raise ValueError(f"hessian is {H.shape[0]}x{H.shape[1]} but the layer has in_features={in_features}")
    if H.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"hessian dtype must be float32 or float64, got {H.dtype} (accumulate in float32 or better)")
    if H.device != weight.device:
        raise ValueError(f"hessian is on {H.device} but the weight is on {weight.device}")
    return H


@dataclass(frozen=True)
class _Problem:
    """A layer's weight and Hessian after the type and shape checks: ``weight`` is the user's tensor (stored
    transposed when ``transposed``), ``W0`` its (out, in) view."""

    weight: torch.Tensor
    transposed: bool
    W0: torch.Tensor
    H: torch.Tensor


def _validate(layer, hessian, opts: PruneOptions) -> _Problem:
    """Step 1: types, shapes, dtypes and devices of the layer and the Hessian, and the settings against the width."""
    weight, transposed = _weight_of(layer)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"weight dtype must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    W0 = weight.T if transposed else weight
    rows, cols = W0.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(W0.shape)}")
    H = _hessian_tensor(hessian, cols, weight)
    opts.check_layer(cols)
    return _Problem(weight, transposed, W0, H)


def _check_block_limit(be: Backend, block_size: int, cols: int) -> None:
    limit = be.max_block_size()
    if limit is not None and min(block_size, cols) > limit:
        raise ValueError(f"block_size={block_size} is wider than the {be.name} backend supports ({limit} columns); "
                         f"use block_size <= {limit}")


def _factor_with_retries(be: Backend, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Step 3: the backend's factor of the damped Hessian, multiplying the damping by DAMP_GROWTH after each
    failure (at most MAX_DAMP_RETRIES times); returns (factor, damping used)."""
    used = damp
    for _ in range(MAX_DAMP_RETRIES + 1):
        F = be.factor(H, used)
        if F is not None:
            return F, used
        logger.warning("sparsegpt_kernels: Hessian factorisation failed at damp=%g; retrying with more", used)
        used *= DAMP_GROWTH
    raise FactorizationError(f"could not factorise the Hessian even with damp={used / DAMP_GROWTH:g} "
                             f"(started at {damp:g}); is it a Gram matrix of finite inputs?")


def _write_back(p: _Problem, W: torch.Tensor, loss: float, be: Backend) -> float:
    """Step 4b: the result into the user's weight once it is known to be finite; returns the fraction of zeros."""
    nonzeros, finite = be.nonzeros_and_finite(W)
    if not finite or not math.isfinite(loss):
        raise FloatingPointError("pruning produced NaN/Inf; the weight was left unchanged")
    p.weight.copy_((W.T if p.transposed else W).to(p.weight.dtype))
    if p.weight.dtype != W.dtype:  # rounding to the weight's dtype can make more zeros
        nonzeros = be.nonzeros_and_finite(p.weight)[0]
    return 1.0 - nonzeros / p.weight.numel()


def prune_layer(
    layer,
    hessian,
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    backend: str = "auto",
    refine: str = "none",
    refine_iters: int = DEFAULT_REFINE_ITERS,
    refine_cg_iters: int = DEFAULT_REFINE_CG_ITERS,
    refine_tol: float = DEFAULT_REFINE_TOL,
    refine_mask: str = "move",
) -> PruneResult:
    """Prune one linear layer in place with SparseGPT.

    Args:
        layer: ``nn.Linear``, transformers ``Conv1D`` (weight stored (in, out)) or a 2-D weight tensor (out, in).
            Its weight is updated in place, keeping dtype and device; the math runs in float32 (float64 if the
            weight or the Hessian is float64).
        hessian: (in, in) tensor on the weight's device, or a :class:`HessianAccumulator`.
        sparsity: fraction of weights pruned (unstructured), in [0, 1); default 0.5. Not together with ``pattern``.
        pattern: "N:M", N kept of every M consecutive input columns (e.g. "2:4", "4:8").
        block_size: columns per block of the sweep (lazy batch updates between blocks).
        damp: relative damping λ = damp · mean(diag H); multiplied by 10 on factorisation failure.
        quant_bits: joint quantization to this many bits (2..8), asymmetric per output channel.
        quant_group_size: quantization group size along the input dimension (must divide in_features).
        backend: "auto", "torch", "triton", "cpp" or "cuda".
        refine: "admm": after the sweep, refine the weights on the same pattern (:mod:`sparsegpt_kernels.refine`:
            ``refine_iters`` ADMM iterations in which the mask may move, unless ``refine_mask="fixed"`` or with joint
            quantization, then ``refine_cg_iters`` conjugate-gradient iterations on the final support, both stopping
            at the relative tolerance ``refine_tol``; with quantization, rounded back onto the same grid). The
            refined weights are kept only where they lower the loss. "none" (default): SparseGPT alone.

    Returns:
        :class:`PruneResult`. On any exception the weight is left exactly as it was.

    The settings are checked by :class:`~sparsegpt_kernels.options.PruneOptions`. Float32 matrix products inside
    run at IEEE precision even where the process enabled TF32 (or bfloat16 on the CPU) for inference; the setting is
    restored before returning (:mod:`sparsegpt_kernels.precision`).
    """
    t0 = time.perf_counter()
    opts = PruneOptions(sparsity=sparsity, pattern=pattern, block_size=block_size, damp=damp, quant_bits=quant_bits,
                        quant_group_size=quant_group_size, backend=backend, refine=refine, refine_iters=refine_iters,
                        refine_cg_iters=refine_cg_iters, refine_tol=refine_tol, refine_mask=refine_mask)
    return prune_layer_with(layer, hessian, opts, started=t0)


def prune_layer_with(layer, hessian, opts: PruneOptions, *, started: float | None = None) -> PruneResult:
    """:func:`prune_layer` with its settings as a :class:`~sparsegpt_kernels.options.PruneOptions` (``method`` and
    ``allocation`` are whole-model settings and not read here)."""
    t0 = time.perf_counter() if started is None else started
    p = _validate(layer, hessian, opts)
    rows, cols = p.W0.shape
    be = select_backend(opts.backend, p.weight.device)
    _check_block_limit(be, opts.block_size, cols)
    # step 2, the value checks: one pass each over W and H (compiled where the backend has them)
    check_finite(p.W0, "weight", be)
    check_hessian_values(p.H, be)

    cdtype = torch.float64 if torch.float64 in (p.weight.dtype, p.H.dtype) else torch.float32
    # float32 products at full precision whatever the process-wide TF32/bfloat16 setting (restored on the way out)
    with torch.no_grad(), ieee_float32_matmul():
        W = be.working_copy(p.W0, cdtype)  # never a view of the user's weight
        Hc = p.H.to(cdtype)
        dead = Hc.diagonal() == 0
        n_dead = int(dead.sum())
        if n_dead:
            W[:, dead] = 0
        grid = reference.make_quant_grid(W, opts.quant_bits, opts.quant_group_size) if opts.quant_bits else None
        n, m = opts.nm or (None, None)
        # cols and block_size are multiples of M for N:M, so the clamp keeps the block a multiple of M
        spec = SweepSpec(sparsity=opts.fraction, n=n, m=m, block_size=min(opts.block_size, cols), quant=grid)
        F, used = _factor_with_retries(be, Hc, opts.damp)
        W0 = W.clone() if opts.refine != "none" else None
        loss = be.sweep(W, F, spec)  # step 4a
        stats = None
        if W0 is not None:
            W, stats = _refine(be, W0, W, Hc, F, used, spec, opts, dead if n_dead else None)
        achieved = _write_back(p, W, loss, be)
    return PruneResult(
        loss=float(loss),
        sparsity=achieved,
        damp=used,
        backend=be.name,
        seconds=time.perf_counter() - t0,
        shape=(rows, cols),
        pattern=opts.pattern,
        quant_bits=opts.quant_bits,
        dead_columns=n_dead,
        mask_sparsity=reference.mask_fraction(rows, cols, sparsity=opts.fraction, nm=opts.nm, per=spec.block_size),
        quant_grid=None if grid is None else QuantGrid(grid.scale.to("cpu", torch.float32),
                                                       grid.zero.to("cpu", torch.float32), grid.maxq, grid.group_size),
        refine=stats,
    )


def _refine(be: Backend, W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor, F: torch.Tensor, damp: float,
            spec: SweepSpec, opts: PruneOptions, dead: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Step 4a': the refinement of the sweep's result ``W`` (:func:`sparsegpt_kernels.refine.refine`) on the damped
    Hessian the sweep used, with the backend's mask kernels; with quantization it needs U, which is F or, for a
    backend whose factor is R (H = R Rᵀ), R⁻¹."""
    U = None
    if spec.quant is not None:
        U = F if be.FACTOR == "inverse" else torch.linalg.solve_triangular(
            F, torch.eye(F.shape[0], dtype=F.dtype, device=F.device), upper=True)
    return refinement.refine(W0, W, reference.damped_hessian(H, damp), spec, iters=opts.refine_iters,
                             cg_iters=opts.refine_cg_iters, tol=opts.refine_tol, move=opts.refine_mask == "move",
                             U=U, dead=dead, select=be)
