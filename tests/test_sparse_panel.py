"""The panel kernel (csrc/core/sparse_panel.h): y = x Wᵀ + b for prompts straight from the compressed weight, x
transposed into float32 panels of up to 128 tokens. Its AVX-512 copy against its specification (the scalar loop,
bit for bit), both against dense products of the same zeros, the quantized form against the values form, and
SparseLinear's choice between the row kernel, the panel and the decompressed weight."""

from __future__ import annotations

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
    """The AVX-512 copy gives the scalar specification's bits (where this CPU has it), at every panel width and
    column blocking; both are within the float32 bound of a dense product of the same zeros; the empty row is the
    bias alone."""
    W = _kernel_problem(11, cols, vdtype, seed=cols)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(11).to(xdtype))
    simd = bool(ext.ext_cpu_has_panel())
    for T in TOKENS:
        x = _x(T, cols, xdtype, T)
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "baseline")
        spec = ext.ext_sparse_linear_panel(x, *_values_args(lin))
        monkeypatch.delenv("SPARSEGPT_KERNELS_CPU_SIMD")
        y = ext.ext_sparse_linear_panel(x, *_values_args(lin))
        if simd:
            assert torch.equal(y, spec), (T, float((y.float() - spec.float()).abs().max()))
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
    """The codes decoded (AVX-512 and scalar, every code at every nibble parity) are the format's weights: the result
    is bit for bit the values panel's on the dequantized weights with the same mask (a code at its zero point is a
    kept 0, which takes its place in the sums' order), and within the float32 bound of a dense product."""
    cw = coded_weight(13, cols, bits, group, dtype, seed=cols + bits)
    W = cw.decompress()
    bias = torch.randn(13)
    lin = SparseLinear(cw, bias)
    keep = fmt.unpack_mask(cw.mask, cols)
    vals = SparseLinear(CompressedWeight((13, cols), torch.float32, cw.mask, values=W.float()[keep]), bias)
    for simd in ("baseline", None):
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
    """Up to the decode limit the row kernel; beyond it the panel where the CPU has it (else the decompressed weight,
    bit for bit torch's product); prefill_kernel = False decompresses; float32 prompts of many tokens with half the
    weights kept decompress (torch's float32 product is faster there), sparser ones stay on the panel."""
    if quantized:
        cw = coded_weight(24, 64, 4, 32, torch.float32)
    else:
        cw = CompressedWeight.compress(_kernel_problem(24, 64, torch.float32))
    lin = SparseLinear(cw, torch.randn(24))
    dense = lin.to_linear()
    panel = bool(ext.ext_cpu_has_panel())
    limit = lin.decode_limit(torch.float32)
    assert limit == sl.DECODE_MAX_TOKENS
    for T, path in ((1, "kernel"), (limit, "kernel"), (limit + 1, "panel" if panel else "prefill"),
                    (200, "panel" if panel else "prefill"), (300, "prefill")):
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
    assert torch.equal(lin(x), dense(x)) and sl.LAST_PATH["prefill"] == before + 1
    lin.prefill_kernel = True
    x = torch.randn(40, 64).bfloat16()  # bfloat16 prompts: the panel at any length, where the CPU has it
    bf_limit = lin.decode_limit(torch.bfloat16)  # quantized layers: the panel from 9 tokens on
    bf16_rows = bool(ext.ext_cpu_has_bf16_dot()) and not quantized
    assert bf_limit == (sl.DECODE_MAX_TOKENS_BF16 if bf16_rows else sl.DECODE_MAX_TOKENS)
    assert lin.uses_panel(torch.randn(300, 64).bfloat16()) == panel
    if not quantized:  # a sparser layer keeps the panel on long float32 prompts, and takes it from 9 tokens on
        sparse = SparseLinear(CompressedWeight.compress(_kernel_problem(24, 64, torch.float32, keep=0.2)))
        assert sparse.uses_panel(torch.randn(300, 64)) == panel
        assert sparse.decode_limit(torch.bfloat16) == sl.DECODE_MAX_TOKENS
    assert lin._dense_copy is None


def test_panel_under_torch_compile(ext):
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(10, 40, torch.float32)), torch.randn(10))
    x = torch.randn(50, 40)
    compiled = torch.compile(lambda a: lin(a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))
