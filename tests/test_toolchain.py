"""The choice of C++ compiler for the extension (sparsegpt_kernels/backends/toolchain.py): a compiler that links
libstdc++ statically is detected and replaced by one on PATH that does not."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from sparsegpt_kernels.backends import toolchain

GXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no C++ compiler on PATH")


def _wrapper(tmp_path, name: str, extra: str) -> str:
    """A compiler wrapper script like the H200 image's CXX: the real compiler plus ``extra`` flags."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\nexec {GXX} "$@" {extra}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_probe_tells_static_from_dynamic(tmp_path):
    assert toolchain.links_libstdcxx_statically(GXX) is False
    assert toolchain.links_libstdcxx_statically(_wrapper(tmp_path, "g++", "-static-libstdc++")) is True
    assert toolchain.links_libstdcxx_statically(str(tmp_path / "no-such-compiler")) is None


def test_static_compiler_is_replaced(tmp_path):
    static = _wrapper(tmp_path, "g++", "-static-libstdc++")
    chosen, message = toolchain.choose_cxx({"CXX": static})
    assert chosen["CXX"] != static and os.path.isabs(chosen["CXX"])
    assert toolchain.links_libstdcxx_statically(chosen["CXX"]) is False
    assert "statically" in message and chosen["CXX"] in message


def test_good_or_unknown_compiler_is_kept(tmp_path):
    assert toolchain.choose_cxx({"CXX": GXX}) == ({}, None)
    assert toolchain.choose_cxx({"CXX": _wrapper(tmp_path, "g++", "-O2")}) == ({}, None)
    assert toolchain.choose_cxx({"CXX": str(tmp_path / "missing")}) == ({}, None)  # the build reports that itself


def test_no_alternative_gives_a_warning(tmp_path, monkeypatch):
    static = _wrapper(tmp_path, "g++", "-static-libstdc++")
    monkeypatch.setattr(toolchain, "CANDIDATES", (static,))
    chosen, message = toolchain.choose_cxx({"CXX": static})
    assert chosen == {} and message.startswith("warning:") and "crash" in message


def test_only_on_linux(tmp_path, monkeypatch):
    static = _wrapper(tmp_path, "g++", "-static-libstdc++")
    monkeypatch.setattr(toolchain.sys, "platform", "darwin")
    assert toolchain.choose_cxx({"CXX": static}) == ({}, None)
