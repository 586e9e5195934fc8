"""Through ``quanta.compat``, RTN codes, scales and zero points equal coremltools.optimize's, bit for bit.

quanta's own symmetric default uses 16 levels at int4 (grid ``auto``); ``quanta.compat`` pins
coremltools' restricted grid, so every comparison here goes through it.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from coremltools.optimize import _utils as ct_utils
from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

import quanta
from quanta import QuantSpec
from quanta.compat import PostTrainingQuantizer as CompatPTQ
from quanta.compat import PostTrainingQuantizerConfig as CompatConfig

logging.getLogger("coremltools").setLevel(logging.ERROR)

DTYPES = ["int8", "uint8", "int4", "uint4"]
SCHEMES = ["symmetric", "affine"]
MODES = {"symmetric": "LINEAR_SYMMETRIC", "affine": "LINEAR"}


def _coreml_reference(weight: np.ndarray, dtype: str, scheme: str, block_sizes):
    bits = int(dtype[-1])
    return ct_utils.compute_qparams(weight, nbits=bits, signed=not dtype.startswith("u"),
                                    quantization_mode=MODES[scheme], dtype=None, block_sizes=list(block_sizes))


def _compat_spec(dtype, scheme="symmetric", granularity="per_channel", block_size=None) -> QuantSpec:
    """The spec quanta.compat builds from coremltools' layer options."""
    glob = {"weight_dtype": dtype, "quantization_scheme": scheme, "granularity": granularity}
    if block_size:
        glob["block_size"] = block_size
    return CompatConfig.from_dict({"global_config": glob}).to_recipe().global_config


def _assert_same(weight: torch.Tensor, spec: QuantSpec, channel_axis=0, input_axis=1):
    rec = quanta.quantize_weight(weight, spec, channel_axis=channel_axis, input_axis=input_axis)
    codes, scale, zp = _coreml_reference(weight.numpy(), str(spec.dtype), spec.scheme, rec.block_sizes)
    np.testing.assert_array_equal(rec.codes.numpy(), codes)
    np.testing.assert_array_equal(rec.scale.numpy(), scale.astype(np.float32))
    if zp is None:
        assert rec.zero_point is None
    else:
        np.testing.assert_array_equal(rec.zero_point.numpy(), zp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,block_size", [("per_channel", None), ("per_block", 32), ("per_tensor", None)])
def test_random_weights_match_coremltools(dtype, scheme, granularity, block_size):
    torch.manual_seed(hash((dtype, scheme, granularity)) % 1000)
    spec = _compat_spec(dtype, scheme, granularity, block_size)
    _assert_same(torch.randn(96, 128) * 0.05, spec)
    _assert_same(torch.randn(64, 256).exp() - 1.0, spec)  # skewed: affine zero points away from the middle
    if granularity != "per_block":
        _assert_same(torch.randn(16, 8, 3, 3), spec)  # conv
        _assert_same(torch.randn(8, 16, 3, 3), spec, channel_axis=1, input_axis=0)  # conv transpose


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity,block_size", [("per_channel", None), ("per_block", 32)])
def test_post_training_quantizer_identical(dtype, scheme, granularity, block_size):
    """The whole-model path: quanta.quantize vs coremltools' PostTrainingQuantizer on the same model."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32),
                                torch.nn.Conv1d(32, 32, 1))
    glob = {"weight_dtype": dtype, "quantization_scheme": scheme, "granularity": granularity}
    if block_size:
        glob["block_size"] = block_size
    ref = PostTrainingQuantizer(copy.deepcopy(model), PostTrainingQuantizerConfig.from_dict({"global_config": glob})).compress()
    ours = CompatPTQ(model, CompatConfig.from_dict({"global_config": glob})).compress()
    recs = quanta.records(ours)
    for name, module in ref.named_modules():
        scale = getattr(module, "_COREML_/weight/quantization_scale", None)
        if scale is None:
            continue
        assert torch.equal(scale, recs[f"{name}.weight"].scale), name
        assert torch.equal(module.weight, dict(ours.named_modules())[name].weight), name
        zp = getattr(module, "_COREML_/weight/zero_point", None)
        if zp is not None:
            assert torch.equal(zp.to(torch.int32), recs[f"{name}.weight"].zero_point.to(torch.int32)), name
    assert len(recs) == 3


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ("int8", "symmetric", "per_channel", None),
    ("int4", "symmetric", "per_block", 32),
    ("uint4", "affine", "per_block", 32),
    ("int8", "affine", "per_tensor", None),
])
def test_real_pretrained_weights_match_coremltools(options):
    """Every Linear weight of the real all-MiniLM-L6-v2 encoder."""
    from quanta.examples import load_example

    spec = _compat_spec(*options)
    model = load_example("minilm").model
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            _assert_same(module.weight.detach(), spec)
            n += 1
    assert n == 37
