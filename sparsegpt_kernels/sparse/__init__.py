"""Pruned models that are smaller: the compressed form of a pruned weight (:mod:`.format`), the linear layer that
runs from it (:mod:`.linear`) and compressed checkpoints (:mod:`.checkpoint`; saving and loading need the ``[hf]``
extra). docs/sparse_format.md is the format's specification."""

from .checkpoint import (
           FORMAT_NAME,
           FORMAT_VERSION,
           checkpoint_sizes,
           load_sparse,
           save_sparse,
           sparse_to_dense,
           to_sparse,
)
from .format import CompressedWeight, SparseFormatError
from .linear import SparseLinear

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CompressedWeight", "SparseFormatError", "SparseLinear",
           "checkpoint_sizes", "load_sparse", "save_sparse", "sparse_to_dense", "to_sparse"]
