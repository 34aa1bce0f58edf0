"""Whole-model pruning of transformers causal LMs (needs the ``[hf]`` extra for loading models and tokenizers).

``prune_model`` works on any ``nn.Module`` with a recognisable list of decoder blocks; only the loaders in
:mod:`.embedded` import transformers.
"""

from .baselines import magnitude_prune_, wanda_prune_
from .blocks import NoDecoderBlocksError, find_decoder_layers, find_prunable_layers
from .data import DataUnavailableError, calibration_and_eval, calibration_windows, eval_windows, load_text, tokenize
from .embedded import embedded_model_dir, load_model
from .evaluate import perplexity
from .grid import sparsity_grid
from .pipeline import METHODS, LayerReport, PruneReport, prepare_calibration, prune_model

__all__ = [
    "METHODS",
    "DataUnavailableError",
    "LayerReport",
    "NoDecoderBlocksError",
    "PruneReport",
    "calibration_and_eval",
    "calibration_windows",
    "embedded_model_dir",
    "eval_windows",
    "find_decoder_layers",
    "find_prunable_layers",
    "load_model",
    "load_text",
    "magnitude_prune_",
    "perplexity",
    "prepare_calibration",
    "prune_model",
    "sparsity_grid",
    "tokenize",
    "wanda_prune_",
]
