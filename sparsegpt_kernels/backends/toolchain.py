"""Which C++ compiler may build the extension: one that links the C++ runtime (libstdc++) dynamically.

A compiler wrapper that adds ``-static-libstdc++`` (some images set ``CXX`` to one) puts a private copy of libstdc++
into the extension. Its iostreams are never initialised (the process uses the shared libstdc++ that torch loaded), so
the first number formatted into a message crashes the process: every ``TORCH_CHECK`` that fails in the extension
became a segmentation fault instead of a ``RuntimeError`` on the H200 machine, whose ``CXX`` is such a wrapper.

:func:`choose_cxx` probes the compiler the build would use (``$CXX``, else ``c++``) by linking a tiny shared object,
and if that object carries its own libstdc++ it picks another compiler on ``PATH`` that does not. Used by setup.py
(which loads this file by path, without importing the package) and by the build on first use; standard library only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

_PROBE = ("#include <sstream>\n#include <string>\n"
          "std::string sgk_probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")

#: compilers tried, in order, when the configured one links libstdc++ statically
CANDIDATES = ("c++", "g++", "clang++", "/usr/bin/c++", "/usr/bin/g++")

#: names of the shared C++ runtimes a dynamically linked probe depends on (GNU libstdc++, LLVM libc++)
_SHARED_RUNTIMES = (b"libstdc++.so", b"libc++.so")

#: the C compiler that goes with a C++ compiler of this name (setuptools links with ``$CC``'s command line)
_C_OF = {"c++": "cc", "g++": "gcc", "clang++": "clang"}


def links_libstdcxx_statically(cxx: str) -> bool | None:
    """True if ``cxx -shared`` builds a shared object with a private copy of the C++ runtime (neither ``libstdc++.so``
    nor ``libc++.so`` among its dependencies), False if it links one dynamically, None if the probe could not be built
    (no such compiler, or not a GNU-style driver). For ELF platforms (Linux)."""
    try:
        with tempfile.TemporaryDirectory() as d:
            src, out = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
            with open(src, "w") as f:
                f.write(_PROBE)
            done = subprocess.run([*shlex.split(cxx), "-shared", "-fPIC", src, "-o", out], capture_output=True,
                                  timeout=120)
            if done.returncode != 0 or not os.path.exists(out):
                return None
            with open(out, "rb") as f:
                data = f.read()
            return not any(lib in data for lib in _SHARED_RUNTIMES)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def choose_cxx(env: dict[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """``(variables to set, message)`` for building the extension with a compiler that links libstdc++ dynamically.

    Empty variables and no message when the configured compiler (``CXX``, else ``c++``) is fine or cannot be probed
    (the build then reports its own error). When it links libstdc++ statically: ``{"CXX": ..., "CC": ...}`` naming
    the first compiler of :data:`CANDIDATES` that does not, and a message saying so; if there is none, no variables
    and a warning.
    """
    if not sys.platform.startswith("linux"):  # the probe reads ELF dependencies
        return {}, None
    env = os.environ if env is None else env
    current = env.get("CXX") or "c++"
    if links_libstdcxx_statically(current) is not True:
        return {}, None
    first = shutil.which(shlex.split(current)[0]) if current.strip() else None
    seen = {os.path.realpath(first)} if first else set()
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is None or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if links_libstdcxx_statically(path) is False:
            chosen = {"CXX": path}
            cc = shutil.which(os.path.join(os.path.dirname(path), _C_OF.get(os.path.basename(path), "cc")))
            if cc is not None:
                chosen["CC"] = cc
            return chosen, (f"the C++ compiler {current!r} links libstdc++ statically, which makes every error "
                            f"raised by the extension crash the process; building with {path} instead")
    return {}, (f"warning: the C++ compiler {current!r} links libstdc++ statically and no other compiler on PATH "
                "links it dynamically: an error raised by the extension will crash the process; set CXX to a "
                "compiler without -static-libstdc++")
