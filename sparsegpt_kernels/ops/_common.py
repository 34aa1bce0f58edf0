"""Helpers shared by the Triton op modules: interpreter detection, op registration, the fixed/autotuned configs."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
from packaging.version import Version

NAMESPACE = "sparsegpt_kernels"

TRITON_VERSION = Version(triton.__version__.split("+")[0])
TORCH_VERSION = Version(torch.__version__.split("+")[0])

# torch.library.triton_op / wrap_triton appeared in torch 2.6 (as public names of torch.library).
HAS_TRITON_OP = TORCH_VERSION >= Version("2.6") and hasattr(torch.library, "triton_op")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_op(name: str, mutates_args: Sequence[str] | str = ()) -> Callable:
    """Register ``fn`` as ``sparsegpt_kernels::<name>``.

    On a GPU the op is a ``torch.library.triton_op`` (``torch.compile`` traces into the kernels it launches through
    :func:`wrap`). Under the Triton interpreter it is a plain ``torch.library.custom_op`` instead: the interpreter
    cannot run on the fake tensors that tracing the body of a ``triton_op`` would feed it. Torch versions without
    ``triton_op`` also get a ``custom_op``.
    """

    def deco(fn: Callable):
        qualname = f"{NAMESPACE}::{name}"
        if HAS_TRITON_OP and not interpreting():
            return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
        return torch.library.custom_op(qualname, fn, mutates_args=mutates_args)

    return deco


def wrap(kernel):
    """The launchable form of a kernel inside a registered op (``wrap_triton`` when the op is a ``triton_op``)."""
    if HAS_TRITON_OP and not interpreting():
        return torch.library.wrap_triton(kernel)
    return kernel


def maybe_autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` on a GPU; under the interpreter (where autotuning fails) the kernel is left plain and the
    launcher passes the meta-parameters of ``configs[0]`` itself (see :func:`launch_meta`)."""

    def deco(fn):
        if interpreting():
            return fn
        return triton.autotune(configs=configs, key=key, **kwargs)(fn)

    return deco


def launch_meta(configs: list[triton.Config], interpret: triton.Config | None = None) -> dict:
    """Meta-parameters the launcher must pass: none when autotuned; under the interpreter those of ``interpret``
    (default: the first config). The interpreter's cost grows with programs × loop iterations, so its config is
    usually one with much larger tiles than any GPU candidate."""
    if not interpreting():
        return {}
    cfg = interpret or configs[0]
    return {**cfg.kwargs, "num_warps": cfg.num_warps}


@functools.cache
def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
