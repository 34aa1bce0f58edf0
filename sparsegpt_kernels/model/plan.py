"""The plan of a :func:`sparsegpt_kernels.prune_model` run: which weight matrices of which decoder blocks get which
setting. Every option is checked here, before anything is modified."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..options import METHODS, PruneOptions, Setting, parse_setting
from .blocks import PrunableLayer, find_decoder_layers, find_prunable_layers

__all__ = ["METHODS", "PrunePlan", "build_plan", "matches"]


def _matches_one(pattern: str, full: str, rel: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(full, pattern) or fnmatch.fnmatchcase(rel, pattern)
    # a bare name matches whole dotted components at the end: "q_proj", "self_attn.q_proj", "3.mlp.up_proj"
    return full == pattern or full.endswith("." + pattern)


def matches(patterns: Iterable[str], full: str, rel: str) -> bool:
    """Whether a layer matches one of ``patterns``: a glob (``*``, ``?``, ``[``) against its full name
    ("model.layers.3.mlp.up_proj") or its name in the block ("mlp.up_proj"), or a bare name that ends the full name
    at a dot ("up_proj", "mlp.up_proj")."""
    return any(_matches_one(p, full, rel) for p in patterns)


def _as_list(x) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


@dataclass
class PrunePlan:
    """The decoder blocks (``prefix``, ``layers``) and, per block index, the (layer, setting) pairs to prune with
    ``options`` (each layer at its own setting: :meth:`PruneOptions.at`)."""

    options: PruneOptions
    prefix: str
    layers: nn.ModuleList
    items: dict[int, list[tuple[PrunableLayer, Setting]]]
    overrides: list[tuple[str, Setting]] = field(default_factory=list)
    include: list[str] | None = None
    exclude: list[str] | None = None
    overridden: set[tuple[int, str]] = field(default_factory=set)  # (block, layer) set by layer_sparsity

    @property
    def method(self) -> str:
        return self.options.method

    @property
    def default(self) -> Setting:
        return self.options.setting

    @property
    def blocks(self) -> list[int]:
        return sorted(self.items)

    @property
    def last(self) -> int:
        return max(self.items)

    def targets(self, b: int) -> list[PrunableLayer]:
        return [t for t, _ in self.items[b]]

    def record(self) -> dict:
        """The selection as the report and the resume fingerprint record it."""
        return {"blocks": self.blocks, "include": self.include, "exclude": self.exclude,
                "layer_sparsity": {p: {"sparsity": s.sparsity, "pattern": s.pattern} for p, s in self.overrides}}


def build_plan(model: nn.Module, opts: PruneOptions, *, blocks=None, include=None, exclude=None,
               layer_sparsity: Mapping[str, float | str] | None = None) -> PrunePlan:
    """Check the selection against the model and list what each block will prune (see :func:`prune_model`); every
    layer's setting is checked against its width here, before anything is modified."""
    overrides = [(p, parse_setting(v, f"layer_sparsity[{p!r}]")) for p, v in (layer_sparsity or {}).items()]
    for p, s in overrides:
        try:
            opts.at(s)
        except ValueError as e:
            raise ValueError(f"layer_sparsity[{p!r}]: {e}") from None
    include, exclude = _as_list(include), _as_list(exclude)

    prefix, layers = find_decoder_layers(model)
    nblocks = len(layers)
    chosen = sorted(set(range(nblocks) if blocks is None else (int(b) for b in blocks)))
    bad = [b for b in chosen if not 0 <= b < nblocks]
    if bad:
        raise ValueError(f"block indices {bad} are out of range: the model has {nblocks} decoder blocks")

    items: dict[int, list[tuple[PrunableLayer, Setting]]] = {}
    used: set[tuple[str, str]] = set()  # (option, pattern) that matched at least one layer
    overridden: set[tuple[int, str]] = set()
    example = None
    for b in chosen:
        block_items = []
        for t in find_prunable_layers(layers[b]):
            full = f"{prefix}.{b}.{t.name}"
            example = example or (full, t.name)
            for option, pats in (("include", include or []), ("exclude", exclude or []),
                                 ("layer_sparsity", [p for p, _ in overrides])):
                used.update((option, p) for p in pats if _matches_one(p, full, t.name))
            if include is not None and not matches(include, full, t.name):
                continue
            if exclude is not None and matches(exclude, full, t.name):
                continue
            s = next((s for p, s in overrides if matches([p], full, t.name)), None)
            if s is None:
                s = opts.setting
            else:
                overridden.add((b, t.name))
            opts.at(s).check_layer(t.in_features, f"layer {full}")
            block_items.append((t, s))
        if block_items:
            items[b] = block_items
    for option, pats in (("include", include or []), ("exclude", exclude or []),
                         ("layer_sparsity", [p for p, _ in overrides])):
        for p in pats:
            if (option, p) not in used:
                hint = f"; layer names look like {example[0]!r} (or {example[1]!r} in its block)" if example else ""
                raise ValueError(f"{option} pattern {p!r} matches no layer of the selected blocks{hint}")
    if not items:
        raise ValueError("no layer matches the include/exclude/blocks selection: nothing to prune")
    return PrunePlan(opts, prefix, layers, items, overrides, include, exclude, overridden)
