"""Resumable runs: the state of :func:`sparsegpt_kernels.prune_model` saved after every block, and the fingerprint
that makes a rerun resume only with the same settings, calibration data and model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import torch
from torch import nn

from .report import LayerReport

CHECKPOINT_VERSION = 1


def fingerprint(settings: dict, model: nn.Module, nblocks: int, ids: torch.Tensor | None) -> str:
    """What a checkpoint must match to be resumed: the settings, the model's class and depth, the calibration ids."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode() + str(nblocks).encode())
    if ids is not None:
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


class Checkpoint:
    """``state.json`` (settings fingerprint, next block, reports) + one file of weights per finished block + the
    activations entering the next block. Every file is written to a temporary name and renamed; ``state.json`` is
    renamed last, so a run killed at any point finds a consistent state."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.dir = os.fspath(directory)
        self.fingerprint = fingerprint
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _atomic_save(self, obj, name: str) -> None:
        tmp = self._path(name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, self._path(name))

    def load(self):
        path = self._path("state.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            state = json.load(f)
        if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint directory {self.dir!r} holds a run with other settings, calibration data "
                             "or model; use another directory or delete it")
        return state

    def block_weights(self, i: int) -> dict:
        return torch.load(self._path(f"block_{i:05d}.pt"), map_location="cpu", weights_only=True)

    def activations(self, name: str) -> torch.Tensor:
        return torch.load(self._path(name), map_location="cpu", weights_only=True)

    def save(self, i: int, block: nn.Module, acts: list[torch.Tensor] | None, reports: list[LayerReport],
             seconds: float) -> None:
        self._atomic_save({k: v.detach().cpu().clone() for k, v in block.state_dict().items()}, f"block_{i:05d}.pt")
        acts_name = None
        if acts is not None:
            acts_name = f"acts_{i + 1:05d}.pt"
            self._atomic_save(torch.cat([a.cpu() for a in acts]), acts_name)
        old = self.load()
        state = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "next_block": i + 1,
                 "acts": acts_name, "seconds": seconds, "reports": [asdict(r) for r in reports]}
        tmp = self._path("state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._path("state.json"))
        if old and old.get("acts") and old["acts"] != acts_name:
            try:
                os.remove(self._path(old["acts"]))
            except OSError:
                pass
