"""Issue 9, step 1: Core ML inputs keep their types (token ids -> INT32, dict inputs by name),
a flexible sequence length, and ``quanta.verify`` feeding each input with its own dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quanta

ct = pytest.importorskip("coremltools")

pytestmark = pytest.mark.filterwarnings("ignore")


class TokenModel(nn.Module):
    """The README's shape: Embedding -> Linear -> lm_head, token ids in, logits out."""

    def __init__(self, vocab=96, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        return self.lm_head(torch.relu(self.fc(self.embed(input_ids))))


class MaskedModel(TokenModel):
    """Keyword inputs: mean over unmasked tokens, as a sentence encoder does."""

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.fc(self.embed(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"pooled": (h * m).sum(1) / m.sum(1), "logits": self.lm_head(h)}


def _quantized(model):
    torch.manual_seed(0)
    return quanta.quantize(model, {"algorithm": "rtn",
                                   "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
                                   "module_type_configs": {"Embedding": None},
                                   "module_name_configs": {"lm_head": {"dtype": "int8"}}})


def _input_types(path):
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return {i.name: (ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(i.type.multiArrayType.dataType),
                     i.type.multiArrayType) for i in spec.description.input}


def test_token_ids_export_as_int32_and_verify(tmp_path):
    torch.manual_seed(0)
    q = _quantized(TokenModel().eval())
    x = torch.randint(0, 96, (2, 12))
    path = quanta.export(q, tmp_path / "tok.mlpackage", example_inputs=(x,))
    types = _input_types(path)
    assert list(types) == ["input_ids"] and types["input_ids"][0] == "INT32"
    assert list(types["input_ids"][1].shape) == [2, 12]
    figures = quanta.verify(path, q, example_inputs=(x,))
    assert figures["cosine"] > 0.9999 and figures["max_rel"] < 5e-3, figures
    # numpy int32 token ids work too (what a Core ML caller holds)
    figures = quanta.verify(path, q, example_inputs=(x.numpy().astype(np.int32),))
    assert figures["cosine"] > 0.9999, figures


def test_token_ids_need_example_inputs_to_verify(tmp_path):
    q = _quantized(TokenModel().eval())
    path = quanta.export(q, tmp_path / "tok.mlpackage", example_inputs=torch.randint(0, 96, (1, 8)))
    with pytest.raises(quanta.ConfigError, match="integer input"):
        quanta.verify(path, q)


def test_dict_inputs_keep_names_and_dtypes(tmp_path):
    torch.manual_seed(0)
    q = _quantized(MaskedModel().eval())
    ids = torch.randint(0, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    path = quanta.export(q, tmp_path / "dict.mlpackage", example_inputs=inputs)
    types = _input_types(path)
    assert list(types) == ["input_ids", "attention_mask"]
    assert {t for t, _ in types.values()} == {"INT32"}
    figures = quanta.verify(path, q, example_inputs=inputs)
    assert figures["outputs"] == ["pooled", "logits"]  # named by the model's output keys
    assert figures["cosine"] > 0.9999 and figures["max_rel"] < 5e-3, figures
    with pytest.raises(quanta.ConfigError, match="do not match"):
        quanta.verify(path, q, example_inputs={"input_ids": ids})


def test_flexible_sequence_length(tmp_path):
    torch.manual_seed(0)
    q = _quantized(TokenModel().eval())
    path = quanta.export(q, tmp_path / "flex.mlpackage", example_inputs=torch.randint(0, 96, (1, 8)),
                         flexible_sequence_length=64)
    dims = _input_types(path)["input_ids"][1].shapeRange.sizeRanges
    assert [(d.lowerBound, d.upperBound) for d in dims] == [(1, 1), (1, 64)]
    for length in (3, 8, 40):
        x = torch.randint(0, 96, (1, length))
        figures = quanta.verify(path, q, example_inputs=(x,))
        assert figures["cosine"] > 0.9999, (length, figures)


def test_flexible_sequence_length_needs_a_maximum(tmp_path):
    q = _quantized(TokenModel().eval())
    with pytest.raises(quanta.ConfigError, match="max_position_embeddings"):
        quanta.export(q, tmp_path / "f.mlpackage", example_inputs=torch.randint(0, 96, (1, 8)),
                      flexible_sequence_length=True)
    with pytest.raises(quanta.ConfigError, match="flexible_sequence_length"):
        quanta.export(q, tmp_path / "f.mlpackage", example_inputs=torch.randint(0, 96, (1, 8)),
                      flexible_sequence_length=-3)


def test_export_writes_atomically_and_refuses_a_foreign_directory(tmp_path):
    from quanta.errors import DestinationExistsError

    q = _quantized(TokenModel().eval())
    x = torch.randint(0, 96, (1, 8))
    path = quanta.export(q, tmp_path / "a.mlpackage", example_inputs=(x,))
    again = quanta.export(q, tmp_path / "a.mlpackage", example_inputs=(x,))  # quanta's own: replaced
    assert again == path and (tmp_path / "a.mlpackage" / ".quanta").is_file()
    assert quanta.verify(again, q, (x,))["cosine"] > 0.9999
    foreign = tmp_path / "b.mlpackage"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError):
        quanta.export(q, foreign, example_inputs=(x,))
    assert (foreign / "keep.txt").read_text() == "mine"
    quanta.export(q, foreign, example_inputs=(x,), overwrite=True)
    assert not (foreign / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mlpackage", "b.mlpackage"]  # no staging left


class BoolMaskModel(TokenModel):
    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids)).masked_fill(~attention_mask.unsqueeze(-1), 0.0)


def test_bool_mask_becomes_an_int32_input_with_the_same_meaning(tmp_path):
    # int32 has no `~` of a bool: the wrapper turns the Core ML int32 mask back into bool first
    torch.manual_seed(0)
    model = BoolMaskModel().eval()
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = {"input_ids": ids, "attention_mask": mask}
    path = quanta.export(model, tmp_path / "bool.mlpackage", example_inputs=inputs, allow_float=True)
    assert {t for t, _ in _input_types(path).values()} == {"INT32"}
    figures = quanta.verify(path, model, inputs)
    assert figures["cosine"] > 0.9999 and figures["max_rel"] < 5e-3, figures


def test_token_model_is_flexible_in_batch_and_length_by_default_and_inputs_follow_forward(tmp_path):
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = MaskedModel().eval()
    model.config = SimpleNamespace(max_position_embeddings=32)  # a transformers-style config gives the bound
    q = _quantized(model)
    ids = torch.randint(0, 96, (4, 14))
    path = quanta.export(q, tmp_path / "m.mlpackage",  # keywords given out of the forward() order
                         example_inputs={"attention_mask": torch.ones_like(ids), "input_ids": ids})
    types = _input_types(path)
    assert list(types) == ["input_ids", "attention_mask"]
    ranges = [(r.lowerBound, r.upperBound) for r in types["input_ids"][1].shapeRange.sizeRanges]
    assert ranges == [(1, 64), (1, 32)]
    ids = torch.randint(0, 96, (3, 5))  # another batch size and length than the example's
    figures = quanta.verify(path, q, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert figures["within_tolerance"] and figures["cosine"] > 0.999, figures
    fixed = quanta.export(q, tmp_path / "f.mlpackage", example_inputs={"input_ids": ids, "attention_mask": ids > 0},
                          flexible_batch=False, flexible_sequence_length=False)
    assert list(_input_types(fixed)["input_ids"][1].shape) == [3, 5]


def test_export_command_sets_flexible_dimensions(tmp_path, capsys):
    """``quanta export --flexible-batch/--flexible-sequence-length`` (options the coreml exporter adds)."""
    from quanta._cli import build_parser, main

    args = build_parser(["export"]).parse_args(["export", "d", "-o", "x.mlpackage", "--flexible-batch", "off",
                                                "--flexible-sequence-length", "32"])
    assert (args.flexible_batch, args.flexible_sequence_length) == (False, 32)
    with pytest.raises(SystemExit):
        build_parser(["export"]).parse_args(["export", "d", "-o", "x.mlpackage", "--flexible-batch", "maybe"])
    assert "use auto, on, off or a positive maximum" in capsys.readouterr().err
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 7))
    saved = quanta.save(_quantized(MaskedModel().eval()), tmp_path / "saved",
                        example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out = tmp_path / "fixed.mlpackage"
    assert main(["-q", "export", str(saved), "--factory", f"{__file__}:MaskedModel",
                 "-o", str(out), "--flexible-batch", "on", "--flexible-sequence-length", "off"]) == 0
    types = _input_types(out)
    ranges = [(r.lowerBound, r.upperBound) for r in types["input_ids"][1].shapeRange.sizeRanges]
    assert ranges == [(1, 64), (7, 7)]
