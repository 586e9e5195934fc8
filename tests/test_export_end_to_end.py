"""Issue #4's 'done when': RTN, GPTQ, QAT and W8A8 results export to .mlpackage, read back on
Linux with quanta's exact codes, and run through the reference runner close to the torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quanta
from quanta.mil.program import read_compressed_weights

from _fx_helpers import DigitsCNN, train

pytestmark = pytest.mark.slow


def _stored_equals_records(path, model):
    stored = read_compressed_weights(str(path))
    recs = quanta.records(model)
    assert len(stored) >= len(recs) > 0
    by_shape = {}
    for w in stored.values():
        by_shape.setdefault(tuple(w.shape), []).append(w)
    for name, rec in recs.items():
        candidates = by_shape[tuple(rec.codes.shape)]
        assert any(np.array_equal(np.asarray(w.data).astype(np.int32).reshape(rec.codes.shape),
                                  rec.codes.numpy().astype(np.int32)) for w in candidates), name


def test_gptq_model_exports_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    data = [torch.randn(16, 64) for _ in range(8)]
    q = quanta.quantize(model, {"algorithm": "gptq", "calibration_nsamples": 8 * 16,
                                "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}},
                        data=data)
    x = torch.randn(4, 64)
    path = quanta.export(q, tmp_path / "gptq.mlpackage", example_inputs=(x,))
    _stored_equals_records(path, q)
    figures = quanta.verify(path, q, example_inputs=(x,))
    assert figures["cosine"] > 0.9999 and figures["max_rel"] < 5e-3, figures


def _digits_batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(16, 1, 8, 8, generator=g) for _ in range(n)]


def test_qat_model_exports_with_activation_ops(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN()
    q = quanta.Quantizer(model, {"global_config": {"milestones": [0, 0, 1000, 1000]}})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    train(gm, x, y, epochs=2, batch=32, quantizer=q)
    fm = q.finalize()
    example = torch.rand(16, 1, 8, 8)
    path = quanta.export(fm, tmp_path / "qat.mlpackage", example_inputs=(example,))
    _stored_equals_records(path, fm)
    from quanta.mil.program import load_program

    ops = {op.op_type for op in load_program(str(path)).functions["main"].operations}
    assert {"quantize", "dequantize"} <= ops
    figures = quanta.verify(path, fm, example_inputs=(example,))
    # fp16 arithmetic in the program can move an activation across a rounding boundary, which
    # changes that activation by one quantization step: close, not bit-equal.
    assert figures["cosine"] > 0.995, figures


def test_calibrated_w8a8_model_exports(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    q = quanta.quantize(model, {"algorithm": "calibrate"}, data=_digits_batches())
    example = torch.rand(1, 1, 8, 8)
    path = quanta.export(q, tmp_path / "w8a8.mlpackage", example_inputs=(example,))
    _stored_equals_records(path, q)
    figures = quanta.verify(path, q, example_inputs=(example,))
    assert figures["cosine"] > 0.999, figures
