"""A weight quantized to code 0 dequantizes to 0.0, never -0.0 (as coremltools' codes times scale).

``torch.equal`` calls -0.0 and 0.0 equal, so these compare bit patterns.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import quanta


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False), torch.nn.Linear(128, 64, bias=False))
    with torch.no_grad():
        for lin in model:
            lin.weight[:, :8] = -1e-6  # small negatives round to code 0 from the negative side
    return model


@pytest.mark.parametrize("glob", [{"weight_dtype": "int8", "granularity": "per_channel"},
                                  {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32}])
def test_rtn_writes_no_negative_zero(glob):
    out = quanta.quantize(_model(), {"global_config": glob})
    for lin in out:
        w = lin.weight.detach()
        assert bool((w == 0).any())
        assert not bool(torch.signbit(w[w == 0]).any())


def test_gptq_writes_no_negative_zero():
    torch.manual_seed(1)
    data = [torch.randn(16, 256) for _ in range(2)]
    out = quanta.quantize(_model(), {"algorithm": "gptq", "global_config": {"weight_dtype": "int4"}}, data)
    for lin in out:
        w = lin.weight.detach()
        assert not bool(torch.signbit(w[w == 0]).any())


def test_int8_rtn_bit_identical_to_coremltools():
    """int8 per-channel: quanta.quantize's default grid is coremltools' (-127..127), so the
    dequantized weights are the same bits, zeros included."""
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    model = _model()
    glob = {"weight_dtype": "int8", "granularity": "per_channel"}
    ref = PostTrainingQuantizer(copy.deepcopy(model), PostTrainingQuantizerConfig.from_dict({"global_config": glob})).compress()
    ours = quanta.quantize(model, {"global_config": glob})
    for a, b in zip(ref, ours):
        assert torch.equal(_bits(a.weight), _bits(b.weight))
