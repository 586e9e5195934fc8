"""``quanta.load`` rebuilds a transformers model without random init (parameters on the meta
device, filled from the file), and falls back to a normal build when the file lacks a parameter."""

from __future__ import annotations

import torch

import quanta

transformers = __import__("pytest").importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


RECIPE = {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
          "module_type_configs": {"Embedding": None}}


def test_rebuild_draws_no_random_numbers_and_computes_the_same(tmp_path):
    qmodel = quanta.quantize(_llama(), RECIPE)
    out = quanta.save(qmodel, tmp_path / "m")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loaded = quanta.load(out)
    assert torch.equal(torch.get_rng_state(), state)  # no random init ran
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(qmodel(x).logits, loaded(x).logits)  # rotary buffers (not saved) computed as usual


def test_rebuild_with_a_tensor_missing_and_strict_false_keeps_its_init(tmp_path):
    from safetensors.torch import load_file, save_file

    qmodel = quanta.quantize(_llama(), RECIPE)
    out = quanta.save(qmodel, tmp_path / "m")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    loaded = quanta.load(out, strict=False)
    assert torch.equal(loaded.model.norm.weight, torch.ones(64))  # the class's own init, not stale memory
    assert not any(p.is_meta for p in loaded.parameters())
