"""Side-by-side comparison: dense vs magnitude vs Wanda vs SparseGPT at given settings, on one held-out text."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..options import METHODS, parse_setting
from .evaluate import perplexity
from .pipeline import prune_model


@dataclass
class CompareRow:
    method: str
    setting: str  # "dense", "50%", "2:4", "50%+4bit", ...
    perplexity: float
    sparsity: float
    prune_seconds: float
    eval_seconds: float


def compare(model: nn.Module, calibration: torch.Tensor, eval_ids: torch.Tensor, *, methods=("dense",) + METHODS,
            settings=("50%",), device=None, progress: bool = False, log=None, on_row=None,
            **prune_kwargs) -> list[CompareRow]:
    """Prune a fresh copy of ``model`` with every method at every setting and measure held-out perplexity.

    ``model`` itself is not modified. ``log``: optional callable receiving one line per finished row;
    ``on_row``: optional callable receiving the list of rows so far after each one (e.g. to save partial results).
    """
    rows: list[CompareRow] = []

    def emit(row):
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        if log is not None:
            log(f"{row.method:>10} {row.setting:>10}  ppl {row.perplexity:9.3f}  sparsity {row.sparsity:.3f}  "
                f"prune {row.prune_seconds:7.1f} s  eval {row.eval_seconds:6.1f} s")

    for m in methods:
        if m != "dense" and m not in METHODS:
            raise ValueError(f"unknown method {m!r}: expected dense or one of {', '.join(METHODS)}")
    parsed = [parse_setting(s, f"setting {s!r}", allow_quant=True) for s in settings]
    if "dense" in methods:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, device=device, progress=progress)
        emit(CompareRow("dense", "dense", ppl, 0.0, 0.0, time.perf_counter() - t0))
    for m in methods:
        if m == "dense":
            continue
        for setting in parsed:
            work = copy.deepcopy(model)
            rep = prune_model(work, calibration, method=m, device=device, progress=progress,
                              **setting.prune_kwargs(), **prune_kwargs)
            t0 = time.perf_counter()
            ppl = perplexity(work, eval_ids, device=device, progress=progress)
            emit(CompareRow(m, setting.label, ppl, rep.sparsity, rep.seconds, time.perf_counter() - t0))
            del work
    return rows


def format_rows(rows: list[CompareRow], markdown: bool = False) -> str:
    head = ["method", "setting", "perplexity", "sparsity", "prune s", "eval s"]
    body = [[r.method, r.setting, f"{r.perplexity:.2f}", f"{r.sparsity:.3f}", f"{r.prune_seconds:.1f}",
             f"{r.eval_seconds:.1f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])
