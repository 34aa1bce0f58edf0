"""prune_model against prune_layer by hand, shared Hessians, options, resume and bad input (tiny LLaMA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import sparsegpt_kernels as sk  # noqa: E402
from sparsegpt_kernels.model import NoDecoderBlocksError, prune_model  # noqa: E402

VOCAB = 96


def tiny_llama(layers=3, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=4, L=32, seed=1):
    return torch.randint(0, VOCAB, (n, L), generator=torch.Generator().manual_seed(seed))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_block0_equals_prune_layer_by_hand():
    ids = calib()
    model = tiny_llama()
    ref = tiny_llama()
    # capture block 0's inputs by hand with a hook and build each layer's Hessian from them
    block = ref.model.layers[0]
    inputs = {}

    def keep(name):
        def hook(mod, args):
            inputs.setdefault(name, []).append(args[0].detach().clone())
        return hook

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    handles = [block.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        for s in range(ids.shape[0]):
            ref(ids[s : s + 1])
    for h in handles:
        h.remove()
    for n in names:
        acc = sk.HessianAccumulator(block.get_submodule(n).in_features)
        for x in inputs[n]:
            acc.update(x)
        sk.prune_layer(block.get_submodule(n), acc, sparsity=0.5, backend="torch")

    prune_model(model, ids, sparsity=0.5, blocks=[0], device="cpu", backend="torch")
    for n in names:
        torch.testing.assert_close(model.model.layers[0].get_submodule(n).weight,
                                   block.get_submodule(n).weight, rtol=0, atol=0)


def test_shared_hessian_matches_separate():
    """q/k/v (and gate/up) share one Hessian in the pipeline; separate accumulators give the same weights."""
    ids = calib()
    shared = tiny_llama()
    prune_model(shared, ids, sparsity=0.5, device="cpu", backend="torch")

    separate = tiny_llama()
    # forgetting which tensors were seen makes every layer accumulate its own Hessian from the same inputs
    from sparsegpt_kernels.model.hessian_hooks import HessianCollector

    real = HessianCollector._linear_hook

    def no_sharing(self, module, args):
        self._seen.clear()
        return real(self, module, args)

    HessianCollector._linear_hook = no_sharing
    try:
        prune_model(separate, ids, sparsity=0.5, device="cpu", backend="torch")
    finally:
        HessianCollector._linear_hook = real
    for (k, a), b in zip(weights(shared).items(), weights(separate).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_options_blocks_include_exclude_overrides():
    ids = calib()
    model = tiny_llama()
    report = prune_model(model, ids, sparsity=0.5, blocks=[1], exclude=["*o_proj"],
                         layer_sparsity={"mlp.down_proj": "2:4", "*q_proj": 0.25}, device="cpu")
    names = {r.name: r for r in report.layers}
    assert all(".layers.1." in n for n in names)
    assert not any(n.endswith("o_proj") for n in names)
    assert abs(names["model.layers.1.self_attn.q_proj"].sparsity - 0.25) < 1e-6
    assert names["model.layers.1.mlp.down_proj"].pattern == "2:4"
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.0
    assert float((model.model.layers[1].self_attn.o_proj.weight == 0).float().mean()) == 0.0
    d = report.to_dict()
    assert d["totals"]["layers"] == len(report.layers) and "loss" in d["totals"]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_baselines(method):
    model = tiny_llama()
    report = prune_model(model, None if method == "magnitude" else calib(), pattern="2:4", method=method,
                         device="cpu")
    for r in report.layers:
        assert r.sparsity == pytest.approx(0.5)
        assert r.backend == method


def test_true_sequential_and_quant():
    model = tiny_llama()
    report = prune_model(model, calib(), sparsity=0.5, quant_bits=4, true_sequential=True, device="cpu")
    assert all(r.sparsity >= 0.5 and r.quant_bits == 4 for r in report.layers)  # rounding may add zeros
    with torch.no_grad():
        assert torch.isfinite(model(calib(1, 16)).logits).all()


class _Boom(Exception):
    pass


def test_prune_model_frees_the_cpu_cache(monkeypatch):
    """prune_model hands the cpp backend's cached buffers back when it returns, and when a run fails midway."""
    from sparsegpt_kernels.model import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "release_cpu_cache", lambda: calls.append(1) or 0)
    prune_model(tiny_llama(layers=1), calib(), sparsity=0.5, device="cpu")
    assert calls == [1]

    def die(*_):
        raise _Boom

    with pytest.raises(_Boom):
        prune_model(tiny_llama(layers=2), calib(), sparsity=0.5, device="cpu", on_block_end=die)
    assert calls == [1, 1]


@pytest.mark.parametrize("kill_after", [0, 1])
def test_resume_is_bit_exact(tmp_path, kill_after):
    ids = calib()
    full = tiny_llama()
    prune_model(full, ids, sparsity=0.5, device="cpu")

    ck = tmp_path / "ck"
    first = tiny_llama()

    def die(b, _reports):
        if b == kill_after:
            raise _Boom

    with pytest.raises(_Boom):
        prune_model(first, ids, sparsity=0.5, device="cpu", checkpoint_dir=ck, on_block_end=die)
    restarted = tiny_llama()  # the user reloads the dense model and runs the same command again
    report = prune_model(restarted, ids, sparsity=0.5, device="cpu", checkpoint_dir=ck)
    assert report.resumed_from_block == kill_after + 1
    assert len(report.layers) == 3 * 7
    for (k, a), b in zip(weights(full).items(), weights(restarted).values()):
        assert torch.equal(a, b), k
    # other settings cannot reuse the directory
    with pytest.raises(ValueError, match="other settings"):
        prune_model(tiny_llama(), ids, sparsity=0.6, device="cpu", checkpoint_dir=ck)


def _assert_untouched(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_input_leaves_model_untouched():
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(NoDecoderBlocksError):
        prune_model(nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)), calib())
    with pytest.raises(ValueError, match="empty"):
        prune_model(model, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        prune_model(model, [])
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        prune_model(model, calib(2, 65))
    with pytest.raises(ValueError, match="not a multiple of M=3"):
        prune_model(model, calib(), pattern="1:3")
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        prune_model(model, torch.full((2, 8), 500))
    with pytest.raises(ValueError, match="method"):
        prune_model(model, calib(), method="obs")
    with pytest.raises(ValueError, match="out of range"):
        prune_model(model, calib(), blocks=[7])
    with pytest.raises(ValueError, match="include pattern 'no_such_layer' matches no layer"):
        prune_model(model, calib(), include=["no_such_layer"])
    with pytest.raises(ValueError, match="exclude pattern 'q_projj' matches no layer.*model.layers.0"):
        prune_model(model, calib(), exclude=["q_projj"])
    with pytest.raises(ValueError, match="layer_sparsity pattern '\\*gate' matches no layer"):
        prune_model(model, calib(), layer_sparsity={"*gate": 0.3})
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_model(model, calib(), include=["q_proj"], exclude=["self_attn.q_proj"])
    _assert_untouched(model, before)


def test_bare_layer_names_match_as_dotted_suffixes():
    """--exclude q_proj (no wildcard) keeps every q_proj dense; "mlp.up_proj" and the full name work the same way,
    and a bare name never matches inside a component ("proj" is not "q_proj")."""
    from sparsegpt_kernels.model.plan import matches

    full, rel = "model.layers.3.self_attn.q_proj", "self_attn.q_proj"
    for p in ("q_proj", "self_attn.q_proj", "3.self_attn.q_proj", full, "*q_proj", "self_attn.*"):
        assert matches([p], full, rel), p
    for p in ("proj", "_proj", "attn.q_proj", "layers.3", "k_proj"):
        assert not matches([p], full, rel), p
    model = tiny_llama()
    report = prune_model(model, calib(), sparsity=0.5, exclude=["q_proj"], device="cpu")
    assert report.layers and not any(r.name.endswith("q_proj") for r in report.layers)
    assert all(float((layer.self_attn.q_proj.weight == 0).float().mean()) == 0 for layer in model.model.layers)


def test_text_calibration_errors():
    from sparsegpt_kernels.model.data import calibration_windows, eval_windows

    with pytest.raises(ValueError, match="too short"):
        calibration_windows(torch.arange(10), 4, 16)
    with pytest.raises(ValueError, match="too short"):
        eval_windows(torch.arange(10), 16)
    model = tiny_llama()
    before = weights(model)

    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    with pytest.raises(ValueError, match="empty"):
        prune_model(model, "   ", tokenizer=Tok(), nsamples=2, seqlen=8)
    with pytest.raises(ValueError, match="too short"):
        prune_model(model, "a short text", tokenizer=Tok(), nsamples=2, seqlen=32)
    with pytest.raises(ValueError, match="tokenizer"):
        prune_model(model, "some text")
    _assert_untouched(model, before)
    report = prune_model(model, "some words " * 40, tokenizer=Tok(), nsamples=2, seqlen=32, blocks=[0])
    assert report.settings["nsamples"] == 2 and report.settings["seqlen"] == 32


def test_baseline_reports_have_no_loss_and_strict_json(tmp_path):
    import json

    model = tiny_llama()
    report = prune_model(model, None, method="magnitude", sparsity=0.5, device="cpu")
    assert all(r.loss is None for r in report.layers) and report.total_loss is None
    assert all(r.mask_sparsity == pytest.approx(0.5, abs=1e-3) for r in report.layers)
    path = tmp_path / "report.json"
    report.save_json(path)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["totals"]["loss"] is None and all(r["loss"] is None for r in data["layers"])
    assert "total loss -" in report.format_table()


def test_quantized_layers_report_mask_and_zeros_separately():
    """With 3-bit joint quantization some kept weights round to 0: zeros exceed what the mask pruned."""
    model = tiny_llama()
    report = prune_model(model, calib(), sparsity=0.5, quant_bits=3, device="cpu")
    for r in report.layers:
        assert r.mask_sparsity == pytest.approx(0.5, abs=1e-3) and r.sparsity >= r.mask_sparsity
    assert report.sparsity > report.mask_sparsity


def test_report_splits_the_time(tmp_path, monkeypatch):
    """Every second of the run is in one phase: forward passes, Hessian updates, solves, the rest; JSON and table."""
    import json
    import time as _time

    from sparsegpt_kernels.model import prune_block as pb
    from sparsegpt_kernels.model.timing import PHASES

    real = pb.prune_one

    def slow_solve(*a, **k):  # a known amount of solve time per layer
        _time.sleep(0.02)
        return real(*a, **k)

    monkeypatch.setattr(pb, "prune_one", slow_solve)
    model = tiny_llama(layers=2)
    report = prune_model(model, calib(), sparsity=0.5, device="cpu")
    t = report.timings
    assert set(t) == {*PHASES, "total"} and all(v >= 0 for v in t.values())
    assert sum(v for k, v in t.items() if k != "total") == pytest.approx(t["total"], rel=1e-6)
    assert t["total"] == pytest.approx(report.seconds, rel=0.05, abs=0.05)
    assert t["solves"] >= 0.02 * len(report.layers)  # the sleeps land in "solves", not elsewhere
    assert t["forward"] > 0 and t["hessians"] > 0 and t["calibration"] < 0.1 and t["allocation"] == 0
    path = tmp_path / "report.json"
    report.save_json(path)
    assert json.loads(path.read_text())["timings"] == pytest.approx(t)
    assert report.format_table().splitlines()[-1].startswith("time: forward")

    # a text calibration is tokenized inside the run: that is its own phase
    tok = type("Tok", (), {"__call__": lambda self, text, **k: {"input_ids": list(range(1, 90)) * 50}})()
    report = prune_model(tiny_llama(layers=1), "some text", tokenizer=tok, nsamples=2, seqlen=16, device="cpu")
    assert report.timings["calibration"] > 0


def test_a_layer_whose_inputs_are_all_zero_is_left_dense_and_reported():
    """An all-zero Hessian (every input of the layer was 0) would make every column dead and zero the whole weight:
    prune_model leaves such a layer as it is and says why; the other layers are pruned as usual."""
    model = tiny_llama(layers=1)
    down = model.model.layers[0].mlp.down_proj
    before = down.weight.detach().clone()
    handle = down.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    try:
        report = prune_model(model, calib(), sparsity=0.5, device="cpu", backend="torch")
    finally:
        handle.remove()
    rep = {r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]: r for r in report.layers}
    assert rep["mlp.down_proj"].skipped == "every calibration input of this layer was zero"
    assert rep["mlp.down_proj"].loss is None and rep["mlp.down_proj"].tokens == 4 * 32
    assert torch.equal(down.weight, before)
    others = [r for r in report.layers if r.name != rep["mlp.down_proj"].name]
    assert len(others) == 6 and all(r.skipped is None and abs(r.sparsity - 0.5) < 1e-6 for r in others)


def test_resume_with_refinement_is_bit_exact_and_refine_is_part_of_the_settings(tmp_path):
    ids = calib()
    full = tiny_llama()
    prune_model(full, ids, sparsity=0.7, refine="admm", device="cpu")
    ck = tmp_path / "ck"

    def die(b, _reports):
        if b == 0:
            raise _Boom

    with pytest.raises(_Boom):
        prune_model(tiny_llama(), ids, sparsity=0.7, refine="admm", device="cpu", checkpoint_dir=ck, on_block_end=die)
    restarted = tiny_llama()
    report = prune_model(restarted, ids, sparsity=0.7, refine="admm", device="cpu", checkpoint_dir=ck)
    assert report.resumed_from_block == 1
    for (k, a), b in zip(weights(full).items(), weights(restarted).values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="other settings"):  # the refinement is part of what was done
        prune_model(tiny_llama(), ids, sparsity=0.7, device="cpu", checkpoint_dir=ck)
