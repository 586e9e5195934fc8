"""Algorithm calibrate: static W8A8 through quanta.quantize and quanta.Quantizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx

import quanta
from quanta.record import read_record

from _fx_helpers import DigitsCNN, ResidualNet


def _data(n=4, shape=(16, 1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=g) for _ in range(n)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.quantize_per_tensor's deprecation notice
        yield


def test_calibrate_leaves_model_untouched_and_returns_w8a8_graph():
    torch.manual_seed(0)
    model = DigitsCNN()
    model.train()
    for _ in range(2):
        model(torch.rand(16, 1, 8, 8))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = quanta.quantize(model, {"algorithm": "calibrate"}, data=_data())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(qm, fx.GraphModule)
    q_nodes = [n for n in qm.graph.nodes if n.target is torch.quantize_per_tensor]
    assert len(q_nodes) == 4 and all(n.args[3] is torch.qint8 for n in q_nodes)
    # weights: int8 per-channel records of the bn-folded weights
    bn, conv = model.bn1, model.conv1
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight.detach() * factor.detach().reshape(-1, 1, 1, 1)
    rec = read_record(qm.conv1)
    ref = quanta.quantize_weight(folded, quanta.QuantSpec())
    assert torch.equal(rec.codes, ref.codes) and str(rec.spec.dtype) == "int8"
    assert [r.name for r in qm.quanta_report.layers] == ["conv1", "conv2", "fc"]
    x = torch.rand(8, 1, 8, 8)
    err = (qm(x) - model(x)).abs().max() / model(x).abs().max()
    assert float(err) < 0.05


def test_activation_ranges_are_the_calibration_ranges():
    model = ResidualNet().eval()
    data = _data(3, (4, 3, 8, 8))
    qm = quanta.quantize(model, {"algorithm": "calibrate", "activation_scheme": "affine"}, data=data)
    q_in = next(n for n in qm.graph.nodes if n.target is torch.quantize_per_tensor and n.args[0].name == "x")
    lo = min(float(d.min()) for d in data)
    hi = max(float(d.max()) for d in data)
    scheme = quanta.registry.get("scheme", "affine").obj
    scale, zp = scheme.qparams(torch.tensor([lo]), torch.tensor([hi]), quanta.QuantDtype(8, True))
    assert q_in.args[1] == pytest.approx(float(scale)) and q_in.args[2] == int(zp)


def test_calibrate_through_quantizer_equals_quantize():
    model = DigitsCNN().eval()
    data = _data()
    via_quantize = quanta.quantize(model, {"algorithm": "calibrate"}, data=data)
    q = quanta.Quantizer(model, {"algorithm": "calibrate"})
    gm = q.prepare(example_inputs=data[0])
    q.step()
    with torch.no_grad():
        for d in data:
            gm(d)
    via_quantizer = q.finalize()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(via_quantizer(x), via_quantize(x))


def test_calibrate_needs_data_and_checks_options():
    with pytest.raises(quanta.ConfigError, match="data"):
        quanta.quantize(DigitsCNN(), {"algorithm": "calibrate"})
    with pytest.raises(quanta.ConfigError, match="activation_observer"):
        quanta.quantize(DigitsCNN(), {"algorithm": "calibrate", "activation_observer": "percentile"}, data=_data(1))
    with pytest.raises(quanta.ConfigError, match="activation_scheme"):
        quanta.quantize(DigitsCNN(), {"algorithm": "calibrate", "activation_scheme": "affline"}, data=_data(1))
