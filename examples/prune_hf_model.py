"""Prune a Hugging Face causal LM with SparseGPT through the Python API, then save it as a normal checkpoint.

    python examples/prune_hf_model.py                                   # the embedded SmolLM2-135M, 50%, on the CPU
    python examples/prune_hf_model.py --model path/to/model --pattern 2:4 --nsamples 128 --seqlen 2048 --out pruned/

Calibration and evaluation text come from disjoint parts of the offline Shakespeare plays (or ``--data FILE``); each
window starts with BOS when the model's tokenizer puts one before a text (``--bos`` changes that).
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsegpt_kernels.model import calibration_and_eval, load_model, perplexity, prune_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--sparsity", type=float, default=None, help="fraction pruned (default 0.5); not with --pattern")
    p.add_argument("--pattern", default=None)
    p.add_argument("--quant-bits", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--bos", default="auto", choices=["auto", "window", "stream", "none"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="save the pruned model here (save_pretrained)")
    args = p.parse_args()

    model, tok = load_model(args.model)
    calib, held_out = calibration_and_eval(tok, args.data, nsamples=args.nsamples, seqlen=args.seqlen,
                                           eval_windows_max=args.eval_windows, bos=args.bos)

    print(f"dense perplexity:  {perplexity(model, held_out, device=args.device):.3f}")
    t0 = time.perf_counter()
    report = prune_model(model, calib, sparsity=args.sparsity, pattern=args.pattern, quant_bits=args.quant_bits,
                         device=args.device, progress=True)
    print(report.format_table())
    print(f"pruned perplexity: {perplexity(model, held_out, device=args.device):.3f}  "
          f"(pruning took {time.perf_counter() - t0:.1f} s)")
    if args.out:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
