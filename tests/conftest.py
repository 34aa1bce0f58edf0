"""Test configuration.

Triton kernels run on the CPU under the Triton interpreter: TRITON_INTERPRET must be set before any @triton.jit
decorator runs, so it is set here, before anything imports the kernel modules.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    """Triton < 3.7's interpreter turns runtime loop bounds into Python ints with int() on one-element numpy arrays,
    which numpy >= 2.4 refuses: every kernel with such a loop then fails with "only 0-dimensional arrays can be
    converted to Python scalars". Say so once instead of failing dozens of tests with that message."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
        from packaging.version import Version
    except ImportError:
        return
    if Version(triton.__version__.split("+")[0]) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter cannot run these kernels with numpy {numpy.__version__}: "
            "install numpy<2.4 (or triton>=3.7) to run the Triton tests under TRITON_INTERPRET=1"
        )


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


@pytest.fixture
def poison_cuda_allocator():
    """Fill the memory the CUDA caching allocator hands out next with NaN, so that output a C++/CUDA op allocates
    (at::empty, out of reach of ``poison_empty``) and does not write shows up. No-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # small-pool blocks (requests under 1 MiB, carved from 2 MiB segments) and large-pool ones
        blocks = [torch.full((n,), float("nan"), device="cuda") for n in [1 << 16] * 64 + [1 << 24] * 4]
        torch.cuda.synchronize()
        del blocks
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
