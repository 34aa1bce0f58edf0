"""The plan of a :func:`sparsegpt_kernels.prune_model` run: which weight matrices of which decoder blocks get which
setting. Every option is checked here, before anything is modified."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..settings import Setting, parse_pattern, parse_setting
from .blocks import PrunableLayer, find_decoder_layers, find_prunable_layers

METHODS = ("sparsegpt", "wanda", "magnitude")


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
    """The decoder blocks (``prefix``, ``layers``) and, per block index, the (layer, setting) pairs to prune."""

    method: str
    prefix: str
    layers: nn.ModuleList
    items: dict[int, list[tuple[PrunableLayer, Setting]]]
    default: Setting
    overrides: list[tuple[str, Setting]] = field(default_factory=list)
    include: list[str] | None = None
    exclude: list[str] | None = None
    overridden: set[tuple[int, str]] = field(default_factory=set)  # (block, layer) set by layer_sparsity

    @property
    def blocks(self) -> list[int]:
        return sorted(self.items)

    @property
    def last(self) -> int:
        return max(self.items)


def build_plan(model: nn.Module, *, method: str, sparsity, pattern, quant_bits, quant_group_size, blocks,
               include, exclude, layer_sparsity: Mapping[str, float | str] | None, block_size) -> PrunePlan:
    """Check every option against the model and list what each block will prune (see :func:`prune_model`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    default = parse_setting(pattern if pattern is not None else sparsity, "default")
    overrides = [(p, parse_setting(v, f"layer_sparsity[{p!r}]")) for p, v in (layer_sparsity or {}).items()]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if quant_bits is not None and (isinstance(quant_bits, bool) or not isinstance(quant_bits, int)
                                   or not 2 <= quant_bits <= 8):
        raise ValueError(f"quant_bits must be an int in 2..8, got {quant_bits!r}")
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
                s = default
            else:
                overridden.add((b, t.name))
            if s.pattern is not None:
                m = parse_pattern(s.pattern)[1]
                if t.in_features % m:
                    raise ValueError(f"pattern {s.pattern!r} does not fit layer {full}: in_features={t.in_features} "
                                     f"is not a multiple of M={m}")
                if method == "sparsegpt" and block_size % m:
                    raise ValueError(f"pattern {s.pattern!r}: block_size={block_size} is not a multiple of M={m}")
            if quant_bits is not None and quant_group_size is not None and t.in_features % quant_group_size:
                raise ValueError(f"quant_group_size={quant_group_size} does not divide in_features={t.in_features} "
                                 f"of layer {full}")
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
    return PrunePlan(method, prefix, layers, items, default, overrides, include, exclude, overridden)
