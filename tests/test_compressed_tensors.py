"""Exporter ``compressed-tensors``: the directory loads in transformers (through the real
compressed-tensors package) with exactly quanta's weights at the stored scale dtype."""

from __future__ import annotations

import json

import pytest
import torch

import quanta
from quanta import QuantizationError

transformers = pytest.importorskip("transformers")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
# transformers warns that the directory's own quantization_config wins over the dequantize flag we pass.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def tiny_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _recipe(config):
    return {"global_config": config, "module_type_configs": {"Embedding": None}, "module_name_configs": {"lm_head": None}}


def _load_decompressed(path):
    from transformers import CompressedTensorsConfig

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=CompressedTensorsConfig(dequantize=True))


def _expected(rec, dtype):
    """quanta's dequantized weight computed at the stored scale dtype."""
    codes = rec.codes.to(torch.int16)
    if rec.zero_point is not None:
        codes = codes - quanta._records.qmath.expand_qparam(rec.zero_point.to(torch.int16), rec.shape)
    return codes.to(dtype) * quanta._records.qmath.expand_qparam(rec.scale.to(dtype), rec.shape)


CONFIGS = [
    {"dtype": "int4", "granularity": "per_block", "block_size": 32},
    {"dtype": "uint4", "scheme": "affine", "granularity": "per_block", "block_size": 32},
    {"dtype": "int8", "granularity": "per_channel"},
    {"dtype": "uint8", "scheme": "affine", "granularity": "per_channel"},
    {"dtype": "int4", "granularity": "per_tensor"},
    {"dtype": "uint2", "scheme": "affine", "granularity": "per_block", "block_size": 16},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_transformers_loads_quantas_exact_weights(tmp_path, config):
    qmodel = quanta.quantize(tiny_llama(), _recipe(config))
    out = quanta.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    loaded = _load_decompressed(out)
    recs = quanta.records(qmodel)
    for name, rec in recs.items():
        weight = loaded.get_parameter(name)
        assert torch.equal(weight, rec.dequantize()), name  # float32 scales: quanta's own values, bit for bit
    x = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, qmodel(x).logits)


def test_bfloat16_model_scales_in_bfloat16(tmp_path):
    qmodel = quanta.quantize(tiny_llama(torch.bfloat16), _recipe(CONFIGS[1]))
    out = quanta.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    from safetensors import safe_open

    with safe_open(f"{out}/model.safetensors", "pt") as fh:
        scale = fh.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
        assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (256, 4)
        assert fh.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
    loaded = _load_decompressed(out)
    for name, rec in quanta.records(qmodel).items():
        assert torch.equal(loaded.get_parameter(name), _expected(rec, torch.bfloat16)), name


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_equals_compressed_tensors_pack_to_int32(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for cols in (7, 32, 33, 100):
        codes = torch.randint(lo, hi + 1, (5, cols), generator=gen).to(torch.int8)
        ours = quanta.plugins.compressed_tensors.pack_rows_int32(codes, bits)
        assert torch.equal(ours, ct_helpers.pack_to_int32(codes, bits))
        assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size((5, cols))), codes)


def test_compressed_linear_path_runs(tmp_path):
    """transformers' default for this format keeps Linear layers compressed; it loads and runs."""
    qmodel = quanta.quantize(tiny_llama(), _recipe(CONFIGS[0]))
    out = quanta.export(qmodel, tmp_path / "ct", format="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    x = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, qmodel(x).logits)


def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path):
    model = tiny_llama()
    with pytest.raises(QuantizationError, match=r"'model.embed_tokens.weight'.*Linear weights only, not Embedding.weight"):
        quanta.export(quanta.quantize(model, {"global_config": {"dtype": "int8"},
                                              "module_type_configs": {"Embedding": {"dtype": "int8"}},
                                              "module_name_configs": {"lm_head": None}}),
                      tmp_path / "a", format="compressed-tensors")
    with pytest.raises(QuantizationError, match=r"'model.layers.0.self_attn.q_proj.weight'.*int3"):
        quanta.export(quanta.quantize(model, _recipe({"dtype": "int3"})), tmp_path / "b", format="compressed-tensors")
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(quanta.ConfigError, match="transformers config"):
        quanta.export(quanta.quantize(plain, {"global_config": {"dtype": "int8"}}), tmp_path / "c",
                      format="compressed-tensors")
    with pytest.raises(quanta.QuantaError, match="no quantized weights"):
        quanta.export(model, tmp_path / "d", format="compressed-tensors")
    with pytest.raises(quanta.ConfigError, match="scale_dtype: must be one of"):
        quanta.export(model, tmp_path / "e", format="compressed-tensors", scale_dtype="float8")
    from quanta.fx.fake_quant import ActivationFakeQuantize
    from quanta.plugins.activation_observers import StreamingMinMax

    w8a8 = quanta.quantize(model, _recipe({"dtype": "int8"}))
    w8a8.model.layers[0].mlp.act_fq = ActivationFakeQuantize(StreamingMinMax(), "symmetric",
                                                             quanta.QuantDtype(8, True))
    with pytest.raises(QuantizationError, match=r"'model.layers.0.mlp.act_fq'.*quantizes activations"):
        quanta.export(w8a8, tmp_path / "f", format="compressed-tensors")
    assert not any((tmp_path / n).exists() for n in "abcdef")


@pytest.mark.slow
def test_minilm_int4_exports_and_loads_with_quantas_weights(tmp_path):
    from quanta.examples import load_example

    example = load_example("minilm")
    qmodel = quanta.quantize(example.model, {"global_config": {"dtype": "int4", "granularity": "per_block",
                                                                "block_size": 32},
                                             "module_type_configs": {"Embedding": None}})
    out = quanta.export(qmodel, tmp_path / "minilm-ct", format="compressed-tensors")
    from transformers import CompressedTensorsConfig

    loaded = transformers.AutoModel.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    recs = quanta.records(qmodel)
    assert len(recs) == 37
    for name, rec in recs.items():
        assert torch.equal(loaded.get_parameter(name), rec.dequantize()), name
    batch = example.data[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, qmodel(**batch).last_hidden_state)
