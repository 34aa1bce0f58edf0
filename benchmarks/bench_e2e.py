"""End-to-end latency: prefill and decode of a causal LM, dense versus its 2:4 weights exported to semi-structured
sparse tensors (sparsegpt_kernels.to_semi_structured).

The 2:4 model is the dense model with every decoder linear layer pruned 2:4 by magnitude (latency does not depend on
which weights were kept, so no calibration is run); "dense" times that same pruned model with dense storage, then the
weights are exported in place and timed again. Also records the logits difference between the two and the bytes
held by the linear weights (dense vs compressed).

Models: "tiny" (a small LLaMA built from a config, the CPU default), "llama-7b" (LLaMA-7B shapes with random weights,
the GPU default), "embedded" (the package's embedded SmolLM2-135M via sparsegpt_kernels.model, when importable).
Needs transformers. On a device without semi-structured support the dense side is measured and the rows say why the
sparse side is missing.

    python benchmarks/bench_e2e.py                      # default model for the device
    python benchmarks/bench_e2e.py --embedded           # add the embedded model
    python benchmarks/bench_e2e.py --models llama-7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta, print_table, time_fn, write_csv  # noqa: E402

from sparsegpt_kernels.export import to_semi_structured  # noqa: E402
from sparsegpt_kernels.reference import nm_keep_mask  # noqa: E402

#: LlamaConfig keyword arguments of the models built from a config.
CONFIGS = {
    "quick": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
#: (prefill (batch, prompt) list, decode batch list, decode prompt, decode steps) per size class.
WORKLOADS = {
    "quick": ([(1, 32)], [1], 16, 4),
    "cpu": ([(1, 128)], [1, 8], 64, 8),
    "gpu": ([(1, 128), (1, 512), (1, 2048), (8, 512)], [1, 16, 64], 128, 32),
    "gpu-short": ([(1, 512), (8, 512)], [1, 16], 128, 16),  # benchmarks/gpu_check.sh: within its time budget
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_from_config(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(CONFIGS[name])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the device: a 7B model initialised on a CPU takes minutes
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def load_embedded(device: torch.device, dtype: torch.dtype) -> nn.Module:
    from sparsegpt_kernels.model import load_model

    model, _ = load_model("embedded", dtype=dtype, tokenizer=False)
    return model.to(device).eval()


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the output head (embeddings and the LM head are not pruned)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


@torch.no_grad()
def prune_24_(model: nn.Module) -> list[str]:
    names = []
    for name, mod in decoder_linears(model):
        if mod.weight.shape[1] % 4 == 0:
            mod.weight.mul_(nm_keep_mask(mod.weight.abs(), 2, 4))
            names.append(name)
    return names


def weight_bytes(model: nn.Module, names: list[str]) -> int:
    mods = dict(model.named_modules())
    total = 0
    for n in names:
        w = mods[n].weight
        parts = [getattr(w, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
        parts = [p for p in parts if isinstance(p, torch.Tensor)]
        total += sum(p.numel() * p.element_size() for p in parts) if parts else w.numel() * w.element_size()
    return total


def _cache_kw(model) -> str:
    """The name of the KV-cache argument: "cache" in newer transformers, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _forward(model, ids, **kw):
    try:
        return model(ids, logits_to_keep=1, **kw)
    except TypeError:  # older transformers
        return model(ids, **kw)


@torch.no_grad()
def measure(model: nn.Module, device: torch.device, workload, repeats: int, vocab: int) -> dict[tuple, float]:
    """{(phase, batch, prompt): seconds}: prefill = one forward of batch x prompt tokens; decode = per generated token
    step (batch sequences, KV cache of the prompt), averaged over the steps."""
    prefills, decode_batches, prompt, steps = workload
    g = torch.Generator().manual_seed(0)
    out = {}
    kw = _cache_kw(model)
    for b, t in prefills:
        ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
        med, _, _ = time_fn(lambda ids=ids: _forward(model, ids, use_cache=False), device, repeats=repeats)
        out[("prefill", b, t)] = med
    for b in decode_batches:
        ids = torch.randint(0, vocab, (b, prompt), generator=g).to(device)
        nxt = torch.randint(0, vocab, (b, 1), generator=g).to(device)
        state = {}

        def setup(ids=ids, state=state):
            state["past"] = _cache_of(_forward(model, ids, use_cache=True))

        def loop(nxt=nxt, state=state):
            past = state["past"]
            for _ in range(steps):
                past = _cache_of(_forward(model, nxt, use_cache=True, **{kw: past}))

        med, _, _ = time_fn(loop, device, repeats=repeats, setup=setup)
        out[("decode", b, prompt)] = med / steps
    return out


def run_model(name: str, device: torch.device, dtype: torch.dtype, workload, repeats: int,
              layers: int | None = None) -> list[dict]:
    model = load_embedded(device, dtype) if name == "embedded" else build_from_config(name, device, dtype, layers)
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    pruned = prune_24_(model)
    info = meta(device)
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(0, vocab, (2, 64), generator=g).to(device)
    with torch.no_grad():
        ref_logits = model(probe, use_cache=False).logits.float()
    dense_bytes = weight_bytes(model, pruned)
    print(f"## {name}: {params / 1e6:.1f} M parameters, {len(pruned)} linear layers pruned 2:4, {dtype}", flush=True)
    dense = measure(model, device, workload, repeats, vocab)

    report = to_semi_structured(model, layers=pruned)
    n_conv = len(report.converted)
    print(str(report).splitlines()[0], flush=True)
    sparse, diff, sparse_bytes = {}, None, dense_bytes
    if n_conv:
        with torch.no_grad():
            got = model(probe, use_cache=False).logits.float()
        diff = float((got - ref_logits).abs().max())
        sparse_bytes = weight_bytes(model, pruned)
        sparse = measure(model, device, workload, repeats, vocab)
        status = "ok" if n_conv == len(pruned) else f"{len(pruned) - n_conv} layers kept dense"
    else:
        why = report.support.reason if not report.supported else "; ".join(sorted(set(report.kept_dense.values())))
        status = f"sparse skipped: {why}"
    rows = []
    for (phase, b, t), s in dense.items():
        sp = sparse.get((phase, b, t))
        rows.append({
            "model": name, "params_m": f"{params / 1e6:.1f}", "dtype": str(dtype).replace("torch.", ""),
            "phase": phase, "batch": b, "prompt": t, "unit": "ms/forward" if phase == "prefill" else "ms/token step",
            "dense_ms": f"{s * 1e3:.3f}", "sparse_ms": f"{sp * 1e3:.3f}" if sp else "",
            "speedup": f"{s / sp:.3f}" if sp else "",
            "converted": f"{n_conv}/{len(pruned)}", "sparse_backend": report.support.kernels or "-",
            "linear_mb_dense": f"{dense_bytes / 2**20:.1f}", "linear_mb_sparse": f"{sparse_bytes / 2**20:.1f}",
            "logits_max_abs_diff": f"{diff:.3g}" if diff is not None else "",
            "logits_max_abs": f"{float(ref_logits.abs().max()):.3g}",
            "status": status, **info,
        })
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no rows_\n"
    r0 = rows[0]
    lines = [f"End-to-end latency on {r0['device']} ({r0['date']}, torch {r0['torch']}); prefill = one forward "
             "(last-token logits), decode = one token step with a KV cache of the prompt.", "",
             "| model | dtype | phase | batch | prompt | dense ms | 2:4 ms | speedup | converted "
             "| linear MB dense → 2:4 | max logit diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['params_m']} M) | {r['dtype']} | {r['phase']} | {r['batch']} | {r['prompt']} "
                     f"| {r['dense_ms']} | {r['sparse_ms'] or '–'} | {r['speedup'] or '–'} | {r['converted']} "
                     f"| {r['linear_mb_dense']} → {r['linear_mb_sparse']} | {r['logits_max_abs_diff'] or '–'} |")
    notes = sorted({r["status"] for r in rows if r["status"] != "ok"})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None, choices=[*CONFIGS, "embedded"],
                   help="default: tiny on CPU, llama-7b on GPU")
    p.add_argument("--embedded", action="store_true", help="also the embedded SmolLM2-135M (sparsegpt_kernels.model)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 on GPU, 2 on CPU")
    p.add_argument("--quick", action="store_true", help="a toy model, one repeat (smoke run)")
    p.add_argument("--workload", default=None, choices=sorted(WORKLOADS),
                   help="prefill/decode sizes (default: by device; gpu-short is a shorter GPU set)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the models built from a config (default: the real model's)")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if gpu else "float32")]
    models = args.models or (["quick"] if args.quick else ["llama-7b" if gpu else "tiny"])
    if args.embedded and "embedded" not in models:
        models = [*models, "embedded"]
    workload = WORKLOADS[args.workload or ("quick" if args.quick else ("gpu" if gpu else "cpu"))]
    repeats = 1 if args.quick else (args.repeats or (3 if gpu else 2))

    rows, failed = [], []
    for name in models:
        try:
            rows += run_model(name, device, dtype, workload, repeats, args.layers)
        except ImportError as e:  # transformers or the embedded model's package is not installed
            print(f"skipping {name}: {e}", flush=True)
            rows.append({"model": name, "status": f"skipped: {e}", **meta(device)})
        except Exception as e:  # noqa: BLE001 - keep the other models' rows; fail at the end
            traceback.print_exc()
            failed.append(name)
            rows.append({"model": name, "status": f"failed: {type(e).__name__}: {e}", **meta(device)})
    rows = [r for r in rows if "phase" in r] + [r for r in rows if "phase" not in r]
    timed = [r for r in rows if "phase" in r]
    if timed:
        print()
        print_table(timed, ["model", "phase", "batch", "prompt", "dense_ms", "sparse_ms", "speedup", "converted"])
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, f"e2e_{device.type}.csv")
    write_csv(out, timed or rows)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(timed))
        for r in rows:
            if "phase" not in r:
                f.write(f"- {r['model']}: {r['status']}\n")
    print(f"\nwrote {out} and {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
