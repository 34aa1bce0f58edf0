"""One process of a distributed prune_model run, started by tests/test_distributed.py (not a test module itself).

Environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (as torchrun sets them). Arguments: see ``main``. Writes
``<out>/rank<r>.pt`` with the pruned state dict and the report.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _finish() -> NoReturn:
    """Close the group and leave without the interpreter's teardown. Once in about 30 runs, gloo's threads aborted a
    worker there after its work was saved and the group closed ("terminate called without an active exception",
    exit -6), which made a run with correct results fail."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="llama")
    p.add_argument("--out", required=True)
    p.add_argument("--nsamples", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--pattern", default=None)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--blocks", default=None)
    p.add_argument("--true-sequential", action="store_true")
    p.add_argument("--refine", default="none")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--die-after-block", type=int, default=None, help="this rank exits abruptly after that block")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--rank-sparsity", default=None, help="'RANK:VALUE': that rank passes another sparsity (bad launch)")
    p.add_argument("--stream-src", default=None, help="stream this checkpoint into --out/streamed (prune_checkpoint)")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    from sparsegpt_kernels.model import prune_model

    if args.family == "embedded":
        from sparsegpt_kernels.model import load_model

        model, _ = load_model("embedded", tokenizer=False)
        vocab = model.config.vocab_size
    else:
        from test_model_families import VOCAB, tiny

        model, vocab = tiny(args.family), VOCAB
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(7))
    sparsity = args.sparsity
    if args.rank_sparsity:
        r, v = args.rank_sparsity.split(":")
        if int(r) == rank:
            sparsity = float(v)

    def on_block_end(b, reports):
        if args.die_after_block is not None and b == args.die_after_block and rank == args.die_rank:
            os._exit(17)  # a crash: no clean-up, no goodbye to the other processes

    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    if args.stream_src:
        from sparsegpt_kernels.model.streaming import prune_checkpoint

        report = prune_checkpoint(args.stream_src, os.path.join(args.out, "streamed"), ids, sparsity=sparsity,
                                  pattern=args.pattern, blocks=blocks, device="cpu", backend="torch")
        torch.save({"report": report.to_dict()}, os.path.join(args.out, f"rank{rank}.pt"))
        _finish()
    report = prune_model(model, ids if args.method != "magnitude" else None, sparsity=sparsity, pattern=args.pattern,
                         method=args.method, blocks=blocks, true_sequential=args.true_sequential, device="cpu",
                         backend="torch", checkpoint_dir=args.checkpoint_dir, on_block_end=on_block_end,
                         refine=args.refine)
    torch.save({"state": model.state_dict(), "report": report.to_dict()}, os.path.join(args.out, f"rank{rank}.pt"))
    _finish()


if __name__ == "__main__":
    sys.exit(main())
