"""sparsegpt_kernels: one-shot SparseGPT pruning (unstructured, N:M, joint quantization) with fused kernels.

Importing this package touches no GPU and compiles nothing; backends are resolved on first use.
"""

from .api import FactorizationError, PruneResult, parse_pattern, prune_layer
from .backends import BackendUnavailableError, available_backends
from .hessian import HessianAccumulator
from .reference import nm_keep_mask

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FactorizationError",
    "HessianAccumulator",
    "PruneResult",
    "available_backends",
    "nm_keep_mask",
    "parse_pattern",
    "prune_layer",
    "__version__",
]
