"""quanta.save / quanta.load: safetensors + JSON, packed codes, exact reload, clear refusals, no pickle."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import attrs
import pytest
import torch
from safetensors import safe_open

import quanta
from quanta.contracts import Scheme
from quanta._files.saving import CONFIG_NAME, SavedModelError, unrestored_records

transformers = pytest.importorskip("transformers")


def _file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.name.endswith(".safetensors")
               and f.name != "example_inputs.safetensors")


def _data_bytes(path: Path) -> int:
    """Tensor bytes in the safetensors files (file size less the 8-byte length and the JSON header)."""
    total = 0
    for f in Path(path).glob("model*.safetensors"):
        with open(f, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total


def _rule_bytes(model: torch.nn.Module) -> int:
    """The size rule, computed independently of quanta._files.saving: packed codes + scales and zero points
    in their dtypes + every other state-dict tensor once (tied tensors share storage)."""
    recs = quanta.records(model)
    total = 0
    for rec in recs.values():
        total += math.ceil(rec.codes.numel() * rec.spec.dtype.bits / 8)
        total += rec.scale.numel() * rec.scale.element_size()
        if rec.zero_point is not None:
            total += rec.zero_point.numel() * rec.zero_point.element_size()
    skip = set(recs) | {f"{n}_quanta_{f}" for n in recs for f in ("codes", "scale", "zero_point")}
    seen = set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        total += t.numel() * t.element_size()
    return total


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ra, rb = quanta.records(a), quanta.records(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        x, y = ra[name], rb[name]
        assert torch.equal(x.codes, y.codes) and x.codes.dtype == y.codes.dtype, name
        assert torch.equal(x.scale, y.scale) and x.scale.dtype == y.scale.dtype, name
        assert (x.zero_point is None) == (y.zero_point is None), name
        if x.zero_point is not None:
            assert torch.equal(x.zero_point, y.zero_point), name
        assert x.spec == y.spec and tuple(x.block_sizes) == tuple(y.block_sizes), name
        assert (x.channel_axis, x.input_axis) == (y.channel_axis, y.input_axis), name
        # The parameter is exactly the record's values.
        assert torch.equal(b.get_parameter(name), y.dequantize().to(b.get_parameter(name).dtype)), name
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture
def no_pickle(monkeypatch):
    """Make every unpickling path raise while the test loads."""

    def refuse(*_a, **_k):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)

    class RefusingUnpickler(pickle.Unpickler):
        def load(self):
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


LLAMA_RECIPE = {"global_config": {"dtype": "uint4", "scheme": "affine", "granularity": "per_block", "block_size": 32},
                "module_type_configs": {"Embedding": None}, "module_name_configs": {"lm_head": None}}


@pytest.mark.slow
def test_minilm_int4_saves_small_and_loads_exactly(tmp_path, no_pickle):
    from quanta.examples import load_example, minilm_path

    example = load_example("minilm")
    qmodel = quanta.quantize(example.model, Path(quanta.examples.__file__).parent / "recipes" / "minilm_int4.yaml")
    out = quanta.save(qmodel, tmp_path / "minilm", example_inputs=example.example_inputs)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", CONFIG_NAME, "tokenizer.json", "vocab.txt"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    size, rule = _file_bytes(out), _rule_bytes(qmodel)
    assert abs(size / rule - 1) < 0.05, (size, rule)
    assert _data_bytes(out) == rule
    # Quantized layers take about 5.8 MiB, not the float weights' 4 bytes a parameter.
    rec_bytes = sum(math.ceil(r.codes.numel() / 2) + r.scale.nbytes for r in quanta.records(qmodel).values())
    assert rec_bytes < 7 * 2**20
    fresh = transformers.AutoModel.from_pretrained(minilm_path())
    loaded = quanta.load(out, fresh)
    assert loaded is fresh
    _assert_same_model(qmodel, loaded)
    rebuilt = quanta.load(out)  # from config.json, no model given
    _assert_same_model(qmodel, rebuilt)
    inputs = quanta._files.saving.load_example_inputs(out)
    assert inputs.keys() == example.example_inputs.keys()  # keyword inputs: input_ids, attention_mask
    assert all(torch.equal(inputs[k], example.example_inputs[k]) for k in inputs)


def test_tiny_llama_sharded_tied_affine(tmp_path, no_pickle):
    qmodel = quanta.quantize(tiny_llama(), LLAMA_RECIPE)
    out = quanta.save(qmodel, tmp_path / "llama", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == _rule_bytes(qmodel)
    # Shards stay near the limit (one tensor may exceed it alone).
    for s in shards:
        with safe_open(str(out / s), "pt") as fh:
            sizes = [fh.get_slice(k).get_shape() for k in fh.keys()]
        assert len(sizes) == 1 or (out / s).stat().st_size < 100_000 + 8192
    size, rule = _file_bytes(out), _rule_bytes(qmodel)
    assert abs(size / rule - 1) < 0.05, (size, rule)
    # lm_head is tied to the embedding: stored once.
    assert json.loads((out / CONFIG_NAME).read_text())["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = quanta.load(out)
    _assert_same_model(qmodel, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(qmodel(x).logits, loaded(x).logits)
    loaded_fresh = quanta.load(out, tiny_llama(seed=1))
    _assert_same_model(qmodel, loaded_fresh)


def test_bfloat16_model_loads_as_bfloat16(tmp_path):
    qmodel = quanta.quantize(tiny_llama().to(torch.bfloat16), LLAMA_RECIPE)
    out = quanta.save(qmodel, tmp_path / "m")
    loaded = quanta.load(out)  # rebuilt from config.json in the default float32, then given the saved types
    _assert_same_model(qmodel, loaded)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert abs(_file_bytes(out) / _rule_bytes(qmodel) - 1) < 0.05


def test_codes_are_stored_packed_once(tmp_path):
    qmodel = quanta.quantize(tiny_llama(), LLAMA_RECIPE)
    out = quanta.save(qmodel, tmp_path / "m")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        name = "model.layers.0.mlp.up_proj.weight"
        assert name not in keys  # no dequantized float copy
        codes = fh.get_slice(name + "_quanta_codes")
        assert codes.get_dtype() == "U8" and codes.get_shape() == [256 * 128 // 2]
        assert fh.get_slice(name + "_quanta_scale").get_dtype() == "F32"
        assert fh.get_slice(name + "_quanta_zero_point").get_dtype() == "U8"


def test_plain_transformers_does_not_choke_and_config_has_no_quant_method(tmp_path):
    qmodel = quanta.quantize(tiny_llama(), LLAMA_RECIPE)
    out = quanta.save(qmodel, tmp_path / "m")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    # Unquantized tensors are there as saved.
    assert torch.equal(model.model.embed_tokens.weight, qmodel.model.embed_tokens.weight)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.deconv = torch.nn.ConvTranspose2d(8, 4, 3)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.deconv(self.conv(x)).flatten(1))  # x: [B, 4, 8, 8]


@pytest.mark.parametrize("config", [
    {"dtype": "int2", "granularity": "per_tensor"},
    {"dtype": "uint3", "scheme": "affine", "granularity": "per_channel"},
    {"dtype": "int5", "granularity": "per_channel"},
    {"dtype": "uint8", "scheme": "affine", "granularity": "per_tensor"},
    {"dtype": "int6", "granularity": "per_block", "block_size": 4},
])
def test_bits_granularities_and_conv_axes_round_trip(tmp_path, config):
    torch.manual_seed(0)
    model = ConvNet().eval()
    qmodel = quanta.quantize(model, {"global_config": config})
    out = quanta.save(qmodel, tmp_path / "m")
    torch.manual_seed(1)
    loaded = quanta.load(out, ConvNet())
    _assert_same_model(qmodel, loaded)
    assert quanta.records(loaded)["deconv.weight"].channel_axis == 1
    # A tiny model's file is mostly header; its tensor bytes are exactly the rule.
    assert _data_bytes(out) == _rule_bytes(qmodel)


def test_declared_extra_state_and_added_buffers_are_restored(tmp_path):
    from quanta.record import declare_state, extra_state

    qmodel = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}})
    declare_state(qmodel.fc, "input_scale", torch.tensor([0.25]))
    qmodel.conv.register_buffer("running_thing", torch.arange(3.0))
    out = quanta.save(qmodel, tmp_path / "m")
    loaded = quanta.load(out, ConvNet())
    assert torch.equal(loaded.fc.input_scale, torch.tensor([0.25]))
    assert list(extra_state(loaded)) == ["fc.input_scale"]  # still declared, so exporters find it
    assert torch.equal(loaded.conv.running_thing, torch.arange(3.0))
    _assert_same_model(qmodel, loaded)


@attrs.frozen
class TableConfig:
    levels: int = 4


class TableScheme(Scheme):
    """A lookup-table scheme for the test: codes index a per-group table."""

    name = "test_table"
    description = "lookup table (test)"
    grid = "lut"
    config_class = TableConfig

    def quant_range(self, dtype):
        return 0, 2**dtype.bits - 1

    def qparams(self, min_val, max_val, dtype):
        return torch.ones_like(min_val), None

    def quantize(self, values, scale, zero_point, dtype):
        return values.round().clamp(0, 3)

    def dequantize(self, codes, scale, zero_point):
        return codes * scale


def test_lookup_table_records_and_plugin_options_round_trip(tmp_path):
    from quanta import registry
    from quanta.record import QuantizedWeight, attach_record

    class Plugin:
        @quanta.hookimpl
        def register_schemes(self, register):
            register(TableScheme())

    with registry.plugin(Plugin(), name="test-table-scheme"):
        model = ConvNet()
        gen = torch.Generator().manual_seed(0)
        spec = quanta.QuantSpec(dtype="uint2", scheme="test_table", scheme_config=TableConfig(levels=4))
        rec = QuantizedWeight(codes=torch.randint(0, 4, (10, 256), generator=gen).to(torch.uint8),
                              scale=torch.rand(10, 1, generator=gen) + 0.5, zero_point=None, spec=spec,
                              block_sizes=(1, 0), grid="lut", lut=torch.randn(10, 4, generator=gen))
        attach_record(model.fc, "weight", rec)
        out = quanta.save(model, tmp_path / "m")
        meta = json.loads((out / CONFIG_NAME).read_text())["records"]["fc.weight"]
        assert meta["grid"] == "lut" and meta["spec"]["scheme_config"] == {"levels": 4}
        assert meta["tensors"]["codes"]["packed_bits"] == 2
        loaded = quanta.load(out, ConvNet())
        got = quanta.records(loaded)["fc.weight"]
        assert got.grid == "lut" and torch.equal(got.lut, rec.lut) and got.spec == spec
        assert torch.equal(loaded.fc.weight, rec.dequantize())
        _assert_same_model(model, loaded)


def test_mismatches_are_refused_naming_the_tensor(tmp_path):
    qmodel = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int4"}})
    out = quanta.save(qmodel, tmp_path / "m")

    other = ConvNet()
    other.fc = torch.nn.Linear(4 * 8 * 8, 12)
    before = other.fc.weight.detach().clone()
    with pytest.raises(SavedModelError, match=r"'fc.weight'.*shape \(10, 256\).*\(12, 256\)"):
        quanta.load(out, other)
    assert torch.equal(other.fc.weight, before)  # nothing changed

    missing = ConvNet()
    del missing.deconv
    with pytest.raises(SavedModelError, match="no layer 'deconv'"):
        quanta.load(out, missing)

    bigger = ConvNet()
    bigger.extra = torch.nn.Linear(2, 2)
    with pytest.raises(SavedModelError, match="extra.weight"):
        quanta.load(out, bigger)
    quanta.load(out, bigger, strict=False)

    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(SavedModelError, match="format version 99"):
        quanta.load(out, ConvNet())
    with pytest.raises(SavedModelError, match="not a directory saved"):
        quanta.load(tmp_path / "nowhere", ConvNet())


def test_activation_quantized_models_are_refused_not_silently_saved_weight_only(tmp_path):
    from quanta._files.saving import activation_quantization_sites

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    data = [torch.randn(8, 16) for _ in range(4)]
    w8a8 = quanta.quantize(model, {"algorithm": "calibrate", "global_config": {"dtype": "int8"}}, data=data)
    assert activation_quantization_sites(w8a8)
    with pytest.raises(SavedModelError, match="quantizes activations .* torch.fx graph"):
        quanta.save(w8a8, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert activation_quantization_sites(quanta.quantize(model, {"global_config": {"dtype": "int8"}})) == []


def test_no_rebuild_recorded_asks_for_a_model(tmp_path):
    out = quanta.save(quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}}), tmp_path / "m")
    with pytest.raises(SavedModelError, match="pass model="):
        quanta.load(out)


def test_save_is_atomic_and_marks_its_directory(tmp_path):
    qmodel = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}})
    out = quanta.save(qmodel, tmp_path / "m")
    assert (out / ".quanta").is_file()
    quanta.save(qmodel, out)  # quanta's own directory: replaced without overwrite=True
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(quanta.DestinationExistsError):
        quanta.save(qmodel, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_load_state_dict_strict_false_drops_records_and_unrestored_records_says_so():
    qmodel = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int4"}})
    fresh = ConvNet()
    result = fresh.load_state_dict(qmodel.state_dict(), strict=False)
    assert "fc.weight_quanta_codes" in result.unexpected_keys
    assert unrestored_records(fresh, qmodel.state_dict()) == ["conv.weight", "deconv.weight", "fc.weight"]
    assert unrestored_records(qmodel, qmodel.state_dict()) == []


# -- a quantized model is whole: what an algorithm adds to the forward pass travels with it -------


def _load_example(stem: str):
    import importlib.util

    path = Path(__file__).parent.parent / "docs" / "examples" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"docs_example_{stem}_saving", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stages", [["act_scale", "rtn"], ["act_scale", "gptq"], ["rtn"], ["gptq"]])
def test_save_load_computes_what_the_model_computed_for_builtins_and_the_docs_act_scale(stages, tmp_path,
                                                                                          register_plugin):
    from quanta.testing import calibration_data, reference_model

    register_plugin(_load_example("act_scale_algorithm"))
    model = reference_model("token")
    data = calibration_data("token", "dict")
    q = quanta.quantize(model, {"stages": [{"algorithm": s} for s in stages], "global_config": {"dtype": "int4"}},
                        data=data)
    out = quanta.save(q, tmp_path / "m")
    loaded = quanta.load(out, reference_model("token"))
    x = calibration_data("token", "list", n=1, seed=1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    if "act_scale" in stages:
        cfg = json.loads((out / CONFIG_NAME).read_text())
        assert cfg["transforms"] == {"proj": [["input_mul", "input_scale"]], "head": [["input_mul", "input_scale"]]}
        assert quanta.record.transforms(loaded) == {"proj": (("input_mul", "input_scale"),),
                                                    "head": (("input_mul", "input_scale"),)}


def test_save_refuses_an_undeclared_hook_before_writing_naming_module_and_hook(tmp_path):
    model = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}})

    def awq_scale(module, args):  # a 0.1 AWQ-style plugin's hook: code, not data
        return (args[0] * 0.5,)

    model.fc.register_forward_pre_hook(awq_scale)
    with pytest.raises(SavedModelError, match=r"'fc'.*forward pre hook '.*awq_scale'.*context.add_transform"):
        quanta.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_a_parameter_an_algorithm_adds_is_declared_and_recreated_on_load(tmp_path):
    from quanta.errors import ConfigError
    from quanta.record import declare_state, extra_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    q = quanta.quantize(model, {"global_config": {"dtype": "int8"}})
    declare_state(q[0], "bias", torch.full((4,), 0.25))  # a bias on Linear(bias=False)
    assert isinstance(q[0].bias, torch.nn.Parameter) and "0.bias" in extra_state(q)
    out = quanta.save(q, tmp_path / "m")
    torch.manual_seed(1)
    loaded = quanta.load(out, torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)))
    assert isinstance(loaded[0].bias, torch.nn.Parameter)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(ConfigError, match=r"in_features: Linear already has an attribute 'in_features' \(a int\)"):
        declare_state(q[0], "in_features", torch.ones(1))
    with pytest.raises(ConfigError, match=r"weight: Linear already has a parameter 'weight' of shape \(4, 8\).*shape \(3,\)"):
        declare_state(q[0], "weight", torch.ones(3))


def test_declared_transforms_are_checked_and_every_kind_round_trips(tmp_path):
    from quanta.errors import ConfigError
    from quanta.record import TRANSFORMS, declare_transform

    q = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"unknown transform kind 'input_mull'.*did you mean 'input_mul'"):
        declare_transform(q.fc, "input_mull", "s", torch.ones(1))
    with pytest.raises(ConfigError, match=r"state 'nowhere', which is not declared"):
        declare_transform(q.fc, "input_mul", "nowhere")
    for i, kind in enumerate(TRANSFORMS):
        declare_transform(q.fc, kind, f"s{i}", torch.tensor(0.5 + i))
    out = quanta.save(q, tmp_path / "m")
    loaded = quanta.load(out, ConvNet())
    x = torch.randn(2, 4, 8, 8)
    plain = quanta.quantize(ConvNet(), {"global_config": {"dtype": "int8"}})
    assert torch.equal(loaded(x), q(x)) and not torch.allclose(plain(x), q(x))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["transforms"] = {"fc": [["input_pow", "s0"]]}
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    fresh = ConvNet()
    before = fresh.fc.weight.clone()
    with pytest.raises(SavedModelError, match=r"'fc'.*unknown transform \['input_pow', 's0'\]"):
        quanta.load(out, fresh)
    assert torch.equal(fresh.fc.weight, before) and not fresh.fc._forward_pre_hooks


@pytest.mark.slow
def test_a_declared_transform_survives_save_load_and_core_ml_export(tmp_path, register_plugin):
    """The issue's reload bug: act_scale's input scale lost on load made the exported package
    compute something else (max_abs inf). Declared, it is loaded back and traced into the package."""
    from quanta.testing import calibration_data, reference_model

    register_plugin(_load_example("act_scale_algorithm"))
    q = quanta.quantize(reference_model("mlp"), {"stages": ["act_scale", "rtn"], "global_config": {"dtype": "int8"}},
                        data=calibration_data("mlp"))
    loaded = quanta.load(quanta.save(q, tmp_path / "saved"), reference_model("mlp"))
    x = torch.randn(2, 64)
    package = quanta.export(loaded, tmp_path / "m.mlpackage", example_inputs=(x,))
    figures = quanta.verify(package, q, example_inputs=(x,))
    assert math.isfinite(figures["max_abs"]) and figures["cosine"] > 0.9999
    bare = quanta.load(tmp_path / "saved", reference_model("mlp"))
    for module in bare.modules():  # what 0.1 loaded: the weights without the input scale
        module._forward_pre_hooks.clear()
    with torch.no_grad():
        assert float((bare(x) - q(x)).abs().max()) > 100 * figures["max_abs"]
