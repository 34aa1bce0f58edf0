"""Export of 2:4-pruned linear layers to semi-structured sparse tensors.

On a CPU the export must report no support and leave the model untouched; the decision logic (pattern, shape, dtype,
tied weights) is exercised with a fake "supported" description. The GPU tests run only where CUDA is available.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from sparsegpt_kernels import export
from sparsegpt_kernels.export import (
    ExportError,
    ExportReport,
    LayerExport,
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


FAKE = SemiStructuredSupport(True, "", kernels="cutlass", device="cuda",
                             constraints={torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32)})

#: Why this CPU-only machine has no semi-structured support (the first check after torch's feature check).
NO_CUDA = "semi-structured sparse tensors need a CUDA GPU; device is cpu"


# ----------------------------------------------------------------------------------------------------------------
# Pattern validation: "N kept of every M" along the input dimension
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_validator_accepts_its_own_pattern(n, m):
    W = nm_weight(7, 64, n, m)
    assert validate_nm(W, n, m)
    assert nm_violations(W, n, m) == 0


def test_validator_rejects_dense_and_names_the_group():
    W = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))  # no zeros: every group has 4 non-zeros
    assert not validate_nm(W)
    msg = ("weight is not 2:4 along the input dimension: 20 of 20 groups have more than 2 non-zeros (first: row 0, "
           "columns 0..3 have 4)")
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
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
    msg = ("weight of shape (4, 6) cannot hold an 2:4 pattern along its input dimension (needs 2-D with in_features "
           "a multiple of 4)")
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        validate_nm(torch.zeros(4, 6), raise_error=True)
    with pytest.raises(ValueError, match=f"^{re.escape('N:M needs 0 < N < M (N kept of every M), got 4:4')}$"):
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
    assert P.shape == (4, 8) and torch.equal(P, torch.zeros(4, 8))


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


@pytest.mark.parametrize("shape,dtype,reason", [
    ((64, 128), torch.float32,
     "float32 would run on the sparse kernels in TF32 only; cast the model to float16 or bfloat16 first"),
    ((64, 128), torch.float64, "dtype float64 not supported by cutlass (float16, bfloat16, float32)"),
    ((48, 128), torch.float16, "shape 48x128 (out x in) is not a multiple of 32x64 required by cutlass for float16"),
    ((64, 96), torch.bfloat16, "shape 64x96 (out x in) is not a multiple of 32x64 required by cutlass for bfloat16"),
    ((16, 64), torch.float16, "shape 16x64 (out x in) is not a multiple of 32x64 required by cutlass for float16"),
])
def test_decision_keeps_bad_shapes_and_dtypes_dense(shape, dtype, reason):
    W = nm_weight(*shape, 2, 4, dtype=dtype)
    assert keep_dense_reason(_FakeCuda(W), FAKE) == reason


def test_decision_keeps_non_24_dense():
    W = nm_weight(64, 128, 3, 4, dtype=torch.float16)  # 3 non-zeros in each of the 64 * 32 groups
    assert keep_dense_reason(_FakeCuda(W), FAKE) == ("not 2:4 along the input dimension (2048 of 2048 groups have "
                                                     "more than 2 non-zeros)")


def test_decision_keeps_cpu_weights_dense_even_if_supported():
    W = nm_weight(64, 128, 2, 4, dtype=torch.float16)
    assert keep_dense_reason(W, FAKE) == "weight is on cpu, not on a CUDA device"


def test_decision_unsupported():
    sup = SemiStructuredSupport(False, "no GPU here")
    assert keep_dense_reason(nm_weight(64, 128, 2, 4), sup) == "unsupported: no GPU here"


# ----------------------------------------------------------------------------------------------------------------
# Export on this machine's CPU: no support, nothing changes
# ----------------------------------------------------------------------------------------------------------------
def test_cpu_support_query():
    assert semi_structured_support("cpu") == SemiStructuredSupport(False, NO_CUDA, None, {}, "cpu")
    assert semi_structured_support("cpu", kernels="cutlass") == SemiStructuredSupport(False, NO_CUDA, device="cpu")


def test_kernels_value_is_validated():
    msg = "kernels must be 'auto', 'cusparselt' or 'cutlass', got 'bogus'"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        semi_structured_support("cpu", kernels="bogus")
    model = MLP()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        to_semi_structured(model, kernels="bogus")
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def _fake_cuda_machine(monkeypatch, cusparselt: bool):
    """Make semi_structured_support see a CUDA build with a compute capability 9.0 GPU (and cuSPARSELt or not)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(export, "_cusparselt_available", lambda: cusparselt)


@pytest.mark.parametrize("cusparselt,kernels,want", [
    (True, "auto", "cusparselt"), (False, "auto", "cutlass"), (True, "cutlass", "cutlass"),
    (True, "cusparselt", "cusparselt"), (False, "cusparselt", None),
])
def test_support_query_picks_the_kernels(monkeypatch, cusparselt, kernels, want):
    _fake_cuda_machine(monkeypatch, cusparselt)
    sup = semi_structured_support("cuda", kernels=kernels)
    if want is None:
        assert sup == SemiStructuredSupport(False, "this torch build has no cuSPARSELt", device="cuda")
    else:
        assert sup == SemiStructuredSupport(True, "", want, export._constraints(want), "cuda")


def test_deprecated_backend_keyword_still_works_and_warns(monkeypatch):
    _fake_cuda_machine(monkeypatch, cusparselt=True)
    with pytest.warns(DeprecationWarning, match=re.escape("semi_structured_support(backend=...) is deprecated; use "
                                                          "kernels=...")) as record:
        sup = semi_structured_support("cuda", backend="cutlass")
    assert [w.filename for w in record] == [__file__]  # points at the caller
    assert sup == SemiStructuredSupport(True, "", "cutlass", export._constraints("cutlass"), "cuda")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="^kernels must be 'auto'"):
        semi_structured_support("cuda", backend="bogus")

    seen = []
    monkeypatch.setattr(export, "semi_structured_support",
                        lambda device, kernels: seen.append(kernels) or SemiStructuredSupport(False, "stand-in"))
    with pytest.warns(DeprecationWarning, match=re.escape("to_semi_structured(backend=...) is deprecated; use "
                                                          "kernels=...")) as record:
        report = to_semi_structured(MLP(), backend="cutlass")
    assert [w.filename for w in record] == [__file__]
    assert seen == ["cutlass"] and report.kept_dense == {n: "unsupported: stand-in" for n in ("up", "down", "head")}


def test_deprecated_support_backend_attribute():
    with pytest.warns(DeprecationWarning, match=re.escape("SemiStructuredSupport.backend is deprecated; use "
                                                          "SemiStructuredSupport.kernels")):
        assert FAKE.backend == "cutlass"
    with pytest.raises(AttributeError):
        FAKE.backend = "cusparselt"
    assert FAKE.kernels == "cutlass"


@pytest.mark.parametrize("call", [
    lambda: semi_structured_support("cpu", kernels="cutlass", backend="cutlass"),
    lambda: semi_structured_support("cpu", "auto", backend="cutlass"),  # kernels given by position, at its default
    lambda: to_semi_structured(MLP(), kernels="auto", backend="cutlass"),
])
def test_both_kernels_keywords_raise(call):
    with pytest.raises(TypeError, match=r"^\w+\(\) got both kernels= and its deprecated alias backend=; pass only "
                                        r"kernels=$"):
        call()


def test_report_text():
    layers = [LayerExport("a", (64, 128), "float16", True), LayerExport("b", (40, 96), "float16", False, "why")]
    assert str(ExportReport(FAKE, layers)) == ("semi-structured export (cutlass kernels): 1 of 2 linear layers "
                                               "converted\n  kept dense b: why")
    assert str(ExportReport(SemiStructuredSupport(False, NO_CUDA), layers)) == (
        f"semi-structured export not supported here: {NO_CUDA}; model left dense (2 linear layers)")


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
    assert report.support == SemiStructuredSupport(False, NO_CUDA, device="cpu")
    assert report.kept_dense == {name: f"unsupported: {NO_CUDA}" for name in ("up", "down", "head")}
    assert str(report) == f"semi-structured export not supported here: {NO_CUDA}; model left dense (3 linear layers)"
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and type(v) is torch.Tensor
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # bit-exact


def test_export_on_cpu_strict_raises_before_changing_anything():
    model = MLP()
    prune_24_(model)
    params = list(model.parameters())
    msg = (f"3 selected linear layers cannot be converted: up: unsupported: {NO_CUDA}; down: unsupported: {NO_CUDA}; "
           f"head: unsupported: {NO_CUDA}")
    with pytest.raises(ExportError, match=f"^{re.escape(msg)}$"):
        to_semi_structured(model, strict=True)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_strict_listing_names_the_first_eight():
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(10)))
    listing = "; ".join(f"{i}: unsupported: {NO_CUDA}" for i in range(8))
    msg = f"10 selected linear layers cannot be converted: {listing}; ... (10 in all)"
    with pytest.raises(ExportError, match=f"^{re.escape(msg)}$"):
        to_semi_structured(model, strict=True)


def test_export_layer_selection():
    model = MLP()
    why = f"unsupported: {NO_CUDA}"
    assert to_semi_structured(model, layers=["up", "do*"]).layers == [
        LayerExport("up", (256, 128), "float32", False, why), LayerExport("down", (128, 256), "float32", False, why)]
    assert [x.name for x in to_semi_structured(model, layers="h*").layers] == ["head"]  # one pattern, as a string
    assert to_semi_structured(model, layers=["nothing"]).layers == []


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
    assert report.kept_dense == {"head": "weight is shared with another module (tied weights)"}
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
    not_24 = "not 2:4 along the input dimension (6144 of 6144 groups have more than 2 non-zeros)"  # 96 x 256 / 4
    min_r, min_c = sup.constraints[torch.float16]
    assert report.converted == ["0"]
    assert report.kept_dense == {
        "1": not_24,
        "2": f"shape 40x96 (out x in) is not a multiple of {min_r}x{min_c} required by {sup.kernels} for float16"}
    msg = f"1 selected linear layers cannot be converted: 1: {not_24}"
    with pytest.raises(ExportError, match=f"^{re.escape(msg)}$"):
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
    class FakeSparse:
        @staticmethod
        def from_dense(dense):
            return dense.clone()

    monkeypatch.setattr(export, "semi_structured_support", lambda *a, **k: FAKE)
    monkeypatch.setattr(export, "keep_dense_reason", lambda *a, **k: None)
    monkeypatch.setattr(export, "semi_structured_class", lambda kernels: FakeSparse)
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


def test_constraints_come_from_torch(monkeypatch):
    assert export._constraints("cutlass")[torch.float16] == export._constraints("cutlass")[torch.bfloat16] == (32, 64)
    assert export._constraints("cusparselt")[torch.float16] == (16, 16)

    class Limit:  # the fields of torch's table entries that are read
        sparse_min_rows, sparse_min_cols = 48, 80

    class WithTable:
        _DTYPE_SHAPE_CONSTRAINTS = {torch.float16: Limit()}

    monkeypatch.setattr(export, "semi_structured_class", lambda kernels: WithTable)
    assert export._constraints("cutlass") == {torch.float16: (48, 80)}
    monkeypatch.setattr(export, "semi_structured_class", lambda kernels: None)  # a torch without the table: ours
    table, ours = export._constraints("cusparselt"), export._FALLBACK_CONSTRAINTS["cusparselt"]
    assert table == ours and table is not ours  # a copy: callers may change it


def test_strict_export_failing_late_changes_nothing(monkeypatch):
    """strict=True: a conversion that fails at the last layer, after earlier ones converted, leaves every layer as it
    was (the conversions are staged, then swapped)."""
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
    monkeypatch.setattr(export, "semi_structured_class", lambda kernels: FakeSparse)
    monkeypatch.setattr(export, "_check_conversion", lambda sparse, dense: None)
    msg = "2: conversion failed: RuntimeError: simulated failure of the third conversion; no layer was converted"
    with pytest.raises(ExportError, match=f"^{re.escape(msg)}$"):
        to_semi_structured(model, strict=True)
    assert len(calls) == 3
    for m, (param, values) in zip(model, before):
        assert m.weight is param and torch.equal(m.weight, values)
    calls.clear()
    report = to_semi_structured(model, strict=False)  # not strict: the two that convert are swapped, one stays
    assert report.layers == [LayerExport("0", (64, 64), "float16", True), LayerExport("1", (64, 64), "float16", True),
                             LayerExport("2", (64, 64), "float16", False,
                                         "conversion failed: RuntimeError: simulated failure of the third conversion")]
    for m, (param, values) in zip(model[:2], before):
        assert m.weight is not param and not m.weight.requires_grad and torch.equal(m.weight, values)
    assert model[2].weight is before[2][0]
