"""Models bigger than memory: prune a safetensors checkpoint block by block, straight into a new checkpoint.

:func:`prune_checkpoint` builds the model's skeleton without allocating its weights (accelerate's
``init_empty_weights``), loads what is outside the decoder blocks (embeddings, final norm, LM head), and runs
:func:`sparsegpt_kernels.prune_model` with a :class:`StreamedWeights` weight source: each decoder block is read from
the shards when its turn comes (only that block's tensors), pruned, written to the output as a safetensors file of its
own, and dropped from memory. Peak memory is about one block plus the calibration activations plus the embeddings,
whatever the model's size. The output directory is a normal checkpoint (an index over the block files, the config,
the tokenizer and generation config copied) that ``from_pretrained`` loads.

A killed run resumes: progress (the activations entering the next block) is kept in ``<output>/.prune-progress``
and the block files already written are kept, not redone. With several processes (``torch.distributed``) every
process reads the same block and process 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

import torch
from torch import nn

from ..checks import count_nonzero
from .blocks import tied_copies
from .report import PruneReport

INDEX = "model.safetensors.index.json"
PROGRESS_DIR = ".prune-progress"
#: files copied from the source directory next to the new weights (tokenizer, generation settings, ...)
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_NOT_COPIED = {"config.json", INDEX, "model.safetensors"}


class SafetensorsSource:
    """The tensors of a safetensors checkpoint directory (``model.safetensors``, or shards with an index), read one
    name at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        index = os.path.join(self.dir, INDEX)
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of: dict[str, str] = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir!r} has no safetensors weights (model.safetensors or {INDEX}); "
                                    "streaming reads safetensors checkpoints only")

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for fname, ns in by_file.items():
            with safe_open(os.path.join(self.dir, fname), framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out


def _name_map(model: nn.Module, source: SafetensorsSource) -> dict[str, str]:
    """Model tensor name -> checkpoint tensor name; checkpoints that omit or add the base model's prefix (older OPT,
    GPT-2 files) are handled, anything else is refused with the first name that cannot be found."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = tied_copies(model)
    buffers = {n for n, _ in model.named_buffers()}
    mapping = {}
    for name in model.state_dict():
        if name in tied:
            continue
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        candidates.append(f"{prefix}.{name}" if prefix else name)
        found = next((c for c in candidates if c in source.file_of), None)
        if found is None:
            if name in buffers:
                continue  # a buffer the model computes itself (e.g. rotary frequencies)
            raise ValueError(f"the checkpoint has no tensor for {name!r} (nor {candidates[1:]}); its names do not "
                             "match the model's, so it cannot be streamed")
        mapping[name] = found
    return mapping


def _trim_heap() -> None:
    """glibc keeps freed memory for reuse; a block's worth of it, freed, is returned to the system (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _get(model: nn.Module, name: str):
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return getattr(mod, leaf)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


class StreamedWeights:
    """The weight source of a streamed :func:`prune_model` run (the protocol is :class:`.block_loop.InMemoryWeights`'):
    blocks come from ``source`` and go to ``out_dir``."""

    #: the model is never whole in memory (no allocation; the checkpoint keeps no weights: they are in the output)
    in_memory = False

    def __init__(self, model: nn.Module, prefix: str, layers: nn.ModuleList, source: SafetensorsSource,
                 out_dir: str, dtype: torch.dtype, writer: bool = True):
        self.model, self.prefix, self.layers, self.source = model, prefix, layers, source
        self.out_dir, self.dtype, self.writer = out_dir, dtype, writer
        self.map = _name_map(model, source)
        self.block_names = [[n for n in self.map if n.startswith(f"{prefix}.{b}.")] for b in range(len(layers))]
        in_blocks = {n for names in self.block_names for n in names}
        self.rest = [n for n in self.map if n not in in_blocks]
        self.finished = False
        os.makedirs(out_dir, exist_ok=True)

    def _file(self, b: int | None) -> str:
        return "model-rest.safetensors" if b is None else f"model-block-{b:05d}.safetensors"

    def _load_into_model(self, names: list[str], device: torch.device) -> None:
        tensors = self.source.load(self.map[n] for n in names)
        for n in names:
            _set(self.model, n, tensors[self.map[n]].to(device=device, dtype=self.dtype))

    def load_rest(self) -> None:
        """Embeddings, norms, head: loaded once (and written once)."""
        self._load_into_model(self.rest, torch.device("cpu"))
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        self._write(None, {n: _get(self.model, n) for n in self.rest})

    def ensure(self, b: int) -> None:
        """Block ``b``'s weights in memory (on the CPU)."""
        if any(p.is_meta for p in self.layers[b].parameters()):
            self._load_into_model(self.block_names[b], torch.device("cpu"))

    def done(self, b: int) -> bool:
        return os.path.isfile(os.path.join(self.out_dir, self._file(b)))

    def release(self, b: int) -> None:
        """Write block ``b`` to the output and drop its weights from memory."""
        self._write(b, {n: _get(self.model, n) for n in self.block_names[b]})
        self.drop(b)

    def copy_block(self, b: int) -> None:
        """A block nothing happens to: copied from the source to the output without keeping it."""
        if self.writer and not self.done(b):
            tensors = self.source.load(self.map[n] for n in self.block_names[b])
            self._write(b, {n: tensors[self.map[n]].to(self.dtype) for n in self.block_names[b]})

    def _write(self, b: int | None, tensors: dict[str, torch.Tensor]) -> None:
        """One output file, written to a temporary name and renamed; its parameter and zero counts go into its
        metadata (the report's whole-model totals are summed from there, also over blocks written before a resume)."""
        if not self.writer or (b is not None and self.done(b)):
            return
        from safetensors.torch import save_file

        params = sum(t.numel() for t in tensors.values())
        zeros = sum(t.numel() - count_nonzero(t) for t in tensors.values())
        path = os.path.join(self.out_dir, self._file(b))
        tmp = path + ".tmp"
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, tmp,
                  metadata={"format": "pt", "params": str(params), "zeros": str(zeros)})
        os.replace(tmp, path)

    def restore(self, b: int, block: nn.Module, saved) -> None:
        """A resumed run: block ``b`` is in the output already."""

    def totals(self, model: nn.Module | None = None) -> tuple[int, int] | None:
        """(parameters, zeros) of the written checkpoint, from the files' metadata; ``None`` until :meth:`finish`
        (blocks after the last pruned one are copied then) and in processes that do not write."""
        if not (self.writer and self.finished):
            return None
        from safetensors import safe_open

        params = zeros = 0
        for name in [self._file(None)] + [self._file(b) for b in range(len(self.layers))]:
            with safe_open(os.path.join(self.out_dir, name), framework="pt") as f:
                meta = f.metadata() or {}
            params += int(meta.get("params", 0))
            zeros += int(meta.get("zeros", 0))
        return params, zeros

    def drop(self, b: int) -> None:
        """Forget block ``b``'s weights without writing them, and give the freed memory back to the system."""
        self.layers[b].to("meta")
        _trim_heap()

    def finish(self) -> None:
        """The blocks nothing happened to (after the last pruned one), the index, the config and the other files of
        the source directory."""
        for b in range(len(self.layers)):
            self.copy_block(b)
        self.finished = True
        if not self.writer:
            return
        weight_map = {n: self._file(None) for n in self.rest}
        for b, names in enumerate(self.block_names):
            weight_map.update({n: self._file(b) for n in names})
        total = sum(os.path.getsize(os.path.join(self.out_dir, f)) for f in set(weight_map.values()))
        with open(os.path.join(self.out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        self.model.config.save_pretrained(self.out_dir)
        for name in os.listdir(self.source.dir):
            src = os.path.join(self.source.dir, name)
            if (os.path.isfile(src) and name.endswith(_COPIED_SUFFIXES) and name not in _NOT_COPIED
                    and not name.startswith("model-")):
                shutil.copy2(src, os.path.join(self.out_dir, name))


def prune_checkpoint(model_dir: str | os.PathLike, output_dir: str | os.PathLike, calibration=None, *,
                     dtype: torch.dtype | None = None, tokenizer=None, **prune_kwargs) -> PruneReport:
    """Prune the safetensors checkpoint in ``model_dir`` into ``output_dir`` one decoder block at a time, never
    holding more than one block's weights (see the module docstring); returns the :class:`PruneReport`.

    ``dtype``: the weights' dtype in memory and in the output (default: the checkpoint config's ``torch_dtype``, else
    float32). Every keyword of :func:`prune_model` is accepted except ``checkpoint_dir`` (progress lives in the
    output directory).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .embedded import check_causal_lm
    from .pipeline import run_prune

    if "checkpoint_dir" in prune_kwargs:
        raise ValueError("prune_checkpoint keeps its progress in the output directory; do not pass checkpoint_dir")
    model_dir, output_dir = os.fspath(model_dir), os.fspath(output_dir)
    if os.path.abspath(model_dir) == os.path.abspath(output_dir):
        raise ValueError("the output directory must not be the model directory")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_causal_lm(config, model_dir)
    source = SafetensorsSource(model_dir)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    from .blocks import find_decoder_layers

    prefix, layers = find_decoder_layers(model)
    import torch.distributed as dist

    writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    weights = StreamedWeights(model, prefix, layers, source, output_dir, dtype, writer=writer)
    weights.load_rest()
    report = run_prune(model, calibration, weights, tokenizer=tokenizer,
                       checkpoint_dir=os.path.join(output_dir, PROGRESS_DIR), **prune_kwargs)
    weights.finish()
    if writer:
        report.model_params, report.model_zeros = weights.totals()
        shutil.rmtree(os.path.join(output_dir, PROGRESS_DIR), ignore_errors=True)
    return report
