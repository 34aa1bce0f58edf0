"""A streamed or in-memory prune in a process of its own, for tests/test_streaming.py (not a test module itself).

    python stream_worker.py SRC OUT [--in-memory] [--die-after-block B] [--blocks 0,1]

Prints one JSON line: the resident memory before pruning and the peak during it (bytes, from /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--in-memory", action="store_true")
    p.add_argument("--die-after-block", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imported before the baseline is read)

    from sparsegpt_kernels.model import prune_model
    from sparsegpt_kernels.model.streaming import prune_checkpoint

    config = transformers.AutoConfig.from_pretrained(args.src)
    ids = torch.randint(0, config.vocab_size, (args.nsamples, 32), generator=torch.Generator().manual_seed(1))

    def on_block_end(b, reports):
        if args.die_after_block is not None and b == args.die_after_block:
            os._exit(17)

    from accelerate import init_empty_weights

    with init_empty_weights():  # the modelling code and its libraries are loaded before the baseline is read
        transformers.AutoModelForCausalLM.from_config(config)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    baseline = _status("VmRSS")
    if args.in_memory:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
        prune_model(model, ids, sparsity=0.5, device="cpu", on_block_end=on_block_end)
        model.save_pretrained(args.out)
    else:
        prune_checkpoint(args.src, args.out, ids, sparsity=0.5, device="cpu", dtype=torch.float32,
                         on_block_end=on_block_end)
    print(json.dumps({"baseline": baseline, "peak": _status("VmHWM")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
