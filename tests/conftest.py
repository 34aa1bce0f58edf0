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


# --------------------------------------------------------------------------------------------------------------------
# The tests write into temporary directories only: a run that creates or changes a file under the checkout's
# benchmarks/out or benchmarks/results fails, naming the files.
# --------------------------------------------------------------------------------------------------------------------
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GUARDED = [os.path.join(_ROOT, "benchmarks", d) for d in ("out", "results")]


def _snapshot() -> dict[str, tuple[float, int]]:
    seen = {}
    for top in _GUARDED:
        for root, _, names in os.walk(top):
            for n in names:
                st = os.stat(os.path.join(root, n))
                seen[os.path.join(root, n)] = (st.st_mtime, st.st_size)
    return seen


def pytest_sessionstart(session):
    session.config._sgk_snapshot = _snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_sgk_snapshot", None)
    if before is None:
        return
    after = _snapshot()
    touched = sorted(p for p in after if before.get(p) != after[p])
    if touched:
        listing = ", ".join(os.path.relpath(p, _ROOT) for p in touched[:10])
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"ERROR: the tests wrote into the checkout ({len(touched)} files): {listing}"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
# Strict mode (CI): every optional dependency is installed there, so the only acceptable skip is "no GPU here": a test
# marked ``gpu``, or one of these exact reasons on a machine without CUDA. Any other skip fails the run.
# --------------------------------------------------------------------------------------------------------------------
STRICT = os.environ.get("SPARSEGPT_KERNELS_STRICT_TESTS") == "1"
GPU_ONLY_REASONS = frozenset({
    "needs a CUDA device",
    "needs a CUDA GPU",
    "needs a CUDA GPU (TF32)",
    "needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels)",
    "the triton case needs the compiled kernels (TRITON_INTERPRET=0 on a CUDA GPU)",
})


def skip_reason(report) -> str:
    """The reason a skipped report gives, without pytest's "Skipped: " prefix."""
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    return reason.removeprefix("Skipped: ")


def skip_allowed(reason: str, marked_gpu: bool, cuda: bool) -> bool:
    return marked_gpu or (not cuda and reason in GPU_ONLY_REASONS)


def _fail_unexpected_skip(report, marked_gpu: bool) -> None:
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not skip_allowed(reason, marked_gpu, torch.cuda.is_available()):
            report.outcome = "failed"
            report.longrepr = f"skipped in strict mode (SPARSEGPT_KERNELS_STRICT_TESTS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result(), item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result(), False)
