"""The whole-model pipeline on a CUDA device (tiny random LLaMA): every GPU backend prunes exactly what was asked, the
result agrees with the torch backend on the CPU apart from near-ties, and the model ends where it started (a model
on the CPU is moved one block at a time; a model on the GPU stays there).

Skipped only when torch.cuda.is_available() is False. Run by benchmarks/gpu_check.sh B (the cuda backend needs the
extension's CUDA part, which that phase builds).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exact_sparsity

transformers = pytest.importorskip("transformers")

from sparsegpt_kernels.backends import extension as _ext  # noqa: E402
from sparsegpt_kernels.model import prune_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VOCAB = 96
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _weights(model):
    return {f"{i}.{n}": blk.get_submodule(n).weight.detach().float().cpu()
            for i, blk in enumerate(model.model.layers) for n in LINEARS}


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "torch"])
@pytest.mark.parametrize("where", ["model_on_cpu", "model_on_gpu"])
def test_prune_model_on_cuda(kw, backend, where):
    if backend == "cuda":
        assert _ext.missing_reason() is None and _ext.has_cuda(), "the cuda backend needs the extension's CUDA part"
    ids = torch.randint(0, VOCAB, (8, 48), generator=torch.Generator().manual_seed(1))
    ref = _tiny_llama()
    prune_model(ref, ids, device="cpu", backend="torch", **kw)
    model = _tiny_llama()
    if where == "model_on_gpu":
        model = model.cuda()
    report = prune_model(model, ids, device="cuda", backend=backend, **kw)

    want_dev = "cuda" if where == "model_on_gpu" else "cpu"
    assert {p.device.type for p in model.parameters()} == {want_dev}
    assert len(report.layers) == 2 * len(LINEARS) and all(lay.skipped is None for lay in report.layers)
    used = {lay.backend for lay in report.layers}
    # "auto" on CUDA tensors: the cuda backend where the extension has its CUDA part, else Triton (never cpp)
    auto = "cuda" if _ext.missing_reason() is None and _ext.has_cuda() else "triton"
    assert used == {auto if backend == "auto" else backend}
    got, want = _weights(model), _weights(ref)
    mismatch = 0.0
    for name, W in got.items():
        assert torch.isfinite(W).all(), name
        assert_exact_sparsity(W, block_size=128, pattern=kw.get("pattern"))
        mismatch = max(mismatch, float(((W == 0) != (want[name] == 0)).float().mean()))
    # GPU forward passes round differently from the CPU's, so the Hessians (and near-tied decisions) differ a little
    assert mismatch <= 0.02, mismatch
    with torch.no_grad():
        x = ids[:2].to(want_dev)
        logits, logits_ref = model(x).logits.float().cpu(), ref(ids[:2]).logits.float()
    assert (logits - logits_ref).abs().max() <= 0.05 * logits_ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [384, 1536])
def test_input_products_on_tensor_cores_are_within_float32_of_a_float64_hessian(dtype, cols):
    """products="input": bfloat16 / float16 activations multiplied on the tensor cores, summed in float32 (one full
    product at 384 columns, the tiled upper triangle at 1536): every entry within the float32 summation bound of the
    float64 Hessian of the same inputs, as the float32 path is; the tiled one exactly symmetric."""
    from sparsegpt_kernels import HessianAccumulator

    g = torch.Generator(device="cuda").manual_seed(cols)
    scale = torch.rand(cols, device="cuda", generator=g) * 4  # uneven column scales, as activations have
    x = (torch.randn(4, 512, cols, device="cuda", generator=g) * scale).to(dtype)
    fast, plain = HessianAccumulator(cols, products="input"), HessianAccumulator(cols)
    for b in x:
        fast.update(b)
        plain.update(b)
    assert fast.uses_input_products(x[0]) and not plain.uses_input_products(x[0])
    flat = x.reshape(-1, cols).double()
    n = flat.shape[0]
    ref = 2 / n * flat.T @ flat
    bound = 4 * n * 2.0**-24 * (2 / n * flat.abs().T @ flat.abs()) + 1e-30
    for H in (fast.hessian, plain.hessian):
        assert H.dtype == torch.float32 and bool(((H.double() - ref).abs() <= bound).all())
    if cols >= 512:
        assert torch.equal(fast.hessian, fast.hessian.T)


def test_prune_model_with_input_products_on_cuda():
    """The whole pipeline in bfloat16 on the GPU with hessian_products="input": exact sparsity, the setting in the
    report, and per-layer losses within a few percent of the float32 products' (same products, other sums)."""
    ids = torch.randint(0, VOCAB, (8, 48), generator=torch.Generator().manual_seed(1))
    losses = {}
    for products in ("float32", "input"):
        model = _tiny_llama().to("cuda", torch.bfloat16)
        report = prune_model(model, ids, device="cuda", sparsity=0.5, hessian_products=products)
        assert all(lay.skipped is None for lay in report.layers)
        for W in _weights(model).values():
            assert_exact_sparsity(W, block_size=128, sparsity=0.5)
        losses[products] = [lay.loss for lay in report.layers]
        assert report.settings.get("hessian_products", "float32") == products
    for a, b in zip(losses["float32"], losses["input"]):
        assert abs(a - b) <= 0.05 * abs(a) + 1e-6
