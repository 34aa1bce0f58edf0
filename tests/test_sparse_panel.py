"""The panel kernel (csrc/core/sparse_panel.h): y = x Wᵀ + b for prompts straight from the compressed weight, x
transposed into float32 panels of up to 128 tokens. Its AVX-512 and AVX2 copies against its specification (the
scalar loop, bit for bit), all against dense products of the same zeros, the quantized form against the values form,
and SparseLinear's choice between the row kernel, the panel and the decompressed weight."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import require_extension
from test_sparse import _bound, _kernel_problem
from test_sparse_codes import coded_weight, kernel_args

from sparsegpt_kernels.sparse import CompressedWeight, SparseLinear
from sparsegpt_kernels.sparse import format as fmt
from sparsegpt_kernels.sparse import linear as sl

# token counts: one panel of each width 16..128 and its edges, several panels, a partial last one
TOKENS = [1, 15, 16, 17, 33, 64, 100, 128, 129, 200, 300]


@pytest.fixture
def ext():
    require_extension()
    from sparsegpt_kernels.backends import extension

    return extension.ops()


def _values_args(lin):
    return (lin.weight_mask, lin.weight_values, lin.weight_offsets, lin.bias)


def _x(T, cols, dtype, seed):
    return torch.randn(T, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


# columns: below one 16-column step, not a multiple of 16, one block and several (the blocks are 64 columns at 128
# tokens, 512 at 16), a partial last block
@pytest.mark.parametrize("cols", [1, 7, 16, 17, 65, 130, 531, 1100])
@pytest.mark.parametrize("xdtype, vdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "fp32-bf16w"])
def test_panel_is_its_specification_and_a_dense_product(ext, cols, xdtype, vdtype, monkeypatch):
    """The AVX-512 and AVX2 copies give the scalar specification's bits (where this CPU has them), at every panel
    width and column blocking; all are within the float32 bound of a dense product of the same zeros; the empty row
    is the bias alone."""
    W = _kernel_problem(11, cols, vdtype, seed=cols)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(11).to(xdtype))
    for T in TOKENS:
        x = _x(T, cols, xdtype, T)
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "baseline")
        assert not ext.ext_cpu_has_panel()
        spec = ext.ext_sparse_linear_panel(x, *_values_args(lin))
        for simd in ("avx2", "avx512"):
            monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
            y = ext.ext_sparse_linear_panel(x, *_values_args(lin))
            if ext.ext_cpu_has_panel():  # this SIMD copy runs here
                assert torch.equal(y, spec), (simd, T, float((y.float() - spec.float()).abs().max()))
            assert y.dtype == xdtype and y.shape == (T, 11)
            ref = F.linear(x.float(), W.float(), lin.bias.float())
            err = (y.float() - ref).abs()
            assert bool((err <= _bound(x, W, xdtype) + 2.0**-8 * lin.bias.float().abs()).all()), (T, float(err.max()))
            assert bool((y[:, 0] == lin.bias[0]).all())  # the empty row


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_panel_at_every_density(ext, keep):
    """An empty layer, a nearly empty one, a full one: against a float64 product (both directions: a value lost or one
    added shows far beyond the bound)."""
    W = _kernel_problem(70, 300, torch.float32, seed=3, keep=keep) if 0 < keep < 1 else (
        torch.zeros(70, 300) if keep == 0 else torch.randn(70, 300))
    lin = SparseLinear(CompressedWeight.compress(W), None)
    for T in (9, 130):
        x = _x(T, 300, torch.float32, T)
        y = ext.ext_sparse_linear_panel(x, *_values_args(lin))
        ref = (x.double() @ W.double().T)
        assert bool(((y.double() - ref).abs() <= _bound(x, W, torch.float32).double()).all())
        if keep == 0:
            assert torch.equal(y, torch.zeros(T, 70))


def test_panel_on_leading_dimensions_strides_and_no_tokens(ext):
    W = _kernel_problem(40, 96, torch.bfloat16, seed=1)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(40))
    for x in (torch.randn(2, 70, 96), torch.randn(96, 50).T, torch.randn(0, 96), torch.randn(3, 0, 96)):
        y = ext.ext_sparse_linear_panel(x, *_values_args(lin))
        assert y.shape == (*x.shape[:-1], 40)
        ref = F.linear(x, W.float(), lin.bias)
        assert bool(((y - ref).abs() <= _bound(x.reshape(-1, 96), W, torch.float32).reshape(ref.shape)
                     + 2.0**-22 * lin.bias.abs()).all())
    # more tokens than one call transposes at once (1024)
    x = torch.randn(1100, 96)
    torch.testing.assert_close(ext.ext_sparse_linear_panel(x, *_values_args(lin)), F.linear(x, W.float(), lin.bias),
                               rtol=1e-5, atol=1e-4)


def test_panel_refuses_bad_weights(ext):
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(5, 16, torch.float32)))
    x = torch.randn(20, 16)
    bad = lin.weight_offsets.clone()
    bad[2] += 1
    with pytest.raises(RuntimeError, match="is not the number of bits set in mask row 1"):
        ext.ext_sparse_linear_panel(x, lin.weight_mask, lin.weight_values, bad, None)
    with pytest.raises(RuntimeError, match="offsets need"):
        ext.ext_sparse_linear_panel(x, lin.weight_mask, lin.weight_values[:3], lin.weight_offsets, None)
    with pytest.raises(RuntimeError, match="mask has 2 bytes per row, x has 8 columns"):
        ext.ext_sparse_linear_panel(torch.randn(20, 8), lin.weight_mask, lin.weight_values, lin.weight_offsets, None)
    torch.library.opcheck(ext.ext_sparse_linear_panel.default, (x, *_values_args(lin)))


# (cols, group): groups of a multiple of 8 and not, one group a row, a group larger than a column block
CODE_SHAPES = [(24, 8), (48, 16), (9, 3), (17, 17), (192, 64), (256, 128), (600, 600)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cols, group", CODE_SHAPES, ids=[f"{c}g{g}" for c, g in CODE_SHAPES])
def test_codes_panel_is_the_values_panel_on_the_dequantized_weights(ext, bits, dtype, cols, group, monkeypatch):
    """The codes decoded (AVX-512, AVX2 and scalar, every code at every nibble parity) are the format's weights: the
    result is bit for bit the values panel's on the dequantized weights with the same mask (a code at its zero point
    is a kept 0, which takes its place in the sums' order), and within the float32 bound of a dense product."""
    cw = coded_weight(13, cols, bits, group, dtype, seed=cols + bits)
    W = cw.decompress()
    bias = torch.randn(13)
    lin = SparseLinear(cw, bias)
    keep = fmt.unpack_mask(cw.mask, cols)
    vals = SparseLinear(CompressedWeight((13, cols), torch.float32, cw.mask, values=W.float()[keep]), bias)
    for simd in ("baseline", "avx2", None):
        if simd:
            monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
        else:
            monkeypatch.delenv("SPARSEGPT_KERNELS_CPU_SIMD", raising=False)
        for T in (1, 17, 130):
            for xdtype in (torch.float32, torch.bfloat16):
                x = _x(T, cols, xdtype, T)
                y = ext.ext_sparse_codes_linear_panel(x, *kernel_args(lin), bias)
                yv = ext.ext_sparse_linear_panel(x, *_values_args(vals))
                assert y.dtype == xdtype and torch.equal(y, yv), (simd, T, xdtype)
            ref = F.linear(x.float(), W.float(), bias)
            assert bool(((y.float() - ref).abs() <= _bound(x, W, xdtype) + 2.0**-8 * bias.abs()).all())


def test_codes_panel_refuses_bad_weights(ext):
    cw = coded_weight(6, 64, 4, 32, torch.bfloat16)
    lin = SparseLinear(cw)
    args = list(kernel_args(lin))
    bad = lin.weight_code_offsets.clone()
    bad[2] += 1  # rows 1 and 2 disagree with the mask, the total does not
    args[2] = bad
    with pytest.raises(RuntimeError, match="is not the code bytes of mask row 1"):
        ext.ext_sparse_codes_linear_panel(torch.randn(20, 64), *args, None)
    args[2] = lin.weight_code_offsets
    with pytest.raises(RuntimeError, match="the offsets need"):
        ext.ext_sparse_codes_linear_panel(torch.randn(20, 64), *args[:1], lin.weight_codes[:10], *args[2:], None)
    torch.library.opcheck(ext.ext_sparse_codes_linear_panel.default, (torch.randn(20, 64), *kernel_args(lin), None))


@pytest.mark.parametrize("quantized", [False, True], ids=["values", "codes"])
def test_sparse_linear_chooses_row_kernel_panel_or_dense(ext, quantized):
    """Up to the decode limit the row kernel; beyond it, with prefill_kernel = True, the panel where the CPU has it
    (else the decompressed weight, bit for bit torch's product); prefill_kernel = False decompresses."""
    if quantized:
        cw = coded_weight(24, 64, 4, 32, torch.float32)
    else:
        cw = CompressedWeight.compress(_kernel_problem(24, 64, torch.float32))
    lin = SparseLinear(cw, torch.randn(24))
    lin.prefill_kernel = True
    dense = lin.to_linear()
    panel = bool(ext.ext_cpu_has_panel())
    limit = lin.decode_limit(torch.float32)
    assert limit == sl.DECODE_MAX_TOKENS
    for T, path in ((1, "kernel"), (limit, "kernel"), (limit + 1, "panel" if panel else "prefill"),
                    (300, "panel" if panel else "prefill")):
        x = torch.randn(T, 64)
        assert lin.uses_panel(x) == (path == "panel")
        before = sl.LAST_PATH[path]
        y = lin(x)
        assert sl.LAST_PATH[path] == before + 1, (T, path)
        if path == "prefill":
            assert torch.equal(y, dense(x))
        else:
            torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)
    lin.prefill_kernel = False
    before = sl.LAST_PATH["prefill"]
    x = torch.randn(40, 64)
    assert not lin.uses_panel(x)
    assert torch.equal(lin(x), dense(x)) and sl.LAST_PATH["prefill"] == before + 1
    lin.prefill_kernel = True
    bf_limit = lin.decode_limit(torch.bfloat16)  # quantized layers: the panel from 9 tokens on
    bf16_rows = bool(ext.ext_cpu_has_bf16_dot()) and not quantized
    assert bf_limit == (sl.DECODE_MAX_TOKENS_BF16 if bf16_rows else sl.DECODE_MAX_TOKENS)
    assert lin.uses_panel(torch.randn(300, 64).bfloat16()) == panel
    if not quantized:  # a sparser layer takes the panel from 9 bfloat16 tokens on
        sparse = SparseLinear(CompressedWeight.compress(_kernel_problem(24, 64, torch.float32, keep=0.2)))
        assert sparse.decode_limit(torch.bfloat16) == sl.DECODE_MAX_TOKENS
    assert lin._dense_copy is None


@pytest.mark.parametrize("quantized", [False, True], ids=["values", "codes"])
def test_measured_prefill_choice_follows_the_ratio_and_the_density(ext, quantized, monkeypatch):
    """prefill_kernel = None: the panel when the measured ratio (panel time over the dense product's at the probe's
    density) scaled by the layer's density is below 1, per input dtype; on a CPU without the panel, never."""
    monkeypatch.delenv(sl.PREFILL_ENV, raising=False)
    panel = bool(ext.ext_cpu_has_panel())

    def layer(keep):
        if quantized:
            return SparseLinear(coded_weight(24, 64, 4, 32, torch.float32, keep=keep))
        return SparseLinear(CompressedWeight.compress(_kernel_problem(24, 64, torch.float32, keep=keep)))

    half, sparse = layer(0.5), layer(0.2)
    assert half.prefill_kernel is None  # the default
    density = half.nnz / (24 * 64)
    x32, x16 = torch.randn(40, 64), torch.randn(40, 64).bfloat16()
    # the panel 1.5x slower than the dense product at 50%: only layers keeping under a third take it
    monkeypatch.setattr(sl, "_PREFILL_RATIO", {torch.float32: 1.5, torch.bfloat16: 0.5})
    assert half.uses_panel(x32) == (panel and 1.5 * density / sl.PROBE_DENSITY < 1)
    assert sparse.uses_panel(x32) == panel  # 1.5 * 0.2 / 0.5 < 1
    assert half.uses_panel(x16) == panel and sparse.uses_panel(x16) == panel
    monkeypatch.setattr(sl, "_PREFILL_RATIO", {torch.float32: 1.5, torch.bfloat16: 3.0})
    assert not half.uses_panel(x16) and not sparse.uses_panel(x16)  # 3 * 0.2 / 0.5 > 1
    for T in (40, 300):  # what forward takes is what uses_panel says
        path = "panel" if sparse.uses_panel(torch.randn(T, 64)) else "prefill"
        before = sl.LAST_PATH[path]
        sparse(torch.randn(T, 64))
        assert sl.LAST_PATH[path] == before + 1
    # fixed choices win over the measurement
    half.prefill_kernel = True
    assert half.uses_panel(x16) == panel
    sparse.prefill_kernel = False
    monkeypatch.setattr(sl, "_PREFILL_RATIO", {torch.float32: 0.0, torch.bfloat16: 0.0})
    assert not sparse.uses_panel(x32)


def test_prefill_ratio_is_measured_once_and_can_be_fixed(ext, monkeypatch, caplog):
    monkeypatch.delenv(sl.PREFILL_ENV, raising=False)
    monkeypatch.setattr(sl, "_PREFILL_RATIO", {})
    calls = []
    real = sl._measure_prefill
    monkeypatch.setattr(sl, "_measure_prefill", lambda d: calls.append(d) or real(d))
    with caplog.at_level(logging.INFO, logger="sparsegpt_kernels"):
        r = sl.prefill_ratio(torch.bfloat16)
        assert sl.prefill_ratio(torch.bfloat16) == r and calls == [torch.bfloat16]  # kept for the process
    if ext.ext_cpu_has_panel():
        assert 0 < r < math.inf
        assert "bfloat16 prompts on this CPU: the panel kernel" in caplog.text
    else:  # nothing to measure: prefill decompresses
        assert r == math.inf
    for value, expected in (("panel", 0.0), ("dense", math.inf), (" Dense ", math.inf)):
        monkeypatch.setenv(sl.PREFILL_ENV, value)
        assert sl.prefill_ratio(torch.float32) == expected
    monkeypatch.setenv(sl.PREFILL_ENV, "auto")
    assert sl.prefill_ratio(torch.bfloat16) == r
    monkeypatch.setenv(sl.PREFILL_ENV, "fastest")
    with pytest.raises(ValueError, match="SPARSEGPT_KERNELS_PREFILL='fastest': expected panel, dense or auto"):
        sl.prefill_ratio(torch.bfloat16)
    assert calls == [torch.bfloat16]


@pytest.mark.parametrize("slow_pair", [None, 2], ids=["steady", "one-slow-spell"])
def test_prefill_probe_takes_the_median_of_paired_runs(ext, monkeypatch, slow_pair):
    """The probe's clock scripted: the panel 2 units, the dense product 1, except one pair whose dense run was slowed
    10x (another tenant of the machine): the ratio is still 2; steady pairs stop after one round."""
    if not ext.ext_cpu_has_panel():  # nothing to measure: prefill decompresses, and the clock is not read
        monkeypatch.setattr(sl.time, "perf_counter", lambda: pytest.fail("timed without a panel kernel"))
        assert sl._measure_prefill(torch.bfloat16) == math.inf
        return
    durations = []
    for i in range(sl.PROBE_MAX_PAIRS):
        durations += [2.0, 10.0 if i == slow_pair else 1.0]
    reads = []
    for d in durations:  # two clock reads per timed run
        start = reads[-1] + 1.0 if reads else 0.0
        reads += [start, start + d]
    clock = iter(reads)
    monkeypatch.setattr(sl.time, "perf_counter", lambda: next(clock))
    assert sl._measure_prefill(torch.bfloat16) == 2.0
    left = sum(1 for _ in clock)
    used_pairs = sl.PROBE_MAX_PAIRS - left // 4
    assert used_pairs == (sl.PROBE_PAIRS if slow_pair is None else sl.PROBE_MAX_PAIRS)
    monkeypatch.setattr(sl, "_cpu_has", lambda what: False)  # as on a CPU without the panel kernel
    assert sl._measure_prefill(torch.bfloat16) == math.inf


@pytest.mark.parametrize("measured", [False, True], ids=["cold", "measured"])
def test_panel_under_torch_compile(ext, measured, monkeypatch):
    """A prompt under torch.compile, fullgraph: nothing is measured or asked of the CPU inside the trace (the
    questions are ops returning bools, which a graph cannot hold): before that the trace takes the decompressed
    weight; after a measurement, its choice."""
    monkeypatch.delenv(sl.PREFILL_ENV, raising=False)
    monkeypatch.setattr(sl, "_PREFILL_RATIO", {torch.float32: 3.0} if measured else {})
    if not measured:
        monkeypatch.setattr(sl, "_CPU", {})
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(10, 40, torch.float32)), torch.randn(10))
    x = torch.randn(50, 40)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: lin(a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin.to_linear()(x), rtol=1e-5, atol=1e-5)
    assert sl._PREFILL_RATIO == ({torch.float32: 3.0} if measured else {})
    if not measured:
        assert "panel" not in sl._CPU  # nothing was cached from inside the trace
