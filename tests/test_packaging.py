"""What the package imports is declared in pyproject.toml, and what is declared is used."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsegpt_kernels"

#: import name -> distribution name, where they differ
DISTRIBUTION = {}
#: declared distributions the package does not import itself, and why they are needed
USED_INDIRECTLY = {
    "numpy": "torch.Tensor.numpy() (the checkpoint fingerprint) and Triton's interpreter",
    "gguf": "transformers reads the embedded model's GGUF file with it",
    "ninja": "torch.utils.cpp_extension builds the extension on first use with it (backends/extension.py)",
}


def _imported_top_level() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "sparsegpt_kernels":
                    found.setdefault(DISTRIBUTION.get(top, top), set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def test_every_import_is_declared():
    required, extras = _declared()
    runtime_extras = set().union(*(v for k, v in extras.items() if k not in ("test", "dev")))
    missing = {d: files for d, files in _imported_top_level().items() if d not in required | runtime_extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_runtime_dependency_is_used():
    required, extras = _declared()
    imported = set(_imported_top_level())
    runtime = required | set().union(*(v for k, v in extras.items() if k not in ("test", "dev")))
    unused = sorted(d for d in runtime if d not in imported and d not in USED_INDIRECTLY)
    assert not unused, f"declared in pyproject.toml but never imported (and no reason given): {unused}"


def test_the_version_is_written_once():
    """pyproject.toml takes the version from the package (``__version__``), and the installed metadata agrees."""
    import importlib.metadata

    import sparsegpt_kernels

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparsegpt_kernels.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", sparsegpt_kernels.__version__)
    assert importlib.metadata.version("sparsegpt_kernels") == sparsegpt_kernels.__version__
