"""Build script. The package is pure Python; the compiled operators (csrc/) are an optional extension.

The extension ``sparsegpt_kernels._C`` is built against the torch found at build time, so install with
``pip install --no-build-isolation .`` (or ``-e .``) to get it. It is skipped, leaving a working pure-Python install,
when torch cannot be imported at build time (e.g. plain ``pip install .`` with build isolation), when no C++ compiler
is found, or when ``SPARSEGPT_KERNELS_NO_EXT=1``. Its CUDA part is added when torch is a CUDA build and nvcc is found
(``SPARSEGPT_KERNELS_NO_CUDA=1`` skips it). A failing compile is reported and skipped too, unless
``SPARSEGPT_KERNELS_REQUIRE_EXT=1``, which turns every reason for not building it into an error.

Sources come from csrc/sources.txt, which CMakeLists.txt reads as well.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "sparsegpt_kernels._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE = _flag("SPARSEGPT_KERNELS_REQUIRE_EXT")


def _say(msg: str) -> None:
    print(f"sparsegpt_kernels setup: {msg}", file=sys.stderr, flush=True)


def _skip(reason: str) -> dict:
    if REQUIRE:
        raise RuntimeError(f"SPARSEGPT_KERNELS_REQUIRE_EXT=1 but the extension cannot be built: {reason}")
    _say(f"building without the compiled extension ({reason}); the pure-PyTorch backend will be used")
    return {}


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt as {group: [path relative to the repository root]}."""
    groups: dict[str, list[str]] = {}
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                group, path = (p.strip() for p in line.split(":", 1))
                groups.setdefault(group, []).append(path)
    return groups


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX", "").split()
    candidates = [cxx[0]] if cxx else ["c++", "g++", "clang++"]
    return any(shutil.which(c) for c in candidates)


def _extensions() -> dict:
    if _flag("SPARSEGPT_KERNELS_NO_EXT"):
        return _skip("SPARSEGPT_KERNELS_NO_EXT is set")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return _skip(f"torch is not importable at build time ({e}); use pip install --no-build-isolation")
    if not _have_cxx():
        return _skip("no C++ compiler found")
    if not os.path.exists(os.path.join(ROOT, "csrc", "sources.txt")):
        return _skip("csrc/ is not part of this source tree")

    src = read_sources()
    sources = list(src["ext"])
    depends = list(src.get("core", [])) + ["csrc/cpu/aten_ops.h", "csrc/cuda/sweep_kernels.h"]
    # the C++ standard comes from cpp_extension (it matches the torch headers); no contraction into fused
    # multiply-adds, so that the CPU sweep rounds like the reference on every architecture
    cxx_flags = ["-O3", "-g0", "-ffp-contract=off"]
    link_flags = ["-g0", "-s"]
    nvcc_flags = ["-O3"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop in this extension
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    macros = []
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _flag("SPARSEGPT_KERNELS_NO_CUDA")
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    if with_cuda:
        sources += src.get("cuda", []) + src.get("cuda_ext", [])
        macros.append(("SPARSEGPT_KERNELS_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        _say(f"building the C++ and CUDA extension (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        ext_cls = cpp_extension.CppExtension
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc/CUDA_HOME not found or disabled"
        _say(f"building the C++ extension (CPU only: {why})")
    ext = ext_cls(
        EXT_NAME,
        sources=sources,
        depends=depends,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that retries without OpenMP (a compiler without it: the CPU loops then run on one thread)
        and, unless SPARSEGPT_KERNELS_REQUIRE_EXT=1, leaves a pure-Python install when the build still fails."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
                return
            except Exception as e:  # noqa: BLE001 - any compiler/linker failure
                error = e
            flags = extension.extra_compile_args.get("cxx", [])
            if "-fopenmp" in flags:
                _say(f"compiling {extension.name} with -fopenmp failed ({type(error).__name__}); retrying without "
                     "OpenMP (the CPU backend's loops will run on one thread)")
                flags.remove("-fopenmp")
                extension.extra_link_args = [a for a in extension.extra_link_args if a != "-fopenmp"]
                try:
                    super().build_extension(extension)
                    return
                except Exception as e:  # noqa: BLE001
                    error = e
            if REQUIRE:
                raise error
            _say(f"compiling {extension.name} failed ({type(error).__name__}: {error}); continuing without it")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


setup(**_extensions())
