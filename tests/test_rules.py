"""One rule in one place per language: the limits and value rules of csrc/core/rules.h, as the compiled extension has
them (``sparsegpt_kernels._C``: MIN_QUANT_BITS, MAX_QUANT_BITS, CUDA_MAX_BLOCK, valid_damp, valid_sparsity, valid_nm,
valid_maxq), against the Python ones (:mod:`sparsegpt_kernels.options`) on the edge values; and the ext_* operators
refuse exactly what the compiled rules refuse, with messages that name the operator and the value.

Skipped with a reason when the extension is not built; with SPARSEGPT_KERNELS_REQUIRE_EXT=1 (set by CI, which builds
it) a missing extension is a failure instead.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from helpers import require_extension

from sparsegpt_kernels import options
from sparsegpt_kernels.backends import extension

NAN, INF = float("nan"), float("inf")
TINY = 5e-324  # the smallest positive double (subnormal)
#: edge values of the float rules (damping, sparsity)
FLOATS = [0.0, -0.0, TINY, -TINY, 1e-300, 0.01, 0.5, 1 - 1e-16, math.nextafter(1.0, 0.0), 1.0,
          math.nextafter(1.0, 2.0), 1.5, -0.5, -1.0, 1e308, NAN, INF, -INF]
#: N:M edge pairs, as "N:M" text for the Python parser
PATTERNS = ["0:4", "1:4", "3:4", "4:4", "5:4", "-1:4", "1:2", "2:1", "0:0", "1:1", "7:8"]


def _ext():
    require_extension()
    mod = extension.load()
    assert mod is not None, extension.missing_reason()
    return mod


def _ops():
    _ext()
    return extension.ops()


def _accepts(check, *args) -> bool:
    """Whether a Python check takes the value (``ValueError``: refused)."""
    try:
        check(*args)
    except ValueError:
        return False
    return True


def _rules_h() -> str:
    """The text of csrc/core/rules.h among the sources the extension was built from (the repository's or shipped)."""
    src = extension.source_dir()
    assert src is not None, "the C++ sources are not part of this installation"
    with open(os.path.join(src, "core", "rules.h")) as f:
        return f.read()


def _constant(name: str) -> int:
    """An integer constant's value as written in rules.h (``constexpr <type> ... <name> = <value>``)."""
    found = re.search(rf"\b{name} = (\d+)\b", _rules_h())
    assert found is not None, f"{name} not found in csrc/core/rules.h"
    return int(found.group(1))


# --------------------------------------------------------------------------------------------------------------------
# the compiled rules against the Python ones
# --------------------------------------------------------------------------------------------------------------------
def test_quant_bits_limits_agree():
    mod = _ext()
    assert (mod.MIN_QUANT_BITS, mod.MAX_QUANT_BITS) == (options.MIN_QUANT_BITS, options.MAX_QUANT_BITS)
    # and the module exposes what rules.h says (a stale build would not)
    assert (mod.MIN_QUANT_BITS, mod.MAX_QUANT_BITS) == (_constant("kMinQuantBits"), _constant("kMaxQuantBits"))


def test_cuda_max_block_is_the_rule():
    mod = _ext()
    assert mod.CUDA_MAX_BLOCK == _constant("kCudaMaxBlock")
    # the fused kernel holds a row of the block in one warp's registers: 32 lanes, at most 32 values each
    assert mod.CUDA_MAX_BLOCK == 32 * 32


@pytest.mark.parametrize("x", FLOATS, ids=repr)
def test_sparsity_rule_agrees(x):
    assert _ext().valid_sparsity(x) is _accepts(options.check_sparsity, x)


@pytest.mark.parametrize("x", FLOATS, ids=repr)
def test_damp_rule_agrees(x):
    assert _ext().valid_damp(x) is _accepts(lambda d: options.PruneOptions(damp=d), x)


@pytest.mark.parametrize("bits", range(1, 10))
def test_quant_bits_rule_agrees(bits):
    assert _ext().valid_maxq(2**bits - 1) is _accepts(options.check_quant_bits, bits)


def test_maxq_is_nothing_but_the_levels_of_allowed_bits():
    mod = _ext()
    allowed = {2**b - 1 for b in range(1, 20) if _accepts(options.check_quant_bits, b)}
    assert allowed == {3, 7, 15, 31, 63, 127, 255}
    assert [q for q in range(-2, 2**12) if mod.valid_maxq(q)] == sorted(allowed)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_nm_rule_agrees(pattern):
    n, m = (int(p) for p in pattern.split(":"))
    assert _ext().valid_nm(n, m) is _accepts(options.parse_pattern, pattern)


# --------------------------------------------------------------------------------------------------------------------
# the operators refuse exactly what the rules refuse
# --------------------------------------------------------------------------------------------------------------------
def _value_text(x: float) -> str:
    """How the C++ messages print a double (iostream defaults) for the values checked below."""
    return {0.0: "0", -1.0: "-1", 1.0: "1", 1.5: "1.5"}.get(x, repr(x)) if math.isfinite(x) else str(x)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", ["ext_inverse_factor", "ext_cholesky_factor"])
def test_factor_ops_follow_the_damp_rule(op, device):
    mod, f = _ext(), getattr(_ops(), op)
    H = torch.eye(3, device=device)
    for x in FLOATS:
        if mod.valid_damp(x):
            F, _ = f(H, x)
            assert F.shape == (3, 3)
        else:
            with pytest.raises(RuntimeError, match=f"{op}: damp must be finite and > 0, got "):
                f(H, x)
    for x in (0.0, -1.0, NAN, INF):
        msg = re.escape(f"{op}: damp must be finite and > 0, got {_value_text(x)}") + "$"
        with pytest.raises(RuntimeError, match=msg):
            f(H, x)


def _sweep(op, W, *, sparsity=0.5, n=0, m=0, quant_maxq=None):
    """``op`` on W (rows, 16) with the identity as its factor, blocks of 8; with ``quant_maxq``, one quantization
    group per row (scale 1, zero 0) with that top level."""
    rows, cols = W.shape
    F = torch.eye(cols, dtype=W.dtype, device=W.device)
    if quant_maxq is None:
        return getattr(_ops(), op)(W, F, sparsity, n, m, 8, None, None, 0, 0)
    scale = torch.ones(rows, 1, dtype=W.dtype, device=W.device)
    return getattr(_ops(), op)(W, F, sparsity, n, m, 8, scale, torch.zeros_like(scale), quant_maxq, cols)


def _refused_untouched(op, W, message, **kw):
    W0 = W.clone()
    with pytest.raises(RuntimeError, match=message):
        _sweep(op, W, **kw)
    if W.device.type != "meta":
        assert torch.equal(W.view(torch.int32), W0.view(torch.int32))


SWEEP_OPS = [pytest.param("ext_sweep", "cpu", id="ext_sweep"),
             pytest.param("ext_sweep_cholesky", "cpu", id="ext_sweep_cholesky"),
             pytest.param("ext_sweep", "meta", id="ext_sweep-meta"),
             pytest.param("ext_sweep_cholesky", "meta", id="ext_sweep_cholesky-meta")]


@pytest.mark.parametrize("op,device", SWEEP_OPS)
def test_sweep_ops_follow_the_sparsity_rule(op, device):
    mod = _ext()
    for x in FLOATS:
        W = torch.randn(4, 16).to(device)
        if mod.valid_sparsity(x):
            _sweep(op, W, sparsity=x)
        else:
            _refused_untouched(op, W, f"{op}: sparsity must be in \\[0, 1\\), got ", sparsity=x)
    for x in (1.0, 1.5, -1.0, NAN):
        msg = re.escape(f"{op}: sparsity must be in [0, 1), got {_value_text(x)}") + "$"
        _refused_untouched(op, torch.randn(4, 16).to(device), msg, sparsity=x)


@pytest.mark.parametrize("op,device", SWEEP_OPS)
def test_sweep_ops_follow_the_maxq_rule(op, device):
    mod = _ext()
    for q in (0, 1, 2, 3, 7, 8, 14, 15, 16, 127, 255, 256, 511):
        W = torch.randn(4, 16).to(device)
        if mod.valid_maxq(q):
            _sweep(op, W, quant_maxq=q)
        else:
            msg = rf"{op}: maxq must be 2\^bits - 1 for bits in {mod.MIN_QUANT_BITS}\.\.{mod.MAX_QUANT_BITS}, got {q}$"
            _refused_untouched(op, W, msg, quant_maxq=q)


@pytest.mark.parametrize("op,device", SWEEP_OPS)
def test_sweep_ops_follow_the_nm_rule(op, device):
    mod = _ext()
    for pattern in PATTERNS:
        n, m = (int(p) for p in pattern.split(":"))
        if m == 0 or 8 % m:  # not an N:M case of the sweep (m == 0 is unstructured; blocks of 8)
            continue
        W = torch.randn(4, 16).to(device)
        if mod.valid_nm(n, m):
            _sweep(op, W, sparsity=1 - n / m, n=n, m=m)
        else:
            _refused_untouched(op, W, f"{op}: N:M needs 0 < N < M, got {n}:{m}$", sparsity=0.5, n=n, m=m)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_nm_keep_mask_follows_the_nm_rule(device):
    mod, f = _ext(), _ops().ext_nm_keep_mask
    scores = torch.rand(2, 8).to(device)
    for pattern in PATTERNS:
        n, m = (int(p) for p in pattern.split(":"))
        if m <= 0 or 8 % m:
            continue
        if mod.valid_nm(n, m):
            assert f(scores, n, m).shape == (2, 8)
        else:
            with pytest.raises(RuntimeError, match=f"ext_nm_keep_mask: N:M needs 0 < N < M, got {n}:{m}$"):
                f(scores, n, m)
