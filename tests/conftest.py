"""Test configuration.

Triton kernels run on the CPU under the Triton interpreter: TRITON_INTERPRET must be set before any @triton.jit
decorator runs, so it is set here, before anything imports the kernel modules.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floating tensors so unwritten output shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


# --------------------------------------------------------------------------------------------------------------------
# Strict mode (CI): every optional dependency is installed there, so the only acceptable skip is "no GPU here".
# --------------------------------------------------------------------------------------------------------------------
STRICT = os.environ.get("SPARSEGPT_KERNELS_STRICT_TESTS") == "1"
_GPU_WORDS = ("CUDA", "GPU", "TRITON_INTERPRET=0")


def _fail_unexpected_skip(report) -> None:
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(w in reason for w in _GPU_WORDS):
            report.outcome = "failed"
            report.longrepr = f"skipped in strict mode (SPARSEGPT_KERNELS_STRICT_TESTS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())
