"""Running-mean Hessian of a linear layer's inputs: H = (2 / n) Σ x xᵀ over the n input vectors seen."""

from __future__ import annotations

import math

import torch

from .options import HESSIAN_PRODUCTS as PRODUCTS
from .precision import ieee_float32_matmul

#: rows of one tile of the symmetric update
SYMMETRIC_TILE = 256
#: inputs from this width on accumulate only the upper triangle (0.75x the update time at 576 columns, 0.65x at 1536,
#: 0.61x at 4096; benchmarks/RESULTS.md); narrower ones, whose tiles would be the whole matrix, take the full product
SYMMETRIC_MIN_COLS = 2 * SYMMETRIC_TILE
# How the products x xᵀ are formed (PRODUCTS, defined in options.py): "float32" casts the inputs to the accumulation
# dtype first (IEEE products and sums, as the published code does); "input" multiplies bfloat16 / float16 inputs on a
# CUDA device as they are, on its tensor cores with float32 accumulation. The product of two bfloat16 or float16
# numbers is exact in float32, so only the order of the float32 sums differs; float32 inputs, float64 accumulation and
# other devices take "float32".


def _addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float, native: bool) -> None:
    """out = beta·out + alpha·(a @ b) in place; ``native``: a and b are bfloat16 / float16 on CUDA, multiplied as they
    are with float32 accumulation (cuBLAS through ``mm``'s ``out_dtype``; ``addmm``'s wants ``out`` in their dtype),
    then scaled into the float32 ``out``."""
    if native:
        out.mul_(beta).add_(torch.mm(a, b, out_dtype=torch.float32), alpha=alpha)
    else:
        out.addmm_(a, b, beta=beta, alpha=alpha)


class HessianAccumulator:
    """Accumulates H = (2/n) Σ xᵢ xᵢᵀ over every input vector xᵢ a layer saw.

    The mean is over input vectors (tokens), so the result does not depend on how inputs are batched; the scale of H
    does not change what SparseGPT does (damping is relative to its mean diagonal).

    Args:
        in_features: width of the inputs (the layer's ``in_features``).
        device: where H lives. ``None``: on the device of the first batch passed to :meth:`update`.
            Inputs on another device are copied to it (so activations on a GPU can feed a Hessian kept elsewhere).
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
        check_each: check every batch for NaN / Inf before adding it (default; one host synchronisation per
            :meth:`update`, and a bad batch leaves the Hessian as it was). ``False`` defers the check to
            :meth:`check_finite`, once after all the updates (the pipeline does this once per block, so that
            activations on a GPU never wait for the host).
        products: one of :data:`PRODUCTS` ("float32", the default, or "input": bfloat16 / float16 inputs on CUDA
            multiplied on tensor cores with float32 accumulation).

    Only the upper triangle is accumulated for inputs of ``SYMMETRIC_MIN_COLS`` and more (row tiles of the symmetric
    rank-k update, about (1/2 + tile / (2 · in_features)) of the full product's work); the lower one is filled from
    it when :attr:`hessian` is read, so the result is exactly symmetric.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 check_each: bool = True, products: str = "float32"):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if products not in PRODUCTS:
            raise ValueError(f"products must be one of {', '.join(PRODUCTS)}, got {products!r}")
        self.products = products
        self.in_features = in_features
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._H: torch.Tensor | None = None
        self._lower_stale = False
        self.check_each = bool(check_each)
        self.count = 0

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._H is None:
            self.device = device if self.device is None else self.device
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        return self._H

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` of shape (..., in_features)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if not (x.is_floating_point()):
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        native = self.uses_input_products(x)
        H = self._buffer(x.device)
        x = x.reshape(-1, self.in_features).to(device=H.device, dtype=x.dtype if native else self.dtype)
        b = x.shape[0]
        if b == 0:
            return
        # one reduction instead of an elementwise isfinite (35x faster on a (256, 1536) batch): NaN and ±Inf reach
        # the sum, and a finite batch whose sum overflows has squares that overflow the Hessian as well
        if self.check_each and not math.isfinite(float(x.sum())):
            raise ValueError("x contains NaN or Inf (or values too large for the Hessian); the Hessian was not updated")
        n = self.count
        beta, alpha = n / (n + b), 2.0 / (n + b)  # the running mean's rescaling inside the GEMM
        c, t = self.in_features, SYMMETRIC_TILE
        with ieee_float32_matmul():  # no TF32 / bfloat16 products in the Hessian, whatever the global setting
            if c < max(SYMMETRIC_MIN_COLS, 2 * t):
                _addmm_into(H, x.T, x, beta, alpha, native)
            else:  # the upper triangle, one row tile at a time: H[i:i+t, i:] += x[:, i:i+t]ᵀ x[:, i:]
                for i in range(0, c, t):
                    _addmm_into(H[i:i + t, i:], x[:, i:i + t].T, x[:, i:], beta, alpha, native)
                self._lower_stale = True
        self.count = n + b

    def uses_input_products(self, x: torch.Tensor) -> bool:
        """Whether a batch ``x`` is multiplied in its own dtype (``products="input"``, bfloat16 / float16 inputs, a
        float32 Hessian on a CUDA device) rather than cast to float32 first."""
        device = self.device if self.device is not None else x.device  # where the Hessian is or will be
        return (self.products == "input" and x.dtype in (torch.bfloat16, torch.float16) and
                self.dtype == torch.float32 and device.type == "cuda")

    def check_finite(self, what: str = "the Hessian") -> None:
        """Raise ``ValueError`` naming ``what`` if the inputs seen held NaN or Inf (or values whose squares overflow):
        the deferred check of ``check_each=False``, one pass over the Hessian."""
        if self._H is not None and not bool(torch.isfinite(self._H).all()):
            raise ValueError(f"{what}: the inputs contain NaN or Inf (or values too large for the Hessian)")

    @property
    def hessian(self) -> torch.Tensor:
        """The (in_features, in_features) Hessian (zeros before any update)."""
        H = self._buffer(self.device or torch.device("cpu"))
        if self._lower_stale:  # the lower triangle from the upper one, a tile at a time (no full-size temporaries)
            t = SYMMETRIC_TILE
            for i in range(0, self.in_features, t):
                d = H[i:i + t, i:i + t]
                d.copy_(torch.triu(d) + torch.triu(d, 1).T)
                H[i + t:, i:i + t].copy_(H[i:i + t, i + t:].T)
            self._lower_stale = False
        return H

    def reset(self) -> None:
        """Forget every input seen (keeps the buffer)."""
        if self._H is not None:
            self._H.zero_()
        self._lower_stale = False
        self.count = 0

    def __repr__(self) -> str:
        dev = self.device if self.device is not None else "lazy"
        return (f"HessianAccumulator(in_features={self.in_features}, count={self.count}, dtype={self.dtype}, "
                f"device={dev})")
