"""quanta's fp16 cast pass (plugins/coreml/fp16_cast.py): coremltools' ``add_fp16_cast`` with a
chunked overflow scan gives the same answers and the same converted programs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools")

from quanta.plugins.coreml import fp16_cast  # noqa: E402
from quanta.plugins.coreml.exporter import conversion_pass_pipeline  # noqa: E402


def _coremltools_test(value) -> bool:
    # coremltools 9.0's FP16ComputePrecision.fp16_overflow on one constant.
    abs_value = np.abs(np.expand_dims(value, 0))
    return bool(np.max(abs_value[np.where(abs_value < 1e38)], initial=0.0) > 65504)


PLANTED = [0.0, -0.0, 1.0, 65504.0, np.nextafter(np.float32(65504), np.float32(np.inf)), -70000.0, 3e37,
           9.9e37, 1e38, -1e38, 2e38, np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("size", [1, 7, 65536, 65537, 200_003])
@pytest.mark.parametrize("planted", PLANTED)
def test_overflows_fp16_answers_as_coremltools_anywhere_in_the_constant(size, planted):
    rng = np.random.default_rng(size)
    for where in {0, size // 2, size - 1}:
        value = rng.standard_normal(size).astype(np.float32) * 100
        value[where] = planted
        assert fp16_cast.overflows_fp16(value) == _coremltools_test(value), (size, planted, where)
        shaped = value.reshape(-1, 1) if size % 2 else value
        assert fp16_cast.overflows_fp16(shaped) == _coremltools_test(shaped)
    scalar = np.float32(planted)
    assert fp16_cast.overflows_fp16(scalar) == _coremltools_test(scalar)


def test_overflows_fp16_with_nan_beside_an_overflow_in_one_chunk():
    value = np.zeros(70_000, dtype=np.float32)
    value[10], value[11] = np.nan, 1e5  # the chunk's max is NaN: the exact test still finds 1e5
    assert fp16_cast.overflows_fp16(value) and _coremltools_test(value)
    value[11] = 0.0
    assert not fp16_cast.overflows_fp16(value) and not _coremltools_test(value)


class _Consts(nn.Module):
    """A table of 2 chunks, a constant above fp16's range (its op stays fp32), one that underflows
    in fp16 (coremltools nudges it to the smallest fp16), and ordinary layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(1100, 128)
        self.fc = nn.Linear(128, 16)

    def forward(self, ids):
        h = self.table(ids)
        big = h * 1.0e5 - 7.0e4  # constants beyond 65504
        tiny = h + 1.0e-9  # a constant that is 0 in fp16
        return self.fc(big.mean(-1, keepdim=True) * tiny)


def _convert(pipeline, precision):
    ids = torch.randint(0, 1100, (2, 5))
    traced = torch.jit.trace(_Consts().eval(), (ids,))
    model = ct.convert(traced, inputs=[ct.TensorType(name="ids", shape=(2, 5), dtype=np.int32)],
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=precision, pass_pipeline=pipeline, skip_model_load=True)
    return str(model.get_spec())


@pytest.mark.slow
def test_quantas_pass_converts_exactly_as_coremltools_pass():
    def default():
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes(["common::int_op_canonicalization"])
        return pipeline

    ours = conversion_pass_pipeline("float16")
    assert fp16_cast.PASS_NAME in ours.passes and "common::add_fp16_cast" not in ours.passes
    expected = _convert(default(), ct.precision.FLOAT16)
    assert "fp32" in expected and "fp16" in expected  # both precisions in the program: the test sees a choice
    assert _convert(ours, ct.precision.FLOAT16) == expected

    def selector(op):  # an op_selector, as the exporter's compute_precision "auto" passes one
        return op.op_type != "linear"

    assert (_convert(conversion_pass_pipeline("float16", selector), ct.precision.FLOAT16)
            == _convert(default(), ct.transform.FP16ComputePrecision(op_selector=selector)))
    fp32 = conversion_pass_pipeline("float32")
    assert not {fp16_cast.PASS_NAME, "common::add_fp16_cast"} & set(fp32.passes)
    assert _convert(fp32, ct.precision.FLOAT32) == _convert(default(), ct.precision.FLOAT32)


@pytest.mark.slow
def test_an_unchecked_coremltools_release_keeps_coremltools_pass(monkeypatch):
    monkeypatch.setattr(fp16_cast, "CHECKED_VERSIONS", ("0.1",))
    pipeline = conversion_pass_pipeline("float16", lambda op: op.op_type != "linear")
    assert "common::add_fp16_cast" in pipeline.passes and fp16_cast.PASS_NAME not in pipeline.passes
    assert [o.option_name for o in pipeline.get_options("common::add_fp16_cast")] == ["op_selector"]
    _convert(pipeline, ct.precision.FLOAT16)  # a valid pipeline for ct.convert
