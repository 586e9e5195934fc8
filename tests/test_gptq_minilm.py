"""GPTQ on the real all-MiniLM-L6-v2 beats round-to-nearest on real English text (slow)."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.examples import corpus_sentences, load_example, mean_pool

pytestmark = pytest.mark.slow


def _embed(model, batches):
    with torch.no_grad():
        return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def test_gptq_beats_rtn_on_minilm_embeddings():
    from transformers import AutoTokenizer

    from quanta.examples import minilm_path

    example = load_example("minilm")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    sents = corpus_sentences()
    calib = [dict(tok(sents[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 64, 8)]
    evals = [dict(tok(sents[i:i + 32], padding=True, return_tensors="pt")) for i in range(64, 128, 32)]
    ref = _embed(example.model, evals)
    spec = {"dtype": "uint4", "granularity": "per_block", "block_size": 128}
    rtn = quanta.quantize(example.model, {"global_config": spec, "module_type_configs": {"Embedding": None}})
    gptq = quanta.quantize(example.model, {"algorithm": "gptq", "global_config": spec, "calibration_nsamples": 64,
                                           "module_type_configs": {"Embedding": None}}, data=calib)
    cos_rtn = float((ref * _embed(rtn, evals)).sum(-1).mean())
    cos_gptq = float((ref * _embed(gptq, evals)).sum(-1).mean())
    print(f"MiniLM uint4 per-block-128 embedding cosine: RTN {cos_rtn:.4f}, GPTQ {cos_gptq:.4f}")
    assert cos_gptq > cos_rtn + 0.02, (cos_rtn, cos_gptq)
    assert gptq.quanta_report.stats["gptq_blocks"] == 6
