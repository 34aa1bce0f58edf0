"""Perplexity by the SparseGPT paper's protocol: non-overlapping windows, exp of the mean token NLL."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, device: torch.device | str | None = None,
               batch_size: int = 1, progress: bool = False) -> float:
    """Perplexity of ``model`` on ``windows`` ((n, seqlen) token ids): exp(mean NLL of every next-token prediction).

    Each window is scored on its own (no context carried over), predicting tokens 2..seqlen from the ones before.
    ``device``: where the model runs (it is moved there and back); default: where it already is.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError("windows must be a (n, seqlen) tensor of token ids with n >= 1 and seqlen >= 2")
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if dev != home:
        model.to(dev)
    nll, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        for s in starts:
            ids = windows[s : s + batch_size].to(dev)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            nll += float(loss)
            count += ids[:, 1:].numel()
    finally:
        if dev != home:
            model.to(home)
        model.train(was_training)
    return math.exp(nll / count)
