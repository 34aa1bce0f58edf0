"""Helpers shared by the Triton op modules: interpreter detection, op registration, the fixed/autotuned configs."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
from triton.runtime.autotuner import Autotuner

NAMESPACE = "sparsegpt_kernels"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_op(name: str, mutates_args: Sequence[str] | str = ()) -> Callable:
    """Register ``fn`` as ``sparsegpt_kernels::<name>``, a ``torch.library.custom_op``.

    ``torch.compile`` treats the op as one opaque call described by its fake implementation and ``mutates_args``; it
    does not trace into the Triton launches. (As a ``torch.library.triton_op`` it did, and on the H200 with torch 2.11
    and triton 3.6 the traced ``sweep_block`` lost the kernel's writes to its own scratch tensors: the compiled op
    returned a zero loss and a wrong lazy update, caught by ``torch.library.opcheck``'s ``test_aot_dispatch_dynamic``.)
    """

    def deco(fn: Callable):
        return torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)

    return deco


def autotune(configs: list[triton.Config], key: list[str], *, interpret: triton.Config | None = None, **kwargs):
    """``triton.autotune`` with the config the launcher uses under the interpreter (default: the first).

    Launch the result through :func:`launchable`. On a GPU that is the autotuner. Under ``TRITON_INTERPRET=1`` it is the
    plain kernel with ``interpret``'s meta-parameters (Triton's timer needs a GPU; the interpreter's cost grows with
    programs x loop iterations, so ``interpret`` usually has much larger tiles than any GPU candidate), except inside
    :func:`autotune_under_interpreter`, where the autotuner itself runs and tries every config.

    Every output a trial launch writes must be either restored (``restore_value``), reset (``reset_to_zero``) or fully
    overwritten by every config: the autotuner runs each config on the real arguments before the chosen one.
    """

    def deco(fn):
        tuned = triton.autotune(configs=configs, key=key, **kwargs)(fn)
        tuned.interpret_config = interpret or configs[0]
        return tuned

    return deco


_interpret_bench: Callable | None = None


def launchable(kernel) -> tuple[object, dict]:
    """``(what to launch, extra meta-parameters)`` for a kernel made by :func:`autotune` (or a plain one)."""
    if isinstance(kernel, Autotuner) and interpreting():
        if _interpret_bench is None:
            cfg = kernel.interpret_config
            return kernel.fn, {**cfg.kwargs, "num_warps": cfg.num_warps}
        kernel.__dict__["do_bench"] = _interpret_bench  # overrides the autotuner's (GPU) timer
    return kernel, {}


def cpu_do_bench(fn: Callable[[], None], quantiles=None) -> list[float]:
    """A stand-in for Triton's GPU timer on the CPU: runs ``fn`` once, returns its wall time in ms (three times, for the
    quantiles the autotuner asks for)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms, ms, ms]


@contextlib.contextmanager
def autotune_under_interpreter(do_bench: Callable = cpu_do_bench) -> Iterator[None]:
    """Under ``TRITON_INTERPRET=1``, launch the autotuned kernels through their autotuners, timing each config with
    ``do_bench`` (Triton's signature: ``do_bench(kernel_call, quantiles) -> [median, p20, p80]``), so that what trial
    launches do to the outputs is exercised on the CPU. The tuning caches are cleared on entry and exit."""
    global _interpret_bench
    if not interpreting():
        raise RuntimeError("autotune_under_interpreter needs TRITON_INTERPRET=1")
    from . import nm_mask, sweep

    kernels = [k for mod in (nm_mask, sweep) for k in vars(mod).values() if isinstance(k, Autotuner)]
    previous = _interpret_bench
    _interpret_bench = do_bench
    for k in kernels:
        k.cache.clear()
    try:
        yield
    finally:
        _interpret_bench = previous
        for k in kernels:
            k.cache.clear()
            k.__dict__.pop("do_bench", None)


@functools.cache
def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
