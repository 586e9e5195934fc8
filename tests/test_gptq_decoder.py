"""GPTQ on a transformers 5.x decoder: every block gets the attention mask, position ids and rotary
position embeddings the model gives it, and a key-value cache is never shared between block calls."""

from __future__ import annotations

import pytest
import torch

import quanta

transformers = pytest.importorskip("transformers")

RECIPE = {"algorithm": "gptq", "calibration_nsamples": 8,
          "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 128},
          "module_type_configs": {"Embedding": None}}


def _llama(use_cache):
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, use_cache=use_cache)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        ids = torch.randint(2, 200, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_blocks_receive_mask_and_rotary_embeddings():
    model = _llama(use_cache=False)
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(sorted(k for k, v in kwargs.items() if v is not None)), with_kwargs=True)
    try:
        quanta.quantize(model, RECIPE, data=_data(), inplace=True)
    finally:
        handle.remove()
    assert seen and all({"attention_mask", "position_embeddings", "position_ids"} <= set(k) for k in seen), seen


def test_a_key_value_cache_does_not_leak_between_block_calls():
    with_cache = quanta.quantize(_llama(use_cache=True), RECIPE, data=_data())
    without = quanta.quantize(_llama(use_cache=False), RECIPE, data=_data())
    a, b = quanta.records(with_cache), quanta.records(without)
    assert a.keys() == b.keys() and len(a) == 15  # 7 Linear per layer + lm_head
    for name in a:
        assert torch.equal(a[name].codes, b[name].codes), name
