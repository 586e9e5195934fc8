"""The eight code blocks of coremltools' optimize overview (the seed), run through ``quanta.compat``
with only their imports changed, and the models they produce converted with a plain ``ct.convert``.

Each block below is the seed's code text. The seed's page lost some lines in extraction (closing
brackets, loop bodies, the ``ct.convert`` arguments); they are restored as in coremltools'
documentation. The only other edits: imports (``coremltools.optimize`` -> ``quanta.compat``) and
the YAML path, which the seed leaves as ``/path/to/yaml/config.yaml``. The test checks that no
line outside the imports mentions quanta, executes the text, converts every PyTorch result with
``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=...)``, counts the ``constexpr``
ops and compares the stored codes and scales with quanta's records.
"""

from __future__ import annotations

import logging
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quanta
from quanta.mil.program import read_compressed_weights

logging.getLogger("coremltools").setLevel(logging.ERROR)
pytestmark = pytest.mark.slow

BLOCK_1_LINEAR_QUANTIZE_WEIGHTS = """
import quanta.compat as cto

op_config = cto.coreml.OpLinearQuantizerConfig(
    mode="linear_symmetric", weight_threshold=512
)
config = cto.coreml.OptimizationConfig(global_config=op_config)

compressed_8_bit_model = cto.coreml.linear_quantize_weights(model, config=config)
"""

BLOCK_2_LINEAR_QUANTIZE_ACTIVATIONS = """
activation_config = cto.coreml.OptimizationConfig(
    global_config=cto.coreml.experimental.OpActivationLinearQuantizerConfig(
        mode="linear_symmetric"
    )
)

compressed_model_a8 = cto.coreml.experimental.linear_quantize_activations(
    model, activation_config, sample_data
)
"""

BLOCK_3_POST_TRAINING_QUANTIZER = """
import torch
from quanta.compat import PostTrainingQuantizer, \\
    PostTrainingQuantizerConfig

config = PostTrainingQuantizerConfig.from_dict(
    {
        "global_config": {
            "weight_dtype": "int8",
            "granularity": "per_block",
            "block_size": 128,
        },
        "module_type_configs": {
            torch.nn.Linear: None
        }
    }
)
quantizer = PostTrainingQuantizer(model, config)
quantized_model = quantizer.compress()
"""

BLOCK_4_LAYERWISE_COMPRESSOR = """
from quanta.compat import LayerwiseCompressor, \\
    LayerwiseCompressorConfig

config = LayerwiseCompressorConfig.from_dict(
    {
        "global_config": {
            "algorithm": "gptq",
            "weight_dtype": 4,
            "granularity": "per_block",
            "block_size": 128,
        },
        "input_cacher": "default",
        "calibration_nsamples": 16,
    }
)

dataloader = dataloader  # create a list of input tensors to be used for calibration

quantizer = LayerwiseCompressor(model, config)

compressed_model = quantizer.compress(dataloader)
"""

BLOCK_5_LINEAR_QUANTIZER_CALIBRATION = """
import torch
from quanta.compat import (
    LinearQuantizer,
    LinearQuantizerConfig,
    ModuleLinearQuantizerConfig
)

config = LinearQuantizerConfig(
    global_config=ModuleLinearQuantizerConfig(
        milestones=[0, 1000, 1000, 0],
    )
)

quantizer = LinearQuantizer(model, config)

quantizer.prepare(example_inputs=[1, 3, 224, 224], inplace=True)

# Only step through quantizer once to enable statistics collection (milestone 0),
# and turn batch norm to inference mode (milestone 3)
quantizer.step()

# Do a forward pass through the model with calibration data
for idx, data in enumerate(dataloader):
    with torch.no_grad():
        model(data)

quantized_model = quantizer.finalize()
"""

BLOCK_6_QAT_YAML = """
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

BLOCK_7_QAT = """
from quanta.compat import (
    LinearQuantizer,
    LinearQuantizerConfig,
)

# Initialize the quantizer
config = LinearQuantizerConfig.from_yaml(yaml_path)
quantizer = LinearQuantizer(model, config)

# Prepare the model to insert FakeQuantize layers for QAT
example_input = torch.rand(1, 1, 20, 20)
model = quantizer.prepare(example_inputs=example_input, inplace=True)

# Use quantizer in your PyTorch training loop
for inputs, labels in data:
    output = model(inputs)
    loss = loss_fn(output, labels)
    loss.backward()
    optimizer.step()
    quantizer.step()

# Convert operations to their quantized counterparts using parameters learnt via QAT
model = quantizer.finalize(inplace=True)
"""

BLOCK_8_CONVERT = """
# Convert the PyTorch models to CoreML format
traced_model = torch.jit.trace(model, example_input)
coreml_model = ct.convert(
    traced_model,
    convert_to="mlprogram",
    inputs=[ct.TensorType(shape=example_input.shape)],
    minimum_deployment_target=ct.target.iOS17,
)
"""

PYTHON_BLOCKS = [BLOCK_1_LINEAR_QUANTIZE_WEIGHTS, BLOCK_2_LINEAR_QUANTIZE_ACTIVATIONS, BLOCK_3_POST_TRAINING_QUANTIZER,
                 BLOCK_4_LAYERWISE_COMPRESSOR, BLOCK_5_LINEAR_QUANTIZER_CALIBRATION, BLOCK_7_QAT, BLOCK_8_CONVERT]


def _run(block: str, namespace: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(textwrap.dedent(block), "<seed block>", "exec"), namespace)
    return namespace


def _import_lines(block: str) -> set[int]:
    """Line numbers of the import statements (backslash and parenthesis continuations included)."""
    out, continued, in_parens = set(), False, False
    for i, line in enumerate(block.splitlines()):
        text = line.rstrip()
        if text.startswith(("import ", "from ")) or continued or in_parens:
            out.add(i)
            in_parens = (in_parens or text.endswith("(")) and not text.endswith(")")
            continued = text.endswith("\\")
    return out


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_only_imports_differ_from_the_seed(block):
    imports = _import_lines(block)
    assert all(block.splitlines()[i].strip() for i in imports)  # an import ends before the next blank line
    for i, line in enumerate(block.splitlines()):
        if i not in imports:
            assert "quanta" not in line, line


def _convert(model, example_input, target):
    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example_input)
        return ct.convert(traced, convert_to="mlprogram", inputs=[ct.TensorType(shape=example_input.shape)],
                          minimum_deployment_target=target)


def _check_stored(mlmodel, model) -> int:
    """Every record of ``model`` is stored compressed with its codes and fp16 scales; returns the
    number of constexpr ops."""
    stored = list(read_compressed_weights(mlmodel).values())
    recs = quanta.records(model)
    assert recs
    for name, rec in recs.items():
        codes = rec.codes.numpy().astype(np.int32)
        hits = [s for s in stored if s.data is not None and np.array_equal(s.data.astype(np.int32), codes)]
        assert hits, f"{name}: no constexpr op stores quanta's codes"
        scale = rec.scale.numpy().astype(np.float16)
        assert np.array_equal(np.asarray(hits[0].scale).reshape(-1), scale.reshape(-1)), name
        if rec.zero_point is not None:
            assert np.array_equal(np.asarray(hits[0].zero_point).reshape(-1), rec.zero_point.numpy().reshape(-1)), name
    return len(stored)


def _mlp_mlmodel():
    import coremltools as ct

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(torch.jit.trace(mlp, x), convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=x.shape)],
                          minimum_deployment_target=ct.target.iOS17)


def test_blocks_1_and_2_core_ml_models():
    model = _mlp_mlmodel()
    ns = _run(BLOCK_1_LINEAR_QUANTIZE_WEIGHTS, {"model": model})
    weights = read_compressed_weights(ns["compressed_8_bit_model"])
    assert sorted(w.shape for w in weights.values()) == [(10, 128), (128, 64)]
    assert all(w.op_type == "constexpr_affine_dequantize" and w.dtype == "int8" for w in weights.values())
    sample_data = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(4)]
    ns = _run(BLOCK_2_LINEAR_QUANTIZE_ACTIVATIONS, {**ns, "model": model, "sample_data": sample_data})
    ops = [op.op_type for op in ns["compressed_model_a8"]._mil_program.functions["main"].operations]
    assert ops.count("quantize") >= 2 and ops.count("dequantize") >= 2


def test_block_3_post_training_quantizer_and_plain_convert():
    import coremltools as ct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 64, 3), nn.ReLU(), nn.Conv2d(64, 32, 3), nn.Flatten(), nn.Linear(32, 10))
    ns = _run(BLOCK_3_POST_TRAINING_QUANTIZER, {"model": model})
    qmodel = ns["quantized_model"]
    assert set(quanta.records(qmodel)) == {"0.weight"}  # layer 2 (64 inputs) stays float, as in coremltools
    # one block of 128 spans the 128 input channels: per-channel in effect, which iOS16 stores
    assert qmodel.coreml_minimum_deployment_target == ct.target.iOS16
    assert ns["quantizer"].minimum_deployment_target == ct.target.iOS16
    x = torch.randn(1, 128, 5, 5)
    assert _check_stored(_convert(qmodel, x, ct.target.iOS16), qmodel) == 1
    assert _check_stored(_convert(qmodel, x, ct.target.iOS18), qmodel) == 1
    assert read_compressed_weights(_convert(qmodel, x, None)) == {}  # no target: coremltools stores floats


def test_block_4_layerwise_compressor_and_plain_convert():
    import coremltools as ct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    dataloader = [torch.randn(8, 128) for _ in range(16)]
    ns = _run(BLOCK_4_LAYERWISE_COMPRESSOR, {"model": model, "dataloader": dataloader})
    qmodel = ns["compressed_model"]
    recs = quanta.records(qmodel)
    assert set(recs) == {"0.weight", "2.weight"}
    # coremltools' 16-level GPTQ grid: weight_dtype 4 is "uint4" (codes 0..15, zero point 8), as coremltools means it
    assert int(min(r.codes.min() for r in recs.values())) == 0
    assert all(int(r.zero_point.min()) == int(r.zero_point.max()) == 8 for r in recs.values())
    assert qmodel.coreml_minimum_deployment_target == ct.target.iOS18
    mlmodel = _convert(qmodel, torch.randn(1, 128), ct.target.iOS18)
    assert _check_stored(mlmodel, qmodel) == 2
    assert all(w.op_type == "constexpr_blockwise_shift_scale" and w.dtype == "uint4"
               for w in read_compressed_weights(mlmodel).values())


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_blocks_5_and_8_calibration_then_plain_convert():
    import coremltools as ct

    torch.manual_seed(0)
    model = _Cnn().eval()
    dataloader = [torch.rand(2, 3, 224, 224) for _ in range(3)]
    ns = _run(BLOCK_5_LINEAR_QUANTIZER_CALIBRATION, {"model": model, "dataloader": dataloader})
    qmodel = ns["quantized_model"]
    assert set(quanta.records(qmodel)) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert qmodel.coreml_minimum_deployment_target == ct.target.iOS17  # int8 weights + activations
    ns = _run(BLOCK_8_CONVERT, {"model": qmodel, "example_input": torch.rand(1, 3, 224, 224), "torch": torch, "ct": ct})
    mlmodel = ns["coreml_model"]
    assert _check_stored(mlmodel, qmodel) == 3
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    assert ops.count("constexpr_affine_dequantize") == 3 and "quantize" in ops


class _SeedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.first_layer = nn.Conv2d(1, 4, 3)
        self.conv = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.final_layer = nn.Linear(8 * 16 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(self.first_layer(x))))
        return self.final_layer(torch.flatten(x, 1))


def test_blocks_6_7_and_8_qat_then_plain_convert(tmp_path):
    import coremltools as ct

    torch.manual_seed(0)
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(textwrap.dedent(BLOCK_6_QAT_YAML))
    model = _SeedModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(torch.rand(4, 1, 20, 20), torch.randint(0, 3, (4,))) for _ in range(3)]
    ns = _run(BLOCK_7_QAT, {"model": model, "yaml_path": str(yaml_path), "torch": torch, "data": data,
                            "loss_fn": nn.CrossEntropyLoss(), "optimizer": optimizer})
    qmodel = ns["model"]
    assert set(quanta.records(qmodel)) == {"conv.weight"}  # first and final layers named null
    assert qmodel.coreml_minimum_deployment_target == ct.target.iOS17
    ns = _run(BLOCK_8_CONVERT, {**ns, "ct": ct})
    assert _check_stored(ns["coreml_model"], qmodel) == 1
