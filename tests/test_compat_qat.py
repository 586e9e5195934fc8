"""quanta.compat.LinearQuantizer: the seed's YAML and calibration recipe, unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta.compat import LinearQuantizer, LinearQuantizerConfig, ModuleLinearQuantizerConfig
from quanta.record import read_record

SEED_YAML = """\
global_config:
  quantization_scheme: symmetric
  milestones:
    - 0
    - 100
    - 400
    - 200
module_name_configs:
  first_layer: null
  final_layer: null
"""


class SeedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.first_layer = nn.Conv2d(1, 4, 3)
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.final_layer = nn.Linear(8 * 16 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.first_layer(x))))
        return self.final_layer(torch.flatten(x, 1))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_seed_yaml_qat_flow(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SEED_YAML)
    config = LinearQuantizerConfig.from_yaml(path)
    assert config.global_config.milestones == [0, 100, 400, 200]
    model = SeedModel()
    quantizer = LinearQuantizer(model, config)
    example_input = torch.rand(1, 1, 20, 20)
    model = quantizer.prepare(example_inputs=example_input, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.rand(4, 1, 20, 20)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        quantizer.step()
    assert quantizer.minimum_deployment_target is None  # nothing finalized yet
    model = quantizer.finalize(inplace=True)
    assert quantizer.minimum_deployment_target == model.coreml_minimum_deployment_target is not None
    assert read_record(model.first_layer) is None and read_record(model.final_layer) is None
    assert read_record(model.conv) is not None
    # the same YAML as a quanta recipe file
    q = quanta.Quantizer(SeedModel(), str(path))
    assert q.recipe.algorithm == "qat" and list(q.recipe.algorithm_config.milestones) == [0, 100, 400, 200]
    assert q.recipe.module_name_configs == {"first_layer": None, "final_layer": None}


def test_seed_calibration_recipe_equals_calibrate():
    torch.manual_seed(0)
    model = SeedModel().eval()
    data = [torch.rand(8, 1, 20, 20) for _ in range(3)]
    config = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(milestones=[0, 1000, 1000, 0]))
    quantizer = LinearQuantizer(model, config, _torch_ao=False)  # the former path: quanta's own qat graph
    prepared = quantizer.prepare(example_inputs=[1, 1, 20, 20], inplace=False)
    quantizer.step()
    for x in data:
        with torch.no_grad():
            prepared(x)
    via_compat = quantizer.finalize()
    # coremltools' defaults: quint8 activations, moving-average observers
    via_calibrate = quanta.quantize(model, {"algorithm": "calibrate", "activation_dtype": "uint8",
                                            "activation_observer": "moving_average_minmax",
                                            "relu_activation_scheme": "affine"}, data=data)
    assert via_compat.code == via_calibrate.code
    for name in ("first_layer", "conv", "final_layer"):
        assert torch.equal(read_record(getattr(via_compat, name)).codes, read_record(getattr(via_calibrate, name)).codes)
    x = torch.rand(2, 1, 20, 20)
    torch.testing.assert_close(via_compat(x), via_calibrate(x))


def test_config_errors_name_the_key():
    with pytest.raises(quanta.ConfigError, match="global_confg"):
        LinearQuantizerConfig.from_dict({"global_confg": {}})
    with pytest.raises(quanta.ConfigError, match="milestones"):
        LinearQuantizer(SeedModel(), {"global_config": {"milestones": [0, 1]}})
    with pytest.raises(quanta.ConfigError, match="quantization_schem"):
        LinearQuantizerConfig.from_dict({"global_config": {"quantization_schem": "affine"}})
    # coremltools ignores module names that are not in the model: compat warns (naming it) and goes on
    with pytest.warns(UserWarning, match="module_name_configs.*no_such_layer.*ignored"):
        LinearQuantizer(SeedModel(), {"module_name_configs": {"no_such_layer": None}})
