"""The compressed form of one pruned weight matrix (docs/sparse_format.md states it for readers in any language).

A (rows, cols) weight is stored as

* ``mask``: uint8 (rows, ceil(cols / 8)), one bit per weight: bit ``j % 8`` (least significant first) of byte
  ``j // 8`` of row ``r`` is 1 when ``W[r, j]`` is not zero; the padding bits of a row's last byte are 0;
* and either ``values``: the non-zero weights in row-major order, (nnz,), in the weight's dtype;
* or, for a jointly quantized weight, ``codes``: the grid indices of the non-zero weights in row-major order, packed
  two to a byte (4 bits: low nibble first; every row starts on a byte, so a row with an odd count ends with a zero
  nibble) or one to a byte (5..8 bits), with ``scale``: float32 (rows, cols / group_size) and ``zero``: uint8 (same
  shape), so that ``W[r, j] = cast(scale[r, g] * (code - zero[r, g]))`` in float32 with ``g = j // group_size``:
  exactly the values the pruning wrote.

N:M layers are stored the same way, with their pattern recorded: for M = 4 the bitmask is exactly as large as
2-bit indices of the kept weights (M bits per N = M/2 kept), for larger M it is smaller, and one kernel reads every
layer. A -0.0 in the dense weight is a zero and comes back as +0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..options import MAX_QUANT_BITS, MIN_QUANT_BITS, parse_pattern

#: dtypes a weight's values may have
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_BIT = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


class SparseFormatError(ValueError):
    """A compressed weight (or a checkpoint of them) is malformed: the message names the tensor and the problem."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_of(name: str, what: str) -> torch.dtype:
    for dt, n in _DTYPE_NAMES.items():
        if n == name:
            return dt
    raise SparseFormatError(f"{what}: unknown dtype {name!r} (expected one of {', '.join(_DTYPE_NAMES.values())})")


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, least significant bit first."""
    rows, cols = keep.shape
    nb = (cols + 7) // 8
    padded = torch.zeros(rows, nb * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :cols] = keep
    return (padded.reshape(rows, nb, 8) * _BIT.to(keep.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: (rows, nb) uint8 -> (rows, cols) bool."""
    bits = mask[..., None].bitwise_and(_BIT.to(mask.device)).ne(0)
    return bits.reshape(mask.shape[0], -1)[:, :cols]


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Kept weights per row (int64), from the packed mask."""
    table = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=mask.device)
    return table[mask.long()].sum(-1)


def code_bytes_per_row(counts: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes of every row's codes: a row starts on a byte."""
    return (counts + 1) // 2 if bits <= 4 else counts


def pack_codes(codes: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    """The row-major codes (nnz,) of rows with ``counts`` kept weights, packed as the module docstring says."""
    if bits > 4:
        return codes.to(torch.uint8)
    out = []
    for row in torch.split(codes.to(torch.uint8), counts.tolist()):
        if row.numel() % 2:
            row = torch.cat((row, row.new_zeros(1)))
        out.append(row[0::2] | (row[1::2] << 4))
    return torch.cat(out) if out else codes.new_zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: (nnz,) int64 codes."""
    if bits > 4:
        return packed.long()
    both = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1).long()
    nbytes = code_bytes_per_row(counts, bits)
    keep = torch.ones(both.numel(), dtype=torch.bool)
    ends = 2 * torch.cumsum(nbytes, 0)
    odd = (counts % 2).bool()
    keep[(ends[odd] - 1)] = False  # the padding nibble of each odd row
    return both[keep]


@dataclass
class CompressedWeight:
    """One pruned (rows, cols) weight in the compressed form of the module docstring."""

    shape: tuple[int, int]
    dtype: torch.dtype
    mask: torch.Tensor
    values: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    bits: int | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int | None = None
    pattern: str | None = None

    # ------------------------------------------------------------------------------------------------ making one
    @classmethod
    def compress(cls, weight: torch.Tensor, *, pattern: str | None = None, quant=None) -> CompressedWeight:
        """The compressed form of a 2-D (out, in) weight. ``quant``: the :class:`~sparsegpt_kernels.spec.QuantGrid`
        the pruning used (codes are stored when every non-zero weight is exactly on it, else the values are);
        ``pattern``: "N:M", checked (at most N non-zeros in every group of M)."""
        W = weight.detach().cpu()
        if W.dim() != 2:
            raise SparseFormatError(f"a weight must be 2-D (out, in), got shape {tuple(W.shape)}")
        if W.dtype not in VALUE_DTYPES:
            raise SparseFormatError(f"a weight must be float16, bfloat16 or float32, got {W.dtype}")
        rows, cols = W.shape
        keep = W != 0
        mask = pack_mask(keep)
        if pattern is not None:
            pattern = _check_pattern(keep, pattern, "the weight")
        out = cls((rows, cols), W.dtype, mask, pattern=pattern)
        if quant is not None:
            codes = _codes_on_grid(W, keep, quant)
            if codes is not None:
                bits = int(round(math.log2(quant.maxq + 1)))
                out.codes = pack_codes(codes, keep.sum(1), bits)
                out.bits, out.group_size = bits, int(quant.group_size)
                out.scale = quant.scale.detach().to("cpu", torch.float32).contiguous()
                out.zero = quant.zero.detach().cpu().round().to(torch.uint8).contiguous()
                return out
        out.values = W[keep].contiguous()
        return out

    # ------------------------------------------------------------------------------------------------ reading one
    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def nnz(self) -> int:
        return int(row_counts(self.mask).sum())

    def decompress(self) -> torch.Tensor:
        """The dense (rows, cols) weight in its dtype, bit for bit what was compressed (zeros as +0.0)."""
        rows, cols = self.shape
        keep = unpack_mask(self.mask, cols)
        W = torch.zeros(rows, cols, dtype=self.dtype, device=self.mask.device)
        W[keep] = self.kept_values()
        return W

    def kept_values(self) -> torch.Tensor:
        """The non-zero weights in row-major order, in the weight's dtype (dequantized for codes)."""
        if not self.quantized:
            return self.values
        rows, cols = self.shape
        keep = unpack_mask(self.mask, cols)
        counts = row_counts(self.mask)
        codes = unpack_codes(self.codes, counts, self.bits).to(self.mask.device)
        r, j = keep.nonzero(as_tuple=True)
        g = j // self.group_size
        q = self.scale[r, g] * (codes.to(torch.float32) - self.zero[r, g].to(torch.float32))
        return q.to(self.dtype)

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        ts = (self.mask, self.values, self.codes, self.scale, self.zero)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # ------------------------------------------------------------------------------------------------ files
    def meta(self) -> dict:
        """The layer's entry of the checkpoint's layer table (config.json)."""
        m = {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "pattern": self.pattern}
        if self.quantized:
            m.update(bits=self.bits, group_size=self.group_size)
        return m

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors to store, named ``<prefix>.weight_<part>``."""
        parts = {"mask": self.mask, "values": self.values, "codes": self.codes, "scale": self.scale,
                 "zero": self.zero}
        return {f"{prefix}.weight_{k}": v for k, v in parts.items() if v is not None}

    @staticmethod
    def tensor_names(prefix: str, meta: dict) -> list[str]:
        parts = ["mask", "codes", "scale", "zero"] if meta.get("bits") else ["mask", "values"]
        return [f"{prefix}.weight_{p}" for p in parts]

    @classmethod
    def from_tensors(cls, prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> CompressedWeight:
        """The weight ``prefix`` from its table entry and tensors, every property of the format checked first."""
        what = f"layer {prefix!r}"
        try:
            rows, cols = (int(x) for x in meta["shape"])
            dtype = dtype_of(meta["dtype"], what)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SparseFormatError):
                raise
            raise SparseFormatError(f"{what}: the layer table needs 'shape' [rows, cols] and 'dtype'") from None
        if rows < 1 or cols < 1:
            raise SparseFormatError(f"{what}: shape {[rows, cols]} has an empty dimension")
        names = cls.tensor_names(prefix, meta)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SparseFormatError(f"{what}: the checkpoint has no tensor {missing[0]!r}")
        mask = tensors[names[0]]
        _expect(mask, names[0], torch.uint8, (rows, (cols + 7) // 8))
        if cols % 8 and bool((mask[:, -1] >> (cols % 8)).any()):
            raise SparseFormatError(f"{names[0]}: padding bits beyond column {cols} are set")
        counts = row_counts(mask)
        nnz = int(counts.sum())
        pattern = meta.get("pattern")
        if pattern is not None:
            pattern = _check_pattern(unpack_mask(mask, cols), pattern, names[0])
        out = cls((rows, cols), dtype, mask, pattern=pattern)
        if not meta.get("bits"):
            values = tensors[names[1]]
            _expect(values, names[1], dtype, (nnz,), counted=True)
            out.values = values
            return out
        bits, group = meta.get("bits"), meta.get("group_size")
        if not (isinstance(bits, int) and MIN_QUANT_BITS <= bits <= MAX_QUANT_BITS):
            raise SparseFormatError(f"{what}: bits must be an int in {MIN_QUANT_BITS}..{MAX_QUANT_BITS}, got {bits!r}")
        if not (isinstance(group, int) and group >= 1 and cols % group == 0):
            raise SparseFormatError(f"{what}: group_size must be a positive int dividing {cols}, got {group!r}")
        codes, scale, zero = (tensors[n] for n in names[1:])
        _expect(codes, names[1], torch.uint8, (int(code_bytes_per_row(counts, bits).sum()),), counted=True)
        _expect(scale, names[2], torch.float32, (rows, cols // group))
        _expect(zero, names[3], torch.uint8, (rows, cols // group))
        maxq = (1 << bits) - 1
        if codes.numel():
            each = torch.stack((codes & 0xF, codes >> 4)) if bits <= 4 else codes
            if int(each.max()) > maxq:
                raise SparseFormatError(f"{names[1]}: codes above {maxq} for {bits}-bit codes")
        if zero.numel() and int(zero.max()) > maxq:
            raise SparseFormatError(f"{names[3]}: zero points above {maxq} for {bits}-bit codes")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise SparseFormatError(f"{names[2]}: scales must be finite and > 0")
        out.codes, out.scale, out.zero, out.bits, out.group_size = codes, scale, zero, bits, group
        return out


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, counted: bool = False) -> None:
    if t.dtype != dtype:
        raise SparseFormatError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        why = " (the mask's popcount says how many entries there are)" if counted else ""
        raise SparseFormatError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}{why}")


def _check_pattern(keep: torch.Tensor, pattern: str, what: str) -> str:
    try:
        n, m = parse_pattern(pattern)
    except (TypeError, ValueError) as e:
        raise SparseFormatError(f"{what}: {e}") from None
    rows, cols = keep.shape
    if cols % m:
        raise SparseFormatError(f"{what}: pattern {pattern!r} does not fit {cols} columns")
    over = keep.reshape(rows, cols // m, m).sum(-1) > n
    if bool(over.any()):
        r, g = (int(v) for v in over.nonzero()[0])
        raise SparseFormatError(f"{what}: not {n}:{m}: row {r}, columns {g * m}..{g * m + m - 1} keep more than {n}")
    return f"{n}:{m}"


def _codes_on_grid(W: torch.Tensor, keep: torch.Tensor, quant) -> torch.Tensor | None:
    """The grid indices of the non-zero weights (row-major) when dequantizing them gives every one back bit for bit,
    else ``None``."""
    rows, cols = W.shape
    scale = quant.scale.detach().to("cpu", torch.float32)
    zero = quant.zero.detach().to("cpu", torch.float32)
    if tuple(scale.shape) != (rows, cols // quant.group_size) or tuple(zero.shape) != tuple(scale.shape):
        return None
    r, j = keep.nonzero(as_tuple=True)
    g = j // quant.group_size
    s, z = scale[r, g], zero[r, g]
    codes = torch.clamp(torch.round(W[keep].to(torch.float32) / s + z), 0, quant.maxq)
    back = (s * (codes - z)).to(W.dtype)
    if not torch.equal(back, W[keep]):
        return None
    return codes.to(torch.int64)
