"""The block loop shared by pruning and by the allocation's measurements: the decoder blocks in order, each moved to
the compute device, visited with a :class:`BlockRunner` over the calibration activations, then run once more to make
the next block's inputs, and moved back.

Where the weights live is a *weight source*: :class:`InMemoryWeights` (every weight in the model, the default) or
:class:`~.streaming.StreamedWeights` (models bigger than memory: each block read from a checkpoint when its turn comes
and written out when done). The loop calls the same methods on both, so nothing else in the pipeline asks which one
it has.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checks import count_nonzero
from .blocks import BlockInputs, call_block, map_tensors
from .hessian_hooks import HessianCollector
from .progress import progress_bar
from .timing import Timings


class InMemoryWeights:
    """The weight source of a model held in memory: nothing to read or write."""

    #: allocations, which measure on the dense model before pruning it, need the whole model in memory
    in_memory = True

    def ensure(self, b: int) -> None:
        """Block ``b``'s weights in memory."""

    def release(self, b: int) -> None:
        """Block ``b`` is done (pruned and run)."""

    def drop(self, b: int) -> None:
        """Block ``b``'s weights are not needed now (read for the input capture of a resumed run)."""

    def restore(self, b: int, block: nn.Module, saved: Callable[[], dict]) -> None:
        """A resumed run: block ``b`` as the checkpoint saved it (``saved()`` loads its state dict and the marks of
        how its layers were pruned)."""
        from .checkpoint import restore_marks

        block.load_state_dict(restore_marks(block, saved()))

    def totals(self, model: nn.Module) -> tuple[int, int] | None:
        """(parameters, zeros) over the whole model, every parameter once (tied embeddings are one tensor)."""
        params = zeros = 0
        for p in model.parameters():  # deduplicated by identity
            params += p.numel()
            zeros += p.numel() - count_nonzero(p)
        return params, zeros


def block_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device("cpu")


class BlockRunner:
    """Runs one block over the calibration activations: with a Hessian collector's hooks (``runner(collector)``),
    or to produce the next block's inputs (:meth:`outputs`, kept on ``store``)."""

    def __init__(self, block: nn.Module, kwargs: dict, acts: list[torch.Tensor], device: torch.device,
                 store: torch.device):
        self.block, self.kwargs, self.acts, self.device, self.store = block, kwargs, acts, device, store

    def __call__(self, collector: HessianCollector | None = None) -> None:
        for a in self.acts:
            call_block(self.block, a.to(self.device), self.kwargs)
            if collector is not None:
                collector.end_pass()

    def outputs(self) -> list[torch.Tensor]:
        return [call_block(self.block, a.to(self.device), self.kwargs).to(self.store) for a in self.acts]


def run_blocks(layers: nn.ModuleList, inputs: BlockInputs | None, acts: list[torch.Tensor], *, start: int, last: int,
               device: torch.device, store: torch.device, source, visit: Callable[[int, BlockRunner], None],
               after: Callable[[int, nn.Module, list[torch.Tensor] | None], None] | None = None,
               outputs: bool = True, timings: Timings | None = None, progress: bool = False,
               desc: str = "blocks") -> None:
    """Blocks ``start``..``last`` in order: ``visit(b, runner)`` on each (on ``device``, over ``acts``), then, with
    ``outputs`` and before the last block, the block's outputs become the next ``acts`` (timed as ``forward``), and
    ``after(b, block, next acts or None)`` once the block is back where it lives and ``source`` has released it.
    ``inputs`` holds every block's keyword arguments (``None`` when no block runs on data: magnitude pruning)."""
    for b in progress_bar(range(start, last + 1), desc=desc, total=last + 1 - start, enabled=progress):
        source.ensure(b)
        block = layers[b]
        home = block_device(block)
        block.to(device)
        kw = map_tensors(inputs.kwargs[b], lambda t: t.to(device)) if inputs is not None else {}
        run = BlockRunner(block, kw, acts, device, store)
        visit(b, run)
        more = outputs and b < last
        if more:
            if timings is not None:
                with timings.phase("forward"):
                    acts = run.outputs()
            else:
                acts = run.outputs()
        block.to(home)
        source.release(b)
        if after is not None:
            after(b, block, acts if more else None)
