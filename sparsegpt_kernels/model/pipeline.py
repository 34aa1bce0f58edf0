"""Model-level SparseGPT: :func:`prune_model` prunes a transformers causal LM in place, block by block.

Flow (ALGORITHM.md, "Model-level flow"): capture what block 0 receives on the calibration set (hidden states and every
keyword argument); for each block, hook its prunable layers, run the dense block to accumulate their Hessians (layers
that read the same tensor share one), prune, then re-run the pruned block to produce the next block's inputs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..api import parse_pattern, prune_layer
from ..hessian import HessianAccumulator
from . import baselines
from .blocks import (
    BlockInputs,
    PrunableLayer,
    _split_call,
    call_block,
    capture_block_inputs,
    find_decoder_layers,
    find_prunable_layers,
    map_tensors,
)

METHODS = ("sparsegpt", "wanda", "magnitude")
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """What happened to one weight matrix. ``loss`` is SparseGPT's OBS estimate (NaN for the baselines);
    ``tokens`` is how many calibration tokens its Hessian saw; ``skipped`` says why a layer was left dense."""

    name: str
    shape: tuple[int, int]
    loss: float
    sparsity: float
    damp: float
    seconds: float
    backend: str
    method: str
    pattern: str | None = None
    target_sparsity: float | None = None
    quant_bits: int | None = None
    tokens: int = 0
    skipped: str | None = None


@dataclass
class PruneReport:
    """Per-layer reports and totals of one :func:`prune_model` run."""

    layers: list[LayerReport] = field(default_factory=list)
    method: str = "sparsegpt"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    blocks_pruned: list[int] = field(default_factory=list)
    resumed_from_block: int | None = None

    @property
    def total_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def total_zeros(self) -> int:
        return int(round(sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)))

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over every reported weight matrix."""
        return self.total_zeros / max(1, self.total_params)

    @property
    def total_loss(self) -> float:
        return float(sum(r.loss for r in self.layers if not math.isnan(r.loss)))

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "settings": self.settings,
            "seconds": self.seconds,
            "blocks_pruned": self.blocks_pruned,
            "resumed_from_block": self.resumed_from_block,
            "totals": {
                "layers": len(self.layers),
                "params": self.total_params,
                "zeros": self.total_zeros,
                "sparsity": self.sparsity,
                "loss": self.total_loss,
                "skipped": len(self.skipped),
                "layer_seconds": sum(r.seconds for r in self.layers),
            },
            "layers": [asdict(r) for r in self.layers],
        }

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=True)

    def format_table(self) -> str:
        """A plain-text table: one line per layer, then the totals."""
        head = f"{'layer':<48} {'shape':>12} {'loss':>11} {'sparsity':>8} {'damp':>7} {'sec':>6} backend"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            loss = "-" if math.isnan(r.loss) else f"{r.loss:.4g}"
            extra = f"  (skipped: {r.skipped})" if r.skipped else ""
            lines.append(f"{r.name[-48:]:<48} {shape:>12} {loss:>11} {r.sparsity:>8.4f} {r.damp:>7.3g} "
                         f"{r.seconds:>6.2f} {r.backend}{extra}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.layers)} matrices, {self.total_params:,} weights, sparsity {self.sparsity:.4f}, "
                     f"total loss {self.total_loss:.4g}, {self.seconds:.1f} s ({self.method})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Setting:
    sparsity: float
    pattern: str | None


def _parse_setting(value, what: str) -> _Setting:
    if isinstance(value, str):
        v = value.strip()
        if ":" in v:
            n, m = parse_pattern(v)
            return _Setting(1 - n / m, f"{n}:{m}")
        value = float(v[:-1]) / 100 if v.endswith("%") else float(v)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{what}: sparsity must be in [0, 1) or an 'N:M' pattern, got {value!r}")
    return _Setting(float(value), None)


def _matches(patterns: Iterable[str], full: str, rel: str) -> bool:
    return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)


def _as_list(x) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _vocab_size(model: nn.Module) -> int | None:
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

        ids = calibration_windows(tokenize(tokenizer, calibration), nsamples or 128, seqlen or 2048, seed=seed)
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
    limit = _max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"calibration sequence length {ids.shape[1]} exceeds the model's limit of {limit} positions")
    vocab = _vocab_size(model)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"calibration token ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
    return ids


# --------------------------------------------------------------------------------------------------------------------
# Hessian collection
# --------------------------------------------------------------------------------------------------------------------
class _Collector:
    """Forward hooks that accumulate the Hessians of ``targets`` while a block runs.

    Linear layers called on the very same tensor (q/k/v, gate/up) share one accumulator, updated once. Fused
    experts get one accumulator per expert and part, fed only the tokens routed to that expert.
    """

    def __init__(self, targets: list[PrunableLayer], acc_device: torch.device):
        self.targets = targets
        self.acc_device = acc_device
        self.acc: dict[str, HessianAccumulator] = {}
        self.order: list[str] = []  # target names, in the order their module first ran
        self.groups: list[list[str]] = []  # names sharing one input, in execution order
        self._linear: dict[int, list[PrunableLayer]] = {}
        self._experts: dict[int, list[PrunableLayer]] = {}
        for t in targets:
            (self._linear if t.expert is None else self._experts).setdefault(id(t.module), []).append(t)
        self._seen: dict[tuple, HessianAccumulator] = {}
        self._keep: list[torch.Tensor] = []
        self._handles = []
        self._group_of: dict[int, list[str]] = {}

    def __enter__(self):
        done = set()
        for t in self.targets:
            if id(t.module) in done:
                continue
            done.add(id(t.module))
            if t.expert is None:
                self._handles.append(t.module.register_forward_pre_hook(self._linear_hook))
            else:
                self._handles.append(t.module.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.end_pass()

    def end_pass(self) -> None:
        self._seen.clear()
        self._keep.clear()

    def _new_acc(self, cols: int) -> HessianAccumulator:
        return HessianAccumulator(cols, device=self.acc_device)

    def _linear_hook(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        for t in self._linear[id(module)]:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            shared = self._seen.get(key)
            if t.name not in self.acc:
                self.order.append(t.name)
                if shared is not None:
                    self.acc[t.name] = shared
                    self._group_of[id(shared)].append(t.name)
                else:
                    self.acc[t.name] = self._new_acc(t.in_features)
                    grp = [t.name]
                    self.groups.append(grp)
                    self._group_of[id(self.acc[t.name])] = grp
            acc = self.acc[t.name]
            if shared is acc:
                continue
            acc.update(x)
            self._seen[key] = acc
            self._keep.append(x)  # keeps the storage alive so its address cannot be reused within this pass

    def _experts_hook(self, module, args, kwargs):
        targets = self._experts[id(module)]
        info = targets[0].info
        try:
            hidden, named = _split_call(module.forward, args, kwargs)
        except (TypeError, ValueError):  # a wrapper taking *args: (hidden_states, top_k_index, top_k_weights)
            hidden, named = args[0], {"top_k_index": args[1] if len(args) > 1 else kwargs.get("top_k_index")}
        top_k_index = named.get("top_k_index", named.get("router_indices"))
        if top_k_index is None:
            raise RuntimeError(f"cannot read the routing of experts module {type(module).__name__}")
        x_all = hidden.reshape(-1, hidden.shape[-1])
        idx = top_k_index.reshape(x_all.shape[0], -1)
        for part in ("gate_up", "down"):
            names = [t.name for t in targets if t.part == part]
            if names and names[0] not in self.acc:
                self.order.extend(names)
                self.groups.append(names)
        for t in targets:
            if t.name not in self.acc:
                self.acc[t.name] = self._new_acc(t.in_features)
        by_expert: dict[int, list[PrunableLayer]] = {}
        for t in targets:
            by_expert.setdefault(t.expert, []).append(t)
        for e, ts in by_expert.items():
            rows = (idx == e).any(dim=-1)
            x = x_all[rows]
            for t in ts:
                if x.shape[0] == 0:
                    continue
                if t.part == "gate_up":
                    self.acc[t.name].update(x)
                else:
                    self.acc[t.name].update(info.down_input(module, e, x))


# --------------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------------
class _Checkpoint:
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


# --------------------------------------------------------------------------------------------------------------------
# prune_model
# --------------------------------------------------------------------------------------------------------------------
def _block_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


def _fits_on_device(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


def _progress(iterable, *, desc: str, total: int | None = None, enabled: bool, leave: bool = True, position=0):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is not worth failing for
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, position=position, dynamic_ncols=True)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration=None,
    *,
    sparsity: float = 0.5,
    pattern: str | None = None,
    quant_bits: int | None = None,
    quant_group_size: int | None = None,
    method: str = "sparsegpt",
    blocks: Iterable[int] | None = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    layer_sparsity: Mapping[str, float | str] | None = None,
    true_sequential: bool = False,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    tokenizer=None,
    device: torch.device | str | None = None,
    offload: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    backend: str = "auto",
    progress: bool = False,
    on_block_end: Callable[[int, list[LayerReport]], None] | None = None,
) -> PruneReport:
    """Prune a transformers causal LM in place, block by block, with SparseGPT (or a baseline).

    Args:
        model: a causal LM (``...ForCausalLM``); it may stay on the CPU: one block at a time moves to ``device``.
        calibration: (nsamples, seqlen) token ids (a tensor, a list of 1-D tensors or a dict with ``input_ids``) or
            text with ``tokenizer``; not needed for ``method="magnitude"``.
        sparsity: unstructured sparsity in [0, 1); ignored when ``pattern`` ("N:M", N kept of every M) is given.
        quant_bits, quant_group_size: joint quantization (see :func:`prune_layer`).
        method: "sparsegpt", "wanda" or "magnitude".
        blocks: indices of the decoder blocks to prune (default: all).
        include, exclude: glob patterns on layer names, full ("model.layers.3.mlp.up_proj") or relative to the block
            ("mlp.up_proj"); a layer is pruned if it matches an ``include`` pattern (default: all) and no ``exclude``.
        layer_sparsity: glob pattern → sparsity (float or "50%") or "N:M", overriding the default; first match wins.
        true_sequential: re-run the block between groups of layers (q/k/v, o, gate/up, down), so each group's
            Hessian sees the outputs of the already-pruned groups before it.
        nsamples, seqlen, seed: calibration count and length (a subset of given ids, or windows drawn from text).
        device: where blocks are processed (default: CUDA if available, else the CPU).
        offload: keep calibration activations on the CPU (``None``: only when they do not fit on ``device``).
        checkpoint_dir: save the state after every block; a rerun with the same settings resumes there.
        block_size, damp, backend: passed to :func:`prune_layer`.
        progress: tqdm bars per block and layer on stderr.
        on_block_end: called with (block index, its layer reports) after each block has been checkpointed.

    Returns:
        :class:`PruneReport`. Bad input (no decoder blocks, empty calibration, too long sequences, a pattern that
        does not divide a layer's width, ...) raises before any weight changes.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    default = _parse_setting(pattern if pattern is not None else sparsity, "default")
    overrides = [(p, _parse_setting(v, f"layer_sparsity[{p!r}]")) for p, v in (layer_sparsity or {}).items()]
    if not isinstance(block_size, int) or block_size < 1:
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

    # Which matrices, with which setting; every check happens before anything is modified.
    plan: dict[int, list[tuple[PrunableLayer, _Setting]]] = {}
    for b in chosen:
        items = []
        for t in find_prunable_layers(layers[b]):
            full = f"{prefix}.{b}.{t.name}"
            if include is not None and not _matches(include, full, t.name):
                continue
            if exclude is not None and _matches(exclude, full, t.name):
                continue
            s = next((s for p, s in overrides if _matches([p], full, t.name)), default)
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
            items.append((t, s))
        if items:
            plan[b] = items
    if not plan:
        raise ValueError("no layer matches the include/exclude/blocks selection: nothing to prune")

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {
        "method": method, "sparsity": default.sparsity, "pattern": default.pattern, "quant_bits": quant_bits,
        "quant_group_size": quant_group_size, "blocks": sorted(plan), "include": include, "exclude": exclude,
        "layer_sparsity": {p: asdict(s) for p, s in overrides}, "true_sequential": bool(true_sequential),
        "block_size": block_size, "damp": damp, "seed": seed,
    }
    report = PruneReport(method=method, settings=settings)

    needs_data = method != "magnitude"
    ids = None
    if needs_data:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data")
        ids = prepare_calibration(model, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                  tokenizer=tokenizer)
        settings.update(nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]))

    ckpt = None
    state = None
    if checkpoint_dir is not None:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        h.update(type(model).__name__.encode() + str(nblocks).encode())
        if ids is not None:
            h.update(ids.numpy().tobytes())
        ckpt = _Checkpoint(checkpoint_dir, h.hexdigest())
        state = ckpt.load()

    was_training = model.training
    model.eval()
    cfg = getattr(model, "config", None)
    old_use_cache = getattr(cfg, "use_cache", None)
    if cfg is not None and old_use_cache is not None:
        cfg.use_cache = False
    try:
        start = 0
        if state is not None:
            start = int(state["next_block"])
            report.resumed_from_block = start
            report.layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in state["reports"]]
            for b in range(start):
                if b in plan:
                    layers[b].load_state_dict(ckpt.block_weights(b))
        last = max(plan)
        prior_seconds = float(state["seconds"]) if state is not None else 0.0

        inputs: BlockInputs | None = None
        acts: list[torch.Tensor] = []
        store = dev
        if needs_data and start <= last:
            resumed_acts = state is not None and state.get("acts")
            inputs = capture_block_inputs(model, layers, ids, keep_hidden=not resumed_acts)
            if resumed_acts:
                acts = list(ckpt.activations(state["acts"]).split(1))
            else:
                acts = inputs.hidden
                inputs.hidden = []
            nbytes = 2 * sum(a.numel() * a.element_size() for a in acts)
            store = torch.device("cpu") if (offload or (offload is None and not _fits_on_device(dev, nbytes))) else dev
            acts = [a.to(store) for a in acts]

        bar = _progress(range(start, last + 1), desc="blocks", total=last + 1 - start, enabled=progress)
        for b in bar:
            block = layers[b]
            home = _block_device(block)
            block.to(dev)
            kw = map_tensors(inputs.kwargs[b], lambda t: t.to(dev)) if inputs is not None else {}

            def run_block(collector: _Collector | None = None, keep_outputs: bool = False, block=block, kw=kw,
                          acts=acts):
                outs = []
                for a in acts:
                    y = call_block(block, a.to(dev), kw)
                    if collector is not None:
                        collector.end_pass()
                    if keep_outputs:
                        outs.append(y.to(store))
                return outs

            block_reports: list[LayerReport] = []
            items = plan.get(b, [])
            if items:
                block_reports = _prune_block(f"{prefix}.{b}", items, method, run_block, dev,
                                             true_sequential=true_sequential, quant_bits=quant_bits,
                                             quant_group_size=quant_group_size, block_size=block_size, damp=damp,
                                             backend=backend, progress=progress)
                report.layers.extend(block_reports)
            if needs_data and b < last:
                acts = run_block(keep_outputs=True)
            block.to(home)
            if ckpt is not None:
                elapsed = prior_seconds + time.perf_counter() - t_start
                ckpt.save(b, block, acts if (needs_data and b < last) else None, report.layers, elapsed)
            if on_block_end is not None:
                on_block_end(b, block_reports)
        report.seconds = prior_seconds + time.perf_counter() - t_start
        report.blocks_pruned = sorted(plan)
        return report
    finally:
        if cfg is not None and old_use_cache is not None:
            cfg.use_cache = old_use_cache
        model.train(was_training)


def _prune_block(prefix: str, items, method: str, run_block, dev: torch.device, *, true_sequential: bool,
                 quant_bits, quant_group_size, block_size, damp, backend, progress) -> list[LayerReport]:
    setting = {id(t): s for t, s in items}
    targets = [t for t, _ in items]
    reports: dict[str, LayerReport] = {}

    def prune(ts: list[PrunableLayer], acc: dict[str, HessianAccumulator]):
        for t in _progress(ts, desc=prefix.rsplit(".", 1)[-1].join(("block ", "")), enabled=progress,
                           leave=False, position=1):
            reports[t.name] = _prune_one(f"{prefix}.{t.name}", t, setting[id(t)], method, acc.get(t.name),
                                         quant_bits=quant_bits, quant_group_size=quant_group_size,
                                         block_size=block_size, damp=damp, backend=backend)

    if method == "magnitude":
        prune(targets, {})
    else:
        with _Collector(targets, dev) as col:
            run_block(col)
        missing = [t.name for t in targets if t.name not in col.acc]
        if missing:
            raise RuntimeError(f"{prefix}: layers {missing} never ran during the block's forward pass")
        if not true_sequential:
            prune(targets, col.acc)
        else:
            by_name = {t.name: t for t in targets}
            for g, names in enumerate(col.groups):
                ts = [by_name[n] for n in names]
                if g == 0:
                    prune(ts, col.acc)
                    continue
                with _Collector(ts, dev) as sub:
                    run_block(sub)
                prune(ts, sub.acc)
    order = [t.name for t in targets]
    return [reports[n] for n in order]


def _prune_one(full: str, t: PrunableLayer, s: _Setting, method: str, acc: HessianAccumulator | None, *,
               quant_bits, quant_group_size, block_size, damp, backend) -> LayerReport:
    W = t.weight()
    pat = s.pattern
    common = dict(name=full, shape=tuple(W.shape), method=method, pattern=pat, target_sparsity=s.sparsity,
                  quant_bits=quant_bits, tokens=0 if acc is None else acc.count)
    if method != "magnitude" and (acc is None or acc.count == 0):
        return LayerReport(loss=math.nan, sparsity=float((W == 0).sum()) / W.numel(), damp=0.0, seconds=0.0,
                           backend="-", skipped="no calibration tokens reached this layer", **common)
    t0 = time.perf_counter()
    if method == "sparsegpt":
        r = prune_layer(W, acc.hessian.to(W.device), sparsity=s.sparsity, pattern=pat, block_size=block_size,
                        damp=damp, quant_bits=quant_bits, quant_group_size=quant_group_size, backend=backend)
        return LayerReport(loss=r.loss, sparsity=r.sparsity, damp=r.damp, seconds=r.seconds, backend=r.backend,
                           **common)
    if method == "wanda":
        sp = baselines.wanda_prune_(W, acc.hessian.diagonal(), sparsity=s.sparsity, pattern=pat,
                                    quant_bits=quant_bits, quant_group_size=quant_group_size)
    else:
        sp = baselines.magnitude_prune_(W, sparsity=s.sparsity, pattern=pat, quant_bits=quant_bits,
                                        quant_group_size=quant_group_size)
    return LayerReport(loss=math.nan, sparsity=sp, damp=0.0, seconds=time.perf_counter() - t0, backend=method,
                       **common)
