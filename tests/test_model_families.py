"""prune_model on tiny randomly initialised models of every supported family (built from configs; token ids only)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsegpt_kernels.model import find_prunable_layers, prune_model  # noqa: E402
from sparsegpt_kernels.model.blocks import find_decoder_layers  # noqa: E402

VOCAB = 96
H = 64


def _cfg(name):
    t = transformers
    common = dict(vocab_size=VOCAB)
    if name == "opt":
        return t.OPTConfig(hidden_size=H, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=H, **common), t.OPTForCausalLM
    llama_like = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if name == "llama":
        return t.LlamaConfig(**llama_like), t.LlamaForCausalLM
    if name == "mistral":
        return t.MistralConfig(**llama_like), t.MistralForCausalLM
    if name == "qwen2":
        return t.Qwen2Config(**llama_like), t.Qwen2ForCausalLM
    if name == "qwen3":
        return t.Qwen3Config(head_dim=16, **llama_like), t.Qwen3ForCausalLM
    if name == "gemma3":
        return t.Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                  **llama_like), t.Gemma3ForCausalLM
    if name == "gpt2":
        return t.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=128, **common), t.GPT2LMHeadModel
    if name == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=128, **common), t.GPTNeoXForCausalLM
    if name == "bloom":
        return t.BloomConfig(hidden_size=H, n_layer=2, n_head=4, **common), t.BloomForCausalLM
    if name == "phi":
        return t.PhiConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, **common), t.PhiForCausalLM
    if name == "falcon":
        return t.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **common), \
            t.FalconForCausalLM
    if name == "falcon_alibi":
        return t.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                              new_decoder_architecture=True, num_kv_heads=2, **common), t.FalconForCausalLM
    if name == "mixtral":
        return t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like), t.MixtralForCausalLM
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, **llama_like), t.Qwen2MoeForCausalLM
    raise KeyError(name)


FAMILIES = ["opt", "llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2", "gpt_neox", "bloom", "phi", "falcon",
            "falcon_alibi", "mixtral", "qwen2_moe"]


def tiny(name, seed=0):
    cfg, cls = _cfg(name)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def _zero_groups_ok(W: torch.Tensor, n: int, m: int) -> bool:
    groups = (W == 0).reshape(W.shape[0], -1, m).sum(-1)
    return bool((groups >= m - n).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_and_reloads(family, tmp_path):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    report = prune_model(model, ids, pattern="2:4", device="cpu")

    prefix, layers = find_decoder_layers(model)
    expected = {f"{prefix}.{b}.{t.name}" for b in range(len(layers)) for t in find_prunable_layers(layers[b])}
    assert {r.name for r in report.layers} == expected
    pruned = 0
    for b, block in enumerate(layers):
        for t in find_prunable_layers(block):
            rep = next(r for r in report.layers if r.name == f"{prefix}.{b}.{t.name}")
            if rep.skipped:  # an expert no calibration token was routed to stays dense, and is reported
                assert t.expert is not None
                continue
            assert _zero_groups_ok(t.weight(), 2, 4), rep.name
            assert rep.sparsity >= 0.5
            pruned += 1
    assert pruned > 0

    test_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(test_ids).logits
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits2 = again(test_ids).logits
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_family_unstructured(family):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    report = prune_model(model, ids, sparsity=0.5, device="cpu", true_sequential=True)
    for r in report.layers:
        if not r.skipped:
            assert abs(r.sparsity - 0.5) < 0.02, r


def test_moe_expert_without_tokens_is_reported():
    model = tiny("mixtral")
    prefix, layers = find_decoder_layers(model)
    # route every token to experts 0 and 1 only: experts 2 and 3 of block 0 see nothing
    router = layers[0].mlp.gate
    real = router.forward

    def only_first_two(hidden):
        logits, weights, index = real(hidden)
        forced = torch.tensor([0, 1]).expand_as(index)
        return logits, torch.full_like(weights, 0.5), forced

    router.forward = only_first_two
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    report = prune_model(model, ids, sparsity=0.5, blocks=[0], device="cpu")
    skipped = {r.name for r in report.layers if r.skipped}
    assert skipped, "experts that saw no token must be reported"
    for r in report.layers:
        if r.skipped:
            assert r.tokens == 0 and ".experts." in r.name
