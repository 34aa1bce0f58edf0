"""Hessians of a block's prunable layers, collected with forward hooks while the block runs on the calibration
activations (one accumulator per input that layers share; per-expert accumulators of the routed tokens for fused
mixture-of-experts modules)."""

from __future__ import annotations

import functools
import time

import torch

from ..hessian import HessianAccumulator
from .blocks import PrunableLayer, split_call


def _timed(hook):
    """``hook`` adding its wall time to the collector's ``seconds``."""

    @functools.wraps(hook)
    def wrapper(self, *args):
        t0 = time.perf_counter()
        try:
            return hook(self, *args)
        finally:
            self.seconds += time.perf_counter() - t0

    return wrapper


class HessianCollector:
    """Forward hooks that accumulate the Hessians of ``targets`` while a block runs.

    Linear layers called on the very same tensor (q/k/v, gate/up) share one accumulator, updated once. Fused
    experts get one accumulator per expert and part, fed only the tokens routed to that expert.
    """

    def __init__(self, targets: list[PrunableLayer], acc_device: torch.device, products: str = "float32"):
        self.targets = targets
        self.acc_device = acc_device
        self.products = products  # how the accumulators multiply (HessianAccumulator's ``products``)
        self.acc: dict[str, HessianAccumulator] = {}
        self.order: list[str] = []  # target names, in the order their module first ran
        self.groups: list[list[str]] = []  # names sharing one input, in execution order
        self._linear: dict[int, list[PrunableLayer]] = {}
        self._experts: dict[int, list[PrunableLayer]] = {}
        for t in targets:
            (self._linear if t.expert is None else self._experts).setdefault(id(t.module), []).append(t)
        self._seen: dict[tuple, HessianAccumulator] = {}
        self._keep: list[torch.Tensor] = []
        self._handles = []
        self._group_of: dict[int, list[str]] = {}
        self.seconds = 0.0  # spent in the hooks (the Hessian updates), see .timing

    def __enter__(self):
        done = set()
        for t in self.targets:
            if id(t.module) in done:
                continue
            done.add(id(t.module))
            if t.expert is None:
                self._handles.append(t.module.register_forward_pre_hook(self._linear_hook))
            else:
                self._handles.append(t.module.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.end_pass()
        if exc_type is None:
            self.check_finite()

    def check_finite(self) -> None:
        """The deferred finiteness check of every accumulator (once per block instead of a host synchronisation per
        hook call): ``ValueError`` naming the layers whose inputs held NaN or Inf."""
        done = set()
        for name in self.order:
            acc = self.acc[name]
            if id(acc) not in done:
                done.add(id(acc))
                names = self._group_of.get(id(acc), [name])
                acc.check_finite(f"the inputs of {', '.join(names)}")

    def end_pass(self) -> None:
        self._seen.clear()
        self._keep.clear()

    def _new_acc(self, cols: int) -> HessianAccumulator:
        return HessianAccumulator(cols, device=self.acc_device, check_each=False, products=self.products)

    @_timed
    def _linear_hook(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        for t in self._linear[id(module)]:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            shared = self._seen.get(key)
            if t.name not in self.acc:
                self.order.append(t.name)
                if shared is not None:
                    self.acc[t.name] = shared
                    self._group_of[id(shared)].append(t.name)
                else:
                    self.acc[t.name] = self._new_acc(t.in_features)
                    grp = [t.name]
                    self.groups.append(grp)
                    self._group_of[id(self.acc[t.name])] = grp
            acc = self.acc[t.name]
            if shared is acc:
                continue
            acc.update(x)
            self._seen[key] = acc
            self._keep.append(x)  # keeps the storage alive so its address cannot be reused within this pass

    @_timed
    def _experts_hook(self, module, args, kwargs):
        targets = self._experts[id(module)]
        info = targets[0].info
        try:
            hidden, named = split_call(module.forward, args, kwargs)
        except (TypeError, ValueError):  # a wrapper taking *args: (hidden_states, top_k_index, top_k_weights)
            hidden, named = args[0], {"top_k_index": args[1] if len(args) > 1 else kwargs.get("top_k_index")}
        top_k_index = named.get("top_k_index", named.get("router_indices"))
        if top_k_index is None:
            raise RuntimeError(f"cannot read the routing of experts module {type(module).__name__}")
        x_all = hidden.reshape(-1, hidden.shape[-1])
        idx = top_k_index.reshape(x_all.shape[0], -1)
        for part in ("gate_up", "down"):
            names = [t.name for t in targets if t.part == part]
            if names and names[0] not in self.acc:
                self.order.extend(names)
                self.groups.append(names)
        for t in targets:
            if t.name not in self.acc:
                self.acc[t.name] = self._new_acc(t.in_features)
        by_expert: dict[int, list[PrunableLayer]] = {}
        for t in targets:
            by_expert.setdefault(t.expert, []).append(t)
        for e, ts in by_expert.items():
            rows = (idx == e).any(dim=-1)
            x = x_all[rows]
            for t in ts:
                if x.shape[0] == 0:
                    continue
                if t.part == "gate_up":
                    self.acc[t.name].update(x)
                else:
                    self.acc[t.name].update(info.down_input(module, e, x))
