"""The conformance kit catches broken plugins (a kit that cannot fail proves nothing), and its
pytest plugin is installed, cheap to load and gives working fixtures."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import pytest
import torch

import quanta
from quanta import registry
from quanta.contracts import Algorithm, Exporter, Observer
from quanta.plugins.schemes import AffineScheme, SymmetricScheme
from quanta.testing import (DATA_FORMS, check_algorithm, check_exporter, check_observer, check_scheme,
                            isolated_registry, reference_model)


class _Contribute:
    def __init__(self, kind, obj):
        self.kind, self.obj = kind, obj

    @quanta.hookimpl
    def register_algorithms(self, register):
        if self.kind == "algorithm":
            register(self.obj)

    @quanta.hookimpl
    def register_exporters(self, register):
        if self.kind == "exporter":
            register(self.obj)


# -- schemes ------------------------------------------------------------------------------
class ZeroScale(SymmetricScheme):
    name = "zero_scale"

    def qparams(self, min_val, max_val, dtype):
        qmin, qmax = self.quant_range(dtype)
        return torch.maximum(min_val.abs(), max_val.abs()) / qmax, None  # 0 for an all-zero group


class Unclamped(SymmetricScheme):
    name = "unclamped"

    def quantize(self, values, scale, zero_point, dtype):
        return torch.round(values / scale)


class SlowFastDisagree(SymmetricScheme):
    name = "fast_path_off_by_one"

    def quantize_into(self, values, scale, zero_point, dtype, out):
        return super().quantize_into(values, scale, zero_point, dtype, out).clamp_(-100, 100)


class AffineClaimingLut(SymmetricScheme):
    name = "claims_affine"

    def dequantize(self, codes, scale, zero_point):
        c = codes if zero_point is None else codes - zero_point
        return torch.sign(c) * c.abs().pow(1.5) * scale  # not (codes - zero_point) * scale


class WideRange(AffineScheme):
    name = "wide_range"

    def quant_range(self, dtype):
        return -(1 << dtype.bits), (1 << dtype.bits)


class IgnoresLutScale(SymmetricScheme):
    name = "ignores_lut_scale"

    def dequantize_lut(self, codes, lut, scale):
        return torch.gather(lut.to(scale.dtype), 1, codes.long())  # forgets "* scale"


class ZeroTable(AffineScheme):
    name = "zero_table"
    grid = "lut"

    def lut(self, values, spec):  # a table that ignores the values: every weight becomes 0
        return torch.zeros(values.shape[0], 1 << (spec.dtype.bits - spec.dtype.signed), dtype=values.dtype)


class ScalarDisagrees(SymmetricScheme):
    name = "scalar_disagrees"

    def qparams(self, min_val, max_val, dtype):
        return super().qparams(min_val, max_val, dtype)

    def qparams_scalar(self, min_val, max_val, dtype):
        got = super().qparams_scalar(min_val, max_val, dtype)
        return None if got is None else (got[0] * 1.0000001, got[1])


class OnlyPerBlock(SymmetricScheme):
    name = "only_per_block"

    def check_spec(self, spec):
        if spec.granularity.value != "per_block":
            raise quanta.ConfigError("only per_block", "granularity")


@pytest.mark.parametrize("scheme,pattern", [
    (IgnoresLutScale(), r"dequantize_lut\(codes, lut, scale\) is not lut\[codes\] \* scale in float32: relative error"),
    (ZeroTable(), r"quantizing a weight for \w+ zero_table per_tensor.*relative error 100.0%"),
    (OnlyPerBlock(), r"check_spec refuses every dtype tried .* with the spec int8 .*only per_block.*pass spec="),
    (ZeroScale(), r"'zero_scale'.*zero, negative, NaN or inf scale for groups \[1\]"),
    (Unclamped(), r"'unclamped'.*(does not clamp|codes outside quant_range)"),
    (SlowFastDisagree(), r"quantize_into\(\) differs from quantize\(\)"),
    (AffineClaimingLut(), r"declares grid = 'affine' but dequantize\(\) is not"),
    (WideRange(), r"quant_range\(int2\) = \(-4, 4\) does not fit the dtype"),
    (ScalarDisagrees(), r"qparams_scalar\(.*\) gives .* qparams gives .* bit for bit"),
])
def test_check_scheme_catches(scheme, pattern):
    with pytest.raises(AssertionError, match=pattern):
        check_scheme(scheme)


# -- observers ----------------------------------------------------------------------------
class SharedClipRatio(Observer):
    name, description = "shared_clip", "an MSE clip search choosing one ratio for all rows together"

    def observe(self, values, spec, scheme):
        lo, hi = values.amin(dim=1), values.amax(dim=1)
        best, best_err = 1.0, None
        for ratio in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):  # one ratio for every row: rows are not independent
            s, z = scheme.qparams(lo * ratio, hi * ratio, spec.dtype)
            z = None if z is None else z[:, None]
            err = float(((scheme.dequantize(scheme.quantize(values, s[:, None], z, spec.dtype), s[:, None], z)
                          - values) ** 2).sum())
            if best_err is None or err < best_err:
                best, best_err = ratio, err
        return lo * best, hi * best


def test_check_observer_accepts_exact_ranges_where_they_hold():
    from quanta import registry

    minmax = registry.get("observer", "minmax").obj
    assert type(minmax).__dict__.get("exact_ranges") is True
    check_observer(minmax)

    class NinetyPercent(type(minmax)):  # overrides observe(): the inherited declaration does not apply
        def observe(self, values, spec, scheme):
            return values.amin(1) * 0.9, values.amax(1) * 0.9

    check_observer(NinetyPercent())


def test_check_observer_tries_low_bit_widths_by_default():
    from quanta._records.spec import QuantSpec

    check_observer(SharedClipRatio(), spec=QuantSpec(dtype="int8"))  # at int8 one ratio (1.0) fits every row
    with pytest.raises(AssertionError, match=r"'shared_clip'.*rows in two chunks differs .* for int4"):
        check_observer(SharedClipRatio())


class GlobalMax(Observer):
    name, description = "global_max", "one range for the whole tensor (rows not independent)"

    def observe(self, values, spec, scheme):
        hi = values.abs().max().expand(values.shape[0])
        return -hi, hi


class Clips(Observer):
    name, description = "clips_in_place", "clamps its input in place"

    def observe(self, values, spec, scheme):
        values.clamp_(-1, 1)
        return values.amin(1), values.amax(1)


class ClaimsNonFinite(Observer):
    name, description = "claims_non_finite", "nan-ignoring ranges, yet declares they carry NaN"
    ranges_carry_non_finite = True

    def observe(self, values, spec, scheme):
        v = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        return v.amin(1), v.amax(1)


class ClaimsExact(Observer):
    name, description = "claims_exact", "clips each range to 90 %, yet declares exact ranges"
    exact_ranges = True

    def observe(self, values, spec, scheme):
        return values.amin(1) * 0.9, values.amax(1) * 0.9


@pytest.mark.parametrize("observer,pattern", [
    (GlobalMax(), r"'global_max'.*two chunks differs"),
    (Clips(), r"modified its input"),
    (ClaimsNonFinite(), r"declares ranges_carry_non_finite = True but group 0"),
    (ClaimsExact(), r"'claims_exact'.*declares exact_ranges = True but observe\(\) returned ranges other"),
])
def test_check_observer_catches(observer, pattern):
    with pytest.raises(AssertionError, match=pattern):
        check_observer(observer)


# -- algorithms ---------------------------------------------------------------------------
class LeavesAHook(Algorithm):
    name, description = "leaves_a_hook", "adds a forward hook and does not remove it on failure"

    def run(self, model, plan, data, context):
        first = plan.selected[0].unit.handle
        first.register_forward_hook(lambda m, i, o: o)
        for layer in plan.selected:
            context.quantize_layer(model, layer)


class LeaksCalibrationHook(Algorithm):
    name, description = "leaks_calibration_hook", "observes inputs with a pre-hook and never removes it"
    needs_data = True
    changes = "model"

    def run(self, model, plan, data, context):
        seen = []
        plan.selected[-1].unit.handle.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        for batch in context.batches():
            context.call(model, batch)
        for layer in plan.selected:
            context.quantize_layer(model, layer)


class ChangesAnAttribute(Algorithm):
    name, description = "changes_an_attribute", "changes what the model computes through a plain attribute"
    changes = "model"

    def run(self, model, plan, data, context):
        for layer in plan.selected:
            context.quantize_layer(model, layer)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 0.5  # not a tensor: neither declared nor saved, so lost on load


class Swallows(Algorithm):
    name, description = "swallows_errors", "ignores a failing write"

    def run(self, model, plan, data, context):
        for layer in plan.selected:
            try:
                context.quantize_layer(model, layer)
            except Exception:
                pass


class MisreportsError(Algorithm):
    name, description = "misreports", "reports a made-up error"

    def run(self, model, plan, data, context):
        for layer in plan.selected:
            w = context.read_weight(model, layer)
            record = quanta.quantize_weight(w, layer.spec, channel_axis=layer.unit.channel_axis,
                                            input_axis=layer.unit.input_axis)
            context.write_layer(model, layer, record, w, sq_error=0.0, ref_sq=1.0)


class SkipsDicts(Algorithm):
    name, description = "skips_dicts", "calls model(batch) whatever the batch is"
    needs_data = True

    def run(self, model, plan, data, context):
        for batch in data:
            model(batch)
        for layer in plan.selected:
            context.quantize_layer(model, layer)


@pytest.mark.parametrize("algorithm,pattern", [
    (LeavesAHook(), r"keeps a forward hook '.*LeavesAHook.run.<locals>.<lambda>' on module '0'"),
    (LeaksCalibrationHook(), r"keeps a forward pre hook .* on module '3'.*context.add_transform"),
    (ChangesAnAttribute(), r"after quanta.save -> quanta.load the model computes something else"),
    (Swallows(), r"quanta.quantize succeeded"),
    (MisreportsError(), r"reports error 0 but its stored weight is"),
    (SkipsDicts(), r"data as tuple: quanta.quantize raised"),
])
def test_check_algorithm_catches(algorithm, pattern, register_plugin):
    register_plugin(_Contribute("algorithm", algorithm))
    with pytest.raises(AssertionError, match=pattern):
        check_algorithm(algorithm, models=("mlp",))


class NudgesQuantizedWeights(Algorithm):
    name, description = "nudges_weights", "a later stage that changes quantized weights behind their records"
    changes = "model"

    def run(self, model, plan, data, context):
        with torch.no_grad():
            for layer in plan.selected:
                getattr(layer.unit.handle, layer.unit.param).add_(1e-3)  # the record no longer matches


def test_check_algorithm_runs_earlier_stages_for_a_later_stage(register_plugin):
    register_plugin(_Contribute("algorithm", NudgesQuantizedWeights()))
    with pytest.raises(AssertionError, match=r"'nudges_weights'.*layer '0''s parameter differs from its record"):
        check_algorithm(NudgesQuantizedWeights(), models=("mlp",), before=["rtn"])


def test_check_algorithm_needs_the_algorithm_registered():
    with pytest.raises(AssertionError, match="is not registered"):
        check_algorithm(LeavesAHook())


# -- backends -----------------------------------------------------------------------------
def test_check_backend_catches_a_restore_that_keeps_records():
    from _array_backend import ArrayBackend, ArrayModel

    from quanta.testing import check_backend

    class KeepsRecords(ArrayBackend):
        name = "keeps_records"

        def restore(self, model, snapshot):
            weights, _records = snapshot
            model.weights = {k: v.clone() for k, v in weights.items()}  # forgets to restore the records

    check_backend(ArrayBackend(), ArrayModel())
    with pytest.raises(AssertionError, match=r"'keeps_records'.*restore\(snapshot\(everything=False\)\) left records "
                                             r"behind: \['w1', 'w2'\]"):
        check_backend(KeepsRecords(), ArrayModel())


# -- exporters ----------------------------------------------------------------------------
class Partial(Exporter):
    name, description, suffix = "partial", "writes straight onto the path, record by record", ".partial.txt"

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        with open(path, "w") as f:  # no quanta._files.atomic: a failure halfway leaves half a file
            f.write("quanta records\n")
            for name, record in quanta.records(model).items():
                f.write(f"{name} {record.codes.tolist()}\n")
        return str(path)


def _read_partial(path):
    lines = open(path).read().splitlines()[1:]
    return {name: torch.tensor(eval(codes)) for name, codes in (line.split(" ", 1) for line in lines)}


class RefusesItsOwnOutput(Exporter):
    name, description, suffix = "own_output", "writes atomically but cannot recognise its own file", ".own.txt"

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        with quanta.atomic_file(path, overwrite=overwrite) as tmp:  # no owned=: its own file looks like a user's
            tmp.write_text("quanta records\n" + "".join(f"{n} {r.codes.tolist()}\n"
                                                        for n, r in quanta.records(model).items()))
        return str(path)


def test_check_exporter_catches_an_exporter_that_cannot_replace_its_own_output(register_plugin, tmp_path):
    register_plugin(_Contribute("exporter", RefusesItsOwnOutput()))
    with pytest.raises(AssertionError, match=r"'own_output'.*re-exporting onto its own earlier output model.own.txt "
                                             r"was refused.*declare staged = True"):
        check_exporter(RefusesItsOwnOutput(), tmp_path, reread=_read_partial)


def test_check_exporter_catches_partial_output_on_failure(register_plugin, tmp_path):
    register_plugin(_Contribute("exporter", Partial()))
    with pytest.raises(AssertionError, match=r"'partial'.*a failed export left output.*broken.partial.txt"):
        check_exporter(Partial(), tmp_path, reread=_read_partial)


# -- the pytest plugin and fixtures -------------------------------------------------------
def test_the_pytest_plugin_is_an_installed_entry_point():
    eps = [ep for ep in md.entry_points(group="pytest11") if ep.name == "quanta"]
    assert eps and eps[0].value == "quanta.testing.pytest_plugin"


def test_loading_the_pytest_plugin_imports_nothing_heavy():
    code = ("import sys, quanta\nbefore = set(sys.modules)\nimport quanta.testing.pytest_plugin\n"
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith(('_pytest', 'pytest', 'py', "
            "'iniconfig', 'pluggy', 'pygments', 'quanta.testing')) and '.' not in m and not m.startswith('_')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added = eval(out.stdout)
    assert not {"torch", "numpy", "coremltools", "attrs"} & set(added), added


def test_quanta_registry_is_isolated_and_restored(quanta_registry):
    assert registry.default() is quanta_registry
    assert "rtn" in quanta_registry.names("algorithm")


def test_isolated_registry_restores_the_default():
    before = registry.default()
    with isolated_registry() as fresh:
        assert registry.default() is fresh and fresh is not before
    assert registry.default() is before


def test_register_plugin_fixture_unregisters(register_plugin):
    register_plugin(_Contribute("algorithm", Swallows()))
    assert "swallows_errors" in registry.names("algorithm")


def test_register_plugin_fixture_unregistered_after_the_test():
    assert "swallows_errors" not in registry.names("algorithm")


@pytest.mark.parametrize("form", DATA_FORMS)
def test_reference_models_run_on_every_data_form(form, calibration_data, reference_mlp, reference_cnn,
                                                 reference_token_model):
    from quanta._run.calibration import call_model

    for name, model in (("mlp", reference_mlp), ("cnn", reference_cnn), ("token", reference_token_model)):
        batches = list(calibration_data(name, form, n=2))
        outs = [call_model(model, b) for b in batches]
        assert len(outs) == 2 and all(torch.isfinite(o).all() for o in outs)
    assert [type(m).__name__ for m in reference_model("cnn").modules()].count("BatchNorm2d") == 1
