"""Torch op translations quanta registers with coremltools (``new_ones``, ``diff``): lazily, once,
and numerically right through conversion and the reference runner; transformers 5.x models
(MiniLM with an attention mask, a Llama) convert and verify."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import quanta

ct = pytest.importorskip("coremltools")
pytestmark = pytest.mark.filterwarnings("ignore")


class NewOnesDiff(nn.Module):
    def forward(self, ids):
        flag = ids.new_ones((), dtype=torch.bool) & (ids[:, :1] >= 0)
        steps = torch.diff(ids, prepend=ids[:, :1] - 1, dim=-1)
        twice = torch.diff(ids, n=2, dim=1)
        return steps * flag, twice, ids.new_ones((2, 3)) * ids.shape[1]


def test_translations_are_registered_lazily_not_at_import():
    code = ("import quanta, quanta.plugins.coreml.exporter as e; from quanta.plugins.coreml import torch_ops; "
            "print(torch_ops.registered())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip().splitlines()[-1] == "()"


def test_new_ones_and_diff_convert_and_match_torch(tmp_path):
    from quanta.plugins.coreml import torch_ops

    ids = torch.tensor([[3, 4, 5, 9, 10, 2], [0, 1, 2, 3, 7, 8]])
    path = quanta.export(NewOnesDiff(), tmp_path / "ops.mlpackage", example_inputs=(ids,), allow_float=True)
    assert set(torch_ops.registered()) == {"new_ones", "diff"}
    assert torch_ops.register() == torch_ops.registered()  # once
    figures = quanta.verify(path, NewOnesDiff(), example_inputs=(ids,))
    assert figures["max_abs"] == 0.0, figures


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_transformers_llama_converts_with_flexible_length(tmp_path):
    pytest.importorskip("transformers")
    model = _tiny_llama()
    ids = torch.randint(0, 300, (1, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = quanta.export(model, tmp_path / "llama.mlpackage", example_inputs=inputs, flexible_sequence_length=True,
                         allow_float=True)
    for n in (12, 5, 64):
        ids = torch.randint(0, 300, (1, n))
        figures = quanta.verify(path, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert figures["cosine"] > 0.9999 and figures["max_rel"] < 5e-3, (n, figures)


@pytest.mark.slow
def test_minilm_recipe_gptq_coreml_verify_from_the_cli(tmp_path):
    """MiniLM with input_ids + attention_mask: GPTQ, Core ML export (flexible length), verify."""
    import re
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "examples/recipes/minilm_gptq_int4.yaml"
    out = subprocess.run([sys.executable, "-m", "quanta._cli", "quantize", str(recipe), "-o",
                          str(tmp_path / "m")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    cosine = re.search(r"sentence-embedding cosine to fp32 over 32 sentences: mean (\S+), min (\S+)", out.stdout)
    assert cosine and float(cosine[2]) > 0.99, out.stdout  # benchmarks/results/recipes.txt
    verified = re.search(r"verified .* max_rel (\S+), cosine (\S+)", out.stdout)
    assert verified and float(verified[1]) < 1e-2 and float(verified[2]) > 0.9999, out.stdout
    spec = ct.models.MLModel(str(tmp_path / "m.mlpackage"), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in spec.description.output] == ["last_hidden_state", "pooler_output"]
