"""The registry: lookup, suggestions, describe, duplicates, contract checks, isolation, env control."""

from __future__ import annotations

import attrs
import pytest
import torch

import quanta
from quanta import registry
from quanta.contracts import hooks as hookspecs
from quanta.errors import DuplicatePluginError, PluginContractError, PluginNotFoundError
from quanta.plugins.schemes import SymmetricScheme
from quanta.registry import Registry


def test_builtins_are_registered_through_hooks():
    assert {"symmetric", "affine"} <= set(registry.names("scheme"))
    assert {"minmax", "mse", "percentile"} <= set(registry.names("observer"))
    assert "rtn" in registry.names("algorithm")
    assert "torch" in registry.names("backend")
    entry = registry.get("scheme", "symmetric")
    assert entry.distribution == "quanta" and entry.plugin == "quanta.plugins.schemes"
    assert entry.description and entry.kind == "scheme"


def test_unknown_name_is_a_key_error_with_nearest_names():
    with pytest.raises(KeyError) as info:
        registry.get("scheme", "afine")
    assert isinstance(info.value, PluginNotFoundError)
    assert "did you mean 'affine'" in str(info.value) and "available: affine, symmetric" in str(info.value)
    with pytest.raises(PluginNotFoundError, match="did you mean 'scheme'"):
        registry.names("schem")


def test_describe_lists_config_fields():
    fields = {f.name: f for f in registry.describe("observer", "mse")}
    assert fields["grid"].default == "40" and fields["grid"].type == "int" and fields["grid"].doc
    grid = {f.name: f for f in registry.describe("scheme", "symmetric")}["grid"]
    assert grid.default == "'auto'" and "restricted" in grid.doc and "full" in grid.doc
    assert registry.describe("scheme", "affine") == []


class _Pow3(SymmetricScheme):
    name = "pow3"
    description = "test scheme"


class _SchemePlugin:
    def __init__(self, *schemes):
        self.schemes = schemes

    @quanta.hookimpl
    def register_schemes(self, register):
        for s in self.schemes:
            register(s)


def test_in_process_plugin_registers_and_unregisters(register_plugin):
    register_plugin(_SchemePlugin(_Pow3()), name="pow3-plugin")
    assert registry.get("scheme", "pow3").plugin == "pow3-plugin"
    registry.unregister_plugin("pow3-plugin")
    assert "pow3" not in registry.names("scheme")


def test_duplicate_name_is_refused_naming_both(register_plugin):
    class Dup(SymmetricScheme):
        description = "a second symmetric"

    with pytest.raises(DuplicatePluginError, match=r"'symmetric'.*dup-plugin.*quanta\.plugins\.schemes.*distribution quanta"):
        register_plugin(_SchemePlugin(Dup()), name="dup-plugin")
    assert registry.get("scheme", "symmetric").plugin == "quanta.plugins.schemes"
    assert "dup-plugin" not in [registry.default().pm.get_name(p) for p in registry.default().pm.get_plugins()]


@pytest.mark.parametrize("contribution,pattern", [
    (object(), "not an instance of a subclass of quanta.contracts.Scheme"),
    (type("NoName", (SymmetricScheme,), {"name": "", "description": "d"})(), "without a valid 'name'"),
    (type("NoDesc", (SymmetricScheme,), {"name": "x1", "description": ""})(), "needs a one-line 'description'"),
    (type("BadGrid", (SymmetricScheme,), {"name": "x2", "description": "d", "grid": "curvy"})(), "grid 'curvy'"),
    (type("BadCfg", (SymmetricScheme,), {"name": "x3", "description": "d", "config_class": dict})(), "attrs class"),
])
def test_contract_violations_roll_back_the_whole_plugin(contribution, pattern):
    plugin = _SchemePlugin(_Pow3(), contribution)
    with pytest.raises(PluginContractError, match=pattern):
        registry.register_plugin(plugin)
    assert "pow3" not in registry.names("scheme")


def test_event_hooks_fire_during_quantize(register_plugin, small_model):
    seen = []

    class Listener:
        @quanta.hookimpl
        def run_started(self, algorithm, plan):
            seen.append(("start", algorithm, len(plan.selected)))

        @quanta.hookimpl
        def layer_quantized(self, name, record, stats):
            seen.append(("layer", name, stats.index, stats.total))

        @quanta.hookimpl
        def run_finished(self, report):
            seen.append(("finish", len(report.layers)))

    register_plugin(Listener())
    quanta.quantize(small_model, {"global_config": {}})
    assert seen[0] == ("start", "rtn", 3) and seen[-1] == ("finish", 3)
    assert [s[1:] for s in seen[1:-1]] == [("0", 1, 3), ("3", 2, 3), ("5", 3, 3)]


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("QUANTA_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert reg.names("scheme") == ["affine", "symmetric"]
    assert reg.failures() == []


def test_hookimpl_is_reexported():
    assert quanta.hookimpl is hookspecs.hookimpl


def test_record_survives_state_dict_and_deepcopy(small_model):
    import copy

    q = quanta.quantize(small_model, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 4}})
    rec = quanta.records(q)["3.weight"]
    clone = copy.deepcopy(q)
    assert torch.equal(quanta.records(clone)["3.weight"].codes, rec.codes)
    assert "3.weight_quanta_codes" in q.state_dict()
    assert torch.equal(q[3].weight, rec.dequantize())


class _AllKinds:
    """One in-process plugin contributing to every registration hook, each a working implementation."""

    @quanta.hookimpl
    def register_schemes(self, register):
        register(_Pow3())

    @quanta.hookimpl
    def register_observers(self, register):
        class HalfRange(quanta.contracts.Observer):
            name, description = "half_range", "clips every group to half its min/max range"

            def observe(self, values, spec, scheme):
                lo, hi = torch.aminmax(values, dim=1)
                return lo / 2, hi / 2

        register(HalfRange())

    @quanta.hookimpl
    def register_algorithms(self, register):
        @attrs.frozen(kw_only=True)
        class FirstNConfig:
            n: int = attrs.field(default=1, metadata={"doc": "how many layers to quantize"})

        class FirstN(quanta.contracts.Algorithm):
            name, description, config_class = "first_n", "round-to-nearest on the first n planned layers", FirstNConfig

            def run(self, model, plan, data, context):
                for layer in plan.selected[: context.config.n]:
                    context.quantize_layer(model, layer)

        register(FirstN())

    @quanta.hookimpl
    def register_backends(self, register):
        from quanta.plugins.torch_backend import TorchBackend

        class ScriptedBackend(TorchBackend):
            name, description = "torch_subset", "torch backend restricted to Linear layers"

            def accepts(self, model):
                return False  # only when asked for by name

            def units(self, model):
                return [u for u in super().units(model) if u.module_type == "Linear"]

        register(ScriptedBackend())

    @quanta.hookimpl
    def register_exporters(self, register):
        class CodesExporter(quanta.contracts.Exporter):
            name, description, suffix = "codes_pt", "torch.save of every record's codes and scales", ".codes.pt"

            def export(self, model, path, *, example_inputs=None, overwrite=False):
                torch.save({k: (r.codes, r.scale) for k, r in quanta.records(model).items()}, path)
                return str(path)

        register(CodesExporter())


def test_one_plugin_contributes_every_kind(register_plugin, small_model, tmp_path):
    register_plugin(_AllKinds(), name="all-kinds")
    assert {e.name for e in registry.entries() if e.plugin == "all-kinds"} == {
        "pow3", "half_range", "first_n", "torch_subset", "codes_pt"}
    q = quanta.quantize(small_model, {"algorithm": "first_n", "n": 1,
                                      "global_config": {"observer": "half_range", "scheme": "pow3"}},
                        backend="torch_subset")
    assert list(quanta.records(q)) == ["3.weight"]  # the conv is not a unit of torch_subset; n=1
    rec = quanta.records(q)["3.weight"]
    assert float(rec.dequantize().abs().max()) <= float(small_model[3].weight.abs().max()) / 2 + 1e-6
    path = quanta.export(q, tmp_path / "m.codes.pt", format="codes_pt")
    assert torch.equal(torch.load(path)["3.weight"][0], rec.codes)
    assert [f.name for f in registry.describe("algorithm", "first_n")] == ["n"]


# -- hooks through pluggy ----------------------------------------------------------------------

def test_a_misspelled_hook_is_refused_naming_the_right_one():
    class Misspelled:
        @quanta.hookimpl
        def register_scheme(self, register):  # the hook is register_schemes
            register(_Pow3())

    with pytest.raises(PluginContractError, match=r"'register_scheme'.*did you mean 'register_schemes'"):
        registry.register_plugin(Misspelled(), name="misspelled")
    assert "pow3" not in registry.names("scheme")
    assert registry.default().pm.get_plugin("misspelled") is None


def test_a_hook_with_a_wrong_argument_is_refused():
    class WrongArgs:
        @quanta.hookimpl
        def register_schemes(self, registrar):
            registrar(_Pow3())

    with pytest.raises(PluginContractError, match=r"'wrong-args'.*registrar"):
        registry.register_plugin(WrongArgs(), name="wrong-args")
    assert "pow3" not in registry.names("scheme")


def test_registration_hooks_are_historic_pluggy_calls_with_a_typed_registrar(register_plugin):
    from quanta.contracts.hooks import Registrar

    got = {}

    class Typed:
        @quanta.hookimpl
        def register_schemes(self, register):
            got["register"] = register
            register.add_scheme(_Pow3())
            register.add_observer(_HalfObserver())  # any kind, through the typed methods

    caller = registry.default().pm.hook.register_schemes
    assert caller.is_historic()
    register_plugin(Typed(), name="typed")
    assert isinstance(got["register"], Registrar) and got["register"].kind == "scheme"
    assert registry.get("scheme", "pow3").plugin == "typed" and registry.get("observer", "half").plugin == "typed"
    with pytest.raises(PluginContractError, match="outside a registration hook"):
        got["register"](_Pow3())


class _HalfObserver(quanta.contracts.Observer):
    name, description = "half", "half the min/max range"

    def observe(self, values, spec, scheme):
        lo, hi = torch.aminmax(values, dim=1)
        return lo / 2, hi / 2


def test_a_failing_listener_is_isolated_and_wrappers_see_event_calls(register_plugin, small_model):
    from quanta.errors import PluginWarning

    seen = []

    class Broken:
        @quanta.hookimpl
        def run_finished(self, report):
            raise RuntimeError("listener bug")

    class Fine:
        @quanta.hookimpl
        def run_finished(self, report):
            seen.append("fine")

    class Wrapper:
        @quanta.hookimpl(wrapper=True)
        def run_finished(self, report):
            seen.append("before")
            result = yield
            seen.append("after")
            return result

    register_plugin(Fine(), name="fine")
    register_plugin(Broken(), name="broken-listener")
    register_plugin(Wrapper(), name="wrapper")
    with pytest.warns(PluginWarning, match=r"'broken-listener' failed in its run_finished hook.*listener bug"):
        quanta.quantize(small_model, {"global_config": {}})
    assert seen == ["before", "fine", "after"]


def test_trace_env_prints_every_hook_call(monkeypatch, capsys, small_model):
    monkeypatch.setenv("QUANTA_TRACE_PLUGINS", "1")
    monkeypatch.setenv("QUANTA_DISABLE_PLUGIN_AUTOLOAD", "1")
    with registry.use(Registry()):
        quanta.quantize(small_model, {"global_config": {}})
    err = capsys.readouterr().err
    assert "quanta hook: register_schemes(register=<quanta Registrar for schemes>) -> quanta.plugins.schemes" in err
    assert "quanta hook: run_started(algorithm='rtn'" in err
    assert err.count("quanta hook: layer_quantized(name=") == 3
    assert "quanta hook: run_finished(report=" in err


def test_plugins_add_cli_options_to_export(register_plugin):
    from quanta._cli import build_parser

    class NpzOptions:
        @quanta.hookimpl
        def add_cli_options(self, command, group):
            if command == "export":
                group.add_argument("--no-compress", dest="compressed", action="store_const", const=False,
                                   help="npz: store uncompressed")

    register_plugin(NpzOptions(), name="npz-options")
    args = build_parser(["export"]).parse_args(["export", "m", "-o", "x.npz", "--no-compress", "--target", "iOS18"])
    assert set(args.plugin_options) == {"minimum_deployment_target", "flexible_batch", "flexible_sequence_length",
                                        "compressed"}
    assert (args.compressed, args.minimum_deployment_target) == (False, "iOS18")
    assert build_parser(["plan"]).parse_args(["plan", "r.yaml"]).command == "plan"  # no plugin loaded for it


def test_algorithms_reach_layer_modules_through_the_context(register_plugin, small_model):
    """RunContext.module (the backend's module_of) instead of a backend's private unit.handle;
    quantize_layer(extra=...) instead of patching report rows."""
    seen = {}

    class Hooking(quanta.contracts.Algorithm):
        name, description = "hooking", "round to nearest, noting each layer's module"

        def run(self, model, plan, data, context):
            for layer in plan.selected:
                seen[layer.name] = context.module(model, layer)
                context.quantize_layer(model, layer, extra={"method": "noted"})

    class Plugin:
        @quanta.hookimpl
        def register_algorithms(self, register):
            register(Hooking())

    register_plugin(Plugin())
    q = quanta.quantize(small_model, {"algorithm": "hooking", "global_config": {}})
    assert seen == {"0": q[0], "3": q[3], "5": q[5]}
    assert [row.extra for row in q.quanta_report.layers] == [{"method": "noted"}] * 3


def test_builtin_table_says_what_each_builtin_module_registers():
    from quanta.plugins import BUILTIN_CONTRIBUTIONS, BUILTIN_HOOKS, BUILTIN_PLUGINS

    reg = Registry(autoload=False)
    reg.ensure_loaded()
    assert set(BUILTIN_CONTRIBUTIONS) == set(BUILTIN_PLUGINS)
    for modname in BUILTIN_PLUGINS:
        registered = {}
        for entry in reg.entries():
            if entry.plugin == modname:
                registered.setdefault(entry.kind, []).append(entry.name)
        assert {k: sorted(v) for k, v in registered.items()} == \
            {k: sorted(v) for k, v in BUILTIN_CONTRIBUTIONS[modname].items()}, modname
        hooks = {caller.name for caller in reg.pm.get_hookcallers(reg.pm.get_plugin(modname)) or []
                 if caller.name not in hookspecs.REGISTRATION_HOOKS}
        assert hooks == set(BUILTIN_HOOKS.get(modname, ())), modname


def test_a_lookup_imports_only_the_builtin_module_it_needs():
    reg = Registry(autoload=False)
    assert reg.get("algorithm", "rtn").plugin == "quanta.plugins.rtn"
    assert [reg.pm.get_name(p) for p in reg.pm.get_plugins()] == ["quanta.plugins.rtn"]
    assert reg.names("backend") == ["coreml", "torch"]
    assert "quanta.plugins.qat" not in {reg.pm.get_name(p) for p in reg.pm.get_plugins()}
    with pytest.raises(PluginNotFoundError, match="did you mean 'gptq'"):
        reg.get("algorithm", "gptqq")  # an unknown name loads the whole kind, to name the nearest


def test_a_plugin_taking_the_name_of_a_builtin_not_imported_yet_is_refused():
    from quanta.plugins.rtn import RTN

    class Dup(RTN):
        name = "gptq"
        description = "not the real gptq"

    class Plugin:
        @quanta.hookimpl
        def register_algorithms(self, register):
            register(Dup())

    reg = Registry(autoload=False)
    with pytest.raises(DuplicatePluginError, match=r"'gptq'.*quanta\.plugins\.gptq\.algorithm.*distribution quanta"):
        reg.add_plugin(Plugin(), name="dup-gptq")
    assert reg.get("algorithm", "gptq").plugin == "quanta.plugins.gptq.algorithm"


@pytest.mark.slow
def test_a_first_rtn_quantize_imports_no_exporter_gptq_fx_or_yaml():
    import subprocess
    import sys

    code = ("import sys, torch, quanta; m = torch.nn.Sequential(torch.nn.Linear(64, 64)); "
            "quanta.quantize(m, {'global_config': {'weight_dtype': 'int8'}}); "
            "print(sorted(n for n in ('quanta.fx', 'quanta.plugins.coreml.exporter', 'quanta.plugins.gptq', "
            "'quanta.plugins.compressed_tensors', 'quanta.examples', 'yaml') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]"
