"""sparsegpt_kernels: one-shot SparseGPT pruning (unstructured, N:M, joint quantization) with fused kernels.

Importing this package touches no GPU and compiles nothing; backends are resolved on first use.
"""

from .api import FactorizationError, PruneResult, prune_layer
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
from .masks import nm_keep_mask, unstructured_prune_mask
from .options import PruneOptions, parse_pattern
from .sparse import SparseFormatError, SparseLinear, load_sparse, save_sparse, to_sparse

__version__ = "0.1.0"

# Whole-model pruning lives in .model (it needs the [hf] extra only to load models); imported on first use.
_MODEL_EXPORTS = (
    "LayerReport", "PruneReport", "load_model", "magnitude_prune_", "perplexity", "prune_model", "wanda_prune_",
)


def empty_cache() -> int:
    """Free the big CPU buffers the cpp backend keeps idle between layers for reuse (the working copy of a weight,
    the factor, the sweep's scratch) and that :class:`SparseLinear` decompresses its weights into for a prompt; at
    most ``SPARSEGPT_KERNELS_CPU_CACHE_MB`` megabytes, default 2048. Returns the bytes freed. :func:`prune_model`
    does this when it returns."""
    from .backends.extension import release_cpu_cache

    return release_cpu_cache()


def __getattr__(name):
    if name in _MODEL_EXPORTS:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "ExportError",
    "ExportReport",
    "SemiStructuredSupport",
    "SparseFormatError",
    "SparseLinear",
    "FactorizationError",
    "HessianAccumulator",
    "LayerReport",
    "PruneReport",
    "PruneOptions",
    "PruneResult",
    "available_backends",
    "empty_cache",
    "load_model",
    "load_sparse",
    "magnitude_prune_",
    "nm_keep_mask",
    "parse_pattern",
    "perplexity",
    "prune_layer",
    "prune_model",
    "save_sparse",
    "semi_structured_support",
    "to_dense",
    "to_semi_structured",
    "to_sparse",
    "unstructured_prune_mask",
    "validate_nm",
    "wanda_prune_",
    "__version__",
]
