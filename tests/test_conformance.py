"""Every built-in plugin passes quanta's own conformance kit (``quanta.testing``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import quanta
from quanta import registry
from quanta.testing import (check_algorithm, check_backend, check_exporter, check_observer, check_scheme,
                            reference_model)


def _builtins(kind: str) -> list[str]:
    return [e.name for e in registry.entries(kind) if e.distribution == "quanta"]


def test_every_kind_has_builtins_to_check():
    assert all(_builtins(kind) for kind in registry.KINDS)


@pytest.mark.parametrize("name", _builtins("scheme"))
def test_builtin_scheme_conforms(name):
    check_scheme(registry.get("scheme", name).obj)


@pytest.mark.parametrize("grid", ["auto", "restricted", "full"])
def test_symmetric_scheme_conforms_with_every_grid_option(grid):
    scheme = registry.get("scheme", "symmetric").obj
    check_scheme(scheme.with_config(scheme.config_class(grid=grid)))


@pytest.mark.parametrize("name", _builtins("observer"))
def test_builtin_observer_conforms(name):
    check_observer(registry.get("observer", name).obj)


@pytest.mark.parametrize("name", _builtins("observer"))
def test_builtin_observer_conforms_with_the_affine_scheme(name):
    check_observer(registry.get("observer", name).obj, scheme=registry.get("scheme", "affine").obj)


def test_observers_conform_with_options():
    check_observer(registry.get("observer", "percentile").obj.with_config(
        registry.get("observer", "percentile").config_class(percentile=90.0)))
    check_observer(registry.get("observer", "mse").obj.with_config(
        registry.get("observer", "mse").config_class(grid=8, min_ratio=0.2, norm=2.4)))


_SLOW_ALGORITHMS = {"calibrate"}  # torch.fx tracing and finalizing on three models: ~7 s


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_ALGORITHMS else n
                                  for n in _builtins("algorithm")])
def test_builtin_algorithm_conforms(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrate notes float parts; not what is checked here
        check_algorithm(registry.get("algorithm", name).obj)


def test_gptq_options_reach_it_in_every_form():
    check_algorithm(registry.get("algorithm", "gptq").obj, models=("mlp",),
                    options={"calibration_nsamples": 2, "hessian_dampening": 0.05})


@pytest.mark.parametrize("model", ["mlp", "cnn", "token"])
def test_torch_backend_conforms(model):
    check_backend(registry.get("backend", "torch").obj, reference_model(model))


@pytest.mark.slow
def test_coreml_backend_conforms(tmp_path):
    ct = pytest.importorskip("coremltools")
    model = reference_model("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(torch.jit.trace(model, torch.randn(1, 64)), inputs=[ct.TensorType(shape=(1, 64))],
                             convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
        path = tmp_path / "mlp.mlpackage"
        mlmodel.save(str(path))
        check_backend(registry.get("backend", "coreml").obj, str(path))


def _tiny_llama_int8():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return quanta.quantize(model, {"global_config": {"dtype": "int8"}, "module_type_configs": {"Embedding": None},
                                   "module_name_configs": {"lm_head": None}})


def _reread_compressed_tensors_int8(path):
    """Codes of an int8 pack-quantized directory, read with safetensors alone: each int32 word
    holds four little-endian bytes, each ``code + 128``."""
    from safetensors.torch import load_file

    out = {}
    for shard in Path(path).glob("*.safetensors"):
        for key, tensor in load_file(str(shard)).items():
            if key.endswith(".weight_packed"):
                codes = tensor.contiguous().view(torch.uint8).to(torch.int16) - 128
                out[key[: -len("_packed")]] = codes.to(torch.int8)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "coreml" else n
                                  for n in _builtins("exporter")])
def test_builtin_exporter_conforms(name, tmp_path):
    exporter = registry.get("exporter", name).obj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "coreml":
            pytest.importorskip("coremltools")
            check_exporter(exporter, tmp_path)
        elif name == "compressed-tensors":
            check_exporter(exporter, tmp_path, model=_tiny_llama_int8(), reread=_reread_compressed_tensors_int8)
        else:
            pytest.fail(f"no conformance check for the built-in exporter {name!r}: add one here")
