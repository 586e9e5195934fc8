"""Recipes: loading from dict/YAML/attrs, coremltools shapes, and the table of bad configs."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
import yaml

import quanta
from quanta import ConfigError, QuantizationError, QuantSpec, load_recipe, registry
from quanta._recipes.recipe import recipe_to_dict


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10),
                               torch.nn.Conv1d(10, 8, 3))


# (config, exception, message pattern): every one must fail before any weight changes.
BAD_CONFIGS = [
    ({"algoritm": "rtn"}, ConfigError, r"unknown key 'algoritm'; did you mean 'algorithm'"),
    ({"algorithm": "gtpq"}, ConfigError, r"no algorithm plugin named 'gtpq'"),
    ({"global_config": {"weight_dtype": "int9"}}, ConfigError, r"global_config.*unknown dtype 'int9'.*allowed"),
    ({"global_config": {"dtype": 1}}, ConfigError, r"1 bits is out of range"),
    ({"global_config": {"dtype": 16}}, ConfigError, r"16 bits is out of range"),
    ({"global_config": {"dtype": torch.float16}}, ConfigError, r"not an integer quantization type"),
    ({"global_config": {"granularity": "per_blok", "block_size": 4}}, ConfigError,
     r"unknown granularity 'per_blok'; did you mean 'per_block'"),
    ({"global_config": {"granularity": "per_block"}}, ConfigError, r"block_size.*needs a block_size"),
    ({"global_config": {"granularity": "per_channel", "block_size": 32}}, ConfigError,
     r"only allowed with granularity 'per_block'"),
    ({"global_config": {"granularity": "per_block", "block_size": -4}}, ConfigError, r"positive integer"),
    ({"global_config": {"scheme": "symetric"}}, ConfigError, r"no scheme plugin named 'symetric'; did you mean 'symmetric'"),
    ({"global_config": {"observer": "minmaxx"}}, ConfigError, r"did you mean 'minmax'"),
    ({"global_config": {"mode": "linear_symetric"}}, ConfigError, r"did you mean 'linear_symmetric'"),
    ({"global_config": {"weight_dtyp": "int8"}}, ConfigError, r"unknown key 'weight_dtyp'; did you mean 'weight_dtype'"),
    ({"global_config": "int8"}, ConfigError, r"expected a mapping"),
    ({"module_type_configs": {"Linaer": None}}, ConfigError, r"no module of type 'Linaer'.*did you mean 'Linear'"),
    ({"module_name_configs": {"3x": None}}, ConfigError, r"matches no module.*did you mean '3'"),
    ({"global_config": {"granularity": "per_block", "block_size": 5}}, QuantizationError,
     r"layer '0': block_size 5 does not divide the input axis \(size 64\)"),
    ({"global_config": {"weight_threshold": -1}}, ConfigError, r"weight_threshold"),
    ({"on_unsupported_layer": "ignore"}, ConfigError, r"must be one of error, skip"),
    ({"export": {"format": "onnx"}}, ConfigError, r"no exporter plugin named 'onnx'"),
    ({"algorithm_config": {"x": 1}}, ConfigError, r"algorithm 'rtn' takes no options"),
]


@pytest.mark.parametrize("config,exc,pattern", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_configs_fail_before_any_weight_changes(config, exc, pattern, inplace):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=pattern):
        quanta.quantize(model, config, inplace=inplace)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not quanta.records(model)


def test_yaml_dict_and_attrs_forms_agree(tmp_path):
    data = {"algorithm": "rtn", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 16},
            "module_type_configs": {"Conv1d": None}, "module_name_configs": {"2": {"dtype": 8, "scheme": "affine"}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    r_dict, r_yaml = load_recipe(data), load_recipe(path)
    r_attrs = quanta.Recipe(global_config=QuantSpec(dtype="int4", granularity="per_block", block_size=16),
                            module_type_configs={torch.nn.Conv1d: None},
                            module_name_configs={"2": QuantSpec(dtype=8, scheme="affine")})
    outs = [quanta.quantize(_model(), r) for r in (r_dict, r_yaml, r_attrs)]
    for out in outs[1:]:
        for k, v in outs[0].state_dict().items():
            assert torch.equal(v, out.state_dict()[k]), k
    assert r_dict == r_yaml


def test_every_registered_config_round_trips():
    for entry in registry.entries():
        if entry.config_class is None:
            continue
        inst = entry.config_class()
        assert entry.config_class(**attrs.asdict(inst, recurse=False)) == inst
    recipe = load_recipe({"global_config": {"dtype": "uint4", "scheme": "affine", "granularity": "per_block",
                                            "block_size": 8, "observer": "mse"},
                          "module_type_configs": {"Linear": {"dtype": "int8"}, "Conv1d": None},
                          "module_name_configs": {"re:.*3": None}, "on_unsupported_layer": "skip"})
    assert load_recipe(yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe)))) == recipe


def test_coremltools_shapes_are_accepted():
    # PostTrainingQuantizerConfig.from_dict shape
    r = load_recipe({"global_config": {"weight_dtype": "int8", "granularity": "per_block", "block_size": 128},
                     "module_type_configs": {torch.nn.Linear: None}})
    assert r.global_config.block_size == 128 and r.module_type_configs[torch.nn.Linear] is None
    # OpLinearQuantizerConfig fields
    r = load_recipe({"global_config": {"mode": "linear", "dtype": "uint4", "granularity": "per_block",
                                       "block_size": 32, "weight_threshold": 512}})
    assert r.global_config.scheme == "affine" and str(r.global_config.dtype) == "uint4"
    assert r.global_config.weight_threshold == 512
    # float32 leaves a layer unquantized, as in coremltools
    r = load_recipe({"module_type_configs": {"Linear": {"weight_dtype": "float32"}}, "global_config": {}})
    assert r.module_type_configs["Linear"] is None


def test_resolver_precedence_and_plan_reasons():
    model = _model()
    recipe = {"global_config": {"dtype": "int8"},
              "module_type_configs": {"Linear": {"dtype": "int4", "granularity": "per_block", "block_size": 16},
                                      "Conv1d": None},
              "module_name_configs": {"2": {"dtype": "uint8", "scheme": "affine"}, "re:[02]": {"dtype": 6}}}
    plan = quanta.plan(model, recipe)
    by_name = {p.name: p for p in plan.layers}
    assert by_name["2"].reason == "module_name_configs['2']"  # exact name beats a pattern
    assert str(by_name["2"].spec.dtype) == "uint8"
    assert by_name["0"].reason == "module_name_configs['re:[02]']"
    assert by_name["3"].spec is None and "null" in by_name["3"].reason
    assert "module_name_configs" in plan.table()


def test_weight_threshold_skips_small_layers_in_the_report():
    q = quanta.quantize(_model(), {"global_config": {"weight_threshold": 1000}})
    assert [n for n, _ in q.quanta_report.skipped] == ["2", "3"]
    assert "weight_threshold" in q.quanta_report.skipped[0][1]


def test_unsupported_layer_skip_is_reported_and_warned():
    with pytest.warns(UserWarning, match="layer '3'.*block_size 16"):
        q = quanta.quantize(_model(), {"global_config": {"granularity": "per_block", "block_size": 16},
                                       "on_unsupported_layer": "skip"})
    assert dict(q.quanta_report.skipped)["3"].startswith("unsupported")
    assert set(quanta.records(q)) == {"0.weight", "2.weight"}


def test_block_size_equal_to_input_is_quantized_not_skipped():
    # coremltools silently skips a conv whose input channels equal the block size; quanta quantizes it.
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 8, 3))
    q = quanta.quantize(model, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}})
    assert tuple(quanta.records(q)["0.weight"].scale.shape) == (8, 1, 1, 1)


def test_a_torch_type_the_model_lacks_is_a_warning_not_an_error():
    import warnings

    import quanta
    from torch import nn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quanta.quantize(nn.Sequential(nn.Linear(8, 8)), {"global_config": {"dtype": "int8"}, "module_type_configs": {"Conv1d": None}})
    assert any("module_type_configs['Conv1d']" in str(w.message) and "ignored" in str(w.message) for w in caught)
    assert [r.name for r in q.quanta_report.layers] == ["0"]
