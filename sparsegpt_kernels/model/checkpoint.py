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
#: prefix of the entries of a block file that hold how its layers were pruned (the pattern, the quantization grid)
MARK_PREFIX = "__sparsegpt_kernels_pruned__."


def marks_of(block: nn.Module) -> dict:
    """The pruning marks of ``block``'s modules (:func:`.prune_block.mark_pruned`) as block-file entries."""
    from .prune_block import PRUNED_ATTR

    out = {}
    for name, mod in block.named_modules():
        mark = getattr(mod, PRUNED_ATTR, None)
        if mark is not None:
            q = mark["quant"]
            out[MARK_PREFIX + name] = {"pattern": mark["pattern"], "quant": None if q is None else
                                       {"scale": q.scale, "zero": q.zero, "maxq": q.maxq, "group_size": q.group_size}}
    return out


def restore_marks(block: nn.Module, saved: dict) -> dict:
    """``saved`` without its mark entries, which are set back on ``block``'s modules."""
    from ..spec import QuantGrid
    from .prune_block import PRUNED_ATTR

    weights = {}
    for k, v in saved.items():
        if not k.startswith(MARK_PREFIX):
            weights[k] = v
            continue
        q = v["quant"]
        grid = None if q is None else QuantGrid(q["scale"], q["zero"], int(q["maxq"]), int(q["group_size"]))
        setattr(block.get_submodule(k[len(MARK_PREFIX):]), PRUNED_ATTR, {"pattern": v["pattern"], "quant": grid})
    return weights


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
    renamed last, so a run killed at any point finds a consistent state.

    With several processes (``dist_ctx``) process 0 writes the state and the weights, and every process writes the
    activations of its own share of the samples; a resume needs the same number of processes.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, dist_ctx=None, keep_weights: bool = True):
        self.keep_weights = keep_weights  # False when the weights go elsewhere as they are done (streaming)
        self.dir = os.fspath(directory)
        self.fingerprint = fingerprint
        self.dist = dist_ctx
        self.rank = dist_ctx.rank if dist_ctx is not None else 0
        self.world = dist_ctx.world if dist_ctx is not None else 1
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _mine(self, acts_name: str) -> str:
        """This process's file of the activations ``acts_name`` names."""
        return acts_name if self.world == 1 else f"{acts_name[:-3]}.rank{self.rank}of{self.world}.pt"

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
        if int(state.get("world", 1)) != self.world:
            raise ValueError(f"checkpoint directory {self.dir!r} was written by a run with {state.get('world', 1)} "
                             f"processes; resume it with as many (this run has {self.world})")
        return state

    def block_weights(self, i: int) -> dict:
        return torch.load(self._path(f"block_{i:05d}.pt"), map_location="cpu", weights_only=True)  # marks included

    def activations(self, name: str) -> torch.Tensor:
        """This process's activations of the checkpoint's ``acts`` entry."""
        return torch.load(self._path(self._mine(name)), map_location="cpu", weights_only=True)

    def save(self, i: int, block: nn.Module, acts: list[torch.Tensor] | None, reports: list[LayerReport],
             seconds: float) -> None:
        acts_name = f"acts_{i + 1:05d}.pt" if acts is not None else None
        if acts is not None:
            self._atomic_save(torch.cat([a.cpu() for a in acts]), self._mine(acts_name))
        if self.dist is not None:
            self.dist.barrier("the checkpoint")  # every process's activations are on disk before the state says so
        old = self.load()
        if self.rank == 0:
            if self.keep_weights:
                saved = {k: v.detach().cpu().clone() for k, v in block.state_dict().items()}
                saved.update(marks_of(block))
                self._atomic_save(saved, f"block_{i:05d}.pt")
            state = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "next_block": i + 1,
                     "acts": acts_name, "seconds": seconds, "world": self.world,
                     "reports": [asdict(r) for r in reports]}
            tmp = self._path("state.json.tmp")
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self._path("state.json"))
        if self.dist is not None:
            self.dist.barrier("the checkpoint")
        if old and old.get("acts") and old["acts"] != acts_name:
            try:
                os.remove(self._path(self._mine(old["acts"])))
            except OSError:
                pass
