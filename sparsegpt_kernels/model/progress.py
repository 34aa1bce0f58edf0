"""Progress bars of the long model-level loops (tqdm on stderr, when asked for)."""

from __future__ import annotations

import sys


def progress_bar(iterable, *, desc: str, total: int | None = None, enabled: bool, leave: bool = True, position=0):
    """``iterable`` wrapped in a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is not worth failing for
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, position=position, dynamic_ncols=True)
