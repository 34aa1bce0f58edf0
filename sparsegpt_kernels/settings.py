"""The one parser of pruning settings: "N:M" patterns, sparsities ("50%", "0.5", 0.5) and an optional "+4bit" suffix.

Used by :func:`sparsegpt_kernels.prune_layer` (patterns), :func:`sparsegpt_kernels.prune_model` (the default and
per-layer settings), the comparison table and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def parse_setting(value, what: str = "setting", *, allow_quant: bool = False) -> Setting:
    """A sparsity in [0, 1) (a number, "0.5" or "50%") or an "N:M" pattern; with ``allow_quant`` also a "+<b>bit"
    suffix (2 <= b <= 8). ``what`` names the value in error messages."""
    quant = None
    if isinstance(value, str):
        text = value.strip().lower()
        if "+" in text:
            text, q = text.split("+", 1)
            if not allow_quant:
                raise ValueError(f"{what}: {value!r} has a quantization suffix, which is not accepted here")
            if not (q.endswith("bit") and q[:-3].isdigit() and 2 <= int(q[:-3]) <= 8):
                raise ValueError(f"{what}: expected a suffix like '+4bit' (2 to 8 bits), got {value!r}")
            quant = int(q[:-3])
        if ":" in text:
            n, m = parse_pattern(text)
            return Setting(1 - n / m, f"{n}:{m}", quant)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"{what}: expected a sparsity like 0.5 or '50%' or a pattern like '2:4', "
                             f"got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{what}: sparsity must be in [0, 1) or an 'N:M' pattern, got {value!r}")
    return Setting(float(value), None, quant)
