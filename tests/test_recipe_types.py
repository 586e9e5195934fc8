"""Recipes as types, parsed once: the one YAML reader everywhere, typed plugin configs with a
version, typed plan decisions, and the exporter receiving its config object."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
import torch

import quanta
from quanta import ConfigError, load_recipe, registry
from quanta._recipes.document import ExportConfig, OnUnsupported
from quanta._recipes.planning import Decision
from quanta._recipes.recipe import recipe_to_dict
from quanta.contracts import Exporter

ROOT = Path(__file__).resolve().parents[1]


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24))


def test_quantizer_refuses_a_duplicate_yaml_key_like_quantize(tmp_path):
    path = tmp_path / "qat.yaml"
    path.write_text("global_config:\n  milestones: [0, 1, 2, 3]\n  milestones: [0, 5, 9, 9]\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'milestones' \(first set on line 2\)"):
        quanta.Quantizer(_mlp(), path)
    with pytest.raises(ConfigError, match=r"duplicate key 'milestones'"):
        quanta.quantize(_mlp(), path)


def test_quantizer_reads_yaml_with_the_same_reader(tmp_path):
    path = tmp_path / "qat.yaml"
    path.write_text("global_config:\n  milestones: [0, 1, 2, 3]\n")
    q = quanta.Quantizer(_mlp(), path)
    assert q.recipe.algorithm == "qat" and list(q.recipe.algorithm_config.milestones) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"nope.yaml' is missing"):
        quanta.Quantizer(_mlp(), tmp_path / "nope.yaml")


def test_every_problem_is_keyed_and_the_rest_are_kept():
    with pytest.raises(ConfigError) as info:
        load_recipe({"global_config": {"dtype": "int9"}, "module_type_configs": {"Linear": {"granularity": "x"}},
                     "on_unsupported_layer": "skp"})
    err = info.value
    assert err.key == "global_config.dtype" and "unknown dtype 'int9'" in err.detail
    others = dict(err.others)
    assert "module_type_configs.Linear.granularity" in others
    assert re.search(r"must be one of error, skip, got 'skp'; did you mean 'skip'", others["on_unsupported_layer"])


@pytest.mark.parametrize("recipe,key,pattern", [
    ({"module_name_configs": {3: None}}, "module_name_configs[3]", "expected a string, got 3"),
    ({"module_type_configs": {"": None}}, "module_type_configs", "classes or class names"),
    ({"module_type_configs": "Linear"}, "module_type_configs", "expected a mapping, got str"),
    ({"stages": [{"algorithm": "rtn", "export": {"format": "coreml"}}]}, "stages[0].export",
     "belongs at the top level"),
    ({"stages": [{"algorithm": "rtn"}], "calibration_nsamples": 3}, "calibration_nsamples",
     "beside stages.*go inside their stage"),
    ({"export": {"format": "coreml", "version": 99}}, "export.version", "written for version 99.*upgrade quanta"),
    ({"export": "coreml"}, "export", "expected a mapping such as"),
    ({"algorithm": 3}, "algorithm", "expected an algorithm name"),
    ({"module_type_configs": {torch.nn.Linear: {"dtype": "int9"}}}, "module_type_configs.Linear.dtype", "unknown dtype"),
])
def test_structuring_errors_name_the_key_path(recipe, key, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_recipe(recipe)
    assert info.value.key == key


def test_typed_classes_and_round_trip_with_versions():
    recipe = load_recipe({"algorithm": "gptq", "calibration_nsamples": 8, "on_unsupported_layer": "skip",
                          "global_config": {"observer": {"name": "mse", "grid": 50}},
                          "export": {"format": "coreml", "minimum_deployment_target": "iOS18", "path": "o.mlpackage"}})
    assert recipe.on_unsupported_layer is OnUnsupported.skip and recipe.on_unsupported_layer == "skip"
    assert isinstance(recipe.export, ExportConfig) and recipe.export.path == "o.mlpackage"
    assert type(recipe.export.config).__name__ == "CoreMLExportConfig"
    saved = recipe_to_dict(recipe)
    assert saved["algorithm_config"]["version"] == 1 and saved["export"]["version"] == 1
    assert saved["global_config"]["observer"]["version"] == 1
    import yaml

    assert load_recipe(yaml.safe_load(yaml.safe_dump(saved))) == recipe
    staged = load_recipe({"stages": [{"algorithm": "rtn"}, {"algorithm": "gptq", "calibration_nsamples": 4}]})
    assert load_recipe(recipe_to_dict(staged)) == staged


@attrs.frozen(kw_only=True)
class _RowsConfig:
    """Version 2 renamed ``n`` to ``rows``."""

    version = 2
    rows: int = 1

    @classmethod
    def upgrade(cls, options: dict, version: int) -> dict:
        if version == 1 and "n" in options:
            options["rows"] = options.pop("n")
        return options


class _RowsExporter(Exporter):
    name, description, config_class, suffix = "rows_test", "writes nothing; records its config", _RowsConfig, ".rows"
    received: list = []

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        type(self).received.append(self.config)
        Path(path).write_text(str(self.config.rows))
        return str(path)


class _Plugin:
    @quanta.hookimpl
    def register_exporters(self, register):
        register(_RowsExporter())


@pytest.fixture
def rows_exporter():
    with registry.plugin(_Plugin(), name="rows-test"):
        _RowsExporter.received.clear()
        yield _RowsExporter


def test_an_older_options_version_is_upgraded_a_newer_refused(rows_exporter):
    old = load_recipe({"export": {"format": "rows_test", "version": 1, "n": 3}})
    assert old.export.config == _RowsConfig(rows=3)
    assert load_recipe({"export": {"format": "rows_test", "rows": 4}}).export.config == _RowsConfig(rows=4)
    with pytest.raises(ConfigError, match=r"export.version: .*version 3, newer than this quanta's \(version 2\)"):
        load_recipe({"export": {"format": "rows_test", "version": 3, "rows": 4}})
    assert recipe_to_dict(old)["export"] == {"format": "rows_test", "version": 2, "rows": 3}


def test_the_exporter_receives_the_recipes_config_object(rows_exporter, tmp_path):
    recipe = load_recipe({"export": {"format": "rows_test", "rows": 7}})
    q = quanta.quantize(_mlp(), recipe)
    quanta.export(q, tmp_path / "a.rows", format="rows_test", config=recipe.export.config)
    assert rows_exporter.received[-1] is recipe.export.config
    quanta.export(q, tmp_path / "b.rows", format="rows_test", rows=5, overwrite=True)
    assert rows_exporter.received[-1] == _RowsConfig(rows=5)
    with pytest.raises(ConfigError, match="either as config= or as keywords"):
        quanta.export(q, tmp_path / "c.rows", format="rows_test", config=recipe.export.config, rows=5)


def test_plan_decisions_are_typed():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(30, 8), torch.nn.Embedding(10, 4),
                                torch.nn.Linear(8, 8))
    the_plan = quanta.plan(model, {"global_config": {"granularity": "per_block", "block_size": 16,
                                                     "weight_threshold": 100},
                                   "module_name_configs": {"3": None}, "on_unsupported_layer": "skip"})
    decisions = {p.name: p.decision for p in the_plan.layers}
    assert decisions == {"0": Decision.quantize, "1": Decision.unsupported, "2": Decision.not_global_type,
                         "3": Decision.config_null}
    small = quanta.plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"global_config": {"weight_threshold": 100}})
    assert small.layers[0].decision is Decision.below_threshold
    none = quanta.plan(model, {"module_type_configs": {"Embedding": {"dtype": 8}}})
    assert {p.name: p.decision for p in none.layers}["0"] is Decision.no_config


def test_quantize_plans_each_stage_once(monkeypatch):
    from quanta._recipes import planning
    from quanta._run import pipeline

    calls = []
    real = planning.build_plan

    def counting(*args, **kwargs):
        calls.append(args[1].algorithm)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_plan", counting)
    q = quanta.quantize(_mlp(), {"stages": [{"algorithm": "rtn", "global_config": {"dtype": 8}},
                                            {"algorithm": "rtn", "global_config": {"dtype": 4}}]})
    assert calls == ["rtn", "rtn"]
    assert str(quanta.records(q)["0.weight"].spec.dtype) == "int4"


def test_no_control_flow_on_message_text():
    # Decisions are enums or typed attributes (ConfigError.key/.detail), never parsed from messages.
    offenders = []
    for path in [*(ROOT / "core" / "_recipes").glob("*.py"), *(ROOT / "core" / "_run").glob("*.py")]:
        text = path.read_text()
        for pattern in (r"reason\.startswith\(", r"reason [!=]= \"", r"str\(exc\)\.split\(", r"message\.startswith\("):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_saved_specs_read_plugin_options_through_the_same_structuring():
    from quanta._files.saved_format import SavedModelError, spec_from_json

    spec = spec_from_json({"scheme": "symmetric", "scheme_config": {"version": 1, "grid": "full"}}, "0.weight")
    assert spec.scheme_config.grid == "full"
    with pytest.raises(SavedModelError, match=r"unknown option 'gird' for scheme 'symmetric'.*did you mean 'grid'"):
        spec_from_json({"scheme": "symmetric", "scheme_config": {"gird": "full"}}, "0.weight")
