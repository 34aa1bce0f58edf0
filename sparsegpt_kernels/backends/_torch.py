"""The ``torch`` backend: the pure-PyTorch reference (:mod:`sparsegpt_kernels.reference`), on any device. It is the
protocol's base class as it is (:class:`~sparsegpt_kernels.backends.base.Backend`)."""

from __future__ import annotations

from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    priority = 0


BACKEND = TorchBackend()
