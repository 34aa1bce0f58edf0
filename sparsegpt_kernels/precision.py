"""Float32 matrix products at full (IEEE) precision inside pruning, whatever the process-wide setting.

A user who enabled TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``, ``torch.set_float32_matmul_precision
("high")``, or the newer ``torch.backends.cuda.matmul.fp32_precision = "tf32"``) for inference would otherwise get
TF32 (10-bit mantissa) lazy-update GEMMs and Hessian products on a GPU, and, with "medium" on a CPU with bfloat16
units, bfloat16 ones. :func:`ieee_float32_matmul` switches every float32 matmul precision setting to full precision
for the duration of a call and restores each exactly afterwards (also when the call raises), so the global setting is
unchanged after :func:`sparsegpt_kernels.prune_layer` and does not change its result.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

_lock = threading.Lock()
_depth = 0  # calls inside the scope, all threads together: the first one in saves, the last one out restores
_saved: Callable[[], None] | None = None


def _matmul_settings() -> list[object]:
    """The per-backend float32 matmul precision settings of this torch (``fp32_precision``, torch >= 2.9)."""
    found = []
    for handle in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)):
        try:
            _ = handle.fp32_precision
        except (AttributeError, RuntimeError):
            continue
        found.append(handle)
    return found


def _set_ieee() -> Callable[[], None]:
    """Switch every float32 matmul setting to full precision; returns what restores the previous ones.

    The switch goes through the legacy global setter, which sets every backend's setting consistently (mixing the
    legacy and the per-backend settings makes torch >= 2.9 raise when it reads them); the restore puts back the exact
    per-backend values and, if it could be read, the legacy one.
    """
    handles = _matmul_settings()
    saved = [h.fp32_precision for h in handles]
    try:
        saved_legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process mixed the legacy and the per-backend settings: keep the per-backend ones
        saved_legacy = None
    torch.set_float32_matmul_precision("highest")
    # bfloat16 / float16 products accumulated in float32 (the Hessians' products="input"): no reductions in the
    # inputs' precision inside cuBLAS either
    cm = torch.backends.cuda.matmul
    reduced = (cm.allow_bf16_reduced_precision_reduction, cm.allow_fp16_reduced_precision_reduction)
    cm.allow_bf16_reduced_precision_reduction = cm.allow_fp16_reduced_precision_reduction = False

    def restore():
        if saved_legacy is not None:
            torch.set_float32_matmul_precision(saved_legacy)
        for h, value in zip(handles, saved):
            h.fp32_precision = value
        cm.allow_bf16_reduced_precision_reduction, cm.allow_fp16_reduced_precision_reduction = reduced

    return restore


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Run the body with IEEE float32 matmuls (no TF32, no bfloat16 shortcuts); restore the previous settings.

    Nested and concurrent uses share one switch: the first to enter saves and switches, the last to leave restores.
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _set_ieee()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                restore, _saved = _saved, None
                restore()
