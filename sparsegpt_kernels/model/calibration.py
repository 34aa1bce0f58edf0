"""Calibration data: token ids normalised to a (nsamples, seqlen) tensor and checked against the model before any
weight changes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..options import DEFAULT_NSAMPLES, DEFAULT_SEQLEN


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (``None`` if it does not say)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (``None`` without one)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else None


def prepare_calibration(model: nn.Module, calibration, *, nsamples: int | None = None, seqlen: int | None = None,
                        seed: int = 0, tokenizer=None) -> torch.Tensor:
    """Normalise ``calibration`` to a (nsamples, seqlen) LongTensor of token ids and check it against the model.

    Accepts a 2-D tensor of token ids, a list of equal-length 1-D tensors, a dict with ``input_ids``, or text
    (a ``str``; needs ``tokenizer``; ``nsamples`` random windows of ``seqlen`` tokens drawn with ``seed``).
    """
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError("calibration text needs a tokenizer (pass tokenizer=...)")
        from .data import calibration_windows, tokenize

        ids = calibration_windows(tokenize(tokenizer, calibration), nsamples or DEFAULT_NSAMPLES,
                                  seqlen or DEFAULT_SEQLEN, seed=seed)
    else:
        if isinstance(calibration, Mapping):
            calibration = calibration.get("input_ids")
        if isinstance(calibration, (list, tuple)):
            if not calibration:
                raise ValueError("the calibration set is empty")
            lens = {int(t.shape[-1]) for t in calibration}
            if len(lens) != 1:
                raise ValueError(f"calibration sequences must all have the same length, got lengths {sorted(lens)}")
            calibration = torch.stack([torch.as_tensor(t).reshape(-1) for t in calibration])
        if not isinstance(calibration, torch.Tensor):
            raise TypeError("calibration must be token ids (a 2-D tensor, a list of 1-D tensors or a dict with "
                            f"input_ids) or text, got {type(calibration).__name__}")
        ids = calibration
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"calibration token ids must be 2-D (nsamples, seqlen), got shape {tuple(ids.shape)}")
        if nsamples is not None:
            if nsamples > ids.shape[0]:
                raise ValueError(f"asked for {nsamples} calibration samples but only {ids.shape[0]} were given")
            ids = ids[:nsamples]
        if seqlen is not None:
            if seqlen > ids.shape[1]:
                raise ValueError(f"asked for seqlen={seqlen} but the calibration sequences have {ids.shape[1]} tokens")
            ids = ids[:, :seqlen]
    if ids.numel() == 0:
        raise ValueError("the calibration set is empty")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be integers, got {ids.dtype}")
    ids = ids.long().cpu()
    limit = max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"calibration sequence length {ids.shape[1]} exceeds the model's limit of {limit} positions")
    vocab = vocab_size(model)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"calibration token ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    return ids
