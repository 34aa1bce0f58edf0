"""HessianAccumulator: running mean, batching invariance, devices, errors."""

import pytest
import torch

import sparsegpt_kernels as sk


def test_running_mean_equals_batch_formula():
    X = torch.randn(3, 50, 16, dtype=torch.float64)
    acc = sk.HessianAccumulator(16, dtype=torch.float64)
    for b in X:
        acc.update(b)
    flat = X.reshape(-1, 16)
    assert acc.count == 150
    assert torch.allclose(acc.hessian, 2 / 150 * flat.T @ flat, rtol=1e-12)


def test_batching_invariance_and_shapes():
    X = torch.randn(4, 7, 24)
    a, b = sk.HessianAccumulator(24), sk.HessianAccumulator(24)
    a.update(X)
    for i in range(4):
        for j in range(7):
            b.update(X[i, j])
    assert torch.allclose(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)
    assert a.hessian.shape == (24, 24) and a.hessian.dtype == torch.float32


def test_low_precision_inputs_accumulate_in_float32():
    x = torch.randn(64, 8).to(torch.bfloat16)
    acc = sk.HessianAccumulator(8)
    acc.update(x)
    ref = 2 / 64 * x.float().T @ x.float()
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian, ref, rtol=1e-5, atol=1e-6)


def test_device_lazy_and_reset():
    acc = sk.HessianAccumulator(4)
    assert acc.device is None
    acc.update(torch.randn(3, 4))
    assert acc.device == torch.device("cpu")
    acc.reset()
    assert acc.count == 0 and float(acc.hessian.abs().sum()) == 0
    acc.update(torch.empty(0, 4))
    assert acc.count == 0


@pytest.mark.parametrize(
    "x,exc,msg",
    [
        (torch.randn(3, 5), ValueError, r"\(\.\.\., 4\)"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "floating"),
        (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), ValueError, "NaN"),
        ("x", TypeError, "tensor"),
    ],
)
def test_bad_updates(x, exc, msg):
    acc = sk.HessianAccumulator(4)
    acc.update(torch.randn(2, 4))
    before = acc.hessian.clone()
    with pytest.raises(exc, match=msg):
        acc.update(x)
    assert torch.equal(acc.hessian, before) and acc.count == 2


@pytest.mark.parametrize("kw", [dict(in_features=0), dict(in_features=4, dtype=torch.float16)])
def test_bad_construction(kw):
    with pytest.raises(ValueError):
        sk.HessianAccumulator(**kw)


@pytest.mark.parametrize("cols", [511, 512, 777])
def test_the_symmetric_update_is_the_full_product_exactly_symmetric(cols, monkeypatch):
    """From 2 tiles wide on only the upper triangle is accumulated (row tiles); the Hessian read is the full product
    to float32 rounding and exactly symmetric, also after further updates and a reset."""
    from sparsegpt_kernels import hessian

    monkeypatch.setattr(hessian, "SYMMETRIC_MIN_COLS", 512)  # the tiled path at test sizes
    tiled = cols >= 2 * hessian.SYMMETRIC_TILE  # 511: one full product (symmetric to rounding only)
    X = torch.randn(3, 40, cols, dtype=torch.float64)
    acc = sk.HessianAccumulator(cols)
    for i, b in enumerate(X):
        acc.update(b.float())
        H = acc.hessian
        flat = X[: i + 1].reshape(-1, cols)
        ref = 2 / flat.shape[0] * flat.T @ flat
        if tiled:
            assert torch.equal(H, H.T)
        assert float((H.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    acc.reset()
    acc.update(X[0].float())
    ref = 2 / 40 * X[0].T @ X[0]
    assert float((acc.hessian.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_the_deferred_check_takes_no_batch_apart_and_names_the_layers():
    """check_each=False: bad batches are added without a host synchronisation and check_finite raises afterwards;
    the pipeline's collector checks once after the block's pass, naming the layers that share the input."""
    from torch import nn

    from sparsegpt_kernels.model.blocks import find_prunable_layers
    from sparsegpt_kernels.model.hessian_hooks import HessianCollector

    acc = sk.HessianAccumulator(4, check_each=False)
    acc.update(torch.randn(3, 4))
    acc.check_finite()
    acc.update(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    assert acc.count == 4
    with pytest.raises(ValueError, match="layer x: the inputs contain NaN or Inf"):
        acc.check_finite("layer x")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    block = Block()
    targets = find_prunable_layers(block)
    with HessianCollector(targets, torch.device("cpu")) as col:
        block(torch.randn(5, 8))
    assert {"a", "b", "c"} <= set(col.acc)
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the inputs of a, b: the inputs contain NaN"):
        with HessianCollector(targets, torch.device("cpu")):
            block(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_input_products_are_the_float32_path_off_cuda(dtype):
    """products="input" multiplies bfloat16 / float16 inputs as they are only on a CUDA device (tests/test_model_gpu.py
    checks that path against float64); on the CPU, and for float32 inputs anywhere, it is the float32 path bit for
    bit, one full product and the tiled triangle alike."""
    for cols in (40, 600):
        x = torch.randn(3, 64, cols).to(dtype)
        a, b = sk.HessianAccumulator(cols), sk.HessianAccumulator(cols, products="input")
        for xb in x:
            a.update(xb)
            b.update(xb)
        assert not b.uses_input_products(x[0]) and b.products == "input"
        assert torch.equal(a.hessian, b.hessian)


def test_hessian_products_option_is_checked_recorded_and_a_flag():
    from sparsegpt_kernels import cli
    from sparsegpt_kernels.options import PruneOptions

    with pytest.raises(ValueError, match="products must be one of float32, input, got 'bf16'"):
        sk.HessianAccumulator(8, products="bf16")
    with pytest.raises(ValueError, match="hessian_products must be one of float32, input, got 'tf32'"):
        PruneOptions(hessian_products="tf32")
    plain = PruneOptions(sparsity=0.5).record()
    assert "hessian_products" not in plain  # the default keeps the fingerprints of earlier runs
    assert PruneOptions(sparsity=0.5, hessian_products="input").record() == {**plain, "hessian_products": "input"}
    args = cli.build_parser().parse_args(["prune", "--hessian-products", "input"])
    assert cli._options(args).hessian_products == "input" and cli._prune_kwargs(args)["hessian_products"] == "input"
    assert cli.build_parser().parse_args(["prune"]).hessian_products == "float32"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "--hessian-products", "tf32"])


def test_prune_model_records_and_passes_the_hessian_products():
    """On the CPU the option changes nothing but the report's settings: the same weights as the default."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    models, reports = [], []
    for products in ("float32", "input"):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg).eval()
        reports.append(sk.prune_model(m, ids, sparsity=0.5, device="cpu", hessian_products=products))
        models.append(m)
    assert reports[1].settings["hessian_products"] == "input" and "hessian_products" not in reports[0].settings
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
