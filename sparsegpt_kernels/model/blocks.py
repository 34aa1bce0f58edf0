"""Generic discovery inside a transformers causal LM: the decoder-layer list, the prunable layers of a block, and the
inputs (hidden states and every keyword argument) each block is called with.

Nothing here names a model family: the decoder layers are the longest ``nn.ModuleList`` of identical modules that
contain linear layers; a block's prunable layers are its ``nn.Linear`` / transformers ``Conv1D`` modules and its fused
mixture-of-experts modules (3-D ``gate_up_proj`` / ``down_proj`` parameters, one expert per leading index).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import is_conv1d


class NoDecoderBlocksError(ValueError):
    """The model has no recognisable list of decoder blocks."""


# --------------------------------------------------------------------------------------------------------------------
# Prunable layers
# --------------------------------------------------------------------------------------------------------------------
def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_fused_experts(module: nn.Module) -> bool:
    """A mixture-of-experts module whose experts are slices of 3-D parameters (transformers 5.x layout)."""
    gu = getattr(module, "gate_up_proj", None)
    dp = getattr(module, "down_proj", None)
    up = getattr(module, "up_proj", None)
    first = gu if isinstance(gu, nn.Parameter) else up
    return (
        isinstance(first, nn.Parameter)
        and first.dim() == 3
        and isinstance(dp, nn.Parameter)
        and dp.dim() == 3
        and first.shape[0] == dp.shape[0]
    )


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as an (out_features, in_features) view of its storage."""
    w = module.weight.data
    return w.T if is_conv1d(module) else w


@dataclass
class ExpertsInfo:
    """How a fused experts module lays out its weights (read from the class attributes transformers sets)."""

    num_experts: int
    gate_up_name: str  # "gate_up_proj" (gated) or "up_proj"
    has_gate: bool
    is_concatenated: bool
    is_transposed: bool
    has_bias: bool

    @classmethod
    def of(cls, module: nn.Module) -> ExpertsInfo:
        has_gate = isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
        name = "gate_up_proj" if has_gate else "up_proj"
        return cls(
            num_experts=getattr(module, name).shape[0],
            gate_up_name=name,
            has_gate=bool(getattr(module, "has_gate", has_gate)),
            is_concatenated=bool(getattr(module, "is_concatenated", True)),
            is_transposed=bool(getattr(module, "is_transposed", False)),
            has_bias=bool(getattr(module, "has_bias", False)),
        )

    def expert_weight(self, module: nn.Module, part: str, e: int) -> torch.Tensor:
        """(out, in) view of expert ``e``'s ``part`` ("gate_up" or "down") weight."""
        p = getattr(module, self.gate_up_name if part == "gate_up" else "down_proj").data[e]
        return p.T if self.is_transposed else p

    def expert_bias(self, module: nn.Module, part: str, e: int) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        name = (self.gate_up_name if part == "gate_up" else "down_proj") + "_bias"
        b = getattr(module, name, None)
        return None if b is None else b.data[e]

    def down_input(self, module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert ``e``'s down projection for tokens ``x`` (computed with the current weights)."""
        w = self.expert_weight(module, "gate_up", e)
        h = nn.functional.linear(x, w.to(x.dtype), self.expert_bias(module, "gate_up", e))
        act = module.act_fn
        if not self.has_gate:
            return act(h)
        if self.is_concatenated:
            gate, up = h.chunk(2, dim=-1)
        else:
            gate, up = h[..., ::2], h[..., 1::2]
        return act(gate) * up


@dataclass
class PrunableLayer:
    """One prunable weight matrix inside a block.

    ``name`` is relative to the block ("self_attn.q_proj", "mlp.experts.3.down_proj"); ``module`` is the owning module;
    for fused experts ``expert`` is the index and ``part`` is "gate_up" or "down".
    """

    name: str
    module: nn.Module
    expert: int | None = None
    part: str | None = None
    info: ExpertsInfo | None = None

    def weight(self) -> torch.Tensor:
        if self.expert is None:
            return weight_view(self.module)
        return self.info.expert_weight(self.module, self.part, self.expert)

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)


def find_prunable_layers(block: nn.Module) -> list[PrunableLayer]:
    """Every linear layer of ``block`` (in registration order) and every expert of its fused experts modules."""
    out: list[PrunableLayer] = []
    for name, mod in block.named_modules():
        if not name:
            continue
        if is_linear(mod):
            out.append(PrunableLayer(name, mod))
        elif is_fused_experts(mod):
            info = ExpertsInfo.of(mod)
            for part, pname in (("gate_up", info.gate_up_name), ("down", "down_proj")):
                for e in range(info.num_experts):
                    out.append(PrunableLayer(f"{name}.{e}.{pname}", mod, e, part, info))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Decoder layers
# --------------------------------------------------------------------------------------------------------------------
def _has_prunable(module: nn.Module) -> bool:
    return any(is_linear(m) or is_fused_experts(m) for m in module.modules())


def tied_copies(model: nn.Module) -> set[str]:
    """Parameter names that are tied copies of another (a tied LM head): written once, tied again on loading."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys.keys() if isinstance(keys, dict) else keys)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks.

    The longest ``nn.ModuleList`` whose entries all have one class and contain linear layers (ties: more parameters).
    Raises :class:`NoDecoderBlocksError` when there is none.
    """
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or not all(_has_prunable(b) for b in mod):
            continue
        size = sum(p.numel() for p in mod.parameters())
        key = (len(mod), size)
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise NoDecoderBlocksError(
            f"{type(model).__name__} has no recognisable decoder blocks (an nn.ModuleList of identical modules "
            "containing linear layers)"
        )
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------------------------
# Input capture
# --------------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def map_tensors(obj, fn):
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def split_call(forward, args, kwargs) -> tuple[torch.Tensor, dict]:
    """Bind a block call to its signature; return (hidden states, every other argument by name)."""
    sig = inspect.signature(forward)
    bound = sig.bind_partial(*args, **kwargs)
    named: dict = {}
    for pname, value in bound.arguments.items():
        kind = sig.parameters[pname].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError("decoder blocks called with extra positional arguments are not supported")
        else:
            named[pname] = value
    first = next(iter(sig.parameters))
    hidden = named.pop(first, None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"the first argument of the decoder block ({first!r}) is not a tensor of hidden states")
    return hidden, named


@dataclass
class BlockInputs:
    """What the decoder blocks are called with on the calibration set.

    ``hidden``: the inputs of the first block, one (1, seqlen, hidden) tensor per sequence.
    ``kwargs``: per block, every other argument (attention mask, position ids / embeddings, alibi, cache settings);
    they do not depend on the sequence because every sequence has the same length and no padding.
    ``returns_tuple``: whether a block returns a tuple whose first entry is the hidden states.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict] = field(default_factory=list)
    returns_tuple: bool = False


def _model_input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                         *, keep_hidden: bool = True) -> BlockInputs:
    """Run the model's embeddings on every calibration sequence and capture what the decoder blocks receive.

    The blocks themselves do not run (except block 0 once, to learn the shape of its output): each block's
    ``forward`` is temporarily replaced by a recorder that passes the hidden states through, and the model stops at
    the last block, so the LM head never runs. ``input_ids``: (nsamples, seqlen) token ids.
    """
    dev = _model_input_device(model)
    n = len(layers)
    captured = BlockInputs(hidden=[], kwargs=[None] * n)
    state = {"form": None, "sample": 0}

    def make_stub(i, block):
        orig = block.forward

        def stub(*args, **kwargs):
            hidden, named = split_call(orig, args, kwargs)
            if state["sample"] == 0:
                captured.kwargs[i] = named
            if i == 0 and keep_hidden:
                captured.hidden.append(hidden.detach().clone())
            if i == 0 and state["form"] is None:
                out = orig(hidden, **named)
                state["form"] = out
                captured.returns_tuple = isinstance(out, tuple)
            if i == n - 1 or state["sample"] > 0:
                raise _Stop
            form = state["form"]
            return (hidden, *form[1:]) if isinstance(form, tuple) else hidden

        return stub

    for i, block in enumerate(layers):
        block.forward = make_stub(i, block)
    try:
        for s in range(input_ids.shape[0]):
            state["sample"] = s
            try:
                model(input_ids=input_ids[s : s + 1].to(dev), use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model did not call its decoder blocks as expected")
    finally:
        for block in layers:
            del block.forward
    if any(k is None for k in captured.kwargs):
        raise RuntimeError("not every decoder block was called during input capture")
    return captured


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one block on one batch of hidden states; return the output hidden states."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
