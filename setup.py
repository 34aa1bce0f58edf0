"""Build script. The package is pure Python; the compiled operators (csrc/) are an optional extension.

The extension ``sparsegpt_kernels._C`` is built against the torch found at build time, so install with
``pip install --no-build-isolation .`` (or ``-e .``) to get it. It is skipped, leaving a working pure-Python install,
when torch cannot be imported at build time (e.g. plain ``pip install .`` with build isolation), when no C++ compiler
is found, or when ``SPARSEGPT_KERNELS_NO_EXT=1``. Its CUDA part is added when torch is a CUDA build and a CUDA toolkit
(nvcc and its headers) is found (``SPARSEGPT_KERNELS_NO_CUDA=1`` skips it); with no GPU visible (CI, a container
build) and no ``TORCH_CUDA_ARCH_LIST``, it is built for the architectures torch itself was built for. A failing build
falls back step by step: without the CUDA part (the CPU part still builds), then without OpenMP, then without the
extension, each step reported. ``SPARSEGPT_KERNELS_REQUIRE_EXT=1`` turns every reason for not building it, or for
dropping its CUDA part, into an error.

Sources come from csrc/sources.txt, which CMakeLists.txt reads as well.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

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


def _default_cuda_arch_list(torch) -> str | None:
    """The GPU architectures to build for when ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible (a CI runner,
    a container build): those the installed torch was itself compiled for, the newest also as PTX so that later GPUs
    can JIT it. torch.utils.cpp_extension would otherwise ask the (absent) device and fail."""
    get_flags = getattr(torch._C, "_cuda_getArchFlags", None)
    flags = get_flags() if get_flags is not None else ""
    archs = []
    for flag in (flags or "").split():
        digits = flag.rsplit("_", 1)[-1]
        if flag.startswith("sm_") and digits.isdigit() and len(digits) >= 2:
            archs.append(f"{digits[:-1]}.{digits[-1]}")
    if not archs:
        return None
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _cuda_toolkit(cpp_extension) -> str | None:
    """The CUDA toolkit root to build against: one with bin/nvcc and include/cuda_runtime.h.

    torch guesses the root from CUDA_HOME, else from where ``nvcc`` is on PATH. Where that ``nvcc`` is a wrapper script
    (say /usr/local/bin/nvcc running the real one), the guess has no headers; then nvcc itself says where its headers
    are (``nvcc --dryrun`` prints its include directory), and /usr/local/cuda is tried last.
    """

    def ok(root: str | None) -> bool:
        return bool(root) and all(os.path.exists(os.path.join(root, *p)) for p in (("bin", "nvcc"),
                                                                                 ("include", "cuda_runtime.h")))

    guess = cpp_extension.CUDA_HOME
    candidates = [guess]
    nvcc = os.path.join(guess, "bin", "nvcc") if guess else shutil.which("nvcc")
    if nvcc and os.path.exists(nvcc):
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
            for word in (out.stdout + out.stderr).replace('"', " ").split():
                if word.startswith("-I") and word.rstrip("/").endswith("include"):
                    inc = os.path.normpath(word[2:])
                    if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
                        root = os.path.dirname(inc)  # <root>/include, or <root>/targets/<arch>/include
                        candidates += [root, os.path.dirname(os.path.dirname(root))]
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    return next((os.path.normpath(c) for c in candidates if ok(c)), None)


def _toolchain():
    """sparsegpt_kernels/backends/toolchain.py, loaded by path (importing the package needs its dependencies)."""
    spec = importlib.util.spec_from_file_location(
        "_sparsegpt_kernels_toolchain", os.path.join(ROOT, "sparsegpt_kernels", "backends", "toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    chosen, message = _toolchain().choose_cxx()
    if message:
        _say(message)
    os.environ.update(chosen)

    src = read_sources()
    depends = list(src.get("core", [])) + list(src.get("ext_headers", []))
    # the C++ standard comes from cpp_extension (it matches the torch headers); no contraction into fused
    # multiply-adds, so that the CPU sweep rounds like the reference on every architecture
    openmp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    with_cuda = torch.version.cuda is not None and not _flag("SPARSEGPT_KERNELS_NO_CUDA")
    if with_cuda:
        toolkit = _cuda_toolkit(cpp_extension)
        if toolkit is None:
            with_cuda = False
        elif toolkit != cpp_extension.CUDA_HOME:
            _say(f"using the CUDA toolkit at {toolkit} (torch found {cpp_extension.CUDA_HOME}, which has no headers)")
            cpp_extension.CUDA_HOME = toolkit
            os.environ["CUDA_HOME"] = toolkit
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        archs = _default_cuda_arch_list(torch)
        if archs is None:
            _say("no GPU is visible and torch names no CUDA architectures; set TORCH_CUDA_ARCH_LIST to build the "
                 "CUDA part")
            with_cuda = False
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            _say(f"no GPU is visible: building the CUDA part for torch's own architectures ({archs}); set "
                 "TORCH_CUDA_ARCH_LIST to choose")

    def make(cuda: bool, omp: bool):
        """The extension with or without its CUDA part and OpenMP."""
        cxx_flags = ["-O3", "-g0", "-ffp-contract=off"]
        link_flags = ["-g0", "-s"]
        if omp:
            # at::parallel_for is a header template: without -fopenmp it compiles to a serial loop in this extension
            cxx_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        sources = list(src["ext"])
        macros = []
        if cuda:
            sources += src.get("cuda", []) + src.get("cuda_ext", [])
            macros.append(("SPARSEGPT_KERNELS_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
        return ext_cls(
            EXT_NAME,
            sources=sources,
            depends=depends,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )

    if with_cuda:
        _say(f"building the C++ and CUDA extension (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc/CUDA_HOME not found or disabled"
        _say(f"building the C++ extension (CPU only: {why})")
    # what to try, in order, until one builds: without the CUDA part (unless SPARSEGPT_KERNELS_REQUIRE_EXT=1 asks for
    # everything), then without OpenMP
    attempts = [(with_cuda, openmp)]
    if with_cuda and not REQUIRE:
        attempts.append((False, openmp))
    if openmp:
        attempts.append((with_cuda and REQUIRE, False))

    def describe(cuda: bool, omp: bool) -> str:
        parts = ["with CUDA" if cuda else "without its CUDA part"]
        if not omp:
            parts.append("without OpenMP (the CPU backend's loops will run on one thread)")
        return ", ".join(parts)

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that falls back step by step (``attempts``) when a build fails and, unless
        SPARSEGPT_KERNELS_REQUIRE_EXT=1, leaves a working pure-Python install when every attempt fails."""

        failed: set[str] = set()

        def build_extension(self, extension):
            for i, (cuda, omp) in enumerate(attempts):
                if i:
                    extension.__dict__.update(make(cuda, omp).__dict__)
                try:
                    super().build_extension(extension)
                    return
                except Exception as e:  # noqa: BLE001 - any compiler/linker/configuration failure
                    error = e
                    if i + 1 < len(attempts):
                        _say(f"building {extension.name} failed ({type(e).__name__}: {str(e)[:300]}); retrying "
                             f"{describe(*attempts[i + 1])}")
            if REQUIRE:
                raise error
            _say(f"building {extension.name} failed ({type(error).__name__}: {error}); continuing without it")
            self.failed.add(extension.name)

        def build_extensions(self):
            super().build_extensions()
            # an extension that could not be built is left out of what gets installed or copied into the source tree
            self.extensions = [e for e in self.extensions if e.name not in self.failed]

    return {"ext_modules": [make(with_cuda, openmp)],
            "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


class BuildPyWithSources(build_py):
    """build_py that also ships the C++/CUDA sources inside the package (``sparsegpt_kernels/_csrc``), so that an
    install without the compiled extension can build it on first use (sparsegpt_kernels/backends/extension.py)."""

    def run(self):
        super().run()
        src = os.path.join(ROOT, "csrc")
        if not os.path.isdir(src) or self.editable_mode:
            return  # an editable install reads the repository's csrc/ directly
        dst = os.path.join(self.build_lib, "sparsegpt_kernels", "_csrc")
        for root, dirs, names in os.walk(src):
            dirs[:] = [d for d in dirs if d != "tests"]  # the C++ unit tests are not part of the extension
            for name in names:
                if name.endswith((".h", ".hpp", ".cpp", ".cu", ".cuh", ".txt")):
                    rel = os.path.relpath(os.path.join(root, name), src)
                    self.mkpath(os.path.dirname(os.path.join(dst, rel)))
                    self.copy_file(os.path.join(root, name), os.path.join(dst, rel))


_setup = _extensions()
_setup["cmdclass"] = {**_setup.get("cmdclass", {}), "build_py": BuildPyWithSources}
setup(**_setup)
