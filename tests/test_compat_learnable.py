"""Learnable QAT (qat option ``learnable``; coremltools' ``algorithm: "learnable"``), float activations
per module (``float_activation_modules``; coremltools' per-module ``activation_dtype: float32``),
prepare() whose example input does not run, and finalize() without calibration."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import quanta
from quanta.compat import LinearQuantizer, LinearQuantizerConfig
from quanta.fx.learnable import LearnableActivationFakeQuantize, LearnableWeightFakeQuantize, lsq_fake_quantize


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("qscheme, dtype, zp", [(torch.per_tensor_affine, torch.quint8, 3.0),
                                                (torch.per_tensor_symmetric, torch.qint8, 0.0)])
def test_lsq_matches_coremltools_learnable_fake_quantize(qscheme, dtype, zp):
    """Same scale/zero point in: the same values and the same gradients (x, scale, zero point) out."""
    from coremltools.optimize.torch.quantization.modules.learnable_fake_quantize import LearnableFakeQuantize

    torch.manual_seed(0)
    theirs = LearnableFakeQuantize(torch.ao.quantization.MovingAverageMinMaxObserver, dtype=dtype, qscheme=qscheme)
    theirs.disable_observer()
    theirs.enable_fake_quant()
    with torch.no_grad():
        theirs.scale.fill_(0.013)
        theirs.zero_point.fill_(zp)
    qmin, qmax = theirs.quant_min, theirs.quant_max
    x1 = (torch.randn(4, 32) * 1.5).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1 = theirs(x1)
    (y1 * torch.linspace(-1, 1, 32)).sum().backward()
    scale = nn.Parameter(torch.tensor([0.013]))
    zero = nn.Parameter(torch.tensor([zp]), requires_grad=qscheme == torch.per_tensor_affine)
    y2 = lsq_fake_quantize(x2, scale, zero if zp else None, qmin, qmax, x2.numel())
    (y2 * torch.linspace(-1, 1, 32)).sum().backward()
    assert torch.equal(y1, y2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.allclose(theirs.scale.grad, scale.grad, rtol=1e-5, atol=1e-8)
    if zp:
        assert torch.allclose(theirs.zero_point.grad, zero.grad, rtol=1e-5, atol=1e-8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 8, 3)), ("bn", nn.BatchNorm2d(8)), ("relu", nn.ReLU()),
                                      ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 6 * 6, 10))]))


def test_learnable_qat_learns_and_finalizes_what_it_trained():
    recipe = {"algorithm": "qat", "global_config": {"weight_dtype": "int8", "quantization_scheme": "affine"},
              "algorithm_config": {"learnable": True, "milestones": [0, 1, 2, 5]}}
    q = quanta.Quantizer(_model(), recipe)
    prepared = q.prepare(torch.randn(2, 1, 8, 8))
    weight_fq = prepared.fc.weight_fake_quant
    acts = [m for m in prepared.modules() if isinstance(m, LearnableActivationFakeQuantize)]
    assert isinstance(weight_fq, LearnableWeightFakeQuantize) and acts
    # the learnable qparams are Parameters of the prepared model, there from prepare() on
    params = {id(p) for p in prepared.parameters()}
    assert id(weight_fq.scale) in params and all(id(a.scale) in params for a in acts)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(5):
        q.step()
        loss = prepared(torch.randn(8, 1, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    observed = weight_fq.scale.detach().clone()
    q.step()  # observers are off from step 2 on: from here the scales are learned, not observed
    prepared(torch.randn(8, 1, 8, 8)).pow(2).mean().backward()
    assert weight_fq.scale.grad is not None and weight_fq.scale.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(weight_fq.scale.detach(), observed)
    final = q.finalize()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(final(x), prepared.eval()(x))
    from quanta.record import read_record

    record = read_record(final.fc, "weight")
    assert torch.allclose(record.scale.reshape(-1), weight_fq.scale.detach().reshape(-1))


def test_float_activation_modules_leave_activations_float_only():
    recipe = {"algorithm": "qat", "global_config": {"weight_dtype": "int8"},
              "algorithm_config": {"float_activation_modules": ["fc"], "milestones": None}}
    prepared = quanta.Quantizer(_model(), recipe).prepare(torch.randn(2, 1, 8, 8))
    output = [n for n in prepared.graph.nodes if n.op == "output"][0]
    assert output.args[0].target == "fc"  # no quantizer after fc
    assert hasattr(prepared.fc, "weight_fake_quant")  # its weight is still quantized
    with pytest.raises(quanta.ConfigError, match="float_activation_modules"):
        quanta.Quantizer(_model(), {"algorithm": "qat", "algorithm_config": {"float_activation_modules": "fc"}})


def _broken_example_model():
    return nn.Sequential(OrderedDict([("conv1", nn.Conv2d(1, 20, 3)), ("relu", nn.ReLU()), ("fc1", nn.Linear(20, 100))]))


def test_example_that_does_not_run_and_finalize_without_data():
    recipe = {"algorithm": "qat", "global_config": {"weight_dtype": "int8"}, "algorithm_config": {"milestones": [0, 1, 2, 3]}}
    with pytest.raises(quanta.QuantizationError, match=r"does not run on example_inputs.*mat1 and mat2"):
        quanta.Quantizer(_broken_example_model(), recipe).prepare(torch.randn(1, 1, 28, 28))
    recipe["algorithm_config"].update(example_run="optional", unobserved_activations="default")
    q = quanta.Quantizer(_broken_example_model(), recipe)
    with pytest.warns(UserWarning, match="does not run on example_inputs"):
        prepared = q.prepare(torch.randn(1, 1, 28, 28))
    assert sum(isinstance(m, quanta.fx.fake_quant.ActivationFakeQuantize) for m in prepared.modules()) == 3
    with pytest.warns(UserWarning, match="never observed data: using scale 1.0"):
        final = q.finalize()
    assert "quantize_per_tensor" in final.code


@pytest.mark.parametrize("algorithm", ["vanilla", "learnable"])
def test_compat_learnable_and_per_module_float_activations(algorithm):
    config = LinearQuantizerConfig.from_dict({
        "global_config": {"algorithm": algorithm, "milestones": [0, 1, 1, 3], "weight_dtype": "qint4"},
        "module_name_configs": {"fc": {"algorithm": algorithm, "activation_dtype": torch.float32,
                                       "milestones": [0, 1, 1, 3], "weight_dtype": "qint4"}}})
    quantizer = LinearQuantizer(_model(), config, _torch_ao=False)  # the former path: quanta's qat graph
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    learnable = isinstance(prepared.fc.weight_fake_quant, LearnableWeightFakeQuantize)
    assert learnable == (algorithm == "learnable")
    output = [n for n in prepared.graph.nodes if n.op == "output"][0]
    assert output.args[0].target == "fc"
    quantizer.step()
    prepared(torch.randn(4, 1, 8, 8))
    final = quantizer.finalize()
    assert final(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_compat_preserved_attributes_and_missing_names():
    model = _model()
    model.key_1 = 5
    config = LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 3, 4, 5]},
                                              "module_name_configs": {"conv1": {"quantization_scheme": "symmetric"}},
                                              "preserved_attributes": ["key_1"]})
    with pytest.warns(UserWarning, match="conv1.*ignored.*did you mean 'conv'"):
        quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    assert prepared.key_1 == 5
    assert torch.equal(prepared.conv.weight, model.conv.weight)  # ConvBnQAT exposes the conv's weight
    quantizer.step()
    prepared(torch.randn(2, 1, 8, 8))
    assert quantizer.finalize().key_1 == 5


@pytest.mark.slow
def test_compat_learnable_exports_like_vanilla():
    """algorithm 'learnable' through compat: plain ct.convert stores the learned int8 weights."""
    import coremltools as ct

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 8, 3)), ("relu", nn.ReLU()), ("flat", nn.Flatten()),
                                       ("fc", nn.Linear(8 * 6 * 6, 10))]))
    config = LinearQuantizerConfig.from_dict({"global_config": {"algorithm": "learnable", "milestones": [0, 1, 2, 3]}})
    quantizer = LinearQuantizer(model, config, _torch_ao=False)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for _ in range(4):
        quantizer.step()
        loss = prepared(torch.randn(8, 1, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = prepared.fc.weight_fake_quant.qparams()[0]  # scale >= eps, as used
    final = quantizer.finalize()
    x = torch.randn(1, 1, 8, 8)
    traced = torch.jit.trace(final, x)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(shape=x.shape)], minimum_deployment_target=ct.target.iOS17,
                         convert_to="mlprogram", skip_model_load=True)
    ops = [op for op in mlmodel._mil_program.functions["main"].operations]
    dequant = [op for op in ops if op.op_type == "constexpr_affine_dequantize"]
    assert len(dequant) == 2 and any(op.op_type == "quantize" for op in ops)
    fc_scale = [op.scale.val.reshape(-1) for op in dequant if op.scale.val.size == 10][0]  # fp16 in Core ML
    assert torch.allclose(torch.from_numpy(fc_scale.astype("float32")), learned.float(), rtol=1e-3)


def test_compat_names_activation_quantizers_as_torch_ao():
    """coremltools' step semantics, reached through torch.ao's names (activation_post_process_N)."""
    model = nn.Sequential(OrderedDict({"conv": nn.Conv2d(1, 20, 3), "bn": nn.BatchNorm2d(20), "relu": nn.ReLU()}))
    quantizer = LinearQuantizer(model, LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 1, 2, 3]}}),
                                _torch_ao=False)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 28, 28),))
    first, second = prepared.activation_post_process_0, prepared.activation_post_process_1
    assert "input of conv" in first.site and "output of conv" in second.site
    seen = []
    for _ in range(4):
        quantizer.step()
        seen.append((first.observer_enabled, first.fake_quant_enabled, second.observer_enabled, prepared.conv.freeze_bn))
    assert seen == [(True, False, True, False), (True, True, True, False), (False, True, False, False),
                    (False, True, False, True)]


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_relu_outputs_affine_as_coremltools(act):
    """Symmetric activations, but a ReLU/ReLU6 output (never negative) affine: coremltools' policy,
    quanta's relu_activation_scheme; ReLU6 fuses like ReLU (the quantizer after it)."""
    for layer, x in [(nn.Conv2d(1, 4, 3), torch.randn(1, 1, 8, 8)), (nn.Linear(20, 10), torch.randn(1, 20))]:
        model = nn.Sequential(OrderedDict({"layer": layer, "act": act()}))
        quantizer = LinearQuantizer(model, LinearQuantizerConfig(), _torch_ao=False)
        prepared = quantizer.prepare(example_inputs=(x,))
        first, second = prepared.activation_post_process_0, prepared.activation_post_process_1
        assert first.qscheme == torch.per_tensor_symmetric and second.qscheme == torch.per_tensor_affine
        assert [n for n in prepared.graph.nodes if n.op == "output"][0].args[0].target == "activation_post_process_1"
        assert list(prepared.graph.nodes)[-2].args[0].target == "act"  # after the relu, not between
    # quanta's default: one scheme everywhere
    recipe = {"algorithm": "qat", "global_config": {"weight_dtype": "int8"}}
    prepared = quanta.Quantizer(nn.Sequential(nn.Linear(20, 10), act()), recipe).prepare(torch.randn(1, 20))
    assert {m.qscheme for m in prepared.modules() if isinstance(m, quanta.fx.ActivationFakeQuantize)} == \
        {torch.per_tensor_symmetric}
    with pytest.raises(quanta.ConfigError, match="relu_activation_scheme"):
        quanta.Quantizer(nn.Linear(2, 2), {"algorithm": "qat", "relu_activation_scheme": "afine"})


def test_input_produced_by_unfused_relu_is_affine():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.nn.functional.relu_(self.conv1(x)))  # relu_ does not fuse

    quantizer = LinearQuantizer(Model(), LinearQuantizerConfig(), _torch_ao=False)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    schemes = {m.site: m.qscheme for m in prepared.modules() if isinstance(m, quanta.fx.ActivationFakeQuantize)}
    assert schemes == {"input of conv1": torch.per_tensor_symmetric, "output of conv1": torch.per_tensor_symmetric,
                       "input of conv2": torch.per_tensor_affine, "output of conv2": torch.per_tensor_symmetric}
