"""The symmetric scheme's grids: ``restricted`` (coremltools' PTQ), ``full`` (coremltools' GPTQ,
llm-compressor), ``auto`` (full at 4 bits and below); recipe form, fast paths and GPTQ honour them."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import quanta
from quanta import ConfigError, QuantSpec
from quanta._recipes.recipe import load_recipe, recipe_to_dict
from quanta.plugins.schemes import SymmetricConfig, SymmetricScheme
from quanta._records.qmath import to_groups
from quanta._run.weights import quantize_weight_with_values, scheme_for

logging.getLogger("coremltools").setLevel(logging.ERROR)


def _scheme(grid):
    return SymmetricScheme().with_config(SymmetricConfig(grid=grid))


@pytest.mark.parametrize("grid,dtype,expected", [
    ("restricted", "int4", (-7, 7)), ("restricted", "uint4", (0, 14)), ("restricted", "int8", (-127, 127)),
    ("full", "int4", (-8, 7)), ("full", "uint4", (0, 15)), ("full", "int8", (-128, 127)),
    ("auto", "int4", (-8, 7)), ("auto", "int3", (-4, 3)), ("auto", "int8", (-127, 127)), ("auto", "uint8", (0, 254)),
])
def test_quant_range_per_grid(grid, dtype, expected):
    assert _scheme(grid).quant_range(quanta.QuantDtype(int(dtype[-1]), not dtype.startswith("u"))) == expected


def test_default_config_is_auto_and_bad_grid_names_the_field():
    assert SymmetricScheme().config == SymmetricConfig(grid="auto")
    with pytest.raises(ConfigError, match=r"grid: unknown grid 'ful'.*did you mean 'full'"):
        SymmetricConfig(grid="ful")


def test_full_grid_qparams():
    w = torch.tensor([[-1.5, 0.2, 0.75], [0.1, -0.3, 0.0]])
    lo, hi = w.amin(1), w.amax(1)
    int4, uint4 = quanta.QuantDtype(4, True), quanta.QuantDtype(4, False)
    scale, zp = _scheme("full").qparams(lo, hi, int4)
    assert zp is None and torch.equal(scale, torch.tensor([3.0, 0.6]) / 15)
    scale_u, zp_u = _scheme("full").qparams(lo, hi, uint4)
    assert torch.equal(scale_u, scale) and torch.equal(zp_u, torch.tensor([8.0, 8.0]))
    codes = _scheme("full").quantize(w, scale[:, None], None, int4)
    assert codes.min() == -8 and codes.max() <= 7  # -max|w| reaches code -8
    codes_u = _scheme("full").quantize(w, scale_u[:, None], zp_u[:, None], uint4)
    assert torch.equal(codes_u - 8, codes)  # signed and unsigned full grids hold the same values


def test_full_grid_equals_coremltools_gptq_quantizer():
    """coremltools' GPTQ ``Quantizer`` (symmetric, 4 bits): same scale, zero point and values, bit for bit."""
    from coremltools.optimize.torch.layerwise_compression._quant import Quantizer, quantize

    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    ref = Quantizer(n_bits=4, per_channel=True, symmetric=True)
    ref.find_params(w, weight=True)
    ref_values = quantize(w, ref.scale, ref.zero_point, ref.max_q, False)
    spec = QuantSpec(dtype="uint4", scheme_config=SymmetricConfig(grid="full"))
    rec, values, _ = quantize_weight_with_values(w, spec)
    assert torch.equal(rec.scale, ref.scale) and torch.equal(rec.zero_point.float(), ref.zero_point)
    assert torch.equal(values, ref_values)


@pytest.mark.parametrize("grid", ["restricted", "full", "auto"])
@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
def test_fast_path_equals_plain_path(grid, dtype):
    """quantize_weight's in-place chunked path (quantize_into/dequantize_) gives quantize()'s codes."""
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    spec = QuantSpec(dtype=dtype, scheme_config=SymmetricConfig(grid=grid))
    scheme = scheme_for(spec)
    rec = quanta.quantize_weight(w, spec)
    groups = to_groups(w, list(rec.block_sizes))
    lo, hi = groups.amin(1), groups.amax(1)
    scale, zp = scheme.qparams(lo, hi, spec.dtype)
    codes = scheme.quantize(groups, scale[:, None], None if zp is None else zp[:, None], spec.dtype)
    assert torch.equal(rec.codes.reshape(codes.shape).float(), codes)
    qmin, qmax = scheme.quant_range(spec.dtype)
    assert int(rec.codes.min()) == qmin or int(rec.codes.max()) == qmax


def test_quanta_default_uses_16_levels_at_int4_and_127_at_int8():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32))
    int4 = quanta.records(quanta.quantize(model, {"global_config": {"weight_dtype": "int4"}}))["0.weight"]
    int8 = quanta.records(quanta.quantize(model, {"global_config": {"weight_dtype": "int8"}}))["0.weight"]
    assert int(int4.codes.min()) == -8
    assert int(int8.codes.min()) == -127 and int(int8.codes.abs().max()) == 127


def test_recipe_scheme_mapping_round_trips():
    recipe = load_recipe({"global_config": {"weight_dtype": "int4", "scheme": {"name": "symmetric", "grid": "full"}}})
    assert recipe.global_config.scheme == "symmetric"
    assert recipe.global_config.scheme_config == SymmetricConfig(grid="full")
    assert recipe.global_config.describe() == "int4 symmetric(grid=full) per_channel"
    assert load_recipe(recipe_to_dict(recipe)) == recipe
    with pytest.raises(ConfigError, match=r"global_config.scheme.gird: unknown option 'gird'.*did you mean 'grid'"):
        load_recipe({"global_config": {"scheme": {"name": "symmetric", "gird": "full"}}})
    with pytest.raises(ConfigError, match=r"global_config.scheme.grid: unknown grid 'fll'"):
        load_recipe({"global_config": {"scheme": {"name": "symmetric", "grid": "fll"}}})
    with pytest.raises(ConfigError, match="scheme 'affine' takes no options"):
        load_recipe({"global_config": {"scheme": {"name": "affine", "grid": "full"}}})


@pytest.mark.parametrize("grid,qmin", [("restricted", -7), ("full", -8)])
def test_gptq_honours_the_grid(grid, qmin):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    data = [torch.randn(8, 64) for _ in range(4)]
    recipe = {"algorithm": "gptq", "global_config": {"weight_dtype": "int4",
                                                     "scheme": {"name": "symmetric", "grid": grid}}}
    recs = quanta.records(quanta.quantize(model, recipe, data=data))
    assert min(int(r.codes.min()) for r in recs.values()) == qmin
    for rec in recs.values():  # the stored codes decode to the weights the model computes with
        assert rec.codes.min() >= qmin and rec.codes.max() <= 7
