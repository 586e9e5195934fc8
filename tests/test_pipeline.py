"""quanta.quantize semantics: copies, inplace, rollback on failure, reports, plan."""

from __future__ import annotations

import copy

import pytest
import torch

import quanta
from quanta import QuantizationError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_untouched_unless_inplace(small_model):
    before = _state(small_model)
    q = quanta.quantize(small_model, {"global_config": {"dtype": "int4"}})
    assert _same(before, _state(small_model)) and not quanta.records(small_model)
    assert set(quanta.records(q)) == {"0.weight", "3.weight", "5.weight"}
    same = quanta.quantize(small_model, {"global_config": {"dtype": "int4"}}, inplace=True)
    assert same is small_model and set(quanta.records(small_model)) == {"0.weight", "3.weight", "5.weight"}


def test_failure_midway_restores_an_inplace_model(small_model):
    with torch.no_grad():
        small_model[5].weight[0, 0] = float("nan")  # the last layer fails after two were written
    before = _state(small_model)
    with pytest.raises(QuantizationError, match="layer '5'.*NaN"):
        quanta.quantize(small_model, {"global_config": {}}, inplace=True)
    after = _state(small_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    assert not quanta.records(small_model)
    assert not any("_quanta_" in k for k in small_model.state_dict())


def test_failure_leaves_previous_records_intact(small_model):
    quanta.quantize(small_model, {"global_config": {"dtype": "int8"}}, inplace=True)
    before = _state(small_model)
    bad = copy.deepcopy(small_model)
    with torch.no_grad():
        bad[5].weight[1, 1] = float("inf")
    snapshot = _state(bad)
    with pytest.raises(QuantizationError):
        quanta.quantize(bad, {"global_config": {"dtype": "int4"}}, inplace=True)
    after = _state(bad)
    assert snapshot.keys() == after.keys()
    assert all(torch.equal(snapshot[k].nan_to_num(), after[k].nan_to_num()) for k in snapshot)
    assert str(quanta.records(bad)["0.weight"].spec.dtype) == "int8"
    assert _same(before, _state(small_model))


def test_report_figures(small_model):
    q = quanta.quantize(small_model, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 4}})
    report = q.quanta_report
    row = report["3"]
    w = small_model[3].weight.detach()
    expected = float((quanta.records(q)["3.weight"].dequantize() - w).norm() / w.norm())
    assert row.rel_error == pytest.approx(expected, rel=1e-6) and 0 < row.rel_error < 0.2
    assert row.bytes == w.numel() // 2 + (w.numel() // 4) * 2  # int4 codes + fp16 scales
    assert row.float_bytes == 2 * w.numel() and row.bits == 4
    assert "3.56x" not in str(report) and "layers quantized with 'rtn'" in str(report)
    assert report.to_dict()["layers"][0]["name"] == "0"


def test_quantized_model_computes_with_dequantized_weights(small_model):
    q = quanta.quantize(small_model, {"global_config": {"dtype": "int8"}})
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(q(x), small_model(x), rtol=0.05, atol=0.02)
    for name, rec in quanta.records(q).items():
        module = dict(q.named_modules())[name.rsplit(".", 1)[0]]
        assert torch.equal(module.weight, rec.dequantize())


def test_supported_layer_types():
    model = torch.nn.ModuleDict({
        "conv1d": torch.nn.Conv1d(4, 8, 3), "conv3d": torch.nn.Conv3d(4, 8, 1), "convt": torch.nn.ConvTranspose2d(4, 8, 3),
        "emb": torch.nn.Embedding(20, 8), "mha": torch.nn.MultiheadAttention(8, 2), "fc": torch.nn.Linear(8, 8)})
    plan = quanta.plan(model, {"global_config": {}})
    names = {p.name: p.unit for p in plan.layers}
    assert set(names) == {"conv1d", "conv3d", "convt", "emb", "mha.in_proj_weight", "mha.out_proj", "fc"}
    assert (names["convt"].channel_axis, names["convt"].input_axis) == (1, 0)
    q = quanta.quantize(model, {"global_config": {}})
    assert tuple(quanta.records(q)["convt.weight"].scale.shape) == (1, 8, 1, 1)
    assert "mha.in_proj_weight" in quanta.records(q)


def test_plan_is_a_dry_run(small_model):
    before = _state(small_model)
    plan = quanta.plan(small_model, {"global_config": {"dtype": 4}, "module_name_configs": {"5": None}})
    assert [p.name for p in plan.selected] == ["0", "3"]
    assert "float (skipped)" in plan.table() and _same(before, _state(small_model))
