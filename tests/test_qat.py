"""quanta.Quantizer with algorithm qat: API, finalize contract, Core ML conversion, digits evidence."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx

import quanta
from quanta.fx import ConvBnQAT
from quanta.record import read_record

from _fx_helpers import DigitsCNN, ResidualNet, accuracy, digits_data, train


def _trained_qat(model, milestones=(0, 0, 1000, 1000), steps=4):
    q = quanta.Quantizer(model, {"global_config": {"milestones": list(milestones)}})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    train(gm, x, y, epochs=steps, batch=64, quantizer=q)
    return q, gm


def test_prepare_returns_graph_module_and_inplace_shares_parameters():
    model = DigitsCNN()
    q = quanta.Quantizer(model)
    gm = q.prepare(example_inputs=torch.rand(1, 1, 8, 8), inplace=True)
    assert isinstance(gm, fx.GraphModule)
    assert gm.fc.weight is model.fc.weight and gm.conv1.conv.weight is model.conv1.weight
    copy_model = DigitsCNN()
    gm2 = quanta.Quantizer(copy_model).prepare(example_inputs=[1, 1, 8, 8])  # a shape, as in the seed
    assert gm2.fc.weight is not copy_model.fc.weight


def test_training_moves_weights_and_finalize_records_match_quantize_weight():
    q, gm = _trained_qat(DigitsCNN())
    folded_w, _ = gm.conv1.folded()
    fc_w = gm.fc.weight.detach().clone()
    fm = q.finalize()
    assert isinstance(fm, fx.GraphModule) and not fm.training
    assert isinstance(gm.conv1, ConvBnQAT)  # finalize(inplace=False) left the prepared model alone
    assert type(fm.conv1) is torch.nn.Conv2d and not hasattr(fm, "bn1")
    rec = read_record(fm.conv1)
    ref = quanta.quantize_weight(folded_w.detach(), quanta.QuantSpec())
    assert torch.equal(rec.codes, ref.codes) and torch.equal(rec.scale, ref.scale)
    assert torch.equal(fm.conv1.weight.detach(), rec.dequantize())
    assert torch.equal(read_record(fm.fc).codes, quanta.quantize_weight(fc_w, quanta.QuantSpec()).codes)
    assert hasattr(fm.conv1, "weight_quanta_codes") and hasattr(fm.conv1, "weight_quanta_scale")
    assert [r.name for r in fm.quanta_report.layers] == ["conv1", "conv2", "fc"]


def test_finalized_matches_fake_quant_forward():
    q, gm = _trained_qat(DigitsCNN(), milestones=(0, 0, 4, 1000))
    q.step()  # the 5th step(): observers off, ranges frozen
    gm.eval()
    fm = q.finalize()
    x = torch.rand(32, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_fm = fm(x)
    out_gm = gm(x).detach()
    n_pairs = sum(n.target is torch.quantize_per_tensor for n in fm.graph.nodes)
    assert n_pairs == 4  # input, relu1, relu2, fc output
    torch.testing.assert_close(out_fm, out_gm, atol=0.1, rtol=0)  # one output step at most (ties)
    assert float((out_fm - out_gm).abs().mean()) < 1e-3


def test_finalized_graph_contract():
    q, gm = _trained_qat(DigitsCNN())
    fm = q.finalize()
    calls = [(n.op, n.target) for n in fm.graph.nodes if n.op in ("call_function", "call_method")]
    q_nodes = [n for n in fm.graph.nodes if n.target is torch.quantize_per_tensor]
    for n in q_nodes:
        _, scale, zp, dtype = n.args
        assert type(scale) is float and type(zp) is int and dtype in (torch.qint8, torch.quint8)
        (user,) = n.users
        assert user.op == "call_method" and user.target == "dequantize"
    assert not any("fake_quantize" in str(t) for _, t in calls)


def test_never_observed_activation_fails_at_finalize():
    q = quanta.Quantizer(DigitsCNN(), {"global_config": {"milestones": [5, 5, 10, 10]}})
    q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    with pytest.raises(quanta.QuantizationError, match="never observed"):
        q.finalize()


def test_quantizer_rejects_algorithms_without_a_session():
    with pytest.raises(quanta.ConfigError, match="training loop"):
        quanta.Quantizer(DigitsCNN(), {"algorithm": "rtn"})
    with pytest.raises(quanta.QuantizationError, match="Quantizer"):
        quanta.quantize(DigitsCNN(), {"algorithm": "qat"})


def test_weight_only_qat_and_uint8_activations():
    q = quanta.Quantizer(DigitsCNN(), {"global_config": {"milestones": None}, "activation_dtype": "float32"})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    gm(torch.rand(4, 1, 8, 8))
    fm = q.finalize()
    assert "quantize_per_tensor" not in fm.code and read_record(fm.fc) is not None
    q = quanta.Quantizer(ResidualNet(), {"activation_dtype": "uint8", "activation_scheme": "affine"})
    gm = q.prepare(example_inputs=torch.rand(2, 3, 8, 8))
    gm(torch.rand(4, 3, 8, 8))
    assert "torch.quint8" in q.finalize().code
    with pytest.raises(quanta.ConfigError, match="activation_dtype"):
        quanta.Quantizer(DigitsCNN(), {"activation_dtype": "int4"})


def _convert(fm, example):
    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fm, example)
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes(["common::int_op_canonicalization"])  # COREML_FACTS: wrong numbers otherwise
        return ct.convert(traced, inputs=[ct.TensorType(shape=example.shape)], minimum_deployment_target=ct.target.iOS17,
                          pass_pipeline=pipeline, convert_to="mlprogram", skip_model_load=True)


@pytest.mark.slow
def test_finalized_cnn_converts_to_core_ml_quantize_dequantize():
    model = ResidualNet()
    q = quanta.Quantizer(model, {"global_config": {"milestones": [0, 0, 1000, 1000]}})
    gm = q.prepare(example_inputs=torch.rand(2, 3, 8, 8))
    q.step()
    gm(torch.rand(8, 3, 8, 8))
    fm = q.finalize()
    mlmodel = _convert(fm, torch.rand(1, 3, 8, 8))
    ops = [op.op_type for f in mlmodel._mil_program.functions.values() for op in f.operations]
    assert ops.count("quantize") >= 4 and ops.count("dequantize") >= 4
    assert not any("fake" in o for o in ops)


@pytest.mark.slow
def test_digits_qat_within_one_point_and_calibrate_within_two():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    model = train(DigitsCNN(), xtr, ytr, epochs=4, lr=3e-3)
    float_acc = accuracy(model, xte, yte)
    q = quanta.Quantizer(model, {"global_config": {"milestones": [0, 0, 40, 60]}})
    gm = q.prepare(example_inputs=xtr[:2])
    train(gm, xtr, ytr, epochs=3, lr=1e-3, quantizer=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat_acc = accuracy(q.finalize(), xte, yte)
        calibrated = quanta.quantize(model, {"algorithm": "calibrate"},
                                     data=[xtr[i:i + 128] for i in range(0, 512, 128)])
        cal_acc = accuracy(calibrated, xte, yte)
    print(f"\ndigits accuracy: float {float_acc:.2f}%  QAT int8 {qat_acc:.2f}%  calibrate W8A8 {cal_acc:.2f}%")
    assert float_acc > 90
    assert qat_acc >= float_acc - 1.0
    assert cal_acc >= float_acc - 2.0
