"""Pruning with several processes on ``torch.distributed``: data-parallel calibration, weight-parallel solves.

Inside an initialised process group (``torchrun``, or ``torch.distributed.init_process_group`` in Python; NCCL on
GPUs, gloo on CPUs), :func:`sparsegpt_kernels.prune_model` splits the work of every decoder block:

1. each process runs the block on its own contiguous share of the calibration samples (shares differ by at most one
   sample) and accumulates partial Hessians (running means with token counts);
2. every set of layers that shares one Hessian (q/k/v, gate/up, each expert) is a *unit*; units are given to owner
   processes by a greedy cost balance (about ⅓c³ + r·c² FLOPs per layer: the Cholesky and the lazy updates);
3. each partial Hessian is reduced (token-weighted sum) to the unit's owner, which prunes the unit's layers;
4. the owners broadcast the pruned (and quantized) weights, every process gathers every layer's report, and each
   process runs its share of the samples through the pruned block to make the next block's inputs.

Collectives run with the process group's timeout (``init_process_group(timeout=...)``; the command line sets it from
``--dist-timeout``): a process that dies makes the others fail with :class:`DistributedPruneError` within that time
(usually at once: gloo and NCCL see the closed connection) instead of hanging.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..hessian import HessianAccumulator
from .report import LayerReport


class DistributedPruneError(RuntimeError):
    """Processes disagree (different arguments or data) or lost contact with each other."""


class DistContext:
    """This process's place in the group and the collectives :func:`prune_model` needs."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"  # NCCL moves CUDA tensors, gloo CPU ones
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.comm_seconds = 0.0
        self.load = [0.0] * self.world  # work given to each process so far (FLOPs): balance carries across calls

    @classmethod
    def current(cls, process_group=None) -> DistContext | None:
        """The context of ``process_group`` (default: the initialised default group); ``None`` outside a process
        group or with a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group was given but torch.distributed is not initialised")
            return None
        ctx = cls(process_group)
        return ctx if ctx.world > 1 else None

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _run(self, what: str, fn: Callable[[], object]):
        t0 = time.perf_counter()
        try:
            return fn()
        except (RuntimeError, ConnectionError) as e:
            raise DistributedPruneError(
                f"process {self.rank} of {self.world} lost contact with the others during {what} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); a rerun with the same "
                "checkpoint directory resumes from the last finished block") from e
        finally:
            self.comm_seconds += time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------------- set-up
    def check_same(self, what: str, value: str) -> None:
        """Raise on every process unless every process passes the same ``value`` (e.g. a digest of its arguments)."""
        digest = hashlib.sha256(value.encode()).hexdigest()
        seen: list = [None] * self.world
        self._run(f"the check of {what}", lambda: dist.all_gather_object(seen, digest, group=self.group))
        if len(set(seen)) != 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(seen):
                groups.setdefault(d, []).append(r)
            listing = "; ".join(f"processes {ranks}" for ranks in groups.values())
            raise DistributedPruneError(f"the processes were started with different {what} ({listing} agree among "
                                        "themselves): start every process with the same arguments and data")

    def shard(self, n: int) -> slice:
        """This process's contiguous share of ``n`` calibration samples."""
        if self.world > n:
            raise DistributedPruneError(f"{self.world} processes but only {n} calibration samples: every process "
                                        "needs at least one (use fewer processes or more samples)")
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self, what: str) -> None:
        self._run(what, lambda: dist.barrier(group=self.group))

    # ---------------------------------------------------------------------------------------------------- per block
    def assign(self, costs: list[float]) -> list[int]:
        """Owner process of each unit: the costliest unit first, each to the least loaded process so far (ties: lowest
        rank); the same on every process. The load carries over from earlier calls (true-sequential mode assigns one
        group at a time)."""
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (self.load[r], r))
            owner[i] = r
            self.load[r] += costs[i]
        return owner

    def reduce_hessian(self, acc: HessianAccumulator, owner: int) -> None:
        """Token-weighted sum of every process's partial Hessian into ``acc`` on ``owner``."""
        H = acc.hessian
        count = torch.tensor([float(acc.count)], dtype=torch.float64, device=self.comm_device)
        total = (H * acc.count).to(self.comm_device)
        self._run("the Hessian reduction", lambda: dist.all_reduce(count, group=self.group))
        self._run("the Hessian reduction", lambda: dist.reduce(total, dst=self._global(owner), group=self.group))
        if self.rank == owner:
            n = int(count.item())
            if n:
                H.copy_(total.to(H.device) / n)
            acc.count = n

    def broadcast(self, tensor: torch.Tensor, owner: int) -> None:
        """``tensor`` (a weight, possibly a view) on every process set to ``owner``'s."""
        buf = tensor.detach().to(self.comm_device).contiguous()
        self._run("the weight broadcast", lambda: dist.broadcast(buf, src=self._global(owner), group=self.group))
        if self.rank != owner:
            with torch.no_grad():
                tensor.copy_(buf.to(tensor.device))

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        out: list = [None] * self.world
        self._run("the report exchange", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out


def layer_cost(t) -> float:
    """Rough FLOPs of pruning one layer (a :class:`~.blocks.PrunableLayer`): the Cholesky (⅓c³) and the lazy updates
    (r·c²)."""
    rows, cols = t.shape
    return cols**3 / 3 + rows * cols**2


def prune_shared(ctx: DistContext, layers: list, acc: dict[str, HessianAccumulator],
                 prune: Callable[[list, dict], None], reports: dict[str, LayerReport], timings) -> None:
    """Steps 2-4 of the module docstring for ``layers`` of one block: units by shared accumulator (each layer alone
    without Hessians), owners by cost, the Hessians reduced to their owners, ``prune(own layers, acc)`` here (it fills
    ``reports``), the pruned weights broadcast and every report gathered into ``reports`` (as its owner saw it, with
    the owner's rank and the unit's communication time)."""
    comm0 = ctx.comm_seconds
    by_name = {t.name: t for t in layers}
    units: list[list[str]] = []
    index: dict[int, int] = {}
    for t in layers:
        key = id(acc[t.name]) if t.name in acc else id(t)
        if key not in index:
            index[key] = len(units)
            units.append([])
        units[index[key]].append(t.name)
    owners = ctx.assign([sum(layer_cost(by_name[n]) for n in unit) for unit in units])
    comm: dict[str, float] = {}
    for unit, owner in zip(units, owners):
        if unit[0] in acc:
            c0 = ctx.comm_seconds
            ctx.reduce_hessian(acc[unit[0]], owner)
            comm.update({n: (ctx.comm_seconds - c0) / len(unit) for n in unit})
    own = [n for unit, owner in zip(units, owners) if owner == ctx.rank for n in unit]
    prune([by_name[n] for n in own], acc)
    for unit, owner in zip(units, owners):
        for n in unit:
            c0 = ctx.comm_seconds
            ctx.broadcast(by_name[n].weight(), owner)
            comm[n] = comm.get(n, 0.0) + ctx.comm_seconds - c0
    shared = {n: {**asdict(reports[n]), "rank": ctx.rank, "comm_seconds": comm.get(n, 0.0)} for n in own}
    for theirs in ctx.gather(shared):
        for n, rep in theirs.items():
            reports[n] = LayerReport(**{**rep, "shape": tuple(rep["shape"])})
    timings.add("communication", ctx.comm_seconds - comm0)
