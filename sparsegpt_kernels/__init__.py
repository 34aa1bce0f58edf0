"""sparsegpt_kernels: one-shot SparseGPT pruning (unstructured, N:M, joint quantization) with fused kernels.

Importing this package touches no GPU and compiles nothing; backends are resolved on first use.
"""

from .api import FactorizationError, PruneResult, parse_pattern, prune_layer
from .backends import BackendUnavailableError, available_backends
from .export import (
    ExportError,
    ExportReport,
    SemiStructuredSupport,
    semi_structured_support,
    to_dense,
    to_semi_structured,
    validate_nm,
)
from .hessian import HessianAccumulator
from .reference import nm_keep_mask

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ExportError",
    "ExportReport",
    "SemiStructuredSupport",
    "FactorizationError",
    "HessianAccumulator",
    "PruneResult",
    "available_backends",
    "nm_keep_mask",
    "parse_pattern",
    "prune_layer",
    "semi_structured_support",
    "to_dense",
    "to_semi_structured",
    "validate_nm",
    "__version__",
]
