"""Smoke check of an installed sparsegpt_kernels, run from outside the source tree (CI: scripts/test_install.sh).

    python smoke_installed.py --extension jit|aot

Imports the package, lists the backends, prunes a layer with the cpp backend and compares it with the torch backend,
and runs ``sparsegpt-kernels --help``. ``--extension`` says how the compiled extension must have been provided: built
at install time (``aot``: the installed ``sparsegpt_kernels._C``) or built on first use from the shipped sources
(``jit``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--extension", choices=["jit", "aot"], required=True)
    p.add_argument("--source-tree", default=None, help="must not be where the package is imported from")
    args = p.parse_args()

    import torch

    import sparsegpt_kernels as sk
    from sparsegpt_kernels.backends import extension

    where = os.path.dirname(os.path.abspath(sk.__file__))
    print(f"sparsegpt_kernels {sk.__version__} from {where}; torch {torch.__version__}")
    if args.source_tree:
        tree = os.path.abspath(args.source_tree)
        assert not where.startswith(tree + os.sep), f"imported from the source tree ({where})"
    backends = sk.available_backends("cpu")
    print("available backends (cpu):", backends)
    assert "cpp" in backends and "torch" in backends, (backends, extension.missing_reason())
    mod = extension.load()
    aot = mod.__name__ == "sparsegpt_kernels._C"
    print(f"extension: {mod.__name__} ({'built at install' if aot else 'built on first use'}) from {mod.__file__}")
    assert aot == (args.extension == "aot"), f"expected the {args.extension} extension, got {mod.__name__}"

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
    H = 2.0 / X.shape[0] * X.T @ X
    W = torch.randn(96, 256, generator=g)
    results = {}
    for be in ("torch", "cpp"):
        Wb = W.clone()
        r = sk.prune_layer(Wb, H, pattern="2:4", backend=be)
        assert r.backend == be
        kept = (Wb != 0).reshape(96, 64, 4).sum(-1)
        assert bool((kept == 2).all()), f"{be}: not exactly 2:4"
        results[be] = (Wb, r.loss)
    (Wt, lt), (Wc, lc) = results["torch"], results["cpp"]
    agree = float(((Wt == 0) == (Wc == 0)).float().mean())
    print(f"prune_layer 2:4: loss torch {lt:.6g}, cpp {lc:.6g}; masks agree on {agree:.4%} of the weights")
    assert abs(lc - lt) <= 1e-3 * lt and agree >= 0.999

    exe = shutil.which("sparsegpt-kernels")
    assert exe is not None, "the sparsegpt-kernels command is not on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prune" in out.stdout, out.stderr
    print("sparsegpt-kernels --help: ok")
    print("smoke check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
