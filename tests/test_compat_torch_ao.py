"""quanta.compat.LinearQuantizer prepares with torch.ao (as coremltools does) and finalizes into quanta records."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.quantized.reference as nnr
import torch.ao.quantization as aoq
from torch import nn

from quanta.compat import LinearQuantizer, LinearQuantizerConfig
from quanta.compat._ao_modules import EMAMinMaxObserver, LearnableFakeQuantize
from quanta.record import read_record, records


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _train(quantizer, prepared, shape, steps=3):
    for _ in range(steps):
        quantizer.step()
        prepared(torch.randn(*shape))


def test_prepare_has_torch_ao_structure_and_coremltools_numbering():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict({"linear": nn.Linear(20, 30), "act": nn.ReLU(), "fc": nn.Linear(30, 4)}))
    quantizer = LinearQuantizer(model, LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 1, 2, 3]}}))
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 20),))
    assert isinstance(prepared.linear, nniqat.LinearReLU)
    assert isinstance(prepared.linear.weight_fake_quant, aoq.FakeQuantize)
    assert prepared.linear.weight_fake_quant.qscheme == torch.per_channel_symmetric
    # input symmetric; the LinearReLU output never negative: affine (coremltools' policy); fc output symmetric
    assert prepared.activation_post_process_0.qscheme == torch.per_tensor_symmetric
    assert prepared.activation_post_process_1.qscheme == torch.per_tensor_affine
    assert prepared.activation_post_process_2.qscheme == torch.per_tensor_symmetric
    # milestones: everything off until step() reaches them
    assert not prepared.activation_post_process_0.observer_enabled[0]
    quantizer.step()
    assert prepared.activation_post_process_0.observer_enabled[0]
    assert not prepared.activation_post_process_0.fake_quant_enabled[0]
    assert set(quantizer.report()) == {"activation_post_process_0", "linear", "activation_post_process_1", "fc",
                                       "activation_post_process_2"}


def test_finalize_is_torch_ao_reference_with_quanta_records():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict({"conv": nn.Conv2d(1, 8, 3), "relu": nn.ReLU(), "flat": nn.Flatten(),
                                       "fc": nn.Linear(8 * 6 * 6, 10)}))
    config = LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 1, 2, 3], "weight_dtype": "qint4"}})
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    _train(quantizer, prepared, (4, 1, 8, 8))
    prepared.eval()
    fake_weight = prepared.conv.weight_fake_quant(prepared.conv.weight).detach()
    final = quantizer.finalize()
    assert isinstance(final.conv, nni.ConvReLU2d) and isinstance(final.conv[0], nnr.Conv2d)
    record = read_record(final.conv[0])
    assert record is not None and str(record.spec.dtype) == "int4"
    assert int(record.codes.min()) >= -8 and int(record.codes.max()) <= 7
    torch.testing.assert_close(record.dequantize().reshape(fake_weight.shape), fake_weight)  # what training saw
    assert set(records(final)) == {"conv.0.weight", "fc.weight"}
    state = final.conv[0].state_dict()
    assert state["_COREML_/weight/quantization_scale"].shape == (8, 1)
    assert torch.all(state["_COREML_/weight/zero_point"] == 0)
    assert final(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_learnable_quantizers_are_parameters_and_finalize_records_learned_scale():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict({"fc1": nn.Linear(12, 16), "act": nn.Tanh(), "fc2": nn.Linear(16, 3)}))
    config = LinearQuantizerConfig.from_dict({"global_config": {"algorithm": "learnable", "milestones": [0, 1, 2, 3]}})
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 12),))
    fq = prepared.fc1.weight_fake_quant
    assert isinstance(fq, LearnableFakeQuantize) and fq.scale.shape == (16,)  # sized at prepare, per channel
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    assert any(p is fq.scale for g in optimizer.param_groups for p in g["params"])
    for _ in range(5):
        quantizer.step()
        loss = prepared(torch.randn(8, 12)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    learned = fq.calculate_qparams()[0]
    final = quantizer.finalize()
    assert isinstance(final.fc1[0], nnr.Linear) and isinstance(final.fc1.act, nn.Tanh)  # fused as coremltools
    torch.testing.assert_close(read_record(final.fc1[0]).scale.reshape(-1), learned)


def test_ema_observer_sync_switch_and_float_module():
    model = nn.Sequential(OrderedDict({"fc1": nn.Linear(6, 6), "fc2": nn.Linear(6, 2)}))
    config = LinearQuantizerConfig.from_dict({
        "global_config": {"weight_observer": "ema_min_max", "activation_observer": "ema_min_max"},
        "module_name_configs": {"fc2": {"weight_observer": "ema_min_max", "activation_dtype": torch.float32}}})
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(torch.randn(1, 6),))
    observer = prepared.fc1.weight_fake_quant.activation_post_process
    assert isinstance(observer, EMAMinMaxObserver.__mro__[0]) or observer.ema_ratio == 0.9
    assert observer.synchronize
    quantizer.disable_observer_sync()
    assert not observer.synchronize and not prepared.activation_post_process_0.activation_post_process.synchronize
    assert quantizer.observer_sync is False
    quantizer.enable_observer_sync()
    assert observer.synchronize and quantizer.observer_sync is True
    # fc2 keeps float activations: no quantizer after it
    output = [n for n in prepared.graph.nodes if n.op == "output"][0]
    assert output.args[0].target == "fc2"


def test_dropout_quantizer_removed_and_embedding_integer_qparams():
    model = nn.Sequential(OrderedDict({"conv": nn.Conv2d(1, 4, 3), "relu": nn.ReLU(), "drop": nn.Dropout2d(),
                                       "act": nn.LeakyReLU()}))
    prepared = LinearQuantizer(model, LinearQuantizerConfig()).prepare(example_inputs=(torch.randn(1, 1, 8, 8),))
    assert prepared.activation_post_process_1.qscheme == torch.per_tensor_affine
    assert not hasattr(prepared, "activation_post_process_2")  # the one after the dropout
    emb = nn.Sequential(OrderedDict({"emb": nn.Embedding(10, 4)}))
    prepared = LinearQuantizer(emb, LinearQuantizerConfig()).prepare(example_inputs=(torch.tensor([[1, 2]]),))
    assert isinstance(prepared.emb, nn.qat.Embedding)
    assert prepared.emb.weight_fake_quant.qscheme == torch.per_channel_symmetric


@pytest.mark.parametrize("layer", ["conv", "convt", "linear"])
@pytest.mark.parametrize("act", [nn.ReLU6, nn.Sigmoid])
def test_layer_act_fusion_as_coremltools(layer, act):
    """A conv / ConvTranspose / linear + any activation fuse (one quantizer after the pair): ReLU6's
    output affine, Sigmoid's with torch.ao's fixed qparams; finalize gives (reference layer, act)."""
    torch.manual_seed(0)
    make = {"conv": (lambda: nn.Conv2d(1, 4, 3), (2, 1, 6, 6)), "convt": (lambda: nn.ConvTranspose2d(1, 4, 3), (2, 1, 6, 6)),
            "linear": (lambda: nn.Linear(5, 4), (2, 5))}
    factory, shape = make[layer]
    model = nn.Sequential(OrderedDict({"layer": factory(), "act": act()}))
    quantizer = LinearQuantizer(model, LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 1, 2, 3]}}))
    prepared = quantizer.prepare(example_inputs=(torch.randn(*shape),))
    assert isinstance(prepared.layer.act, act) and not hasattr(prepared, "activation_post_process_2")
    out = prepared.activation_post_process_1
    assert out.qscheme == torch.per_tensor_affine
    _train(quantizer, prepared, shape, steps=4)
    if act is nn.Sigmoid:
        assert float(out.scale) == pytest.approx(1 / 256) and int(out.zero_point) == 0
    if layer == "convt":
        assert prepared.layer.weight_fake_quant.ch_axis == 1  # a transposed conv's output channels
    prepared.eval()
    x = torch.randn(*shape)
    expected = prepared(x)
    final = quantizer.finalize()
    assert read_record(final.layer[0]) is not None and isinstance(final.layer.act, act)
    torch.testing.assert_close(final(x), expected)


def test_conv_transpose_bn_fuses_and_folds():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict({"conv": nn.ConvTranspose2d(1, 4, 3), "bn": nn.BatchNorm2d(4), "relu": nn.ReLU()}))
    quantizer = LinearQuantizer(model, LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 1, 2, 3]}}))
    prepared = quantizer.prepare(example_inputs=(torch.randn(2, 1, 6, 6),))
    assert not prepared.conv.conv.freeze_bn
    _train(quantizer, prepared, (4, 1, 6, 6), steps=4)
    assert prepared.conv.conv.freeze_bn  # milestone 3
    prepared.eval()
    x = torch.randn(2, 1, 6, 6)
    expected = prepared(x)
    final = quantizer.finalize()
    assert isinstance(final.conv[0], nnr.ConvTranspose2d)  # bn folded into it
    assert final.conv[0].state_dict()["_COREML_/weight/quantization_scale"].shape == (1, 4)
    torch.testing.assert_close(final(x), expected)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        both_relu = self.relu_a(self.a(x)) + self.relu_b(self.b(x))  # an add of affine inputs: affine
        # a cat with a symmetric input: one symmetric observer for all its inputs (even a ReLU's)
        return both_relu, torch.cat([self.relu_a(self.a(x)), self.c(x)], dim=1)


def test_affine_propagates_through_add_and_cat_shares_one_observer():
    prepared = LinearQuantizer(_Branches(), LinearQuantizerConfig()).prepare(example_inputs=(torch.randn(1, 1, 6, 6),))
    graph = {n.name: n for n in prepared.graph.nodes}
    add_q = prepared.get_submodule(next(iter(graph["add"].users)).target)
    assert add_q.qscheme == torch.per_tensor_affine
    cat_inputs = [prepared.get_submodule(a.target) for a in graph["cat"].args[0]]
    assert all(q.qscheme == torch.per_tensor_symmetric for q in cat_inputs)
    assert len({id(q) for q in cat_inputs}) == 1  # torch.ao shares the cat's observer across its inputs


def test_untraceable_model_error_names_the_way_out():
    import quanta

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    model = Dynamic()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quanta.QuantizationError, match="non_traceable_module_names"):
        LinearQuantizer(model, LinearQuantizerConfig()).prepare(example_inputs=(torch.randn(1, 4),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and type(model.fc) is nn.Linear


def test_shape_list_example_and_inplace_calls_run_the_prepared_model():
    model = nn.Sequential(OrderedDict({"fc": nn.Linear(4, 3)}))
    quantizer = LinearQuantizer(model, LinearQuantizerConfig.from_dict({"global_config": {"milestones": [0, 9, 9, 9]}}))
    prepared = quantizer.prepare(example_inputs=[2, 4], inplace=True)  # a shape, as quanta takes it
    quantizer.step()
    with torch.no_grad():
        model(torch.randn(5, 4))  # coremltools' calibration loop calls the model passed in
    assert float(prepared.activation_post_process_0.activation_post_process.max_val) > 0
