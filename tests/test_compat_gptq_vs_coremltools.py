"""The seed's GPTQ dict through ``quanta.compat`` beside real ``coremltools.optimize.torch`` on the
same model and data: the digits MLP (trained here on scikit-learn's handwritten digits, real data).

coremltools 9.0 rejects the seed's own ``weight_dtype: 4`` (TypeError: dtype must be a string or a
torch.dtype), so it gets ``"uint4"``, its meaning (16 levels, zero point 8); quanta.compat takes 4.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import quanta

logging.getLogger("coremltools").setLevel(logging.ERROR)

SEED_GPTQ = {"global_config": {"algorithm": "gptq", "weight_dtype": 4, "granularity": "per_block", "block_size": 128},
             "input_cacher": "default", "calibration_nsamples": 16}


def _output_error(model, reference, data) -> float:
    with torch.no_grad():
        return float(sum((model(x) - reference(x)).pow(2).sum() for x in data)
                     / sum(reference(x).pow(2).sum() for x in data))


@pytest.mark.slow
def test_seed_gptq_dict_matches_coremltools_on_digits():
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor as CtCompressor
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressorConfig as CtConfig

    from quanta.compat import LayerwiseCompressor, LayerwiseCompressorConfig
    from quanta.examples import load_example

    example = load_example("digits")
    model, data = example.model, example.data
    ct_dict = {**SEED_GPTQ, "global_config": {**SEED_GPTQ["global_config"], "weight_dtype": "uint4"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="dtype must either be a string"):
            CtConfig.from_dict(SEED_GPTQ)  # coremltools' own documentation dict
        theirs = CtCompressor(copy.deepcopy(model), CtConfig.from_dict(ct_dict)).compress(data, device="cpu")
        ours = LayerwiseCompressor(copy.deepcopy(model), LayerwiseCompressorConfig.from_dict(SEED_GPTQ)).compress(data)
        restricted = quanta.quantize(copy.deepcopy(model), {
            "algorithm": "gptq", "calibration_nsamples": 512, "on_unsupported_layer": "skip",
            "use_activation_order_heuristic": False, "static_groups": False,  # coremltools' settings but the grid
            "global_config": {"weight_dtype": 4, "granularity": "per_block", "block_size": 128,
                              "scheme": {"name": "symmetric", "grid": "restricted"}}}, data=data)
    assert set(quanta.records(ours)) == {"2.weight"}  # the one layer with 128 inputs, as coremltools
    err_theirs, err_ours = _output_error(theirs, model, data), _output_error(ours, model, data)
    assert err_ours <= err_theirs * (1 + 1e-6)
    # Same grid and Hessian convention: the same GPTQ solution, weight for weight.
    assert torch.equal(ours[2].weight, theirs[2].weight)
    scale = getattr(theirs[2], "_COREML_/weight/quantization_scale")
    assert torch.equal(quanta.records(ours)["2.weight"].scale, scale)
    # The grid is what mattered: coremltools' PTQ grid (15 levels) costs GPTQ >10% more error here.
    assert _output_error(restricted, model, data) > 1.1 * err_theirs
