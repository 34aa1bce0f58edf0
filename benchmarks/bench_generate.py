"""End to end on the CPU: greedy generate tokens/s of a pruned model loaded dense (transformers) and loaded sparse
(sparsegpt_kernels.load_sparse), in the same process, and the checkpoints' sizes.

The model is pruned once in bfloat16 (SparseGPT, 16 x 512 Shakespeare calibration tokens, the default backend),
saved both ways into a temporary directory, and each checkpoint is loaded in float32 and in bfloat16 ("dense" is the
faster of the two dense loads, as a user would pick). Tokens/s counts the decode steps after the prompt (batch x
steps / time), the best of --repeats generations per model, dense and sparse interleaved. The first generated
tokens of the sparse model must be the dense model's (same dtype): the CSV gives how many agree. Prompts: the
forward of a --prompt-tokens prompt per sequence of the batch (the sparse model's layers on the panel kernel where
the CPU has AVX2 or AVX-512 and the process measured it faster than their decompressed weights' dense product, else
on the latter), the best of --repeats, in ms. Writes benchmarks/results/generate_cpu.csv.

    python benchmarks/bench_generate.py                          # SmolLM2-135M at 50%, batch 1 and 8, 128 tokens
    python benchmarks/bench_generate.py --model embedded-gemma3 --settings 50% 2:4
    python benchmarks/bench_generate.py --quick                  # 2 blocks, 8 tokens (smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_DIR, RESULTS_DIR, meta, print_table, write_csv  # noqa: E402

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import calibration_windows, load_model, load_text, tokenize  # noqa: E402
from sparsegpt_kernels.options import parse_setting  # noqa: E402
from sparsegpt_kernels.sparse.checkpoint import checkpoint_sizes  # noqa: E402

PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:"


def decode_rate(model, tok, batch: int, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(tokens/s of the decode steps, the generated ids)."""
    from transformers import StoppingCriteriaList

    enc = tok([PROMPT] * batch, return_tensors="pt")
    stamps = []

    def stamp(input_ids, scores, **kwargs):
        stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([stamp]),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    steps = len(stamps) - 1
    return batch * steps / (stamps[-1] - stamps[0]), out[:, enc["input_ids"].shape[1]:]


def prompt_ms(model, tok, batch: int, tokens: int) -> float:
    """ms of one forward of a batch of `tokens`-token prompts (the prefill of a generation)."""
    ids = tok([PROMPT * (tokens // 8 + 1)] * batch, return_tensors="pt")["input_ids"][:, :tokens]
    with torch.no_grad():
        t = time.perf_counter()
        model(ids)
        return 1e3 * (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--settings", nargs="+", default=["50%"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="generations per model; the best rate is kept")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per sequence of the timed prompt")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    new_tokens = 8 if args.quick else args.new_tokens
    batches = [1] if args.quick else args.batches
    info = meta(torch.device("cpu"))
    rows = []
    base, tok = load_model(args.model)
    calib = calibration_windows(tokenize(tok, load_text("shakespeare").calibration), 4 if args.quick else 16,
                                128 if args.quick else 512)
    for label in args.settings:
        setting = parse_setting(label, allow_quant=True)
        model, _ = load_model(args.model, dtype=torch.bfloat16)  # checkpoints in bfloat16, as models ship
        kw = setting.prune_kwargs()
        if setting.quant_bits:
            # groups of 128 input columns, or the largest of 64 / 32 that divides every layer's (SmolLM2: 64)
            dims = (model.config.hidden_size, model.config.intermediate_size)
            kw["quant_group_size"] = next((g for g in (128, 64, 32) if all(d % g == 0 for d in dims)), None)
        sk.prune_model(model, calib, device="cpu", blocks=[0, 1] if args.quick else None, **kw)
        with tempfile.TemporaryDirectory() as d:
            dense_dir, sparse_dir = os.path.join(d, "dense"), os.path.join(d, "sparse")
            model.save_pretrained(dense_dir)
            tok.save_pretrained(dense_dir)
            sk.save_sparse(model, sparse_dir, tokenizer=tok)
            del model
            sizes = checkpoint_sizes(sparse_dir)
            dense_total = sum(os.path.getsize(os.path.join(dense_dir, f)) for f in os.listdir(dense_dir)
                              if f.endswith(".safetensors"))
            for batch in batches:
                rates, ids, prompts = {}, {}, {}
                prompt_tokens = 16 if args.quick else args.prompt_tokens
                for dtype in (torch.float32, torch.bfloat16):
                    dn = str(dtype).replace("torch.", "")
                    dense, _ = load_model(dense_dir, dtype=dtype)
                    sparse = sk.load_sparse(sparse_dir, dtype=dtype)
                    for _ in range(1 if args.quick else args.repeats):  # interleaved, the best of each kept
                        for kind, m in (("dense", dense), ("sparse", sparse)):
                            rate, out = decode_rate(m, tok, batch, new_tokens)
                            rates[f"{kind}_{dn}"] = max(rates.get(f"{kind}_{dn}", 0.0), rate)
                            ids[f"{kind}_{dn}"] = out
                            ms = prompt_ms(m, tok, batch, prompt_tokens)
                            prompts[f"{kind}_{dn}"] = min(prompts.get(f"{kind}_{dn}", float("inf")), ms)
                    del dense, sparse
                best_dense = max(rates["dense_float32"], rates["dense_bfloat16"])
                best_sparse = max(rates["sparse_float32"], rates["sparse_bfloat16"])
                best_prompt = {k: min(prompts[f"{k}_float32"], prompts[f"{k}_bfloat16"]) for k in ("dense", "sparse")}
                same = {dn: int((ids[f"sparse_{dn}"] == ids[f"dense_{dn}"]).all(0).long().cumprod(0).sum())
                        for dn in ("float32", "bfloat16")}
                rows.append({
                    "model": args.model, "setting": label, "batch": batch, "new_tokens": new_tokens,
                    "repeats": 1 if args.quick else args.repeats,
                    **{f"{k}_tok_s": f"{v:.2f}" for k, v in rates.items()},
                    "speedup": f"{best_sparse / best_dense:.2f}", "prompt_tokens": prompt_tokens,
                    **{f"{k}_prompt_ms": f"{v:.1f}" for k, v in prompts.items()},
                    "prompt_speedup": f"{best_prompt['dense'] / best_prompt['sparse']:.2f}",
                    "same_first_tokens_fp32": same["float32"], "same_first_tokens_bf16": same["bfloat16"],
                    "pruned_layers_vs_dense": f"{sizes['compressed'] / sizes['dense_equivalent']:.4f}",
                    "checkpoint_mb": f"{sizes['total'] / 1e6:.1f}", "dense_checkpoint_mb": f"{dense_total / 1e6:.1f}",
                    **info,
                })
                print(rows[-1], flush=True)
    out = args.csv or os.path.join(OUT_DIR if args.quick else RESULTS_DIR, "generate_cpu.csv")
    write_csv(out, rows)
    print_table(rows, ["model", "setting", "batch", "dense_float32_tok_s", "dense_bfloat16_tok_s",
                       "sparse_float32_tok_s", "sparse_bfloat16_tok_s", "speedup", "prompt_speedup",
                       "same_first_tokens_bf16",
                       "pruned_layers_vs_dense", "checkpoint_mb", "dense_checkpoint_mb"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
