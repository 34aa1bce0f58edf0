"""The compiled kernels of jointly quantized compressed weights (csrc/core/sparse_codes.h): y = x Wᵀ + b and the
dense weight straight from the mask, the packed grid codes and the group scales, against the format's definition in
PyTorch (CompressedWeight.decompress) and the value kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import require_extension

from sparsegpt_kernels.sparse import CompressedWeight, SparseLinear
from sparsegpt_kernels.sparse import format as fmt
from sparsegpt_kernels.sparse import linear as sl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def ext():
    require_extension()
    from sparsegpt_kernels.backends import extension

    return extension.ops()


def coded_weight(rows, cols, bits, group, dtype, *, seed=0, keep=0.5, log2_scale=(-6.0, 0.0), adversarial=True):
    """A random compressed weight on a `bits`-bit grid: random mask (with an empty row, a full row and a row of one
    kept weight when ``adversarial``), random codes, zero points and scales 2**U(log2_scale)."""
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    keepm = torch.rand(rows, cols, generator=g) < keep
    if adversarial and rows > 2:
        keepm[0] = False
        keepm[1] = True
        keepm[2] = False
        keepm[2, cols // 2] = True
    counts = keepm.sum(1)
    codes = torch.randint(0, maxq + 1, (int(counts.sum()),), generator=g)
    lo, hi = log2_scale
    scale = torch.exp2(lo + (hi - lo) * torch.rand(rows, cols // group, generator=g)).float()
    zero = torch.randint(0, maxq + 1, (rows, cols // group), generator=g).to(torch.uint8)
    return CompressedWeight((rows, cols), dtype, fmt.pack_mask(keepm), codes=fmt.pack_codes(codes, counts, bits),
                            bits=bits, scale=scale, zero=zero, group_size=group)


def kernel_args(lin: SparseLinear):
    return (lin.weight_mask, lin.weight_codes, lin.weight_code_offsets, lin.weight_scale_bits.view(torch.float32),
            lin.weight_zero, lin.bits, lin.group_size, lin.weight_dtype)


def _bound(x, W):
    """float32 summation of n products: about n·2⁻²⁴ of Σ|w||x| (with room)."""
    return 4 * W.shape[1] * 2.0**-24 * (x.float().abs() @ W.float().abs().T) + 1e-30


# (cols, group): groups that are multiples of 8 (the SIMD copy), others (the scalar loop), one group per row, and
# multiples of 64 (the 64-column steps of CPUs with AVX-512 VBMI)
SHAPES = [(8, 8), (24, 8), (48, 16), (64, 32), (136, 8), (40, 40), (12, 4), (9, 3), (17, 17),
          (64, 64), (192, 64), (256, 128), (576, 64)]


@pytest.mark.parametrize("simd", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cols, group", SHAPES, ids=[f"{c}g{g}" for c, g in SHAPES])
def test_codes_kernel_is_the_value_kernel_on_the_dequantized_weights(ext, simd, bits, dtype, cols, group, monkeypatch):
    """Against a dense float32 product within the float32 bound, and bit for bit against the value kernel on the
    dequantized weights where the two sum in the same order (8 columns a chunk: the AVX2 copy of the value kernel;
    the scalar loops)."""
    cw = coded_weight(11, cols, bits, group, dtype, seed=cols * 10 + bits)
    W = cw.decompress()
    bias = torch.randn(11)
    lin = SparseLinear(cw, bias)
    vals = SparseLinear(CompressedWeight.compress(W.float()))
    same_order = "baseline" if simd == "baseline" or group % 8 else "avx2"
    for T in range(1, 18):
        x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
        y = ext.ext_sparse_codes_linear(x, *kernel_args(lin), bias)
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", same_order)
        yv = ext.ext_sparse_linear(x, vals.weight_mask, vals.weight_values, vals.weight_offsets, bias)
        assert torch.equal(y, yv), (T, float((y - yv).abs().max()))
        ref = F.linear(x, W.float(), bias)
        assert bool(((y - ref).abs() <= _bound(x, W) + 2.0**-22 * bias.abs()).all()), T
        assert torch.equal(y[:, 0], bias[None, 0].expand(T))  # the empty row: the bias alone


BF16_SHAPES = [(32, 32), (96, 32), (64, 64), (192, 64), (256, 128), (576, 64)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols, group", BF16_SHAPES, ids=[f"{c}g{g}" for c, g in BF16_SHAPES])
def test_codes_kernel_with_bfloat16_inputs_is_the_value_kernel(ext, bits, cols, group, monkeypatch):
    """bfloat16 x and a bfloat16 model, groups of a multiple of 32 columns: bit for bit the value kernel on the
    dequantized bfloat16 weights with the same x (from 2 tokens on both run on the bfloat16 dot products where the
    CPU has them, 32 columns a step), and within the float32 bound of a dense product; every token count 1..17
    (token groups of 8 and their remainders), densities from an empty to a full layer, every code at every nibble
    parity."""
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "avx512")
    for keep in (0.0, 0.03, 0.5, 0.97, 1.0):
        cw = coded_weight(13, cols, bits, group, torch.bfloat16, seed=cols + bits, keep=keep, adversarial=keep == 0.5)
        W = cw.decompress()
        assert W.dtype == torch.bfloat16
        bias = torch.randn(13)
        lin = SparseLinear(cw, bias)
        vals = SparseLinear(CompressedWeight.compress(W))
        for T in range(1, 18):
            x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T)).bfloat16()
            y = ext.ext_sparse_codes_linear(x, *kernel_args(lin), bias)
            yv = ext.ext_sparse_linear(x, vals.weight_mask, vals.weight_values, vals.weight_offsets, bias)
            assert y.dtype == torch.bfloat16 and torch.equal(y, yv), (keep, T)
            # before the output's rounding to bfloat16: the float32 sums against float64
            y32 = ext.ext_sparse_codes_linear(x, *kernel_args(lin), None).float()
            ref = x.double() @ W.double().T
            assert bool(((y32.double() - ref).abs() <= 2 * _bound(x, W).double() + 2.0**-8 * y32.double().abs()).all())


@pytest.mark.parametrize("simd", ["avx512", "baseline"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("cols, group", BF16_SHAPES, ids=[f"{c}g{g}" for c, g in BF16_SHAPES])
def test_compiled_bfloat16_decompression_is_the_formats_weight(ext, simd, bits, cols, group, monkeypatch):
    """The dense bfloat16 weight of a bfloat16 model's codes (64 columns a step where the groups allow it and the
    CPU has VBMI2 and BF16, one kept code at a time otherwise) is bit for bit the format's definition
    (CompressedWeight.decompress), densities from an empty to a full layer, the last row ending at the buffer's end."""
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
    for keep in (0.0, 0.03, 0.5, 1.0):
        cw = coded_weight(11, cols, bits, group, torch.bfloat16, seed=cols + bits, keep=keep, adversarial=keep == 0.5)
        lin = SparseLinear(cw)
        W = ext.ext_sparse_codes_to_dense(*kernel_args(lin), cols)
        assert W.dtype == torch.bfloat16 and torch.equal(W.view(torch.int16), cw.decompress().view(torch.int16)), keep


@pytest.mark.parametrize("simd", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_the_rounding_to_the_dtype_is_torchs_over_every_magnitude(ext, simd, dtype, monkeypatch):
    """Scales from 2⁻³⁰ to 2⁹: float16 subnormals, underflow to 0 and overflow to infinity, bfloat16 and float16
    ties; the compiled dense weight is bit for bit the PyTorch definition, and the kernel multiplies with those
    weights."""
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
    for bits in (4, 8):
        cw = coded_weight(64, 64, bits, 8, dtype, seed=bits, keep=0.7, log2_scale=(-30.0, 9.0), adversarial=False)
        lin = SparseLinear(cw)
        W = ext.ext_sparse_codes_to_dense(*kernel_args(lin), 64)
        ref = cw.decompress()
        assert W.dtype == dtype and torch.equal(W.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                                ref.view(torch.int16 if dtype != torch.float32 else torch.int32))
        if dtype == torch.float16:  # the cases are there: subnormals, and (8-bit codes) infinities
            assert bool(((ref != 0) & (ref.abs() < 2.0**-14)).any()) and bool(torch.isinf(ref).any()) == (bits == 8)
        finite = torch.isfinite(ref).all(1)  # the kernel on the rows without an infinite weight
        x = torch.randn(3, 64)
        y = ext.ext_sparse_codes_linear(x, *kernel_args(lin), None)[:, finite]
        vals = SparseLinear(CompressedWeight.compress(ref.float()[finite]))
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "avx2" if simd == "avx2" else "baseline")
        assert torch.equal(y, ext.ext_sparse_linear(x, vals.weight_mask, vals.weight_values, vals.weight_offsets,
                                                     None))
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)


def test_codes_kernel_on_an_empty_layer_bfloat16_input_and_leading_dimensions(ext):
    cw = coded_weight(9, 32, 4, 16, torch.bfloat16, keep=0.0, adversarial=False)
    lin = SparseLinear(cw)
    assert lin.code_bytes == 0 and lin.nnz == 0
    x = torch.randn(2, 3, 32).bfloat16()
    y = ext.ext_sparse_codes_linear(x, *kernel_args(lin), None)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 9) and torch.equal(y, torch.zeros(2, 3, 9).bfloat16())
    cw = coded_weight(9, 32, 4, 16, torch.bfloat16)
    lin = SparseLinear(cw)
    xb = torch.randn(5, 32).bfloat16()
    y = ext.ext_sparse_codes_linear(xb, *kernel_args(lin), None)
    y32 = ext.ext_sparse_codes_linear(xb.float(), *kernel_args(lin), None)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.bfloat16())  # computed in float32, rounded once


def test_codes_kernels_refuse_bad_tensors_naming_them(ext):
    lin = SparseLinear(coded_weight(5, 32, 4, 16, torch.float32))
    mask, codes, offsets, scale, zero, bits, group, dtype = kernel_args(lin)
    x = torch.randn(1, 32)
    op = ext.ext_sparse_codes_linear
    bad = offsets.clone()
    bad[2] += 1
    with pytest.raises(RuntimeError, match="is not the code bytes of mask row 1"):
        op(x, mask, codes, bad, scale, zero, bits, group, dtype, None)
    bad = offsets.clone()
    bad[3] = 10**9  # a row that would read far beyond the codes
    with pytest.raises(RuntimeError, match="mask row 2"):
        op(x, mask, codes, bad, scale, zero, bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="offsets need"):
        op(x, mask, codes[: lin.code_bytes], offsets, scale, zero, bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="bits must be in 1..8"):
        op(x, mask, codes, offsets, scale, zero, 9, group, dtype, None)
    with pytest.raises(RuntimeError, match="group_size must be a positive divisor of 32"):
        op(x, mask, codes, offsets, scale, zero, bits, 5, dtype, None)
    with pytest.raises(RuntimeError, match="scale must be float32 of shape"):
        op(x, mask, codes, offsets, scale[:, :1], zero, bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="zero must be uint8"):
        op(x, mask, codes, offsets, scale, zero.long(), bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        op(x, mask, codes, offsets, scale, zero, bits, group, torch.int32, None)
    with pytest.raises(RuntimeError, match="mask must be uint8"):
        op(torch.randn(1, 40), mask, codes, offsets, scale, zero, bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        op(x.half(), mask, codes, offsets, scale, zero, bits, group, dtype, None)
    with pytest.raises(RuntimeError, match="is not the code bytes of mask row 0"):
        ext.ext_sparse_codes_to_dense(mask, codes, offsets + torch.arange(6), scale, zero, bits, group, dtype, 32)


def test_codes_kernels_opcheck_and_compile(ext):
    lin = SparseLinear(coded_weight(10, 48, 4, 16, torch.bfloat16), torch.randn(10))
    x = torch.randn(4, 48)
    torch.library.opcheck(ext.ext_sparse_codes_linear.default, (x, *kernel_args(lin), lin.bias))
    torch.library.opcheck(ext.ext_sparse_codes_to_dense.default, (*kernel_args(lin), 48))
    compiled = torch.compile(lambda a: lin(a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantized_sparse_linear_runs_the_codes_kernel_and_keeps_no_copy(ext, dtype, monkeypatch):
    cw = coded_weight(20, 64, 4, 32, dtype)
    lin = SparseLinear(cw, torch.randn(20))
    dense = lin.to_linear()
    xdtype = torch.float32 if dtype != torch.bfloat16 else torch.bfloat16
    limit = lin.decode_limit(xdtype)
    prefill = "panel" if ext.ext_cpu_has_panel() else "prefill"
    for T, path, panel in ((1, "kernel", True), (limit, "kernel", True), (limit + 1, prefill, True),
                           (limit + 1, "prefill", False)):
        lin.prefill_kernel = panel
        before = sl.LAST_PATH[path]
        x = torch.randn(T, 64).to(xdtype)
        y = lin(x)
        assert sl.LAST_PATH[path] == before + 1
        ref = F.linear(x, dense.weight.to(xdtype), dense.bias.to(xdtype))
        if path == "prefill":  # the same dense product, bit for bit
            assert torch.equal(y, ref)
        else:  # summed in float32, rounded once to x's dtype
            ref32 = F.linear(x.float(), dense.weight.float(), dense.bias.float())
            torch.testing.assert_close(y.float(), ref32, rtol=2.0**-8 if xdtype == torch.bfloat16 else 1e-5,
                                       atol=1e-5)
    assert lin._dense_copy is None
    assert lin.nbytes() == cw.nbytes()  # the padding of the codes is not counted: it is not the weight
    assert torch.equal(lin.compressed().codes, cw.codes)
    monkeypatch.setattr(sl, "_kernel_available", lambda: False)  # no extension: a dense copy, made once
    lin._plans.clear()  # (the decode plans outlive a patch like this one; a real extension does not go away)
    before = sl.LAST_PATH["copy"]
    x = torch.randn(1, 64).to(xdtype)
    assert torch.equal(lin(x), F.linear(x, dense.weight.to(xdtype), dense.bias.to(xdtype)))
    assert sl.LAST_PATH["copy"] == before + 1 and lin._dense_copy is not None


def test_pad_code_bytes_agree_with_the_kernel_header():
    import os
    import re

    from sparsegpt_kernels.backends import extension

    text = open(os.path.join(extension.source_dir(), "core", "sparse_codes.h")).read()
    assert int(re.search(r"kPadCodeBytes = (\d+);", text).group(1)) == sl.PAD_CODE_BYTES


def test_codes_keep_the_dtype_they_were_rounded_to_through_casts(ext):
    """A bfloat16-pruned layer loaded or cast to float32 multiplies with the bfloat16 weights (as the dense
    checkpoint loaded in float32 does), with the kernel; cast to float16 it would need a second rounding: a dense
    copy of exactly the dense layer's weights."""
    cw = coded_weight(16, 64, 4, 32, torch.bfloat16, log2_scale=(-9.0, -1.0))
    W16 = cw.decompress()
    lin = SparseLinear(cw).float()
    assert lin.codes_dtype == torch.bfloat16 and lin.weight_dtype == torch.float32
    assert torch.equal(lin.dense_weight(), W16.float())
    x = torch.randn(2, 64)
    assert lin._compiled(x) is None
    torch.testing.assert_close(lin(x), F.linear(x, W16.float()), rtol=1e-5, atol=1e-6)
    assert SparseLinear(cw, dtype=torch.float32).compressed().dtype == torch.bfloat16  # saved as it was pruned
    half = SparseLinear(cw).half()
    assert half._compiled(x) == "bfloat16 codes in a float16 layer"
    assert torch.equal(half.dense_weight(), W16.half())
    xh = x.half()
    assert torch.equal(half(xh), F.linear(xh, W16.half()))
