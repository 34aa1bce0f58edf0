"""Where sparsegpt_kernels keeps what it makes once and reuses: the converted embedded model and the C++ extension
built on first use. ``$SPARSEGPT_KERNELS_CACHE``, default ``~/.cache/sparsegpt_kernels``."""

from __future__ import annotations

import os

CACHE_ENV = "SPARSEGPT_KERNELS_CACHE"


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparsegpt_kernels")
