"""The plugin contracts: typed kinds, options from recipes, non-affine grids, errors that name
the plugin, stages, and backends chosen by priority."""

from __future__ import annotations

import subprocess
import sys
import warnings

import attrs
import pytest
import torch
from torch import nn

import quanta
from quanta import registry
from quanta.contracts import KINDS, Algorithm, Backend, Exporter, Observer, Scheme
from quanta.errors import ConfigError, PluginContractError, PluginError, PluginWarning, QuantizationError

NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


class NF4Scheme(Scheme):
    """A non-uniform 4-bit grid: codes index a fixed table scaled by each group's absmax."""

    name = "nf4_test"
    description = "NormalFloat4: 16 fixed levels times the group's absmax"
    grid = "lut"

    def check_spec(self, spec):
        if spec.dtype.bits != 4:
            raise ConfigError(f"NF4 has 16 levels: use 4 bits, not {spec.dtype}", "dtype")

    def quant_range(self, dtype):
        return 0, 15

    def qparams(self, min_val, max_val, dtype):
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax)), None

    def quantize(self, values, scale, zero_point, dtype):
        table = NF4.to(values.dtype)
        return (values / scale).unsqueeze(-1).sub(table).abs().argmin(-1).to(values.dtype)

    def dequantize(self, codes, scale, zero_point):
        return NF4.to(scale.dtype)[codes.long()] * scale


class _Plugin:
    def __init__(self, **contributions):
        self.contributions = contributions

    @quanta.hookimpl
    def register_schemes(self, register):
        for c in self.contributions.get("scheme", ()):
            register(c() if isinstance(c, type) else c)

    @quanta.hookimpl
    def register_observers(self, register):
        for c in self.contributions.get("observer", ()):
            register(c() if isinstance(c, type) else c)

    @quanta.hookimpl
    def register_algorithms(self, register):
        for c in self.contributions.get("algorithm", ()):
            register(c() if isinstance(c, type) else c)

    @quanta.hookimpl
    def register_backends(self, register):
        for c in self.contributions.get("backend", ()):
            register(c() if isinstance(c, type) else c)

    @quanta.hookimpl
    def register_exporters(self, register):
        for c in self.contributions.get("exporter", ()):
            register(c() if isinstance(c, type) else c)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, saved):
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def test_kinds_table_feeds_hookspecs_and_registry():
    from quanta.contracts.hooks import REGISTRATION_HOOKS

    assert set(KINDS) == set(registry.KINDS) == set(REGISTRATION_HOOKS.values())
    for kind in KINDS.values():
        assert REGISTRATION_HOOKS[kind.hook] == kind.name
        for attr in kind.declared:
            assert hasattr(kind.base, attr), (kind.name, attr)


@pytest.mark.parametrize("base", [Scheme, Observer, Algorithm, Backend, Exporter])
def test_a_subclass_that_implements_nothing_is_refused_naming_the_methods(base):
    empty = type("Empty" + base.__name__, (base,), {"name": "empty_x", "description": "implements nothing"})
    plugin = _Plugin(**{base.kind: [empty]})
    with pytest.raises(PluginContractError, match=r"incomplete .*abstract method") as info:
        registry.register_plugin(plugin)
    for method in base.__abstractmethods__:
        assert method in str(info.value)
    assert "empty_x" not in registry.names(base.kind)


def test_an_object_that_does_not_subclass_its_kind_is_refused_with_how_to_update():
    class Old:  # a 0.1-style duck-typed scheme
        name, description = "old_style", "duck-typed"

        def quant_range(self, dtype): ...
        def qparams(self, lo, hi, dtype): ...
        def quantize(self, v, s, z, dtype): ...
        def dequantize(self, c, s, z): ...

    with pytest.raises(PluginContractError, match=r"quanta\.contracts\.Scheme.*Updating a plugin"):
        registry.register_plugin(_Plugin(scheme=[Old()]))


def test_nf4_parameters_equal_the_records_dequantized_values(register_plugin):
    register_plugin(_Plugin(scheme=[NF4Scheme]))
    model = _mlp()
    q = quanta.quantize(model, {"global_config": {"dtype": "uint4", "scheme": "nf4_test", "granularity": "per_block",
                                                  "block_size": 32}})
    recs = quanta.records(q)
    assert recs["0.weight"].grid == "lut"
    for name, rec in recs.items():
        module = q.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(module.weight, rec.dequantize())
        assert set(torch.unique(rec.codes).tolist()) <= set(range(16))
    # a non-affine value would be off the (codes - zp) * scale grid: the table really is used
    w = recs["0.weight"].dequantize()
    assert not torch.allclose(w, recs["0.weight"].codes.float() * recs["0.weight"].scale.repeat_interleave(32, 1))


def test_nf4_is_refused_by_core_ml_before_anything_is_written(register_plugin, tmp_path):
    register_plugin(_Plugin(scheme=[NF4Scheme]))
    model = _mlp()
    recipe = {"global_config": {"dtype": "uint4", "scheme": "nf4_test"}}
    with pytest.raises(ConfigError, match=r"'lut' grid.*'coreml' exporter cannot store"):
        quanta.plan(model, {**recipe, "export": {"format": "coreml"}})
    q = quanta.quantize(model, recipe)
    with pytest.raises(ConfigError, match=r"'lut'-grid record.*nothing was written"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=(torch.randn(1, 64),))
    assert list(tmp_path.iterdir()) == []


def test_a_scheme_refuses_a_spec_at_plan_time(register_plugin):
    register_plugin(_Plugin(scheme=[NF4Scheme]))
    with pytest.raises(ConfigError, match=r"scheme 'nf4_test' refuses uint8 .*use 4 bits"):
        quanta.plan(_mlp(), {"global_config": {"dtype": "uint8", "scheme": "nf4_test"}})


def test_observer_options_from_a_recipe_reach_the_plugin():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 50.0  # an outlier the percentile clips
    base = quanta.quantize(model, {"global_config": {"observer": "percentile"}})
    tuned = quanta.quantize(model, {"global_config": {"observer": {"name": "percentile", "percentile": 90.0}}})
    spec = quanta.records(tuned)["0.weight"].spec
    assert spec.observer_config.percentile == 90.0 and "percentile(percentile=90.0)" in spec.describe()
    assert not torch.equal(quanta.records(base)["0.weight"].scale, quanta.records(tuned)["0.weight"].scale)


@pytest.mark.parametrize("layer_config,pattern", [
    ({"observer": {"name": "percentile", "percentil": 99.0}}, r"unknown option 'percentil'.*did you mean 'percentile'"),
    ({"observer": "percentile", "percentile": 99.9}, r"option of the observer 'percentile': write observer: \{name"),
    ({"observer": {"percentile": 99.0}}, r"needs 'name'"),
    ({"scheme": {"name": "symmetric", "bogus": 1}}, r"scheme 'symmetric' takes no options|unknown option 'bogus'"),
    ({"observer": {"name": "mse", "grid": "x"}}, r"observer.grid: must be a positive integer, got 'x'"),
    ({"observer": {"name": "percentile", "percentile": 101}}, r"observer.percentile: must be a number in \[50, 100\]"),
])
def test_bad_plugin_options_are_refused_at_load(layer_config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        quanta.load_recipe({"global_config": layer_config})


def test_export_options_are_validated_when_the_recipe_loads():
    with pytest.raises(ConfigError, match=r"export.minimum_deployment_targte: unknown option .*did you mean "
                                          r"'minimum_deployment_target'"):
        quanta.load_recipe({"export": {"format": "coreml", "minimum_deployment_targte": "iOS18"}})


class _Boom(Scheme):
    name, description = "boom_test", "raises inside qparams"

    def quant_range(self, dtype):
        return -7, 7

    def qparams(self, min_val, max_val, dtype):
        raise RuntimeError("division by zero in my scheme")

    def quantize(self, values, scale, zero_point, dtype):
        return values

    def dequantize(self, codes, scale, zero_point):
        return codes


def test_an_exception_in_a_scheme_names_the_plugin_and_layer(register_plugin):
    register_plugin(_Plugin(scheme=[_Boom]))
    model = _mlp()
    saved = _state(model)
    with pytest.raises(PluginError, match=r"scheme plugin 'boom_test' \(distribution <in-process>\) failed on layer "
                                          r"'0'.*during algorithm 'rtn'.*RuntimeError: division by zero") as info:
        quanta.quantize(model, {"global_config": {"scheme": "boom_test"}}, inplace=True)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _same_state(model, saved)


def test_a_quanta_error_raised_on_purpose_passes_through(register_plugin):
    class Refuse(Algorithm):
        name, description = "refuse_test", "refuses every model"

        def run(self, model, plan, data, context):
            raise QuantizationError("this model is not for me", "0")

    register_plugin(_Plugin(algorithm=[Refuse]))
    with pytest.raises(QuantizationError, match="this model is not for me") as info:
        quanta.quantize(_mlp(), {"algorithm": "refuse_test"})
    assert not isinstance(info.value, PluginError)


def test_keyboard_interrupt_is_never_wrapped_and_restores(register_plugin):
    class Interrupt(Algorithm):
        name, description = "interrupt_test", "quantizes one layer then is interrupted"

        def run(self, model, plan, data, context):
            context.quantize_layer(model, plan.selected[0])
            raise KeyboardInterrupt

    register_plugin(_Plugin(algorithm=[Interrupt]))
    model = _mlp()
    saved = _state(model)
    with pytest.raises(KeyboardInterrupt):
        quanta.quantize(model, {"algorithm": "interrupt_test"}, inplace=True)
    assert _same_state(model, saved) and not quanta.records(model)


def test_a_failing_event_hook_warns_and_the_run_goes_on(register_plugin):
    class Listener:
        @quanta.hookimpl
        def layer_quantized(self, name, record, stats):
            raise ValueError("my progress bar broke")

    register_plugin(Listener(), name="broken-listener")
    with pytest.warns(PluginWarning, match=r"'broken-listener' failed in its layer_quantized hook.*progress bar"):
        q = quanta.quantize(_mlp(), {})
    assert len(quanta.records(q)) == 2


class _ScaleLayerNorm(Algorithm):
    """A scaling stage: folds a factor into LayerNorm weights and declares an input scale."""

    name, description = "scale_ln_test", "halves LayerNorm weights and records an input scale"
    changes = "model"

    def run(self, model, plan, data, context):
        seen = [context.call(model, b).shape for b in context.batches()]
        context.stats["scale_ln_batches"] = len(seen)
        with torch.no_grad():
            model[1].weight.mul_(0.5)
        context.add_state(model, "3", "input_scale", torch.full((32,), 2.0))


class _FailAfterOne(Algorithm):
    name, description = "fail_after_one_test", "quantizes one layer then fails"
    needs_data = True

    def run(self, model, plan, data, context):
        assert len(data) == 3
        context.quantize_layer(model, plan.selected[0])
        raise RuntimeError("solver diverged")


def test_stages_run_in_order_and_share_materialized_data(register_plugin):
    register_plugin(_Plugin(algorithm=[_ScaleLayerNorm]))
    model = _mlp()
    batches = (torch.randn(2, 64) for _ in range(3))  # a generator: read once for every stage
    recipe = {"stages": [{"algorithm": "scale_ln_test"}, {"algorithm": "gptq", "calibration_nsamples": 3}],
              "global_config": {"dtype": "int4", "granularity": "per_channel"}}
    p = quanta.plan(model, recipe)
    assert [s.algorithm for s in p.stages] == ["scale_ln_test", "gptq"] and "stage 2 of 2: gptq" in p.table()
    q = quanta.quantize(model, recipe, data=batches)
    assert q.quanta_report.stats["scale_ln_batches"] == 3
    assert q.quanta_report.algorithm == "scale_ln_test -> gptq"
    assert torch.equal(q[1].weight, model[1].weight * 0.5)
    assert torch.equal(q[3].input_scale, torch.full((32,), 2.0))
    assert set(quanta.records(q)) == {"0.weight", "3.weight"}
    assert quanta.record.extra_state(q).keys() == {"3.input_scale"}


def test_a_failing_stage_restores_everything_any_stage_changed(register_plugin):
    register_plugin(_Plugin(algorithm=[_ScaleLayerNorm, _FailAfterOne]))
    model = _mlp()
    saved = _state(model)
    recipe = {"stages": [{"algorithm": "scale_ln_test"}, {"algorithm": "fail_after_one_test"}]}
    with pytest.raises(PluginError, match=r"algorithm plugin 'fail_after_one_test'.*solver diverged"):
        quanta.quantize(model, recipe, data=[torch.randn(2, 64) for _ in range(3)], inplace=True)
    assert _same_state(model, saved)
    assert not quanta.records(model) and not quanta.record.extra_state(model)


def test_stage_recipes_validate_each_stage():
    with pytest.raises(ConfigError, match=r"stages\[1\].*unknown key 'calibration_nsample'.*did you mean 'calibration_nsamples'"):
        quanta.load_recipe({"stages": [{"algorithm": "rtn"}, {"algorithm": "gptq", "calibration_nsample": 3}]})
    with pytest.raises(ConfigError, match="names its algorithms inside the stages"):
        quanta.load_recipe({"algorithm": "rtn", "stages": [{"algorithm": "rtn"}]})


def test_requantizing_a_quantized_model_is_refused():
    q = quanta.quantize(_mlp(), {})
    with pytest.raises(QuantizationError, match="already holds quanta records"):
        quanta.quantize(q, {})


def test_backends_are_chosen_by_priority_not_by_name(register_plugin):
    from quanta.plugins.torch_backend import TorchBackend

    class Greedy(TorchBackend):
        name, description = "aaa_greedy", "accepts everything, low priority"
        priority = -5

    register_plugin(_Plugin(backend=[Greedy]))
    assert quanta.plan(_mlp(), {}).backend == "torch"

    class Eager(TorchBackend):
        name, description = "aab_eager", "accepts everything, high priority"
        priority = 100

    register_plugin(_Plugin(backend=[Eager]))
    assert quanta.plan(_mlp(), {}).backend == "aab_eager"


def test_quantizing_a_torch_model_does_not_import_coremltools():
    code = ("import sys, torch, quanta\n"
            "q = quanta.quantize(torch.nn.Linear(8, 8), {})\n"
            "print('coremltools' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_with_config_gives_a_configured_copy_and_leaves_the_registered_one():
    obs = registry.get("observer", "percentile").obj
    cfg = obs.config_class(percentile=95.0)
    tuned = obs.with_config(cfg)
    assert tuned.config.percentile == 95.0 and obs.config.percentile == 99.99
    assert tuned.options() == {"percentile": 95.0} and obs.options() == {}
    with pytest.raises(TypeError, match="expects a PercentileConfig"):
        obs.with_config(attrs.make_class("Other", {})())


def test_capabilities_are_declared_and_listed():
    caps = registry.capabilities("exporter", "coreml")
    assert caps["suffix"] == ".mlpackage" and caps["writes_directory"] and caps["grids"] == frozenset({"affine"})
    assert registry.capabilities("backend", "torch")["priority"] > registry.capabilities("backend", "coreml")["priority"]
    assert registry.capabilities("algorithm", "gptq")["needs_data"] is True


def test_observer_results_are_checked(register_plugin):
    class Backwards(Observer):
        name, description = "backwards_test", "returns max as min"

        def observe(self, values, spec, scheme):
            return values.amax(dim=1), values.amin(dim=1)

    register_plugin(_Plugin(observer=[Backwards]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PluginError, match=r"observer plugin 'backwards_test'.*layer '0'.*min > max"):
            quanta.quantize(_mlp(), {"global_config": {"observer": "backwards_test"}})


# -- stages see the float model; temporary state ------------------------------------------------


class _Stage(Algorithm):
    """A test stage recording what the run-time API shows it."""

    name, description = "float_reader", "reads the float model in a later stage (test)"
    changes = "model"
    seen: dict = {}

    def run(self, model, plan, data, context):
        layer = plan.selected[0]
        _Stage.seen["float"] = context.read_float_weight(layer).clone()
        _Stage.seen["current"] = context.read_weight(model, layer).clone()
        _Stage.seen["outputs"] = context.float_outputs(layer) if data else None
        context.add_state(model, layer.name, "scratch", torch.ones(3), temporary=True)
        context.add_transform(model, layer.name, "output_add", "scratch_shift", torch.zeros(1))
        context.add_state(model, layer.name, "kept", torch.ones(2))
        _Stage.seen["during"] = set(quanta.record.extra_state(model))


class _Contributes:
    def __init__(self, obj):
        self.obj = obj

    @quanta.hookimpl
    def register_algorithms(self, register):
        register(self.obj)


def test_a_later_stage_reads_float_weights_and_outputs_and_temporary_state_is_removed(register_plugin):
    from quanta.errors import ConfigError
    from quanta.testing import calibration_data, reference_model

    register_plugin(_Contributes(_Stage()))
    model = reference_model("mlp")
    data = calibration_data("mlp", "list")
    q = quanta.quantize(model, {"stages": ["rtn", "float_reader"], "global_config": {"dtype": "int4"}}, data=data)
    assert torch.equal(_Stage.seen["float"], model[0].weight.detach())  # the float weight, not the quantized one
    assert torch.equal(_Stage.seen["current"], quanta.records(q)["0.weight"].dequantize())
    with torch.no_grad():
        assert all(torch.equal(out, model[0](batch)) for out, batch in zip(_Stage.seen["outputs"], data))
    assert _Stage.seen["during"] == {"0.scratch", "0.scratch_shift", "0.kept"}
    assert set(quanta.record.extra_state(q)) == {"0.kept", "0.scratch_shift"}  # temporary state removed
    assert not hasattr(q[0], "scratch")
    assert quanta.record.transforms(q) == {"0": (("output_add", "scratch_shift"),)}
    quanta.record.remove_state(q[0], "scratch_shift")  # a transform goes with its state
    assert not q[0]._forward_hooks and quanta.record.transforms(q) == {}
    assert not model[0]._forward_hooks and not hasattr(model[0], "kept")  # the user's model untouched
    with pytest.raises(ConfigError, match=r"reads the float model.*declare reads_float = True"):
        quanta.quantize(reference_model("mlp"), {"stages": ["rtn", "float_reader"]}, data=data, inplace=True)


# -- exporters write where core tells them ---------------------------------------------------------


class _StagedText(Exporter):
    name, description, suffix = "staged_text", "writes its records as text at core's staging path (test)", ".rec"
    staged = True
    fail = False

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        with open(path, "w") as f:  # plainly: core owns the rename
            f.write("\n".join(f"{n} {r.codes.sum().item()}" for n, r in quanta.records(model).items()))
            if self.fail:
                raise RuntimeError("disk full halfway")
        return str(path)


class _ContributesExporter:
    def __init__(self, obj):
        self.obj = obj

    @quanta.hookimpl
    def register_exporters(self, register):
        register(self.obj)


def test_a_staged_exporter_replaces_its_own_file_never_a_users_and_leaves_nothing_on_failure(register_plugin,
                                                                                               tmp_path):
    from quanta.errors import DestinationExistsError
    from quanta._files.staging import file_marker, is_quanta_file
    from quanta.testing import reference_model

    exporter = _StagedText()
    register_plugin(_ContributesExporter(exporter))
    q = quanta.quantize(reference_model("mlp"), {})
    out = quanta.export(q, tmp_path / "m", format="staged_text")
    assert out == str(tmp_path / "m.rec") and is_quanta_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.rec.quanta", "m.rec"]  # the file and its sidecar
    assert quanta.export(q, tmp_path / "m.rec", format="staged_text") == out  # a re-export replaces quanta's own
    (tmp_path / "m.rec").write_text("the user's own file now")  # the sidecar no longer matches
    with pytest.raises(DestinationExistsError, match="not written by quanta"):
        quanta.export(q, tmp_path / "m.rec", format="staged_text")
    assert (tmp_path / "m.rec").read_text() == "the user's own file now"
    exporter.fail = True
    try:
        with pytest.raises(PluginError, match="disk full halfway"):
            quanta.export(q, tmp_path / "m.rec", format="staged_text", overwrite=True)
    finally:
        exporter.fail = False
    assert (tmp_path / "m.rec").read_text() == "the user's own file now"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.rec.quanta", "m.rec"]  # no staging folder left
    file_marker(tmp_path / "m.rec").unlink()
    with pytest.raises(PluginError, match="disk full"):
        exporter.fail = True
        quanta.export(q, tmp_path / "new.rec", format="staged_text")
    exporter.fail = False
    assert not (tmp_path / "new.rec").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.rec"]


# -- backends beyond torch ---------------------------------------------------------------------------


def test_a_non_torch_backend_goes_through_records_save_export_and_the_kit(register_plugin, tmp_path):
    import numpy as np

    from _array_backend import ArrayModel, ArrayPlugin
    from quanta.errors import NotQuantizedError
    from quanta.testing import check_backend, check_exporter

    register_plugin(ArrayPlugin())
    model = ArrayModel()
    check_backend(registry.get("backend", "arrays").obj, model)
    q = quanta.quantize(model, {"global_config": {"dtype": "int4"}})
    assert sorted(quanta.records(q)) == ["w1", "w2"] and quanta.records(model) == {}  # through Backend.records
    x = torch.randn(3, 8)
    assert float((q(x) - model(x)).norm() / model(x).norm()) < 0.2  # int4 per channel
    with pytest.raises(ConfigError, match=r"algorithm 'gptq' \(.*\) serves models of the torch backend\(s\) only; "
                                          r"this model belongs to backend 'arrays'"):
        quanta.plan(model, {"algorithm": "gptq"})
    with pytest.raises(ConfigError, match=r"serves models of the torch backend"):
        quanta.quantize(model, {"algorithm": "gptq"}, data=[torch.randn(2, 8)])
    with pytest.raises(ConfigError, match=r"backend 'arrays' cannot save its models with quanta.save.*quanta.export"):
        quanta.save(q, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()

    npz = _load_docs_example("npz_exporter")
    register_plugin(npz)
    with pytest.raises(NotQuantizedError, match=r"backend 'arrays' lists no records.*allow_float=True"):
        quanta.export(model, tmp_path / "float.npz", format="npz")
    out = quanta.export(q, tmp_path / "q.npz", format="npz")
    with np.load(out) as archive:
        assert np.array_equal(archive["w1.codes"], quanta.records(q)["w1"].codes.numpy())
    check_exporter(npz.NpzExporter(), tmp_path / "kit", model=q, reread=npz.read_npz)


def test_the_cli_loads_a_model_file_through_the_backend_declaring_its_suffix(register_plugin, tmp_path):
    from safetensors.torch import save_file

    from _array_backend import ArrayModel, ArrayPlugin
    from quanta._files.sources import load_model

    register_plugin(ArrayPlugin())
    save_file(ArrayModel(seed=3).weights, str(tmp_path / "m.arrays"))
    source = load_model(str(tmp_path / "m.arrays"))
    assert source.kind == "backend" and isinstance(source.model, ArrayModel)
    assert torch.equal(source.model.weights["w1"], ArrayModel(seed=3).weights["w1"])
    assert [layer.name for layer in quanta.plan(source.model, {}).selected] == ["w1", "w2"]


def test_a_backend_can_refuse_inplace_early(register_plugin):
    from _array_backend import ArrayBackend, ArrayModel, ArrayPlugin

    class NoInplace(ArrayBackend):
        supports_inplace = False

    register_plugin(ArrayPlugin(NoInplace()))
    model = ArrayModel()
    with pytest.raises(ConfigError, match=r"backend 'arrays' cannot quantize its models in place"):
        quanta.quantize(model, {}, inplace=True)
    assert model.records == {}


def _load_docs_example(stem: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "docs" / "examples" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"docs_example_{stem}_contracts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- plugins written for quanta 0.1 --------------------------------------------------------------------


@pytest.mark.parametrize("source,pattern", [
    ("class Old(Algorithm):\n name = 'old'; description = 'd'; replaces_weights_only = True\n"
     " def run(self, model, plan, data, context): pass",
     r"Old is written for quanta 0.1: it declares 'replaces_weights_only'.*declare shares_float_weights = True"),
    ("class Old(Exporter):\n name = 'old'; description = 'd'\n def export(self, model, path, **options): pass",
     r"export\(self, model, path, \*\*options\) is the 0.1 signature; write export\(self, model, path, \*, "
     r"example_inputs=None, overwrite=False\)"),
    ("class Old(Exporter):\n name = 'old'; description = 'd'\n"
     " def export(self, model, path, *, example_inputs=None, overwrite=False): pass\n"
     " def verify(self, path, against, example_inputs=None): return {}",
     r"defines verify\(\) but does not declare can_verify = True"),
    ("class Old(Algorithm):\n name = 'old'; description = 'd'\n def run(self, model, plan, data, context): pass\n"
     " def session(self, model, plan, recipe, backend, context): pass",
     r"defines session\(\) but does not declare training_loop = True"),
])
def test_what_a_0_1_plugin_relied_on_is_refused_when_its_class_is_defined(source, pattern):
    with pytest.raises(PluginContractError, match=pattern + r".*Updating a plugin"):
        exec(source, {"Algorithm": Algorithm, "Exporter": Exporter})


def test_a_subclass_of_a_builtin_scheme_without_options_of_its_own_works(register_plugin):
    from quanta.plugins.schemes import SymmetricScheme
    from quanta.testing import check_scheme, reference_model

    class Pow2Symmetric(SymmetricScheme):  # a 0.1 plugin: no options of its own
        name, description, config_class = "pow2_symmetric", "symmetric with power-of-two scales", None

        def qparams(self, min_val, max_val, dtype):
            scale, zero_point = super().qparams(min_val, max_val, dtype)  # reads self.config.grid
            return torch.exp2(torch.ceil(torch.log2(scale))), zero_point

    class Contributes:
        @quanta.hookimpl
        def register_schemes(self, register):
            register(Pow2Symmetric())

    register_plugin(Contributes())
    assert Pow2Symmetric().config == SymmetricScheme.config_class() and Pow2Symmetric().options() == {}
    check_scheme(Pow2Symmetric())
    q = quanta.quantize(reference_model("mlp"), {"global_config": {"scheme": "pow2_symmetric", "dtype": "int4"}})
    scale = quanta.records(q)["0.weight"].scale
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def test_quanta_plugin_resolves_whatever_was_imported_first():
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import quanta\n"
            "class NpzLike(quanta.plugin.Exporter):\n"
            "    name, description, staged = 'npz_like', 'd', True\n"
            "    def export(self, model, path, *, example_inputs=None, overwrite=False): pass\n"
            "assert quanta.plugin.Exporter is quanta.contracts.Exporter\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
