"""The plugins of docs/plugins.md, executed from their files under docs/examples/ (the page
includes those same files), run through quanta and ``quanta.testing``."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import quanta
from quanta.errors import ConfigError
from quanta.testing import (calibration_data, check_algorithm, check_exporter, check_observer, check_scheme,
                            reference_model)

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
PLUGINS_MD = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


def _load(stem: str):
    spec = importlib.util.spec_from_file_location(f"docs_example_{stem}", EXAMPLES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_file_is_included_in_plugins_md(path):
    assert f'--8<-- "docs/examples/{path.name}"' in PLUGINS_MD


def test_pow2_scheme_passes_the_kit_and_quantizes(register_plugin):
    mod = register_plugin(_load("pow2_scheme"))
    check_scheme(mod.PowerOfTwoScheme())
    q = quanta.quantize(reference_model("mlp"), {"global_config": {"dtype": "int4", "scheme": "pow2"}})
    scale = quanta.records(q)["0.weight"].scale
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


@pytest.fixture
def nf4(register_plugin):
    return register_plugin(_load("nf4_scheme"))


def test_nf4_scheme_passes_the_kit(nf4):
    check_scheme(nf4.NF4Scheme())


def test_nf4_parameters_equal_their_records_and_core_ml_refuses_it(nf4, tmp_path):
    model = reference_model("mlp")
    recipe = {"global_config": {"dtype": "uint4", "scheme": "nf4", "granularity": "per_block", "block_size": 16}}
    q = quanta.quantize(model, recipe)
    for key, record in quanta.records(q).items():
        assert record.grid == "lut"
        module = q.get_submodule(key.rsplit(".", 1)[0])
        assert torch.equal(module.weight, record.dequantize())
    with pytest.raises(ConfigError, match=r"scheme 'nf4' refuses int8.*use dtype uint4"):
        quanta.plan(model, {"global_config": {"dtype": "int8", "scheme": "nf4"}})
    with pytest.raises(ConfigError, match=r"'lut'-grid record.*nothing was written"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=(torch.randn(1, 64),))
    assert list(tmp_path.iterdir()) == []


def test_sigma_observer_passes_the_kit_with_its_options(register_plugin):
    mod = register_plugin(_load("sigma_observer"))
    check_observer(mod.SigmaObserver())
    check_observer(mod.SigmaObserver().with_config(mod.SigmaConfig(sigmas=1.5)))


def test_sigma_observer_options_come_from_the_recipe(register_plugin):
    register_plugin(_load("sigma_observer"))
    model = reference_model("mlp")
    q = quanta.quantize(model, {"global_config": {"observer": {"name": "sigma", "sigmas": 1.0}}})
    spec = quanta.records(q)["0.weight"].spec
    assert spec.observer_config.sigmas == 1.0
    wide = quanta.quantize(model, {"global_config": {"observer": "sigma"}})
    assert not torch.equal(quanta.records(q)["0.weight"].scale, quanta.records(wide)["0.weight"].scale)
    with pytest.raises(ConfigError, match=r"unknown option 'sigma'.*did you mean 'sigmas'"):
        quanta.load_recipe({"global_config": {"observer": {"name": "sigma", "sigma": 2}}})
    with pytest.raises(ConfigError, match="must be a positive number"):
        quanta.load_recipe({"global_config": {"observer": {"name": "sigma", "sigmas": -1}}})


@pytest.fixture
def act_scale(register_plugin):
    return register_plugin(_load("act_scale_algorithm"))


def test_act_scale_passes_the_kit_chained_before_gptq(act_scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_algorithm(act_scale.ActScale(), models=("mlp", "token"), then="gptq", options={"alpha": 0.3})


def test_act_scale_keeps_the_float_function_and_declares_its_state(act_scale):
    model = reference_model("token")
    data = calibration_data("token", "dict")
    scaled = quanta.quantize(model, {"stages": [{"algorithm": "act_scale", "alpha": 0.5}]}, data=data)
    x = calibration_data("token", "list", n=1, seed=1)[0]
    assert torch.allclose(scaled(x), model(x), atol=1e-5)
    assert set(quanta.record.extra_state(scaled)) == {"proj.input_scale", "head.input_scale"}
    q = quanta.quantize(model, {"stages": [{"algorithm": "act_scale"}, {"algorithm": "gptq"}],
                                "global_config": {"dtype": "int4"}}, data=data)
    assert q.quanta_report.algorithm == "act_scale -> gptq" and q.quanta_report.stats["act_scale_layers"] == 2
    assert set(quanta.records(q)) >= {"proj.weight", "head.weight"}


def test_npz_exporter_passes_the_kit(register_plugin, tmp_path):
    mod = register_plugin(_load("npz_exporter"))
    check_exporter(mod.NpzExporter(), tmp_path, reread=mod.read_npz)


def test_npz_exporter_options(register_plugin, tmp_path):
    mod = register_plugin(_load("npz_exporter"))
    q = quanta.quantize(reference_model("mlp"), {})
    path = quanta.export(q, tmp_path / "m.npz", format="npz", compressed=False, scale_dtype="float16")
    with np.load(path) as archive:
        assert archive["0.weight.scale"].dtype == np.float16
        assert np.array_equal(archive["0.weight.codes"], quanta.records(q)["0.weight"].codes.numpy())
    with pytest.raises(ConfigError, match=r"export.compresed.*did you mean 'compressed'"):
        quanta.load_recipe({"export": {"format": "npz", "compresed": False}})


def test_npz_exporter_adds_its_cli_option(register_plugin, tmp_path, capsys):
    from quanta._cli import main

    register_plugin(_load("npz_exporter"))
    q = quanta.quantize(reference_model("mlp"), {})
    saved = quanta.save(q, tmp_path / "saved", rebuild={"factory": "quanta.testing:reference_model",
                                                         "kwargs": {"name": "mlp"}},
                        example_inputs=torch.zeros(1, 64))
    assert main(["-q", "export", str(saved), "--factory", "quanta.testing:reference_model", "-o", str(tmp_path / "m.npz"),
                 "--format", "npz", "--no-compress"]) == 0
    with open(tmp_path / "m.npz", "rb") as f:  # np.savez (stored), not np.savez_compressed (deflated)
        import zipfile

        assert {i.compress_type for i in zipfile.ZipFile(f).infolist()} == {zipfile.ZIP_STORED}


@pytest.fixture
def kmeans(register_plugin):
    return register_plugin(_load("kmeans_lut_scheme"))


def test_kmeans_lut_scheme_passes_the_kit(kmeans):
    check_scheme(kmeans.KMeansScheme(), dtypes=["uint2", "uint3", "uint4", "int4"])


def test_kmeans_lut_scheme_fills_its_table_without_a_companion_algorithm(kmeans, tmp_path):
    model = reference_model("mlp")
    rtn = {"global_config": {"dtype": "uint3", "scheme": "affine", "granularity": "per_channel"}}
    recipe = {"global_config": {"dtype": "uint3", "scheme": {"name": "kmeans", "iterations": 12},
                                "granularity": "per_channel"}}
    q = quanta.quantize(model, recipe)
    for key, record in quanta.records(q).items():
        assert record.grid == "lut" and record.lut.shape == (record.shape[0], 8)  # one 8-level table per channel
        assert torch.equal(q.get_submodule(key.rsplit(".", 1)[0]).weight, record.dequantize())
    affine = quanta.quantize(model, rtn)
    for mine, theirs in zip(q.quanta_report.layers, affine.quanta_report.layers):
        assert mine.rel_error < theirs.rel_error  # its own levels beat uniform ones
    loaded = quanta.load(quanta.save(q, tmp_path / "m"), reference_model("mlp"))
    assert torch.equal(quanta.records(loaded)["0.weight"].lut, quanta.records(q)["0.weight"].lut)
    x = calibration_data("mlp", "list", n=1)[0]
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(ConfigError, match=r"scheme 'kmeans' refuses int4.*use an unsigned dtype"):
        quanta.plan(model, {"global_config": {"dtype": "int4", "scheme": "kmeans"}})


@pytest.fixture
def bias_correction(register_plugin):
    return register_plugin(_load("bias_correction"))


def test_bias_correction_runs_after_rtn_and_passes_the_kit(bias_correction):
    check_algorithm(bias_correction.BiasCorrection(), models=("mlp", "token"), before=["rtn"])


def test_bias_correction_reads_the_float_model_and_its_bias_travels(bias_correction, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    data = [torch.randn(8, 16) + 0.5 for _ in range(4)]
    x = torch.randn(64, 16) + 0.5
    recipe = {"global_config": {"dtype": "int2"}}
    errors = {}
    for stages in (["rtn"], ["rtn", "bias_correction"]):
        q = quanta.quantize(model, {**recipe, "stages": stages}, data=data)
        with torch.no_grad():
            errors[len(stages)] = float((q(x) - model(x)).mean(dim=0).abs().mean())
    assert errors[2] < 0.7 * errors[1]  # the mean output shift the quantization caused is mostly corrected
    assert model[0].bias is None and isinstance(q[0].bias, torch.nn.Parameter)  # added on the copy only
    loaded = quanta.load(quanta.save(q, tmp_path / "m"), torch.nn.Sequential(
        torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 8)))
    assert torch.equal(loaded(x), q(x))
    inplace = quanta.quantize(model, {**recipe, "stages": ["rtn", "bias_correction"]}, data=data, inplace=True)
    assert inplace is model and torch.equal(inplace(x), q(x))  # a float copy was kept: reads_float = True
