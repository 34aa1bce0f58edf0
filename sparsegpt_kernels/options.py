"""What a prune is, in one place: the defaults, the allowed values and :class:`PruneOptions`, which checks them once.

Everything that takes pruning settings goes through here: :func:`sparsegpt_kernels.prune_layer` and
:func:`sparsegpt_kernels.prune_model` build a :class:`PruneOptions` from their keywords, the model plan reads it,
the command line takes its argparse defaults and choices from the constants below, and the report records
:meth:`PruneOptions.record`. The text forms users type ("50%", "0.5", "2:4", "50%+4bit") are parsed by
:func:`parse_setting` into a :class:`Setting` (one weight matrix's sparsity, pattern and bits).

The compiled extension checks the same rules again as a guard (csrc/core/rules.h, the same limits; the tests compare
the two through ``sparsegpt_kernels._C``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

#: Fraction of the weights pruned when neither a sparsity nor a pattern is given.
DEFAULT_SPARSITY = 0.5
#: Columns per block of the column sweep (lazy batch updates between blocks), as in the published code.
DEFAULT_BLOCK_SIZE = 128
#: Relative damping: λ = damp · mean(diag H) is added to the Hessian's diagonal (multiplied by DAMP_GROWTH on
#: factorisation failure, at most MAX_DAMP_RETRIES times).
DEFAULT_DAMP = 0.01
DAMP_GROWTH = 10.0
MAX_DAMP_RETRIES = 6
#: Joint quantization: bits per kept weight, inclusive range.
MIN_QUANT_BITS, MAX_QUANT_BITS = 2, 8
#: Calibration: sequences and tokens per sequence (the published setting: 128 windows of 2048 tokens).
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048

#: How the weights to prune are chosen: SparseGPT, or one of the two baselines without a weight update (weakest
#: first, the order of the comparison tables).
METHODS = ("magnitude", "wanda", "sparsegpt")
#: How a global sparsity is spread over the layers (see :mod:`sparsegpt_kernels.model.allocation`).
ALLOCATIONS = ("uniform", "owl", "error")
#: OWL (Yin et al., 2024): a weight is an outlier above OWL_M times its block's mean score; the blocks' sparsities
#: span [S - OWL_LAMBDA, S + OWL_LAMBDA].
OWL_M = 5.0
OWL_LAMBDA = 0.08
#: Weight refinement after SparseGPT's sweep (:mod:`sparsegpt_kernels.refine`): "none", or "admm" (ADMM with a
#: moving mask, then conjugate gradients on the final support). Its defaults (ADMM and CG iterations, the relative
#: tolerance of both) give most of the gain in 29 GEMMs per layer (docs/algorithm.md, section 13); the mask "move"s
#: in the ADMM phase or stays SparseGPT's ("fixed", always with joint quantization).
REFINES = ("none", "admm")
REFINE_MASKS = ("move", "fixed")
DEFAULT_REFINE_ITERS = 8
DEFAULT_REFINE_CG_ITERS = 8
DEFAULT_REFINE_TOL = 1e-3
#: How the calibration Hessians' products are formed (``HessianAccumulator``'s ``products``): "float32" (inputs
#: cast to float32 first, as the published code does) or "input" (bfloat16 / float16 activations on a CUDA device
#: multiplied as they are, on tensor cores, with float32 accumulation: the same products, other sums).
HESSIAN_PRODUCTS = ("float32", "input")
#: Backends of the per-layer solve (see :mod:`sparsegpt_kernels.backends`); "auto" picks the best available.
BACKENDS = ("torch", "triton", "cpp", "cuda")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse "N:M" (N kept of every M consecutive input columns) into (N, M)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string like '2:4', got {type(pattern).__name__}")
    parts = pattern.strip().split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed pattern {pattern!r}: expected 'N:M' with integers, e.g. '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N kept of every M)")
    return n, m


def check_sparsity(value, what: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), else a ``ValueError`` naming ``what``."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def check_quant_bits(value, what: str = "quant_bits") -> int:
    if not _is_int(value) or not MIN_QUANT_BITS <= value <= MAX_QUANT_BITS:
        raise ValueError(f"{what} must be an int in {MIN_QUANT_BITS}..{MAX_QUANT_BITS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """What to do to one weight matrix: ``sparsity`` (the fraction pruned; 1 - N/M for a pattern), ``pattern``
    ("N:M" or ``None`` for unstructured) and ``quant_bits`` (joint quantization, or ``None``)."""

    sparsity: float
    pattern: str | None = None
    quant_bits: int | None = None

    @property
    def label(self) -> str:
        """"2:4", "50%", "50%+4bit", ..."""
        base = self.pattern if self.pattern else f"{round(self.sparsity * 100, 2):g}%"
        return base + (f"+{self.quant_bits}bit" if self.quant_bits else "")

    def prune_kwargs(self) -> dict:
        """The matching keyword arguments of :func:`sparsegpt_kernels.prune_model`."""
        if self.pattern is not None:
            return {"pattern": self.pattern, "quant_bits": self.quant_bits}
        return {"sparsity": self.sparsity, "quant_bits": self.quant_bits}


def parse_setting(value, what: str = "setting", *, allow_quant: bool = False, allow_pattern: bool = True) -> Setting:
    """A sparsity in [0, 1) (a number, "0.5" or "50%") or, with ``allow_pattern``, an "N:M" pattern; with
    ``allow_quant`` also a "+<b>bit" suffix. ``what`` names the value in error messages."""
    quant = None
    if isinstance(value, str):
        text = value.strip().lower()
        if "+" in text:
            text, q = text.split("+", 1)
            if not allow_quant:
                raise ValueError(f"{what}: {value!r} has a quantization suffix, which is not accepted here")
            bits = int(q[:-3]) if q.endswith("bit") and q[:-3].isdigit() else None
            if bits is None or not MIN_QUANT_BITS <= bits <= MAX_QUANT_BITS:
                raise ValueError(f"{what}: expected a suffix like '+4bit' ({MIN_QUANT_BITS} to {MAX_QUANT_BITS} "
                                 f"bits), got {value!r}")
            quant = bits
        if ":" in text:
            if not allow_pattern:
                raise ValueError(f"{what}: expected a sparsity like 0.5 or '50%', got the pattern {value!r}")
            n, m = parse_pattern(text)
            return Setting(1 - n / m, f"{n}:{m}", quant)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            kinds = "a sparsity like 0.5 or '50%'" + (" or a pattern like '2:4'" if allow_pattern else "")
            raise ValueError(f"{what}: expected {kinds}, got {value!r}") from None
    if not _is_number(value) or not 0 <= value < 1:
        tail = " or an 'N:M' pattern" if allow_pattern else ""
        raise ValueError(f"{what}: sparsity must be in [0, 1){tail}, got {value!r}")
    return Setting(float(value), None, quant)


@dataclass(frozen=True)
class PruneOptions:
    """The validated settings of a prune; every check runs in ``__post_init__``, so an instance is always valid.

    Attributes:
        sparsity: fraction of the weights pruned (unstructured), in [0, 1); ``None``: :data:`DEFAULT_SPARSITY`
            unless ``pattern`` is given. Giving both is an error (the pattern fixes the sparsity).
        pattern: "N:M", N kept of every M consecutive input columns (stored normalised, e.g. "2:4").
        block_size: columns per block of the sweep; with an N:M pattern SparseGPT needs a multiple of M.
        damp: relative damping, a finite number > 0.
        quant_bits: joint quantization to this many bits (``MIN_QUANT_BITS``..``MAX_QUANT_BITS``), or ``None``.
        quant_group_size: quantization group along the input dimension (needs ``quant_bits``), or ``None`` (one
            group per row). Whether it divides a layer's width is checked per layer.
        method: one of :data:`METHODS`.
        allocation: one of :data:`ALLOCATIONS` (whole models only; N:M patterns need "uniform").
        owl_m, owl_lambda: the OWL allocation's constants.
        backend: "auto" or one of :data:`BACKENDS`.
        refine: one of :data:`REFINES` ("admm" needs method "sparsegpt").
        refine_iters, refine_cg_iters: the refinement's ADMM and conjugate-gradient iterations, ints >= 0.
        refine_tol: their relative tolerance, a finite number > 0.
        refine_mask: one of :data:`REFINE_MASKS`.
        hessian_products: one of :data:`HESSIAN_PRODUCTS` (whole models only: how the calibration Hessians are
            multiplied).
    """

    sparsity: float | None = None
    pattern: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    damp: float = DEFAULT_DAMP
    quant_bits: int | None = None
    quant_group_size: int | None = None
    method: str = "sparsegpt"
    allocation: str = "uniform"
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    backend: str = "auto"
    refine: str = "none"
    refine_iters: int = DEFAULT_REFINE_ITERS
    refine_cg_iters: int = DEFAULT_REFINE_CG_ITERS
    refine_tol: float = DEFAULT_REFINE_TOL
    refine_mask: str = "move"
    hessian_products: str = "float32"
    _nm: tuple[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            if self.sparsity is not None:
                raise ValueError(f"give either sparsity ({self.sparsity!r}) or pattern ({self.pattern!r}), not both: "
                                 "an N:M pattern fixes the sparsity at 1 - N/M")
            n, m = parse_pattern(self.pattern)
            object.__setattr__(self, "pattern", f"{n}:{m}")
            object.__setattr__(self, "_nm", (n, m))
        elif self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self._nm is not None and self.method == "sparsegpt" and self.block_size % self._nm[1]:
            raise ValueError(f"pattern {self.pattern!r}: block_size={self.block_size} is not a multiple of "
                             f"M={self._nm[1]}")
        if not _is_number(self.damp) or not math.isfinite(self.damp) or self.damp <= 0:
            raise ValueError(f"damp must be a finite number > 0, got {self.damp!r}")
        object.__setattr__(self, "damp", float(self.damp))
        if self.quant_bits is not None:
            check_quant_bits(self.quant_bits)
        if self.quant_group_size is not None:
            if self.quant_bits is None:
                raise ValueError("quant_group_size needs quant_bits")
            if not _is_int(self.quant_group_size) or self.quant_group_size < 1:
                raise ValueError(f"quant_group_size must be a positive int, got {self.quant_group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and self.pattern is not None:
            raise ValueError(f"allocation={self.allocation!r} spreads an unstructured sparsity over the layers; the "
                             f"N:M pattern {self.pattern!r} fixes every layer's sparsity (use allocation='uniform')")
        for name in ("owl_m", "owl_lambda"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {type(self.backend).__name__}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
        self._check_refine()
        if self.hessian_products not in HESSIAN_PRODUCTS:
            raise ValueError(f"hessian_products must be one of {', '.join(HESSIAN_PRODUCTS)}, got "
                             f"{self.hessian_products!r}")

    def _check_refine(self) -> None:
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {', '.join(REFINES)}, got {self.refine!r}")
        if self.refine != "none" and self.method != "sparsegpt":
            raise ValueError(f"refine={self.refine!r} refines SparseGPT's weights; it needs method 'sparsegpt', "
                             f"got {self.method!r}")
        for name in ("refine_iters", "refine_cg_iters"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not _is_number(self.refine_tol) or not math.isfinite(self.refine_tol) or self.refine_tol <= 0:
            raise ValueError(f"refine_tol must be a finite number > 0, got {self.refine_tol!r}")
        object.__setattr__(self, "refine_tol", float(self.refine_tol))
        if self.refine_mask not in REFINE_MASKS:
            raise ValueError(f"refine_mask must be one of {', '.join(REFINE_MASKS)}, got {self.refine_mask!r}")

    # ------------------------------------------------------------------------------------------------ derived values
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the pattern, or ``None`` for unstructured sparsity."""
        return self._nm

    @property
    def fraction(self) -> float:
        """The fraction pruned: 1 - N/M for a pattern, else the sparsity (its default when not given)."""
        if self._nm is not None:
            return 1.0 - self._nm[0] / self._nm[1]
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    @property
    def setting(self) -> Setting:
        """The default :class:`Setting` of every layer."""
        return Setting(self.fraction, self.pattern, self.quant_bits)

    def at(self, setting: Setting) -> PruneOptions:
        """These options with one layer's sparsity or pattern (a per-layer override or an allocated sparsity)."""
        if setting.pattern is not None:
            return replace(self, sparsity=None, pattern=setting.pattern, allocation="uniform")
        return replace(self, sparsity=setting.sparsity, pattern=None)

    def check_layer(self, in_features: int, name: str = "the layer") -> None:
        """What depends on a layer's width: M and the quantization group must divide it."""
        if self._nm is not None and in_features % self._nm[1]:
            raise ValueError(f"pattern {self.pattern!r} does not fit {name}: in_features={in_features} is not a "
                             f"multiple of M={self._nm[1]}")
        g = self.quant_group_size
        if self.quant_bits is not None and g is not None and in_features % g:
            raise ValueError(f"quant_group_size={g} does not divide in_features={in_features} of {name}")

    def record(self) -> dict:
        """The settings as the report and the resume fingerprint record them (the refinement's only when it runs, the
        Hessians' products only when not "float32", so that runs without them keep their fingerprints)."""
        out = {"method": self.method, "sparsity": self.fraction, "pattern": self.pattern,
               "quant_bits": self.quant_bits, "quant_group_size": self.quant_group_size,
               "block_size": self.block_size, "damp": self.damp}
        if self.refine != "none":
            out.update(refine=self.refine, refine_iters=self.refine_iters, refine_cg_iters=self.refine_cg_iters,
                       refine_tol=self.refine_tol, refine_mask=self.refine_mask)
        if self.hessian_products != "float32":
            out.update(hessian_products=self.hessian_products)
        return out
