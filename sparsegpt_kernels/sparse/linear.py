""":class:`SparseLinear`: a linear layer that keeps its pruned weight compressed (:mod:`.format`) and computes
y = x Wᵀ + b from it.

The layer holds the compressed tensors as buffers (they move with ``.to(device)``, and ``.to(dtype)`` casts the stored
values like any weight; the quantization scales are kept as their float32 bits, so no cast can round them). Two ways
to compute:

* decode (at most ``decode_max_tokens`` input vectors, float32 or bfloat16 on the CPU): the compiled kernel
  ``torch.ops.sparsegpt_kernels.ext_sparse_linear`` reads the mask and the values and never forms the dense weight
  (csrc/core/sparse_linear.h); for jointly quantized layers ``ext_sparse_codes_linear`` reads the mask, the packed
  codes and the group scales (csrc/core/sparse_codes.h), in any of the three dtypes;
* prefill (more input vectors) on a CPU with AVX2 or AVX-512, where it is the faster of the two ways: the compiled panel
  kernel ``ext_sparse_linear_panel`` (``ext_sparse_codes_linear_panel``) reads the compressed weight once per 128
  tokens, x transposed into float32 panels, and never forms the dense weight either (csrc/core/sparse_panel.h);
* prefill otherwise: the weight is decompressed for the call by the compiled ``ext_sparse_to_dense``
  (``ext_sparse_codes_to_dense``) for torch's dense product and dropped after it, so the layer stays small in memory
  (the buffer goes back to the extension's cache of big buffers, and the next layer of that shape reuses it: fresh
  memory would cost a page fault per page, as long as the decompression itself; ``empty_cache`` frees it).

  Which of the two is faster depends on the CPU more than on anything else: the panel does float32 FMAs on the kept
  weights only, torch's product does every weight, at the rate of the CPU's dense kernels for the dtype. On an
  AVX-512 Xeon whose bfloat16 products run at a third of float32's rate the panel was 1.5-1.8x faster than torch's
  bfloat16 product at 50%; on a Zen 5, whose bfloat16 dot products run twice as fast as its float32 FMAs, torch's
  product of the decompressed weight was 1.8x faster than the panel (benchmarks/RESULTS.md). So by default
  (``prefill_kernel = None``) the process measures the two once per input dtype (:func:`prefill_ratio`: a
  1024x2048 layer keeping half its weights, 50-150 ms) and a layer takes the panel when the panel's time, scaled
  by the weights the layer keeps, is below the dense product's; ``prefill_kernel = True`` / ``False`` (on a layer,
  or on the class) or ``SPARSEGPT_KERNELS_PREFILL=panel`` / ``dense`` fixes the choice, so that results do not
  depend on a measurement;
* where no compiled kernel takes the layer (float16 values, a GPU, no compiled extension): the layer makes a dense
  copy of its weight once, says so in one log line, and runs from it; the checkpoint stays small, the memory does
  not.

Every path computes what an ``nn.Linear`` with the same zeros computes: the dense paths exactly (the same product),
the kernels up to float32 rounding (they sum in another order). :meth:`SparseLinear.dense_weight` in pure PyTorch is
the specification of the weight.

:data:`LAST_PATH` counts which way each call went (for tests and benchmarks): "kernel", "panel", "prefill" or
"copy".

A decode call at a small model's shapes is a few microseconds of kernel, so the checks that choose the path are done
once per input dtype and kept as a plan (the op and its arguments); the plan is dropped when the module is cast or
moved, when an attribute or a buffer is set, and is not pickled.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .format import CompressedWeight, code_bytes_per_row, row_counts

#: input vectors up to which the compressed row kernel runs for float32 inputs: on a 2-core AVX2 machine it beat
#: torch's dense product at 4 tokens at every shape measured, and lost at 16 on the small ones; on an AVX-512 Xeon the
#: panel kernel is level with it at 8 float32 tokens and twice as fast at 16 (benchmarks/RESULTS.md)
DECODE_MAX_TOKENS = 8
#: the same for bfloat16 inputs of a layer of values keeping more than ROWS_BF16_MIN_DENSITY of its weights, on a CPU
#: with AVX512-BF16, whose row kernel takes them as they are: at half the weights kept it is level with torch's
#: bfloat16 product at 16 tokens and the panel 5% behind (the panel's time barely grows below 16 tokens and falls
#: with the weights kept, the row kernel's grows with the tokens and hardly depends on the weights kept: at 30% kept
#: the panel is 1.3x ahead at 16 tokens). Quantized layers take the panel from 9 tokens on: their row kernel is the
#: slower one at 16 (benchmarks/RESULTS.md)
DECODE_MAX_TOKENS_BF16 = 16
ROWS_BF16_MIN_DENSITY = 0.4
#: the probe of :func:`prefill_ratio`: a (rows, cols) layer keeping PROBE_DENSITY of its weights, and the tokens of
#: the prompt per input dtype (float32: longer, where torch's float32 product is nearest its peak)
PROBE_SHAPE = (1024, 2048)
PROBE_DENSITY = 0.5
PROBE_TOKENS = {torch.bfloat16: 128, torch.float32: 256}
#: pairs of probe runs per round, rounds until the pairs' ratios lie within a factor PROBE_SPREAD, at most
#: PROBE_MAX_PAIRS pairs
PROBE_PAIRS = 5
PROBE_SPREAD = 1.5
PROBE_MAX_PAIRS = 20
PREFILL_ENV = "SPARSEGPT_KERNELS_PREFILL"
#: calls per path since the process started: "kernel", "prefill" or "copy"
LAST_PATH: collections.Counter = collections.Counter()
logger = logging.getLogger("sparsegpt_kernels")
_said: set[str] = set()
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: values kept beyond the last one in memory, for the kernel's whole-vector reads (sgk::kPadValues in
#: csrc/core/sparse_linear.h; tests/test_sparse.py compares the two)
PAD_VALUES = 16
#: bytes kept beyond the last code in memory, for the kernel's 8-byte reads (sgk::kPadCodeBytes in
#: csrc/core/sparse_codes.h)
PAD_CODE_BYTES = 8


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W kept compressed. Build one with :meth:`from_linear` (or
    :func:`sparsegpt_kernels.to_sparse` for a whole model); :meth:`to_linear` gives the plain layer back."""

    #: how prefill is computed on a CPU that has the panel kernel (module docstring): ``None``, the faster way as
    #: measured by this process (:func:`prefill_ratio`); True, the panel kernel; False, the weight decompressed for
    #: torch's dense product, as on CPUs without AVX2, whose results are those of the dense model bit for bit.
    #: Set on a layer, or on the class for every layer.
    prefill_kernel: bool | None = None

    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """``dtype``: the layer's dtype when it is not the weight's (a quantized weight keeps the dtype its
        dequantized values were rounded to, :attr:`codes_dtype`, and its dense weight is those values cast to
        ``dtype``; values are cast)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.pattern = weight.pattern
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.register_buffer("weight_mask", weight.mask.contiguous())
        # an empty tensor of the weight's dtype: cast with the module, it tells the dtype of the dense weight
        self.register_buffer("weight_dtype_tag", torch.empty(0, dtype=dtype or weight.dtype))
        #: the dtype a quantized weight's values were rounded to when it was pruned (``None`` without codes); it does
        #: not change with ``.to(dtype)``, so the weights stay those of the dense pruned model, cast
        self.codes_dtype = weight.dtype if weight.quantized else None
        counts = row_counts(weight.mask)
        if weight.quantized:
            # padded for the kernel's 8-byte reads, like the values
            pad = torch.zeros(PAD_CODE_BYTES, dtype=torch.uint8)
            self.register_buffer("weight_codes", torch.cat((weight.codes.reshape(-1), pad)))
            self.register_buffer("weight_scale_bits", weight.scale.contiguous().view(torch.int32))
            self.register_buffer("weight_zero", weight.zero.contiguous())
            code_offsets = torch.zeros(self.out_features + 1, dtype=torch.int64)
            torch.cumsum(code_bytes_per_row(counts, self.bits), 0, out=code_offsets[1:])
            self.register_buffer("weight_code_offsets", code_offsets, persistent=False)
            self.code_bytes = int(code_offsets[-1])
        else:
            # padded for the kernel's whole-vector reads (the checkpoint holds exactly the values)
            pad = torch.zeros(PAD_VALUES, dtype=weight.values.dtype)
            self.register_buffer("weight_values", torch.cat((weight.values.reshape(-1), pad)).to(dtype or weight.dtype))
        offsets = torch.zeros(self.out_features + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        self.register_buffer("weight_offsets", offsets, persistent=False)
        self.nnz = int(offsets[-1])
        #: input vectors up to which the row kernel runs (``None``: DECODE_MAX_TOKENS; DECODE_MAX_TOKENS_BF16 for
        #: bfloat16 inputs of values with more than ROWS_BF16_MIN_DENSITY kept, on a CPU with AVX512-BF16)
        self.decode_max_tokens: int | None = None
        self._dense_copy: torch.Tensor | None = None
        #: input dtype -> (the largest input numel of the decode call, the op, its arguments after x): see forward
        self._plans: dict = {}
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # ------------------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_linear(cls, linear: nn.Module, *, pattern: str | None = None, quant=None) -> SparseLinear:
        """The compressed form of a (pruned) ``nn.Linear`` or transformers ``Conv1D``; ``pattern`` ("N:M") is
        recorded and checked, ``quant`` (the pruning's :class:`~sparsegpt_kernels.spec.QuantGrid`) stores grid codes
        instead of values."""
        W = linear_weight(linear)
        if W is None:
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        out = cls(CompressedWeight.compress(W, pattern=pattern, quant=quant), getattr(linear, "bias", None))
        return out.to(W.device)

    def compressed(self) -> CompressedWeight:
        """The layer's weight as a :class:`~.format.CompressedWeight` (views of the buffers, on the CPU)."""
        dtype = self.weight_dtype_tag.dtype
        mask = self.weight_mask.cpu()
        if self.bits:
            return CompressedWeight((self.out_features, self.in_features), self.codes_dtype, mask,
                                    codes=self.weight_codes[: self.code_bytes].cpu(),
                                    bits=self.bits, scale=self.weight_scale_bits.cpu().view(torch.float32),
                                    zero=self.weight_zero.cpu(), group_size=self.group_size, pattern=self.pattern)
        return CompressedWeight((self.out_features, self.in_features), dtype, mask,
                                values=self.weight_values[: self.nnz].cpu().to(dtype), pattern=self.pattern)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight, decompressed, in the layer's dtype and on its device."""
        return self.compressed().decompress().to(self.weight_mask.device, self.weight_dtype)

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the decompressed weight (bit for bit what was compressed)."""
        W = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(W, requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return lin

    # ------------------------------------------------------------------------------------------------ compute
    @property
    def weight_dtype(self) -> torch.dtype:
        return self.weight_dtype_tag.dtype

    def _compiled(self, x: torch.Tensor) -> str | None:
        """Why the compiled kernels cannot take this layer with input ``x`` (``None`` when they can)."""
        stored = self.weight_codes if self.bits else self.weight_values
        if x.device.type != "cpu" or stored.device.type != "cpu":
            return f"tensors on {x.device.type}"
        if x.dtype not in _KERNEL_DTYPES:
            return f"{x.dtype} input"
        if not self.bits and self.weight_values.dtype not in _KERNEL_DTYPES:
            return f"{str(self.weight_values.dtype).replace('torch.', '')} values"
        if self.bits and self.weight_dtype not in (torch.float32, self.codes_dtype):  # a second rounding
            return (f"{str(self.codes_dtype).replace('torch.', '')} codes in a "
                    f"{str(self.weight_dtype).replace('torch.', '')} layer")
        if not _kernel_available():
            return "no compiled extension"
        return None

    def decode_limit(self, dtype: torch.dtype) -> int:
        """Input vectors up to which inputs of ``dtype`` take the row kernel (:attr:`decode_max_tokens`)."""
        if self.decode_max_tokens is not None:
            return self.decode_max_tokens
        dense_enough = self.nnz > ROWS_BF16_MIN_DENSITY * self.out_features * self.in_features
        if dtype == torch.bfloat16 and not self.bits and dense_enough and _cpu_has("bf16_dot"):
            return DECODE_MAX_TOKENS_BF16
        return DECODE_MAX_TOKENS

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs the compressed row kernel on ``x`` (see the module docstring)."""
        return x.numel() <= self.decode_limit(x.dtype) * self.in_features and self._compiled(x) is None

    def uses_panel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs the panel kernel on ``x`` (a prefill, where it is the faster way)."""
        return (not self.uses_kernel(x) and self._compiled(x) is None and self._panel_takes(x))

    def _panel_takes(self, x: torch.Tensor) -> bool:
        if self.prefill_kernel is False or not _cpu_has("panel"):
            return False
        if self.prefill_kernel is True:
            return True
        ratio = prefill_ratio(x.dtype)
        density = self.nnz / max(1, self.out_features * self.in_features)
        return ratio * density / PROBE_DENSITY < 1.0

    # The decode plans (module docstring): the checks of :meth:`_forward` (buffer look-ups, device and dtype checks)
    # took about 5 us a call, as long as the kernel at SmolLM2's k/v projections.
    def __setattr__(self, name: str, value) -> None:
        plans = self.__dict__.get("_plans")
        if plans:
            plans.clear()
        super().__setattr__(name, value)

    def __getstate__(self):  # pickling (torch.save of the module) keeps no plan: ops are not picklable
        return {**self.__dict__, "_plans": {}}

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.get("_plans", {}).clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = None if torch.compiler.is_compiling() or not x.is_cpu else self._plans.get(x.dtype)
        if plan is not None and x.numel() <= plan[0]:
            LAST_PATH["kernel"] += 1
            return plan[1](x, *plan[2])
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        why_not = self._compiled(x)
        decode = x.numel() <= self.decode_limit(x.dtype) * self.in_features
        panel = why_not is None and not decode and self._panel_takes(x)
        if why_not is None and self.bits:
            ops = torch.ops.sparsegpt_kernels
            args = (self.weight_mask, self.weight_codes, self.weight_code_offsets,
                    self.weight_scale_bits.view(torch.float32), self.weight_zero, self.bits, self.group_size,
                    self.codes_dtype)
            if decode:
                LAST_PATH["kernel"] += 1
                self._plan(x, ops.ext_sparse_codes_linear, (*args, self.bias))
                return ops.ext_sparse_codes_linear(x, *args, self.bias)
            if panel:
                LAST_PATH["panel"] += 1
                return ops.ext_sparse_codes_linear_panel(x, *args, self.bias)
            LAST_PATH["prefill"] += 1
            W = ops.ext_sparse_codes_to_dense(*args, self.in_features)
            return F.linear(x, W.to(x.dtype), self._bias_as(x))
        if why_not is None:
            ops = torch.ops.sparsegpt_kernels
            args = (self.weight_mask, self.weight_values, self.weight_offsets, self.bias)
            if decode:
                LAST_PATH["kernel"] += 1
                self._plan(x, ops.ext_sparse_linear, args)
                return ops.ext_sparse_linear(x, *args)
            if panel:
                LAST_PATH["panel"] += 1
                return ops.ext_sparse_linear_panel(x, *args)
            LAST_PATH["prefill"] += 1
            W = ops.ext_sparse_to_dense(self.weight_mask, self.weight_values, self.weight_offsets, self.in_features)
            return F.linear(x, W.to(x.dtype), self._bias_as(x))
        LAST_PATH["copy"] += 1
        copy = self._dense_copy
        if copy is None or copy.device != x.device or copy.dtype != self.weight_dtype:
            if why_not not in _said:
                _said.add(why_not)
                logger.warning("sparsegpt_kernels: SparseLinear has no compressed kernel for %s: these layers run "
                               "from a dense copy of their weight (the checkpoint stays small, the memory does not)",
                               why_not)
            copy = self._dense_copy = self.dense_weight().to(x.device)
        return F.linear(x, copy.to(x.dtype), self._bias_as(x))

    def _plan(self, x: torch.Tensor, op, args: tuple) -> None:
        """Keep the decode call for inputs of ``x``'s dtype (on the CPU: the only place the kernels run)."""
        if not torch.compiler.is_compiling():
            self._plans[x.dtype] = (self.decode_limit(x.dtype) * self.in_features, op, args)

    def _bias_as(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def nbytes(self) -> int:
        """Bytes of the compressed weight (the buffers, without the bias)."""
        out = 0
        for n, b in self.named_buffers():
            if n == "weight_values":
                out += self.nnz * b.element_size()
            elif n == "weight_codes":
                out += self.code_bytes
            elif n not in ("weight_dtype_tag", "weight_offsets", "weight_code_offsets"):
                out += b.numel() * b.element_size()
        return out

    def extra_repr(self) -> str:
        kind = f"{self.bits}-bit codes" if self.bits else "values"
        pat = f", pattern={self.pattern}" if self.pattern else ""
        dense = self.in_features * self.out_features * torch.empty(0, dtype=self.weight_dtype).element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={str(self.weight_dtype).replace('torch.', '')}{pat}, {kind}, "
                f"{self.nbytes() / dense:.3f}x the dense bytes")


def linear_weight(mod: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored (in, out)); ``None`` for other
    modules."""
    from ..api import is_conv1d

    if isinstance(mod, nn.Linear):
        return mod.weight
    if is_conv1d(mod):
        return mod.weight.T
    return None


def _kernel_available() -> bool:
    from ..backends import extension

    return extension.load() is not None


_CPU: dict[str, bool] = {}


def _cpu_has(what: str) -> bool:
    """What the compiled kernels run here: "panel" (a SIMD copy of the panel kernel: AVX-512 or AVX2) or "bf16_dot"
    (the row kernels' bfloat16 dot products); asked once (the SIMD choice is fixed per process), False without the
    extension, and False under torch.compile before it was asked in eager mode."""
    if what not in _CPU:
        if torch.compiler.is_compiling():
            # the questions are ops returning bools, which a traced graph cannot hold: before the first eager call a
            # compiled model takes the paths that need neither (the same results up to float32 rounding)
            return False
        ops = torch.ops.sparsegpt_kernels
        _CPU[what] = _kernel_available() and bool(ops.ext_cpu_has_panel() if what == "panel"
                                                  else ops.ext_cpu_has_bf16_dot())
    return _CPU[what]


#: input dtype -> the panel kernel's time over the decompressed dense product's on the probe (prefill_ratio)
_PREFILL_RATIO: dict[torch.dtype, float] = {}


def prefill_ratio(dtype: torch.dtype) -> float:
    """The panel kernel's time over that of the decompressed weight's dense product for a prompt of ``dtype`` on
    this CPU, measured once per process and dtype (``PROBE_SHAPE`` keeping ``PROBE_DENSITY``, ``PROBE_TOKENS``
    tokens: the median ratio of pairs of runs, one of each, more pairs while they disagree); a layer keeping a
    fraction ``d`` of its weights takes the panel when ``ratio * d / PROBE_DENSITY < 1``.
    ``SPARSEGPT_KERNELS_PREFILL=panel`` gives 0 and ``dense`` infinity without measuring; so does torch.compile
    before the first measurement (nothing is timed inside a trace, which then takes the decompressed weight, as
    :func:`_cpu_has` does there; nothing is kept)."""
    forced = os.environ.get(PREFILL_ENV, "").strip().lower()
    if forced:
        if forced not in ("panel", "dense", "auto"):
            raise ValueError(f"{PREFILL_ENV}={forced!r}: expected panel, dense or auto")
        if forced != "auto":
            return 0.0 if forced == "panel" else math.inf
    if dtype not in _PREFILL_RATIO:
        if torch.compiler.is_compiling():
            return math.inf
        _PREFILL_RATIO[dtype] = _measure_prefill(dtype)
    return _PREFILL_RATIO[dtype]


def _measure_prefill(dtype: torch.dtype) -> float:
    if not _cpu_has("panel"):
        return math.inf  # nothing to measure: prefill decompresses
    dt = dtype if dtype in _KERNEL_DTYPES else torch.float32
    rows, cols = PROBE_SHAPE
    T = PROBE_TOKENS.get(dt, 128)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(rows, cols, generator=g) < PROBE_DENSITY
    W = (torch.randn(rows, cols, generator=g) * keep).to(dt)
    lin = SparseLinear(CompressedWeight.compress(W))
    x = torch.randn(T, cols, generator=g).to(dt)
    ops = torch.ops.sparsegpt_kernels
    args = (lin.weight_mask, lin.weight_values, lin.weight_offsets)

    def panel():
        return ops.ext_sparse_linear_panel(x, *args, None)

    def dense():
        return F.linear(x, ops.ext_sparse_to_dense(*args, cols).to(dt))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    panel(), dense()  # warm-up: the caches, the extension's big buffer for the dense weight
    # pairs of runs, one right after the other, and the median of their ratios: a slow spell of a shared machine
    # (another tenant, a preempted thread) slows both of a pair or stays one outlier; more pairs while they disagree
    pairs: list[tuple[float, float]] = []
    while len(pairs) < PROBE_MAX_PAIRS:
        pairs += [(timed(panel), timed(dense)) for _ in range(PROBE_PAIRS)]
        ratios = sorted(p / d for p, d in pairs)
        if ratios[-1] <= PROBE_SPREAD * ratios[0]:
            break
    ratio = statistics.median(ratios)
    panel_s, dense_s = statistics.median(p for p, _ in pairs), statistics.median(d for _, d in pairs)
    name = str(dt).replace("torch.", "")
    logger.info("sparsegpt_kernels: %s prompts on this CPU: the panel kernel %.2f ms, the decompressed weight's dense "
                "product %.2f ms (%dx%d keeping %.0f%%, %d tokens): layers keeping up to %.0f%% of their weights take "
                "the panel, denser ones the dense product (SparseLinear.prefill_kernel, %s fix the choice)",
                name, 1e3 * panel_s, 1e3 * dense_s, rows, cols, 100 * PROBE_DENSITY, T,
                min(100.0, 100 * PROBE_DENSITY / ratio), PREFILL_ENV)
    return ratio
