"""Backend ``coreml`` and ``quanta.compat.coreml``: quantizing existing Core ML models equals coremltools."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quanta

ct = pytest.importorskip("coremltools")
import coremltools.optimize as ct_optimize  # noqa: E402

import quanta.compat as cto  # noqa: E402
from quanta.mil.program import read_compressed_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _convert(model, x, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(torch.jit.trace(model.eval(), x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                          minimum_deployment_target=target)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 64))
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 32))
    out = {"cnn": _convert(cnn, torch.randn(1, 3, 8, 8), ct.target.iOS18),
           "mlp": _convert(mlp, torch.randn(1, 64), ct.target.iOS18),
           "mlp16": _convert(mlp, torch.randn(1, 64), ct.target.iOS16)}
    path = tmp_path_factory.mktemp("pkg") / "mlp.mlpackage"
    out["mlp"].save(str(path))
    out["mlp_path"] = str(path)
    return out


def _assert_same(ours, theirs):
    a, b = read_compressed_weights(ours), read_compressed_weights(theirs)
    assert sorted(a) == sorted(b) and a
    for k in a:
        assert a[k].op_type == b[k].op_type and a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k].data, b[k].data), k
        assert a[k].scale.dtype == b[k].scale.dtype and np.array_equal(a[k].scale, b[k].scale), k
        assert (a[k].zero_point is None) == (b[k].zero_point is None), k
        if a[k].zero_point is not None:
            assert np.array_equal(a[k].zero_point, b[k].zero_point), k


def _both(model, **kwargs):
    ours = cto.coreml.linear_quantize_weights(
        model, cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(**kwargs)))
    theirs = ct_optimize.coreml.linear_quantize_weights(
        model, ct_optimize.coreml.OptimizationConfig(global_config=ct_optimize.coreml.OpLinearQuantizerConfig(**kwargs)))
    return ours, theirs


@pytest.mark.parametrize("name,mode,dtype,granularity", [
    (n, m, d, g) for n, m, d, g in itertools.product(
        ["cnn", "mlp"], ["linear_symmetric", "linear"], ["int8", "int4", "uint4"], ["per_channel", "per_block"])
    if not (n == "cnn" and d == "uint4")])
def test_equals_coremltools(models, name, mode, dtype, granularity):
    kwargs = dict(mode=mode, dtype=dtype, granularity=granularity, weight_threshold=512)
    if granularity == "per_block":
        kwargs["block_size"] = 16
    _assert_same(*_both(models[name], **kwargs))


def test_equals_coremltools_ios16_per_tensor_and_uint8(models):
    _assert_same(*_both(models["mlp16"], mode="linear", dtype="uint8", granularity="per_tensor", weight_threshold=0))
    _assert_same(*_both(models["mlp16"], mode="linear_symmetric", dtype="int8", weight_threshold=0))


def test_weight_threshold_boundary(models):
    # Layers of 8192, 12288 and 3072 elements: at exactly the threshold coremltools keeps a weight float.
    ours, theirs = _both(models["mlp"], weight_threshold=8192)
    _assert_same(ours, theirs)
    assert [w.shape for w in read_compressed_weights(ours).values()] == [(96, 128)]


def test_op_type_and_op_name_configs(models):
    model = models["cnn"]
    consumers = quanta.registry.get("backend", "coreml").obj.consumer_names(model)
    conv_name = next(n for n in consumers if "input" in n)
    def build(mod):
        cfg = mod.OptimizationConfig(global_config=mod.OpLinearQuantizerConfig(mode="linear", weight_threshold=0))
        cfg.set_op_type("linear", mod.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=16,
                                                              weight_threshold=0))
        cfg.set_op_name(conv_name, None)
        return cfg
    ours = cto.coreml.linear_quantize_weights(model, build(cto.coreml))
    theirs = ct_optimize.coreml.linear_quantize_weights(model, build(ct_optimize.coreml))
    _assert_same(ours, theirs)
    assert sorted(w.dtype for w in read_compressed_weights(ours).values()) == ["int4", "int4", "int8"]


def test_quanta_quantize_on_a_path_leaves_the_package_alone(models, tmp_path):
    path = models["mlp_path"]
    before = read_compressed_weights(path)
    result = quanta.quantize(path, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}})
    assert read_compressed_weights(path) == before == {}
    assert len(result.quanta_report.layers) == 3
    out = result.save(tmp_path / "q.mlpackage")
    stored = read_compressed_weights(out)
    assert len(stored) == 3 and all(w.dtype == "int4" for w in stored.values())


def test_too_low_target_is_refused(models):
    with pytest.raises(quanta.ConfigError, match="iOS18"):
        quanta.quantize(models["mlp16"], {"global_config": {"dtype": "int4"}})


def test_inplace_is_refused(models):
    with pytest.raises(quanta.ConfigError, match="inplace"):
        quanta.quantize(models["mlp"], {"global_config": {"dtype": "int8"}}, inplace=True)


def test_plan_lists_consts_by_consumer_type(models):
    plan = quanta.plan(models["cnn"], {"module_type_configs": {"conv": {"dtype": "int8"}}}, backend="coreml")
    assert [p.unit.module_type for p in plan.selected] == ["conv", "conv"]
