"""Graph machinery: tracing errors, conv+bn fusion, quantizer placement, fake-quant numerics."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import quanta
from quanta.fx import ActivationFakeQuantize, ConvBnQAT, WeightFakeQuantize
from quanta.fx.rules import ActivationRules
from quanta._run.weights import quantize_weight

from _fx_helpers import DigitsCNN, ResidualNet


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing fails here
            return x * 2
        return x


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.block = Untraceable()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.block(self.fc1(x)))


def _quantizers(gm):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActivationFakeQuantize)}


def test_untraceable_module_is_named_with_the_way_out():
    model = WithBlock()
    with pytest.raises(quanta.QuantizationError) as err:
        quanta.Quantizer(model).prepare(example_inputs=torch.rand(2, 8))
    msg = str(err.value)
    assert "'block'" in msg and "module_name_configs" in msg and "null" in msg
    assert "Traceback" not in msg
    gm = quanta.Quantizer(model, {"module_name_configs": {"block": None}}).prepare(example_inputs=torch.rand(2, 8))
    assert isinstance(gm, fx.GraphModule)
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)  # an opaque float leaf
    # fc1's output and fc2's float input (the block's output) are quantized; the block is not observed inside
    sites = {q.site for q in _quantizers(gm).values()}
    assert {"output of fc1", "input of fc2", "output of fc2", "input of fc1"} <= sites


def test_conv_bn_fused_and_eval_forward_is_the_folded_conv():
    torch.manual_seed(0)
    model = DigitsCNN()
    model.train()
    for _ in range(3):  # give the bn real running statistics
        model(torch.rand(16, 1, 8, 8))
    model.eval()
    q = quanta.Quantizer(model, {"global_config": {"milestones": None}})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    assert isinstance(gm.conv1, ConvBnQAT) and isinstance(gm.conv2, ConvBnQAT)
    assert not any(n.op == "call_module" and "bn" in n.target for n in gm.graph.nodes)
    # conv+bn+relu: one quantizer after the relu, none between conv and relu
    code = gm.code
    assert "relu1_act_fq" in code and "conv1_act_fq" not in code
    from quanta.fx.milestones import MilestoneState, apply_state

    apply_state(gm, MilestoneState(observers=False, fake_quant=False, bn_frozen=True))
    x = torch.rand(8, 1, 8, 8)
    gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_placement_residual_add_relu_avgpool():
    model = ResidualNet()
    gm = quanta.Quantizer(model).prepare(example_inputs=torch.rand(2, 3, 8, 8))
    sites = sorted(q.site for q in _quantizers(gm).values())
    # add+relu fuse: the add's quantizer sits after the relu; the residual input is already quantized
    assert "output of add" in sites and "input of add" not in sites
    # avg-pool changes values: the fc input gets its own quantizer; the model input is quantized
    assert "input of fc" in sites and "input of stem" in sites
    add = next(n for n in gm.graph.nodes if n.name == "add")
    relu_user = next(iter(add.users))
    assert relu_user.target is torch.relu
    assert isinstance(gm.get_submodule(next(iter(relu_user.users)).target), ActivationFakeQuantize)


def test_rules_come_from_the_backend(register_plugin):
    from quanta.plugins.torch_backend import TorchBackend

    class LinearOnlyBackend(TorchBackend):
        name = "linear_only"
        description = "torch backend quantizing Linear activations only"

        def activation_rules(self):
            return ActivationRules(weighted_modules=(nn.Linear,))

    class Plugin:
        @quanta.hookimpl
        def register_backends(self, register):
            register(LinearOnlyBackend())

    register_plugin(Plugin())
    gm = quanta.Quantizer(ResidualNet(), backend="linear_only").prepare(example_inputs=torch.rand(2, 3, 8, 8))
    assert sorted(q.site for q in _quantizers(gm).values()) == ["input of fc", "output of fc"]
    assert not isinstance(gm.stem, ConvBnQAT)

    class NoRules(TorchBackend):
        name = "no_rules"
        description = "no activation rules"
        activation_rules = None

    class Plugin2:
        @quanta.hookimpl
        def register_backends(self, register):
            register(NoRules())

    register_plugin(Plugin2())
    with pytest.raises(quanta.ConfigError, match="activation"):
        quanta.Quantizer(ResidualNet(), backend="no_rules")


@pytest.mark.parametrize("spec", [
    quanta.QuantSpec(),
    quanta.QuantSpec(scheme="affine", dtype="uint8"),
    quanta.QuantSpec(dtype="int4", granularity="per_block", block_size=8),
    quanta.QuantSpec(granularity="per_tensor"),
])
def test_weight_fake_quant_agrees_with_scheme(spec):
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    fq = WeightFakeQuantize(spec)(w)
    ref = quantize_weight(w, spec).dequantize()
    scale = quantize_weight(w, spec).scale.max()
    mismatch = (fq - ref).abs() > 1e-6
    assert float(mismatch.float().mean()) < 1e-2  # only float32 ties (x * 1/s vs x / s) may differ
    assert float((fq - ref).abs().max()) <= float(scale) * 1.001


def test_straight_through_gradients():
    w = torch.randn(8, 8, requires_grad=True)
    WeightFakeQuantize(quanta.QuantSpec())(w).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))
    from quanta.plugins.activation_observers import StreamingMinMax

    act = ActivationFakeQuantize(StreamingMinMax(), "affine", quanta.QuantDtype(8, False))
    x = torch.randn(4, 8, requires_grad=True)
    act(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_streaming_observers():
    from quanta.plugins.activation_observers import streaming_observer

    mm = streaming_observer("minmax")
    mm(torch.tensor([1.0, 2.0]))
    mm(torch.tensor([-3.0, 0.5]))
    assert (float(mm.min_val), float(mm.max_val)) == (-3.0, 2.0)
    ma = streaming_observer("moving_average_minmax", averaging_constant=0.5)
    ma(torch.tensor([0.0, 2.0]))
    ma(torch.tensor([-2.0, 4.0]))
    assert (float(ma.min_val), float(ma.max_val)) == (-1.0, 3.0)
    with pytest.raises(quanta.ConfigError, match="activation_observer"):
        streaming_observer("mse")
