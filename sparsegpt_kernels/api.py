"""Public entry point: :func:`prune_layer`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import reference
from .backends import select_backend
from .checks import all_finite, compiled_checks, nonzeros_and_finite
from .hessian import HessianAccumulator
from .precision import ieee_float32_matmul
from .settings import parse_pattern
from .spec import SweepSpec

logger = logging.getLogger("sparsegpt_kernels")

#: Damping is multiplied by this factor after each failed factorisation, at most ``MAX_DAMP_RETRIES`` times.
DAMP_GROWTH = 10.0
MAX_DAMP_RETRIES = 6


class FactorizationError(RuntimeError):
    """The damped Hessian could not be factorised even at the largest damping tried."""


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_layer` did.

    Attributes:
        loss: the OBS estimate of the increase of ½·||XWᵀ − XŴᵀ||²/n·2 (sum over rows of Σ err²/d²/2).
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


def mask_fraction(rows: int, cols: int, spec: SweepSpec) -> float:
    """The fraction of a (rows, cols) weight that the sweep's masks prune: exactly N:M's 1 - N/M, or for unstructured
    sparsity ``reference.n_pruned`` of every column block."""
    if spec.m is not None:
        return 1.0 - spec.n / spec.m
    B = spec.block_size
    pruned = sum(reference.n_pruned(spec.sparsity, rows * min(B, cols - i1)) for i1 in range(0, cols, B))
    return pruned / (rows * cols)


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


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise ValueError(f"{what} contains NaN or Inf")


#: Side of the square tiles of H compared with their mirror images in the symmetry check (both fit in cache).
_SYM_TILE = 256


def _max_asymmetry(H: torch.Tensor) -> float:
    """max |H − Hᵀ| over the upper triangle, tile by tile: each (T, T) tile against the transpose of its mirror tile,
    so the transposed read stays in cache (3–4.5x faster than row panels on 4096² and 11008² Hessians)."""
    n = H.shape[0]
    worst = 0.0
    for i in range(0, n, _SYM_TILE):
        for j in range(i, n, _SYM_TILE):
            lo, hi = torch.aminmax(H[i : i + _SYM_TILE, j : j + _SYM_TILE] - H[j : j + _SYM_TILE, i : i + _SYM_TILE].T)
            worst = max(worst, float(hi), -float(lo))
    return worst


#: Elements of the temporary difference per step of the device-side symmetry check (64 MiB in float32).
_SYM_PANEL_ELEMS = 1 << 24


def _hessian_stats_device(H: torch.Tensor) -> tuple[float, float, float, bool]:
    """(min, max, max |H − Hᵀ|, any negative diagonal entry) of a GPU-resident H as device reductions read back in
    one host synchronisation. The CPU's tile loop would cost two launches and two synchronisations per tile there:
    136 tiles at c = 4096 (H200, 2026-11-30: 139 aminmax launches in one prune_layer call)."""
    n = H.shape[0]
    lo, hi = torch.aminmax(H)
    step = max(1, _SYM_PANEL_ELEMS // n)
    asym = torch.zeros((), dtype=H.dtype, device=H.device)
    for i in range(0, n, step):
        asym = torch.maximum(asym, torch.sub(H[i : i + step], H[:, i : i + step].T).abs_().amax())
    neg = (H.diagonal() < 0).any().to(H.dtype)
    lo, hi, asym, neg = torch.stack((lo, hi, asym, neg)).tolist()
    return lo, hi, asym, neg != 0


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


def _check_hessian_values(H: torch.Tensor) -> None:
    """Finite, symmetric (to 1e-4 of its largest entry in float32, 1e-10 in float64) and a non-negative diagonal;
    one compiled pass where it runs, else torch reductions."""
    ops = compiled_checks(H)
    neg_diag = None
    if ops is not None:
        lo, hi, asym, finite = ops.ext_hessian_stats(H)
    elif H.device.type != "cpu":
        lo, hi, asym, neg_diag = _hessian_stats_device(H)
        finite = math.isfinite(lo) and math.isfinite(hi)
    else:
        lo, hi = (float(x) for x in torch.aminmax(H))  # NaN and Inf propagate: this doubles as the finiteness check
        finite = math.isfinite(lo) and math.isfinite(hi)
        asym = None
    if not finite:
        raise ValueError("hessian contains NaN or Inf")
    scale = max(abs(lo), abs(hi))
    tol = (1e-4 if H.dtype == torch.float32 else 1e-10) * max(scale, 1e-30)
    if asym is None:
        asym = _max_asymmetry(H)
    if asym > tol:
        raise ValueError(f"hessian is not symmetric (max |H - Hᵀ| = {asym:.3g}, |H|max = {scale:.3g})")
    if neg_diag is None:
        neg_diag = bool((H.diagonal() < 0).any())
    if neg_diag:
        raise ValueError("hessian has negative diagonal entries; it is not a Gram matrix of real inputs")


def prune_layer(
    layer,
    hessian,
    *,
    sparsity: float = 0.5,
    pattern: str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    backend: str = "auto",
) -> PruneResult:
    """Prune one linear layer in place with SparseGPT.

    Args:
        layer: ``nn.Linear``, transformers ``Conv1D`` (weight stored (in, out)) or a 2-D weight tensor (out, in).
            Its weight is updated in place, keeping dtype and device; the math runs in float32 (float64 if the
            weight or the Hessian is float64).
        hessian: (in, in) tensor on the weight's device, or a :class:`HessianAccumulator`.
        sparsity: fraction of weights pruned (unstructured), in [0, 1); ignored when ``pattern`` is given.
        pattern: "N:M", N kept of every M consecutive input columns (e.g. "2:4", "4:8").
        block_size: columns per block of the sweep (lazy batch updates between blocks).
        damp: relative damping λ = damp · mean(diag H); multiplied by 10 on factorisation failure.
        quant_bits: joint quantization to this many bits (2..8), asymmetric per output channel.
        quant_group_size: quantization group size along the input dimension (must divide in_features).
        backend: "auto", "torch", "triton", "cpp" or "cuda".

    Returns:
        :class:`PruneResult`. On any exception the weight is left exactly as it was.

    Float32 matrix products inside run at IEEE precision even where the process enabled TF32 (or bfloat16 on the
    CPU) for inference; the setting is restored before returning (:mod:`sparsegpt_kernels.precision`).
    """
    t0 = time.perf_counter()
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

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp must be a finite number > 0, got {damp!r}")
    n = m = None
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if cols % m:
            raise ValueError(f"pattern {pattern!r}: in_features={cols} is not a multiple of M={m}")
        if block_size % m:
            raise ValueError(f"pattern {pattern!r}: block_size={block_size} is not a multiple of M={m}")
        sparsity = 1.0 - n / m
    else:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if quant_bits is not None:
        if isinstance(quant_bits, bool) or not isinstance(quant_bits, int) or not 2 <= quant_bits <= 8:
            raise ValueError(f"quant_bits must be an int in 2..8, got {quant_bits!r}")
        if quant_group_size is not None:
            g = quant_group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 1 or cols % g:
                raise ValueError(f"quant_group_size must be a positive int dividing in_features={cols}, got {g!r}")
    elif quant_group_size is not None:
        raise ValueError("quant_group_size needs quant_bits")

    be = select_backend(backend, weight.device, nm=m is not None)
    max_block = be.max_block_size() if hasattr(be, "max_block_size") else None
    if max_block is not None and min(block_size, cols) > max_block:
        raise ValueError(
            f"block_size={block_size} is wider than the {be.NAME} backend supports ({max_block} columns); "
            f"use block_size <= {max_block}"
        )
    # the value checks last: one pass each over W and H (compiled where the backend loaded the extension)
    _check_finite(W0, "weight")
    _check_hessian_values(H)

    cdtype = torch.float64 if torch.float64 in (weight.dtype, H.dtype) else torch.float32
    # float32 products at full precision whatever the process-wide TF32/bfloat16 setting (restored on the way out)
    with torch.no_grad(), ieee_float32_matmul():
        # never a view of the user's weight
        W = be.working_copy(W0, cdtype) if hasattr(be, "working_copy") else W0.to(cdtype).clone().contiguous()
        Hc = H.to(cdtype)
        dead = Hc.diagonal() == 0
        n_dead = int(dead.sum())
        if n_dead:
            W[:, dead] = 0
        grid = reference.make_quant_grid(W, quant_bits, quant_group_size) if quant_bits is not None else None
        # cols and block_size are multiples of M for N:M, so the clamp keeps the block a multiple of M
        spec = SweepSpec(sparsity=float(sparsity), n=n, m=m, block_size=min(block_size, cols), quant=grid)

        # backends that never form U factor H itself (R with H + damping = R Rᵀ) and sweep on that
        factor, sweep = (
            (be.cholesky_factor, be.sweep_cholesky)
            if hasattr(be, "cholesky_factor")
            else (be.inverse_factor, be.sweep)
        )
        used = float(damp)
        for _ in range(MAX_DAMP_RETRIES + 1):
            F = factor(Hc, used)  # U, or R for the Cholesky pair
            if F is not None:
                break
            logger.warning("sparsegpt_kernels: Hessian factorisation failed at damp=%g; retrying with more", used)
            used *= DAMP_GROWTH
        else:
            raise FactorizationError(
                f"could not factorise the Hessian even with damp={used / DAMP_GROWTH:g} "
                f"(started at {damp:g}); is it a Gram matrix of finite inputs?"
            )
        loss = sweep(W, F, spec)
        nonzeros, finite = nonzeros_and_finite(W)
        if not finite or not math.isfinite(loss):
            raise FloatingPointError("pruning produced NaN/Inf; the weight was left unchanged")
        out = W.T if transposed else W
        weight.copy_(out.to(weight.dtype))
        if weight.dtype != W.dtype:  # rounding to the weight's dtype can make more zeros
            nonzeros = nonzeros_and_finite(weight)[0]
        achieved = 1.0 - nonzeros / weight.numel()
    return PruneResult(
        loss=float(loss),
        sparsity=achieved,
        damp=used,
        backend=be.NAME,
        seconds=time.perf_counter() - t0,
        shape=(rows, cols),
        pattern=None if m is None else f"{n}:{m}",
        quant_bits=quant_bits,
        dead_columns=n_dead,
        mask_sparsity=mask_fraction(rows, cols, spec),
    )
