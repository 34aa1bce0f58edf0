"""Export of 2:4-pruned linear layers to semi-structured sparse tensors.

On a CPU the export must report no support and leave the model untouched; the decision logic (pattern, shape, dtype,
tied weights) is exercised with a fake "supported" description. The GPU tests run only where CUDA is available.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from sparsegpt_kernels.export import (
    ExportError,
    SemiStructuredSupport,
    keep_dense_reason,
    nm_violations,
    prepare_weight,
    semi_structured_support,
    to_dense,
    to_semi_structured,
    validate_nm,
)
from sparsegpt_kernels.reference import nm_keep_mask


def requires_cuda(fn):
    """A GPU test: marked ``gpu`` (scripts/test.sh runs these in its second pytest process on a CUDA machine)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def nm_weight(rows: int, cols: int, n: int, m: int, *, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W = W * nm_keep_mask(W.abs(), n, m)
    return W.to(device=device, dtype=dtype)


class MLP(nn.Module):
    def __init__(self, d: int = 128, h: int = 256, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(32, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 32, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.emb(ids)))))


def prune_24_(model: nn.Module, names=("up", "down")):
    with torch.no_grad():
        for name in names:
            w = getattr(model, name).weight
            w.mul_(nm_keep_mask(w.abs(), 2, 4))


FAKE = SemiStructuredSupport(True, "", "cutlass", {torch.float16: (32, 64), torch.bfloat16: (32, 64),
                                                   torch.float32: (32, 32)}, "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Pattern validation: "N kept of every M" along the input dimension
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_validator_accepts_its_own_pattern(n, m):
    W = nm_weight(7, 64, n, m)
    assert validate_nm(W, n, m)
    assert nm_violations(W, n, m) == 0


def test_validator_rejects_dense_and_names_the_group():
    W = torch.randn(5, 16)
    assert not validate_nm(W)
    with pytest.raises(ValueError, match=r"not 2:4 .*row 0, columns 0\.\.3"):
        validate_nm(W, raise_error=True)


def test_validator_1_4_versus_2_4():
    W24 = nm_weight(9, 32, 2, 4)
    W14 = nm_weight(9, 32, 1, 4)
    assert not validate_nm(W24, 1, 4)  # 2 kept of every 4 is not 1 of every 4
    assert validate_nm(W14, 2, 4)  # at most 2 non-zeros: a 1:4 weight is also 2:4


def test_validator_4_8_is_not_2_4():
    W = torch.zeros(3, 8)
    W[:, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 non-zeros in the first 4 columns: 4:8 yes, 2:4 no
    assert validate_nm(W, 4, 8)
    assert not validate_nm(W, 2, 4)
    assert nm_violations(W, 2, 4) == 3


def test_validator_checks_the_input_dimension_not_the_output():
    W = nm_weight(16, 8, 2, 4).T.contiguous()  # 2:4 along the rows: the wrong dimension
    assert nm_violations(W.T, 2, 4) == 0
    assert not validate_nm(W, 2, 4)


def test_validator_bad_shapes():
    assert not validate_nm(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="multiple of 4"):
        validate_nm(torch.zeros(4, 6), raise_error=True)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_violations(torch.zeros(4, 8), 4, 4)


def test_negative_zero_counts_as_zero_and_is_rewritten():
    W = torch.tensor([[1.0, -0.0, 2.0, -0.0], [-0.0, -0.0, 0.0, 3.0]], dtype=torch.float16)
    assert validate_nm(W)
    P = prepare_weight(W)
    assert P.dtype == W.dtype and P.is_contiguous()
    assert not torch.signbit(P[P == 0]).any()
    assert torch.equal(P, W)  # values unchanged (-0.0 == 0.0)
    assert torch.signbit(W[0, 1])  # the input is not modified
    assert P.data_ptr() != W.data_ptr()


def test_prepare_weight_non_contiguous():
    W = -torch.zeros(8, 4).T
    P = prepare_weight(W)
    assert P.is_contiguous() and not torch.signbit(P).any()


# ----------------------------------------------------------------------------------------------------------------
# The decision, with a fake supported device so the logic runs on a CPU
# ----------------------------------------------------------------------------------------------------------------
class _FakeCuda:
    """A weight stand-in that claims to live on CUDA (keep_dense_reason only reads dim/device/dtype/shape/values)."""

    def __init__(self, t):
        self.t = t
        self.device = torch.device("cuda", 0)
        self.dtype, self.shape = t.dtype, t.shape

    def dim(self):
        return self.t.dim()

    def __ne__(self, other):
        return self.t != other


def test_decision_converts_a_good_layer():
    assert keep_dense_reason(_FakeCuda(nm_weight(64, 128, 2, 4, dtype=torch.float16)), FAKE) is None


@pytest.mark.parametrize("shape,dtype,match", [
    ((64, 128), torch.float32, "TF32"),
    ((64, 128), torch.float64, "dtype float64 not supported by cutlass"),
    ((48, 128), torch.float16, r"shape 48x128 .* multiple of 32x64"),
    ((64, 96), torch.bfloat16, r"shape 64x96 .* multiple of 32x64"),
    ((16, 64), torch.float16, r"shape 16x64"),
])
def test_decision_keeps_bad_shapes_and_dtypes_dense(shape, dtype, match):
    W = nm_weight(*shape, 2, 4, dtype=dtype)
    reason = keep_dense_reason(_FakeCuda(W), FAKE)
    assert reason is not None and re.search(match, reason)


def test_decision_keeps_non_24_dense():
    W = nm_weight(64, 128, 3, 4, dtype=torch.float16)
    assert "not 2:4" in keep_dense_reason(_FakeCuda(W), FAKE)


def test_decision_keeps_cpu_weights_dense_even_if_supported():
    W = nm_weight(64, 128, 2, 4, dtype=torch.float16)
    assert "not on a CUDA device" in keep_dense_reason(W, FAKE)


def test_decision_unsupported():
    sup = SemiStructuredSupport(False, "no GPU here")
    assert keep_dense_reason(nm_weight(64, 128, 2, 4), sup) == "unsupported: no GPU here"


# ----------------------------------------------------------------------------------------------------------------
# Export on this machine's CPU: no support, nothing changes
# ----------------------------------------------------------------------------------------------------------------
def test_cpu_support_query():
    sup = semi_structured_support("cpu")
    assert not sup.available and "CUDA" in sup.reason and sup.backend is None
    with pytest.raises(ValueError, match="backend"):
        semi_structured_support("cpu", backend="magic")


def test_export_on_cpu_reports_and_leaves_the_model_unchanged():
    model = MLP(tied=True)
    prune_24_(model)
    ids = torch.randint(0, 32, (3, 11))
    with torch.no_grad():
        before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())

    report = to_semi_structured(model)

    assert not report.supported and report.converted == []
    assert set(report.kept_dense) == {"up", "down", "head"}
    assert all(r.startswith("unsupported:") for r in report.kept_dense.values())
    assert "not supported here" in str(report)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and type(v) is torch.Tensor
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # bit-exact


def test_export_on_cpu_strict_raises_before_changing_anything():
    model = MLP()
    prune_24_(model)
    w = model.up.weight
    with pytest.raises(ExportError, match="cannot be converted"):
        to_semi_structured(model, strict=True)
    assert model.up.weight is w


def test_export_layer_selection():
    model = MLP()
    report = to_semi_structured(model, layers=["up", "do*"])
    assert [x.name for x in report.layers] == ["up", "down"]
    assert report.layers[0].shape == (256, 128) and report.layers[0].dtype == "float32"


# ----------------------------------------------------------------------------------------------------------------
# GPU: the exported model computes what the dense pruned model computes
# ----------------------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_export_matches_dense(dtype):
    sup = semi_structured_support("cuda")
    if not sup.available:
        pytest.skip(sup.reason)
    torch.manual_seed(0)
    model = MLP(d=256, h=512, tied=True).to("cuda", dtype)
    prune_24_(model)
    with torch.no_grad():
        model.up.weight[0, 1] = -0.0  # a negative zero in a pruned position must not break CUTLASS
        model.up.weight[0, 0] = 0.0
    ids = torch.randint(0, 32, (4, 33), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
        x = torch.randn(1, 256, device="cuda", dtype=dtype)
        ref_decode = model.down(torch.relu(model.up(x))).float()
        # the last position of a sequence, as a decode step or logits_to_keep=1 hands it over: not foldable into one
        # mm by a view (the stride of its size-1 dimension), which once failed with "can't perform expand"
        last = torch.randn(2, 5, 256, device="cuda", dtype=dtype)[:, -1:, :]
        ref_last = model.up(last).float()
    report = to_semi_structured(model)
    assert report.converted == ["up", "down"], str(report)
    assert "tied" in report.kept_dense["head"]
    assert isinstance(model.up.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        got = model(ids).float()
        got_decode = model.down(torch.relu(model.up(x))).float()
        got_last = model.up(last).float()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    assert got_last.shape == (2, 1, 512)
    assert (got_last - ref_last).abs().max() <= tol * ref_last.abs().max()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= tol * scale
    assert (got_decode - ref_decode).abs().max() <= tol * ref_decode.abs().max()
    assert to_dense(model) == 2 and not model.up._forward_pre_hooks and not model.down._forward_pre_hooks


@requires_cuda
def test_gpu_export_keeps_bad_layers_dense():
    sup = semi_structured_support("cuda")
    if not sup.available:
        pytest.skip(sup.reason)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 96), nn.Linear(96, 40)).to("cuda", torch.float16)
    prune_24_(model, names=("0",))  # layer 1 stays dense (not 2:4); layer 2 has 40 rows (no kernel takes that)
    with torch.no_grad():
        model[2].weight.mul_(nm_keep_mask(model[2].weight.abs(), 2, 4))
    report = to_semi_structured(model)
    assert report.converted == ["0"]
    assert "not 2:4" in report.kept_dense["1"]
    assert "shape 40x96" in report.kept_dense["2"]
    with pytest.raises(ExportError):
        to_semi_structured(model, layers=["1"], strict=True)


def _linear_ops(module: nn.Module, x: torch.Tensor) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    with torch.no_grad(), Log():
        module(x)
    return seen


def test_converted_layers_fold_any_input_into_one_mm(monkeypatch):
    """A semi-structured weight supports mm but not expand/bmm. With a frozen weight, matmul folds a 3-D input into
    one mm only if a view can merge its leading dimensions, which a slice like hidden[:, -1:, :] defeats (its size-1
    dimension keeps the sequence's stride): a converted layer gets a forward pre-hook that gives such inputs canonical
    strides. Checked on the CPU with a stand-in conversion (the real one needs a GPU: test_gpu_export_matches_dense
    runs such a slice through a real semi-structured weight)."""
    from sparsegpt_kernels import export

    class FakeSparse:
        @staticmethod
        def from_dense(dense):
            return dense.clone()

    monkeypatch.setattr(export, "semi_structured_support", lambda *a, **k: FAKE)
    monkeypatch.setattr(export, "keep_dense_reason", lambda *a, **k: None)
    monkeypatch.setattr(export, "semi_structured_class", lambda backend: FakeSparse)
    monkeypatch.setattr(export, "_check_conversion", lambda sparse, dense: None)
    lin = nn.Linear(64, 32, bias=False)
    prune_24_(nn.ModuleDict({"up": lin}), names=("up",))
    seq = torch.randn(2, 5, 64)
    odd_inputs = [seq[:, -1:, :], seq[:1, -1:, :], torch.randn(64).as_strided((1, 1, 64), (640, 64, 1)),
                  torch.randn(2, 3, 128)[:, :, ::2]]
    lin.weight.requires_grad_(False)  # as converted weights are (a weight that requires grad always folds)
    assert "aten.bmm.default" in _linear_ops(lin, odd_inputs[0])  # what an unhooked layer does with it
    with torch.no_grad():
        want = [lin(x) for x in odd_inputs]
    report = to_semi_structured(nn.ModuleDict({"up": lin}))
    assert report.converted == ["up"]
    for x, y in zip(odd_inputs, want):
        ops = _linear_ops(lin, x)
        assert "aten.mm.default" in ops and "aten.bmm.default" not in ops and "aten.expand.default" not in ops, ops
        with torch.no_grad():
            torch.testing.assert_close(lin(x), y)  # mm and bmm may round differently
    to_semi_structured(nn.ModuleDict({"up": lin}))  # converting again does not stack a second hook
    assert len(lin._forward_pre_hooks) == 1


def test_constraints_come_from_torch():
    from sparsegpt_kernels.export import _constraints

    for backend in ("cutlass", "cusparselt"):
        table = _constraints(backend)
        assert torch.float16 in table and torch.bfloat16 in table
        rows, cols = table[torch.float16]
        assert rows >= 8 and cols >= 8


def test_strict_export_failing_late_changes_nothing(monkeypatch):
    """strict=True: a conversion that fails at the last layer, after earlier ones converted, leaves every layer as it
    was (the conversions are staged, then swapped)."""
    from sparsegpt_kernels import export

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)).half()
    prune_24_(model, names=("0", "1", "2"))
    before = [(m.weight, m.weight.detach().clone()) for m in model]
    calls = []

    class FakeSparse:
        @staticmethod
        def from_dense(dense):
            calls.append(dense.shape)
            if len(calls) == 3:
                raise RuntimeError("simulated failure of the third conversion")
            return dense.clone()

    monkeypatch.setattr(export, "semi_structured_support", lambda *a, **k: FAKE)
    monkeypatch.setattr(export, "keep_dense_reason", lambda *a, **k: None)
    monkeypatch.setattr(export, "semi_structured_class", lambda backend: FakeSparse)
    monkeypatch.setattr(export, "_check_conversion", lambda sparse, dense: None)
    with pytest.raises(ExportError, match="2: conversion failed: RuntimeError: simulated failure"):
        to_semi_structured(model, strict=True)
    assert len(calls) == 3
    for m, (param, values) in zip(model, before):
        assert m.weight is param and torch.equal(m.weight, values)
    calls.clear()
    report = to_semi_structured(model, strict=False)  # not strict: the two that convert are swapped, one stays
    assert [lay.converted for lay in report.layers] == [True, True, False]
    assert model[0].weight is not before[0][0] and model[2].weight is before[2][0]
