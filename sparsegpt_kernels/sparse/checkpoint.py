"""Compressed sparse checkpoints: :func:`to_sparse` (in memory), :func:`save_sparse` and :func:`load_sparse`.

A checkpoint directory holds ``config.json`` (the model's config with a ``sparsegpt_kernels`` entry: the format's
name and version and the table of compressed layers), the weights as ``sparse-model.safetensors`` (or shards
``sparse-model-00001-of-0000N.safetensors`` with ``sparse-model.safetensors.index.json``, like transformers' own
index), and the tokenizer and generation config. docs/sparse_format.md describes every tensor. The weight files are
not named like transformers' ``model.safetensors`` on purpose: ``from_pretrained`` on this directory stops with "no
file named model.safetensors" instead of building a model with randomly initialised layers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from collections.abc import Iterable

import torch
from torch import nn

from .format import CompressedWeight, SparseFormatError, dtype_of
from .linear import SparseLinear, linear_weight

FORMAT_NAME = "sparsegpt-kernels-sparse"
FORMAT_VERSION = 1
CONFIG_KEY = "sparsegpt_kernels"
WEIGHTS = "sparse-model.safetensors"
INDEX = "sparse-model.safetensors.index.json"
#: a linear layer is converted by default when at least this fraction of its weight is zero
MIN_SPARSITY = 0.25
DEFAULT_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------------------------
# In memory
# ----------------------------------------------------------------------------------------------------------------
def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _chosen(model: nn.Module, layers, min_sparsity: float) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, (out, in) weight) of the linear layers to compress (see :func:`to_sparse`)."""
    patterns = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
    shared = _shared_parameters(model)
    out = []
    for name, mod in model.named_modules():
        W = linear_weight(mod)
        if W is None or id(mod.weight) in shared or W.dim() != 2:
            continue
        if patterns is not None:
            if any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns):
                out.append((name, mod, W))
        elif float((W == 0).sum()) >= min_sparsity * W.numel():
            out.append((name, mod, W))
    return out


def _compress_module(mod: nn.Module, W: torch.Tensor) -> CompressedWeight:
    from ..model.prune_block import PRUNED_ATTR

    mark = getattr(mod, PRUNED_ATTR, None) or {}
    return CompressedWeight.compress(W, pattern=mark.get("pattern"), quant=mark.get("quant"))


def to_sparse(model: nn.Module, *, layers: Iterable[str] | str | None = None,
              min_sparsity: float = MIN_SPARSITY) -> list[str]:
    """Replace the pruned linear layers of ``model`` by :class:`SparseLinear` modules, in place; returns their names.

    ``layers``: module names or fnmatch patterns to convert (default: every ``nn.Linear`` / ``Conv1D`` whose weight is
    at least ``min_sparsity`` zeros). Layers whose weight is shared with another module (a tied LM head) stay as they
    are. A layer pruned by :func:`sparsegpt_kernels.prune_model` keeps its N:M pattern and, when jointly quantized,
    its weights are stored as integer codes on the pruning's grid.
    """
    chosen = _chosen(model, layers, min_sparsity)
    for name, mod, W in chosen:
        _set_module(model, name, SparseLinear(_compress_module(mod, W), getattr(mod, "bias", None)).to(W.device))
    return [name for name, _, _ in chosen]


def sparse_to_dense(model: nn.Module) -> int:
    """Replace every :class:`SparseLinear` of ``model`` by the plain ``nn.Linear``; returns how many."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_linear())
    return len(names)


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def save_sparse(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, layers=None,
                min_sparsity: float = MIN_SPARSITY, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> dict:
    """Write ``model`` (a transformers model) to the directory ``path`` with its pruned linear layers compressed.

    Layers that are :class:`SparseLinear` already are written as they are; of the others, those :func:`to_sparse`
    would convert (``layers``, ``min_sparsity``) are compressed on the way out, ``model`` itself unchanged.
    Everything else is written as transformers writes it (tied weights once), sharded at ``max_shard_size``. Returns
    the layer table written to config.json.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from ..model.blocks import tied_copies

    path = os.fspath(path)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_sparse writes transformers models (with a config); got a model without one")
    compressed = {name: mod.compressed() for name, mod in model.named_modules() if isinstance(mod, SparseLinear)}
    compressed.update({name: _compress_module(mod, W) for name, mod, W in _chosen(model, layers, min_sparsity)})
    tensors = {}
    for name, cw in compressed.items():
        tensors.update(cw.tensors(name))
    skip = tied_copies(model)
    for k, v in model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if (owner not in compressed or leaf == "bias") and k not in skip:
            tensors[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="sparse-model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):  # a rewrite leaves no stale shard behind
        if old.startswith("sparse-model") and old.endswith((".safetensors", ".json")):
            os.remove(os.path.join(path, old))
    meta = {"format": "pt", CONFIG_KEY: f"{FORMAT_NAME}/{FORMAT_VERSION}"}
    for fname, names in split.filename_to_tensors.items():
        tmp = os.path.join(path, fname + ".tmp")
        save_file({n: tensors[n] for n in names}, tmp, metadata=meta)
        os.replace(tmp, os.path.join(path, fname))
    if split.is_sharded:
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}, f, indent=1)
    table = {name: cw.meta() for name, cw in compressed.items()}
    setattr(config, CONFIG_KEY, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": table})
    try:
        config.save_pretrained(path)
    finally:
        delattr(config, CONFIG_KEY)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def read_header(path: str) -> dict:
    """The JSON header of a safetensors file, with every tensor's dtype, shape and byte range checked against the
    file itself (so that a truncated or corrupt file is refused before anything is read from it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SparseFormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SparseFormatError(f"{path}: truncated (its header says {n} bytes, the file has {size - 8})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SparseFormatError(f"{path}: unreadable safetensors header ({e})") from None
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[t["dtype"]]
            begin, end = (int(x) for x in t["data_offsets"])
            numel = 1
            for s in t["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError):
            raise SparseFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= begin <= end <= data:
            raise SparseFormatError(f"{path}: tensor {name!r} lies beyond the end of the file (truncated?)")
        if end - begin != numel * torch.empty(0, dtype=dtype).element_size():
            raise SparseFormatError(f"{path}: tensor {name!r} has {end - begin} bytes for its shape {t['shape']}")
    return header


def _weight_files(path: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(tensor name -> file, file -> its checked header), from the index or the single file; every tensor the index
    lists must be in its file."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = dict(json.load(f)["weight_map"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SparseFormatError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        files = None
    else:
        raise SparseFormatError(f"{path!r} has no {WEIGHTS} or {INDEX}: not a sparse checkpoint (save_sparse writes "
                                "one)")
    names = sorted(set(files.values())) if files is not None else [WEIGHTS]
    headers = {f: read_header(os.path.join(path, f)) for f in names}
    if files is None:
        files = {name: WEIGHTS for name in headers[WEIGHTS] if name != "__metadata__"}
    for name, f in files.items():
        if name not in headers[f]:
            raise SparseFormatError(f"{os.path.join(path, f)}: the index lists {name!r}, the file has no such tensor")
    return files, headers


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the directory's config.json has a ``sparsegpt_kernels`` entry (its validity is checked on loading)."""
    try:
        with open(os.path.join(os.fspath(path), "config.json")) as f:
            return CONFIG_KEY in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def read_layer_table(path: str) -> dict:
    """The ``sparsegpt_kernels`` entry of ``path``/config.json, its format and version checked."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SparseFormatError(f"{cfg_path}: cannot read it ({type(e).__name__}: {e})") from None
    entry = cfg.get(CONFIG_KEY)
    if not isinstance(entry, dict) or entry.get("format") != FORMAT_NAME:
        raise SparseFormatError(f"{cfg_path} has no {CONFIG_KEY!r} entry of format {FORMAT_NAME!r}: not a sparse "
                                "checkpoint (a dense one loads with transformers' from_pretrained)")
    if entry.get("version") != FORMAT_VERSION:
        raise SparseFormatError(f"{cfg_path}: format version {entry.get('version')!r}; this sparsegpt_kernels reads "
                                f"version {FORMAT_VERSION} (upgrade sparsegpt_kernels to read newer checkpoints)")
    if not isinstance(entry.get("layers"), dict):
        raise SparseFormatError(f"{cfg_path}: the {CONFIG_KEY!r} entry has no 'layers' table")
    return entry


def load_sparse(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """The model of a :func:`save_sparse` checkpoint, its compressed layers as :class:`SparseLinear` modules.

    Every file is checked before anything is built: the format and version, each safetensors header against its
    file's size, every compressed layer's tensors against the layer table (names, dtypes, shapes, the mask's popcount
    against the number of values or codes, N:M patterns), and the remaining tensors against the model. A bad file
    raises :class:`~.format.SparseFormatError` naming the tensor. ``dtype``: the dense tensors' and the values' dtype
    (default: as stored).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.blocks import tied_copies

    path = os.fspath(path)
    entry = read_layer_table(path)
    files, _ = _weight_files(path)
    table = entry["layers"]
    compressed_names = {n for prefix, meta in table.items() for n in CompressedWeight.tensor_names(prefix, meta)}

    def load(names) -> dict[str, torch.Tensor]:
        out, by_file = {}, {}
        for n in names:
            by_file.setdefault(files[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(os.path.join(path, f), framework="pt") as fh:
                for n in ns:
                    out[n] = fh.get_tensor(n)
        return out

    layers = {}
    for prefix, meta in table.items():
        present = [n for n in CompressedWeight.tensor_names(prefix, meta) if n in files]
        layers[prefix] = CompressedWeight.from_tensors(prefix, meta, load(present))
    rest = load([n for n in files if n not in compressed_names])

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    stored = {cw.dtype for cw in layers.values()} or {v.dtype for v in rest.values() if v.is_floating_point()}
    build_dtype = dtype or (next(iter(stored)) if len(stored) == 1 else torch.float32)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=build_dtype)
    for prefix, cw in layers.items():
        try:
            old = model.get_submodule(prefix)
        except AttributeError:
            raise SparseFormatError(f"layer {prefix!r} of the layer table is not a module of "
                                    f"{type(model).__name__}") from None
        W = linear_weight(old)
        if W is None or tuple(W.shape) != cw.shape:
            got = "not a linear layer" if W is None else f"shape {tuple(W.shape)}"
            raise SparseFormatError(f"layer {prefix!r}: the model's module is {got}, the checkpoint has {cw.shape}")
        bias = rest.pop(f"{prefix}.bias", None)
        if (bias is None) != (getattr(old, "bias", None) is None):
            raise SparseFormatError(f"layer {prefix!r}: the checkpoint {'lacks' if bias is None else 'has'} a bias "
                                    "the model's module does not agree with")
        if dtype is not None and cw.values is not None:
            cw.values = cw.values.to(dtype)
            cw.dtype = dtype
        # codes keep the dtype they were rounded to (the weights are those of the dense checkpoint, cast to dtype)
        _set_module(model, prefix, SparseLinear(cw, bias, dtype=dtype))
    state = model.state_dict()  # the skeleton's tensors, on the meta device: names and shapes
    expected = {k for k in state if k.rpartition(".")[0] not in layers}
    unexpected = sorted(set(rest) - expected)
    if unexpected:
        raise SparseFormatError(f"the checkpoint has tensors the model does not: {unexpected[:5]}")
    buffers = {n for n, _ in model.named_buffers()}
    missing = sorted(expected - set(rest) - tied_copies(model) - buffers)
    if missing:
        raise SparseFormatError(f"the checkpoint lacks tensors of the model: {missing[:5]}")
    for k, v in rest.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise SparseFormatError(f"tensor {k!r}: shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}")
    if dtype is not None:
        rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items()}
    model.load_state_dict(rest, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise SparseFormatError(f"the checkpoint left parameters unset: {still_meta[:5]}")
    model.eval()
    return model.to(device)


def checkpoint_sizes(path: str | os.PathLike) -> dict:
    """Bytes of a sparse checkpoint's weights: ``compressed`` (the compressed layers' tensors), ``dense_equivalent``
    (the same layers as dense tensors of their dtype) and ``total`` (every weight file)."""
    path = os.fspath(path)
    entry = read_layer_table(path)
    files, headers = _weight_files(path)
    compressed = dense = 0
    for prefix, meta in entry["layers"].items():
        for n in CompressedWeight.tensor_names(prefix, meta):
            begin, end = headers[files[n]][n]["data_offsets"]
            compressed += end - begin
        r, c = meta["shape"]
        dense += r * c * torch.empty(0, dtype=dtype_of(meta["dtype"], "layer table")).element_size()
    total = sum(os.path.getsize(os.path.join(path, f)) for f in set(files.values()))
    return {"compressed": compressed, "dense_equivalent": dense, "total": total}


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "checkpoint_sizes", "is_sparse_checkpoint", "load_sparse", "save_sparse",
           "sparse_to_dense", "to_sparse"]
