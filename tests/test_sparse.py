"""The compressed sparse form (sparsegpt_kernels.sparse): packing, exact round trips, the checkpoint and its
validation, and the compiled sparse linear kernel against a dense product of the same zeros."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import require_extension
from torch import nn

import sparsegpt_kernels as sk
from sparsegpt_kernels.sparse import CompressedWeight, SparseFormatError, SparseLinear, checkpoint_sizes
from sparsegpt_kernels.sparse import format as fmt
from sparsegpt_kernels.sparse import linear as sl
from sparsegpt_kernels.spec import QuantGrid

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _sparse_weight(rows, cols, dtype=torch.float32, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) >= keep] = 0
    return W.to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# The format
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 63, 64, 65, 130])
def test_mask_packing_round_trips_and_is_lsb_first(cols):
    keep = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.4
    keep[0] = False
    keep[1] = True
    mask = fmt.pack_mask(keep)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == (5, (cols + 7) // 8)
    assert torch.equal(fmt.unpack_mask(mask, cols), keep)
    assert torch.equal(fmt.row_counts(mask), keep.sum(1))
    # bit j % 8 of byte j // 8, least significant first; padding bits 0
    for j in range(cols):
        assert bool((int(mask[1, j // 8]) >> (j % 8)) & 1)
    if cols % 8:
        assert int(mask[1, -1]) == (1 << (cols % 8)) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_decompress_is_bit_exact(dtype):
    W = _sparse_weight(17, 45, dtype)
    W[3] = 0  # an empty row
    W[4, :] = torch.randn(45).to(dtype)  # a full row
    W[5, 7] = -0.0  # a signed zero is a zero
    cw = CompressedWeight.compress(W)
    assert cw.nnz == int((W != 0).sum()) and cw.values.dtype == dtype and cw.values.numel() == cw.nnz
    back = cw.decompress()
    assert back.dtype == dtype and torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                               (W + 0.0).view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_with_every_row_on_a_byte(bits):
    counts = torch.tensor([0, 1, 2, 5, 0, 3])
    codes = torch.randint(0, 1 << bits, (int(counts.sum()),), generator=torch.Generator().manual_seed(bits))
    packed = fmt.pack_codes(codes, counts, bits)
    assert packed.numel() == int(fmt.code_bytes_per_row(counts, bits).sum())
    assert torch.equal(fmt.unpack_codes(packed, counts, bits), codes)
    if bits <= 4:  # rows 1, 3 and 5 are odd: their last byte ends in a zero nibble
        assert packed.numel() == 0 + 1 + 1 + 3 + 0 + 2


def _quantized(rows=12, cols=64, bits=4, group=32, dtype=torch.float32):
    """A pruned weight exactly on a grid, and the grid (as prune_layer leaves them)."""
    from sparsegpt_kernels import reference

    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    grid = reference.make_quant_grid(W, bits, group)
    g = grid.group_size
    q = reference.quantize(W, grid.scale.repeat_interleave(g, 1), grid.zero.repeat_interleave(g, 1), grid.maxq)
    q[torch.rand(rows, cols, generator=torch.Generator().manual_seed(4)) < 0.5] = 0
    return q.to(dtype), QuantGrid(grid.scale, grid.zero, grid.maxq, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weight_is_stored_as_codes_and_comes_back_exactly(dtype):
    W, grid = _quantized(dtype=dtype)
    cw = CompressedWeight.compress(W, quant=grid)
    assert cw.quantized and cw.bits == 4 and cw.values is None
    assert cw.codes.numel() == int(fmt.code_bytes_per_row(fmt.row_counts(cw.mask), 4).sum())
    assert torch.equal(cw.decompress(), W + 0.0)
    assert cw.nbytes() < 0.3 * W.numel() * W.element_size()


def test_values_are_kept_where_the_codes_would_not_give_them_back():
    W, grid = _quantized()
    W[0, (W[0] != 0).nonzero()[0, 0]] += 1e-3  # one weight off the grid
    cw = CompressedWeight.compress(W, quant=grid)
    assert not cw.quantized and torch.equal(cw.decompress(), W + 0.0)


def test_nm_pattern_is_checked_both_ways():
    W = _sparse_weight(4, 16)
    W[:, 0::4] = W[:, 1::4] = 0
    W[W == 0] = 0
    W[:, 2::4] = 1.0
    W[:, 3::4] = 2.0
    assert CompressedWeight.compress(W, pattern="2:4").pattern == "2:4"
    W[1, 0] = 5.0  # three kept in a group
    with pytest.raises(SparseFormatError, match="not 2:4: row 1, columns 0..3 keep more than 2"):
        CompressedWeight.compress(W, pattern="2:4")


def _tensors(cw, prefix="layer"):
    return dict(cw.tensors(prefix))


@pytest.mark.parametrize("case, message", [
    ("popcount", "layer.weight_values: shape .*popcount"),
    ("dtype", "layer.weight_values: dtype torch.float16, expected torch.float32"),
    ("mask-shape", r"layer.weight_mask: shape \(3, 2\), expected \(3, 1\)"),
    ("padding", "padding bits beyond column 5 are set"),
    ("missing", "has no tensor 'layer.weight_values'"),
    ("bad-dtype-name", "unknown dtype 'float8'"),
])
def test_from_tensors_names_the_bad_tensor(case, message):
    W = _sparse_weight(3, 5)
    cw = CompressedWeight.compress(W)
    t, meta = _tensors(cw), cw.meta()
    if case == "popcount":
        t["layer.weight_values"] = t["layer.weight_values"][:-1]
    elif case == "dtype":
        t["layer.weight_values"] = t["layer.weight_values"].half()
    elif case == "mask-shape":
        t["layer.weight_mask"] = torch.zeros(3, 2, dtype=torch.uint8)
    elif case == "padding":
        t["layer.weight_mask"] = t["layer.weight_mask"].clone()
        t["layer.weight_mask"][0, 0] |= 0x80
    elif case == "missing":
        del t["layer.weight_values"]
    else:
        meta["dtype"] = "float8"
    with pytest.raises(SparseFormatError, match=message):
        CompressedWeight.from_tensors("layer", meta, t)


@pytest.mark.parametrize("case, message", [
    ("code-range", "codes above 7 for 3-bit codes"),
    ("zero-range", "zero points above 15"),
    ("scale", "scales must be finite and > 0"),
    ("bits", "bits must be an int in 2..8"),
    ("group", "group_size must be a positive int dividing 64"),
])
def test_quantized_tensors_are_validated(case, message):
    W, grid = _quantized()
    cw = CompressedWeight.compress(W, quant=grid)
    t, meta = _tensors(cw), cw.meta()
    assert CompressedWeight.from_tensors("layer", meta, t).bits == 4
    if case == "zero-range":
        t["layer.weight_zero"] = t["layer.weight_zero"].clone()
        t["layer.weight_zero"][0, 0] = 16
    elif case == "scale":
        t["layer.weight_scale"] = t["layer.weight_scale"].clone()
        t["layer.weight_scale"][1, 1] = 0.0
    elif case == "bits":
        meta["bits"] = 9
    elif case == "group":
        meta["group_size"] = 48
    else:  # the same bytes read as 3-bit codes (two a byte as well): a nibble of 15 is off that grid
        t["layer.weight_codes"] = t["layer.weight_codes"].clone()
        t["layer.weight_codes"][0] = 0xFF
        assert CompressedWeight.from_tensors("layer", meta, t).bits == 4  # 15 is on a 4-bit grid
        meta["bits"] = 3
    with pytest.raises(SparseFormatError, match=message):
        CompressedWeight.from_tensors("layer", meta, t)


# ------------------------------------------------------------------------------------------------------------------
# SparseLinear and to_sparse / to_dense
# ------------------------------------------------------------------------------------------------------------------
def test_sparse_linear_of_a_linear_and_back_is_bit_exact():
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(24, 40) < 0.5).float())
    s = SparseLinear.from_linear(lin)
    assert s.weight_dtype == torch.float32 and s.nnz == int((lin.weight != 0).sum())
    back = s.to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    x = torch.randn(40, 40)  # more tokens than the row kernel takes: the panel kernel where the CPU has it
    torch.testing.assert_close(s(x), lin(x), rtol=1e-5, atol=1e-5)
    s.prefill_kernel = False  # the decompressed weight: exactly nn.Linear's product
    assert torch.equal(s(x), lin(x))
    s16 = s.to(torch.bfloat16)
    assert s16.weight_dtype == torch.bfloat16 and s16.weight_values.dtype == torch.bfloat16
    assert torch.equal(s16.dense_weight(), lin.weight.bfloat16())
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        SparseLinear.from_linear(nn.ReLU())


def test_quantized_sparse_linear_keeps_its_scales_through_dtype_casts():
    W, grid = _quantized(dtype=torch.bfloat16)
    s = SparseLinear(CompressedWeight.compress(W, quant=grid))
    s = s.float().bfloat16()  # the scales are stored as their bits: no cast touches them
    assert torch.equal(s.dense_weight(), W + 0.0)


def tiny_llama(seed=0, hidden=64, inter=128, tied=True, dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def _ids(n=4, L=32, seed=1):
    return torch.randint(0, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))


SETTINGS = [
    pytest.param({"sparsity": 0.5}, id="50%"),
    pytest.param({"pattern": "2:4"}, id="2:4"),
    pytest.param({"sparsity": 0.5, "quant_bits": 4, "quant_group_size": 32}, id="50%+4bit"),
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_to_sparse_and_back_in_memory(kw, monkeypatch):
    model = tiny_llama()
    sk.prune_model(model, _ids(), device="cpu", **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _ids(2, 24, seed=5)
    with torch.no_grad():
        ref = model(x).logits
    names = sk.to_sparse(model)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), SparseLinear) for n in names)
    first = model.get_submodule(names[0])
    assert first.pattern == kw.get("pattern") and first.bits == kw.get("quant_bits")
    with torch.no_grad():  # 48 tokens: the panel kernel (float32 sums in another order)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(SparseLinear, "prefill_kernel", False)
        assert torch.equal(model(x).logits, ref)  # the decompressed weights: the dense product, bit for bit
    assert sk.to_dense(model) == 14
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k] + 0.0) for k in before)


def test_to_sparse_leaves_dense_and_tied_layers_alone():
    model = tiny_llama()
    assert sk.to_sparse(model) == []  # nothing pruned: nothing at least 25% zeros
    model.lm_head.weight.data[:, :40] = 0  # tied to the embedding: never converted
    sk.prune_model(model, _ids(), device="cpu", sparsity=0.5, include="*mlp*")
    assert sorted(n.rsplit(".", 1)[-1] for n in sk.to_sparse(model)) == ["down_proj", "down_proj", "gate_proj",
                                                                          "gate_proj", "up_proj", "up_proj"]
    assert isinstance(model.lm_head, nn.Linear)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------
def _dense_reference(model, tmp_path):
    """The pruned model as transformers saves and loads it (the same loading conventions as load_sparse's)."""
    d = tmp_path / "dense"
    model.save_pretrained(d)
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=model.dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_save_and_load_give_the_dense_pruned_model(kw, dtype, tmp_path, monkeypatch):
    model = tiny_llama(dtype=dtype)
    sk.prune_model(model, _ids(), device="cpu", **kw)
    dense = _dense_reference(model, tmp_path)
    table = sk.save_sparse(model, tmp_path / "sparse")
    assert len(table) == 14 and all(m["pattern"] == kw.get("pattern") for m in table.values())
    assert all(m.get("bits") == kw.get("quant_bits") for m in table.values())
    loaded = sk.load_sparse(tmp_path / "sparse")
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
    assert loaded.model.embed_tokens.weight is loaded.lm_head.weight  # tied again
    x = _ids(2, 24, seed=5)
    with torch.no_grad():
        want = dense(x).logits
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        torch.testing.assert_close(loaded(x).logits, want, **tol)  # the panel kernel where the CPU has it
        monkeypatch.setattr(SparseLinear, "prefill_kernel", False)
        assert torch.equal(loaded(x).logits, want)  # the decompressed weights: bit for bit
    sk.to_dense(loaded)
    got, want = loaded.state_dict(), dense.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(OSError):  # transformers' own loader finds no weights it knows: no random layers
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")


def test_checkpoint_sizes_meet_the_targets(tmp_path):
    """Compressed bytes of the pruned layers against dense bf16 (the format's arithmetic: 0.5625x at 50%,
    0.3625x at 70%, about 0.207x at 50% + 4-bit codes with groups of 128)."""
    got = {}
    for label, kw, limit in (("50%", {"sparsity": 0.5}, 0.57), ("70%", {"sparsity": 0.7}, 0.38),
                             ("2:4", {"pattern": "2:4"}, 0.57),
                             ("50%+4bit", {"sparsity": 0.5, "quant_bits": 4, "quant_group_size": 128}, 0.21)):
        model = tiny_llama(hidden=128, inter=256, dtype=torch.bfloat16)
        sk.prune_model(model, _ids(), device="cpu", **kw)
        sk.save_sparse(model, tmp_path / label)
        s = checkpoint_sizes(tmp_path / label)
        got[label] = s["compressed"] / s["dense_equivalent"]
        assert got[label] <= limit, (label, got[label])
    assert got["50%"] >= 0.55 and got["70%"] >= 0.35 and got["50%+4bit"] >= 0.19, got  # and not too little stored


def test_a_sharded_checkpoint_loads(tmp_path, monkeypatch):
    model = tiny_llama()
    sk.prune_model(model, _ids(), device="cpu", sparsity=0.5)
    sk.save_sparse(model, tmp_path, max_shard_size=20_000)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(tmp_path / "sparse-model.safetensors.index.json")
    loaded = sk.load_sparse(tmp_path)
    monkeypatch.setattr(SparseLinear, "prefill_kernel", False)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(1, 20)).logits, model(_ids(1, 20)).logits)


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    sk.prune_model(model, _ids(), device="cpu", sparsity=0.5)
    sk.save_sparse(model, tmp_path)
    return tmp_path


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(path)
    edit(t)
    save_file(t, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated|beyond the end of the file"),
    ("version", "format version 2; this sparsegpt_kernels reads version 1"),
    ("format", "not a sparse checkpoint"),
    ("popcount", r"model.layers.0.self_attn.q_proj.weight_values: shape .* popcount"),
    ("shape", "layer 'model.layers.1.mlp.up_proj': the model's module is shape"),
    ("missing", "has no tensor 'model.layers.0.mlp.down_proj.weight_mask'"),
    ("extra", "the checkpoint has tensors the model does not"),
    ("no-weights", "no sparse-model.safetensors"),
])
def test_bad_checkpoints_are_refused_naming_the_problem(saved, case, message):
    weights = saved / "sparse-model.safetensors"
    cfg_path = saved / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    elif case in ("version", "format"):
        cfg["sparsegpt_kernels"]["version" if case == "version" else "format"] = 2 if case == "version" else "x"
        cfg_path.write_text(json.dumps(cfg))
    elif case == "popcount":
        name = "model.layers.0.self_attn.q_proj.weight_values"
        _rewrite(weights, lambda t: t.__setitem__(name, t[name][:-3].clone()))
    elif case == "shape":
        cfg["sparsegpt_kernels"]["layers"]["model.layers.1.mlp.up_proj"]["shape"] = [128, 32]
        cfg_path.write_text(json.dumps(cfg))
        name = "model.layers.1.mlp.up_proj.weight_mask"
        _rewrite(weights, lambda t: t.__setitem__(name, torch.zeros(128, 4, dtype=torch.uint8)))
        vname = "model.layers.1.mlp.up_proj.weight_values"
        _rewrite(weights, lambda t: t.__setitem__(vname, torch.zeros(0)))
    elif case == "missing":
        _rewrite(weights, lambda t: t.pop("model.layers.0.mlp.down_proj.weight_mask"))
    elif case == "extra":
        _rewrite(weights, lambda t: t.__setitem__("model.layers.0.surprise", torch.zeros(3)))
    else:
        weights.unlink()
    with pytest.raises(SparseFormatError, match=message):
        sk.load_sparse(saved)


# ------------------------------------------------------------------------------------------------------------------
# The compiled kernel
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def ext():
    require_extension()
    from sparsegpt_kernels.backends import extension

    return extension.ops()


def _kernel_problem(rows, cols, vdtype, seed=0, keep=0.5):
    W = _sparse_weight(rows, cols, vdtype, keep=keep, seed=seed)
    if rows > 2:
        W[0] = 0  # an empty row
        W[1] = torch.randn(cols, generator=torch.Generator().manual_seed(seed)).to(vdtype)  # a full row
        W[2] = 0
        W[2, cols // 2] = 3.0  # one kept value
    return W


def _bound(x, W, out_dtype):
    """|y - y_ref| allowed: float32 summation of n products (about n·2⁻²⁴ of Σ|w||x|, with room), plus the rounding of
    the output to bfloat16 when that is its dtype."""
    n = W.shape[1]
    mag = x.float().abs() @ W.float().abs().T
    b = 4 * n * 2.0**-24 * mag + 1e-30
    if out_dtype == torch.bfloat16:
        b = b + 2.0**-8 * mag
    return b


@pytest.mark.parametrize("simd", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("cols", [1, 7, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("xdtype, vdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "fp32-bf16w"])
def test_kernel_matches_a_dense_product_of_the_same_zeros(ext, simd, cols, xdtype, vdtype, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", simd)
    W = _kernel_problem(11, cols, vdtype, seed=cols)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(11).to(xdtype))
    for T in range(1, 18):
        x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T)).to(xdtype)
        y = ext.ext_sparse_linear(x, lin.weight_mask, lin.weight_values, lin.weight_offsets, lin.bias)
        ref = F.linear(x.float(), W.float(), lin.bias.float())
        assert y.dtype == xdtype and y.shape == (T, 11)
        err = (y.float() - ref).abs()
        assert bool((err <= _bound(x, W, xdtype) + 2.0**-8 * lin.bias.float().abs()).all()), (T, float(err.max()))
        assert bool((y[:, 0].float() == lin.bias[None, 0].to(xdtype).float()).all())  # the empty row: the bias


@pytest.mark.parametrize("cols", [64, 128, 200, 576, 1000])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_kernel_avx512_sums_bfloat16_values_like_the_avx2_copy(ext, cols, keep, monkeypatch):
    """bfloat16 values with float32 x: the AVX-512 copy (64-column steps on CPUs with VBMI, up to 3 tokens a pass)
    gives the AVX2 copy's bits, for every token count, every density (empty and full 64-column steps: one or two
    registers of values), rows that end at the buffer's end (the loads there are masked)."""
    W = _kernel_problem(13, cols, torch.bfloat16, seed=cols, keep=keep)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(13))
    args = (lin.weight_mask, lin.weight_values, lin.weight_offsets, lin.bias)
    for T in range(1, 18):
        x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "avx512")
        y = ext.ext_sparse_linear(x, *args)
        monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "avx2")
        y2 = ext.ext_sparse_linear(x, *args)
        assert torch.equal(y, y2), (T, float((y - y2).abs().max()))
        ref = F.linear(x, W.float(), lin.bias)
        assert bool(((y - ref).abs() <= _bound(x, W, torch.float32) + 2.0**-22 * lin.bias.abs()).all()), T


def test_kernel_baseline_sums_like_a_sequential_float32_loop(ext, monkeypatch):
    """With the same summation order (one kept weight after another, in float32), the result is exact."""
    import numpy as np

    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "baseline")
    W = _kernel_problem(6, 37, torch.float32, seed=2)
    lin = SparseLinear(CompressedWeight.compress(W))
    x = torch.randn(3, 37)
    y = ext.ext_sparse_linear(x, lin.weight_mask, lin.weight_values, lin.weight_offsets, None)
    Wn, xn = W.numpy(), x.numpy()
    for t in range(3):
        for r in range(6):
            acc = np.float32(0)
            for j in range(37):
                if Wn[r, j] != 0:
                    acc = np.float32(acc + np.float32(Wn[r, j] * xn[t, j]))
            assert float(y[t, r]) == float(acc)


def test_kernel_on_a_whole_empty_layer_and_leading_dimensions(ext):
    W = torch.zeros(9, 24)
    lin = SparseLinear(CompressedWeight.compress(W))
    x = torch.randn(2, 3, 24)
    assert torch.equal(lin(x), torch.zeros(2, 3, 9))
    assert sl.LAST_PATH["kernel"] >= 1


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_kernels_on_large_and_strided_inputs(ext, xdtype, monkeypatch):
    """Inputs beyond the per-thread buffers of a decode call (float32 rows of x and y in tensors then), strided and
    3-D inputs, zero tokens: the values and the codes kernels against dense products of the same weights."""
    monkeypatch.setenv("SPARSEGPT_KERNELS_CPU_SIMD", "avx2")  # the float32 rows path at every token count
    W = _kernel_problem(80, 1040, torch.bfloat16, seed=5)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(80))
    Wq, grid = _quantized(rows=80, cols=1024, dtype=torch.bfloat16)
    q = SparseLinear(CompressedWeight.compress(Wq, quant=grid))
    for layer, dense in ((lin, W), (q, Wq)):
        cols = dense.shape[1]
        args = ((layer.weight_mask, layer.weight_values, layer.weight_offsets, layer.bias) if not layer.bits else
                (layer.weight_mask, layer.weight_codes, layer.weight_code_offsets,
                 layer.weight_scale_bits.view(torch.float32), layer.weight_zero, layer.bits, layer.group_size,
                 layer.codes_dtype, None))
        op = ext.ext_sparse_codes_linear if layer.bits else ext.ext_sparse_linear
        bias = layer.bias.float() if layer.bias is not None else None
        big = torch.randn(2, 40, cols).to(xdtype)  # 80 tokens: 83200 floats of x, more than a thread's buffer
        strided = torch.randn(cols, 3).to(xdtype).T  # 3 tokens, not contiguous
        for x in (big, strided, big[:, :1], torch.randn(0, cols).to(xdtype)):
            y = op(x, *args)
            ref = F.linear(x.float(), dense.float(), bias)
            assert y.dtype == xdtype and y.shape == (*x.shape[:-1], 80)
            slack = 0 if bias is None else 2.0**-8 * bias.abs()
            assert bool(((y.float() - ref).abs() <= _bound(x, dense, xdtype) + slack).all())


def test_kernel_refuses_offsets_that_disagree_with_the_mask(ext):
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(5, 16, torch.float32)))
    bad = lin.weight_offsets.clone()
    bad[2] += 1
    with pytest.raises(RuntimeError, match="is not the number of bits set in mask row 1"):
        ext.ext_sparse_linear(torch.randn(1, 16), lin.weight_mask, lin.weight_values, bad, None)
    with pytest.raises(RuntimeError, match="offsets need"):
        ext.ext_sparse_linear(torch.randn(1, 16), lin.weight_mask, lin.weight_values[: lin.nnz], lin.weight_offsets,
                              None)
    with pytest.raises(RuntimeError, match="mask has 2 bytes per row, x has 8 columns"):
        ext.ext_sparse_linear(torch.randn(1, 8), lin.weight_mask, lin.weight_values, lin.weight_offsets, None)


def test_sparse_linear_picks_the_kernel_for_decode_and_dense_for_prefill(ext, monkeypatch):
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(20, 48, torch.float32)), torch.randn(20))
    dense = lin.to_linear()
    lin.prefill_kernel = False  # the panel kernel's choice: tests/test_sparse_panel.py
    for T, path in ((1, "kernel"), (8, "kernel"), (9, "prefill"), (64, "prefill")):
        before = sl.LAST_PATH[path]
        x = torch.randn(T, 48)
        y = lin(x)
        assert sl.LAST_PATH[path] == before + 1
        if path == "prefill":  # the same dense product, bit for bit
            assert torch.equal(y, dense(x))
        else:
            torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)
    assert lin._dense_copy is None  # decode and prefill keep no dense copy
    monkeypatch.setattr(sl, "_kernel_available", lambda: False)  # no extension: a dense copy, made once
    lin._plans.clear()  # (the decode plans outlive a patch like this one; a real extension does not go away)
    before = sl.LAST_PATH["copy"]
    x = torch.randn(1, 48)
    assert torch.equal(lin(x), dense(x)) and torch.equal(lin(x), dense(x))
    assert sl.LAST_PATH["copy"] == before + 2 and lin._dense_copy is not None


def test_the_decode_plan_follows_the_module(ext):
    """The decode call kept per input dtype (SparseLinear.forward) gives the checked path's result, and is dropped
    when the module is cast or moved, when an attribute or buffer is replaced, and when decode_max_tokens changes."""
    W = _kernel_problem(20, 48, torch.bfloat16)
    lin = SparseLinear(CompressedWeight.compress(W), torch.randn(20))
    x = torch.randn(1, 48)
    first = lin(x)
    assert set(lin._plans) == {torch.float32}
    assert torch.equal(lin(x), first) and torch.equal(lin._forward(x), first)
    lin.to(torch.float32)  # the values are cast: the plan must not hold the bfloat16 ones
    assert not lin._plans and lin.weight_values.dtype == torch.float32
    y32 = lin(x)
    ref = F.linear(x, W.float(), lin.bias)
    torch.testing.assert_close(y32, ref, rtol=1e-5, atol=1e-5)
    assert lin._plans[torch.float32][2][1] is lin.weight_values
    lin.bias = torch.nn.Parameter(torch.zeros(20), requires_grad=False)  # a replaced parameter
    assert not lin._plans
    torch.testing.assert_close(lin(x), F.linear(x, W.float()), rtol=1e-5, atol=1e-5)
    before = sl.LAST_PATH["prefill"]
    lin.prefill_kernel = False
    lin.decode_max_tokens = 0  # every call is a prefill now (the decompressed weight)
    assert torch.equal(lin(x), F.linear(x, W.float())) and sl.LAST_PATH["prefill"] == before + 1
    assert not lin._plans
    lin.decode_max_tokens = 8
    lin(x)
    lin.weight_values = lin.weight_values * 2  # a replaced buffer
    assert not lin._plans
    torch.testing.assert_close(lin(x), 2 * F.linear(x, W.float()), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.save(lin, buf)  # a module with a plan pickles (without it) and the copy computes the same
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), lin(x)) and torch.equal(copy.deepcopy(lin)(x), lin(x))


def test_layers_no_kernel_takes_run_from_a_dense_copy_and_say_so(caplog):
    """float16 values (the value kernel reads float32 and bfloat16): a dense copy, made once, said once; a quantized
    layer takes the codes kernel in every dtype (tests/test_sparse_codes.py)."""
    W = _sparse_weight(12, 64, torch.float16)
    lin = SparseLinear(CompressedWeight.compress(W))
    sl._said.discard("float16 values")
    x = torch.randn(2, 64)
    before = sl.LAST_PATH["copy"]
    with caplog.at_level("WARNING", logger="sparsegpt_kernels"):
        y = lin(x)
        lin(x)
    assert torch.equal(y, F.linear(x, W.float())) and sl.LAST_PATH["copy"] == before + 2
    assert sum("no compressed kernel for float16 values" in r.message for r in caplog.records) == 1
    Wq, grid = _quantized(dtype=torch.float16)
    q = SparseLinear(CompressedWeight.compress(Wq, quant=grid))
    assert q._compiled(x) is None or q._compiled(x) == "no compiled extension"


@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 9, 64, 130])
def test_compiled_decompression_is_bit_exact(ext, vdtype, cols):
    cw = CompressedWeight.compress(_kernel_problem(7, cols, vdtype, seed=cols))
    lin = SparseLinear(cw)
    W = ext.ext_sparse_to_dense(lin.weight_mask, lin.weight_values, lin.weight_offsets, cols)
    assert W.dtype == vdtype and torch.equal(W, cw.decompress())
    bad = lin.weight_offsets.clone()
    bad[1:] += 1
    with pytest.raises(RuntimeError, match="mask row 0"):
        ext.ext_sparse_to_dense(lin.weight_mask, lin.weight_values, bad, cols)
    torch.library.opcheck(ext.ext_sparse_to_dense.default, (lin.weight_mask, lin.weight_values, lin.weight_offsets,
                                                            cols))


def test_kernel_opcheck_and_compile(ext):
    lin = SparseLinear(CompressedWeight.compress(_kernel_problem(10, 40, torch.float32)), torch.randn(10))
    x = torch.randn(4, 40)
    args = (x, lin.weight_mask, lin.weight_values, lin.weight_offsets, lin.bias)
    torch.library.opcheck(ext.ext_sparse_linear.default, args)
    compiled = torch.compile(lambda a: lin(a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


def test_pad_values_agree_with_the_kernel_header():
    from sparsegpt_kernels.backends import extension

    src = extension.source_dir()
    text = open(os.path.join(src, "core", "sparse_linear.h")).read()
    assert int(re.search(r"kPadValues = (\d+);", text).group(1)) == sl.PAD_VALUES


def test_prefill_threshold_is_a_sane_token_count():
    assert 1 <= sl.DECODE_MAX_TOKENS <= 128 and math.log2(sl.DECODE_MAX_TOKENS).is_integer()


def test_the_quantization_grid_survives_a_resume(tmp_path):
    """A run killed after block 0 and resumed: block 0 comes back from the checkpoint with the marks of how its layers
    were pruned, so its weights are still stored as 4-bit codes."""
    kw = dict(sparsity=0.5, quant_bits=4, quant_group_size=32, device="cpu", checkpoint_dir=tmp_path / "ckpt")

    def stop(b, reports):
        if b == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sk.prune_model(tiny_llama(), _ids(), on_block_end=stop, **kw)
    model = tiny_llama()
    report = sk.prune_model(model, _ids(), **kw)
    assert report.resumed_from_block == 1
    table = sk.save_sparse(model, tmp_path / "sparse")
    assert {m.get("bits") for m in table.values()} == {4} and len(table) == 14
